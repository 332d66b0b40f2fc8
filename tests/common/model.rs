//! Generated trees (`btrfsimg::source::generated`) for the tests: hostile
//! names whose btrfs hashes collide, writing a model to disk, and comparing
//! what the kernel shows of a mounted image with the model itself.

#![allow(unused_imports, dead_code)]

use super::*;
use btrfsimg::format::hash::crc32c_raw;
use btrfsimg::format::Timespec;
use btrfsimg::source::generated::{file_bytes, Content, Entry, Meta};
use btrfsimg::source::{Fill, Segment};
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `G(v) = crc32c_raw(0, v as 4 little-endian bytes)`: feeding 4 bytes `x` to
/// a register `r` gives `G(r ^ x)`, and `G` is linear and invertible over
/// GF(2). That is all it takes to make a name hash to any value.
fn g(v: u32) -> u32 {
    crc32c_raw(0, &v.to_le_bytes())
}

/// Solves `G(x) = y` by Gaussian elimination on the 32 columns `G(1 << i)`.
fn g_inverse(y: u32) -> u32 {
    // Rows: (column image, which input bits make it).
    let mut rows: Vec<(u32, u32)> = (0..32).map(|i| (g(1 << i), 1u32 << i)).collect();
    let mut basis: Vec<(u32, u32)> = Vec::new();
    for bit in (0..32).rev() {
        let Some(p) = rows.iter().position(|r| r.0 >> bit & 1 == 1) else {
            continue;
        };
        let pivot = rows.swap_remove(p);
        for r in rows.iter_mut().chain(basis.iter_mut()) {
            if r.0 >> bit & 1 == 1 {
                r.0 ^= pivot.0;
                r.1 ^= pivot.1;
            }
        }
        basis.push(pivot);
    }
    let mut x = 0;
    for (img, src) in basis {
        let bit = 31 - img.leading_zeros();
        if y >> bit & 1 == 1 {
            x ^= src;
        }
    }
    debug_assert_eq!(g(x), y);
    x
}

/// The 4 bytes that make `crc32c_raw(seed, prefix ++ bytes) == target`.
pub fn forge(seed: u32, prefix: &[u8], target: u32) -> [u8; 4] {
    let r = crc32c_raw(seed, prefix);
    (r ^ g_inverse(target)).to_le_bytes()
}

/// `n` distinct valid file names of `len` bytes (5..=255) whose btrfs name
/// hash (DIR_ITEM and XATTR_ITEM keys) is `target`. With `prefix`, the names
/// start with it (e.g. `user.` for xattrs).
pub fn names_with_hash(n: usize, len: usize, target: u32, prefix: &[u8]) -> Vec<Vec<u8>> {
    hashed_names(!1u32, n, len, target, prefix)
}

/// Names whose INODE_EXTREF hash under `parent` (an inode number) is `target`.
pub fn names_with_extref_hash(
    parent: u64,
    n: usize,
    len: usize,
    target: u32,
    prefix: &[u8],
) -> Vec<Vec<u8>> {
    hashed_names(parent as u32, n, len, target, prefix)
}

fn hashed_names(seed: u32, n: usize, len: usize, target: u32, prefix: &[u8]) -> Vec<Vec<u8>> {
    assert!(len >= prefix.len() + 5 && len <= 255);
    let mut out = Vec::new();
    let mut i = 0u64;
    while out.len() < n {
        let mut name = prefix.to_vec();
        let tag = format!("{i:x}-");
        name.extend_from_slice(tag.as_bytes());
        name.resize(len - 4, b'n');
        let tail = forge(seed, &name, target);
        i += 1;
        if tail.iter().any(|&b| b == 0 || b == b'/') {
            continue;
        }
        name.extend_from_slice(&tail);
        out.push(name);
    }
    out
}

pub fn dir_of(entries: Vec<(Vec<u8>, Entry)>) -> Entry {
    Entry::dir(entries.into_iter().collect())
}

/// Writes a model to disk under `root` (which must not exist): entries,
/// modes, owners, times, xattrs, holes and hard links. Needs root for owners,
/// devices and trusted xattrs.
pub fn materialize(root: &Path, model: &Entry) {
    fs::create_dir(root).unwrap();
    let mut links: BTreeMap<u64, PathBuf> = BTreeMap::new();
    write_children(root, model, &mut links);
    apply_meta(root, &model.meta);
}

fn write_children(dir: &Path, e: &Entry, links: &mut BTreeMap<u64, PathBuf>) {
    let Content::Dir(children) = &e.content else {
        return;
    };
    // Breadth-first like the planner, so the first link in tree order is the
    // one written with content; deeper links come after.
    let mut sub = Vec::new();
    for (name, c) in children {
        let p = dir.join(OsStr::from_bytes(name));
        if let Some(id) = c.link {
            if let Some(first) = links.get(&id) {
                fs::hard_link(first, &p).unwrap();
                continue;
            }
            links.insert(id, p.clone());
        }
        match &c.content {
            Content::Dir(_) => {
                fs::create_dir(&p).unwrap();
                sub.push((p, c));
                continue;
            }
            Content::File { size, data, fill } => {
                write_model_file(&p, *size, data.as_deref(), *fill)
            }
            Content::Symlink(t) => std::os::unix::fs::symlink(OsStr::from_bytes(t), &p).unwrap(),
            Content::Fifo => mknod(&p, libc::S_IFIFO, 0),
            Content::Socket => mknod(&p, libc::S_IFSOCK, 0),
            Content::CharDev(r) => mknod(&p, libc::S_IFCHR, *r),
            Content::BlockDev(r) => mknod(&p, libc::S_IFBLK, *r),
        }
        apply_meta(&p, &c.meta);
    }
    for (p, c) in sub {
        write_children(&p, c, links);
        apply_meta(&p, &c.meta);
    }
}

fn mknod(p: &Path, ty: u32, rdev: u64) {
    let dev = libc::makedev((rdev >> 20) as u32, (rdev & 0xfffff) as u32);
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), ty | 0o600, dev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

fn write_model_file(p: &Path, size: u64, data: Option<&[Segment]>, fill: Fill) {
    let f = File::create(p).unwrap();
    let whole = [Segment {
        offset: 0,
        len: size,
    }];
    let mut buf = vec![0u8; 1 << 20];
    for s in data.unwrap_or(&whole) {
        let mut off = s.offset;
        while off < s.offset + s.len {
            let n = ((s.offset + s.len - off) as usize).min(buf.len());
            file_bytes(fill, size, data, off, &mut buf[..n]);
            f.write_all_at(&buf[..n], off).unwrap();
            off += n as u64;
        }
    }
    f.set_len(size).unwrap();
}

fn apply_meta(p: &Path, m: &Meta) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    unsafe { libc::lchown(c.as_ptr(), m.uid, m.gid) };
    let is_link = fs::symlink_metadata(p).unwrap().file_type().is_symlink();
    if !is_link {
        fs::set_permissions(p, fs::Permissions::from_mode(m.perm)).unwrap();
    }
    for (k, v) in &m.xattrs {
        set_xattr(p, k, v).unwrap_or_else(|e| panic!("xattr on {}: {e}", p.display()));
    }
    set_times(p, m.mtime.sec, m.mtime.nsec).unwrap();
}

/// Differences between a mounted image at `mnt` and the model: every entry's
/// type, mode, owner, size, content (holes included), link target, device
/// number, xattrs, hard-link groups and mtime.
/// With `owner`, every entry is expected to have that owner (`--owner`).
pub fn model_differences(mnt: &Path, model: &Entry, owner: Option<(u32, u32)>) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut inodes: BTreeMap<u64, u64> = BTreeMap::new();
    compare_entry(mnt, b"", model, owner, &mut inodes, &mut diffs);
    diffs
}

fn kind_bits(c: &Content) -> u32 {
    match c {
        Content::Dir(_) => libc::S_IFDIR,
        Content::File { .. } => libc::S_IFREG,
        Content::Symlink(_) => libc::S_IFLNK,
        Content::Fifo => libc::S_IFIFO,
        Content::Socket => libc::S_IFSOCK,
        Content::CharDev(_) => libc::S_IFCHR,
        Content::BlockDev(_) => libc::S_IFBLK,
    }
}

fn compare_entry(
    p: &Path,
    rel: &[u8],
    e: &Entry,
    owner: Option<(u32, u32)>,
    inodes: &mut BTreeMap<u64, u64>,
    diffs: &mut Vec<String>,
) {
    let shown = show(rel);
    let m = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(err) => {
            diffs.push(format!("{shown}: missing ({err})"));
            return;
        }
    };
    if let Some(id) = e.link {
        match inodes.get(&id) {
            Some(&ino) if ino != m.ino() => {
                diffs.push(format!("{shown}: not a hard link of its group"))
            }
            Some(_) => return, // attributes checked on the first link
            None => {
                inodes.insert(id, m.ino());
            }
        }
    }
    let want_mode = kind_bits(&e.content) | (e.meta.perm & 0o7777);
    if m.mode() != want_mode {
        diffs.push(format!("{shown}: mode {:o} != {:o}", m.mode(), want_mode));
    }
    let want_owner = owner.unwrap_or((e.meta.uid, e.meta.gid));
    if (m.uid(), m.gid()) != want_owner {
        diffs.push(format!(
            "{shown}: owner {}:{} != {}:{}",
            m.uid(),
            m.gid(),
            want_owner.0,
            want_owner.1
        ));
    }
    if (m.mtime(), m.mtime_nsec() as u32) != (e.meta.mtime.sec, e.meta.mtime.nsec) {
        diffs.push(format!("{shown}: mtime differs"));
    }
    match list_xattrs(p) {
        Ok(x) => {
            let want: BTreeMap<Vec<u8>, Vec<u8>> = e.meta.xattrs.iter().cloned().collect();
            if x != want {
                diffs.push(format!(
                    "{shown}: xattrs differ ({} vs {})",
                    x.len(),
                    want.len()
                ));
            }
        }
        Err(err) => diffs.push(format!("{shown}: listxattr: {err}")),
    }
    match &e.content {
        Content::Dir(children) => {
            let names: Vec<Vec<u8>> = dir_names(p);
            let want: Vec<Vec<u8>> = children.keys().cloned().collect();
            if names != want {
                diffs.push(format!(
                    "{shown}: {} entries, expected {}",
                    names.len(),
                    want.len()
                ));
            }
            for (name, c) in children {
                let mut r = rel.to_vec();
                r.push(b'/');
                r.extend_from_slice(name);
                compare_entry(
                    &p.join(OsStr::from_bytes(name)),
                    &r,
                    c,
                    owner,
                    inodes,
                    diffs,
                );
            }
        }
        Content::File { size, data, fill } => {
            if m.len() != *size {
                diffs.push(format!("{shown}: size {} != {size}", m.len()));
                return;
            }
            let f = match File::open(p) {
                Ok(f) => f,
                Err(err) => {
                    diffs.push(format!("{shown}: open: {err}"));
                    return;
                }
            };
            let mut got = vec![0u8; 1 << 20];
            let mut want = vec![0u8; 1 << 20];
            // Only the data ranges and the holes' edges: files may be TiBs.
            let whole = [Segment {
                offset: 0,
                len: *size,
            }];
            for s in data.as_deref().unwrap_or(&whole) {
                let mut off = s.offset;
                while off < s.offset + s.len {
                    let n = ((s.offset + s.len - off) as usize).min(got.len());
                    if f.read_exact_at(&mut got[..n], off).is_err() {
                        diffs.push(format!("{shown}: read at {off} failed"));
                        return;
                    }
                    file_bytes(*fill, *size, data.as_deref(), off, &mut want[..n]);
                    if got[..n] != want[..n] {
                        diffs.push(format!("{shown}: content differs at {off}"));
                        return;
                    }
                    off += n as u64;
                }
            }
            if let Some(segs) = data {
                let got = data_segments(&f, *size);
                let want: Vec<(u64, u64)> = merge_sectors(segs, *size);
                if got != want {
                    diffs.push(format!("{shown}: data ranges {got:?} != {want:?}"));
                }
            }
        }
        Content::Symlink(t) => match fs::read_link(p) {
            Ok(got) if got.as_os_str().as_bytes() == &t[..] => {}
            _ => diffs.push(format!("{shown}: symlink target differs")),
        },
        Content::CharDev(r) | Content::BlockDev(r) => {
            let got = ((libc::major(m.rdev()) as u64) << 20) | libc::minor(m.rdev()) as u64;
            if got != *r {
                diffs.push(format!("{shown}: rdev {got:#x} != {r:#x}"));
            }
        }
        Content::Fifo | Content::Socket => {}
    }
}

/// The (start, end) data ranges the image stores for `segs`: whole sectors,
/// merged where they touch, cut at the file's size.
pub fn merge_sectors(segs: &[Segment], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in segs {
        let a = s.offset / 4096 * 4096;
        let b = ((s.offset + s.len).div_ceil(4096) * 4096).min(size.div_ceil(4096) * 4096);
        match out.last_mut() {
            Some(l) if l.1 >= a => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    for r in &mut out {
        r.1 = r.1.min(size);
    }
    out
}

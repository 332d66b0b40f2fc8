//! Files: content comparison, xattrs, times and small helpers.

#![allow(unused_imports, dead_code)]

use super::*;
use std::collections::{BTreeMap, HashMap};
use std::env;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tempfile::TempDir;

/// Opens for reading without updating atime when allowed.
pub fn open_noatime(p: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(p)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(p),
        r => r,
    }
}

/// Data ranges (SEEK_DATA/SEEK_HOLE) of a file, clipped to `len`. Falls back
/// to the whole file if the filesystem cannot tell.
pub fn data_segments(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let len_i = len as i64;
    let whole = if len == 0 { vec![] } else { vec![(0, len)] };
    let mut segs = Vec::new();
    let mut pos: i64 = 0;
    while pos < len_i {
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return whole;
        }
        if d >= len_i {
            break;
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h <= d {
            return whole;
        }
        let h = h.min(len_i);
        segs.push((d as u64, h as u64));
        pos = h;
    }
    segs
}

pub fn merge_segments(mut segs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    segs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in segs {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Compares two files' contents chunk by chunk, reading only the union of
/// their data ranges (holes in both are equal by definition). Returns a
/// description of the first difference.
pub fn compare_file_contents(a: &Path, b: &Path) -> Result<(), String> {
    let fa = open_noatime(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let fb = open_noatime(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let (la, lb) = (
        fa.metadata().map_err(|e| e.to_string())?.len(),
        fb.metadata().map_err(|e| e.to_string())?.len(),
    );
    if la != lb {
        return Err(format!("length {la} vs {lb}"));
    }
    let mut segs = data_segments(&fa, la);
    segs.extend(data_segments(&fb, lb));
    let segs = merge_segments(segs);
    // Buffers only as large as needed: most files are small or empty.
    let buf = segs
        .iter()
        .map(|(s, e)| (e - s) as usize)
        .max()
        .unwrap_or(0)
        .min(CHUNK);
    let (mut ba, mut bb) = (vec![0u8; buf], vec![0u8; buf]);
    for (start, end) in segs {
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK as u64) as usize;
            fa.read_exact_at(&mut ba[..n], off)
                .map_err(|e| format!("read {} at {off}: {e}", a.display()))?;
            fb.read_exact_at(&mut bb[..n], off)
                .map_err(|e| format!("read {} at {off}: {e}", b.display()))?;
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
                return Err(format!(
                    "content differs at byte offset {} ({:#04x} vs {:#04x})",
                    off + i as u64,
                    ba[i],
                    bb[i]
                ));
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Asserts two (image) files are byte-identical; reports the length and the
/// first few differing 4 KiB blocks plus their total count.
pub fn assert_files_identical(a: &Path, b: &Path) {
    let fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let mut segs = data_segments(&fa, la.min(lb));
    segs.extend(data_segments(&fb, la.min(lb)));
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut bad_blocks: Vec<u64> = Vec::new();
    for (start, end) in merge_segments(segs) {
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK as u64) as usize;
            fa.read_exact_at(&mut ba[..n], off).unwrap();
            fb.read_exact_at(&mut bb[..n], off).unwrap();
            if ba[..n] != bb[..n] {
                for i in (0..n).step_by(4096) {
                    let j = (i + 4096).min(n);
                    if ba[i..j] != bb[i..j] {
                        let blk = (off + i as u64) / 4096 * 4096;
                        if bad_blocks.last() != Some(&blk) {
                            bad_blocks.push(blk);
                        }
                    }
                }
            }
            off += n as u64;
        }
    }
    assert!(
        la == lb && bad_blocks.is_empty(),
        "{} and {} differ: lengths {la} vs {lb}; {} differing 4 KiB blocks, first at offsets {:?}",
        a.display(),
        b.display(),
        bad_blocks.len(),
        &bad_blocks[..bad_blocks.len().min(10)]
    );
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path contains NUL")
}

/// Every entry under `root` (including `root`) with its lstat metadata, as
/// (relative path shown with `show`, metadata), in a stable order.
pub fn metadata_under(root: &Path) -> Vec<(String, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let p = join_rel(root, &rel);
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        if m.is_dir() {
            for name in dir_names(&p).into_iter().rev() {
                stack.push(child_rel(&rel, &name));
            }
        }
        out.push((show(&rel), m));
    }
    out
}

/// Entries under `root` (including `root`) not owned by UID:GID.
pub fn entries_not_owned_by(root: &Path, uid: u32, gid: u32) -> Vec<String> {
    metadata_under(root)
        .into_iter()
        .filter(|(_, m)| (m.uid(), m.gid()) != (uid, gid))
        .map(|(rel, m)| format!("{rel} ({}:{})", m.uid(), m.gid()))
        .collect()
}

/// Decompresses SRC to DST with the `zstd` command-line tool (what image
/// consumers use), asserting success.
pub fn zstd_decompress(src: &Path, dst: &Path) {
    let mut cmd = Command::new(tool("zstd"));
    cmd.args(["-d", "-q", "-f"]).arg(src).arg("-o").arg(dst);
    run_ok(&mut cmd);
}

/// All extended attributes of a path (not following symlinks), name → value.
pub fn list_xattrs(p: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = cpath(p);
    let mut names = vec![0u8; 1024];
    let n = loop {
        let r = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(BTreeMap::new()),
            _ => return Err(e),
        }
    };
    let mut map = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut val = vec![0u8; 256];
        let len = loop {
            let r = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    val.as_mut_ptr().cast(),
                    val.len(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                val.resize(val.len() * 4, 0);
            } else {
                return Err(e);
            }
        };
        val.truncate(len);
        map.insert(name.to_vec(), val);
    }
    Ok(map)
}

pub fn set_xattr(p: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).expect("xattr name has NUL"));
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets atime and mtime (seconds, nanoseconds) without following symlinks.
pub fn set_times(p: &Path, sec: i64, nsec: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    };
    let times = [ts, ts];
    let c = cpath(p);
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Free bytes available to unprivileged users (statvfs f_bavail * f_frsize).
pub fn statvfs_avail(p: &Path) -> u64 {
    let c = cpath(p);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(
        r,
        0,
        "statvfs {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Names in a directory, sorted by bytes.
pub fn dir_names(p: &Path) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display()))
        .map(|e| e.unwrap().file_name().into_vec())
        .collect();
    v.sort();
    v
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Writes `size` deterministic pseudo-random bytes to a new file, streaming.
pub fn write_random_file(p: &Path, size: u64, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// Escaped, printable form of a relative path ("/" for the root).
pub fn show(rel: &[u8]) -> String {
    let mut s = String::from("/");
    for &b in rel {
        match b {
            b'\n' => s.push_str("\\n"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

pub fn join_rel(base: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(OsStr::from_bytes(rel))
    }
}

pub fn child_rel(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut r = parent.to_vec();
    if !r.is_empty() {
        r.push(b'/');
    }
    r.extend_from_slice(name);
    r
}

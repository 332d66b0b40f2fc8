//! Entry-by-entry comparison of a source tree with a mounted image.

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

#[derive(Clone, Copy, Debug)]
pub struct CompareOpts {
    /// Compare mtime seconds.
    pub mtime: bool,
    /// Also compare mtime nanoseconds.
    pub mtime_ns: bool,
    /// Compare the root directory's mtime.
    pub root_mtime: bool,
    /// Compare st_rdev of device nodes.
    pub rdev: bool,
    /// Compare extended attributes.
    pub xattrs: bool,
    /// Compare regular files' holes: their data ranges (SEEK_DATA /
    /// SEEK_HOLE, rounded out to 4 KiB sectors) must be the same.
    pub holes: bool,
    /// How many differences the panic message lists.
    pub max_reported: usize,
}

impl Default for CompareOpts {
    fn default() -> Self {
        CompareOpts {
            mtime: true,
            mtime_ns: true,
            root_mtime: true,
            rdev: true,
            xattrs: true,
            holes: true,
            max_reported: 50,
        }
    }
}

impl CompareOpts {
    /// Strict for btrfsimg; relaxed only where mkfs.btrfs 6.2 is known to
    /// lose information (nanoseconds, root dir times, rdev, holes).
    pub fn for_builder() -> Self {
        let mut o = CompareOpts::default();
        if is_mkfs_mode() {
            o.mtime_ns = false;
            o.root_mtime = false;
            o.rdev = false;
            o.holes = false;
        }
        o
    }
}

pub fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFCHR => "chardev",
        libc::S_IFBLK => "blockdev",
        libc::S_IFSOCK => "socket",
        _ => "unknown",
    }
}

pub struct LinkInfo {
    rel: Vec<u8>,
    src: (u64, u64),
    mnt: (u64, u64),
    mnt_nlink: u64,
}

/// All differences between the tree at `src` and the tree at `mnt`
/// (including the root directory itself), as "path: what" lines.
pub fn tree_differences(src: &Path, mnt: &Path, opts: CompareOpts) -> Vec<String> {
    let mut diffs: Vec<String> = Vec::new();
    let mut links: Vec<LinkInfo> = Vec::new();
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let (sp, mp) = (join_rel(src, &rel), join_rel(mnt, &rel));
        let mut d = |what: String| diffs.push(format!("{}: {what}", show(&rel)));
        let s = match fs::symlink_metadata(&sp) {
            Ok(m) => m,
            Err(e) => {
                d(format!("cannot stat source: {e}"));
                continue;
            }
        };
        let m = match fs::symlink_metadata(&mp) {
            Ok(m) => m,
            Err(e) => {
                d(format!("cannot stat in image: {e}"));
                continue;
            }
        };
        let (st, mt) = (s.mode() & libc::S_IFMT, m.mode() & libc::S_IFMT);
        if st != mt {
            d(format!(
                "type {} in source, {} in image",
                type_name(st),
                type_name(mt)
            ));
            continue;
        }
        if s.mode() != m.mode() {
            d(format!("mode {:o} vs {:o}", s.mode(), m.mode()));
        }
        if (s.uid(), s.gid()) != (m.uid(), m.gid()) {
            d(format!(
                "owner {}:{} vs {}:{}",
                s.uid(),
                s.gid(),
                m.uid(),
                m.gid()
            ));
        }
        if opts.mtime && (!rel.is_empty() || opts.root_mtime) {
            let ns = |x: i64| if opts.mtime_ns { x } else { 0 };
            if s.mtime() != m.mtime() || ns(s.mtime_nsec()) != ns(m.mtime_nsec()) {
                d(format!(
                    "mtime {}.{:09} vs {}.{:09}",
                    s.mtime(),
                    s.mtime_nsec(),
                    m.mtime(),
                    m.mtime_nsec()
                ));
            }
        }
        if opts.xattrs {
            match (list_xattrs(&sp), list_xattrs(&mp)) {
                (Ok(a), Ok(b)) if a != b => {
                    d(format!("xattrs differ: {}", describe_map_diff(&a, &b)))
                }
                (Ok(_), Ok(_)) => {}
                (ra, rb) => d(format!(
                    "cannot list xattrs: {:?} / {:?}",
                    ra.err(),
                    rb.err()
                )),
            }
        }
        if st != libc::S_IFDIR {
            links.push(LinkInfo {
                rel: rel.clone(),
                src: (s.dev(), s.ino()),
                mnt: (m.dev(), m.ino()),
                mnt_nlink: m.nlink(),
            });
        }
        match st {
            libc::S_IFREG => {
                if s.len() != m.len() {
                    d(format!("size {} vs {}", s.len(), m.len()));
                } else if let Err(e) = compare_file_contents(&sp, &mp) {
                    d(e);
                } else if opts.holes && s.len() > 0 {
                    let (a, b) = (sector_data_ranges(&sp), sector_data_ranges(&mp));
                    if a != b {
                        d(format!("data ranges {a:?} vs {b:?}"));
                    }
                }
            }
            libc::S_IFLNK => {
                if s.len() != m.len() {
                    d(format!("symlink size {} vs {}", s.len(), m.len()));
                }
                match (fs::read_link(&sp), fs::read_link(&mp)) {
                    (Ok(a), Ok(b)) if a != b => d(format!(
                        "symlink target {} vs {}",
                        show(a.as_os_str().as_bytes()),
                        show(b.as_os_str().as_bytes())
                    )),
                    (Ok(_), Ok(_)) => {}
                    (ra, rb) => d(format!("readlink: {:?} / {:?}", ra.err(), rb.err())),
                }
            }
            libc::S_IFCHR | libc::S_IFBLK if opts.rdev && s.rdev() != m.rdev() => {
                d(format!(
                    "rdev {}:{} vs {}:{}",
                    libc::major(s.rdev()),
                    libc::minor(s.rdev()),
                    libc::major(m.rdev()),
                    libc::minor(m.rdev())
                ));
            }
            libc::S_IFDIR => {
                let (sn, mn) = match (fs::read_dir(&sp), fs::read_dir(&mp)) {
                    (Ok(a), Ok(b)) => {
                        let names = |rd: fs::ReadDir| -> Vec<Vec<u8>> {
                            let mut v: Vec<Vec<u8>> = rd
                                .filter_map(|e| e.ok())
                                .map(|e| e.file_name().into_vec())
                                .collect();
                            v.sort();
                            v
                        };
                        (names(a), names(b))
                    }
                    (ra, rb) => {
                        d(format!("read_dir: {:?} / {:?}", ra.err(), rb.err()));
                        continue;
                    }
                };
                let (mut i, mut j) = (0, 0);
                let mut common = Vec::new();
                while i < sn.len() || j < mn.len() {
                    let ord = match (sn.get(i), mn.get(j)) {
                        (Some(a), Some(b)) => a.cmp(b),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        _ => std::cmp::Ordering::Greater,
                    };
                    match ord {
                        std::cmp::Ordering::Equal => {
                            common.push(sn[i].clone());
                            i += 1;
                            j += 1;
                        }
                        std::cmp::Ordering::Less => {
                            let r = child_rel(&rel, &sn[i]);
                            diffs.push(format!("{}: missing in image", show(&r)));
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            let r = child_rel(&rel, &mn[j]);
                            diffs.push(format!("{}: unexpected entry in image", show(&r)));
                            j += 1;
                        }
                    }
                }
                for name in common.iter().rev() {
                    stack.push(child_rel(&rel, name));
                }
            }
            _ => {}
        }
    }
    // Hard-link groups: each entry's group leader (first path visited with
    // the same inode) must be the same path on both sides, and the image's
    // link count must equal the group size.
    let mut src_groups: HashMap<(u64, u64), (usize, u64)> = HashMap::new();
    let mut mnt_groups: HashMap<(u64, u64), (usize, u64)> = HashMap::new();
    for (i, l) in links.iter().enumerate() {
        src_groups.entry(l.src).or_insert((i, 0)).1 += 1;
        mnt_groups.entry(l.mnt).or_insert((i, 0)).1 += 1;
    }
    for l in &links {
        let (sl, sc) = src_groups[&l.src];
        let (ml, mc) = mnt_groups[&l.mnt];
        if sl != ml {
            diffs.push(format!(
                "{}: hard-link group differs: in source same inode as {}, in image same inode as {}",
                show(&l.rel),
                show(&links[sl].rel),
                show(&links[ml].rel)
            ));
        }
        if sc != mc || l.mnt_nlink != sc {
            diffs.push(format!(
                "{}: link count: {sc} links in source tree, {mc} in image tree, image nlink {}",
                show(&l.rel),
                l.mnt_nlink
            ));
        }
    }
    diffs
}

pub fn describe_map_diff(a: &BTreeMap<Vec<u8>, Vec<u8>>, b: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let mut parts = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => parts.push(format!("{} missing in image", show(k))),
            Some(w) if w != v => parts.push(format!(
                "{} value differs ({} vs {} bytes)",
                show(k),
                v.len(),
                w.len()
            )),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        parts.push(format!("{} unexpected in image", show(k)));
    }
    parts.join(", ")
}

/// Asserts the trees are equal; the panic lists up to `opts.max_reported`
/// differences with their relative paths.
pub fn compare_trees(src: &Path, mnt: &Path, opts: CompareOpts) {
    let diffs = tree_differences(src, mnt, opts);
    if !diffs.is_empty() {
        let shown = diffs.len().min(opts.max_reported);
        panic!(
            "{} differences between {} and {} (showing {shown}):\n  {}",
            diffs.len(),
            src.display(),
            mnt.display(),
            diffs[..shown].join("\n  ")
        );
    }
}

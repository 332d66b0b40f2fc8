//! Building source trees on disk.

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

/// Creates entries under a root directory. Names are raw bytes. Modes,
/// owners and times are recorded and applied by `finalize()` (owners, then
/// modes with directories last and deepest first, then times deepest first),
/// so setuid bits survive chown and directory times survive later creations.
/// Every created entry gets a deterministic default mode (0644 / 0755) and a
/// deterministic, path-derived mtime with nanoseconds unless overridden.
pub struct TreeBuilder {
    root: PathBuf,
    modes: BTreeMap<Vec<u8>, u32>,
    owners: BTreeMap<Vec<u8>, (u32, u32)>,
    times: BTreeMap<Vec<u8>, (i64, u32)>,
    dirs: std::collections::BTreeSet<Vec<u8>>,
}

/// Deterministic default mtime for a relative path.
pub fn default_time(rel: &[u8]) -> (i64, u32) {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in rel {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    (
        1_500_000_000 + (h % 200_000_000) as i64,
        ((h >> 32) % 1_000_000_000) as u32,
    )
}

/// Deterministic seed for a relative path's content.
pub fn seed_for(rel: &[u8]) -> u64 {
    default_time(rel).0 as u64 ^ ((default_time(rel).1 as u64) << 32)
}

impl TreeBuilder {
    /// Creates `root` (must not exist yet, its parent must).
    pub fn new(root: &Path) -> TreeBuilder {
        fs::create_dir(root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        let mut t = TreeBuilder {
            root: root.to_path_buf(),
            modes: BTreeMap::new(),
            owners: BTreeMap::new(),
            times: BTreeMap::new(),
            dirs: Default::default(),
        };
        t.record(b"", 0o755, true);
        t
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &[u8]) -> PathBuf {
        join_rel(&self.root, rel)
    }

    fn record(&mut self, rel: &[u8], mode: u32, is_dir: bool) {
        self.modes.insert(rel.to_vec(), mode);
        self.times.insert(rel.to_vec(), default_time(rel));
        if is_dir {
            self.dirs.insert(rel.to_vec());
        }
    }

    fn ensure_parents(&mut self, rel: &[u8]) {
        let mut end = 0;
        while let Some(i) = rel[end..].iter().position(|&b| b == b'/') {
            let prefix = &rel[..end + i];
            end += i + 1;
            if prefix.is_empty() {
                continue;
            }
            let p = self.path(prefix);
            if fs::symlink_metadata(&p).is_err() {
                fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.record(prefix, 0o755, true);
            }
        }
    }

    /// Directory (parents created as needed; existing is fine).
    pub fn dir(&mut self, rel: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let p = self.path(rel);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            self.record(rel, 0o755, true);
        }
        self
    }

    /// Regular file with the given bytes.
    pub fn file(&mut self, rel: &[u8], content: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let p = self.path(rel);
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self.record(rel, 0o644, false);
        self
    }

    /// Regular file of `size` deterministic pseudo-random bytes.
    pub fn random_file(&mut self, rel: &[u8], size: u64, seed: u64) -> &mut Self {
        self.ensure_parents(rel);
        write_random_file(&self.path(rel), size, seed);
        self.record(rel, 0o644, false);
        self
    }

    /// Sparse file of length `size` with data only at the given offsets.
    pub fn sparse_file(&mut self, rel: &[u8], size: u64, chunks: &[(u64, &[u8])]) -> &mut Self {
        self.ensure_parents(rel);
        let p = self.path(rel);
        let f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        for (off, data) in chunks {
            f.write_all_at(data, *off).unwrap();
        }
        f.set_len(size).unwrap();
        self.record(rel, 0o644, false);
        self
    }

    pub fn symlink(&mut self, rel: &[u8], target: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let p = self.path(rel);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &p)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self.times.insert(rel.to_vec(), default_time(rel));
        self
    }

    /// New name `rel` for the existing entry `existing` (shares its inode,
    /// mode, owner and times; nothing new is recorded).
    pub fn hardlink(&mut self, existing: &[u8], rel: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let (a, b) = (self.path(existing), self.path(rel));
        fs::hard_link(&a, &b).unwrap_or_else(|e| panic!("link {}: {e}", b.display()));
        self
    }

    pub fn fifo(&mut self, rel: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let c = cpath(&self.path(rel));
        let r = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
        assert_eq!(r, 0, "mkfifo {}: {}", show(rel), io::Error::last_os_error());
        self.record(rel, 0o644, false);
        self
    }

    fn mknod(&mut self, rel: &[u8], kind: u32, major: u32, minor: u32) -> &mut Self {
        self.ensure_parents(rel);
        let c = cpath(&self.path(rel));
        let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(major, minor)) };
        assert_eq!(r, 0, "mknod {}: {}", show(rel), io::Error::last_os_error());
        self.record(rel, 0o600, false);
        self
    }

    /// Unix socket inode (mknod S_IFSOCK: the same inode a bound socket leaves).
    pub fn socket(&mut self, rel: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let c = cpath(&self.path(rel));
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFSOCK | 0o755, 0) };
        assert_eq!(
            r,
            0,
            "mknod socket {}: {}",
            show(rel),
            io::Error::last_os_error()
        );
        self.record(rel, 0o755, false);
        self
    }

    pub fn char_dev(&mut self, rel: &[u8], major: u32, minor: u32) -> &mut Self {
        self.mknod(rel, libc::S_IFCHR, major, minor)
    }

    pub fn block_dev(&mut self, rel: &[u8], major: u32, minor: u32) -> &mut Self {
        self.mknod(rel, libc::S_IFBLK, major, minor)
    }

    /// Permission bits (incl. setuid/setgid/sticky), applied by finalize().
    /// Not for symlinks.
    pub fn chmod(&mut self, rel: &[u8], mode: u32) -> &mut Self {
        assert!(
            !fs::symlink_metadata(self.path(rel)).unwrap().is_symlink(),
            "chmod on symlink {}",
            show(rel)
        );
        self.modes.insert(rel.to_vec(), mode & 0o7777);
        self
    }

    /// Owner (lchown), applied by finalize() before modes.
    pub fn chown(&mut self, rel: &[u8], uid: u32, gid: u32) -> &mut Self {
        self.owners.insert(rel.to_vec(), (uid, gid));
        self
    }

    /// mtime (and atime) with nanoseconds, applied by finalize_times().
    pub fn mtime(&mut self, rel: &[u8], sec: i64, nsec: u32) -> &mut Self {
        assert!(nsec < 1_000_000_000);
        self.times.insert(rel.to_vec(), (sec, nsec));
        self
    }

    /// Extended attribute (lsetxattr), set immediately.
    pub fn xattr(&mut self, rel: &[u8], name: &[u8], value: &[u8]) -> &mut Self {
        set_xattr(&self.path(rel), name, value)
            .unwrap_or_else(|e| panic!("setxattr {} {}: {e}", show(rel), show(name)));
        self
    }

    /// Removes an entry (recursively) and forgets everything recorded for it.
    pub fn remove(&mut self, rel: &[u8]) -> &mut Self {
        let p = self.path(rel);
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
        let under = |k: &Vec<u8>| -> bool {
            k.as_slice() == rel || (k.starts_with(rel) && k.get(rel.len()) == Some(&b'/'))
        };
        self.modes.retain(|k, _| !under(k));
        self.owners.retain(|k, _| !under(k));
        self.times.retain(|k, _| !under(k));
        self.dirs.retain(|k| !under(k));
        self
    }

    /// Applies owners, then modes (non-directories first, then directories
    /// deepest first, so a mode-000 directory comes last), then times.
    pub fn finalize(&mut self) -> &mut Self {
        for (rel, &(u, g)) in &self.owners {
            let p = join_rel(&self.root, rel);
            std::os::unix::fs::lchown(&p, Some(u), Some(g))
                .unwrap_or_else(|e| panic!("lchown {}: {e}", show(rel)));
        }
        let depth =
            |r: &[u8]| r.iter().filter(|&&b| b == b'/').count() + usize::from(!r.is_empty());
        let mut modes: Vec<(&Vec<u8>, &u32)> = self.modes.iter().collect();
        modes.sort_by_key(|(r, _)| (self.dirs.contains(*r), std::cmp::Reverse(depth(r))));
        for (rel, &mode) in modes {
            let p = join_rel(&self.root, rel);
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", show(rel)));
        }
        self.finalize_times()
    }

    /// Sets all recorded times, deepest entries first (root last).
    pub fn finalize_times(&mut self) -> &mut Self {
        let depth =
            |r: &[u8]| r.iter().filter(|&&b| b == b'/').count() + usize::from(!r.is_empty());
        let mut all: Vec<(&Vec<u8>, &(i64, u32))> = self.times.iter().collect();
        all.sort_by_key(|(r, _)| std::cmp::Reverse(depth(r)));
        for (rel, &(s, ns)) in all {
            set_times(&join_rel(&self.root, rel), s, ns)
                .unwrap_or_else(|e| panic!("utimensat {}: {e}", show(rel)));
        }
        self
    }
}

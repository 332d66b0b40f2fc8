//! Read-write scenarios and reproducibility.

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

pub fn copy_image(img: &Path, dir: &Path, name: &str) -> PathBuf {
    let copy = dir.join(name);
    fs::copy(img, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", img.display()));
    copy
}

pub fn regular_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut names: Vec<PathBuf> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.push(p);
            }
        }
    }
    out
}

pub fn unused_name(dir: &Path, base: &str) -> PathBuf {
    (0..)
        .map(|i| dir.join(format!("{base}{i}")))
        .find(|p| fs::symlink_metadata(p).is_err())
        .unwrap()
}

/// Copy the image, grow the copy by 256 MiB, mount rw, `resize max`, write
/// files (10 MiB + small), mkdir, delete some existing files, sync, scrub,
/// unmount, `btrfs check`, then remount ro and verify the changes persisted.
pub fn rw_cycle(img: &Path) {
    let work = workdir("rw-cycle");
    let copy = copy_image(img, work.path(), "rw.img");
    let f = OpenOptions::new().write(true).open(&copy).unwrap();
    f.set_len(f.metadata().unwrap().len() + 256 * MIB).unwrap();
    drop(f);

    let big = random_bytes(10 * MIB as usize, 0xb16);
    let small = b"small file written by rw_cycle\n".to_vec();
    let m = LoopMount::new(&copy, true);
    let mut cmd = Command::new(tool("btrfs"));
    cmd.args(["filesystem", "resize", "max"]).arg(m.path());
    run_ok(&mut cmd);

    let existing = regular_files(m.path());
    let mut victims: Vec<PathBuf> = Vec::new();
    if !existing.is_empty() {
        for i in [0, existing.len() / 2, existing.len() - 1] {
            if !victims.contains(&existing[i]) {
                victims.push(existing[i].clone());
            }
        }
    }
    let big_p = unused_name(m.path(), "rw-cycle-big-");
    let small_p = unused_name(m.path(), "rw-cycle-small-");
    let dir_p = unused_name(m.path(), "rw-cycle-dir-");
    for (p, data) in [(&big_p, &big), (&small_p, &small)] {
        let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
    fs::create_dir(&dir_p).unwrap();
    fs::write(dir_p.join("inner"), b"inner").unwrap();
    for v in &victims {
        fs::remove_file(v).unwrap_or_else(|e| panic!("delete {}: {e}", v.display()));
    }
    unsafe { libc::sync() };
    btrfs_scrub(m.path());
    let rel = |p: &Path| p.strip_prefix(m.path()).unwrap().to_path_buf();
    let (big_r, small_r, dir_r) = (rel(&big_p), rel(&small_p), rel(&dir_p));
    let victims_r: Vec<PathBuf> = victims.iter().map(|v| rel(v)).collect();
    m.unmount();
    btrfs_check(&copy);

    let m = LoopMount::new(&copy, false);
    assert_eq!(
        fs::read(m.path().join(&big_r)).unwrap(),
        big,
        "big file after remount"
    );
    assert_eq!(fs::read(m.path().join(&small_r)).unwrap(), small);
    assert_eq!(
        fs::read(m.path().join(&dir_r).join("inner")).unwrap(),
        b"inner"
    );
    for v in &victims_r {
        assert!(
            fs::symlink_metadata(m.path().join(v)).is_err(),
            "{} still exists after deletion",
            v.display()
        );
    }
    m.unmount();
}

/// Mount a copy of the image at its exact size read-write, create a
/// 100-byte file and a directory, unmount, `btrfs check`, verify.
pub fn first_boot_rw(img: &Path) {
    let work = workdir("first-boot");
    let copy = copy_image(img, work.path(), "first-boot.img");
    let data = random_bytes(100, 0xf00d);
    let m = LoopMount::new(&copy, true);
    let file = unused_name(m.path(), "first-boot-file-");
    let dir = unused_name(m.path(), "first-boot-dir-");
    {
        let mut f = File::create(&file).unwrap_or_else(|e| panic!("create on first boot: {e}"));
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir on first boot: {e}"));
    let (file_r, dir_r) = (
        file.strip_prefix(m.path()).unwrap().to_path_buf(),
        dir.strip_prefix(m.path()).unwrap().to_path_buf(),
    );
    m.unmount();
    assert_eq!(
        fs::metadata(&copy).unwrap().len(),
        fs::metadata(img).unwrap().len()
    );
    btrfs_check(&copy);
    let m = LoopMount::new(&copy, false);
    assert_eq!(fs::read(m.path().join(&file_r)).unwrap(), data);
    assert!(m.path().join(&dir_r).is_dir());
    m.unmount();
}

pub fn skip_determinism_in_mkfs_mode(what: &str) -> bool {
    if is_mkfs_mode() {
        eprintln!(
            "SKIPPED {what}: mkfs.btrfs ({BUILDER_ENV}=mkfs) is not deterministic; \
             byte-identity is only checked with btrfsimg"
        );
        return true;
    }
    false
}

/// Exports SRC again and asserts the result equals IMG byte for byte.
pub fn assert_export_matches(src: &Path, img: &Path, extra_args: &[&str]) {
    if skip_determinism_in_mkfs_mode("byte-identical re-export") {
        return;
    }
    let work = workdir("reexport");
    let again = work.path().join("again.img");
    export(src, &again, extra_args);
    assert_files_identical(img, &again);
}

/// Exports SRC twice and asserts the two images are byte-identical.
pub fn assert_reproducible(src: &Path, extra_args: &[&str]) {
    if skip_determinism_in_mkfs_mode("reproducibility") {
        return;
    }
    let work = workdir("repro");
    let (a, b) = (work.path().join("a.img"), work.path().join("b.img"));
    export(src, &a, extra_args);
    export(src, &b, extra_args);
    assert_files_identical(&a, &b);
}

/// A read-write cycle that rewrites existing files: the image (copied,
/// grown by 256 MiB) is mounted read-write, each of the `targets` (paths in
/// the image) gets 5,000 bytes written into its middle and 70,000 appended,
/// a new file is written and one target deleted, then a full balance (every
/// extent relocated), a scrub, `btrfs check`, and a read-only remount that
/// finds every file as written. For compressed images: writes into and
/// after compressed extents, and balance moving them.
pub fn rw_cycle_rewrite(img: &Path, targets: &[&str]) {
    let work = workdir("rw-rewrite");
    rw_cycle_rewrite_in(img, targets, work.path());
}

/// `rw_cycle_rewrite` on a copy made in `dir`, which is left there (and
/// returned) for the caller to look at.
pub fn rw_cycle_rewrite_in(img: &Path, targets: &[&str], dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let copy = copy_image(img, dir, "rw.img");
    let f = OpenOptions::new().write(true).open(&copy).unwrap();
    f.set_len(f.metadata().unwrap().len() + 256 * MIB).unwrap();
    drop(f);
    let m = LoopMount::new(&copy, true);
    run_ok(
        Command::new(tool("btrfs"))
            .args(["filesystem", "resize", "max"])
            .arg(m.path()),
    );
    let mut expected: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let p = m.path().join(t.trim_start_matches('/'));
        let mut data = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        let patch = random_bytes(5000, 0x5eed + i as u64);
        let at = data.len() / 2;
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&patch, at as u64).unwrap();
        let end = (at + patch.len()).max(data.len());
        data.resize(end, 0);
        data[at..at + patch.len()].copy_from_slice(&patch);
        let tail = b"appended after the compressed extents\n".repeat(1842);
        f.write_all_at(&tail, data.len() as u64).unwrap();
        data.extend_from_slice(&tail);
        f.sync_all().unwrap();
        expected.push((PathBuf::from(t.trim_start_matches('/')), data));
    }
    let new = unused_name(m.path(), "rw-rewrite-new-");
    let new_data = random_bytes(3 * MIB as usize, 0x4e57);
    fs::write(&new, &new_data).unwrap();
    let new_rel = new.strip_prefix(m.path()).unwrap().to_path_buf();
    expected.push((new_rel, new_data));
    let deleted = expected.remove(0).0;
    fs::remove_file(m.path().join(&deleted)).unwrap();
    unsafe { libc::sync() };
    run_ok(
        Command::new(tool("btrfs"))
            .args(["balance", "start", "--full-balance"])
            .arg(m.path()),
    );
    btrfs_scrub(m.path());
    m.unmount();
    btrfs_check(&copy);
    let m = LoopMount::new(&copy, false);
    for (rel, want) in &expected {
        let got = fs::read(m.path().join(rel)).unwrap();
        assert_eq!(got.len(), want.len(), "{}", rel.display());
        assert!(
            Sha256::digest(&got) == Sha256::digest(want),
            "{} differs after the rewrite cycle",
            rel.display()
        );
    }
    assert!(!m.path().join(&deleted).exists());
    m.unmount();
    copy
}

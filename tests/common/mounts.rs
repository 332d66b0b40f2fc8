//! Loop mounts and scratch filesystems with cleanup guards.

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

/// A loop mount of an image on a private temp directory; unmounted on drop.
pub struct LoopMount {
    dir: Option<TempDir>,
    path: PathBuf,
    image: PathBuf,
    device: Option<String>,
    marker: String,
    mounted: bool,
}

impl LoopMount {
    /// `mount -o loop[,ro] -t btrfs IMG <tempdir>`; panics (with the kernel
    /// log) if the mount fails.
    pub fn new(img: &Path, rw: bool) -> LoopMount {
        LoopMount::with_options(img, if rw { "loop" } else { "loop,ro" })
    }

    /// `mount -o OPTIONS -t btrfs IMG <tempdir>` (OPTIONS includes `loop`).
    pub fn with_options(img: &Path, options: &str) -> LoopMount {
        let dir = tempfile::Builder::new()
            .prefix("btrfsimg-mnt-")
            .tempdir()
            .expect("create mount point");
        let path = fs::canonicalize(dir.path()).unwrap();
        let marker = kernel_log_marker();
        let mut cmd = Command::new(tool("mount"));
        cmd.args(["-t", "btrfs", "-o", options]).arg(img).arg(&path);
        let o = run(&mut cmd);
        if !o.status.success() {
            panic!(
                "mount failed ({}): {}\n--- output ---\n{}\n--- kernel log ---\n{}",
                o.status,
                describe(&cmd),
                output_text(&o),
                kernel_log_since(&marker)
            );
        }
        let device = mount_source(&path);
        LoopMount {
            dir: Some(dir),
            path,
            image: img.to_path_buf(),
            device,
            marker,
            mounted: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The loop device backing the mount (e.g. "/dev/loop3"), if known.
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Unmounts now, panicking if that fails or if the kernel logged btrfs
    /// errors for this mount's device.
    pub fn unmount(mut self) {
        let res = self.try_unmount();
        self.mounted = res.is_err();
        if let Err(e) = res {
            panic!("unmounting {} failed: {e}", self.path.display());
        }
        let errors = self.kernel_errors();
        assert!(
            errors.is_empty(),
            "kernel logged btrfs problems while {} was mounted:\n{}",
            self.image.display(),
            errors.join("\n")
        );
    }

    /// Kernel log lines since the mount that mention this mount's device and
    /// look like errors. Warnings are printed to stderr but not returned.
    pub fn kernel_errors(&self) -> Vec<String> {
        let Some(dev) = self.device.as_deref() else {
            return Vec::new();
        };
        let name = dev.trim_start_matches("/dev/");
        let (tag1, tag2) = (format!("(device {name})"), format!("(device {name} "));
        let log = kernel_log_since(&self.marker);
        let mut errors = Vec::new();
        for line in log.lines() {
            if !(line.contains(&tag1) || line.contains(&tag2)) {
                continue;
            }
            let l = line.to_ascii_lowercase();
            if [
                "error",
                "critical",
                "corrupt",
                "csum failed",
                "bad tree block",
            ]
            .iter()
            .any(|w| l.contains(w))
            {
                errors.push(line.to_string());
            } else if l.contains("warning") {
                eprintln!("kernel warning for {}: {line}", self.image.display());
            }
        }
        errors
    }

    fn try_unmount(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        unmount_retrying(&self.path)
    }
}

/// `umount PATH`, retried for a few seconds; falls back to `umount -l` (and
/// then still reports an error).
pub fn unmount_retrying(path: &Path) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..10 {
        let o = Command::new(tool("umount")).arg(path).output();
        match o {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => last = output_text(&o),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
    }
    match Command::new(tool("umount")).arg("-l").arg(path).output() {
        Ok(o) if o.status.success() => Err(format!(
            "plain umount kept failing ({}); lazily unmounted instead",
            last.trim()
        )),
        Ok(o) => Err(format!("umount -l failed too: {}", output_text(&o))),
        Err(e) => Err(format!("umount -l failed too: {e}")),
    }
}

/// A scratch filesystem mounted on a private temp directory (unmounted on
/// drop), used as a source where the test filesystem could differ from what
/// a test needs. `tmpfs`: xattr values up to what a btrfs leaf item allows
/// (ext4 keeps all of an inode's xattrs in one 4 KiB block), the full 64-bit
/// time range, 200,000 files created quickly. `ext4`: a loop-mounted ext4
/// whatever /tmp is, for ext4's own block accounting.
pub struct ScratchFs {
    dir: Option<TempDir>,
    path: PathBuf,
    mounted: bool,
}

impl ScratchFs {
    /// `mount -t tmpfs -o size=SIZE tmpfs <tempdir>`.
    pub fn tmpfs(tag: &str, size: u64) -> ScratchFs {
        let dir = workdir(&format!("tmpfs-{tag}"));
        let path = fs::canonicalize(dir.path()).unwrap();
        run_ok(
            Command::new(tool("mount"))
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0755"))
                .arg("tmpfs")
                .arg(&path),
        );
        ScratchFs {
            dir: Some(dir),
            path,
            mounted: true,
        }
    }

    /// A fresh ext4 (4 KiB blocks) of SIZE bytes in a sparse file, loop-mounted.
    pub fn ext4(tag: &str, size: u64) -> ScratchFs {
        let dir = workdir(&format!("ext4-{tag}"));
        let img = dir.path().join("ext4.img");
        File::create(&img).unwrap().set_len(size).unwrap();
        run_ok(
            Command::new(tool("mkfs.ext4"))
                .args(["-q", "-F", "-b", "4096"])
                .arg(&img),
        );
        let path = fs::canonicalize(dir.path()).unwrap().join("mnt");
        fs::create_dir(&path).unwrap();
        run_ok(
            Command::new(tool("mount"))
                .args(["-t", "ext4", "-o", "loop"])
                .arg(&img)
                .arg(&path),
        );
        ScratchFs {
            dir: Some(dir),
            path,
            mounted: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if let Err(e) = unmount_retrying(&self.path) {
            eprintln!("warning: scratch fs {}: {e}", self.path.display());
            if mount_source(&self.path).is_some() {
                if let Some(d) = self.dir.take() {
                    let _ = d.keep();
                }
            }
        }
        self.mounted = false;
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if let Err(e) = self.try_unmount() {
            eprintln!("warning: {}: {e}", self.path.display());
            if mount_source(&self.path).is_some() {
                // Still mounted: never let TempDir recurse into it.
                if let Some(d) = self.dir.take() {
                    let _ = d.keep();
                }
            }
        }
        self.mounted = false;
    }
}

/// Mount source (device) of the mount at exactly `mnt`, from mountinfo.
pub fn mount_source(mnt: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_str()?;
    let mut found = None;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if pre.split(' ').nth(4) == Some(want) {
            found = post.split(' ').nth(1).map(str::to_string);
        }
    }
    found
}

/// `mount -t btrfs -o OPTIONS IMG AT` at a path of the caller's choosing
/// (nested mounts, as a system's fileSystems stack them); unmounted when
/// dropped, so drop inner ones first.
pub struct MountAt(PathBuf);

impl MountAt {
    pub fn new(img: &Path, at: &Path, options: &str) -> MountAt {
        let o = run(Command::new(tool("mount"))
            .args(["-t", "btrfs", "-o", options])
            .arg(img)
            .arg(at));
        assert!(o.status.success(), "mount {options}: {}", output_text(&o));
        MountAt(at.to_path_buf())
    }
}

impl Drop for MountAt {
    fn drop(&mut self) {
        if let Err(e) = unmount_retrying(&self.0) {
            eprintln!("{e}");
        }
    }
}

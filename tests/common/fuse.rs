//! btrfsimg mount (FUSE).

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

/// Like `system_tests_available`, plus /dev/fuse and fusermount3.
pub fn fuse_available(what: &str) -> bool {
    if !system_tests_available(what) {
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        return skip_or_panic(what, "/dev/fuse is missing");
    }
    if Command::new(tool("fusermount3"))
        .arg("-V")
        .output()
        .is_err()
    {
        return skip_or_panic(what, "fusermount3 not found (apt-get install fuse3)");
    }
    true
}

pub fn is_mounted(mnt: &Path) -> bool {
    let target = mnt.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

/// Waits until `mnt` is no longer mounted; false after `timeout`.
pub fn wait_unmounted(mnt: &Path, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while is_mounted(mnt) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A running `btrfsimg mount`, stopped (and cleaned up) on drop.
pub struct FuseMount {
    pub child: Option<std::process::Child>,
    pub mnt: PathBuf,
}

impl FuseMount {
    /// `btrfsimg mount SRC MNT EXTRA...` (MNT is created), stderr inherited.
    pub fn start(src: &Path, mnt: &Path, extra: &[&str]) -> FuseMount {
        let (cmd, mnt) = FuseMount::command(src, mnt, extra);
        FuseMount::start_cmd(cmd, &mnt)
    }

    /// Like `start`, with the server's stderr (its log) going to `log`.
    pub fn start_logged(src: &Path, mnt: &Path, extra: &[&str], log: &Path) -> FuseMount {
        let (mut cmd, mnt) = FuseMount::command(src, mnt, extra);
        cmd.stderr(File::create(log).expect("create mount log"));
        FuseMount::start_cmd(cmd, &mnt)
    }

    /// The command line of a mount and the canonical mountpoint (created).
    pub fn command(src: &Path, mnt: &Path, extra: &[&str]) -> (Command, PathBuf) {
        fs::create_dir_all(mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let mut cmd = Command::new(btrfsimg_bin());
        cmd.arg("mount").arg(src).arg(&mnt).args(extra);
        (cmd, mnt)
    }

    /// Starts `cmd` (a `btrfsimg mount` of `mnt`) and waits for the fs.img line.
    pub fn start_cmd(mut cmd: Command, mnt: &Path) -> FuseMount {
        let mnt = mnt.canonicalize().unwrap();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn btrfsimg mount");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let mut m = FuseMount {
            child: Some(child),
            mnt: mnt.clone(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("btrfsimg mount did not report fs.img");
        assert_eq!(
            line.trim_end(),
            mnt.join("fs.img").to_string_lossy(),
            "first stdout line must be the path of fs.img"
        );
        assert!(is_mounted(&mnt), "{} is not mounted", mnt.display());
        if let Some(c) = m.child.as_mut() {
            assert!(
                c.try_wait().unwrap().is_none(),
                "mount process exited early"
            );
        }
        m
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Bytes the serving process has read with read(2)-family calls so far.
    pub fn rchar(&self) -> u64 {
        let io = fs::read_to_string(format!("/proc/{}/io", self.pid())).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    /// Peak resident set of the serving process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let st = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * KIB
    }

    pub fn img(&self) -> PathBuf {
        self.mnt.join("fs.img")
    }

    /// Sends `sig` without waiting.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits for the process; returns its exit status.
    pub fn stop(mut self, sig: i32) -> std::process::ExitStatus {
        self.signal(sig);
        self.wait_exit(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("btrfsimg mount ignored signal {sig}"))
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new(tool("fusermount3"))
                .arg("-u")
                .arg("-z")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// What FUSE tests start from: `fuse_test_tree` at WORK/src, exported with
/// ARGS to WORK/export.img, and the exported bytes.
pub struct FuseFixture {
    pub src: PathBuf,
    pub exported: PathBuf,
    pub want: std::sync::Arc<Vec<u8>>,
}

pub fn fuse_fixture(work: &Path, args: &[&str]) -> FuseFixture {
    let src = work.join("src");
    fuse_test_tree(&src);
    let exported = work.join("export.img");
    export(&src, &exported, args);
    let want = std::sync::Arc::new(fs::read(&exported).unwrap());
    FuseFixture {
        src,
        exported,
        want,
    }
}

/// A tree for FUSE tests: files around the inline/sector boundaries, a 9 MiB
/// file, 1,500 small files, a symlink and a sparse file.
pub fn fuse_test_tree(root: &Path) {
    let mut t = TreeBuilder::new(root);
    for (i, size) in [0u64, 1, 2048, 2049, 4096, 65537, (3 << 20) + 5, 9 << 20]
        .into_iter()
        .enumerate()
    {
        t.random_file(format!("files/f{i}").as_bytes(), size, 100 + i as u64);
    }
    for i in 0..1500u64 {
        t.random_file(format!("many/e{i:04}").as_bytes(), (i * 131) % 7000, i);
    }
    t.symlink(b"link", b"files/f1");
    t.sparse_file(b"sparse", 20 << 20, &[(8 << 20, b"middle")]);
    t.finalize();
}

/// What a soak run did.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub mounts: u64,
    pub reads: u64,
    pub bytes: u64,
}

/// Eight reader threads (every other one with O_DIRECT) read random ranges of
/// fs.img through fresh `btrfsimg mount`s of SRC (a new mount every
/// `per_mount`) for `total`, comparing every byte read with `want` (the
/// export). Panics on the first difference or read error.
pub fn fuse_soak(
    src: &Path,
    mnt: &Path,
    args: &[&str],
    want: std::sync::Arc<Vec<u8>>,
    total: Duration,
    per_mount: Duration,
) -> SoakReport {
    use rand::Rng;
    let start = std::time::Instant::now();
    let mut report = SoakReport::default();
    let mut round = 0u64;
    while report.mounts == 0 || start.elapsed() < total {
        let m = FuseMount::start(src, mnt, args);
        report.mounts += 1;
        let until =
            std::time::Instant::now() + per_mount.min(total.saturating_sub(start.elapsed()));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let want = want.clone();
                let img = m.img();
                let seed = round * 8 + t;
                std::thread::spawn(move || {
                    let mut rng = ChaCha8Rng::seed_from_u64(0x50a4 + seed);
                    let direct = t % 2 == 1;
                    let mut opts = OpenOptions::new();
                    opts.read(true);
                    if direct {
                        opts.custom_flags(libc::O_DIRECT);
                    }
                    let f = opts.open(&img).unwrap();
                    let size = want.len() as u64;
                    let mut buf = vec![0u8; 4 << 20];
                    let (mut reads, mut bytes) = (0u64, 0u64);
                    let mut i = 0u64;
                    while i == 0 || std::time::Instant::now() < until {
                        let len = match i % 3 {
                            0 => rng.random_range(1..=4096),
                            1 => rng.random_range(1..=256 << 10),
                            _ => rng.random_range(1..=4 << 20),
                        };
                        let off = rng.random_range(0..size);
                        let n = f.read_at(&mut buf[..len], off).unwrap_or_else(|e| {
                            panic!("thread {t} (direct={direct}) read {len} at {off}: {e}")
                        });
                        let expect = (size - off).min(len as u64) as usize;
                        assert!(n > 0 || expect == 0, "short read at {off}");
                        assert!(
                            buf[..n] == want[off as usize..off as usize + n],
                            "thread {t} (direct={direct}) read {len} at {off}: bytes differ"
                        );
                        reads += 1;
                        bytes += n as u64;
                        i += 1;
                    }
                    (reads, bytes)
                })
            })
            .collect();
        for t in threads {
            let (r, b) = t.join().expect("reader thread failed");
            report.reads += r;
            report.bytes += b;
        }
        let st = m.stop(libc::SIGTERM);
        assert!(st.success(), "mount exit status after SIGTERM: {st:?}");
        assert!(!is_mounted(mnt), "{} still mounted", mnt.display());
        round += 1;
    }
    report
}

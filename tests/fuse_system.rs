//! `btrfsimg mount`: fs.img served over FUSE equals the export byte for byte,
//! under concurrent random and O_DIRECT reads, is a valid filesystem for btrfs
//! check, the loop driver and qemu-img, and goes away cleanly on SIGINT/SIGTERM.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fuse_available(what: &str) -> bool {
    if !system_tests_available(what) {
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        return skip_or_panic(what, "/dev/fuse is missing");
    }
    if Command::new("fusermount3").arg("-V").output().is_err() {
        return skip_or_panic(what, "fusermount3 not found (apt-get install fuse3)");
    }
    true
}

fn is_mounted(mnt: &Path) -> bool {
    let target = mnt.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

/// A running `btrfsimg mount`, stopped (and cleaned up) on drop.
struct FuseMount {
    child: Option<Child>,
    mnt: PathBuf,
}

impl FuseMount {
    fn start(src: &Path, mnt: &Path, extra: &[&str]) -> FuseMount {
        fs::create_dir_all(mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let mut child = Command::new(btrfsimg_bin())
            .arg("mount")
            .arg(src)
            .arg(&mnt)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn btrfsimg mount");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
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

    /// Bytes the serving process has read with read(2)-family calls so far.
    fn rchar(&self) -> u64 {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    fn img(&self) -> PathBuf {
        self.mnt.join("fs.img")
    }

    /// Sends `sig` and waits for the process; returns its exit status.
    fn stop(mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "btrfsimg mount ignored signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// Bytes of data in the regular files below `root` (sparse files count their data only).
fn tree_file_bytes(root: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            n += tree_file_bytes(&p);
        } else if m.is_file() {
            let f = File::open(&p).unwrap();
            n += data_segments(&f, m.len())
                .iter()
                .map(|(s, e)| e - s)
                .sum::<u64>();
        }
    }
    n
}

fn build_tree(root: &Path) {
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

#[test]
fn fuse_image_is_the_export_and_a_valid_filesystem() {
    if !fuse_available("fuse_image_is_the_export_and_a_valid_filesystem") {
        return;
    }
    let work = workdir("fuse-valid");
    let src = work.path().join("src");
    build_tree(&src);
    let args = fixed_args("0b0d0a0e-0004-4000-8000-000000000001");
    let exported = work.path().join("export.img");
    export(&src, &exported, &args);

    let m = FuseMount::start(&src, &work.path().join("mnt"), &args);
    // A sequential reader makes the server read each source byte once.
    let before = m.rchar();
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", m.img().display()))
            .args(["of=/dev/null", "bs=1M"]),
    );
    let read = m.rchar() - before;
    let data = tree_file_bytes(&src);
    assert!(
        read >= data && read <= data + data / 50 + (1 << 20),
        "dd of fs.img made the server read {read} bytes for {data} bytes of file data"
    );
    let meta = fs::metadata(m.img()).unwrap();
    assert_eq!(meta.len(), fs::metadata(&exported).unwrap().len());
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
        0o444
    );
    let names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("fs.img")]);
    assert!(
        OpenOptions::new().write(true).open(m.img()).is_err(),
        "fs.img must be read-only"
    );

    // SEEK_DATA / SEEK_HOLE: the first 64 KiB are zeros, the superblock is data.
    let f = File::open(m.img()).unwrap();
    // SAFETY: lseek on an open fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!((data, hole), (65536, 0), "SEEK_DATA/SEEK_HOLE at 0");
    drop(f);

    assert_files_identical(&m.img(), &exported);
    btrfs_check(&m.img());
    {
        let lm = LoopMount::new(&m.img(), false);
        compare_trees(&src, lm.path(), CompareOpts::default());
        lm.unmount();
    }
    let qcow = work.path().join("x.qcow2");
    let raw = work.path().join("back.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(m.img())
            .arg(&qcow),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&qcow)
            .arg(&raw),
    );
    assert_files_identical(&raw, &exported);

    let mnt = m.mnt.clone();
    let st = m.stop(libc::SIGTERM);
    assert!(st.success(), "SIGTERM exit status {st:?}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn fuse_concurrent_random_and_direct_reads() {
    if !fuse_available("fuse_concurrent_random_and_direct_reads") {
        return;
    }
    let work = workdir("fuse-random");
    let src = work.path().join("src");
    build_tree(&src);
    let args = fixed_args("0b0d0a0e-0004-4000-8000-000000000002");
    let exported = work.path().join("export.img");
    export(&src, &exported, &args);
    let want = Arc::new(fs::read(&exported).unwrap());

    // A fresh mount: nothing is cached, csum leaves may be read before their data.
    let m = FuseMount::start(&src, &work.path().join("mnt"), &args);
    let img = m.img();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let want = want.clone();
            let img = img.clone();
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(1000 + t);
                let direct = t % 2 == 1;
                let mut opts = OpenOptions::new();
                opts.read(true);
                if direct {
                    opts.custom_flags(libc::O_DIRECT);
                }
                let f = opts.open(&img).unwrap();
                let size = want.len() as u64;
                let mut buf = vec![0u8; 4 << 20];
                for i in 0..150 {
                    let len = match i % 3 {
                        0 => rng.random_range(1..=4096),
                        1 => rng.random_range(1..=256 << 10),
                        _ => rng.random_range(1..=4 << 20),
                    };
                    let off = rng.random_range(0..size);
                    let n = f.read_at(&mut buf[..len], off).unwrap();
                    let expect = (size - off).min(len as u64) as usize;
                    assert!(n > 0 || expect == 0);
                    assert!(
                        buf[..n] == want[off as usize..off as usize + n],
                        "thread {t} (direct={direct}) read {len} at {off}: bytes differ"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread failed");
    }
    assert!(m.stop(libc::SIGINT).success());
}

#[test]
fn fuse_signals_unmount_and_mountpoint_checks() {
    if !fuse_available("fuse_signals_unmount_and_mountpoint_checks") {
        return;
    }
    let work = workdir("fuse-signals");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.file(b"a", b"hello").finalize();
    let mnt = work.path().join("mnt");

    for sig in [libc::SIGINT, libc::SIGTERM] {
        let m = FuseMount::start(&src, &mnt, &[]);
        let mut b = [0u8; 8];
        File::open(m.img())
            .unwrap()
            .read_at(&mut b, 0x10040)
            .unwrap();
        assert_eq!(&b, b"_BHRfS_M");
        // Mounting again on a live mountpoint is refused with a clear error.
        let out = Command::new(btrfsimg_bin())
            .arg("mount")
            .arg(&src)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&*mnt.to_string_lossy()),
            "error names the mountpoint: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
        let mpath = m.mnt.clone();
        let st = m.stop(sig);
        assert!(st.success(), "signal {sig}: exit status {st:?}");
        assert!(!is_mounted(&mpath), "still mounted after signal {sig}");
    }

    // With auto_unmount, even SIGKILL leaves no mount behind.
    let m = FuseMount::start(&src, &mnt, &["--allow-other", "-o", "auto_unmount"]);
    let mpath = m.mnt.clone();
    let st = m.stop(libc::SIGKILL);
    assert!(!st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(&mpath) {
        assert!(
            Instant::now() < deadline,
            "auto_unmount left {} mounted",
            mpath.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A mountpoint that is not empty is refused.
    fs::write(mnt.join("x"), "x").unwrap();
    let out = Command::new(btrfsimg_bin())
        .arg("mount")
        .arg(&src)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not empty"), "{err}");
}

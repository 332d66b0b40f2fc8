//! `btrfsimg mount`: fs.img served over FUSE equals the export byte for byte,
//! under concurrent random and O_DIRECT reads, is a valid filesystem for btrfs
//! check, the loop driver and qemu-img, and goes away cleanly on SIGINT/SIGTERM.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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

#[test]
fn fuse_image_is_the_export_and_a_valid_filesystem() {
    if !tools_available(
        "fuse_image_is_the_export_and_a_valid_filesystem",
        &["qemu-img", "dd"],
    ) {
        return;
    }
    if !fuse_available("fuse_image_is_the_export_and_a_valid_filesystem") {
        return;
    }
    let work = workdir("fuse-valid");
    let args = fixed_args("0b0d0a0e-0004-4000-8000-000000000001");
    let FuseFixture { src, exported, .. } = fuse_fixture(work.path(), &args);

    let m = FuseMount::start(&src, &work.path().join("mnt"), &args);
    // A sequential reader makes the server read each source byte once.
    let before = m.rchar();
    run_ok(
        Command::new(tool("dd"))
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

    // SEEK_DATA / SEEK_HOLE report the allocation map: the first MiB is
    // mapped (written by flashers, to wipe old signatures), as is the data
    // that follows it; the first hole is past both, and data follows it.
    let f = File::open(m.img()).unwrap();
    // SAFETY: lseek on an open fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(data, 0, "SEEK_DATA at 0");
    assert!(hole > 1 << 20 && hole % 4096 == 0, "SEEK_HOLE at 0: {hole}");
    // SAFETY: as above.
    let next = unsafe { libc::lseek(f.as_raw_fd(), hole, libc::SEEK_DATA) };
    assert!(next > hole, "data after the first hole: {next}");
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
        Command::new(tool("qemu-img"))
            .args(["convert", "-O", "qcow2"])
            .arg(m.img())
            .arg(&qcow),
    );
    run_ok(
        Command::new(tool("qemu-img"))
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
    let args = fixed_args("0b0d0a0e-0004-4000-8000-000000000002");
    let FuseFixture { src, want, .. } = fuse_fixture(work.path(), &args);
    // One fresh mount (nothing cached, csum leaves may be read before their
    // data), 8 readers, half with O_DIRECT, every byte compared.
    let r = fuse_soak(
        &src,
        &work.path().join("mnt"),
        &args,
        want,
        Duration::from_secs(3),
        Duration::from_secs(3),
    );
    assert!(r.reads >= 8 * 50, "too few reads: {}", r.reads);
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

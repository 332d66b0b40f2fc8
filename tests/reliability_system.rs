//! Reliability cases that need root: a full disk, mountpoints that are
//! already mounted, and `btrfsimg mount` under change, load, unmount and
//! SIGKILL. The unprivileged cases are in tests/reliability.rs.

mod common;

use btrfsimg::{plan_dir, Options};
use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A tmpfs of `size` mounted at `path` (created), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        run_ok(
            Command::new(tool("mount"))
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size}"))
                .arg("tmpfs")
                .arg(path),
        );
        Tmpfs(path.canonicalize().unwrap())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new(tool("umount")).arg("-l").arg(&self.0).status();
    }
}

fn names(dir: &Path) -> Vec<String> {
    dir_names(dir).iter().map(|n| show(n)).collect()
}

/// Export to a 2 MiB tmpfs of an image that does not fit: one line naming
/// the output and ENOSPC, exit 1, no output and no temporary file; an
/// existing image that --force was about to replace stays as it was.
#[test]
fn disk_full_leaves_nothing() {
    if !system_tests_available("disk_full_leaves_nothing") {
        return;
    }
    let work = workdir("disk-full");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.random_file(b"big", 8 * MIB, 1)
        .random_file(b"small", 3000, 2)
        .finalize();
    let full = Tmpfs::new(&work.path().join("full"), "2M");
    let out = full.0.join("fs.img");
    for args in [&[][..], &["--zstd=1"][..]] {
        let r = try_export(&src, &out, args);
        assert!(!r.success, "{args:?}: export to a full disk succeeded");
        assert!(
            r.status.contains("exit status: 1"),
            "{args:?}: {}",
            r.status
        );
        assert_error_line(
            &r.stderr,
            &[&out.display().to_string(), "No space left on device"],
            "disk full",
        );
        assert!(
            names(&full.0).is_empty(),
            "{args:?}: left {:?}",
            names(&full.0)
        );
    }
    // An existing (small) output survives a failed --force replacement.
    fs::write(&out, b"the previous image").unwrap();
    let r = try_export(&src, &out, &["--force"]);
    assert!(!r.success);
    assert_error_line(&r.stderr, &["No space left on device"], "disk full --force");
    assert_eq!(fs::read(&out).unwrap(), b"the previous image");
    assert_eq!(names(&full.0), vec!["/fs.img".to_string()]);

    // To stdout: /dev/full.
    let o = run(Command::new(btrfsimg_bin())
        .arg("export")
        .arg(&src)
        .args(["-o", "-"])
        .stdout(File::create("/dev/full").unwrap()));
    assert_eq!(o.status.code(), Some(1), "{}", o.status);
    assert_error_line(
        &String::from_utf8_lossy(&o.stderr),
        &["stdout", "No space left on device"],
        "stdout on /dev/full",
    );
}

/// `btrfsimg mount` refuses a mountpoint with something mounted on it (a
/// tmpfs, a live btrfsimg mount) with one line and exit 1, and mounts
/// nothing on top.
#[test]
fn mountpoint_already_mounted_is_refused() {
    if !fuse_available("mountpoint_already_mounted_is_refused") {
        return;
    }
    let work = workdir("mounted");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.file(b"a", b"a").finalize();
    let count = |p: &Path| {
        let target = p.to_string_lossy().into_owned();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(target.as_str()))
            .count()
    };
    let tmpfs = Tmpfs::new(&work.path().join("tmpfs"), "1M");
    let live = FuseMount::start(&src, &work.path().join("live"), &[]);
    for mnt in [tmpfs.0.clone(), live.mnt.clone()] {
        let o = run(Command::new(btrfsimg_bin())
            .arg("mount")
            .arg(&src)
            .arg(&mnt));
        assert_eq!(o.status.code(), Some(1), "{}: {}", mnt.display(), o.status);
        assert_error_line(
            &String::from_utf8_lossy(&o.stderr),
            &[&mnt.display().to_string(), "already mounted"],
            "mounted mountpoint",
        );
        assert_eq!(count(&mnt), 1, "{}: mounted on top", mnt.display());
    }
    assert!(live.stop(libc::SIGTERM).success());
}

/// Opens fs.img for reading with O_DIRECT (every read goes to the server).
fn open_direct(img: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(img)
        .unwrap_or_else(|e| panic!("open {}: {e}", img.display()))
}

fn read_range(f: &File, (off, len): (u64, u64)) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// A source file changed while mounted: reads of its data fail with EIO and
/// the server logs an error naming the file; the superblock and other
/// files' data still read, equal to the export; the server keeps serving.
#[test]
fn fuse_reads_of_a_changed_source_fail_with_eio() {
    if !fuse_available("fuse_reads_of_a_changed_source_fail_with_eio") {
        return;
    }
    let work = workdir("fuse-changed");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.random_file(b"dir/victim", 300 * KIB + 5, 1)
        .random_file(b"other", 200 * KIB, 3)
        .random_file(b"small", 100, 4)
        .finalize();
    let uuid = "0b0d0a0e-0008-4000-8000-000000000001";
    let args = fixed_args(uuid);
    let exported = work.path().join("export.img");
    export(&src, &exported, &args);
    let want = fs::read(&exported).unwrap();
    let plan = plan_dir(
        &src,
        &Options {
            fsid: Some(parse_uuid(uuid)),
            timestamp: 1_700_000_000,
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(plan.total_bytes, want.len() as u64, "plan matches the CLI");
    let victim = file_data_ranges(&plan, "/dir/victim");
    let other = file_data_ranges(&plan, "/other");
    let expect = |(off, len): (u64, u64)| want[off as usize..(off + len) as usize].to_vec();

    let log = work.path().join("mount.log");
    let m = FuseMount::start_logged(&src, &work.path().join("mnt"), &args, &log);
    let f = open_direct(&m.img());
    assert_eq!(read_range(&f, victim[0]).unwrap(), expect(victim[0]));
    // Same size, same mtime, other bytes: only the ctime tells.
    std::thread::sleep(Duration::from_millis(30));
    let path = src.join("dir/victim");
    let (sec, nsec) = {
        use std::os::unix::fs::MetadataExt;
        let md = fs::metadata(&path).unwrap();
        (md.mtime(), md.mtime_nsec() as u32)
    };
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&random_bytes(4096, 0xbad), 0)
        .unwrap();
    set_times(&path, sec, nsec).unwrap();

    for &r in &victim {
        match read_range(&f, r) {
            Ok(_) => panic!("changed data at {r:?} was served"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{r:?}: {e}"),
        }
    }
    for r in [(0, 128 * KIB), other[0], (want.len() as u64 - 4096, 4096)] {
        assert_eq!(read_range(&f, r).unwrap(), expect(r), "range {r:?}");
    }
    // A fresh descriptor, buffered: still refused.
    let err = read_range(&File::open(m.img()).unwrap(), victim[0]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(f);
    let mnt = m.mnt.clone();
    let st = m.stop(libc::SIGTERM);
    assert!(st.success(), "{st:?}");
    assert!(!is_mounted(&mnt));
    let log = fs::read_to_string(&log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(&path.display().to_string()))
        .unwrap_or_else(|| panic!("no log line names {}:\n{log}", path.display()));
    assert!(
        line.contains("ERROR") && line.contains("changed after planning"),
        "log line: {line}"
    );
}

/// A source file swapped for a FIFO while mounted never blocks a reader: its
/// data fails with EIO at once (the source is opened O_PATH, found not to be
/// the planned regular file, and never opened for reading), and a `dd` of the
/// whole image ends with an error instead of hanging.
#[test]
fn fuse_source_swapped_for_a_fifo_never_blocks() {
    let what = "fuse_source_swapped_for_a_fifo_never_blocks";
    if !fuse_available(what) || !tools_available(what, &["dd"]) {
        return;
    }
    let work = workdir("fuse-fifo");
    let src = work.path().join("src");
    TreeBuilder::new(&src)
        .random_file(b"victim", 300 * KIB, 1)
        .random_file(b"other", 200 * KIB, 3)
        .finalize();
    let args = fixed_args("0b0d0a0e-0008-4000-8000-000000000002");
    let plan = plan_dir(
        &src,
        &Options {
            fsid: Some(parse_uuid("0b0d0a0e-0008-4000-8000-000000000002")),
            timestamp: 1_700_000_000,
            ..Options::default()
        },
    )
    .unwrap();
    let victim = file_data_ranges(&plan, "/victim");
    let m = FuseMount::start(&src, &work.path().join("mnt"), &args);
    let path = src.join("victim");
    let tmp = src.join(".fifo");
    let c = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    fs::rename(&tmp, &path).unwrap();

    let img = m.img();
    let (tx, rx) = std::sync::mpsc::channel();
    let r = victim[0];
    std::thread::spawn(move || {
        let f = open_direct(&img);
        let _ = tx.send(read_range(&f, r).map(|_| ()));
    });
    let res = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a read of the swapped file's data hung");
    assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EIO));
    let mut dd = Command::new(tool("dd"))
        .arg(format!("if={}", m.img().display()))
        .args(["of=/dev/null", "bs=1M", "iflag=direct"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let st = loop {
        if let Some(st) = dd.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = dd.kill();
            panic!("dd of fs.img hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!st.success(), "dd must report the error");
    assert!(m.stop(libc::SIGTERM).success());
}

fn parse_uuid(s: &str) -> [u8; 16] {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// The short soak: 8 readers of random ranges (half O_DIRECT) on fresh
/// mounts for 20 s, every byte compared with the export. The long one is
/// `cargo bench --bench soak`.
#[test]
fn fuse_soak_short() {
    if !fuse_available("fuse_soak_short") {
        return;
    }
    let work = workdir("fuse-soak");
    let args = fixed_args("0b0d0a0e-0008-4000-8000-000000000002");
    let FuseFixture { src, want, .. } = fuse_fixture(work.path(), &args);
    let r = fuse_soak(
        &src,
        &work.path().join("mnt"),
        &args,
        want,
        Duration::from_secs(20),
        Duration::from_secs(7),
    );
    eprintln!("soak: {r:?}");
    assert!(r.mounts >= 2 && r.reads > 0, "{r:?}");
}

/// A reader thread that keeps reading random ranges of fs.img and comparing
/// them with `want` until `stop` is set or a read fails. With `reopen`, it
/// opens fs.img for every read (so an unmount can happen between reads).
/// Returns the number of good reads and the error that ended it, if any.
fn reader(
    img: PathBuf,
    want: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
    reopen: bool,
) -> (JoinHandle<(u64, Option<io::Error>)>, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _done = tx;
        let mut rng = ChaCha8Rng::seed_from_u64(0x0dd);
        let size = want.len() as u64;
        let mut kept = if reopen {
            None
        } else {
            Some(open_direct(&img))
        };
        let mut good = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let f = match &kept {
                Some(f) => f,
                None => match OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&img)
                {
                    Ok(f) => {
                        kept = Some(f);
                        kept.as_ref().unwrap()
                    }
                    Err(e) => return (good, Some(e)),
                },
            };
            let len = rng.random_range(1..=1 << 20);
            let off = rng.random_range(0..size);
            match read_range(f, (off, len)) {
                Ok(b) => {
                    assert!(
                        b[..] == want[off as usize..off as usize + b.len()],
                        "bytes at {off} (+{len}) differ"
                    );
                    good += 1;
                }
                Err(e) => return (good, Some(e)),
            }
            if reopen {
                kept = None;
            }
        }
        (good, None)
    });
    (h, rx)
}

/// Waits for a reader to end (it must not hang) and returns its result.
fn join_reader(
    h: JoinHandle<(u64, Option<io::Error>)>,
    done: mpsc::Receiver<()>,
    what: &str,
) -> (u64, Option<io::Error>) {
    // The sender is dropped when the thread's closure ends: a disconnect means
    // it ended (is_finished() may lag a moment behind), a timeout that it hangs.
    if let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_secs(20)) {
        panic!("{what}: the reader hangs");
    }
    h.join().unwrap_or_else(|_| panic!("{what}: reader failed"))
}

/// Unmounting while a reader is active ends cleanly: `fusermount3 -u` is
/// refused (busy) and changes nothing; SIGTERM or `fusermount3 -u -z`
/// detach at once while the open descriptor keeps getting correct bytes, and
/// the server exits 0 when it is closed; a reader that reopens fs.img gets
/// ENOENT once the mount is gone, never a hang.
#[test]
fn fuse_unmount_while_reading_ends_cleanly() {
    if !fuse_available("fuse_unmount_while_reading_ends_cleanly") {
        return;
    }
    let work = workdir("fuse-unmount");
    let args = fixed_args("0b0d0a0e-0008-4000-8000-000000000003");
    let FuseFixture { src, want, .. } = fuse_fixture(work.path(), &args);
    let mnt = work.path().join("mnt");
    let reads_after = |h: &JoinHandle<_>, what: &str| {
        std::thread::sleep(Duration::from_millis(700));
        assert!(!h.is_finished(), "{what}: the reader stopped");
    };

    // Busy: plain fusermount3 -u is refused, the reader goes on; then SIGTERM.
    let mut m = FuseMount::start(&src, &mnt, &args);
    let stop = Arc::new(AtomicBool::new(false));
    let (h, done) = reader(m.img(), want.clone(), stop.clone(), false);
    std::thread::sleep(Duration::from_millis(300));
    let o = run(Command::new(tool("fusermount3")).arg("-u").arg(&m.mnt));
    assert!(
        !o.status.success(),
        "fusermount3 -u of a busy mount succeeded"
    );
    assert!(is_mounted(&m.mnt));
    reads_after(&h, "after fusermount3 -u");
    m.signal(libc::SIGTERM);
    assert!(
        wait_unmounted(&m.mnt, Duration::from_secs(10)),
        "SIGTERM did not detach"
    );
    reads_after(&h, "after SIGTERM");
    assert!(
        m.wait_exit(Duration::from_millis(10)).is_none(),
        "exited under an open file"
    );
    stop.store(true, Ordering::SeqCst);
    let (good, err) = join_reader(h, done, "SIGTERM");
    assert!(err.is_none() && good > 0, "reader: {good} reads, {err:?}");
    let st = m
        .wait_exit(Duration::from_secs(10))
        .expect("server still running after the reader closed");
    assert!(st.success(), "{st:?}");

    // fusermount3 -u -z: the same, without a signal.
    let mut m = FuseMount::start(&src, &mnt, &args);
    let stop = Arc::new(AtomicBool::new(false));
    let (h, done) = reader(m.img(), want.clone(), stop.clone(), false);
    std::thread::sleep(Duration::from_millis(300));
    run_ok(
        Command::new(tool("fusermount3"))
            .arg("-u")
            .arg("-z")
            .arg(&m.mnt),
    );
    assert!(!is_mounted(&m.mnt));
    reads_after(&h, "after fusermount3 -u -z");
    stop.store(true, Ordering::SeqCst);
    let (good, err) = join_reader(h, done, "fusermount3 -u -z");
    assert!(err.is_none() && good > 0, "reader: {good} reads, {err:?}");
    let st = m
        .wait_exit(Duration::from_secs(10))
        .expect("server still running after a lazy unmount");
    assert!(st.success(), "{st:?}");

    // A reader that reopens: fusermount3 -u gets through between reads, then
    // the reader's open fails with ENOENT.
    let mut m = FuseMount::start(&src, &mnt, &args);
    let stop = Arc::new(AtomicBool::new(false));
    let (h, done) = reader(m.img(), want.clone(), stop.clone(), true);
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !run(Command::new(tool("fusermount3")).arg("-u").arg(&m.mnt))
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "fusermount3 -u never got through"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (good, err) = join_reader(h, done, "reopening reader");
    let err = err.expect("the reader went on after the unmount");
    assert!(good > 0);
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    let st = m
        .wait_exit(Duration::from_secs(10))
        .expect("server still running after fusermount3 -u");
    assert!(st.success(), "{st:?}");
    assert!(!is_mounted(&mnt));
}

/// SIGKILL without auto_unmount: the active reader gets ENOTCONN (not a
/// hang), the dead mount stays in the mount table, `fusermount3 -u` removes
/// it, and the mountpoint can be used again (as the README says).
#[test]
fn fuse_sigkill_leaves_a_mount_fusermount_removes() {
    if !fuse_available("fuse_sigkill_leaves_a_mount_fusermount_removes") {
        return;
    }
    let work = workdir("fuse-sigkill");
    let args = fixed_args("0b0d0a0e-0008-4000-8000-000000000004");
    let FuseFixture { src, want, .. } = fuse_fixture(work.path(), &args);
    let mnt = work.path().join("mnt");

    let mut m = FuseMount::start(&src, &mnt, &args);
    let stop = Arc::new(AtomicBool::new(false));
    let (h, done) = reader(m.img(), want.clone(), stop.clone(), false);
    std::thread::sleep(Duration::from_millis(300));
    m.signal(libc::SIGKILL);
    let st = m.wait_exit(Duration::from_secs(10)).expect("SIGKILL");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    let (good, err) = join_reader(h, done, "SIGKILL");
    let err = err.expect("the reader went on after SIGKILL");
    assert!(good > 0);
    // The request in flight is aborted, later ones find no connection.
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ECONNABORTED | libc::ENOTCONN)
        ),
        "{err}"
    );
    assert!(is_mounted(&m.mnt), "no stale mount after SIGKILL");
    let e = fs::metadata(m.img()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    // A new mount there is refused with the way out.
    let o = run(Command::new(btrfsimg_bin())
        .arg("mount")
        .arg(&src)
        .arg(&m.mnt));
    assert_eq!(o.status.code(), Some(1), "{}", o.status);
    assert_error_line(
        &String::from_utf8_lossy(&o.stderr),
        &[&m.mnt.display().to_string(), "fusermount3 -u"],
        "mount on a dead mount",
    );
    run_ok(Command::new(tool("fusermount3")).arg("-u").arg(&m.mnt));
    assert!(!is_mounted(&m.mnt));
    assert!(dir_names(&m.mnt).is_empty());
    drop(m);

    let m = FuseMount::start(&src, &mnt, &args);
    let f = open_direct(&m.img());
    assert_eq!(
        read_range(&f, (65536, 4096)).unwrap(),
        want[65536..65536 + 4096]
    );
    drop(f);
    assert!(m.stop(libc::SIGINT).success());
}

/// 1,000 files under an open-file limit of 64: fs.img reads equal to the
/// export (the fd cache shrinks to fit the limit).
#[test]
fn fuse_more_files_than_the_open_file_limit() {
    if !fuse_available("fuse_more_files_than_the_open_file_limit") {
        return;
    }
    let work = workdir("fuse-nofile");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    for i in 0..1000u64 {
        t.random_file(format!("d{}/f{i:04}", i % 7).as_bytes(), 2049 + i * 17, i);
    }
    t.finalize();
    let args = fixed_args("0b0d0a0e-0008-4000-8000-000000000005");
    let exported = work.path().join("export.img");
    export(&src, &exported, &args);
    let (mut cmd, mnt) = FuseMount::command(&src, &work.path().join("mnt"), &args);
    limit_open_files(&mut cmd, 64);
    let m = FuseMount::start_cmd(cmd, &mnt);
    assert_files_identical(&m.img(), &exported);
    assert!(m.stop(libc::SIGTERM).success());
}

/// Serving a 2 GiB image to a sequential reader keeps the server's peak RSS
/// under 100 MiB (block cache 64 MiB, a 1 MiB buffer per worker, checksums).
#[test]
fn fuse_memory_stays_bounded() {
    if !fuse_available("fuse_memory_stays_bounded") {
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("btrfsimg-fuse-memory-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    {
        use std::os::fd::AsRawFd;
        let f = File::create(src.join("data")).unwrap();
        // SAFETY: fallocate on an open fd.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, (2 * GIB) as libc::off_t) };
        assert_eq!(r, 0, "fallocate: {}", io::Error::last_os_error());
    }
    for i in 0..2000u64 {
        fs::write(src.join(format!("f{i:04}")), random_bytes(3000, i)).unwrap();
    }
    let m = FuseMount::start(&src, &work.path().join("mnt"), &[]);
    run_ok(
        Command::new(tool("dd"))
            .arg(format!("if={}", m.img().display()))
            .args(["of=/dev/null", "bs=1M"]),
    );
    let peak = m.peak_rss();
    eprintln!(
        "btrfsimg mount peak RSS after reading 2 GiB: {} KiB",
        peak / KIB
    );
    assert!(peak < 100 * MIB, "peak RSS {peak} bytes");
    assert!(m.stop(libc::SIGTERM).success());
}

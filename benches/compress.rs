//! `--compress` against mkfs.btrfs 6.14 (`--rootdir --compress zstd
//! --shrink`, from a Debian trixie chroot) on the same tree in the same run,
//! alternating, medians of `BTRFSIMG_BENCH_ROUNDS` (default 3): image size,
//! data stored (compsize's disk usage: data extents and inline data; and the
//! DATA block groups' used bytes), export time, time to ready (`plan`),
//! peak RSS, and the cost of `--dedupe`. Needs root (loop mounts for compsize
//! and `btrfs filesystem df`) and debootstrap or a ready chroot.
//!
//!     sudo cargo bench --bench compress
//!
//! Tree: a copy of /usr/share, or `BTRFSIMG_BENCH_TREE`. Chroot:
//! `BTRFSIMG_TRIXIE_CHROOT` (default target/trixie; made with `debootstrap
//! --variant=minbase --include=btrfs-progs trixie` when missing). Level:
//! `BTRFSIMG_BENCH_LEVEL` (default zstd:3, both tools).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_btrfsimg");

#[derive(Clone, Copy, Default)]
struct Run {
    secs: f64,
    rss_mib: f64,
}

fn measure(cmd: &mut Command) -> Run {
    let start = Instant::now();
    let child = cmd.stdout(Stdio::null()).spawn().expect("spawn");
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: reaping our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let secs = start.elapsed().as_secs_f64();
    drop(child);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed"
    );
    Run {
        secs,
        rss_mib: ru.ru_maxrss as f64 / 1024.0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A read-only loop mount, unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(img: &Path, at: &Path) -> Mounted {
        fs::create_dir_all(at).expect("mkdir");
        ok(Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(img)
            .arg(at));
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// (compsize's total disk usage in bytes, DATA block groups' used bytes).
fn stored(img: &Path, at: &Path) -> (u64, u64) {
    let m = Mounted::new(img, at);
    let cs = ok(Command::new("compsize").arg("-b").arg(&m.0));
    let disk = cs
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let df = ok(Command::new("btrfs")
        .args(["filesystem", "df", "-b"])
        .arg(&m.0));
    let data = df
        .lines()
        .find(|l| l.starts_with("Data"))
        .and_then(|l| l.split("used=").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (disk, data)
}

fn chroot_dir() -> Option<PathBuf> {
    let dir = std::env::var("BTRFSIMG_TRIXIE_CHROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/trixie"));
    if !dir.join("usr/sbin/mkfs.btrfs").exists() && !dir.join("sbin/mkfs.btrfs").exists() {
        eprintln!(
            "making a trixie chroot with btrfs-progs in {}",
            dir.display()
        );
        let st = Command::new("debootstrap")
            .args(["--variant=minbase", "--include=btrfs-progs", "trixie"])
            .arg(&dir)
            .arg("http://deb.debian.org/debian")
            .stdout(Stdio::null())
            .status()
            .ok()?;
        if !st.success() {
            return None;
        }
    }
    Some(dir)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED compress bench: needs root (chroot, loop mounts)");
        return;
    }
    let Some(chroot) = chroot_dir() else {
        eprintln!("SKIPPED compress bench: no trixie chroot (debootstrap failed)");
        return;
    };
    let rounds: usize = std::env::var("BTRFSIMG_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let level = std::env::var("BTRFSIMG_BENCH_LEVEL").unwrap_or_else(|_| "zstd:3".into());
    let work =
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR").to_owned() + "/target").expect("tempdir");
    let tree = match std::env::var("BTRFSIMG_BENCH_TREE") {
        Ok(t) => PathBuf::from(t),
        Err(_) => {
            let share = work.path().join("share");
            ok(Command::new("cp").args(["-a", "/usr/share"]).arg(&share));
            share
        }
    };
    // The tree and the output directory, seen from inside the chroot.
    let (in_tree, in_out) = (chroot.join("mnt/tree"), chroot.join("mnt/out"));
    fs::create_dir_all(&in_tree).expect("mkdir");
    fs::create_dir_all(&in_out).expect("mkdir");
    ok(Command::new("mount").arg("--bind").arg(&tree).arg(&in_tree));
    ok(Command::new("mount")
        .arg("--bind")
        .arg(work.path())
        .arg(&in_out));
    let unbind = || {
        let _ = Command::new("umount").arg(&in_tree).status();
        let _ = Command::new("umount").arg(&in_out).status();
    };

    let ours = work.path().join("ours.img");
    let dedup = work.path().join("dedupe.img");
    let theirs = work.path().join("mkfs.img");
    let mut r: std::collections::BTreeMap<&str, Vec<Run>> = Default::default();
    for _ in 0..rounds {
        let _ = Command::new("sync").status();
        r.entry("ready").or_default().push(measure(
            Command::new(BIN)
                .args(["plan", "--compress", &level])
                .arg(&tree),
        ));
        let _ = fs::remove_file(&ours);
        r.entry("export").or_default().push(measure(
            Command::new(BIN)
                .args(["export", "-q", "--compress", &level])
                .arg(&tree)
                .arg("-o")
                .arg(&ours),
        ));
        let _ = fs::remove_file(&dedup);
        r.entry("dedupe").or_default().push(measure(
            Command::new(BIN)
                .args(["export", "-q", "--dedupe", "--compress", &level])
                .arg(&tree)
                .arg("-o")
                .arg(&dedup),
        ));
        let _ = fs::remove_file(&theirs);
        let f = fs::File::create(&theirs).expect("create");
        f.set_len(4 << 30).expect("size");
        drop(f);
        r.entry("mkfs").or_default().push(measure(
            Command::new("chroot")
                .arg(&chroot)
                .args([
                    "mkfs.btrfs",
                    "-q",
                    "-f",
                    "--shrink",
                    "--rootdir",
                    "/mnt/tree",
                    "--compress",
                    &level,
                    "/mnt/out/mkfs.img",
                ])
                .stderr(Stdio::null()),
        ));
    }
    let m = |k: &str| median(r[k].iter().map(|x| x.secs).collect());
    let rss = |k: &str| median(r[k].iter().map(|x| x.rss_mib).collect());
    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64;
    let (ours_disk, ours_data) = stored(&ours, &work.path().join("m1"));
    let (their_disk, their_data) = stored(&theirs, &work.path().join("m2"));
    let (dedup_disk, _) = stored(&dedup, &work.path().join("m3"));
    unbind();
    let mib = |b: f64| b / 1048576.0;
    println!("\n### --compress {level}: btrfsimg vs mkfs.btrfs 6.14 ({rounds} rounds, medians)\n");
    println!("| measure | btrfsimg | mkfs.btrfs 6.14 | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| image size (mkfs `--shrink`) | {:.1} MiB | {:.1} MiB | {:.3} | ≤ 0.5 |",
        mib(size(&ours)),
        mib(size(&theirs)),
        size(&ours) / size(&theirs)
    );
    println!(
        "| data stored (compsize disk usage: extents and inline data) | {:.1} MiB | {:.1} MiB | {:.3} | ≤ 1.02 |",
        mib(ours_disk as f64),
        mib(their_disk as f64),
        ours_disk as f64 / their_disk as f64
    );
    println!(
        "| DATA block groups used | {:.1} MiB | {:.1} MiB | {:.3} | |",
        mib(ours_data as f64),
        mib(their_data as f64),
        ours_data as f64 / their_data as f64
    );
    println!(
        "| export time / mkfs.btrfs time | {:.2} s | {:.2} s | {:.3} | ≤ 0.5 |",
        m("export"),
        m("mkfs"),
        m("export") / m("mkfs")
    );
    println!(
        "| time to ready (`plan`: the content pass) | {:.2} s | | | |",
        m("ready")
    );
    println!(
        "| peak RSS export / mkfs.btrfs | {:.1} MiB | {:.1} MiB | {:.2} | |",
        rss("export"),
        rss("mkfs"),
        rss("export") / rss("mkfs")
    );
    println!(
        "| peak RSS of `plan` (payloads kept for serving, up to 256 MiB) | {:.1} MiB | | | |",
        rss("ready")
    );
    println!(
        "| `--dedupe`: export time, data stored | {:.2} s ({:+.1} %), {:.1} MiB | | | |",
        m("dedupe"),
        (m("dedupe") / m("export") - 1.0) * 100.0,
        mib(dedup_disk as f64)
    );
}

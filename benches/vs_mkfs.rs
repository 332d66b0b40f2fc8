//! btrfsimg export against `mkfs.btrfs --rootdir --shrink` on the same tree, in
//! the same run, alternating, medians of `BTRFSIMG_BENCH_ROUNDS` (default 3).
//!
//! Tree: `BTRFSIMG_BENCH_TREE` if set, else a fresh copy of /usr/share/doc.
//! Prints a Markdown table of medians and ratios (btrfsimg / mkfs).
//!
//!     cargo bench --bench vs_mkfs

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

struct Run {
    secs: f64,
    max_rss_kib: i64,
    size: u64,
    allocated: u64,
}

/// Runs a command, returning wall time and the child's peak RSS (wait4 rusage).
/// The child is reaped by `wait4` itself, which also yields its own rusage.
#[allow(clippy::zombie_processes)]
fn measure(cmd: &mut Command, out: &Path) -> Run {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 writes it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let secs = start.elapsed().as_secs_f64();
    assert!(
        r > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed"
    );
    let m = fs::metadata(out).expect("output");
    Run {
        secs,
        max_rss_kib: ru.ru_maxrss,
        size: m.len(),
        allocated: m.blocks() * 512,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn drop_caches_best_effort() {
    let _ = Command::new("sync").status();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let have_mkfs = Command::new("mkfs.btrfs").arg("--version").output().is_ok();
    if !have_mkfs {
        eprintln!("SKIPPED vs_mkfs: mkfs.btrfs not found (apt-get install btrfs-progs)");
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let tree: PathBuf = match std::env::var_os("BTRFSIMG_BENCH_TREE") {
        Some(t) => PathBuf::from(t),
        None => {
            let t = work.path().join("tree");
            let ok = Command::new("cp")
                .args(["-a", "/usr/share/doc"])
                .arg(&t)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "copying /usr/share/doc failed");
            t
        }
    };
    let rounds: usize = std::env::var("BTRFSIMG_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (entries, tree_bytes) = walk_count(&tree);
    let bin = env!("CARGO_BIN_EXE_btrfsimg");
    let ours_img = work.path().join("ours.img");
    let mkfs_img = work.path().join("mkfs.img");

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..rounds {
        drop_caches_best_effort();
        let _ = fs::remove_file(&ours_img);
        ours.push(measure(
            Command::new(bin)
                .arg("export")
                .arg(&tree)
                .arg("-o")
                .arg(&ours_img),
            &ours_img,
        ));
        drop_caches_best_effort();
        let _ = fs::remove_file(&mkfs_img);
        let f = fs::File::create(&mkfs_img).expect("create");
        // Pre-sized like an image builder would: 3x the tree, at least 2 GiB.
        f.set_len((3 * tree_bytes).max(2 << 30)).expect("truncate");
        drop(f);
        theirs.push(measure(
            Command::new("mkfs.btrfs")
                .args(["-q", "-f", "--shrink", "--rootdir"])
                .arg(&tree)
                .arg(&mkfs_img),
            &mkfs_img,
        ));
    }
    let row = |name: &str, f: &dyn Fn(&Run) -> f64, unit: &str| {
        let a = median(ours.iter().map(f).collect());
        let b = median(theirs.iter().map(f).collect());
        println!("| {name} | {a:.3} {unit} | {b:.3} {unit} | {:.3} |", a / b);
    };
    println!(
        "\ntree: {} ({} entries), {} rounds, medians\n",
        tree.display(),
        entries,
        rounds
    );
    println!("| measure | btrfsimg export | mkfs.btrfs --rootdir --shrink | ratio |");
    println!("|---|---|---|---|");
    row("wall time", &|r| r.secs, "s");
    row("peak RSS", &|r| r.max_rss_kib as f64 / 1024.0, "MiB");
    row("image size", &|r| r.size as f64 / 1048576.0, "MiB");
    row(
        "allocated in file",
        &|r| r.allocated as f64 / 1048576.0,
        "MiB",
    );
}

/// (entries, bytes of regular files) below `p`, `p` included.
fn walk_count(p: &Path) -> (usize, u64) {
    let mut n = (1, 0);
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                let (a, b) = walk_count(&e.path());
                n = (n.0 + a, n.1 + b);
            } else {
                n = (n.0 + 1, n.1 + if m.is_file() { m.len() } else { 0 });
            }
        }
    }
    n
}

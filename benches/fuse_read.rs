//! Reading fs.img through `btrfsimg mount` against reading the exported image
//! through bindfs (a FUSE passthrough), in the same run, alternating, medians of
//! `BTRFSIMG_BENCH_ROUNDS` (default 3). Each round uses fresh mounts, so the
//! btrfsimg figures include synthesizing every block and reading the sources
//! (which are in the page cache, as is the exported file bindfs serves).
//! Also reports the time from starting `btrfsimg mount` to fs.img being ready.
//!
//! Tree: `BTRFSIMG_BENCH_TREE`, else a fresh copy of /usr/share/doc.
//!
//!     cargo bench --bench fuse_read

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn dd(file: &Path, direct: bool) -> f64 {
    let mut c = Command::new("dd");
    c.arg(format!("if={}", file.display()))
        .args(["of=/dev/null", "bs=1M"]);
    if direct {
        c.arg("iflag=direct");
    }
    let start = Instant::now();
    let out = c.output().expect("dd");
    assert!(
        out.status.success(),
        "dd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secs = start.elapsed().as_secs_f64();
    fs::metadata(file).expect("stat").len() as f64 / secs / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Mounted {
    child: Child,
    mnt: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt)
            .output();
    }
}

fn btrfsimg_mount(tree: &Path, mnt: &Path) -> (Mounted, f64) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_btrfsimg"))
        .arg("mount")
        .arg(tree)
        .arg(mnt)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn btrfsimg mount");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let ready = start.elapsed().as_secs_f64();
    assert!(line.trim_end().ends_with("fs.img"), "unexpected: {line}");
    (
        Mounted {
            child,
            mnt: mnt.to_path_buf(),
        },
        ready,
    )
}

fn bindfs_mount(dir: &Path, mnt: &Path) -> Mounted {
    let child = Command::new("bindfs")
        .arg("-f")
        .arg(dir)
        .arg(mnt)
        .spawn()
        .expect("spawn bindfs");
    for _ in 0..500 {
        if fs::read_dir(mnt)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Mounted {
        child,
        mnt: mnt.to_path_buf(),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if Command::new("bindfs").arg("--version").output().is_err() {
        eprintln!("SKIPPED fuse_read: bindfs not found (apt-get install bindfs)");
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
    let exported_dir = work.path().join("exported");
    fs::create_dir(&exported_dir).expect("mkdir");
    let exported = exported_dir.join("fs.img");
    let ok = Command::new(env!("CARGO_BIN_EXE_btrfsimg"))
        .arg("export")
        .arg(&tree)
        .arg("-o")
        .arg(&exported)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "export failed");
    // Warm the page cache for the exported file, as the sources are warm too.
    let _ = fs::read(&exported);
    let m1 = work.path().join("m1");
    let m2 = work.path().join("m2");
    fs::create_dir(&m1).expect("mkdir");
    fs::create_dir(&m2).expect("mkdir");

    let (mut ready, mut ours_b, mut ours_d, mut bind_b, mut bind_d) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        {
            let (m, r) = btrfsimg_mount(&tree, &m1);
            ready.push(r);
            let img = m.mnt.join("fs.img");
            ours_b.push(dd(&img, false));
            ours_d.push(dd(&img, true));
        }
        {
            let m = bindfs_mount(&exported_dir, &m2);
            let img = m.mnt.join("fs.img");
            bind_b.push(dd(&img, false));
            bind_d.push(dd(&img, true));
        }
    }
    let size = fs::metadata(&exported).expect("stat").len();
    println!(
        "\ntree: {}, image {:.1} MiB, {} rounds, medians; fresh mounts each round\n",
        tree.display(),
        size as f64 / 1048576.0,
        rounds
    );
    println!("| measure | btrfsimg mount | bindfs of the exported image | ratio |");
    println!("|---|---|---|---|");
    let row = |name: &str, a: f64, b: f64| {
        println!("| {name} | {a:.2} GB/s | {b:.2} GB/s | {:.2} |", a / b);
    };
    row(
        "dd bs=1M, buffered (first read)",
        median(ours_b),
        median(bind_b),
    );
    row("dd bs=1M, O_DIRECT", median(ours_d), median(bind_d));
    println!(
        "\ntime from start to fs.img ready: {:.3} s (median)",
        median(ready)
    );
}

//! The performance benchmark: btrfsimg against `mkfs.btrfs --rootdir --shrink`
//! and against the floors (a bare walk, a tar of the tree, zstd of that tar), on
//! the same trees in the same run, alternating, medians of
//! `BTRFSIMG_BENCH_ROUNDS` (default 3). Prints Markdown tables of medians and
//! the ratios the project's targets are stated in. No assertions: timing on a
//! shared machine is noisy, ratios within one run are what to compare.
//!
//!     cargo bench --bench perf
//!
//! Trees: a copy of /usr/share; 200,000 small files (generated). Opt-in:
//! `BTRFSIMG_BENCH_BIG=1` adds a generated tree with a few GB of data and a
//! 1,000,000-entry tree for planning time and memory per entry. `BTRFSIMG_BENCH_TREES=a,b`
//! replaces the default trees by existing directories.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_btrfsimg");

/// One measured run of a child process.
#[derive(Clone, Copy, Default)]
struct Run {
    secs: f64,
    rss_mib: f64,
    rchar: u64,
}

/// Runs `cmd` (through `sh -c` when it is a pipeline) and measures wall time,
/// peak RSS and bytes read (rchar), read from /proc before the child is reaped.
fn measure(cmd: &mut Command) -> Run {
    let start = Instant::now();
    let child = cmd.stdout(Stdio::null()).spawn().expect("spawn");
    let pid = child.id() as i32;
    // Wait for exit without reaping, so /proc/PID/io is still there.
    // SAFETY: siginfo is plain data; waitid on our own child.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as u32,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(r, 0, "waitid failed");
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let rchar = io
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: reaping our own child.
    unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    drop(child);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed"
    );
    Run {
        secs,
        rss_mib: ru.ru_maxrss as f64 / 1024.0,
        rchar,
    }
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script);
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn q(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// (entries, bytes of regular files)
fn count(p: &Path) -> (u64, u64) {
    let mut n = (1, 0);
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                let (a, b) = count(&e.path());
                n = (n.0 + a, n.1 + b);
            } else {
                n = (n.0 + 1, n.1 + if m.is_file() { m.len() } else { 0 });
            }
        }
    }
    n
}

/// Parses `btrfsimg plan` output: (file data bytes, tree block bytes).
fn plan_figures(tree: &Path) -> (u64, u64) {
    let out = Command::new(BIN)
        .arg("plan")
        .arg(tree)
        .output()
        .expect("plan");
    let text = String::from_utf8_lossy(&out.stdout);
    let num = |prefix: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let blocks = num("tree blocks: ");
    let nodesize = 16384;
    (num("file data: "), blocks * nodesize)
}

fn gen_small_files(root: &Path, n: usize) {
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let sizes = [0usize, 10, 100, 500, 1000, 3000, 5000, 20000];
    let per_dir = 1000;
    let buf: Vec<u8> = (0..20000).map(|i| (i * 7 + 3) as u8).collect();
    for i in 0..n {
        let d = root.join(format!("d{:04}", i / per_dir));
        if i % per_dir == 0 {
            fs::create_dir_all(&d).expect("mkdir");
        }
        let s = sizes[(rnd() % sizes.len() as u64) as usize];
        let off = (rnd() % 1000) as usize;
        let data = &buf[off.min(buf.len() - s)..][..s];
        fs::write(d.join(format!("file-{i:07}")), data).expect("write");
    }
}

fn gen_big(root: &Path, gib: u64) {
    fs::create_dir_all(root).expect("mkdir");
    let mut f = fs::File::create(root.join("big.bin")).expect("create");
    let chunk: Vec<u8> = (0..(8u64 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for _ in 0..(gib << 30) / chunk.len() as u64 {
        f.write_all(&chunk).expect("write");
    }
    for i in 0..2000 {
        fs::write(root.join(format!("small-{i}")), &chunk[i..i + 3000]).expect("write");
    }
}

struct Tree {
    name: String,
    path: PathBuf,
}

fn bench_tree(t: &Tree, work: &Path, rounds: usize) {
    let (entries, bytes) = count(&t.path);
    let (data, meta) = plan_figures(&t.path);
    let out = work.join("out.img");
    let zout = work.join("out.img.zst");
    let mk = work.join("mkfs.img");
    let tar = work.join("tree.tar");
    let src = q(&t.path);
    let mut r: std::collections::BTreeMap<&str, Vec<Run>> = Default::default();
    for _ in 0..rounds {
        let _ = Command::new("sync").status();
        r.entry("walk").or_default().push(measure(&mut sh(&format!(
            "find {src} -printf '%s\\n' >/dev/null"
        ))));
        r.entry("ready")
            .or_default()
            .push(measure(Command::new(BIN).arg("plan").arg(&t.path)));
        let _ = fs::remove_file(&out);
        r.entry("export").or_default().push(measure(
            Command::new(BIN)
                .args(["export", "-q"])
                .arg(&t.path)
                .arg("-o")
                .arg(&out),
        ));
        let _ = fs::remove_file(&zout);
        r.entry("zstd").or_default().push(measure(
            Command::new(BIN)
                .args(["export", "-q", "--zstd"])
                .arg(&t.path)
                .arg("-o")
                .arg(&zout),
        ));
        let _ = fs::remove_file(&mk);
        let f = fs::File::create(&mk).expect("create");
        f.set_len((3 * bytes).max(2 << 30)).expect("size");
        drop(f);
        r.entry("mkfs").or_default().push(measure(
            Command::new("mkfs.btrfs")
                .args(["-q", "-f", "--shrink", "--rootdir"])
                .arg(&t.path)
                .arg(&mk),
        ));
        r.entry("tar").or_default().push(measure(&mut sh(&format!(
            "tar cf - -C {src} . | cat > {}",
            q(&tar)
        ))));
        r.entry("tar+sync")
            .or_default()
            .push(measure(&mut sh(&format!(
                "tar cf - -C {src} . | cat > {} && sync -f {}",
                q(&tar),
                q(&tar)
            ))));
        r.entry("zstd-T1")
            .or_default()
            .push(measure(&mut sh(&format!(
                "zstd -q -3 -T1 -f {} -o {}.zst",
                q(&tar),
                q(&tar)
            ))));
    }
    let m = |k: &str| median(r[k].iter().map(|x| x.secs).collect());
    let rss = |k: &str| median(r[k].iter().map(|x| x.rss_mib).collect());
    let img = fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let mk_size = fs::metadata(&mk).map(|m| m.len()).unwrap_or(0);
    let mk_alloc = fs::metadata(&mk).map(|m| m.blocks() * 512).unwrap_or(0);
    let tar_size = fs::metadata(&tar).map(|m| m.len()).unwrap_or(0) as f64;
    let export_rchar = median(r["export"].iter().map(|x| x.rchar as f64).collect());
    let mib = |b: f64| b / 1048576.0;

    println!(
        "\n### {} ({} entries, {:.0} MiB in regular files; {} rounds, medians)\n",
        t.name,
        entries,
        mib(bytes as f64),
        rounds
    );
    println!("| measure | btrfsimg | reference | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| time to ready (`plan`) / mkfs.btrfs time | {:.2} s | {:.2} s | {:.3} | ≤ 0.1 |",
        m("ready"),
        m("mkfs"),
        m("ready") / m("mkfs")
    );
    println!(
        "| time to ready / bare walk (`find`) | {:.2} s | {:.2} s | {:.2} | ≤ 2 |",
        m("ready"),
        m("walk"),
        m("ready") / m("walk")
    );
    println!(
        "| export time / mkfs.btrfs time | {:.2} s | {:.2} s | {:.3} | ≤ 0.5 |",
        m("export"),
        m("mkfs"),
        m("export") / m("mkfs")
    );
    println!(
        "| export time / tar floor (`tar \\| cat > out`) | {:.2} s | {:.2} s | {:.2} | ≤ 1.3 |",
        m("export"),
        m("tar"),
        m("export") / m("tar")
    );
    println!(
        "| export time / tar floor + sync (export fsyncs) | {:.2} s | {:.2} s | {:.2} | |",
        m("export"),
        m("tar+sync"),
        m("export") / m("tar+sync")
    );
    println!(
        "| source bytes read (rchar) / file data | {:.0} MiB | {:.0} MiB | {:.3} | ≤ 1.02 |",
        mib(export_rchar),
        mib(bytes as f64),
        export_rchar / bytes as f64
    );
    println!(
        "| peak RSS export / mkfs.btrfs | {:.1} MiB | {:.1} MiB | {:.2} | ≤ 0.5 |",
        rss("export"),
        rss("mkfs"),
        rss("export") / rss("mkfs")
    );
    println!(
        "| image size / (data + 2 × metadata + 1 MiB) | {:.1} MiB | {:.1} MiB | {:.3} | ≤ 1.02 |",
        mib(img as f64),
        mib((data + 2 * meta) as f64 + 1048576.0),
        img as f64 / ((data + 2 * meta) as f64 + 1048576.0)
    );
    let lean = Command::new(BIN)
        .args(["plan", "--bytes", "--no-rw-slack"])
        .arg(&t.path)
        .output()
        .expect("plan");
    let lean: f64 = String::from_utf8_lossy(&lean.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    println!("| same, `--no-rw-slack` (no first-boot reserve) | {:.1} MiB | {:.1} MiB | {:.3} | ≤ 1.02 |", mib(lean), mib((data + 2 * meta) as f64 + 1048576.0), lean / ((data + 2 * meta) as f64 + 1048576.0));
    println!("| image size / mkfs.btrfs --shrink image size | {:.1} MiB | {:.1} MiB (allocated {:.1}) | {:.3} | |", mib(img as f64), mib(mk_size as f64), mib(mk_alloc as f64), img as f64 / mk_size as f64);
    println!("| export --zstd throughput / `zstd -3 -T1` of the tar | {:.0} MB/s | {:.0} MB/s | {:.2} | ≥ 1.6 |", img as f64 / m("zstd") / 1e6, tar_size / m("zstd-T1") / 1e6, (img as f64 / m("zstd")) / (tar_size / m("zstd-T1")));
}

/// Planning time and peak memory per entry for growing prefixes of a
/// 1,000,000-entry tree (directories are moved, not copied, between runs).
/// Memory per entry is the slope between prefixes, so the fixed part (the
/// binary, the 6 MiB block cache, the 4 MiB export buffer) drops out and
/// what remains is what each entry costs, names included.
fn bench_scaling(work: &Path) {
    let root = work.join("million");
    gen_small_files(&root, 1_000_000);
    println!("\n### planning time and peak RSS per entry\n");
    println!("| entries | plan time | µs per entry | plan peak RSS | export peak RSS | names |");
    println!("|---|---|---|---|---|---|");
    let mut points = Vec::new();
    for n in [250_000usize, 500_000, 1_000_000] {
        let staged = work.join("staged");
        fs::create_dir_all(&staged).expect("mkdir");
        let names: Vec<String> = (0..n / 1000).map(|d| format!("d{d:04}")).collect();
        for d in &names {
            fs::rename(root.join(d), staged.join(d)).expect("move");
        }
        let r = measure(Command::new(BIN).arg("plan").arg(&staged));
        let out = work.join("scaling.img");
        let _ = fs::remove_file(&out);
        let e = measure(
            Command::new(BIN)
                .args(["export", "-q"])
                .arg(&staged)
                .arg("-o")
                .arg(&out),
        );
        let _ = fs::remove_file(&out);
        // Names in the image: each directory's and each file's.
        let name_bytes = (n / 1000) * 5 + n * 12;
        println!(
            "| {n} | {:.2} s | {:.2} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            r.secs,
            r.secs * 1e6 / n as f64,
            r.rss_mib,
            e.rss_mib,
            name_bytes as f64 / 1048576.0
        );
        points.push((
            n as f64,
            r.rss_mib * 1048576.0,
            e.rss_mib * 1048576.0,
            name_bytes as f64,
        ));
        for d in &names {
            fs::rename(staged.join(d), root.join(d)).expect("move back");
        }
    }
    let (a, b) = (points[0], points[2]);
    let names_per_entry = (b.3 - a.3) / (b.0 - a.0);
    println!(
        "\nPer entry (slope from {} to {} entries): plan {:.0} B, export {:.0} B, of which names {:.0} B; \
         target ≤ 150 B + names.",
        a.0,
        b.0,
        (b.1 - a.1) / (b.0 - a.0),
        (b.2 - a.2) / (b.0 - a.0),
        names_per_entry
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for tool in ["mkfs.btrfs", "zstd", "tar"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("SKIPPED perf: {tool} not found");
            return;
        }
    }
    let work = tempfile::tempdir().expect("tempdir");
    let rounds: usize = std::env::var("BTRFSIMG_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut trees = Vec::new();
    if let Ok(list) = std::env::var("BTRFSIMG_BENCH_TREES") {
        for p in list.split(',').filter(|p| !p.is_empty()) {
            trees.push(Tree {
                name: p.to_string(),
                path: PathBuf::from(p),
            });
        }
    } else {
        let share = work.path().join("share");
        let ok = Command::new("cp")
            .args(["-a", "/usr/share"])
            .arg(&share)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "copying /usr/share failed");
        trees.push(Tree {
            name: "copy of /usr/share".into(),
            path: share,
        });
        let small = work.path().join("small");
        gen_small_files(&small, 200_000);
        trees.push(Tree {
            name: "200,000 small files".into(),
            path: small,
        });
        if std::env::var("BTRFSIMG_BENCH_BIG").is_ok() {
            let big = work.path().join("big");
            gen_big(&big, 4);
            trees.push(Tree {
                name: "4 GiB of data".into(),
                path: big,
            });
        }
    }
    for t in &trees {
        let scratch = work.path().join("scratch");
        fs::create_dir_all(&scratch).expect("mkdir");
        bench_tree(t, &scratch, rounds);
        let _ = fs::remove_dir_all(&scratch);
    }
    if std::env::var("BTRFSIMG_BENCH_BIG").is_ok() {
        bench_scaling(work.path());
    }
}

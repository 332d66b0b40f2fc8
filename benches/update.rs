//! What an update sends: a generated closure of `BTRFSIMG_BENCH_PATHS`
//! (300) store paths as v1, and v2 with 5 % of them replaced by new ones
//! and an overlay file rewritten, exported fresh and with `--base-layout`
//! of v1, plain, with `--compress zstd` and with a subvolume. For each:
//! the 4 KiB blocks v2 differs from v1 in, against the budget (the new
//! files' data blocks plus every copy of v2's tree blocks: those are
//! rewritten), the `zstd --patch-from` patch, the blocks of v2's bmap
//! ranges that differ (a bmap-driven partial flash writes those), and the
//! sizes. Then `BTRFSIMG_BENCH_UPDATES` (10) successive 5 % updates, each
//! from the last one's layout: every image's size against a fresh build of
//! the same tree, and `btrfs check --readonly --check-data-csum` on each.
//! Counts, not times: the figures do not depend on the machine.
//!
//!     sudo cargo bench --bench update

#[path = "../tests/common/closure.rs"]
mod closure;

use closure::Closure;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_btrfsimg");
const BLOCK: u64 = 4096;
const UUID: &str = "0b0d0a0e-00b1-4000-8000-000000000001";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

/// `btrfsimg export SRC -o IMG` with the fixed UUID and `extra`.
fn export(src: &Path, img: &Path, extra: &[&str]) {
    ok(Command::new(BIN)
        .arg("export")
        .arg(src)
        .arg("-o")
        .arg(img)
        .args(["-U", UUID, "--timestamp", "1", "--force", "--quiet"])
        .args(extra));
}

/// Tree blocks of the plan of SRC with `extra`, and the node size.
fn tree_blocks(src: &Path, extra: &[&str]) -> u64 {
    let out = ok(Command::new(BIN)
        .arg("plan")
        .arg(src)
        .args(["-U", UUID, "--timestamp", "1"])
        .args(extra));
    let line = out
        .lines()
        .find(|l| l.starts_with("tree blocks: "))
        .expect("a tree blocks line");
    line["tree blocks: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count")
}

type Extents = Vec<(u64, u64, u64, u64, Option<String>)>;

/// path -> (size, mtime, mode, extents) of a layout record.
fn record(p: &Path) -> BTreeMap<String, (u64, serde_json::Value, u64, Extents)> {
    let text = fs::read_to_string(p).expect("record");
    text.lines()
        .skip(1)
        .filter(|l| !l.starts_with("{\"entry\":") && !l.starts_with("{\"block\":"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
            let path = v["path"].as_str().unwrap_or("").to_string();
            let ext: Extents = serde_json::from_value(v["extents"].clone()).expect("extents");
            (
                path,
                (
                    v["size"].as_u64().unwrap(),
                    v["mtime"].clone(),
                    v["mode"].as_u64().unwrap(),
                    ext,
                ),
            )
        })
        .collect()
}

/// Data blocks of v2's files that are not unchanged-in-place from v1.
fn new_data_blocks(r1: &Path, r2: &Path) -> u64 {
    let (a, b) = (record(r1), record(r2));
    b.iter()
        .filter(|(p, f)| a.get(*p) != Some(f))
        .map(|(_, f)| f.3.iter().map(|e| e.2 / BLOCK).sum::<u64>())
        .sum()
}

/// The name of a tree by object id.
fn tree_name(id: u64) -> String {
    match id {
        1 => "root".into(),
        2 => "extent".into(),
        3 => "chunk".into(),
        4 => "dev".into(),
        7 => "csum".into(),
        9 => "uuid".into(),
        10 => "free space".into(),
        11 => "block group".into(),
        5 => "fs".into(),
        id if id > u64::MAX - 256 => "data reloc".into(),
        id => format!("subvol {id}"),
    }
}

/// Per tree (by name): (its 4 KiB blocks in every copy, how many of them
/// are in `diff`), from the block lines and chunks of the record `layout`.
fn by_tree(layout: &Path, diff: &[u64]) -> BTreeMap<String, (u64, u64)> {
    let text = fs::read_to_string(layout).expect("record");
    let mut lines = text.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().expect("a header")).unwrap();
    let nodesize = header["nodesize"].as_u64().unwrap();
    let chunks: Vec<(u64, u64, Vec<u64>)> = header["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["logical"].as_u64().unwrap(),
                c["length"].as_u64().unwrap(),
                serde_json::from_value(c["stripes"].clone()).unwrap(),
            )
        })
        .collect();
    let diff: std::collections::BTreeSet<u64> = diff.iter().copied().collect();
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for l in lines.filter(|l| l.starts_with("{\"block\":")) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let b = v["block"].as_array().unwrap();
        let (tree, logical) = (b[0].as_u64().unwrap(), b[5].as_u64().unwrap());
        let (cl, _, stripes) = chunks
            .iter()
            .find(|(cl, len, _)| *cl <= logical && logical < cl + len)
            .expect("a block in a chunk");
        let e = out.entry(tree_name(tree)).or_default();
        for st in stripes {
            let first = (st + logical - cl) / BLOCK;
            for blk in first..first + nodesize / BLOCK {
                e.0 += 1;
                e.1 += diff.contains(&blk) as u64;
            }
        }
    }
    out
}

/// Indexes of the 4 KiB blocks in which two images differ (the shorter
/// one read as zeros past its end).
fn differing(a: &Path, b: &Path) -> Vec<u64> {
    let (x, y) = (fs::read(a).expect("image"), fs::read(b).expect("image"));
    let n = x.len().max(y.len()).div_ceil(BLOCK as usize);
    let block = |v: &[u8], i: usize| -> Vec<u8> {
        let s = (i * BLOCK as usize).min(v.len());
        let e = ((i + 1) * BLOCK as usize).min(v.len());
        let mut b = v[s..e].to_vec();
        b.resize(BLOCK as usize, 0);
        b
    };
    (0..n)
        .filter(|&i| block(&x, i) != block(&y, i))
        .map(|i| i as u64)
        .collect()
}

/// The blocks a bmap maps (its `<Range>` elements, `A-B` or `A`).
fn bmap_blocks(bmap: &Path) -> std::collections::BTreeSet<u64> {
    let text = fs::read_to_string(bmap).expect("bmap");
    let mut out = std::collections::BTreeSet::new();
    for part in text.split("<Range").skip(1) {
        let inner = &part[part.find('>').expect("a range") + 1..];
        let r = inner[..inner.find('<').expect("a range end")].trim();
        let (a, b) = match r.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
            None => (r.parse().unwrap(), r.parse().unwrap()),
        };
        out.extend(a..=b);
    }
    out
}

/// `zstd --patch-from=OLD NEW` at level 19 with a window over both: the
/// patch's size.
fn patch_size(old: &Path, new: &Path, work: &Path) -> u64 {
    let biggest = fs::metadata(old)
        .unwrap()
        .len()
        .max(fs::metadata(new).unwrap().len());
    let window = (64 - (biggest - 1).leading_zeros()).max(20);
    let out = work.join("patch.zst");
    ok(Command::new("zstd")
        .args(["-q", "-f", "-19", "-T0"])
        .arg(format!("--long={window}"))
        .arg(format!("--patch-from={}", s(old)))
        .arg(new)
        .arg("-o")
        .arg(&out));
    let n = fs::metadata(&out).unwrap().len();
    fs::remove_file(&out).unwrap();
    n
}

fn check(img: &Path) {
    ok(Command::new("btrfs")
        .args(["check", "--readonly", "--check-data-csum"])
        .arg(img));
}

fn size(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

struct Scenario {
    name: &'static str,
    args: Vec<&'static str>,
}

struct Figures {
    blocks: u64,
    fresh_changed: u64,
    base_changed: u64,
    budget: u64,
    /// Every copy of v2's tree blocks, in 4 KiB blocks.
    tree: u64,
    fresh_patch: u64,
    base_patch: u64,
    fresh_bmap: u64,
    base_bmap: u64,
    fresh_size: u64,
    base_size: u64,
    /// Per tree: (4 KiB blocks of every copy, how many differ).
    by_tree: BTreeMap<String, (u64, u64)>,
}

fn one_update(work: &Path, v1: &Path, v2: &Path, sc: &Scenario) -> Figures {
    let d = work.join(sc.name);
    fs::create_dir_all(&d).unwrap();
    let (i1, l1) = (d.join("v1.img"), d.join("v1.layout"));
    let mut a = sc.args.clone();
    a.extend(["--write-layout", s(&l1)]);
    export(v1, &i1, &a);
    let (fresh, fresh_bmap) = (d.join("fresh.img"), d.join("fresh.bmap"));
    let mut a = sc.args.clone();
    a.extend(["--bmap", s(&fresh_bmap)]);
    export(v2, &fresh, &a);
    let (based, based_bmap, l2) = (d.join("base.img"), d.join("base.bmap"), d.join("v2.layout"));
    let mut a = sc.args.clone();
    a.extend([
        "--base-layout",
        s(&l1),
        "--write-layout",
        s(&l2),
        "--bmap",
        s(&based_bmap),
    ]);
    export(v2, &based, &a);
    check(&based);
    // Reproducible: the same inputs and base, the same bytes.
    let again = d.join("again.img");
    let mut a = sc.args.clone();
    a.extend(["--base-layout", s(&l1)]);
    export(v2, &again, &a);
    assert!(
        fs::read(&again).unwrap() == fs::read(&based).unwrap(),
        "{}: not reproducible",
        sc.name
    );
    fs::remove_file(&again).unwrap();

    let mut pa = sc.args.clone();
    pa.extend(["--base-layout", s(&l1)]);
    let copies = if sc.args.contains(&"single") { 1 } else { 2 };
    let nodes = tree_blocks(v2, &pa) * copies * (16384 / BLOCK);
    let fresh_diff = differing(&i1, &fresh);
    let base_diff = differing(&i1, &based);
    let mapped_differ = |bmap: &Path, diff: &[u64]| {
        let m = bmap_blocks(bmap);
        diff.iter().filter(|b| m.contains(b)).count() as u64
    };
    let f = Figures {
        blocks: size(&based).div_ceil(BLOCK),
        fresh_changed: fresh_diff.len() as u64,
        base_changed: base_diff.len() as u64,
        budget: new_data_blocks(&l1, &l2) + nodes,
        tree: nodes,
        fresh_patch: patch_size(&i1, &fresh, &d),
        base_patch: patch_size(&i1, &based, &d),
        fresh_bmap: mapped_differ(&fresh_bmap, &fresh_diff),
        base_bmap: mapped_differ(&based_bmap, &base_diff),
        fresh_size: size(&fresh),
        base_size: size(&based),
        by_tree: by_tree(&l2, &base_diff),
    };
    fs::remove_dir_all(&d).unwrap();
    f
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let paths = env_u64("BTRFSIMG_BENCH_PATHS", 300);
    let updates = env_u64("BTRFSIMG_BENCH_UPDATES", 10);
    let replace = (paths as usize).div_ceil(20);
    let work = tempfile::Builder::new()
        .prefix("btrfsimg-bench-update-")
        .tempdir()
        .expect("a work directory");
    let work = work.path().to_path_buf();
    let c1 = Closure::new(paths);
    let c2 = c1.update(replace);
    let (v1, v2) = (work.join("v1"), work.join("v2"));
    c1.write(&v1);
    c2.write(&v2);
    println!(
        "closure: {paths} store paths; v2 replaces {replace} of them and rewrites /etc/os-release\n"
    );
    let scenarios = [
        Scenario {
            name: "plain",
            args: vec![],
        },
        Scenario {
            name: "--compress zstd",
            args: vec!["--compress", "zstd"],
        },
        Scenario {
            name: "--subvol nix, --metadata single",
            args: vec!["--subvol", "nix", "--metadata", "single"],
        },
    ];
    println!("| one update, v1 → v2 | image blocks | differ: fresh | differ: base | budget: new data + tree blocks | base / budget | base / fresh | zstd --patch-from -19: fresh | base | bmap blocks to write: fresh | base | size base / fresh |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut met = true;
    let mut trees = Vec::new();
    for sc in &scenarios {
        let f = one_update(&work, &v1, &v2, sc);
        trees.push((sc.name, f.by_tree.clone()));
        let over_budget = f.base_changed as f64 / f.budget as f64;
        let vs_fresh = f.base_changed as f64 / f.fresh_changed as f64;
        let grew = f.base_size as f64 / f.fresh_size as f64;
        met &= over_budget <= 1.25 && vs_fresh <= 0.2 && grew <= 1.15;
        println!(
            "| {} | {} | {} | {} | {} + {} | {:.2}x | {:.3}x | {:.2} MB | {:.2} MB | {} | {} | {:.3}x |",
            sc.name,
            f.blocks,
            f.fresh_changed,
            f.base_changed,
            f.budget - f.tree,
            f.tree,
            over_budget,
            vs_fresh,
            f.fresh_patch as f64 / 1e6,
            f.base_patch as f64 / 1e6,
            f.fresh_bmap,
            f.base_bmap,
            grew
        );
    }

    // Where the tree blocks that differ are.
    println!(
        "\n| tree blocks (4 KiB, every copy) that differ with the base | by tree: differ / all |"
    );
    println!("|---|---|");
    for (name, t) in &trees {
        let cells: Vec<String> = t
            .iter()
            .map(|(tree, (all, differ))| format!("{tree} {differ}/{all}"))
            .collect();
        println!("| {name} | {} |", cells.join(", "));
    }

    // Successive updates, each from the last one's layout.
    println!("\n| update | size with base (MiB) | fresh (MiB) | base / fresh | check |");
    println!("|---|---|---|---|---|");
    let mut c = c1;
    let mut base: Option<PathBuf> = None;
    let mut worst: f64 = 0.0;
    for u in 0..=updates {
        if u > 0 {
            c = c.update(replace);
        }
        let src = work.join(format!("gen{u}"));
        c.write(&src);
        let (img, layout) = (work.join("gen.img"), work.join(format!("gen{u}.layout")));
        let mut a = vec!["--write-layout", s(&layout)];
        let b = base.clone();
        if let Some(b) = &b {
            a.extend(["--base-layout", s(b)]);
        }
        export(&src, &img, &a);
        check(&img);
        let fresh = work.join("gen-fresh.img");
        export(&src, &fresh, &[]);
        let r = size(&img) as f64 / size(&fresh) as f64;
        worst = worst.max(r);
        println!(
            "| {u} | {:.1} | {:.1} | {r:.3}x | clean |",
            size(&img) as f64 / 1048576.0,
            size(&fresh) as f64 / 1048576.0
        );
        fs::remove_dir_all(&src).unwrap();
        if let Some(b) = base.replace(layout) {
            fs::remove_file(b).unwrap();
        }
    }
    met &= worst <= 1.25;
    println!(
        "\ntargets: one update within 1.25x its budget, 0.2x a fresh build's changes and 1.15x its size; {updates} updates within 1.25x a fresh size (worst {worst:.3}x): {}",
        if met { "met" } else { "NOT met" }
    );
    fs::remove_dir_all(&work).unwrap();
}

//! Images built from their predecessor's layout record, as the kernel sees
//! them: a chain of updates (store paths replaced by new ones of other
//! sizes, a configuration file rewritten), each built with `--base-layout`
//! of the one before, plain, with `--compress zstd` and with a subvolume.
//! Every image checks clean (`btrfs check --check-data-csum`, which also
//! checks the free-space tree against the extent tree: every gap the
//! updates leave must be described), mounts read-only with every entry
//! equal to its source, stays within 1.25x a fresh build's size, and the
//! last one takes a read-write mount (writes, deletes, a scrub) and checks
//! clean again. Needs root and loop devices.

mod common;

use btrfsimg::plan::record;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// One store path of a generation: its number and its data file's size.
#[derive(Clone, Copy)]
struct StorePath {
    n: u64,
    size: u64,
}

fn first_generation() -> Vec<StorePath> {
    (0..30)
        .map(|n| StorePath {
            n,
            size: match n % 7 {
                0 => 2 * MIB + n * 4096,
                3 => 700_000,
                _ => 20_000 + n * 9_000,
            },
        })
        .collect()
}

/// The next generation: four paths replaced by new ones, one of them larger
/// than any it replaces (the image must grow) and three smaller.
fn next_generation(paths: &[StorePath], generation: u64) -> Vec<StorePath> {
    let mut out: Vec<StorePath> = paths.to_vec();
    for k in 0..4u64 {
        let victim = ((generation * 7 + k * 5) as usize) % out.len();
        let old = out[victim];
        out[victim] = StorePath {
            n: 1000 * generation + k,
            size: match k {
                0 => old.size + 3 * MIB,
                _ => old.size / 2 + 5000,
            },
        };
    }
    out
}

fn build_tree(src: &Path, paths: &[StorePath], generation: u64) {
    let mut t = TreeBuilder::new(src);
    for p in paths {
        let dir = format!("nix/store/{:05}abcdfghijklmnpqrsvwxyz012-pkg{}", p.n, p.n);
        t.random_file(format!("{dir}/lib/libpkg.so").as_bytes(), p.size, p.n);
        t.random_file(
            format!("{dir}/bin/tool").as_bytes(),
            9000 + p.n,
            50_000 + p.n,
        );
        t.file(
            format!("{dir}/share/doc/README").as_bytes(),
            format!("package {} documentation line\n", p.n)
                .repeat(2000)
                .as_bytes(),
        );
        t.symlink(format!("{dir}/lib/libpkg.so.1").as_bytes(), b"libpkg.so");
    }
    t.file(
        b"etc/os-release",
        format!("VERSION_ID={generation}\n").as_bytes(),
    );
    t.random_file(b"etc/ssh/moduli", 300_000, 9);
    t.finalize();
}

fn read_record(p: &Path) -> record::Record {
    record::read(std::io::BufReader::new(fs::File::open(p).unwrap())).expect("a valid record")
}

/// Extents of files unchanged from `old` to `new` that kept their place,
/// and unchanged files whose extents moved.
fn kept_extents(old: &record::Record, new: &record::Record) -> (usize, usize) {
    let before: BTreeMap<Vec<u8>, &record::FileRecord> =
        old.files.iter().map(|f| (f.path(), f)).collect();
    let (mut kept, mut moved) = (0, 0);
    for f in &new.files {
        if let Some(o) = before
            .get(&f.path())
            .filter(|o| o.size == f.size && o.mtime == f.mtime && o.mode == f.mode)
        {
            match o.extents == f.extents {
                true => kept += f.extents.len(),
                false => moved += 1,
            }
        }
    }
    (kept, moved)
}

fn size(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

/// Builds `generations` images, each from the previous one's layout, and
/// checks each as the kernel sees it.
fn chain(tag: &str, uuid: &'static str, extra: &[&str], generations: u64) {
    let work = workdir(tag);
    let dir = work.path();
    let mut paths = first_generation();
    let mut base: Option<std::path::PathBuf> = None;
    let mut last = None;
    let mut grew = false;
    for g in 0..generations {
        if g > 0 {
            paths = next_generation(&paths, g);
        }
        let src = dir.join(format!("src{g}"));
        build_tree(&src, &paths, g);
        let img = dir.join(format!("v{g}.img"));
        let layout = dir.join(format!("v{g}.layout"));
        let mut args = fixed_args(uuid);
        args.extend(extra);
        let layout_s = layout.to_str().unwrap().to_string();
        let base_s = base.as_ref().map(|b| b.to_str().unwrap().to_string());
        args.extend(["--write-layout", &layout_s]);
        if let Some(b) = &base_s {
            args.extend(["--base-layout", b]);
        }
        export_sources(Some(&src), &img, &args);
        let rec = read_record(&layout);
        if let Some(b) = &base {
            let (kept, moved) = kept_extents(&read_record(b), &rec);
            assert!(
                kept > 60 && moved == 0,
                "{tag} generation {g}: {kept} extents kept, {moved} unchanged files moved"
            );
            grew |= rec.header.chunks.len() > read_record(b).header.chunks.len();
        }
        let fresh = dir.join("fresh.img");
        let mut fargs = fixed_args(uuid);
        fargs.extend(extra);
        export_sources(Some(&src), &fresh, &fargs);
        assert!(
            size(&img) as f64 <= 1.25 * size(&fresh) as f64,
            "{tag} generation {g}: {} bytes, a fresh build {}",
            size(&img),
            size(&fresh)
        );
        fs::remove_file(&fresh).unwrap();
        btrfs_check(&img);
        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::default());
        m.unmount();
        if let Some(prev) = last.replace((src.clone(), img.clone())) {
            fs::remove_dir_all(&prev.0).unwrap();
            fs::remove_file(&prev.1).unwrap();
        }
        base = Some(layout);
    }

    assert!(grew, "{tag}: some update needed a new chunk");

    // The last image, read-write: new files into the gaps, deletions, a
    // scrub, and a clean check afterwards.
    let (src, img) = last.expect("at least one generation");
    let m = LoopMount::new(&img, true);
    let store = m.path().join("nix/store");
    let mut names: Vec<_> = fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    fs::remove_dir_all(&names[0]).unwrap();
    fs::write(m.path().join("etc/new-file"), vec![7u8; 200_000]).unwrap();
    fs::write(m.path().join("etc/os-release"), b"rewritten\n").unwrap();
    run_ok(&mut std::process::Command::new(tool("sync")));
    btrfs_scrub(m.path());
    m.unmount();
    btrfs_check(&img);
    drop(src);
}

#[test]
fn a_chain_of_updates_mounts_and_checks_clean() {
    if !system_tests_available("a_chain_of_updates_mounts_and_checks_clean") {
        return;
    }
    chain(
        "update-chain",
        "0b0d0a0e-0016-4000-8000-000000000001",
        &[],
        6,
    );
}

#[test]
fn a_chain_of_compressed_updates_mounts_and_checks_clean() {
    if !system_tests_available("a_chain_of_compressed_updates_mounts_and_checks_clean") {
        return;
    }
    chain(
        "update-chain-zstd",
        "0b0d0a0e-0016-4000-8000-000000000002",
        &["--compress", "zstd"],
        5,
    );
}

#[test]
fn a_chain_of_updates_with_a_subvolume_mounts_and_checks_clean() {
    if !system_tests_available("a_chain_of_updates_with_a_subvolume_mounts_and_checks_clean") {
        return;
    }
    chain(
        "update-chain-subvol",
        "0b0d0a0e-0016-4000-8000-000000000003",
        &["--subvol", "nix", "--metadata", "single"],
        4,
    );
}

//! Generated trees through the real oracles: a sample of the fuzz generator's
//! cases exported, checked by `btrfs check --check-data-csum`, loop-mounted
//! and compared with their description; and the node-size x profile matrix
//! (4 KiB and 64 KiB nodes, DUP and single metadata) through the CLI, with
//! multi-level csum and extent trees, the largest symlink and xattr each node
//! size holds (and one byte more refused), the first read-write boot at the
//! exact size and the read-write cycle. Needs root and loop devices.

mod common;

use btrfsimg::format::max_item_size;
use btrfsimg::source::generated::{Content, Entry};
use btrfsimg::source::{Fill, Segment};
use btrfsimg::{export, plan_generated, Image};
use common::fuzz::sample_specs;
use common::*;
use std::collections::BTreeMap;

/// How many fuzz cases go through the kernel (`BTRFSIMG_MODEL_SAMPLES`).
fn samples() -> usize {
    std::env::var("BTRFSIMG_MODEL_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

#[test]
fn fuzz_sample_is_checked_and_mounted() {
    let what = "fuzz_sample_is_checked_and_mounted";
    if !system_tests_available(what) {
        return;
    }
    let work = workdir("fuzz-sample");
    for (i, mut spec) in sample_specs(samples(), 0x5a4d_504c).into_iter().enumerate() {
        // The comparison mounts the top level and expects every hard link
        // whole: subvolumes (which split links) are fuzzed by plan_fuzz and
        // checked with the kernel by subvol_system.
        spec.opts.subvolumes.clear();
        // Distinct UUIDs: tests mount in parallel.
        spec.opts.fsid = Some([
            0x40, i as u8, 0x11, 0x22, 0x33, 0x44, 0x45, 0x66, 0x87, 0, 0, 0, 0, 0, 0, i as u8,
        ]);
        let what = format!(
            "case {i} (nodesize {}, dup {}, rw slack {}, csum {})",
            spec.opts.nodesize,
            spec.opts.metadata_dup,
            spec.opts.rw_slack,
            spec.opts.csum.name()
        );
        let img_path = work.path().join(format!("case{i}.img"));
        let plan = plan_generated(&spec.root, &spec.opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        let img = Image::new(plan);
        export::write_file(&img, &img_path, false, &Default::default())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        btrfs_check(&img_path);
        let m = LoopMount::new(&img_path, false);
        let diffs = model_differences(m.path(), &spec.root, spec.opts.owner);
        assert!(
            diffs.is_empty(),
            "{what}: {:#?}",
            &diffs[..diffs.len().min(20)]
        );
        m.unmount();
        std::fs::remove_file(&img_path).unwrap();
    }
}

/// A tree that makes the csum and extent trees multi-level at 4 KiB nodes,
/// with every kind of entry, and the largest symlink and xattr for `nodesize`
/// (`extra` bytes more).
fn matrix_tree(nodesize: u32, extra: usize) -> Entry {
    let max = max_item_size(nodesize);
    let mut root = BTreeMap::new();
    let mut many = BTreeMap::new();
    for i in 0..300u64 {
        many.insert(
            format!("f{i:03}").into_bytes(),
            Entry::file(20_000 + i, Fill::Random(i)),
        );
    }
    for i in 0..500u64 {
        many.insert(
            format!("empty{i:03}").into_bytes(),
            Entry::file(0, Fill::Zeros),
        );
    }
    root.insert(b"many".to_vec(), Entry::dir(many));
    root.insert(b"big".to_vec(), Entry::file(5 << 20, Fill::Text(3)));
    root.insert(
        b"sparse".to_vec(),
        Entry {
            content: Content::File {
                size: 64 << 20,
                data: Some(vec![
                    Segment {
                        offset: 1 << 20,
                        len: 300_000,
                    },
                    Segment {
                        offset: 40 << 20,
                        len: 5000,
                    },
                ]),
                fill: Fill::Random(9),
            },
            ..Entry::file(0, Fill::Zeros)
        },
    );
    root.insert(b"inline".to_vec(), Entry::file(2048, Fill::Text(1)));
    root.insert(vec![b'n'; 255], Entry::file(3000, Fill::Random(4)));
    // Linux creates no symlink longer than 4095 bytes.
    let link_max = ((max - 21).min(4095) + extra).min(4095);
    root.insert(
        b"longest-link".to_vec(),
        Entry::symlink(&vec![b'l'; link_max]),
    );
    let mut x = Entry::file(10, Fill::Zeros);
    let name = b"trusted.big".to_vec();
    x.meta.xattrs = vec![(name.clone(), vec![0xa5; max - 30 - name.len() + extra])];
    root.insert(b"xattr".to_vec(), x);
    let mut linked = Entry::file(5000, Fill::Random(5));
    linked.link = Some(1);
    root.insert(b"link-a".to_vec(), linked.clone());
    root.insert(b"link-b".to_vec(), linked);
    root.insert(
        b"dev".to_vec(),
        Entry {
            content: Content::CharDev(1 << 20 | 3),
            ..Entry::file(0, Fill::Zeros)
        },
    );
    root.insert(
        b"fifo".to_vec(),
        Entry {
            content: Content::Fifo,
            ..Entry::file(0, Fill::Zeros)
        },
    );
    Entry::dir(root)
}

#[test]
fn node_size_and_profile_matrix() {
    let what = "node_size_and_profile_matrix";
    if !system_tests_available(what) {
        return;
    }
    for (i, (nodesize, profile)) in [
        (4096u32, "dup"),
        (4096, "single"),
        (65536, "dup"),
        (65536, "single"),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("{nodesize} {profile}");
        let tmp = ScratchFs::tmpfs("matrix", 256 * MIB);
        let src = tmp.path().join("src");
        materialize(&src, &matrix_tree(nodesize, 0));
        let work = workdir("matrix");
        let img = work.path().join("m.img");
        let uuid = [
            "0b0d0a0e-000a-4000-8000-000000000001",
            "0b0d0a0e-000a-4000-8000-000000000002",
            "0b0d0a0e-000a-4000-8000-000000000003",
            "0b0d0a0e-000a-4000-8000-000000000004",
        ][i];
        let ns = nodesize.to_string();
        let mut args = fixed_args(uuid);
        args.extend(["--nodesize", &ns, "--metadata", profile]);
        export(&src, &img, &args);
        btrfs_check(&img);
        if nodesize == 4096 {
            for tree in ["csum", "extent"] {
                let levels = dump_tree_levels(&img, tree);
                assert!(levels > 0, "{what}: the {tree} tree is multi-level");
            }
        }
        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::default());
        m.unmount();
        first_boot_rw(&img);
        rw_cycle(&img);

        // One byte more than the largest symlink (where Linux allows it) and
        // xattr is a one-line error.
        let over = tmp.path().join("over");
        materialize(&over, &matrix_tree(nodesize, 1));
        let err = export_fails(&over, &work.path().join("over.img"), &args);
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
        let first = if nodesize == 4096 {
            "longest-link"
        } else {
            "xattr"
        };
        assert!(err.contains(first), "{what}: {err}");
    }
}

/// The root level of a tree in `btrfs inspect-internal dump-tree` output.
fn dump_tree_levels(img: &std::path::Path, tree: &str) -> u32 {
    let out = run_stdout(
        std::process::Command::new(tool("btrfs"))
            .args(["inspect-internal", "dump-tree", "-t", tree])
            .arg(img),
    );
    out.lines()
        .find_map(|l| {
            let l = l.trim_start();
            l.strip_prefix("node ").and_then(|r| {
                r.split_whitespace()
                    .skip_while(|w| *w != "level")
                    .nth(1)
                    .and_then(|v| v.parse().ok())
            })
        })
        .unwrap_or(0)
}

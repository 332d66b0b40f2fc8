//! `--compress zstd|zlib|lzo` through the real oracles: for each algorithm,
//! files of 0, 1, 2048, 2049, 4096, 131071, 131072, 131073 bytes and 300 MiB,
//! random (incompressible), zeros, text, and a sparse file with compressible
//! data between holes are exported, `btrfs check --check-data-csum`ed,
//! loop-mounted and compared entry by entry, shown by compsize as extents of
//! that algorithm, served by `btrfsimg mount` byte for byte as exported, the
//! same with one thread as with all, and put through a read-write cycle
//! that rewrites and appends to compressed files, deletes one, and runs a
//! full balance and a scrub. Needs root, loop devices, FUSE, compsize.

mod common;

use btrfsimg::source::generated::{Content, Entry};
use btrfsimg::source::{Fill, Segment};
use common::*;
use std::collections::BTreeMap;
use std::process::Command;

fn tree(big: u64) -> Entry {
    let mut root = BTreeMap::new();
    for (i, size) in [0u64, 1, 2048, 2049, 4096, 131071, 131072, 131073]
        .into_iter()
        .enumerate()
    {
        root.insert(
            format!("text-{size}").into_bytes(),
            Entry::file(size, Fill::Text(i as u64)),
        );
        root.insert(
            format!("random-{size}").into_bytes(),
            Entry::file(size, Fill::Random(i as u64)),
        );
    }
    root.insert(b"zeros".to_vec(), Entry::file(5 << 20, Fill::Zeros));
    root.insert(b"big-text".to_vec(), Entry::file(big, Fill::Text(99)));
    root.insert(
        b"big-random".to_vec(),
        Entry::file(3 << 20, Fill::Random(98)),
    );
    root.insert(
        b"sparse".to_vec(),
        Entry {
            content: Content::File {
                size: 64 << 20,
                data: Some(vec![
                    Segment {
                        offset: 1 << 20,
                        len: 700_000,
                    },
                    Segment {
                        offset: 30 << 20,
                        len: 5000,
                    },
                    Segment {
                        offset: (64 << 20) - 3000,
                        len: 3000,
                    },
                ]),
                fill: Fill::Text(7),
            },
            ..Entry::file(0, Fill::Zeros)
        },
    );
    let mut sub = BTreeMap::new();
    sub.insert(b"small".to_vec(), Entry::file(900, Fill::Text(5)));
    root.insert(b"dir".to_vec(), Entry::dir(sub));
    Entry::dir(root)
}

/// The algorithms' names as compsize prints them in its type column.
fn compsize_types(mnt: &std::path::Path) -> String {
    run_stdout(Command::new(tool("compsize")).arg(mnt))
}

#[test]
fn compressed_images_for_every_algorithm() {
    let what = "compressed_images_for_every_algorithm";
    if !fuse_available(what) || !tools_available(what, &["compsize", "cmp"]) {
        return;
    }
    let tmp = ScratchFs::tmpfs("compress", 600 * MIB);
    let src = tmp.path().join("src");
    materialize(&src, &tree(300 * MIB));
    for (i, algo) in ["zstd", "zlib:6", "lzo"].into_iter().enumerate() {
        let name = algo.split(':').next().unwrap();
        let work = workdir(&format!("compress-{name}"));
        let uuid = [
            "0b0d0a0e-0c00-4000-8000-000000000001",
            "0b0d0a0e-0c00-4000-8000-000000000002",
            "0b0d0a0e-0c00-4000-8000-000000000003",
        ][i];
        let mut args = fixed_args(uuid);
        args.extend(["--compress", algo]);
        let img = work.path().join("c.img");
        export(&src, &img, &args);
        btrfs_check(&img);
        let size = std::fs::metadata(&img).unwrap().len();
        assert!(
            size < 200 * MIB,
            "{algo}: image of {size} bytes for 300 MiB of text"
        );

        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::default());
        let types = compsize_types(m.path());
        assert!(
            types.lines().any(|l| l.starts_with(name)),
            "{algo}: compsize shows no {name} extents:\n{types}"
        );
        assert!(
            types.lines().any(|l| l.starts_with("none")),
            "{algo}: raw extents too:\n{types}"
        );
        m.unmount();

        // The same bytes with one thread, and through the FUSE mount.
        let one = work.path().join("one.img");
        let mut one_args = args.clone();
        one_args.extend(["--threads", "1"]);
        export(&src, &one, &one_args);
        run_ok(Command::new(tool("cmp")).arg(&img).arg(&one));
        let f = FuseMount::start(&src, &work.path().join("mnt"), &args);
        run_ok(Command::new(tool("cmp")).arg(&img).arg(f.img()));
        assert!(f.stop(libc::SIGTERM).success());

        rw_cycle_rewrite(
            &img,
            &["/dir/small", "/big-text", "/text-131073", "/sparse"],
        );
    }
}

/// `--dedupe` on a tree with many identical files (with and without
/// compression, and at 4 KiB nodes where most references become keyed
/// EXTENT_DATA_REF items): check clean, the same data stored once, compared
/// equal mounted; on a grown read-write copy a full balance and a scrub are
/// clean, and deleting and rewriting copies leaves the others intact.
#[test]
fn dedupe_shares_identical_files() {
    let what = "dedupe_shares_identical_files";
    if !system_tests_available(what) {
        return;
    }
    let mut root = BTreeMap::new();
    let mut copies = BTreeMap::new();
    for i in 0..150u32 {
        copies.insert(
            format!("text-{i:03}").into_bytes(),
            Entry::file(1 << 20, Fill::Text(1)),
        );
        copies.insert(
            format!("random-{i:03}").into_bytes(),
            Entry::file(200_000, Fill::Random(2)),
        );
    }
    root.insert(b"copies".to_vec(), Entry::dir(copies));
    root.insert(b"unique".to_vec(), Entry::file(3 << 20, Fill::Random(3)));
    let tmp = ScratchFs::tmpfs("dedupe", 512 * MIB);
    let src = tmp.path().join("src");
    materialize(&src, &Entry::dir(root));
    for (i, extra) in [
        &[][..],
        &["--compress", "zstd"][..],
        &["--nodesize", "4096"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let work = workdir("dedupe");
        let uuid = [
            "0b0d0a0e-0d00-4000-8000-000000000001",
            "0b0d0a0e-0d00-4000-8000-000000000002",
            "0b0d0a0e-0d00-4000-8000-000000000003",
        ][i];
        let mut args = fixed_args(uuid);
        args.extend(extra);
        let plain = work.path().join("plain.img");
        export(&src, &plain, &args);
        args.push("--dedupe");
        let img = work.path().join("dedupe.img");
        export(&src, &img, &args);
        btrfs_check(&img);
        let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
        let data = |args: &[&str]| -> u64 {
            let out = run_stdout(
                Command::new(btrfsimg_bin())
                    .arg("plan")
                    .arg(&src)
                    .args(args),
            );
            out.lines()
                .find_map(|l| l.strip_prefix("file data: "))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .expect("plan prints the file data")
        };
        let (deduped, plain_data) = (data(&args), data(&args[..args.len() - 1]));
        // One copy of each content: at most the unique bytes (less when compressed).
        assert!(
            deduped <= (1 << 20) + 204_800 + (3 << 20),
            "{extra:?}: {deduped}"
        );
        // Exactly 149 copies of the two shared contents are not stored again
        // (the unique file is incompressible: 3 MiB either way).
        let shared = deduped - (3 << 20);
        assert_eq!(
            plain_data - deduped,
            149 * shared,
            "{extra:?}: {plain_data} vs {deduped}"
        );
        assert!(size(&img) < size(&plain), "{extra:?}");
        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::default());
        m.unmount();
        // Rewrite one copy of each, delete another, balance, scrub.
        rw_cycle_rewrite(
            &img,
            &["/copies/text-007", "/copies/text-000", "/copies/random-149"],
        );
        let copy = copy_image(&img, work.path(), "rw.img");
        let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        f.set_len(size(&copy) + 256 * MIB).unwrap();
        drop(f);
        let m = LoopMount::new(&copy, true);
        run_ok(
            Command::new(tool("btrfs"))
                .args(["filesystem", "resize", "max"])
                .arg(m.path()),
        );
        std::fs::remove_file(m.path().join("copies/text-010")).unwrap();
        run_ok(
            Command::new(tool("btrfs"))
                .args(["balance", "start", "--full-balance"])
                .arg(m.path()),
        );
        btrfs_scrub(m.path());
        m.unmount();
        btrfs_check(&copy);
        let m = LoopMount::new(&copy, false);
        for name in [
            "copies/text-011",
            "copies/text-149",
            "copies/random-000",
            "unique",
        ] {
            compare_file_contents(&src.join(name), &m.path().join(name))
                .unwrap_or_else(|e| panic!("{extra:?}: {name}: {e}"));
        }
        assert!(!m.path().join("copies/text-010").exists());
        m.unmount();
    }
}

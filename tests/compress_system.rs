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

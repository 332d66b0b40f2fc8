//! mkfs.btrfs layout options through the real oracles.
//!
//! `-O block-group-tree`: the image passes `btrfs check --check-data-csum`,
//! `dump-super` shows compat_ro BLOCK_GROUP_TREE, tree 11 holds one
//! BLOCK_GROUP_ITEM per chunk of the chunk tree and the extent tree none
//! (also at 4 KiB nodes), the mounted image equals its source, a read-write
//! cycle (grow, writes, full balance, scrub, check) leaves every block group
//! of the grown filesystem in tree 11, the export is reproducible and
//! `btrfsimg mount` serves the same bytes.
//!
//! `--inode-flags`: check clean; `lsattr` shows C on the nodatacow
//! directory, everything below it and a hard link named elsewhere, not on a
//! subvolume inside it nor on other files; INODE_ITEM flags as the kernel
//! sets them; the csum tree covers exactly the extents of files with
//! checksums; with `--compress zstd` those files are stored uncompressed
//! (the rest compressed); on a read-write mount with `compress-force=zstd`
//! a nodatacow file is overwritten in place, files without checksums get no
//! checksums and no compression for their new data, a file created in the
//! nodatacow directory inherits its flags; the rewrite cycle with scrub is
//! clean; FUSE serves the export's bytes. Needs root, loop devices,
//! btrfs-progs, lsattr (e2fsprogs) and FUSE.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

fn bgt_source(root: &Path) {
    let mut t = TreeBuilder::new(root);
    t.file(b"empty", b"")
        .file(b"tiny", b"x")
        .random_file(b"inline-2048", 2048, 1)
        .random_file(b"odd-1000001", 1_000_001, 2)
        .random_file(b"big/ten-mib", 10 * MIB, 3)
        .file(
            b"text",
            &b"block groups in a tree of their own\n".repeat(30_000),
        )
        .sparse_file(
            b"sparse",
            32 * MIB,
            &[
                (0, &random_bytes(10_000, 4)),
                (20 * MIB, &random_bytes(70_000, 5)),
            ],
        )
        .hardlink(b"odd-1000001", b"links/second-name")
        .symlink(b"links/to-big", b"../big/ten-mib")
        .xattr(b"tiny", b"user.note", b"bgt");
    for i in 0..300u64 {
        t.random_file(format!("many/f{i:03}").as_bytes(), 500 + i * 37, 100 + i);
    }
    t.finalize();
}

/// (start, length) of every chunk, from the chunk tree.
fn chunks(img: &Path) -> Vec<(u64, u64)> {
    dump_tree(img, "chunk")
        .iter()
        .filter(|i| i.ty == "CHUNK_ITEM")
        .map(|i| {
            let len = i.field("length").expect("a chunk item has a length");
            (i.offset_u64(), len)
        })
        .collect()
}

/// (start, length) of the BLOCK_GROUP_ITEMs of one tree.
fn block_groups(img: &Path, tree: &str) -> Vec<(u64, u64)> {
    dump_tree(img, tree)
        .iter()
        .filter(|i| i.ty == "BLOCK_GROUP_ITEM")
        .map(|i| {
            let start = i.ino().expect("a block group item's objectid is its start");
            (start, i.offset_u64())
        })
        .collect()
}

/// Tree blocks of one tree (`dump-tree -t TREE` prints each with its owner),
/// and the bytes of all of them.
fn tree_blocks(img: &Path, tree: &str) -> (Vec<u64>, u64) {
    let dump = run_stdout(
        Command::new(tool("btrfs"))
            .args(["inspect-internal", "dump-tree", "-t", tree])
            .arg(img),
    );
    let blocks: Vec<u64> = dump
        .lines()
        .filter(|l| l.starts_with("leaf ") || l.starts_with("node "))
        .filter(|l| l.contains(" owner "))
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|b| b.parse().ok())
                .expect("a block's address")
        })
        .collect();
    let nodesize: u64 = super_field(&dump_super(img), "nodesize")
        .and_then(|v| v.parse().ok())
        .expect("dump-super prints the node size");
    let bytes = blocks.len() as u64 * nodesize;
    (blocks, bytes)
}

/// Every block group in tree 11 and none in the extent tree; every block of
/// tree 11 has its METADATA_ITEM with a TREE_BLOCK_REF to tree 11.
fn check_block_group_tree(img: &Path) {
    let sup = dump_super(img);
    let ro = super_field(&sup, "compat_ro_flags").expect("dump-super prints compat_ro_flags");
    assert!(ro.starts_with("0xb"), "compat_ro {ro}:\n{sup}");
    assert!(sup.contains("BLOCK_GROUP_TREE"), "{sup}");
    let want = chunks(img);
    assert_eq!(
        block_groups(img, "11"),
        want,
        "tree 11 holds every block group"
    );
    assert_eq!(
        block_groups(img, "extent"),
        vec![],
        "the extent tree holds none"
    );
    let extent = dump_tree(img, "extent");
    let (blocks, bytes) = tree_blocks(img, "11");
    assert!(!blocks.is_empty());
    // Its ROOT_ITEM, as mkfs.btrfs 6.14 writes it: like the other internal
    // trees' (no directory, one ref, no UUID).
    let roots = dump_tree(img, "root");
    let root = roots
        .iter()
        .find(|i| i.ty == "ROOT_ITEM" && (i.objectid == "BLOCK_GROUP_TREE" || i.objectid == "11"))
        .expect("tree 11 has a ROOT_ITEM");
    assert_eq!(root.offset, "0");
    assert_eq!(root.itemsize, 439);
    assert_eq!(root.field("root_dirid"), Some(0), "{:?}", root.body);
    assert_eq!(root.field("refs"), Some(1), "{:?}", root.body);
    assert_eq!(root.field("bytes_used"), Some(bytes), "{:?}", root.body);
    assert!(blocks.contains(&root.field("bytenr").expect("bytenr")));
    assert!(
        root.body
            .iter()
            .any(|l| l == "uuid 00000000-0000-0000-0000-000000000000"),
        "{:?}",
        root.body
    );
    for b in blocks {
        let item = extent
            .iter()
            .find(|i| i.ty == "METADATA_ITEM" && i.ino() == Some(b))
            .unwrap_or_else(|| panic!("no METADATA_ITEM for block {b} of tree 11"));
        assert!(
            item.body
                .iter()
                .any(|l| l.contains("tree block backref root BLOCK_GROUP_TREE")),
            "block {b}: {:?}",
            item.body
        );
    }
}

#[test]
fn block_group_tree_images() {
    let what = "block_group_tree_images";
    if !system_tests_available(what) || !fuse_available(what) {
        return;
    }
    let tmp = ScratchFs::tmpfs("bgt", 128 * MIB);
    let src = tmp.path().join("src");
    bgt_source(&src);
    let work = workdir("bgt");
    let plain_args = fixed_args("0b0d0a0e-0f00-4000-8000-000000000001");
    let mut args = plain_args.clone();
    args.extend(["-O", "block-group-tree"]);

    let img = work.path().join("bgt.img");
    let start = std::time::Instant::now();
    export(&src, &img, &args);
    let secs = start.elapsed().as_secs_f64();
    btrfs_check(&img);
    check_block_group_tree(&img);

    // Without it: the same files, block groups in the extent tree.
    let plain = work.path().join("plain.img");
    export(&src, &plain, &plain_args);
    assert_eq!(block_groups(&plain, "extent"), chunks(&plain));
    let sup = dump_super(&plain);
    assert!(!sup.contains("BLOCK_GROUP_TREE"), "{sup}");
    // The data extents' items are the same; only the block groups moved.
    let data_items = |img: &Path| -> Vec<String> {
        dump_tree(img, "extent")
            .into_iter()
            .filter(|i| !matches!(i.ty.as_str(), "METADATA_ITEM" | "BLOCK_GROUP_ITEM"))
            .map(|i| format!("{} {} {} {:?}", i.objectid, i.ty, i.offset, i.body))
            .collect()
    };
    assert_eq!(data_items(&img), data_items(&plain));
    let items = |img: &Path| dump_tree(img, "extent").len();
    let (with, without) = (items(&img), items(&plain));
    let (_, with_bytes) = tree_blocks(&img, "extent");
    let (_, without_bytes) = tree_blocks(&plain, "extent");
    say(&format!(
        "block-group tree: extent tree {with} items in {with_bytes} bytes \
         (without: {without} items in {without_bytes} bytes), export {secs:.2} s"
    ));

    let m = LoopMount::new(&img, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();
    assert_export_matches(&src, &img, &args);
    let f = FuseMount::start(&src, &work.path().join("mnt"), &args);
    assert_files_identical(&img, &f.img());
    assert!(f.stop(libc::SIGTERM).success());

    // Grown, written, fully balanced and scrubbed by the kernel: the new
    // chunks' block groups go to tree 11 too.
    let rw = rw_cycle_rewrite_in(
        &img,
        &["/text", "/odd-1000001", "/big/ten-mib", "/many/f007"],
        work.path(),
    );
    check_block_group_tree(&rw);
    assert!(
        chunks(&rw) != chunks(&img),
        "the balance should have moved every chunk"
    );

    // 4 KiB nodes, single metadata.
    let small = work.path().join("4k.img");
    let mut small_args = args.clone();
    small_args.extend(["--nodesize", "4096", "--metadata", "single"]);
    export(&src, &small, &small_args);
    btrfs_check(&small);
    check_block_group_tree(&small);
    let m = LoopMount::new(&small, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();
}

// ---------------------------------------------------------------------------
// --inode-flags
// ---------------------------------------------------------------------------

const NODATASUM: u64 = 0x1;
const NODATACOW: u64 = 0x2;
const COMPRESS: u64 = 0x800;

fn flags_source(root: &Path) {
    let text = |n: usize| b"no copy-on-write, no checksums\n".repeat(n);
    let mut t = TreeBuilder::new(root);
    t.random_file(b"db/big", 3 * MIB, 1)
        .file(b"db/text", &text(60_000))
        .file(b"db/small", b"inline in a nodatacow directory\n")
        .file(b"db/sub/inner", &text(4000))
        .file(b"db/sub/text-copy", &text(60_000))
        .random_file(b"db/sv/file", 200_000, 2)
        .file(b"sums/file", &text(40_000))
        .file(b"sums/other", &text(40_000))
        .file(b"plain/text", &text(60_000))
        .random_file(b"plain/random", MIB, 3)
        .hardlink(b"db/big", b"plain/big-link")
        .symlink(b"plain/to-db", b"../db");
    t.finalize();
}

/// Whether `lsattr` shows C (NODATACOW) on `p` (a directory itself with -d).
fn has_c(p: &Path) -> bool {
    let out = run_stdout(Command::new(tool("lsattr")).arg("-d").arg(p));
    out.split_whitespace()
        .next()
        .is_some_and(|flags| flags.contains('C'))
}

/// INODE_ITEM flags of every inode of one fs tree.
fn inode_flags(img: &Path, tree: &str) -> BTreeMap<u64, u64> {
    dump_tree(img, tree)
        .iter()
        .filter(|i| i.ty == "INODE_ITEM")
        .map(|i| {
            let flags = i
                .body
                .iter()
                .flat_map(|l| {
                    let t: Vec<&str> = l.split_whitespace().collect();
                    t.windows(2)
                        .filter(|w| w[0] == "flags")
                        .filter_map(|w| w[1].split('(').next())
                        .filter_map(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
                        .collect::<Vec<_>>()
                })
                .next()
                .expect("an inode item has flags");
            (i.ino().expect("an inode number"), flags)
        })
        .collect()
}

/// One regular extent of a file: (disk bytenr, disk bytes, compression).
type Ext = (u64, u64, u64);

/// The regular (non-hole, non-inline) extents of every inode of one tree.
fn file_extents(img: &Path, tree: &str) -> BTreeMap<u64, Vec<Ext>> {
    let mut out: BTreeMap<u64, Vec<Ext>> = BTreeMap::new();
    for i in dump_tree(img, tree)
        .iter()
        .filter(|i| i.ty == "EXTENT_DATA")
    {
        let Some(bytenr) = i.field("byte") else {
            continue; // inline
        };
        if bytenr == 0 {
            continue; // a hole
        }
        let nr = i.fields("nr");
        let compression = i.field("compression").expect("extent compression");
        out.entry(i.ino().expect("an inode number"))
            .or_default()
            .push((bytenr, nr[0], compression));
    }
    out
}

/// The data ranges the csum tree covers, merged.
fn csum_ranges(img: &Path) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = dump_tree(img, "csum")
        .iter()
        .filter(|i| i.ty == "EXTENT_CSUM")
        .map(|i| (i.offset_u64(), i.offset_u64() + i.itemsize / 4 * 4096))
        .collect();
    v.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match merged.last_mut() {
            Some(l) if l.1 >= a => l.1 = l.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

fn overlaps(ranges: &[(u64, u64)], start: u64, len: u64) -> bool {
    ranges.iter().any(|&(a, b)| a < start + len && start < b)
}

fn covered(ranges: &[(u64, u64)], start: u64, len: u64) -> bool {
    ranges.iter().any(|&(a, b)| a <= start && start + len <= b)
}

/// Checks flags and checksums of the files at `paths` (relative, in the top
/// level) of the mounted `mnt` against `img`'s fs tree: `want(path)` gives
/// the INODE_ITEM flags expected; files with NODATASUM have no checksums
/// and no compressed extents, the others are fully checksummed.
fn check_files(img: &Path, mnt: &Path, paths: &[&str], want: impl Fn(&str) -> u64) {
    let flags = inode_flags(img, "5");
    let extents = file_extents(img, "5");
    let csums = csum_ranges(img);
    for p in paths {
        let ino = std::fs::symlink_metadata(mnt.join(p)).unwrap().ino();
        let f = flags[&ino];
        assert_eq!(f & (NODATASUM | NODATACOW), want(p), "{p}: flags {f:#x}");
        for &(bytenr, len, compression) in extents.get(&ino).into_iter().flatten() {
            if f & NODATASUM != 0 {
                assert!(
                    !overlaps(&csums, bytenr, len),
                    "{p}: extent {bytenr} has csums"
                );
                assert_eq!(compression, 0, "{p}: extent {bytenr} is compressed");
                assert_eq!(f & COMPRESS, 0, "{p}: flags {f:#x}");
            } else {
                assert!(
                    covered(&csums, bytenr, len),
                    "{p}: extent {bytenr} lacks csums"
                );
            }
        }
    }
}

#[test]
fn inode_flags_images() {
    let what = "inode_flags_images";
    if !system_tests_available(what) || !fuse_available(what) || !tools_available(what, &["lsattr"])
    {
        return;
    }
    let tmp = ScratchFs::tmpfs("inode-flags", 64 * MIB);
    let src = tmp.path().join("src");
    flags_source(&src);
    let work = workdir("inode-flags");
    let flag_args = [
        "--inode-flags",
        "nodatacow:db",
        "--inode-flags",
        "nodatasum:/sums/file",
    ];
    let both = NODATACOW | NODATASUM;
    let files = [
        "db/big",
        "db/text",
        "db/small",
        "db/sub/inner",
        "db/sub/text-copy",
        "sums/file",
        "sums/other",
        "plain/text",
        "plain/random",
        "plain/big-link",
    ];

    // Uncompressed, with a subvolume inside the nodatacow directory.
    let mut args = fixed_args("0b0d0a0e-0f00-4000-8000-000000000002");
    args.extend(flag_args);
    args.extend(["--subvol", "db/sv"]);
    let img = work.path().join("flags.img");
    export(&src, &img, &args);
    btrfs_check(&img);
    let m = LoopMount::new(&img, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    for (p, c) in [
        ("db", true),
        ("db/big", true),
        ("db/text", true),
        ("db/small", true),
        ("db/sub", true),
        ("db/sub/inner", true),
        ("plain/big-link", true),
        ("db/sv", false),
        ("db/sv/file", false),
        ("sums/file", false),
        ("plain", false),
        ("plain/text", false),
        ("", false),
    ] {
        assert_eq!(has_c(&m.path().join(p)), c, "lsattr C on /{p}");
    }
    let expect = |p: &str| match p {
        "sums/file" => NODATASUM,
        p if p.starts_with("db/") || p == "plain/big-link" => both,
        _ => 0,
    };
    check_files(&img, m.path(), &files, expect);
    // The directories themselves: NODATACOW only, as the kernel sets it.
    let flags = inode_flags(&img, "5");
    for d in ["db", "db/sub"] {
        let ino = std::fs::metadata(m.path().join(d)).unwrap().ino();
        assert_eq!(flags[&ino], NODATACOW, "/{d}");
    }
    m.unmount();
    let sv = inode_flags(&img, "256");
    assert!(sv.values().all(|&f| f == 0), "subvolume db/sv: {sv:?}");

    // --compress zstd: files without checksums stay uncompressed.
    let mut zargs = fixed_args("0b0d0a0e-0f00-4000-8000-000000000003");
    zargs.extend(flag_args);
    zargs.extend(["--compress", "zstd"]);
    let z = work.path().join("zstd.img");
    export(&src, &z, &zargs);
    btrfs_check(&z);
    let m = LoopMount::new(&z, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    check_files(&z, m.path(), &files, expect);
    let extents = file_extents(&z, "5");
    let ino = |p: &str| std::fs::metadata(m.path().join(p)).unwrap().ino();
    for p in ["sums/other", "plain/text"] {
        assert!(
            extents[&ino(p)].iter().all(|e| e.2 == 3),
            "{p} is stored with zstd: {:?}",
            extents[&ino(p)]
        );
    }
    for p in ["db/text", "sums/file", "db/sv/file"] {
        assert!(extents[&ino(p)].iter().all(|e| e.2 == 0), "{p}");
    }
    m.unmount();
    let f = FuseMount::start(&src, &work.path().join("mnt"), &zargs);
    assert_files_identical(&z, &f.img());
    assert!(f.stop(libc::SIGTERM).success());

    // --dedupe: equal files share extents only when both have checksums
    // or both have none (the kernel reflinks no others).
    let mut dargs = fixed_args("0b0d0a0e-0f00-4000-8000-000000000004");
    dargs.extend(flag_args);
    dargs.push("--dedupe");
    let d = work.path().join("dedupe.img");
    export(&src, &d, &dargs);
    btrfs_check(&d);
    let m = LoopMount::new(&d, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    check_files(&d, m.path(), &files, expect);
    let extents = file_extents(&d, "5");
    let ino = |p: &str| std::fs::metadata(m.path().join(p)).unwrap().ino();
    assert_eq!(extents[&ino("db/text")], extents[&ino("db/sub/text-copy")]);
    assert_ne!(extents[&ino("db/text")], extents[&ino("plain/text")]);
    assert_ne!(extents[&ino("sums/file")], extents[&ino("sums/other")]);
    m.unmount();

    // What the kernel does with them: a grown copy mounted with
    // compress-force=zstd.
    let copy = copy_image(&z, work.path(), "kernel.img");
    let file = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    file.set_len(file.metadata().unwrap().len() + 256 * MIB)
        .unwrap();
    drop(file);
    let before = file_extents(&copy, "5");
    let m = LoopMount::with_options(&copy, "loop,compress-force=zstd");
    run_ok(
        Command::new(tool("btrfs"))
            .args(["filesystem", "resize", "max"])
            .arg(m.path()),
    );
    let patch = random_bytes(64 * 1024, 9);
    let text = b"written by the kernel, compressible\n".repeat(20_000);
    {
        use std::os::unix::fs::FileExt;
        // Overwrite in place (nodatacow), rewrite (nodatasum), append.
        let big = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path().join("db/big"))
            .unwrap();
        big.write_all_at(&patch, MIB).unwrap();
        big.sync_all().unwrap();
        for p in ["sums/file", "plain/text"] {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(m.path().join(p))
                .unwrap();
            f.write_all_at(&text, 4096).unwrap();
            f.sync_all().unwrap();
        }
        std::fs::write(m.path().join("db/new"), &text).unwrap();
    }
    assert!(has_c(&m.path().join("db/new")), "a new file inherits C");
    unsafe { libc::sync() };
    let ino = |p: &str| std::fs::metadata(m.path().join(p)).unwrap().ino();
    let (big, new, plain_text) = (ino("db/big"), ino("db/new"), ino("plain/text"));
    m.unmount();
    btrfs_check(&copy);
    let after = file_extents(&copy, "5");
    assert_eq!(after[&big], before[&big], "db/big was overwritten in place");
    let m = LoopMount::new(&copy, false);
    check_files(
        &copy,
        m.path(),
        &["db/big", "db/new", "sums/file"],
        |p| match p {
            "sums/file" => NODATASUM,
            _ => both,
        },
    );
    assert!(
        after[&plain_text].iter().any(|e| e.2 == 3) && after[&plain_text] != before[&plain_text],
        "plain/text's new data is compressed: {:?}",
        after[&plain_text]
    );
    assert!(
        after[&new].iter().all(|e| e.2 == 0),
        "db/new: {:?}",
        after[&new]
    );
    let mut want = std::fs::read(src.join("db/big")).unwrap();
    want[MIB as usize..MIB as usize + patch.len()].copy_from_slice(&patch);
    assert!(std::fs::read(m.path().join("db/big")).unwrap() == want);
    m.unmount();

    // Writes into, appends to and deletes them, full balance, scrub, check.
    rw_cycle_rewrite(
        &img,
        &[
            "/db/text",
            "/db/big",
            "/sums/file",
            "/plain/text",
            "/db/sv/file",
        ],
    );
}

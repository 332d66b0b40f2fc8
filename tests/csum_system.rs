//! `--csum crc32c|xxhash|sha256|blake2` through the real oracles. For each
//! algorithm a varied tree (empty, inline and boundary-sized files, a file
//! of two extents, compressible text, a sparse file, hard links, a symlink,
//! xattrs, 200 small files) is exported at 16 KiB nodes, at 4 KiB nodes
//! (more than one csum leaf) and with `--compress zstd` (whose data region
//! the content pass writes itself); each image passes `btrfs check
//! --check-data-csum`, shows the algorithm in `dump-super`, holds exactly
//! one checksum of its size per data sector in csum items of the kernel's
//! size, and is loop-mounted and compared entry by entry with the source;
//! the 16 KiB image goes through a read-write cycle (writes, deletes,
//! `btrfs scrub`). For sha256, `btrfsimg mount` serves the export's bytes,
//! plain and compressed. Needs root, loop devices, btrfs-progs, the
//! kernel's hash for each algorithm (modprobe'd when it is not loaded) and
//! FUSE.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// The algorithm as the kernel's crypto API names it (what btrfs asks for).
fn kernel_hash(csum: &str) -> &'static str {
    match csum {
        "crc32c" => "crc32c",
        "xxhash" => "xxhash64",
        "sha256" => "sha256",
        "blake2" => "blake2b-256",
        _ => unreachable!("not a --csum name: {csum}"),
    }
}

fn kernel_has_hash(name: &str) -> bool {
    std::fs::read_to_string("/proc/crypto")
        .map(|s| {
            s.lines().any(|l| {
                l.strip_prefix("name")
                    .and_then(|r| r.trim_start().strip_prefix(':'))
                    .is_some_and(|n| n.trim() == name)
            })
        })
        .unwrap_or(false)
}

/// True when the kernel can compute `csum`: already registered, or loaded
/// now with `modprobe crypto-NAME` (every crypto module has that alias).
/// Otherwise skips loudly (or fails under BTRFSIMG_REQUIRE_SYSTEM_TESTS=1).
fn kernel_hash_available(what: &str, csum: &str) -> bool {
    let name = kernel_hash(csum);
    if kernel_has_hash(name) {
        return true;
    }
    if !tools_available(what, &["modprobe"]) {
        return false;
    }
    let _ = run(Command::new(tool("modprobe")).arg(format!("crypto-{name}")));
    kernel_has_hash(name)
        || skip_or_panic(
            what,
            &format!("the kernel has no {name} (modprobe crypto-{name} did not load it)"),
        )
}

fn source(root: &Path) {
    let mut t = TreeBuilder::new(root);
    t.file(b"empty", b"")
        .file(b"tiny", b"x")
        .random_file(b"inline-2048", 2048, 1)
        .random_file(b"extent-2049", 2049, 2)
        .random_file(b"sector-4096", 4096, 3)
        .random_file(b"odd-1000001", 1_000_001, 4)
        .file(
            b"text",
            &b"compressible text, checksummed once\n".repeat(60_000),
        )
        // More than 128 MiB: two extents, and several csum items of every size.
        .random_file(b"big/two-extents", 130 * MIB, 5)
        .sparse_file(
            b"sparse",
            64 * MIB,
            &[
                (0, &random_bytes(10_000, 6)),
                (5 * MIB + 123, &random_bytes(300_000, 7)),
                (64 * MIB - 3000, &random_bytes(3000, 8)),
            ],
        )
        .hardlink(b"odd-1000001", b"links/second-name")
        .hardlink(b"tiny", b"links/tiny-too")
        .symlink(b"links/to-big", b"../big/two-extents")
        .xattr(b"odd-1000001", b"user.note", b"checksummed")
        .xattr(b"big", b"user.dir", &random_bytes(3000, 9))
        .xattr(b"tiny", b"trusted.t", b"");
    for i in 0..200u64 {
        t.random_file(format!("many/f{i:03}").as_bytes(), 1000 + i * 97, 100 + i);
    }
    t.finalize();
}

/// The file data the plan stores (bytes in data extents).
fn planned_data(src: &Path, args: &[&str]) -> u64 {
    let out = run_stdout(Command::new(btrfsimg_bin()).arg("plan").arg(src).args(args));
    out.lines()
        .find_map(|l| l.strip_prefix("file data: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("plan prints the file data")
}

/// What the kernel puts in one csum item (MAX_CSUM_ITEMS).
fn max_csums(nodesize: u64, size: u64) -> u64 {
    (nodesize - 101 - 2 * 25) / size - 1
}

/// Checks the superblock and the csum tree of `img`: the algorithm's code
/// and size, one checksum per data sector, items as large as the kernel
/// makes them; returns the number of csum leaves and the csum tree's bytes.
fn check_csums(img: &Path, csum: &str, data: u64, nodesize: u64) -> (usize, u64) {
    let (code, size) = match csum {
        "crc32c" => (0, 4),
        "xxhash" => (1, 8),
        "sha256" => (2, 32),
        _ => (3, 32),
    };
    let sup = dump_super(img);
    let ty = super_field(&sup, "csum_type").expect("dump-super prints csum_type");
    assert!(
        ty.starts_with(&format!("{code} (")) && ty.contains(csum),
        "{csum}: csum_type {ty}"
    );
    assert_eq!(
        super_field(&sup, "csum_size").as_deref(),
        Some(size.to_string().as_str()),
        "{csum}"
    );
    assert!(
        super_field(&sup, "csum").is_some_and(|c| c.ends_with("[match]")),
        "{csum}: superblock checksum:\n{sup}"
    );
    let items: Vec<DumpItem> = dump_tree(img, "csum")
        .into_iter()
        .filter(|i| i.ty == "EXTENT_CSUM")
        .collect();
    let bytes: u64 = items.iter().map(|i| i.itemsize).sum();
    assert_eq!(bytes, data / 4096 * size, "{csum}: one checksum per sector");
    let max = max_csums(nodesize, size) * size;
    assert!(items
        .iter()
        .all(|i| i.itemsize % size == 0 && i.itemsize <= max));
    assert_eq!(
        items.iter().map(|i| i.itemsize).max(),
        Some(max),
        "{csum}: full csum items hold the kernel's count at {nodesize}-byte nodes"
    );
    let dump = run_stdout(
        Command::new(tool("btrfs"))
            .args(["inspect-internal", "dump-tree", "-t", "csum"])
            .arg(img),
    );
    let leaves = dump.lines().filter(|l| l.starts_with("leaf ")).count();
    let nodes = dump.lines().filter(|l| l.starts_with("node ")).count();
    (leaves, (leaves + nodes) as u64 * nodesize)
}

fn image_with(csum: &str, uuid: &'static str) {
    let what = format!("csum_{csum}_images");
    if !system_tests_available(&what) || !kernel_hash_available(&what, csum) {
        return;
    }
    let fuse = csum == "sha256";
    if fuse && !fuse_available(&what) {
        return;
    }
    let tmp = ScratchFs::tmpfs(&format!("csum-{csum}"), 300 * MIB);
    let src = tmp.path().join("src");
    source(&src);
    let work = workdir(&format!("csum-{csum}"));
    let mut args = fixed_args(uuid);
    args.extend(["--csum", csum]);

    // 16 KiB nodes: check, superblock, csum items, mounted compare, rw cycle.
    let img = work.path().join("16k.img");
    export(&src, &img, &args);
    btrfs_check(&img);
    let data = planned_data(&src, &args);
    assert!(data > 130 * MIB, "{csum}: {data} bytes of data");
    let (_, tree_bytes) = check_csums(&img, csum, data, 16384);
    say(&format!(
        "csum {csum}: {data} bytes of data, csum tree {tree_bytes} bytes at 16 KiB nodes"
    ));
    let m = LoopMount::new(&img, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();
    rw_cycle(&img);
    if fuse {
        let f = FuseMount::start(&src, &work.path().join("mnt"), &args);
        assert_files_identical(&img, &f.img());
        assert!(f.stop(libc::SIGTERM).success());
    }

    // 4 KiB nodes: more than one csum leaf.
    let small = work.path().join("4k.img");
    let mut small_args = args.clone();
    small_args.extend(["--nodesize", "4096"]);
    export(&src, &small, &small_args);
    btrfs_check(&small);
    let (leaves, _) = check_csums(&small, csum, data, 4096);
    assert!(leaves > 1, "{csum}: {leaves} csum leaves at 4 KiB nodes");
    let m = LoopMount::new(&small, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();

    // --compress zstd: the content pass writes the data region and its
    // checksums; FUSE makes the same bytes from kept and remade payloads.
    let z = work.path().join("zstd.img");
    let mut z_args = args.clone();
    z_args.extend(["--compress", "zstd"]);
    export(&src, &z, &z_args);
    btrfs_check(&z);
    check_csums(&z, csum, planned_data(&src, &z_args), 16384);
    let m = LoopMount::new(&z, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();
    if fuse {
        let f = FuseMount::start(&src, &work.path().join("mnt-zstd"), &z_args);
        assert_files_identical(&z, &f.img());
        assert!(f.stop(libc::SIGTERM).success());
    }
}

#[test]
fn csum_crc32c_images() {
    image_with("crc32c", "0b0d0a0e-0e00-4000-8000-000000000001");
}

#[test]
fn csum_xxhash_images() {
    image_with("xxhash", "0b0d0a0e-0e00-4000-8000-000000000002");
}

#[test]
fn csum_sha256_images() {
    image_with("sha256", "0b0d0a0e-0e00-4000-8000-000000000003");
}

#[test]
fn csum_blake2_images() {
    image_with("blake2", "0b0d0a0e-0e00-4000-8000-000000000004");
}

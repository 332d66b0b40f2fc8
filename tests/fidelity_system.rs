//! Fidelity system tests: every kind of entry a Linux tree can hold goes
//! through `btrfsimg export` and a kernel mount unchanged (hard links,
//! extended attributes, special files, holes, times, scale edges), checked
//! with dump-tree where a mount cannot show it, plus the comparisons with
//! `mkfs.btrfs --rootdir` behind the README's table.
//! Needs root, loop devices and btrfs-progs (see tests/common/mod.rs).

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Leaf item limit for 16 KiB nodes (nodesize - header - item header).
const MAX_ITEM: usize = 16384 - 101 - 25;
/// The largest xattr name + value one XATTR_ITEM holds (MAX_ITEM - dir item header).
const MAX_XATTR: usize = MAX_ITEM - 30;
/// Two xattr names with the same btrfs name hash (checked by a unit test).
const XATTR_COLLISION: [&[u8]; 2] = [b"user.c1371838", b"user.c2000402"];
/// Two file names with the same btrfs name hash.
const NAME_COLLISION: [&[u8]; 2] = [b"zkeigdqd", b"rmjmtlgc"];

fn ino_of(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .ino()
}

/// Items of one inode, in key order.
fn items_of(items: &[DumpItem], ino: u64) -> Vec<&DumpItem> {
    items.iter().filter(|i| i.ino() == Some(ino)).collect()
}

/// The names recorded in INODE_REF / INODE_EXTREF bodies.
fn ref_names(item: &DumpItem) -> Vec<String> {
    item.body
        .iter()
        .filter_map(|l| l.split_once("name: ").map(|(_, n)| n.to_string()))
        .collect()
}

fn all_xattrs_and_dirs_have_transid(items: &[DumpItem], gen: u64) {
    let mut seen = 0;
    for it in items {
        if matches!(it.ty.as_str(), "DIR_ITEM" | "DIR_INDEX" | "XATTR_ITEM") {
            let t = it.fields("transid");
            assert!(!t.is_empty(), "no transid in {it:?}");
            assert!(
                t.iter().all(|&x| x == gen),
                "transid {t:?} != generation {gen} in {it:?}"
            );
            seen += 1;
        }
    }
    assert!(seen > 0, "no DIR_ITEM/DIR_INDEX/XATTR_ITEM found");
}

// ---------------------------------------------------------------------------
// 1. Hard links
// ---------------------------------------------------------------------------

const MANY: usize = 320;

fn many_name(i: usize) -> Vec<u8> {
    format!("many/{i:03}-{}", "x".repeat(160)).into_bytes()
}

#[test]
fn hard_links() {
    if !system_tests_available("hard_links") || skip_in_mkfs_mode("hard_links") {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000001");
    let work = workdir("hardlinks");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    // Within one directory and across directories.
    t.random_file(b"a/file", 10_000, 1);
    t.hardlink(b"a/file", b"a/same-dir");
    t.hardlink(b"a/file", b"b/other-dir");
    t.hardlink(b"a/file", b"b/c/deeper");
    t.hardlink(b"a/file", b"top");
    t.xattr(b"a/file", b"user.shared", b"one inode");
    // Inline-sized files (and empty ones) with links; 2049 bytes is not inline.
    t.file(b"inline/tiny", b"tiny\n");
    t.hardlink(b"inline/tiny", b"inline/tiny-2");
    t.hardlink(b"inline/tiny", b"b/tiny-3");
    t.random_file(b"inline/max", 2048, 2);
    t.hardlink(b"inline/max", b"a/max-2");
    t.random_file(b"inline/over", 2049, 3);
    t.hardlink(b"inline/over", b"a/over-2");
    t.file(b"inline/empty", b"");
    t.hardlink(b"inline/empty", b"inline/empty-2");
    t.hardlink(b"inline/empty", b"b/empty-3");
    // A sparse file with links.
    t.sparse_file(b"sparse", 8 * MIB, &[(4 * MIB, b"middle")]);
    t.hardlink(b"sparse", b"b/sparse-2");
    // Other kinds have hard links too.
    t.symlink(b"kinds/sym", b"../a/file");
    t.hardlink(b"kinds/sym", b"kinds/sym-2");
    t.fifo(b"kinds/fifo");
    t.hardlink(b"kinds/fifo", b"b/fifo-2");
    t.char_dev(b"kinds/dev", 259, 70_000);
    t.hardlink(b"kinds/dev", b"kinds/dev-2");
    t.socket(b"kinds/sock");
    t.hardlink(b"kinds/sock", b"kinds/sock-2");
    // One inode with 320 names of 164 bytes in one directory and 3 of 202
    // bytes in another: one INODE_REF item per parent cannot hold them all,
    // the rest must be INODE_EXTREF items.
    t.file(b"many/orig", b"one inode, many names\n");
    for i in 0..MANY {
        t.hardlink(b"many/orig", &many_name(i));
    }
    for i in 0..3 {
        t.hardlink(
            b"many/orig",
            format!("many2/{i}-{}", "y".repeat(200)).as_bytes(),
        );
    }
    t.chmod(b"many/orig", 0o640).chown(b"many/orig", 1000, 100);
    t.finalize();
    let total_names = 1 + MANY + 3;

    let img = work.path().join("links.img");
    export(&src, &img, &args);
    btrfs_check(&img);
    let (many_ino, many_dir, many2_dir) = {
        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::default());
        let ino = ino_of(&m.path().join("many/orig"));
        assert_eq!(
            fs::symlink_metadata(m.path().join("many/orig"))
                .unwrap()
                .nlink(),
            total_names as u64
        );
        let dirs = (
            ino_of(&m.path().join("many")),
            ino_of(&m.path().join("many2")),
        );
        m.unmount();
        (ino, dirs.0, dirs.1)
    };

    // dump-tree: one INODE_REF per parent directory, the overflow in
    // INODE_EXTREF items, every name exactly once.
    let items = dump_tree(&img, "fs");
    let mine = items_of(&items, many_ino);
    let inode = mine.iter().find(|i| i.ty == "INODE_ITEM").unwrap();
    assert_eq!(inode.field("links"), Some(total_names as u64));
    let refs: Vec<&&DumpItem> = mine.iter().filter(|i| i.ty == "INODE_REF").collect();
    let extrefs: Vec<&&DumpItem> = mine.iter().filter(|i| i.ty == "INODE_EXTREF").collect();
    let ref_parents: Vec<u64> = refs.iter().map(|i| i.offset_u64()).collect();
    assert_eq!(ref_parents, vec![many_dir, many2_dir], "INODE_REF keys");
    assert!(
        !extrefs.is_empty(),
        "no INODE_EXTREF items for the 324-name inode"
    );
    for e in &extrefs {
        assert!(
            e.fields("parent").iter().all(|&p| p == many_dir),
            "EXTREF with wrong parent: {e:?}"
        );
    }
    assert!(
        refs.iter().all(|r| r.itemsize as usize <= MAX_ITEM),
        "oversized INODE_REF"
    );
    let mut names: Vec<String> = refs
        .iter()
        .chain(extrefs.iter())
        .flat_map(|i| ref_names(i))
        .collect();
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(
        (n, names.len()),
        (total_names, total_names),
        "names in refs"
    );
    eprintln!(
        "hard_links: 324-name inode has {} INODE_REF items ({} names in the first) and {} INODE_EXTREF items",
        refs.len(),
        ref_names(refs[0]).len(),
        extrefs.len()
    );
    all_xattrs_and_dirs_have_transid(&items, 1);

    // The kernel can edit such an inode: unlink names held in INODE_REF and
    // in INODE_EXTREF, add links, then btrfs check and read back.
    let rw = work.path().join("rw.img");
    fs::copy(&img, &rw).unwrap();
    let removed: Vec<Vec<u8>> = vec![
        b"many/orig".to_vec(),
        many_name(0),
        many_name(150),
        many_name(MANY - 1),
        format!("many2/1-{}", "y".repeat(200)).into_bytes(),
    ];
    let added: [&[u8]; 2] = [b"many/new-link", b"a/new-link"];
    let anchor = many_name(7);
    {
        let m = LoopMount::new(&rw, true);
        let at = |r: &[u8]| m.path().join(std::str::from_utf8(r).unwrap());
        for r in &removed {
            fs::remove_file(at(r)).unwrap_or_else(|e| panic!("unlink {}: {e}", show(r)));
        }
        for a in added {
            fs::hard_link(at(&anchor), at(a)).unwrap();
        }
        unsafe { libc::sync() };
        m.unmount();
    }
    btrfs_check(&rw);
    let m = LoopMount::new(&rw, false);
    let at = |r: &[u8]| m.path().join(std::str::from_utf8(r).unwrap());
    let want = (total_names - removed.len() + added.len()) as u64;
    for r in &removed {
        assert!(fs::symlink_metadata(at(r)).is_err(), "{} survived", show(r));
    }
    for a in added.iter().chain([&anchor[..]].iter()) {
        let md = fs::symlink_metadata(at(a)).unwrap();
        assert_eq!(md.nlink(), want, "nlink via {}", show(a));
        assert_eq!(md.ino(), many_ino);
        assert_eq!(fs::read(at(a)).unwrap(), b"one inode, many names\n");
    }
    m.unmount();
}

// ---------------------------------------------------------------------------
// 2. Extended attributes
// ---------------------------------------------------------------------------

#[test]
fn xattrs() {
    if !tools_available("xattrs", &["setcap", "setfacl", "getcap", "getfacl"]) {
        return;
    }
    if !system_tests_available("xattrs") || skip_in_mkfs_mode("xattrs") {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000002");
    // ext4 keeps all of an inode's xattrs in one 4 KiB block; the source is a
    // tmpfs so values can reach what a btrfs leaf item holds.
    let tmp = ScratchFs::tmpfs("xattrs", 256 * MIB);
    let src = tmp.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.file(b"f", b"content\n");
    // Every namespace, empty values, binary values.
    t.xattr(b"f", b"user.plain", b"value");
    t.xattr(b"f", b"user.empty", b"");
    t.xattr(b"f", b"user.binary", b"\0\x01\xff\0 zeros\0");
    t.xattr(b"f", b"trusted.secret", b"trusted value");
    t.xattr(b"f", b"trusted.empty", b"");
    t.xattr(b"f", b"security.label", b"system_u:object_r:etc_t:s0\0");
    t.xattr(b"f", b"security.empty", b"");
    let long_name = format!("user.{}", "n".repeat(250));
    t.xattr(b"f", long_name.as_bytes(), b"255-byte name");
    // Names that share a hash share one XATTR_ITEM.
    t.xattr(b"f", XATTR_COLLISION[0], b"first");
    t.xattr(b"f", XATTR_COLLISION[1], b"second");
    // Many attributes on one inode (spread over several leaves).
    t.file(b"many", b"");
    for i in 0..600 {
        t.xattr(
            b"many",
            format!("user.attr-{i:04}").as_bytes(),
            &random_bytes(i % 97, i as u64),
        );
    }
    // Values as large as one leaf item allows, in three namespaces.
    t.file(b"max", b"max\n");
    for ns in ["user.max", "trusted.max", "security.max"] {
        let v = random_bytes(MAX_XATTR - ns.len(), ns.len() as u64);
        t.xattr(b"max", ns.as_bytes(), &v);
    }
    t.file(b"max-plus-small", b"");
    t.xattr(
        b"max-plus-small",
        b"user.big",
        &random_bytes(MAX_XATTR - 8, 5),
    );
    t.xattr(b"max-plus-small", b"user.small", b"s");
    // On directories (including the root) and on symlinks (where the kernel
    // allows trusted.* and security.* but not user.*), fifos and devices.
    t.dir(b"d");
    t.xattr(b"d", b"user.on-dir", b"dir value");
    t.xattr(b"d", b"trusted.on-dir", b"");
    t.xattr(
        b"d",
        b"trusted.max-on-dir",
        &random_bytes(MAX_XATTR - 18, 8),
    );
    t.xattr(b"", b"user.on-root", b"root value");
    t.xattr(b"", b"trusted.on-root", b"r");
    t.symlink(b"link", b"f");
    t.xattr(b"link", b"trusted.on-link", b"link value");
    t.xattr(b"link", b"security.on-link", b"");
    t.xattr(
        b"link",
        b"trusted.big-on-link",
        &random_bytes(MAX_XATTR - 19, 9),
    );
    t.fifo(b"fifo");
    t.xattr(b"fifo", b"trusted.on-fifo", b"f");
    t.char_dev(b"dev", 1, 3);
    t.xattr(b"dev", b"security.on-dev", b"d");
    // An executable for security.capability, files and dirs for ACLs.
    t.random_file(b"exe", 5000, 11).chmod(b"exe", 0o755);
    t.file(b"acl-file", b"acl\n");
    t.dir(b"acl-dir");
    t.file(b"acl-dir/inherits", b"x");
    t.finalize();
    // Capabilities and ACLs last: chown/chmod would change them.
    run_ok(
        Command::new(tool("setcap"))
            .arg("cap_net_raw,cap_net_bind_service+ep")
            .arg(t.path(b"exe")),
    );
    run_ok(
        Command::new(tool("setfacl"))
            .args(["-m", "u:1234:rwx,g:100:r-x,m::rwx"])
            .arg(t.path(b"acl-file")),
    );
    run_ok(
        Command::new(tool("setfacl"))
            .args(["-m", "u:55:rx"])
            .arg(t.path(b"acl-dir")),
    );
    run_ok(
        Command::new(tool("setfacl"))
            .args(["-d", "-m", "u:55:rx,g:7:rwx"])
            .arg(t.path(b"acl-dir")),
    );
    let got = |rel: &[u8]| list_xattrs(&t.path(rel)).unwrap();
    assert!(got(b"exe").contains_key(&b"security.capability"[..]));
    assert!(got(b"acl-file").contains_key(&b"system.posix_acl_access"[..]));
    assert!(got(b"acl-dir").contains_key(&b"system.posix_acl_default"[..]));
    assert!(got(b"acl-dir").contains_key(&b"system.posix_acl_access"[..]));
    assert_eq!(got(b"many").len(), 600);

    let work = workdir("xattrs");
    let img = work.path().join("xattrs.img");
    export(&src, &img, &args);
    btrfs_check(&img);
    let (max_ino, f_ino) = {
        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::default());
        // What the kernel makes of them: the capability and ACLs work.
        let caps = run_ok(Command::new(tool("getcap")).arg(m.path().join("exe")));
        assert!(
            caps.contains("cap_net_bind_service,cap_net_raw=ep"),
            "{caps}"
        );
        let acl = run_ok(Command::new(tool("getfacl")).arg(m.path().join("acl-dir")));
        assert!(acl.contains("default:user:55:r-x"), "{acl}");
        let ids = (ino_of(&m.path().join("max")), ino_of(&m.path().join("f")));
        m.unmount();
        ids
    };
    let items = dump_tree(&img, "fs");
    all_xattrs_and_dirs_have_transid(&items, 1);
    let max_items: Vec<&DumpItem> = items_of(&items, max_ino)
        .into_iter()
        .filter(|i| i.ty == "XATTR_ITEM")
        .collect();
    assert_eq!(max_items.len(), 3);
    assert!(
        max_items.iter().all(|i| i.itemsize as usize == MAX_ITEM),
        "the largest xattrs do not fill an item: {:?}",
        max_items.iter().map(|i| i.itemsize).collect::<Vec<_>>()
    );
    let shared = items_of(&items, f_ino)
        .into_iter()
        .filter(|i| {
            i.ty == "XATTR_ITEM" && i.body.iter().filter(|l| l.starts_with("name:")).count() == 2
        })
        .count();
    assert_eq!(shared, 1, "colliding xattr names should share one item");
    assert_reproducible(&src, &args);
}

/// What btrfs cannot store fails the export cleanly (one line, no output):
/// a value one byte over the item limit, and two attributes whose names share
/// a hash with values that fit alone but not together.
#[test]
fn xattrs_too_large_fail_cleanly() {
    if !system_tests_available("xattrs_too_large_fail_cleanly")
        || skip_in_mkfs_mode("xattrs_too_large_fail_cleanly")
    {
        return;
    }
    let tmp = ScratchFs::tmpfs("xattr-fail", 64 * MIB);
    let work = workdir("xattr-fail");
    for case in ["one", "pair"] {
        let src = tmp.path().join(case);
        let mut t = TreeBuilder::new(&src);
        t.file(b"f", b"x");
        if case == "one" {
            t.xattr(b"f", b"user.big", &vec![1u8; MAX_XATTR - 8 + 1]);
        } else {
            t.xattr(b"f", XATTR_COLLISION[0], &vec![2u8; 9000]);
            t.xattr(b"f", XATTR_COLLISION[1], &vec![3u8; 9000]);
        }
        t.finalize();
        let out = work.path().join(format!("{case}.img"));
        let err = export_fails(&src, &out, &[]);
        let err = err.trim();
        assert_eq!(err.lines().count(), 1, "{case}: {err}");
        assert!(err.contains("too large"), "{case}: {err}");
        if case == "pair" {
            for n in XATTR_COLLISION {
                assert!(err.contains(std::str::from_utf8(n).unwrap()), "{err}");
            }
        }
        assert!(dir_names(work.path()).is_empty(), "output left behind");
    }
}

// ---------------------------------------------------------------------------
// 3. Special files
// ---------------------------------------------------------------------------

const DEVICES: &[(u32, u32)] = &[
    (0, 0),
    (1, 3),
    (4, 64),
    (8, 17),
    (136, 0),
    (255, 255),
    (256, 0),
    (259, 70_000),
    (1234, 567_890),
    (0, 0xfffff),
    (4095, 0),
    (4095, 0xfffff),
];

#[test]
fn special_files() {
    if !system_tests_available("special_files") || skip_in_mkfs_mode("special_files") {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000003");
    let work = workdir("special");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.fifo(b"fifo");
    t.fifo(b"fifo-odd").chmod(b"fifo-odd", 0o1600);
    t.socket(b"socket");
    for &(ma, mi) in DEVICES {
        t.char_dev(format!("chr/{ma}-{mi}").as_bytes(), ma, mi);
        t.block_dev(format!("blk/{ma}-{mi}").as_bytes(), ma, mi);
    }
    t.chmod(b"chr/1-3", 0o666).chown(b"chr/1-3", 0, 5);
    t.chown(b"blk/8-17", 0, 6).chmod(b"blk/8-17", 0o660);
    t.chown(b"fifo", 1000, 1000).chmod(b"fifo", 0o620);
    t.mtime(b"chr/4095-1048575", 1_700_000_000, 123_456_789);
    t.mtime(b"socket", -5, 5);
    t.xattr(b"blk/259-70000", b"trusted.dev", b"xattr on a device");
    t.finalize();
    // A socket left behind by a real bind(), too.
    let bound = src.join("bound.sock");
    drop(std::os::unix::net::UnixListener::bind(&bound).unwrap());
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &fs::symlink_metadata(&bound).unwrap().file_type()
    ));

    let img = work.path().join("special.img");
    export(&src, &img, &args);
    btrfs_check(&img);
    let m = LoopMount::new(&img, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    // The on-disk rdev is the kernel's encoding, major << 20 | minor.
    let items = dump_tree(&img, "fs");
    for &(ma, mi) in DEVICES {
        for kind in ["chr", "blk"] {
            let p = m.path().join(format!("{kind}/{ma}-{mi}"));
            let md = fs::symlink_metadata(&p).unwrap();
            assert_eq!(
                (libc::major(md.rdev()), libc::minor(md.rdev())),
                (ma, mi),
                "{}",
                p.display()
            );
            let inode = items_of(&items, md.ino())
                .into_iter()
                .find(|i| i.ty == "INODE_ITEM")
                .unwrap();
            assert_eq!(
                inode.field("rdev"),
                Some(((ma as u64) << 20) | mi as u64),
                "{kind} {ma}:{mi}"
            );
        }
    }
    m.unmount();
}

// ---------------------------------------------------------------------------
// 4. Holes
// ---------------------------------------------------------------------------

#[test]
fn holes() {
    if !tools_available("holes", &["mkfs.ext4"]) {
        return;
    }
    if !system_tests_available("holes") || skip_in_mkfs_mode("holes") {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000004");
    let work = workdir("holes");
    // The source is a fresh ext4 whatever /tmp is: its block accounting is
    // part of the test (see below).
    let ext4 = ScratchFs::ext4("holes", 256 * MIB);
    let src = ext4.path().join("src");
    let mut t = TreeBuilder::new(&src);
    let d = random_bytes(300_000, 4);
    t.sparse_file(b"leading", MIB + 100, &[(MIB, &d[..100])]);
    t.sparse_file(
        b"middle",
        3 * MIB + 5000,
        &[(0, &d[..8192]), (3 * MIB, &d[..5000])],
    );
    t.sparse_file(b"trailing", 5 * MIB, &[(0, &d[..10_000])]);
    t.sparse_file(b"all-three", 9 * MIB, &[(2 * MIB, &d[..70_000])]);
    let stripes: Vec<(u64, &[u8])> = (0..50).map(|i| (i * 128 * KIB, &d[..64 * 1024])).collect();
    t.sparse_file(b"stripes", 50 * 128 * KIB, &stripes);
    t.sparse_file(
        b"unaligned",
        200_000,
        &[(5000, &d[..3]), (70_001, &d[..9]), (199_999, &d[..1])],
    );
    t.sparse_file(b"small-hole-only", 1000, &[]);
    t.sparse_file(b"sector-hole-only", 4096, &[]);
    t.sparse_file(b"inline-sparse", 2000, &[(0, &d[..10])]);
    t.sparse_file(b"hole-3m", 3 * MIB, &[]);
    t.sparse_file(b"hole-1g", GIB, &[]);
    t.hardlink(b"middle", b"middle-link");
    t.random_file(b"dense", 100_000, 5);
    // Files with holes but as many blocks as bytes (st_blocks is no hole
    // detector): ext4 counts an external xattr block in st_blocks, and
    // space preallocated past the end.
    t.sparse_file(b"xattr-block", 8192, &[(4096, &d[..4096])]);
    t.xattr(b"xattr-block", b"user.big", &d[..3000]);
    t.sparse_file(b"prealloc", 3 * 4096, &[(4096, &d[..100])]);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(t.path(b"prealloc"))
        .unwrap();
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_KEEP_SIZE,
            3 * 4096,
            MIB as i64,
        )
    };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    drop(f);
    for n in [&b"xattr-block"[..], b"prealloc"] {
        let md = fs::metadata(t.path(n)).unwrap();
        assert!(
            md.blocks() * 512 >= md.len(),
            "precondition: {} has {} blocks for {} bytes",
            show(n),
            md.blocks(),
            md.len()
        );
    }
    t.finalize();

    let img = work.path().join("holes.img");
    export(&src, &img, &args);
    btrfs_check(&img);
    let m = LoopMount::new(&img, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    // Holes in the source are holes in the image (SEEK_HOLE on the mount),
    // and the data space used is exactly the source's data sectors.
    let mut want_data = 0;
    for name in dir_names(&src) {
        let (s, i) = (src.join(os(&name)), m.path().join(os(&name)));
        let sr = sector_data_ranges(&s);
        assert_eq!(sr, sector_data_ranges(&i), "data ranges of {}", show(&name));
        if fs::symlink_metadata(&s).unwrap().len() > 2048 && !name.ends_with(b"-link") {
            want_data += sr.iter().map(|(a, b)| b - a).sum::<u64>();
        }
    }
    assert_eq!(data_used(m.path()), want_data, "data space used");
    let hole_ino = ino_of(&m.path().join("hole-1g"));
    m.unmount();
    // The 1 GiB hole has no extents and costs nothing.
    let items = dump_tree(&img, "fs");
    let mine = items_of(&items, hole_ino);
    assert!(
        mine.iter().all(|i| i.ty != "EXTENT_DATA"),
        "1 GiB hole has extents: {mine:?}"
    );
    let inode = mine.iter().find(|i| i.ty == "INODE_ITEM").unwrap();
    assert_eq!(inode.field("size"), Some(GIB));
    assert_eq!(inode.field("nbytes"), Some(0));
    let md = fs::metadata(&img).unwrap();
    assert!(
        md.len() < 64 * MIB && md.blocks() * 512 < 32 * MIB,
        "image of {} bytes, {} allocated, for {want_data} bytes of data",
        md.len(),
        md.blocks() * 512
    );
    eprintln!(
        "holes: image {} bytes ({} allocated), data used {want_data}",
        md.len(),
        md.blocks() * 512
    );
}

/// A byte-string name or relative path as an OsStr.
fn os(name: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(name)
}

// ---------------------------------------------------------------------------
// 5. Times
// ---------------------------------------------------------------------------

const TIMES: &[(i64, u32)] = &[
    (0, 0),
    (0, 1),
    (1, 999_999_999),
    (-1, 999_999_999), // 1969-12-31 23:59:59.999999999
    (-1, 0),
    (-86_400 * 365, 500_000_000),
    (-(1 << 31), 0), // 1901-12-13
    (-(1 << 31) - 1, 5),
    (-62_135_596_800, 0), // 0001-01-01
    ((1 << 31) - 1, 999_999_999),
    (1 << 31, 0), // 2038-01-19 03:14:08
    (1 << 32, 123),
    (1 << 34, 1),                   // 2514
    (253_402_300_799, 999_999_999), // 9999-12-31
    (1_700_000_000, 123_456_789),
];

#[test]
fn times() {
    if !system_tests_available("times") || skip_in_mkfs_mode("times") {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000005");
    // tmpfs keeps the whole 64-bit range (ext4 stops at 1901 and 2446).
    let tmp = ScratchFs::tmpfs("times", 64 * MIB);
    let src = tmp.path().join("src");
    let mut t = TreeBuilder::new(&src);
    for (i, &(s, ns)) in TIMES.iter().enumerate() {
        let r = |k: &str| format!("{k}/{i:02}").into_bytes();
        t.file(&r("file"), b"x").mtime(&r("file"), s, ns);
        t.dir(&r("dir")).mtime(&r("dir"), s, ns);
        t.symlink(&r("link"), b"target").mtime(&r("link"), s, ns);
        t.fifo(&r("fifo")).mtime(&r("fifo"), s, ns);
        t.char_dev(&r("dev"), 1, i as u32).mtime(&r("dev"), s, ns);
    }
    t.random_file(b"linked", 5000, 1)
        .hardlink(b"linked", b"file/linked-2");
    t.mtime(b"linked", -(1 << 31) - 1, 999_999_999);
    t.mtime(b"", (1 << 32) + 7, 7);
    t.finalize();
    // The source holds exactly these times.
    for (i, &(s, ns)) in TIMES.iter().enumerate() {
        let md = fs::symlink_metadata(t.path(format!("link/{i:02}").as_bytes())).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (s, ns as i64));
    }
    let work = workdir("times");
    let img = work.path().join("times.img");
    export_and_verify(&src, &img, &args);
}

// ---------------------------------------------------------------------------
// 6. Scale edges
// ---------------------------------------------------------------------------

#[test]
fn dir_with_200k_entries() {
    if !system_tests_available("dir_with_200k_entries")
        || skip_in_mkfs_mode("dir_with_200k_entries")
    {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000006");
    let t0 = std::time::Instant::now();
    let tmp = ScratchFs::tmpfs("200k", 512 * MIB);
    let src = tmp.path().join("src");
    let dir = src.join("d");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..200_000u32 {
        fs::File::create(dir.join(format!("e{i:06}"))).unwrap();
    }
    fs::write(src.join("beside"), b"x").unwrap();
    let t1 = t0.elapsed();
    let work = workdir("200k");
    let img = work.path().join("200k.img");
    export_and_verify(&src, &img, &args);
    eprintln!(
        "dir_with_200k_entries: create {t1:?}, export+check+mount+compare {:?}, image {} bytes",
        t0.elapsed() - t1,
        fs::metadata(&img).unwrap().len()
    );
}

#[test]
fn file_over_4gib() {
    if !system_tests_available("file_over_4gib") || skip_in_mkfs_mode("file_over_4gib") {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000007");
    let work = workdir("4gib");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    let four = 4 * GIB;
    let head = random_bytes(MIB as usize, 1);
    let straddle = random_bytes(128 * 1024, 2);
    let odd = random_bytes(4097, 3);
    let tail = random_bytes(777, 4);
    let size = 5 * GIB + 777;
    t.sparse_file(
        b"big",
        size,
        &[
            (0, &head),
            (four - 64 * KIB, &straddle), // across 2^32
            (four + MIB + 123, &odd),     // unaligned, past 2^32
            (5 * GIB, &tail),             // the end
        ],
    );
    t.hardlink(b"big", b"big-link");
    t.finalize();

    let img = work.path().join("4gib.img");
    export(&src, &img, &args);
    btrfs_check(&img);
    let m = LoopMount::new(&img, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    let ino = ino_of(&m.path().join("big"));
    assert_eq!(fs::metadata(m.path().join("big")).unwrap().len(), size);
    m.unmount();
    let items = dump_tree(&img, "fs");
    let offsets: Vec<u64> = items_of(&items, ino)
        .iter()
        .filter(|i| i.ty == "EXTENT_DATA")
        .map(|i| i.offset_u64())
        .collect();
    assert_eq!(
        offsets,
        vec![0, four - 64 * KIB, four + MIB, 5 * GIB],
        "extent file offsets"
    );
    let inode = items_of(&items, ino)
        .into_iter()
        .find(|i| i.ty == "INODE_ITEM")
        .unwrap();
    assert_eq!(inode.field("size"), Some(size));
    assert_eq!(
        inode.field("nbytes"),
        Some(MIB + 128 * KIB + 8192 + 4096),
        "nbytes"
    );
}

#[test]
fn paths_4000_bytes() {
    if !system_tests_available("paths_4000_bytes") || skip_in_mkfs_mode("paths_4000_bytes") {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000008");
    let work = workdir("paths");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    // 15 directories of 249-byte names: 3750 bytes with the slashes.
    let mut deep = Vec::new();
    for i in 0..15 {
        if i > 0 {
            deep.push(b'/');
        }
        deep.extend_from_slice(format!("{i:02}").as_bytes());
        deep.extend(std::iter::repeat_n(b'd', 247));
    }
    t.dir(&deep);
    let file = [&deep[..], b"/", &vec![b'f'; 4000 - deep.len() - 1]].concat();
    assert_eq!(file.len(), 4000);
    let sibling = [&deep[..], b"/", &vec![b's'; 4000 - deep.len() - 1]].concat();
    let sub = [&deep[..], b"/", &vec![b'D'; 4000 - deep.len() - 1]].concat();
    t.random_file(&file, 5000, 1);
    t.xattr(&file, b"user.deep", b"at 4000 bytes");
    t.fifo(&sibling);
    t.dir(&sub);
    t.hardlink(&file, b"top-link");
    t.symlink(b"long-link", &file);
    t.mtime(&file, 1_234_567_890, 123);
    t.finalize();
    let longest = src.as_os_str().len() + 1 + 4000;
    assert!(longest < 4096, "source path of {longest} bytes");
    let img = work.path().join("paths.img");
    export(&src, &img, &args);
    btrfs_check(&img);
    let m = LoopMount::new(&img, false);
    assert!(m.path().as_os_str().len() + 1 + 4000 < 4096);
    assert!(m.path().join(os(&file)).is_file());
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();
}

// ---------------------------------------------------------------------------
// A mixed tree: order independence, read-write cycle
// ---------------------------------------------------------------------------

/// POSIX ACL xattr values as setfacl writes them (version 2 entries).
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    v
}

const ACL_USER_OBJ: u16 = 1;
const ACL_USER: u16 = 2;
const ACL_GROUP_OBJ: u16 = 4;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const NO_ID: u32 = u32::MAX;

enum Mixed {
    Dir(&'static [u8]),
    File(&'static [u8], u64),
    Sparse(&'static [u8], u64, &'static [(u64, u64)]),
    Link(&'static [u8], &'static [u8]),
    /// One inode under several names (the first is created, then linked).
    Linked(&'static [&'static [u8]]),
    Fifo(&'static [u8]),
    Socket(&'static [u8]),
    Chr(&'static [u8], u32, u32),
    Blk(&'static [u8], u32, u32),
}

const MIXED: &[Mixed] = &[
    Mixed::Dir(b"etc"),
    Mixed::Dir(b"usr/bin"),
    Mixed::Dir(b"empty"),
    Mixed::File(b"etc/small", 100),
    Mixed::File(b"etc/inline-max", 2048),
    Mixed::File(b"etc/just-over", 2049),
    Mixed::File(b"usr/bin/tool", 300_000),
    Mixed::File(b"usr/bin/big", 3 * MIB + 17),
    Mixed::File(b"zero", 0),
    Mixed::Sparse(b"var/disk.img", 64 * MIB, &[(0, 4096), (32 * MIB, 10_000)]),
    Mixed::Sparse(b"var/leading", 2 * MIB + 5, &[(2 * MIB, 5)]),
    Mixed::Sparse(b"var/hole", 16 * MIB, &[]),
    Mixed::Link(b"usr/bin/alias", b"tool"),
    Mixed::Link(b"dangling", b"/nowhere/at/all"),
    Mixed::Linked(&[b"usr/bin/a", b"usr/bin/b", b"etc/c"]),
    Mixed::Linked(&[b"etc/tiny-1", b"etc/tiny-2"]),
    Mixed::Fifo(b"run/fifo"),
    Mixed::Socket(b"run/socket"),
    Mixed::Chr(b"dev/null", 1, 3),
    Mixed::Chr(b"dev/big", 4095, 0xfffff),
    Mixed::Blk(b"dev/nvme", 259, 70_000),
    Mixed::File(NAME_COLLISION[0], 10),
    Mixed::File(NAME_COLLISION[1], 20),
];

/// Builds the mixed tree at `root`, in reverse order and with created-and-
/// deleted junk when `other_order`.
fn build_mixed(root: &Path, other_order: bool) {
    let mut t = TreeBuilder::new(root);
    if other_order {
        for i in 0..200 {
            t.file(format!("junk{i}").as_bytes(), b"junk");
        }
    }
    let mut entries: Vec<&Mixed> = MIXED.iter().collect();
    if other_order {
        entries.reverse();
    }
    for (i, e) in entries.iter().enumerate() {
        if other_order {
            t.file(format!("etc/tmp{i}").as_bytes(), b"tmp");
        }
        match e {
            Mixed::Dir(p) => {
                t.dir(p);
            }
            Mixed::File(p, size) => {
                t.random_file(p, *size, seed_for(p));
            }
            Mixed::Sparse(p, size, chunks) => {
                let data: Vec<(u64, Vec<u8>)> = chunks
                    .iter()
                    .map(|&(off, len)| (off, random_bytes(len as usize, off ^ seed_for(p))))
                    .collect();
                let refs: Vec<(u64, &[u8])> = data.iter().map(|(o, d)| (*o, &d[..])).collect();
                t.sparse_file(p, *size, &refs);
            }
            Mixed::Link(p, target) => {
                t.symlink(p, target);
            }
            Mixed::Linked(names) => {
                let names: Vec<&[u8]> = if other_order {
                    names.iter().rev().copied().collect()
                } else {
                    names.to_vec()
                };
                t.random_file(names[0], 1000 * names.len() as u64, names.len() as u64);
                for n in &names[1..] {
                    t.hardlink(names[0], n);
                }
                // Mode, owner and times are per inode: pin them.
                t.mtime(names[0], 1_400_000_000, 42);
                t.chmod(names[0], 0o640);
            }
            Mixed::Fifo(p) => {
                t.fifo(p);
            }
            Mixed::Socket(p) => {
                t.socket(p);
            }
            Mixed::Chr(p, a, b) => {
                t.char_dev(p, *a, *b);
            }
            Mixed::Blk(p, a, b) => {
                t.block_dev(p, *a, *b);
            }
        }
        if other_order {
            t.remove(format!("etc/tmp{i}").as_bytes());
        }
    }
    let access = acl(&[
        (ACL_USER_OBJ, 6, NO_ID),
        (ACL_USER, 7, 1234),
        (ACL_GROUP_OBJ, 4, NO_ID),
        (ACL_MASK, 7, NO_ID),
        (ACL_OTHER, 4, NO_ID),
    ]);
    let default = acl(&[
        (ACL_USER_OBJ, 7, NO_ID),
        (ACL_USER, 5, 55),
        (ACL_GROUP_OBJ, 5, NO_ID),
        (ACL_MASK, 7, NO_ID),
        (ACL_OTHER, 5, NO_ID),
    ]);
    // security.capability v2: cap_net_raw (bit 13), effective.
    let mut cap = 0x0200_0001u32.to_le_bytes().to_vec();
    cap.extend((1u32 << 13).to_le_bytes());
    cap.extend([0u8; 12]);
    let mut xs: Vec<(&[u8], &[u8], Vec<u8>)> = vec![
        (b"etc/small", b"user.a", b"1".to_vec()),
        (b"etc/small", b"user.empty", Vec::new()),
        (b"etc/small", b"trusted.t", b"trusted".to_vec()),
        (b"usr/bin/tool", b"security.capability", cap),
        (b"etc", b"system.posix_acl_default", default),
        (b"etc/inline-max", b"system.posix_acl_access", access),
        (b"usr/bin/alias", b"trusted.on-link", b"l".to_vec()),
        (b"dev/nvme", b"trusted.on-dev", b"d".to_vec()),
        (b"usr/bin/a", b"user.linked", b"shared".to_vec()),
        (b"var/disk.img", b"user.big", random_bytes(3000, 3)),
        (b"", b"user.root", b"root".to_vec()),
    ];
    if other_order {
        xs.reverse();
    }
    for (p, n, v) in xs {
        t.xattr(p, n, &v);
    }
    if other_order {
        for i in 0..200 {
            t.remove(format!("junk{i}").as_bytes());
        }
    }
    t.chown(b"usr/bin", 1000, 1000).chmod(b"usr/bin", 0o750);
    t.chown(b"run/socket", 33, 33)
        .chmod(b"usr/bin/tool", 0o4755);
    t.mtime(b"var/hole", -1, 999_999_999);
    t.mtime(b"dev/big", (1 << 32) + 1, 1);
    t.mtime(b"", 1_600_000_000, 500_000_001);
    t.chmod(b"", 0o750);
    t.finalize();
}

#[test]
fn mixed_tree_two_orders_byte_identical_and_rw() {
    if !system_tests_available("mixed_tree_two_orders_byte_identical_and_rw")
        || skip_in_mkfs_mode("mixed_tree_two_orders_byte_identical_and_rw")
    {
        return;
    }
    let args = fixed_args("0b0d0a0e-0002-4000-8000-000000000009");
    let work = workdir("mixed");
    let (s1, s2) = (work.path().join("forward"), work.path().join("other"));
    build_mixed(&s1, false);
    build_mixed(&s2, true);
    // The premise: the two sources are logically identical.
    compare_trees(&s1, &s2, CompareOpts::default());
    let (i1, i2) = (work.path().join("1.img"), work.path().join("2.img"));
    export_and_verify(&s1, &i1, &args);
    export(&s2, &i2, &args);
    assert_files_identical(&i1, &i2);
    first_boot_rw(&i1);
    rw_cycle(&i1);
}

// ---------------------------------------------------------------------------
// 8. What mkfs.btrfs --rootdir (the installed version) does not keep
// ---------------------------------------------------------------------------

/// A source tree and its images from btrfsimg and from mkfs.btrfs --rootdir.
struct Both {
    _work: tempfile::TempDir,
    src: PathBuf,
    ours: PathBuf,
    mkfs: PathBuf,
}

fn build_both(tag: &str, uuid: &'static str, build: impl FnOnce(&mut TreeBuilder)) -> Both {
    let work = workdir(tag);
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    build(&mut t);
    t.finalize();
    let (ours, mkfs) = (work.path().join("ours.img"), work.path().join("mkfs.img"));
    export(&src, &ours, &fixed_args(uuid));
    mkfs_rootdir(&src, &mkfs);
    Both {
        _work: work,
        src,
        ours,
        mkfs,
    }
}

fn vs_mkfs_skip(what: &str) -> bool {
    !system_tests_available(what) || skip_in_mkfs_mode(what)
}

#[test]
fn vs_mkfs_device_numbers() {
    if vs_mkfs_skip("vs_mkfs_device_numbers") {
        return;
    }
    let b = build_both("vs-rdev", "0b0d0a0e-0002-4000-8000-000000000010", |t| {
        t.char_dev(b"chr", 259, 70_000);
        t.block_dev(b"blk", 8, 17);
        t.char_dev(b"null", 1, 3);
    });
    btrfs_check(&b.ours);
    let (mo, mm) = (
        LoopMount::new(&b.ours, false),
        LoopMount::new(&b.mkfs, false),
    );
    for n in ["chr", "blk", "null"] {
        let want = fs::symlink_metadata(b.src.join(n)).unwrap().rdev();
        let ours = fs::symlink_metadata(mo.path().join(n)).unwrap().rdev();
        let mkfs = fs::symlink_metadata(mm.path().join(n)).unwrap().rdev();
        assert_eq!(ours, want, "btrfsimg rdev of {n}");
        assert_eq!(mkfs, 0, "mkfs.btrfs rdev of {n} (mkfs keeps it now?)");
    }
    mo.unmount();
    mm.unmount();
}

#[test]
fn vs_mkfs_nanoseconds() {
    if vs_mkfs_skip("vs_mkfs_nanoseconds") {
        return;
    }
    let b = build_both("vs-ns", "0b0d0a0e-0002-4000-8000-000000000011", |t| {
        t.file(b"f", b"x").mtime(b"f", 1_600_000_000, 123_456_789);
        t.dir(b"d").mtime(b"d", 1_500_000_000, 1);
        t.symlink(b"l", b"f").mtime(b"l", -1, 999_999_999);
    });
    let (mo, mm) = (
        LoopMount::new(&b.ours, false),
        LoopMount::new(&b.mkfs, false),
    );
    for n in ["f", "d", "l"] {
        let t = |root: &Path| {
            let md = fs::symlink_metadata(root.join(n)).unwrap();
            (md.mtime(), md.mtime_nsec())
        };
        let (want, ours, mkfs) = (t(&b.src), t(mo.path()), t(mm.path()));
        assert_ne!(want.1, 0);
        assert_eq!(ours, want, "btrfsimg mtime of {n}");
        assert_eq!(mkfs, (want.0, 0), "mkfs.btrfs mtime of {n}");
    }
    mo.unmount();
    mm.unmount();
}

#[test]
fn vs_mkfs_holes() {
    if vs_mkfs_skip("vs_mkfs_holes") {
        return;
    }
    let b = build_both("vs-holes", "0b0d0a0e-0002-4000-8000-000000000012", |t| {
        t.sparse_file(b"hole", 64 * MIB, &[]);
        t.sparse_file(b"sparse", 32 * MIB, &[(16 * MIB, b"data")]);
    });
    let (mo, mm) = (
        LoopMount::new(&b.ours, false),
        LoopMount::new(&b.mkfs, false),
    );
    let ranges = |root: &Path, n: &str| sector_data_ranges(&root.join(n));
    assert_eq!(ranges(mo.path(), "hole"), vec![]);
    assert_eq!(
        ranges(mo.path(), "sparse"),
        vec![(16 * MIB, 16 * MIB + 4096)]
    );
    assert_eq!(data_used(mo.path()), 4096);
    assert_eq!(ranges(mm.path(), "hole"), vec![(0, 64 * MIB)]);
    assert_eq!(ranges(mm.path(), "sparse"), vec![(0, 32 * MIB)]);
    let mkfs_used = data_used(mm.path());
    assert!(mkfs_used >= 96 * MIB, "mkfs.btrfs data used {mkfs_used}");
    mo.unmount();
    mm.unmount();
    let alloc = |p: &Path| fs::metadata(p).unwrap().blocks() * 512;
    eprintln!(
        "vs_mkfs_holes: data used 4096 vs {mkfs_used}; image allocated {} vs {}",
        alloc(&b.ours),
        alloc(&b.mkfs)
    );
}

#[test]
fn vs_mkfs_symlink_targets() {
    if vs_mkfs_skip("vs_mkfs_symlink_targets") {
        return;
    }
    let long: Vec<u8> = (0..4095).map(|i| b'a' + (i % 26) as u8).collect();
    let b = build_both("vs-symlink", "0b0d0a0e-0002-4000-8000-000000000013", |t| {
        t.symlink(b"short", b"target");
        t.symlink(b"long", &long);
    });
    // Inline extent length and nbytes of each symlink inode.
    let sizes = |img: &Path| -> Vec<(u64, u64, u64)> {
        let items = dump_tree(img, "fs");
        let mut out = Vec::new();
        for it in items.iter().filter(|i| i.ty == "INODE_ITEM") {
            let mode = it.field("mode").unwrap();
            if mode / 10000 == 12 {
                let ino = it.ino().unwrap();
                let ext = items_of(&items, ino)
                    .into_iter()
                    .find(|i| i.ty == "EXTENT_DATA")
                    .unwrap();
                out.push((
                    it.field("size").unwrap(),
                    it.field("nbytes").unwrap(),
                    ext.field("size").unwrap(),
                ));
            }
        }
        out.sort();
        out
    };
    assert_eq!(sizes(&b.ours), vec![(6, 6, 6), (4095, 4095, 4095)]);
    assert_eq!(sizes(&b.mkfs), vec![(6, 7, 7), (4095, 4096, 4096)]);
    btrfs_check(&b.ours);
    let o = run(Command::new(tool("btrfs"))
        .args(["check", "--readonly"])
        .arg(&b.mkfs));
    let text = output_text(&o);
    assert!(
        !o.status.success() && text.contains("inline file extent too large"),
        "mkfs.btrfs image with a 4095-byte symlink passes btrfs check now:\n{text}"
    );
    let m = LoopMount::new(&b.ours, false);
    assert_eq!(
        std::os::unix::ffi::OsStrExt::as_bytes(
            fs::read_link(m.path().join("long")).unwrap().as_os_str()
        ),
        &long[..]
    );
    m.unmount();
}

#[test]
fn vs_mkfs_item_transids() {
    if vs_mkfs_skip("vs_mkfs_item_transids") {
        return;
    }
    let b = build_both("vs-transid", "0b0d0a0e-0002-4000-8000-000000000014", |t| {
        for i in 0..30 {
            let p = format!("d{}/f{i}", i % 3);
            t.file(p.as_bytes(), b"x");
            t.xattr(p.as_bytes(), b"user.x", b"v");
            t.xattr(p.as_bytes(), b"trusted.y", b"w");
        }
    });
    let gen = super_generation(&b.ours);
    assert_eq!(gen, 1);
    all_xattrs_and_dirs_have_transid(&dump_tree(&b.ours, "fs"), gen);
    let mkfs_gen = super_generation(&b.mkfs);
    let items = dump_tree(&b.mkfs, "fs");
    let bad: Vec<(String, u64)> = items
        .iter()
        .filter(|i| matches!(i.ty.as_str(), "DIR_ITEM" | "DIR_INDEX" | "XATTR_ITEM"))
        .flat_map(|i| i.fields("transid").into_iter().map(|t| (i.ty.clone(), t)))
        .filter(|&(_, t)| t != mkfs_gen)
        .collect();
    assert!(
        !bad.is_empty(),
        "every transid in the mkfs.btrfs image equals its generation {mkfs_gen} now"
    );
    let xattr_bad = bad.iter().filter(|(ty, _)| ty == "XATTR_ITEM").count();
    eprintln!(
        "vs_mkfs_item_transids: mkfs.btrfs generation {mkfs_gen}; {} dir/xattr items with another transid ({xattr_bad} XATTR_ITEM), e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

#[test]
fn vs_mkfs_root_directory() {
    if vs_mkfs_skip("vs_mkfs_root_directory") {
        return;
    }
    let b = build_both("vs-root", "0b0d0a0e-0002-4000-8000-000000000015", |t| {
        t.file(b"f", b"x");
        t.chmod(b"", 0o750).chown(b"", 1000, 100);
        t.mtime(b"", 1_500_000_000, 5);
        t.xattr(b"", b"user.root", b"r");
    });
    let (mo, mm) = (
        LoopMount::new(&b.ours, false),
        LoopMount::new(&b.mkfs, false),
    );
    let attrs = |p: &Path| {
        let md = fs::symlink_metadata(p).unwrap();
        (
            md.mode(),
            md.uid(),
            md.gid(),
            md.mtime(),
            md.mtime_nsec(),
            list_xattrs(p).unwrap(),
        )
    };
    let (want, ours, mkfs) = (attrs(&b.src), attrs(mo.path()), attrs(mm.path()));
    assert_eq!(ours, want, "btrfsimg root directory");
    assert_ne!(mkfs.0, want.0, "mkfs.btrfs keeps the root mode now");
    assert_ne!(
        (mkfs.1, mkfs.2),
        (want.1, want.2),
        "mkfs.btrfs keeps the root owner now"
    );
    assert_ne!(mkfs.3, want.3, "mkfs.btrfs keeps the root mtime now");
    assert!(mkfs.5.is_empty(), "mkfs.btrfs keeps root xattrs now");
    eprintln!(
        "vs_mkfs_root_directory: source mode {:o} {}:{} mtime {}; mkfs.btrfs mode {:o} {}:{} mtime {} xattrs {}",
        want.0, want.1, want.2, want.3, mkfs.0, mkfs.1, mkfs.2, mkfs.3, mkfs.5.len()
    );
    mo.unmount();
    mm.unmount();
}

/// The mixed tree through both builders: btrfsimg keeps everything; report
/// what mkfs.btrfs loses and both images' sizes.
#[test]
fn vs_mkfs_mixed_tree() {
    if vs_mkfs_skip("vs_mkfs_mixed_tree") {
        return;
    }
    let work = workdir("vs-mixed");
    let src = work.path().join("src");
    build_mixed(&src, false);
    let (ours, mkfs) = (work.path().join("ours.img"), work.path().join("mkfs.img"));
    export(
        &src,
        &ours,
        &fixed_args("0b0d0a0e-0002-4000-8000-000000000016"),
    );
    mkfs_rootdir(&src, &mkfs);
    btrfs_check(&ours);
    btrfs_check(&mkfs);
    let (mo, mm) = (LoopMount::new(&ours, false), LoopMount::new(&mkfs, false));
    let ours_diffs = tree_differences(&src, mo.path(), CompareOpts::default());
    let mkfs_diffs = tree_differences(&src, mm.path(), CompareOpts::default());
    let (ours_data, mkfs_data) = (data_used(mo.path()), data_used(mm.path()));
    mo.unmount();
    mm.unmount();
    assert!(ours_diffs.is_empty(), "btrfsimg: {ours_diffs:#?}");
    // Classify what mkfs.btrfs loses; anything unexpected fails the test.
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for d in &mkfs_diffs {
        let kind = if d.contains(": rdev ") {
            "device numbers"
        } else if d.starts_with("/: ") {
            "root directory"
        } else if d.contains(": mtime ") {
            "mtime nanoseconds"
        } else if d.contains(": data ranges ") {
            "holes"
        } else {
            panic!("unexpected mkfs.btrfs difference: {d}")
        };
        *kinds.entry(kind).or_default() += 1;
    }
    for k in [
        "device numbers",
        "root directory",
        "mtime nanoseconds",
        "holes",
    ] {
        assert!(
            kinds.contains_key(k),
            "mkfs.btrfs now keeps {k}? {mkfs_diffs:#?}"
        );
    }
    let size = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        (md.len(), md.blocks() * 512)
    };
    let (so, sm) = (size(&ours), size(&mkfs));
    eprintln!(
        "vs_mkfs_mixed_tree: btrfsimg: {} differences, image {} bytes ({} allocated), data used {ours_data}\n\
         vs_mkfs_mixed_tree: mkfs.btrfs --rootdir --shrink: {} differences {kinds:?}, image {} bytes ({} allocated), data used {mkfs_data}\n  {}",
        ours_diffs.len(),
        so.0,
        so.1,
        mkfs_diffs.len(),
        sm.0,
        sm.1,
        mkfs_diffs.join("\n  ")
    );
    assert!(ours_data < mkfs_data, "holes should cost btrfsimg nothing");
}

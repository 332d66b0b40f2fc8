//! System tests for `btrfsimg export`: build real images, check them with
//! btrfs-progs, loop-mount them and compare against the source tree.
//! Needs root, loop devices and btrfs-progs (see tests/common/mod.rs).

mod common;

use common::*;
use std::fs;
use std::path::Path;

const BIG: u64 = 129 * MIB;

/// Sizes around the inline-extent / sector boundaries, plus big ones.
const BOUNDARY_SIZES: &[u64] = &[0, 1, 2047, 2048, 2049, 4095, 4096, 4097, MIB + 1, BIG];

fn build_boundary_tree(t: &mut TreeBuilder) {
    for &size in BOUNDARY_SIZES {
        let rel = format!("sizes/f{size}");
        t.random_file(rel.as_bytes(), size, size ^ 0x5eed);
    }

    // A directory with 2,000 mixed entries.
    for i in 0..2000u64 {
        let rel = format!("many/entry{i:04}");
        match i % 50 {
            7 => {
                t.symlink(rel.as_bytes(), format!("entry{:04}", i + 1).as_bytes());
            }
            13 => {
                t.dir(rel.as_bytes());
            }
            _ => {
                let size = (i * 7919) % 9000;
                t.random_file(rel.as_bytes(), size, i);
            }
        }
    }

    // 40 levels deep.
    let mut deep = String::from("deep");
    for i in 0..40 {
        deep.push_str(&format!("/d{i:02}"));
    }
    t.dir(deep.as_bytes());
    t.file(format!("{deep}/bottom").as_bytes(), b"at the bottom\n");

    // Names: 255 bytes, non-UTF-8, spaces, newline.
    let long = vec![b'n'; 255];
    let mut long_file = b"names/".to_vec();
    long_file.extend_from_slice(&long);
    t.file(&long_file, b"long name\n");
    let mut long_dir = b"names/d/".to_vec();
    long_dir.extend_from_slice(&vec![b'D'; 255]);
    t.dir(&long_dir);
    let mut long_link = b"names/l/".to_vec();
    long_link.extend_from_slice(&vec![b'L'; 255]);
    t.symlink(&long_link, b"../x");
    t.file(b"names/\xff\xfe name", b"not utf-8\n");
    t.dir(b"names/\xc3\x28 bad \x80 dir");
    t.file(b"names/\xc3\x28 bad \x80 dir/inner", b"inner\n");
    t.file(b"names/with  two spaces ", b"spaces\n");
    t.file(b"names/new\nline", b"newline\n");
    t.file(b"names/caf\xc3\xa9 \xe2\x98\x83", b"valid utf-8\n");

    // Symlinks.
    t.symlink(b"links/relative", b"../sizes/f4096");
    t.symlink(b"links/absolute", b"/etc/passwd");
    t.symlink(b"links/dangling", b"does/not/exist");
    t.symlink(b"links/to-dir", b"../deep");
    let long_target: Vec<u8> = (0..4095)
        .map(|i| {
            if i % 64 == 63 {
                b'/'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    t.symlink(b"links/long-target", &long_target);

    // Empty directory.
    t.dir(b"empty");

    // Modes.
    t.file(b"modes/setuid", b"#!/bin/sh\n")
        .chmod(b"modes/setuid", 0o4755);
    t.file(b"modes/setgid", b"#!/bin/sh\n")
        .chmod(b"modes/setgid", 0o2755);
    t.dir(b"modes/sticky").chmod(b"modes/sticky", 0o1777);
    t.file(b"modes/sticky/in-sticky", b"x");
    t.file(b"modes/none", b"secret").chmod(b"modes/none", 0o000);
    t.dir(b"modes/locked");
    t.file(b"modes/locked/inside", b"locked in")
        .chmod(b"modes/locked", 0o000);
    t.file(b"modes/odd", b"").chmod(b"modes/odd", 0o6421);

    // Owners (setuid file owned by a non-root user: chown must not eat it).
    t.chown(b"modes/setuid", 1000, 100);
    t.chown(b"modes/setgid", 0, 0);
    t.file(b"owners/user", b"u")
        .chown(b"owners/user", 1000, 100);
    t.dir(b"owners/nobody")
        .chown(b"owners/nobody", 65534, 65534);
    t.file(b"owners/nobody/f", b"n")
        .chown(b"owners/nobody/f", 65534, 65534);
    t.symlink(b"owners/link", b"user")
        .chown(b"owners/link", 12345, 54321);
    t.chown(b"modes/locked", 4242, 4343);

    // Special files.
    t.fifo(b"special/fifo");
    t.char_dev(b"special/null", 1, 3);
    t.block_dev(b"special/blk", 8, 17);
    t.char_dev(b"special/bigdev", 4095, 0xfffff);

    // Hard links: a group of three across directories, and a pair.
    t.random_file(b"hard/a", 10_000, 77);
    t.hardlink(b"hard/a", b"hard/sub/b");
    t.hardlink(b"hard/a", b"many/entry-hardlink");
    t.file(b"hard/pair1", b"pair");
    t.hardlink(b"hard/pair1", b"hard/pair2");

    // Sparse file: data at the start, in the middle and at the end.
    let mid = random_bytes(8192, 5);
    t.sparse_file(
        b"sparse/file",
        64 * MIB + 100,
        &[(0, b"head"), (32 * MIB, &mid), (64 * MIB, &[7u8; 100])],
    );
    t.sparse_file(b"sparse/all-hole", 3 * MIB, &[]);

    // Extended attributes.
    t.xattr(b"sizes/f1", b"user.empty", b"");
    t.xattr(b"sizes/f1", b"user.small", b"value");
    t.xattr(b"sizes/f1", b"user.big", &random_bytes(3000, 9));
    t.xattr(b"empty", b"user.on-dir", b"d");
    t.xattr(b"links/relative", b"trusted.on-link", b"l");
    t.xattr(b"hard/a", b"user.linked", b"shared by three names");

    // Times with nanoseconds, on files, directories and symlinks.
    t.mtime(b"sizes/f0", 0, 0);
    t.mtime(b"sizes/f1", 1, 999_999_999);
    t.mtime(b"sizes/f2047", -31_536_000, 250_000_000); // 1969
    t.mtime(b"sizes/f2048", 2_147_483_648, 1); // past 2038
    t.mtime(b"sizes/f2049", 4_102_444_800, 123_456_789); // 2100
    t.mtime(b"empty", 1_234_567_890, 987_654_321);
    t.mtime(b"deep", 1_111_111_111, 111_111_111);
    t.mtime(b"links/dangling", 1_222_222_222, 222_222_222);
    t.mtime(b"", 1_333_333_333, 333_333_333);
    t.finalize();
}

#[test]
fn boundary_files() {
    if !system_tests_available("boundary_files") {
        return;
    }
    let args0 = fixed_args("0b0d0a0e-0001-4000-8000-000000000001");
    let work = workdir("boundary");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    build_boundary_tree(&mut t);

    let img = work.path().join("boundary.img");
    export(&src, &img, &args0);
    btrfs_check(&img);
    assert_multi_level_fs_tree(&img);
    {
        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::for_builder());
        m.unmount();
    }
    first_boot_rw(&img);
    rw_cycle(&img);
    assert_export_matches(&src, &img, &args0);
}

/// The 2,000-entry directory must push the fs tree past a single leaf.
fn assert_multi_level_fs_tree(img: &Path) {
    let out = std::process::Command::new(tool("btrfs"))
        .args(["inspect-internal", "dump-tree", "-t", "fs"])
        .arg(img)
        .output()
        .expect("run btrfs inspect-internal dump-tree");
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text
        .lines()
        .find(|l| l.starts_with("node ") || l.starts_with("leaf "));
    assert!(
        first.is_some_and(|l| l.starts_with("node ")),
        "fs tree root is not a node: {first:?}"
    );
}

/// One logical tree, described as data so it can be built in any order.
enum Entry {
    Dir(&'static [u8]),
    File(&'static [u8], u64),
    Link(&'static [u8], &'static [u8]),
    /// Same content under several names.
    Linked(&'static [&'static [u8]], u64),
    Fifo(&'static [u8]),
}

const ORDER_TREE: &[Entry] = &[
    Entry::Dir(b"a"),
    Entry::Dir(b"a/b"),
    Entry::Dir(b"empty"),
    Entry::File(b"a/one", 10),
    Entry::File(b"a/b/two", 5000),
    Entry::File(b"a/b/three", 300_000),
    Entry::File(b"zero", 0),
    Entry::File(b"top", 2048),
    Entry::Link(b"a/link", b"b/two"),
    Entry::Link(b"dangling", b"nowhere"),
    Entry::Linked(&[b"h1", b"a/h2", b"a/b/h3"], 7000),
    Entry::Fifo(b"a/fifo"),
    Entry::File(b"z/y/x/w", 123),
];

fn build_order_tree(root: &Path, reverse: bool, perturb: bool) -> TreeBuilder {
    let mut t = TreeBuilder::new(root);
    if perturb {
        for i in 0..300 {
            t.file(format!("junk{i}").as_bytes(), b"junk");
        }
    }
    let mut entries: Vec<&Entry> = ORDER_TREE.iter().collect();
    if reverse {
        entries.reverse();
    }
    for (i, e) in entries.iter().enumerate() {
        if perturb {
            t.file(format!("a/tmp{i}").as_bytes(), b"tmp");
        }
        match e {
            Entry::Dir(p) => {
                t.dir(p);
            }
            Entry::File(p, size) => {
                t.random_file(p, *size, seed_for(p));
            }
            Entry::Link(p, target) => {
                t.symlink(p, target);
            }
            Entry::Linked(names, size) => {
                let names: Vec<&[u8]> = if reverse {
                    names.iter().rev().copied().collect()
                } else {
                    names.to_vec()
                };
                t.random_file(names[0], *size, *size);
                for n in &names[1..] {
                    t.hardlink(names[0], n);
                }
                // Times/modes are per inode: pin them explicitly.
                t.mtime(names[0], 1_400_000_000, 42);
                t.chmod(names[0], 0o640);
            }
            Entry::Fifo(p) => {
                t.fifo(p);
            }
        }
        if perturb {
            t.remove(format!("a/tmp{i}").as_bytes());
        }
    }
    // xattrs set in different orders.
    let mut xs: Vec<(&[u8], &[u8])> = vec![
        (b"user.alpha", b"1"),
        (b"user.beta", b"22"),
        (b"user.gamma", b"333"),
        (b"user.delta", b""),
    ];
    if reverse {
        xs.reverse();
    }
    for (n, v) in xs {
        t.xattr(b"a/one", n, v);
        t.xattr(b"a", n, v);
    }
    if perturb {
        for i in 0..300 {
            t.remove(format!("junk{i}").as_bytes());
        }
    }
    t.chown(b"a/b", 1000, 1000).chmod(b"a/b", 0o750);
    t.finalize();
    t
}

#[test]
fn same_tree_other_order() {
    if !system_tests_available("same_tree_other_order") {
        return;
    }
    let args0 = fixed_args("0b0d0a0e-0001-4000-8000-000000000002");
    let work = workdir("order");
    let (s1, s2) = (work.path().join("forward"), work.path().join("reverse"));
    build_order_tree(&s1, false, false);
    build_order_tree(&s2, true, true);
    // The harness's own premise: the two sources are logically identical.
    compare_trees(&s1, &s2, CompareOpts::default());

    let (i1, i2) = (work.path().join("1.img"), work.path().join("2.img"));
    export(&s1, &i1, &args0);
    export(&s2, &i2, &args0);
    btrfs_check(&i1);
    {
        let m = LoopMount::new(&i2, false);
        compare_trees(&s1, m.path(), CompareOpts::for_builder());
        m.unmount();
    }
    if !is_mkfs_mode() {
        assert_files_identical(&i1, &i2);
    } else {
        say("SKIPPED same_tree_other_order byte comparison: mkfs mode");
    }
    assert_reproducible(&s2, &args0);
}

fn small_tree(root: &Path, big: u64) {
    let mut t = TreeBuilder::new(root);
    t.random_file(b"data/big", big, 1);
    t.random_file(b"data/small", 3000, 2);
    t.file(b"hello", b"hello\n");
    t.symlink(b"link", b"hello");
    t.dir(b"empty");
    t.finalize();
}

fn assert_one_line_error(stderr: &str, what: &str) {
    if is_mkfs_mode() {
        return; // mkfs.btrfs is chatty; the one-line contract is btrfsimg's.
    }
    let t = stderr.trim();
    assert!(
        !t.is_empty() && t.lines().count() == 1,
        "{what}: expected a one-line error, got:\n{stderr}"
    );
}

#[test]
fn extra_space_and_size() {
    if !system_tests_available("extra_space_and_size") {
        return;
    }
    let args0 = fixed_args("0b0d0a0e-0001-4000-8000-000000000003");
    let work = workdir("sizes");
    let src = work.path().join("src");
    small_tree(&src, 24 * MIB);

    // Baseline and --extra-space 64M.
    let base = work.path().join("base.img");
    export(&src, &base, &args0);
    let extra = work.path().join("extra.img");
    let mut args = args0.clone();
    args.extend(["--extra-space", "64M"]);
    export(&src, &extra, &args);
    let (lb, le) = (
        fs::metadata(&base).unwrap().len(),
        fs::metadata(&extra).unwrap().len(),
    );
    assert!(
        le >= lb + 64 * MIB,
        "--extra-space 64M: image is {le} bytes, baseline {lb}"
    );
    btrfs_check(&extra);
    {
        let m = LoopMount::new(&extra, true);
        let avail = statvfs_avail(m.path());
        assert!(
            avail >= 32 * MIB,
            "only {avail} bytes free with --extra-space 64M"
        );
        let p = m.path().join("filler");
        write_random_file(&p, 32 * MIB, 3);
        let expect = random_bytes(32 * MIB as usize, 3);
        assert!(
            fs::read(&p).unwrap() == expect,
            "32 MiB filler reads back wrong"
        );
        m.unmount();
    }
    btrfs_check(&extra);

    // --size 300M: exact length, valid, same content.
    let sized = work.path().join("sized.img");
    let mut args = args0.clone();
    args.extend(["--size", "300M"]);
    export(&src, &sized, &args);
    assert_eq!(fs::metadata(&sized).unwrap().len(), 300 * MIB);
    btrfs_check(&sized);
    {
        let m = LoopMount::new(&sized, false);
        compare_trees(&src, m.path(), CompareOpts::for_builder());
        m.unmount();
    }

    // Too small / malformed sizes fail cleanly and leave nothing behind.
    let outdir = work.path().join("out");
    fs::create_dir(&outdir).unwrap();
    let out = outdir.join("small.img");
    for size in ["16M", "12Q", ""] {
        let stderr = export_fails(&src, &out, &["--size", size]);
        assert_one_line_error(&stderr, &format!("--size {size:?}"));
        let left = dir_names(&outdir);
        assert!(
            left.is_empty(),
            "--size {size:?}: files left behind: {:?}",
            left.iter().map(|n| show(n)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn stdout_export() {
    if !system_tests_available("stdout_export") {
        return;
    }
    let args0 = fixed_args("0b0d0a0e-0001-4000-8000-000000000004");
    let work = workdir("stdout");
    let src = work.path().join("src");
    small_tree(&src, 5 * MIB + 3);
    let file_img = work.path().join("file.img");
    let pipe_img = work.path().join("pipe.img");
    export(&src, &file_img, &args0);
    export_to_stdout(&src, &pipe_img, &args0);
    btrfs_check(&pipe_img);
    {
        let m = LoopMount::new(&pipe_img, false);
        compare_trees(&src, m.path(), CompareOpts::for_builder());
        m.unmount();
    }
    if is_mkfs_mode() {
        say("SKIPPED stdout_export byte comparison: mkfs mode");
        return;
    }
    assert_files_identical(&file_img, &pipe_img);
}

#[test]
fn usr_share_doc() {
    if !system_tests_available("usr_share_doc") {
        return;
    }
    let doc = Path::new("/usr/share/doc");
    if !doc.is_dir() && !skip_or_panic("usr_share_doc", "/usr/share/doc does not exist") {
        return;
    }
    let work = workdir("doc");
    let src = work.path().join("doc");
    run_ok(
        std::process::Command::new(tool("cp"))
            .arg("-a")
            .arg(doc)
            .arg(&src),
    );
    let img = work.path().join("doc.img");
    export(&src, &img, &[]);
    btrfs_check(&img);
    {
        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::for_builder());
        m.unmount();
    }
    rw_cycle(&img);
}

/// The comparison must actually notice differences (no image involved).
#[test]
fn harness_detects_differences() {
    if !system_tests_available("harness_detects_differences") {
        return;
    }
    let work = workdir("selftest");
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let mut t = TreeBuilder::new(&a);
    t.random_file(b"f", 3 * MIB, 1);
    t.file(b"g", b"gg");
    t.file(b"h1", b"h");
    t.hardlink(b"h1", b"h2");
    t.symlink(b"s", b"f");
    t.char_dev(b"c", 1, 3);
    t.sparse_file(b"sp", 40 * MIB, &[(20 * MIB, b"x")]);
    t.sparse_file(b"sp2", 40 * MIB, &[(20 * MIB, b"x")]);
    t.file(b"\xff", b"");
    t.xattr(b"g", b"user.x", b"1");
    t.finalize();
    run_ok(
        std::process::Command::new(tool("cp"))
            .arg("-a")
            .arg(&a)
            .arg(&b),
    );
    let diffs = tree_differences(&a, &b, CompareOpts::default());
    assert!(diffs.is_empty(), "cp -a copy differs: {diffs:#?}");

    // Mutate the copy in many ways at once.
    let p = |r: &str| b.join(r);
    let f = fs::OpenOptions::new().write(true).open(p("f")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"!", 2 * MIB + 5).unwrap();
    drop(f);
    set_times(&p("f"), 1_500_000_000, 1).unwrap();
    set_xattr(&p("g"), b"user.x", b"2").unwrap();
    fs::remove_file(p("h2")).unwrap();
    fs::write(p("h2"), b"h").unwrap();
    fs::remove_file(p("s")).unwrap();
    std::os::unix::fs::symlink("g", p("s")).unwrap();
    fs::write(p("new"), b"").unwrap();
    let sp = fs::OpenOptions::new().write(true).open(p("sp")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sp, b"y", 30 * MIB).unwrap();
    drop(sp);
    // Same content, holes filled in with zeros.
    let mut zeros = vec![0u8; 40 * MIB as usize];
    zeros[20 * MIB as usize] = b'x';
    fs::write(p("sp2"), &zeros).unwrap();
    fs::remove_file(p("c")).unwrap();
    let c = std::ffi::CString::new(p("c").into_os_string().into_encoded_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) },
        0
    );
    std::os::unix::fs::lchown(p("g"), Some(7), None).unwrap();

    let diffs = tree_differences(&a, &b, CompareOpts::default());
    let text = diffs.join("\n");
    for needle in [
        "/f: content differs at byte offset 2097157",
        "/f: mtime",
        "/g: xattrs differ",
        "/g: owner",
        "/h2: hard-link group",
        "/h1: link count",
        "/s: symlink target",
        "/new: unexpected entry in image",
        "/sp: content differs at byte offset 31457280",
        "/sp2: data ranges [(20971520, 20975616)] vs [(0, 41943040)]",
        "/c: rdev 1:3 vs 1:5",
        "/: mtime",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }

    // Byte-level comparison must notice a single changed byte.
    let (x, y) = (work.path().join("x"), work.path().join("y"));
    write_random_file(&x, 5 * MIB, 4);
    fs::copy(&x, &y).unwrap();
    assert_files_identical(&x, &y);
    let f = fs::OpenOptions::new().write(true).open(&y).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0], 4 * MIB + 1).unwrap();
    drop(f);
    let r = std::panic::catch_unwind(|| assert_files_identical(&x, &y));
    let msg = r.expect_err("assert_files_identical missed a difference");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("[4194304]"), "unexpected message: {msg}");
}

/// `--no-rw-slack` gives the smallest image; `plan --bytes` predicts every
/// image's exact size; the slack-free image still grows and takes writes.
#[test]
fn no_rw_slack_and_planned_size() {
    if !system_tests_available("no_rw_slack_and_planned_size") {
        return;
    }
    if is_mkfs_mode() {
        say("SKIPPED no_rw_slack_and_planned_size: btrfsimg-only options");
        return;
    }
    let work = workdir("noslack");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    for i in 0..300u64 {
        t.random_file(format!("d{}/f{i}", i % 7).as_bytes(), (i * 997) % 20000, i);
    }
    t.finalize();
    let mut sizes = Vec::new();
    for (name, extra) in [("slack", vec![]), ("noslack", vec!["--no-rw-slack"])] {
        let mut args = fixed_args("0b0d0a0e-0002-4000-8000-000000000077");
        args.extend(extra.iter().copied());
        let img = work.path().join(format!("{name}.img"));
        export(&src, &img, &args);
        btrfs_check(&img);
        let planned = run_ok(
            std::process::Command::new(btrfsimg_bin())
                .arg("plan")
                .arg("--bytes")
                .arg(&src)
                .args(&args),
        );
        let len = fs::metadata(&img).unwrap().len();
        assert_eq!(planned.trim(), len.to_string(), "plan --bytes for {name}");
        let m = LoopMount::new(&img, false);
        compare_trees(&src, m.path(), CompareOpts::default());
        m.unmount();
        rw_cycle(&img);
        sizes.push(len);
    }
    assert!(
        sizes[1] + (8 << 20) < sizes[0],
        "no slack must save the first-boot reserve: {sizes:?}"
    );
}

//! `--base-layout`: an update keeps every unchanged file's extents where
//! the base record says they were, fills the space removed files freed
//! before it grows, keeps the base's chunks, gives the same bytes every
//! time and from every frontend, and holds every file's bytes where its
//! record says; a base that does not fit (other options, corrupt, another
//! version, hostile) is a one-line error, or with --base-layout-optional a
//! warning and a fresh layout. Needs no privileges (the kernel's view of
//! updates is in update_system).

mod common;

use btrfsimg::plan::record::{self, FileRecord, Record};
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const UUID: &str = "0b0d0a0e-0015-4000-8000-000000000001";

/// Store paths `p00..p39` (sizes 5 KiB to 300 KiB, a few of a MiB), minus
/// `skip`, plus `extra` new ones; `etc/conf` holds `conf`.
fn tree(src: &Path, skip: &[u64], extra: &[(u64, u64)], conf: &[u8], text: bool) {
    let mut t = TreeBuilder::new(src);
    for i in (0..40u64).filter(|i| !skip.contains(i)) {
        let size = if i % 10 == 3 {
            1 << 20
        } else {
            5000 + i * 7000
        };
        let dir = format!("nix/store/{i:02}aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-p{i}");
        t.random_file(format!("{dir}/lib/data").as_bytes(), size, i);
        t.random_file(format!("{dir}/share/small").as_bytes(), 3000 + i, 100 + i);
        if text {
            t.file(
                format!("{dir}/share/text").as_bytes(),
                format!("line of package {i}\n").repeat(4000).as_bytes(),
            );
        }
    }
    for &(n, size) in extra {
        let dir = format!("nix/store/{n:02}zzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-new{n}");
        t.random_file(format!("{dir}/lib/data").as_bytes(), size, 1000 + n);
        if text {
            t.file(
                format!("{dir}/share/text").as_bytes(),
                format!("line of new package {n}\n").repeat(3000).as_bytes(),
            );
        }
    }
    if text && !extra.is_empty() {
        // The same bytes as p3's data, after it in placement order
        // (deeper: source nodes are breadth first): with --dedupe the content
        // pass writes them (into freed space), finds the copy and takes it
        // back.
        t.random_file(b"var/lib/a/b/c/copy", 1 << 20, 3);
    }
    t.file(b"etc/conf", conf);
    t.random_file(b"etc/big-conf", 20_000, 7);
    t.finalize();
}

fn by_path(r: &Record) -> BTreeMap<Vec<u8>, &FileRecord> {
    r.files.iter().map(|f| (f.path(), f)).collect()
}

fn same_identity(a: &FileRecord, b: &FileRecord) -> bool {
    a.size == b.size && a.mtime == b.mtime && a.mode == b.mode
}

/// Every recorded extent holds the file's bytes (raw extents) at its
/// physical address in `img`.
fn check_raw_extents(r: &Record, img: &Path, src: &Path) {
    let image = fs::File::open(img).unwrap();
    for f in r.files.iter().filter(|f| f.stored == "extents") {
        let rel = String::from_utf8(f.path()).unwrap();
        let want = fs::read(src.join(rel.trim_start_matches('/'))).unwrap();
        for &(off, logical, disk, _, ref algo) in f.extents.iter().filter(|e| e.4.is_none()) {
            assert!(algo.is_none());
            let mut got = vec![0u8; disk as usize];
            image.read_exact_at(&mut got, physical(r, logical)).unwrap();
            let n = (want.len() as u64 - off).min(disk) as usize;
            assert!(
                got[..n] == want[off as usize..off as usize + n],
                "{rel} at {off}"
            );
        }
    }
}

fn export_with(src: &Path, img: &Path, extra: &[&str]) -> String {
    let mut args = fixed_args(UUID);
    args.extend(extra);
    export_sources(Some(src), img, &args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn unchanged_files_keep_their_extents_and_new_data_fills_freed_space() {
    let work = workdir("base-layout");
    let (v1, v2, v3) = (
        work.path().join("v1"),
        work.path().join("v2"),
        work.path().join("v3"),
    );
    tree(&v1, &[], &[], b"one", false);
    // v2: four paths go (about 1.1 MiB), three smaller ones come.
    tree(
        &v2,
        &[3, 5, 20, 31],
        &[(1, 150_000), (2, 400_000), (3, 90_000)],
        b"two, longer than one",
        false,
    );
    let (i1, l1) = (work.path().join("v1.img"), work.path().join("v1.layout"));
    export_with(&v1, &i1, &["--write-layout", s(&l1)]);
    let (i2, l2) = (work.path().join("v2.img"), work.path().join("v2.layout"));
    export_with(
        &v2,
        &i2,
        &["--base-layout", s(&l1), "--write-layout", s(&l2)],
    );
    let (r1, r2) = (read_record(&l1), read_record(&l2));
    check_raw_extents(&r2, &i2, &v2);
    // Nothing changed: the same image.
    let same = work.path().join("same.img");
    export_with(&v1, &same, &["--base-layout", s(&l1)]);
    assert!(fs::read(&same).unwrap() == fs::read(&i1).unwrap());
    let (kept, all) = kept_tree_blocks(&v1, &l1);
    assert_eq!(kept, all, "nothing changed: every tree block where it was");
    let (kept, all) = kept_tree_blocks(&v2, &l1);
    assert!(kept * 2 > all, "{kept} of {all} tree blocks kept");

    // Unchanged files: the same extents. Changed or new ones: elsewhere,
    // but inside v1's data chunks (the freed space holds them).
    let old = by_path(&r1);
    let mut kept = 0;
    let mut placed_new = 0;
    for f in &r2.files {
        match old.get(&f.path()) {
            Some(o) if same_identity(o, f) => {
                assert_eq!(o.extents, f.extents, "{:?}", f.path);
                kept += f.extents.len();
            }
            _ => placed_new += f.extents.len(),
        }
    }
    assert!(
        kept > 60 && placed_new >= 3,
        "{kept} kept, {placed_new} new"
    );
    let data = |r: &Record| -> Vec<(u64, u64)> {
        r.header
            .chunks
            .iter()
            .filter(|c| c.ty == "data")
            .map(|c| (c.logical, c.length))
            .collect()
    };
    assert_eq!(data(&r2), data(&r1), "the new data fits the freed space");
    for c in r1.header.chunks.iter().filter(|c| c.ty != "data") {
        assert!(r2.header.chunks.contains(c), "{c:?} kept");
    }

    // The same inputs and base: the same bytes; from stdout too.
    let again = work.path().join("again.img");
    export_with(&v2, &again, &["--base-layout", s(&l1)]);
    assert!(fs::read(&again).unwrap() == fs::read(&i2).unwrap());
    let piped = work.path().join("piped.img");
    let mut args = fixed_args(UUID);
    args.extend(["--base-layout", s(&l1)]);
    export_to_stdout(&v2, &piped, &args);
    assert!(fs::read(&piped).unwrap() == fs::read(&i2).unwrap());
    // plan with a base: the same record.
    let l2p = work.path().join("plan.layout");
    let mut pargs = fixed_args(UUID);
    pargs.extend(["--base-layout", s(&l1), "--write-layout", s(&l2p)]);
    run_ok(
        Command::new(btrfsimg_bin())
            .arg("plan")
            .arg(&v2)
            .args(&pargs),
    );
    assert_eq!(fs::read(&l2p).unwrap(), fs::read(&l2).unwrap());

    // v3 adds more than the freed space holds: a data chunk after
    // everything v2 allocated; v2's chunks stay.
    tree(
        &v3,
        &[3, 5, 20, 31, 13],
        &[(1, 150_000), (2, 400_000), (3, 90_000), (4, 9 << 20)],
        b"three",
        false,
    );
    let (i3, l3) = (work.path().join("v3.img"), work.path().join("v3.layout"));
    export_with(
        &v3,
        &i3,
        &["--base-layout", s(&l2), "--write-layout", s(&l3)],
    );
    let r3 = read_record(&l3);
    check_raw_extents(&r3, &i3, &v3);
    for c in &r2.header.chunks {
        assert!(r3.header.chunks.contains(c), "{c:?} kept");
    }
    let end2 = r2
        .header
        .chunks
        .iter()
        .flat_map(|c| c.stripes.iter().map(move |s| s + c.length))
        .max()
        .unwrap();
    assert!(
        r3.header
            .chunks
            .iter()
            .any(|c| c.ty == "data" && c.logical >= end2),
        "a new data chunk after v2's end"
    );
    let old = by_path(&r2);
    for f in &r3.files {
        if let Some(o) = old.get(&f.path()).filter(|o| same_identity(o, f)) {
            assert_eq!(o.extents, f.extents, "{:?}", f.path);
        }
    }
}

#[test]
fn compressed_and_deduplicated_updates_keep_their_extents() {
    let work = workdir("base-layout-zstd");
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    tree(&v1, &[], &[], b"one", true);
    tree(&v2, &[7, 8], &[(1, 100_000)], b"two", true);
    for extra in [
        &["--compress", "zstd"][..],
        &["--compress", "zstd", "--dedupe"],
    ] {
        let (i1, l1) = (work.path().join("v1.img"), work.path().join("v1.layout"));
        let mut a = extra.to_vec();
        a.extend(["--write-layout", s(&l1)]);
        export_with(&v1, &i1, &a);
        let (i2, l2) = (work.path().join("v2.img"), work.path().join("v2.layout"));
        let mut a = extra.to_vec();
        a.extend(["--base-layout", s(&l1), "--write-layout", s(&l2)]);
        export_with(&v2, &i2, &a);
        let (r1, r2) = (read_record(&l1), read_record(&l2));
        let old = by_path(&r1);
        let mut zstd_kept = 0;
        for f in &r2.files {
            if let Some(o) = old.get(&f.path()).filter(|o| same_identity(o, f)) {
                assert_eq!(o.extents, f.extents, "{:?}", f.path);
                zstd_kept += f
                    .extents
                    .iter()
                    .filter(|e| e.4.as_deref() == Some("zstd"))
                    .count();
            }
        }
        assert!(zstd_kept >= 38, "{zstd_kept} compressed extents kept");
        // The file export writes data during the content pass; stdout
        // does not: the same bytes.
        let piped = work.path().join("piped.img");
        let mut args = fixed_args(UUID);
        args.extend(extra);
        args.extend(["--base-layout", s(&l1)]);
        export_to_stdout(&v2, &piped, &args);
        assert!(
            fs::read(&piped).unwrap() == fs::read(&i2).unwrap(),
            "{extra:?}"
        );
        for p in [&i1, &i2, &piped, &l1, &l2] {
            fs::remove_file(p).unwrap();
        }
    }
}

fn first_extent(files: &mut [serde_json::Value]) -> usize {
    files
        .iter()
        .position(|f| f["extents"].as_array().is_some_and(|e| !e.is_empty()))
        .unwrap()
}

/// The numbers of the first line of `plan`'s summary that `pick` takes.
fn plan_numbers(src: &Path, args: &[&str], pick: impl Fn(&str) -> bool) -> Vec<u64> {
    let out = run_ok(Command::new(btrfsimg_bin()).arg("plan").arg(src).args(args));
    let line = out
        .lines()
        .find(|l| pick(l))
        .unwrap_or_else(|| panic!("no such line in {out}"));
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect()
}

/// `plan`'s count of tree blocks at their base addresses, and of all.
fn kept_tree_blocks(src: &Path, base: &Path) -> (u64, u64) {
    let mut args = fixed_args(UUID);
    args.extend(["--base-layout", s(base)]);
    let n = plan_numbers(src, &args, |l| l.contains("tree blocks at their base"));
    (n[0], n[1])
}

/// The numbers of `plan`'s `update:` line: kept, in freed space, after
/// the base, free left.
fn update_line(src: &Path, args: &[&str]) -> (u64, u64, u64, u64) {
    let n = plan_numbers(src, args, |l| l.starts_with("update: "));
    // N files keep B bytes; X in freed space, Y after the base; Z free.
    (n[1], n[2], n[3], n[4])
}

#[test]
fn space_an_unchanged_file_gives_up_is_free_for_the_files_after_it() {
    let work = workdir("base-layout-release");
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let mut t = TreeBuilder::new(&v1);
    t.random_file(b"nix/store/x/lib/a", 1 << 20, 3)
        .random_file(b"nix/store/y/lib/b", 300_000, 4);
    t.finalize();
    // v2: a copy of `a` before it in inode order (shallower) takes its
    // data under --dedupe, so `a` gives its reserved MiB up; a new MiB
    // deeper in the tree, after `a`, goes there and not after the base.
    let mut t = TreeBuilder::new(&v2);
    t.random_file(b"nix/store/x/lib/a", 1 << 20, 3)
        .random_file(b"nix/store/y/lib/b", 300_000, 4)
        .random_file(b"copy", 1 << 20, 3)
        .random_file(b"nix/store/z/lib/deep/new", 1 << 20, 5);
    t.finalize();
    let l1 = work.path().join("v1.layout");
    let z = ["--compress", "zstd", "--dedupe"];
    let mut a = z.to_vec();
    a.extend(["--write-layout", s(&l1)]);
    export_with(&v1, &work.path().join("v1.img"), &a);
    let mut update = z.to_vec();
    update.extend(["--base-layout", s(&l1)]);
    let mut a = fixed_args(UUID);
    a.extend(&update);
    let (kept, in_gaps, after, _) = update_line(&v2, &a);
    assert_eq!(kept, 300_000u64.div_ceil(4096) * 4096, "b keeps its place");
    assert_eq!(in_gaps + after, 2 << 20, "the copy and the new file");
    assert!(in_gaps >= 1 << 20, "{in_gaps} in freed space");
    // The new file is exactly where `a` was.
    let l2 = work.path().join("v2.layout");
    let mut a2 = a.clone();
    a2.extend(["--write-layout", s(&l2)]);
    update_line(&v2, &a2);
    let (r1, r2) = (read_record(&l1), read_record(&l2));
    let ranges = |r: &Record, p: &str| -> Vec<(u64, u64)> {
        let f = r
            .files
            .iter()
            .find(|f| f.path.as_deref() == Some(p))
            .expect(p);
        f.extents.iter().map(|e| (e.1, e.1 + e.2)).collect()
    };
    let mut was_a = ranges(&r1, "/nix/store/x/lib/a");
    let mut new = ranges(&r2, "/nix/store/z/lib/deep/new");
    was_a.sort();
    new.sort();
    assert_eq!(new, was_a, "the new file took a's place");
    // The file export (which writes during the content pass) agrees.
    let img = work.path().join("v2.img");
    export_with(&v2, &img, &update);
    let piped = work.path().join("piped.img");
    export_to_stdout(&v2, &piped, &a);
    assert!(fs::read(&piped).unwrap() == fs::read(&img).unwrap());
}

/// Writes `rec` with its header changed by `edit_header` and its files by
/// `edit_files`.
fn edited(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut serde_json::Value, &mut Vec<serde_json::Value>),
) {
    let text = fs::read_to_string(from).unwrap();
    let mut lines = text.lines();
    let mut header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let mut files: Vec<serde_json::Value> =
        lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    edit(&mut header, &mut files);
    let mut out = serde_json::to_string(&header).unwrap() + "\n";
    for f in files {
        out += &(serde_json::to_string(&f).unwrap() + "\n");
    }
    fs::write(to, out).unwrap();
}

/// The first line of kind `kind` ("entry" or "block").
fn line_of(lines: &[serde_json::Value], kind: &str) -> usize {
    lines
        .iter()
        .position(|l| l.get(kind).is_some())
        .expect("a line of that kind")
}

/// An update keeps its base's filesystem UUID unless `--uuid` says
/// otherwise, and a version-1 record (files only, no entry or block lines)
/// is still a base: unchanged files keep their extents.
#[test]
fn an_update_keeps_the_uuid_and_reads_version_1_records() {
    let work = workdir("base-layout-uuid");
    let src = work.path().join("src");
    tree(&src, &[], &[], b"one", false);
    let v1 = work.path().join("v1.layout");
    let img = work.path().join("v1.img");
    export_sources(Some(&src), &img, &["--write-layout", s(&v1)]);
    let r1 = read_record(&v1);
    assert_eq!(r1.header.version, 2);
    assert!(!r1.entries.is_empty() && !r1.blocks.is_empty());
    let src2 = work.path().join("src2");
    tree(&src2, &[5], &[(1, 70_000)], b"two", false);
    let uuid_of = |args: &[&str]| -> String {
        let out = run_ok(
            Command::new(btrfsimg_bin())
                .arg("plan")
                .arg(&src2)
                .args(args),
        );
        out.lines()
            .find_map(|l| l.strip_prefix("uuid: "))
            .expect("a uuid line")
            .to_string()
    };
    assert_eq!(uuid_of(&["--base-layout", s(&v1)]), r1.header.fsid);
    assert_ne!(uuid_of(&[]), r1.header.fsid, "a fresh plan derives its own");
    assert_eq!(
        uuid_of(&["--base-layout", s(&v1), "--uuid", UUID]),
        UUID,
        "--uuid wins"
    );

    // The same record as version 1.
    let old = work.path().join("old.layout");
    edited(&v1, &old, |h, f| {
        h["version"] = 1.into();
        f.retain(|l| l.get("entry").is_none() && l.get("block").is_none());
    });
    let (out_new, out_old) = (work.path().join("new.img"), work.path().join("old.img"));
    let l_new = work.path().join("new.layout");
    let l_old = work.path().join("old-out.layout");
    export_sources(
        Some(&src2),
        &out_new,
        &["--base-layout", s(&v1), "--write-layout", s(&l_new)],
    );
    export_sources(
        Some(&src2),
        &out_old,
        &["--base-layout", s(&old), "--write-layout", s(&l_old)],
    );
    let (a, b) = (read_record(&l_new), read_record(&l_old));
    assert_eq!(
        a.files, b.files,
        "the same data placement from either version"
    );
    assert_eq!(a.header.fsid, b.header.fsid);
}

#[test]
fn a_base_that_does_not_fit_is_refused_or_with_optional_ignored() {
    let work = workdir("base-layout-bad");
    let src = work.path().join("src");
    tree(&src, &[], &[], b"one", false);
    let base = work.path().join("v1.layout");
    export_with(
        &src,
        &work.path().join("v1.img"),
        &["--write-layout", s(&base)],
    );
    let fresh = work.path().join("fresh.img");
    export_with(&src, &fresh, &[]);
    let out = work.path().join("out.img");
    let bad = work.path().join("bad.layout");

    // Other options.
    for (args, theirs) in [
        (&["--nodesize", "4096"][..], "node size 16384"),
        (&["--csum", "xxhash"], "checksum crc32c"),
        (&["--metadata", "single"], "metadata profile dup"),
        (&["--compress", "zstd"], "compression none"),
        (&["--dedupe"], "dedupe off"),
    ] {
        let mut a = fixed_args(UUID);
        a.extend(args);
        a.extend(["--base-layout", s(&base)]);
        let line = export_sources_fails(Some(&src), &out, &a);
        assert_error_line(
            &line,
            &["v1.layout", "the base layout was made with", theirs],
            &format!("{args:?}"),
        );
    }

    // Corrupt, foreign or hostile records.
    type Edit = Box<dyn FnOnce(&mut serde_json::Value, &mut Vec<serde_json::Value>)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "version 3",
            Box::new(|h, _| h["version"] = 3.into()),
            &["line 1", "version 3"],
        ),
        (
            "another format",
            Box::new(|h, _| h["format"] = "other".into()),
            &["line 1", "format 'other'"],
        ),
        (
            "overlapping extents",
            Box::new(|_, f| {
                let i = first_extent(f);
                let e = f[i]["extents"][0].clone();
                let j = (i + 1..f.len())
                    .find(|&j| f[j]["extents"].as_array().is_some_and(|e| !e.is_empty()))
                    .unwrap();
                f[j]["extents"][0][1] = e[1].clone();
            }),
            &["overlaps"],
        ),
        (
            "an extent outside the data chunks",
            Box::new(|_, f| {
                let i = first_extent(f);
                f[i]["extents"][0][1] = (1u64 << 40).into();
            }),
            &["not inside a data chunk"],
        ),
        (
            "an unaligned extent",
            Box::new(|_, f| {
                let i = first_extent(f);
                let l = f[i]["extents"][0][1].as_u64().unwrap();
                f[i]["extents"][0][1] = (l + 1).into();
            }),
            &["not an extent's"],
        ),
        (
            "overlapping chunks",
            Box::new(|h, _| {
                let c = h["chunks"][0].clone();
                h["chunks"].as_array_mut().unwrap().push(c);
            }),
            &["line 1", "overlap"],
        ),
        (
            "a chunk beyond the largest image",
            Box::new(|h, _| {
                let n = h["chunks"].as_array().unwrap().len();
                h["chunks"][n - 1]["logical"] = (1u64 << 63).into();
                h["chunks"][n - 1]["stripes"][0] = (1u64 << 63).into();
            }),
            &["line 1", "out of range"],
        ),
        (
            "a metadata chunk of 2^61 bytes",
            Box::new(|h, _| {
                let c = serde_json::json!({"type": "metadata", "logical": 1u64 << 40,
                    "length": 1u64 << 61, "stripes": [1u64 << 40, (1u64 << 40) + (1u64 << 61)]});
                h["chunks"].as_array_mut().unwrap().push(c);
            }),
            &["line 1", "over 1 GiB"],
        ),
        (
            "a data chunk at 4 EiB",
            Box::new(|h, _| {
                let c = serde_json::json!({"type": "data", "logical": 1u64 << 62,
                    "length": 1u64 << 30, "stripes": [1u64 << 62]});
                h["chunks"].as_array_mut().unwrap().push(c);
            }),
            &["line 1", "not a layout this tool made"],
        ),
        (
            "a file of 2^64 - 1 bytes",
            Box::new(|_, f| {
                let i = first_extent(f);
                f[i]["size"] = u64::MAX.into();
            }),
            &["past the file's size"],
        ),
        (
            "a path twice",
            Box::new(|_, f| {
                let x = f[0].clone();
                f.insert(1, x);
            }),
            &["recorded twice"],
        ),
        (
            "an inode number out of range",
            Box::new(|_, f| {
                let i = line_of(f, "entry");
                f[i + 3]["entry"][1] = (1u64 << 60).into();
            }),
            &["inode number", "out of range"],
        ),
        (
            "an entry twice",
            Box::new(|_, f| {
                let i = line_of(f, "entry");
                let x = f[i + 2].clone();
                f.insert(i + 2, x);
            }),
            &["recorded twice"],
        ),
        (
            "a tree block outside the metadata chunks",
            Box::new(|_, f| {
                let i = line_of(f, "block");
                f[i]["block"][5] = (1u64 << 40).into();
            }),
            &["not a node inside a metadata chunk"],
        ),
        (
            "two tree blocks at one address",
            Box::new(|_, f| {
                let i = line_of(f, "block");
                let x = f[i].clone();
                f.insert(i + 1, x);
            }),
            &["two tree blocks at"],
        ),
        (
            "a file line among the block lines",
            Box::new(|_, f| {
                let x = f[0].clone();
                f.push(x);
            }),
            &["a file line after the entry or block lines"],
        ),
    ];
    for (what, edit, fragments) in cases {
        edited(&base, &bad, edit);
        let mut a = fixed_args(UUID);
        a.extend(["--base-layout", s(&bad)]);
        let line = export_sources_fails(Some(&src), &out, &a);
        let mut want = vec!["bad.layout"];
        want.extend(fragments);
        assert_error_line(&line, &want, what);
    }
    for (what, bytes) in [
        ("garbage", &b"\x00\x01garbage\n"[..]),
        ("empty", b""),
        ("a header only", b"{\"format\": \"btrfsimg-layout\"}\n"),
    ] {
        fs::write(&bad, bytes).unwrap();
        let mut a = fixed_args(UUID);
        a.extend(["--base-layout", s(&bad)]);
        let line = export_sources_fails(Some(&src), &out, &a);
        assert_error_line(&line, &["bad.layout"], what);
    }
    // Not regular files: refused without reading (a FIFO must not hang).
    let fifo = work.path().join("fifo.layout");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for p in [fifo.as_path(), Path::new("/dev/zero"), work.path()] {
        let mut a = fixed_args(UUID);
        a.extend(["--base-layout", s(p)]);
        let line = export_sources_fails(Some(&src), &out, &a);
        assert_error_line(&line, &[s(p), "not a regular file"], s(p));
    }
    // A line longer than any record has: refused without reading it whole.
    let f = fs::File::create(&bad).unwrap();
    f.set_len(record::MAX_LINE + 10).unwrap();
    drop(f);
    let mut a = fixed_args(UUID);
    a.extend(["--base-layout", s(&bad)]);
    let line = export_sources_fails(Some(&src), &out, &a);
    assert_error_line(&line, &["bad.layout", "line 1", "longer than"], "long line");

    let missing = work.path().join("missing.layout");
    let mut a = fixed_args(UUID);
    a.extend(["--base-layout", s(&missing)]);
    let line = export_sources_fails(Some(&src), &out, &a);
    assert_error_line(&line, &["missing.layout", "No such file"], "missing");

    // Optional: a warning, and the fresh layout's bytes.
    for base in [&missing, &bad] {
        let mut a = fixed_args(UUID);
        a.extend(["--base-layout", s(base), "--base-layout-optional"]);
        let stderr = export_sources(Some(&src), &out, &a);
        assert!(
            stderr.contains("planning a fresh layout") && !stderr.contains("panicked"),
            "{stderr}"
        );
        assert!(fs::read(&out).unwrap() == fs::read(&fresh).unwrap());
        fs::remove_file(&out).unwrap();
    }
    let o = run(Command::new(btrfsimg_bin())
        .arg("plan")
        .arg(&src)
        .arg("--base-layout-optional"));
    assert_eq!(o.status.code(), Some(2), "optional needs a base");
}

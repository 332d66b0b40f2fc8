//! `export --bmap` through bmaptool (bmap-tools 3.6): `bmaptool copy` of the
//! plain and the `--zstd` image (its bmap found by name) gives the exported
//! bytes and checks every range's SHA-256 and the file's own checksum; the
//! bmap is the same bytes however the image is written (file, stdout,
//! `--zstd`, `--compress` written by the content pass, any `--threads`); a
//! flipped byte in a mapped range is a checksum error; MappedBlocksCount is
//! the number of non-hole blocks of `btrfsimg mount`'s fs.img; and flashing
//! onto a loop device full of random bytes and an old ext4 leaves a btrfs
//! that blkid, `btrfs check`, the kernel (read-only compare, read-write
//! writes, resize into the garbage, scrub) all find clean. Needs root,
//! loop devices, FUSE, bmaptool, blkid, mkfs.ext4, zstd.

mod common;

use btrfsimg::source::generated::{Content, Entry};
use btrfsimg::source::{Fill, Segment};
use common::*;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const BLOCK: u64 = 4096;

/// Small, large, sparse and text files and many entries: data ranges cut
/// at the 8 MiB grid, holes, several zstd frames, many tree blocks.
fn tree() -> Entry {
    let mut root = BTreeMap::new();
    root.insert(b"big".to_vec(), Entry::file(40 << 20, Fill::Random(1)));
    root.insert(b"text".to_vec(), Entry::file(12 << 20, Fill::Text(2)));
    root.insert(b"zeros".to_vec(), Entry::file(3 << 20, Fill::Zeros));
    // Equal files: with --dedupe the content pass takes the second one's
    // pieces back.
    root.insert(b"copy-a".to_vec(), Entry::file(1 << 20, Fill::Random(77)));
    root.insert(b"copy-b".to_vec(), Entry::file(1 << 20, Fill::Random(77)));
    root.insert(
        b"sparse".to_vec(),
        Entry {
            content: Content::File {
                size: 256 << 20,
                data: Some(vec![
                    Segment {
                        offset: 1 << 20,
                        len: 300_000,
                    },
                    Segment {
                        offset: 100 << 20,
                        len: 9 << 20,
                    },
                    Segment {
                        offset: (256 << 20) - 5000,
                        len: 5000,
                    },
                ]),
                fill: Fill::Random(3),
            },
            ..Entry::file(0, Fill::Zeros)
        },
    );
    let mut many = BTreeMap::new();
    for i in 0..800u64 {
        let size = [0, 1, 100, 2048, 2049, 4096, 5000, 70_000][i as usize % 8];
        let fill = if i % 3 == 0 {
            Fill::Text(i)
        } else {
            Fill::Random(i)
        };
        many.insert(format!("f{i:04}").into_bytes(), Entry::file(size, fill));
    }
    root.insert(b"many".to_vec(), Entry::dir(many));
    Entry::dir(root)
}

/// The tree, materialized on a tmpfs.
fn source(tag: &str) -> (ScratchFs, PathBuf) {
    let tmp = ScratchFs::tmpfs(tag, 200 * MIB);
    let src = tmp.path().join("src");
    materialize(&src, &tree());
    (tmp, src)
}

/// What the tests read from a bmap file (a few lines of text parsing: the
/// oracle that it is valid is bmaptool itself).
#[derive(Debug)]
struct Bmap {
    image_size: u64,
    blocks: u64,
    mapped: u64,
    /// (first, last) blocks, inclusive.
    ranges: Vec<(u64, u64)>,
}

fn field(text: &str, name: &str) -> u64 {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = text.find(&open).expect("field present") + open.len();
    let end = start + text[start..].find(&close).expect("field closed");
    text[start..end].trim().parse().expect("a number")
}

/// `text` without its `<!-- -->` comments (bmaptool's own name the fields).
fn uncommented(mut text: &str) -> String {
    let mut out = String::new();
    while let Some(i) = text.find("<!--") {
        out.push_str(&text[..i]);
        let rest = &text[i..];
        text = rest.find("-->").map_or("", |j| &rest[j + 3..]);
    }
    out.push_str(text);
    out
}

fn parse_bmap(p: &Path) -> Bmap {
    let text = uncommented(&fs::read_to_string(p).unwrap());
    let ranges = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let body = l.strip_prefix("<Range")?;
            let inner = body.split_once('>')?.1.split_once("</Range>")?.0.trim();
            Some(match inner.split_once('-') {
                Some((a, b)) => (a.trim().parse().unwrap(), b.trim().parse().unwrap()),
                None => (inner.parse().unwrap(), inner.parse().unwrap()),
            })
        })
        .collect();
    Bmap {
        image_size: field(&text, "ImageSize"),
        blocks: field(&text, "BlocksCount"),
        mapped: field(&text, "MappedBlocksCount"),
        ranges,
    }
}

fn bmaptool_available(what: &str) -> bool {
    system_tests_available(what) && tools_available(what, &["bmaptool", "cmp", "zstd"])
}

/// `bmaptool copy [--bmap BMAP] IMAGE DEST`; returns (success, output).
fn bmaptool_copy(bmap: Option<&Path>, image: &Path, dest: &Path) -> (bool, String) {
    let mut cmd = Command::new(tool("bmaptool"));
    cmd.arg("copy");
    if let Some(b) = bmap {
        cmd.arg("--bmap").arg(b);
    }
    cmd.arg(image).arg(dest);
    let o = run(&mut cmd);
    (o.status.success(), output_text(&o))
}

fn copy_ok(bmap: Option<&Path>, image: &Path, dest: &Path) -> String {
    let (ok, out) = bmaptool_copy(bmap, image, dest);
    assert!(ok, "bmaptool copy of {} failed:\n{out}", image.display());
    out
}

fn same_bytes(a: &Path, b: &Path) {
    run_ok(Command::new(tool("cmp")).arg(a).arg(b));
}

/// The plain image and the `--zstd` one, each copied by bmaptool with its
/// bmap, give the exported bytes; bmaptool finds `fs.img.bmap` next to
/// `fs.img.zst` by itself (3.6 tries IMAGE.bmap, then strips one extension
/// at a time: `fs.img.zst.bmap`, `fs.img.bmap`, `fs.bmap`); the two bmaps
/// are the same file, and bmaptool reports their MappedBlocksCount.
#[test]
fn bmaptool_copy_gives_the_exported_bytes() {
    let what = "bmaptool_copy_gives_the_exported_bytes";
    if !bmaptool_available(what) {
        return;
    }
    let (_tmp, src) = source("bmap-copy");
    let work = workdir("bmap-copy");
    let args = fixed_args("0b0d0a0e-0b00-4000-8000-000000000001");
    let (plain, zdir) = (work.path().join("plain"), work.path().join("zst"));
    fs::create_dir(&plain).unwrap();
    fs::create_dir(&zdir).unwrap();

    let img = plain.join("fs.img");
    let bmap = plain.join("fs.img.bmap");
    let mut a = args.clone();
    a.extend(["--bmap", bmap.to_str().unwrap()]);
    export(&src, &img, &a);
    btrfs_check(&img);
    let out = work.path().join("out.img");
    let log = copy_ok(Some(&bmap), &img, &out);
    same_bytes(&img, &out);
    let b = parse_bmap(&bmap);
    assert!(
        log.contains(&format!("mapped {} blocks", b.mapped)),
        "bmaptool read another block count:\n{log}"
    );
    assert_eq!(b.image_size, fs::metadata(&img).unwrap().len());

    let zst = zdir.join("fs.img.zst");
    let zbmap = zdir.join("fs.img.bmap");
    let mut a = args.clone();
    a.extend(["--zstd", "--bmap", zbmap.to_str().unwrap()]);
    export(&src, &zst, &a);
    assert_eq!(fs::read(&zbmap).unwrap(), fs::read(&bmap).unwrap());
    let decoded = work.path().join("decoded.img");
    zstd_decompress(&zst, &decoded);
    same_bytes(&img, &decoded);
    // Found by name.
    let zout = work.path().join("zout.img");
    let log = copy_ok(None, &zst, &zout);
    let found = format!("discovered bmap file '{}'", zbmap.display());
    assert!(
        log.contains(&found),
        "bmaptool did not find fs.img.bmap:\n{log}"
    );
    same_bytes(&img, &zout);
    // And given explicitly.
    fs::remove_file(&zout).unwrap();
    copy_ok(Some(&zbmap), &zst, &zout);
    same_bytes(&img, &zout);
}

/// One bmap, byte for byte, whether the image goes to a file, to stdout or
/// through `--zstd` (levels 3 and 19, which have other frame lengths), with
/// one thread or four; with `--compress` (the content pass writes the data
/// region into the file, which is then read back for the hashes) also
/// against stdout, `--zstd` and `--dedupe`. bmaptool accepts the ones whose
/// hashes were made differently.
#[test]
fn bmap_is_the_same_however_the_image_is_written() {
    let what = "bmap_is_the_same_however_the_image_is_written";
    if !bmaptool_available(what) {
        return;
    }
    let (_tmp, src) = source("bmap-same");
    let work = workdir("bmap-same");
    for (g, group) in [&[][..], &["--compress", "zstd"][..]].iter().enumerate() {
        let mut base = fixed_args("0b0d0a0e-0b00-4000-8000-000000000002");
        base.extend(group.iter());
        let ways: Vec<(&str, Vec<&str>)> = vec![
            ("file", vec!["--threads", "1"]),
            ("file-4", vec!["--threads", "4"]),
            ("stdout", vec![]),
            ("zstd-1", vec!["--zstd", "--threads", "1"]),
            ("zstd-4", vec!["--zstd", "--threads", "4"]),
            ("zstd19-4", vec!["--zstd=19", "--threads", "4"]),
        ];
        let mut first: Option<(&str, Vec<u8>)> = None;
        for (name, extra) in ways {
            let img = work.path().join(format!("{g}-{name}.img"));
            let bmap = work.path().join(format!("{g}-{name}.bmap"));
            let mut a = base.clone();
            a.extend(extra.iter());
            a.extend(["--bmap", bmap.to_str().unwrap()]);
            if name == "stdout" {
                export_to_stdout(&src, &img, &a);
            } else {
                export(&src, &img, &a);
            }
            let bytes = fs::read(&bmap).unwrap();
            match &first {
                None => first = Some((name, bytes)),
                Some((n, b)) => assert!(
                    &bytes == b,
                    "group {group:?}: the bmap of {name} differs from {n}'s"
                ),
            }
            if !name.starts_with("zstd") {
                let out = work.path().join("out.img");
                let _ = fs::remove_file(&out);
                copy_ok(Some(&bmap), &img, &out);
                same_bytes(&img, &out);
            }
        }
        if g == 1 {
            // Deduplicated: the content pass takes copy-b's pieces back.
            let img = work.path().join("dedupe.img");
            let bmap = work.path().join("dedupe.bmap");
            let mut a = base.clone();
            a.extend(["--dedupe", "--bmap", bmap.to_str().unwrap()]);
            export(&src, &img, &a);
            let out = work.path().join("dedupe-out.img");
            copy_ok(Some(&bmap), &img, &out);
            same_bytes(&img, &out);
        }
        for e in fs::read_dir(work.path()).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
    }
}

/// A byte flipped inside a mapped range (in file data, and in a tree block)
/// makes `bmaptool copy` fail with a checksum mismatch; one flipped in an
/// unmapped block is never read: the copy succeeds and equals the
/// original. An edited bmap fails its own checksum.
#[test]
fn corruption_is_a_checksum_error() {
    let what = "corruption_is_a_checksum_error";
    if !bmaptool_available(what) {
        return;
    }
    let (_tmp, src) = source("bmap-corrupt");
    let work = workdir("bmap-corrupt");
    let img = work.path().join("fs.img");
    let bmap = work.path().join("fs.bmap");
    let mut a = fixed_args("0b0d0a0e-0b00-4000-8000-000000000003");
    a.extend(["--bmap", bmap.to_str().unwrap()]);
    export(&src, &img, &a);
    let b = parse_bmap(&bmap);
    let bad = work.path().join("bad.img");
    let out = work.path().join("out.img");
    let flip = |at: u64| {
        fs::copy(&img, &bad).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&bad)
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ 0x20], at).unwrap();
    };
    // Mapped: the middle of the largest range (file data), and the last
    // range's first block (a tree block or superblock copy).
    let largest = *b.ranges.iter().max_by_key(|(f, l)| l - f).unwrap();
    let last = *b.ranges.last().unwrap();
    for (first, l) in [largest, last] {
        flip((first + l) / 2 * BLOCK + 123);
        let _ = fs::remove_file(&out);
        let (ok, log) = bmaptool_copy(Some(&bmap), &bad, &out);
        assert!(!ok, "a corrupted range {first}-{l} was copied:\n{log}");
        assert!(
            log.contains("checksum mismatch for blocks range"),
            "no checksum error for range {first}-{l}:\n{log}"
        );
    }
    // Unmapped: a block in the first gap between ranges.
    let gap = b
        .ranges
        .windows(2)
        .find(|w| w[1].0 > w[0].1 + 1)
        .map(|w| w[0].1 + 1)
        .expect("an unmapped block");
    flip(gap * BLOCK + 5);
    let _ = fs::remove_file(&out);
    copy_ok(Some(&bmap), &bad, &out);
    same_bytes(&img, &out);
    // The bmap itself.
    let edited = work.path().join("edited.bmap");
    let text = fs::read_to_string(&bmap).unwrap();
    let (f, l) = b.ranges[1];
    let changed = text.replacen(&format!("> {f}-{l} <"), &format!("> {f}-{} <", l - 1), 1);
    assert_ne!(changed, text);
    fs::write(&edited, changed).unwrap();
    let (ok, log) = bmaptool_copy(Some(&edited), &img, &out);
    assert!(
        !ok && log.contains("checksum mismatch for bmap file"),
        "{log}"
    );
}

/// SEEK_DATA/SEEK_HOLE walk of `path`: non-hole 4 KiB blocks as sorted
/// (first, last) runs.
fn non_hole_blocks(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    data_segments(&f, len)
        .into_iter()
        .map(|(s, e)| (s / BLOCK, (e - 1) / BLOCK))
        .collect()
}

fn block_set(runs: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
    runs.iter().flat_map(|&(a, b)| a..=b).collect()
}

/// MappedBlocksCount is the sum of the ranges and the number of non-hole
/// 4 KiB blocks of `btrfsimg mount`'s fs.img, whose SEEK_DATA/SEEK_HOLE
/// runs are the bmap's ranges (merged across the 8 MiB grid). Measured
/// against `bmaptool create` of the exported sparse file, which finds
/// fewer blocks (the export leaves every all-zero 64 KiB grain a hole) and
/// some more (a written grain's unmapped zeros): every block where the two
/// disagree reads as zeros.
#[test]
fn mapped_blocks_are_the_non_hole_blocks_of_fs_img() {
    let what = "mapped_blocks_are_the_non_hole_blocks_of_fs_img";
    if !fuse_available(what) || !bmaptool_available(what) {
        return;
    }
    let (_tmp, src) = source("bmap-count");
    let work = workdir("bmap-count");
    let args = fixed_args("0b0d0a0e-0b00-4000-8000-000000000004");
    let img = work.path().join("fs.img");
    let bmap = work.path().join("fs.img.bmap");
    let mut a = args.clone();
    a.extend(["--bmap", bmap.to_str().unwrap()]);
    export(&src, &img, &a);
    let b = parse_bmap(&bmap);
    let size = fs::metadata(&img).unwrap().len();
    assert_eq!(b.image_size, size);
    assert_eq!(b.blocks, size.div_ceil(BLOCK));
    let sum: u64 = b.ranges.iter().map(|(f, l)| l - f + 1).sum();
    assert_eq!(sum, b.mapped, "ranges add up to MappedBlocksCount");
    for w in b.ranges.windows(2) {
        assert!(w[0].1 < w[1].0, "ranges sorted and disjoint");
    }
    for &(f, l) in &b.ranges {
        assert_eq!(
            f * BLOCK / (8 << 20),
            l * BLOCK / (8 << 20),
            "{f}-{l} crosses the grid"
        );
    }

    let m = FuseMount::start(&src, &work.path().join("mnt"), &args);
    let fuse_runs = non_hole_blocks(&m.img());
    let fuse_blocks: u64 = fuse_runs.iter().map(|(f, l)| l - f + 1).sum();
    assert_eq!(fuse_blocks, b.mapped, "fs.img's non-hole blocks");
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for &(f, l) in &b.ranges {
        match merged.last_mut() {
            Some(last) if last.1 + 1 == f => last.1 = l,
            _ => merged.push((f, l)),
        }
    }
    assert_eq!(
        fuse_runs, merged,
        "fs.img's data runs are the bmap's ranges"
    );
    assert!(m.stop(libc::SIGTERM).success());

    // bmaptool's own map of the sparse export.
    let created = work.path().join("created.bmap");
    run_ok(
        Command::new(tool("bmaptool"))
            .arg("create")
            .arg(&img)
            .arg("-o")
            .arg(&created),
    );
    let c = parse_bmap(&created);
    let ours = block_set(&b.ranges);
    let theirs = block_set(&c.ranges);
    let f = File::open(&img).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut differ = 0u64;
    for &blk in ours.symmetric_difference(&theirs) {
        let n = f.read_at(&mut buf, blk * BLOCK).unwrap();
        assert!(
            buf[..n].iter().all(|&x| x == 0),
            "block {blk}: the maps disagree on a block that is not zeros"
        );
        differ += 1;
    }
    let only_ours = ours.difference(&theirs).count();
    let only_theirs = theirs.difference(&ours).count();
    say(&format!(
        "bmap of a {} MiB image: plan's map {} blocks ({:.1} MiB) in {} ranges, {} bytes; \
         bmaptool create of the sparse export {} blocks ({:.1} MiB) in {} ranges; \
         {only_ours} mapped blocks are holes in the export, {only_theirs} written blocks unmapped \
         ({differ} differ, all zeros)",
        size >> 20,
        b.mapped,
        (b.mapped * BLOCK) as f64 / MIB as f64,
        b.ranges.len(),
        fs::metadata(&bmap).unwrap().len(),
        c.mapped,
        (c.mapped * BLOCK) as f64 / MIB as f64,
        c.ranges.len(),
    ));
    assert!(
        only_ours > 0,
        "the wiped first MiB is mapped, yet a hole in the export"
    );
}

/// A loop device over a file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = run_stdout(
            Command::new(tool("losetup"))
                .args(["-f", "--show"])
                .arg(file),
        );
        LoopDevice(out.trim().to_string())
    }

    fn path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new(tool("losetup"))
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

/// The 4 KiB blocks `blocks` of `dev`.
fn read_blocks(dev: &Path, blocks: &[u64]) -> Vec<Vec<u8>> {
    let f = File::open(dev).unwrap();
    blocks
        .iter()
        .map(|&b| {
            let mut buf = vec![0u8; BLOCK as usize];
            f.read_exact_at(&mut buf, b * BLOCK).unwrap();
            buf
        })
        .collect()
}

fn blkid_probe(dev: &Path) -> (bool, String) {
    let o = run(Command::new(tool("blkid")).arg("-p").arg(dev));
    (o.status.success(), output_text(&o))
}

/// The flashing case: a "used card" (random bytes, then an ext4 made on
/// it) of the image size plus 256 MiB, attached as a loop device; `bmaptool
/// copy` writes only the mapped blocks onto it, and the unmapped ones keep
/// the garbage. blkid then probes btrfs alone (the wiped first MiB removed
/// ext4's superblock), `btrfs check --check-data-csum` is clean, the
/// read-only mount equals the source, and a read-write mount that grows into
/// the garbage, writes, deletes and scrubs, then `btrfs check`, is clean:
/// btrfs never read a block it had not written.
#[test]
fn flashing_onto_a_used_device() {
    let what = "flashing_onto_a_used_device";
    if !bmaptool_available(what) || !tools_available(what, &["blkid", "losetup", "mkfs.ext4"]) {
        return;
    }
    let (_tmp, src) = source("bmap-flash");
    let work = workdir("bmap-flash");
    let img = work.path().join("fs.img");
    let bmap = work.path().join("fs.img.bmap");
    let mut a = fixed_args("0b0d0a0e-0b00-4000-8000-000000000005");
    a.extend(["--bmap", bmap.to_str().unwrap()]);
    export(&src, &img, &a);
    let size = fs::metadata(&img).unwrap().len();

    let card = work.path().join("card");
    {
        let mut f = File::create(&card).unwrap();
        let chunk = 4 * MIB as usize;
        let total = size + 256 * MIB;
        let mut done = 0u64;
        let mut seed = 0xca4d;
        while done < total {
            let n = chunk.min((total - done) as usize);
            f.write_all(&random_bytes(n, seed)).unwrap();
            done += n as u64;
            seed += 1;
        }
        f.sync_all().unwrap();
    }
    // nodiscard: mke2fs would otherwise punch the garbage out of the file.
    run_ok(
        Command::new(tool("mkfs.ext4"))
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(&card),
    );
    let dev = LoopDevice::attach(&card);
    // Unmapped blocks (first, middle and last of each gap between ranges)
    // before flashing.
    let b = parse_bmap(&bmap);
    let gaps: Vec<u64> = b
        .ranges
        .windows(2)
        .filter(|w| w[1].0 > w[0].1 + 1)
        .flat_map(|w| {
            let (first, last) = (w[0].1 + 1, w[1].0 - 1);
            [first, (first + last) / 2, last]
        })
        .collect();
    assert!(gaps.len() >= 9, "{} unmapped blocks sampled", gaps.len());
    let gaps_before = read_blocks(dev.path(), &gaps);
    assert!(gaps_before.iter().any(|b| b.iter().any(|&x| x != 0)));
    let (_, before) = blkid_probe(dev.path());
    assert!(
        before.contains("TYPE=\"ext4\""),
        "the card holds an ext4:\n{before}"
    );

    let log = copy_ok(Some(&bmap), &img, dev.path());
    assert!(
        log.contains("block device"),
        "copied onto the device:\n{log}"
    );
    let (ok, after) = blkid_probe(dev.path());
    assert!(
        ok && after.contains("TYPE=\"btrfs\"") && !after.contains("ext4"),
        "blkid -p after flashing:\n{after}"
    );
    // The unmapped blocks keep what the card held: nothing wrote them.
    assert_eq!(read_blocks(dev.path(), &gaps), gaps_before);
    btrfs_check(dev.path());
    let m = LoopMount::with_options(dev.path(), "ro");
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();

    let m = LoopMount::with_options(dev.path(), "rw");
    run_ok(
        Command::new(tool("btrfs"))
            .args(["filesystem", "resize", "max"])
            .arg(m.path()),
    );
    let big = random_bytes(100 * MIB as usize, 0xb16);
    fs::write(m.path().join("written-big"), &big).unwrap();
    fs::write(m.path().join("many/written-small"), b"small\n").unwrap();
    fs::remove_file(m.path().join("big")).unwrap();
    fs::remove_file(m.path().join("many/f0001")).unwrap();
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    btrfs_scrub(m.path());
    m.unmount();
    btrfs_check(dev.path());
    let m = LoopMount::with_options(dev.path(), "ro");
    assert!(fs::read(m.path().join("written-big")).unwrap() == big);
    assert_eq!(
        fs::read(m.path().join("text")).unwrap(),
        fs::read(src.join("text")).unwrap()
    );
    m.unmount();
}

//! `Image::read_at` in random order and random sizes returns exactly the bytes of
//! a sequential export, including csum leaves served before the data they cover.
//! Needs no privileges.

use btrfsimg::{export, plan_dir, Image, Options};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

fn make_tree(root: &Path, rng: &mut ChaCha8Rng) {
    let sizes = [
        0usize,
        1,
        2047,
        2048,
        2049,
        4095,
        4096,
        4097,
        (1 << 20) + 1,
        3 << 20,
    ];
    for (i, &s) in sizes.iter().enumerate() {
        let mut v = vec![0u8; s];
        rng.fill(&mut v[..]);
        fs::write(root.join(format!("f{i}")), v).unwrap();
    }
    let d = root.join("many");
    fs::create_dir(&d).unwrap();
    for i in 0..600 {
        fs::write(
            d.join(format!("entry-{i:05}")),
            format!("{i}").repeat(i % 7),
        )
        .unwrap();
    }
    symlink("f1", root.join("link")).unwrap();
}

fn export_bytes(root: &Path, opts: &Options) -> Vec<u8> {
    let image = Image::new(plan_dir(root, opts).unwrap());
    let mut out = Vec::new();
    export::write_stream(&image, &mut out, &Default::default()).unwrap();
    assert_eq!(out.len() as u64, image.size());
    assert_eq!(
        image.source_bytes_read(),
        file_bytes(root),
        "a sequential export reads every source byte exactly once"
    );
    out
}

/// Bytes of all regular files below `root` (none of the test trees has holes).
fn file_bytes(root: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            n += file_bytes(&e.path());
        } else if m.is_file() {
            n += m.len();
        }
    }
    n
}

#[test]
fn random_reads_match_sequential_export() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    make_tree(dir.path(), &mut rng);
    random_reads_match(dir.path(), &Options::default(), &mut rng);
}

/// The same for every checksum algorithm: csum leaves read first hold
/// checksums of their size, as a sequential export has them.
#[test]
fn random_reads_match_sequential_export_for_every_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    make_tree(dir.path(), &mut rng);
    for csum in btrfsimg::format::CsumType::ALL {
        let opts = Options {
            csum,
            ..Options::default()
        };
        random_reads_match(dir.path(), &opts, &mut rng);
    }
}

fn random_reads_match(root: &Path, opts: &Options, rng: &mut ChaCha8Rng) {
    let want = export_bytes(root, opts);

    // A fresh image, read only in random pieces: csum leaves may come first.
    let image = Image::new(plan_dir(root, opts).unwrap());
    let size = image.size();
    let mut buf = vec![0u8; 4 << 20];
    for _ in 0..3000 {
        let len = if rng.random_bool(0.5) {
            rng.random_range(1..=8192)
        } else {
            rng.random_range(1..=4 << 20)
        };
        let off = rng.random_range(0..size);
        let n = image.read_at(off, &mut buf[..len]).unwrap();
        assert_eq!(n as u64, (size - off).min(len as u64));
        assert!(
            buf[..n] == want[off as usize..off as usize + n],
            "mismatch at offset {off} length {len}"
        );
    }
    // Every metadata block first (csum leaves before any data), then the rest.
    let fresh = Image::new(plan_dir(root, opts).unwrap());
    let plan = fresh.plan();
    let meta: Vec<_> = plan
        .regions
        .iter()
        .filter(|r| matches!(r.kind, btrfsimg::plan::space::RegionKind::Metadata { .. }))
        .copied()
        .collect();
    for r in meta {
        let mut b = vec![0u8; r.len as usize];
        fresh.read_at(r.start, &mut b).unwrap();
        assert!(b == want[r.start as usize..r.end() as usize]);
    }
}

#[test]
fn same_content_other_creation_order_is_byte_identical() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..200)
        .map(|i| format!("n{:03}", (i * 37) % 200))
        .collect();
    for n in &names {
        fs::write(a.path().join(n), n.repeat(50)).unwrap();
    }
    // Other order, plus files created and removed to disturb inode numbers.
    for i in 0..50 {
        fs::write(b.path().join(format!("junk{i}")), "x").unwrap();
    }
    for n in names.iter().rev() {
        fs::write(b.path().join(n), n.repeat(50)).unwrap();
    }
    for i in 0..50 {
        fs::remove_file(b.path().join(format!("junk{i}"))).unwrap();
    }
    let t = 1_700_000_000;
    set_all_times(b.path(), t);
    set_all_times(a.path(), t);
    let opts = Options::default();
    assert!(export_bytes(a.path(), &opts) == export_bytes(b.path(), &opts));
}

/// Gives every entry (and the root) the same mtime so only order differs.
fn set_all_times(root: &Path, sec: i64) {
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: 123,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: 456,
        },
    ];
    let mut paths: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.push(root.to_path_buf());
    for p in paths {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C string and a two-element timespec array.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
        assert_eq!(r, 0);
    }
}

/// Compressed images too: with the payloads kept and with none kept (made
/// again on demand), random reads of any size in any order, metadata first,
/// give the bytes of a sequential export; and the bytes do not depend on the
/// number of threads of the content pass.
#[test]
fn compressed_random_reads_match_sequential_export() {
    use btrfsimg::source::generated::{build, Entry};
    use btrfsimg::source::Fill;
    use btrfsimg::{plan_tree, PassOptions};
    let mut root = std::collections::BTreeMap::new();
    for i in 0..40u64 {
        let fill = match i % 3 {
            0 => Fill::Text(i),
            1 => Fill::Random(i),
            _ => Fill::Zeros,
        };
        root.insert(format!("f{i}").into_bytes(), Entry::file(i * 37_001, fill));
    }
    let root = Entry::dir(root);
    for algo in ["zstd:7", "zlib", "lzo"] {
        let opts = Options {
            compression: btrfsimg::compress::Compression::parse(algo).unwrap(),
            ..Options::default()
        };
        let image = |threads, keep_bytes| {
            let pass = PassOptions {
                threads,
                keep_bytes,
                progress: None,
            };
            Image::new(plan_tree(build(&root).unwrap(), &opts, &pass, None).unwrap())
        };
        let sequential = |img: &Image| {
            let mut v = Vec::new();
            export::write_stream(img, &mut v, &Default::default()).unwrap();
            v
        };
        let want = sequential(&image(0, 256 << 20));
        assert!(
            sequential(&image(1, 0)) == want,
            "{algo}: one thread, nothing kept"
        );
        let img = image(3, 0);
        let plan = img.plan();
        let mut metas: Vec<_> = plan
            .regions
            .iter()
            .filter(|r| matches!(r.kind, btrfsimg::plan::space::RegionKind::Metadata { .. }))
            .copied()
            .collect();
        metas.reverse();
        for r in metas {
            let mut b = vec![0u8; r.len as usize];
            img.read_at(r.start, &mut b).unwrap();
            assert!(
                b == want[r.start as usize..r.end() as usize],
                "{algo}: metadata first"
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..2000 {
            let len = rng.random_range(1..=buf.len());
            let off = rng.random_range(0..img.size());
            let n = img.read_at(off, &mut buf[..len]).unwrap();
            assert!(
                buf[..n] == want[off as usize..off as usize + n],
                "{algo}: at {off}+{len}"
            );
        }
    }
}

//! The planner driven without a filesystem: trees described in memory
//! (`source::generated`), hostile ones included, either refused with a
//! one-line error naming the entry or planned into an image whose every block
//! encodes. Also the scale limits: 3 TiB of data, 10,000,000 entries. No root
//! needed.

mod common;

use btrfsimg::format::hash::{extref_hash, name_hash};
use btrfsimg::format::{max_item_size, BLOCK_GROUP_SYSTEM, DIR_ITEM_HEADER};
use btrfsimg::plan::{Plan, TreeId};
use btrfsimg::source::generated::{build_with, Content, Entry, Meta};
use btrfsimg::source::{Fill, Segment};
use btrfsimg::{export, plan_generated, Image, Options};
use common::*;
use std::io::{self, Write};

const NODESIZES: [u32; 3] = [4096, 16384, 65536];

fn opts(nodesize: u32) -> Options {
    Options {
        nodesize,
        ..Options::default()
    }
}

/// Reads every byte of the image (so every block is encoded); returns its size.
fn encode_all(plan: Plan) -> u64 {
    struct Count(u64);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let img = Image::new(plan);
    let mut c = Count(0);
    export::write_stream(&img, &mut c, &Default::default()).expect("every block encodes");
    assert_eq!(c.0, img.size());
    c.0
}

fn one_line_error(root: &Entry, o: &Options) -> String {
    let e = plan_generated(root, o)
        .err()
        .expect("planning must refuse this tree")
        .to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    e
}

fn files_named(names: &[Vec<u8>]) -> Entry {
    dir_of(
        names
            .iter()
            .map(|n| (n.clone(), Entry::file(10, Fill::Random(1))))
            .collect(),
    )
}

/// Names sharing one hash fill one DIR_ITEM; one name more than fits a leaf
/// is refused naming the directory (as the kernel refuses it: EOVERFLOW),
/// never a panic.
#[test]
fn colliding_directory_names_fill_one_item_then_fail() {
    for nodesize in NODESIZES {
        let fit = max_item_size(nodesize) / (DIR_ITEM_HEADER + 255);
        let names = names_with_hash(fit + 1, 255, 0x1234_5678, b"");
        assert!(names.iter().all(|n| name_hash(n) == 0x1234_5678));
        let ok = dir_of(vec![(b"d".to_vec(), files_named(&names[..fit]))]);
        encode_all(plan_generated(&ok, &opts(nodesize)).unwrap());
        let bad = dir_of(vec![(b"d".to_vec(), files_named(&names))]);
        let e = one_line_error(&bad, &opts(nodesize));
        assert!(e.starts_with("/d: "), "{e}");
        assert!(
            e.contains("EOVERFLOW") && e.contains(&format!("{} names", fit + 1)),
            "{e}"
        );
    }
    // The reported case: 60 names of 255 bytes at the default node size.
    let names = names_with_hash(60, 255, 7, b"");
    let e = one_line_error(
        &dir_of(vec![(b"d".to_vec(), files_named(&names))]),
        &opts(16384),
    );
    assert!(e.starts_with("/d: 60 names share one name hash"), "{e}");
}

#[test]
fn colliding_xattrs_fit_together_or_fail_naming_the_file() {
    let names = names_with_hash(2, 20, 99, b"user.");
    for nodesize in NODESIZES {
        let max = max_item_size(nodesize);
        let each = |total: usize| total / 2 - DIR_ITEM_HEADER - 20;
        for (total, fits) in [(max, true), (max + 2, false)] {
            let mut f = Entry::file(1, Fill::Zeros);
            f.meta.xattrs = names
                .iter()
                .map(|n| (n.clone(), vec![7u8; each(total)]))
                .collect();
            f.meta.xattrs.sort();
            let root = dir_of(vec![(b"f".to_vec(), f)]);
            if fits {
                encode_all(plan_generated(&root, &opts(nodesize)).unwrap());
            } else {
                let e = one_line_error(&root, &opts(nodesize));
                assert!(e.starts_with("/f: extended attributes"), "{e}");
                assert!(e.contains("too large"), "{e}");
            }
        }
    }
}

/// The largest symlink target and xattr for each node size, and one byte more.
#[test]
fn largest_symlink_and_xattr_per_node_size() {
    for nodesize in NODESIZES {
        let max = max_item_size(nodesize);
        let link_max = (max - 21).min(4095);
        for (len, ok) in [(link_max, true), (link_max + 1, false)] {
            let root = dir_of(vec![(b"l".to_vec(), Entry::symlink(&vec![b'a'; len]))]);
            if ok {
                encode_all(plan_generated(&root, &opts(nodesize)).unwrap());
            } else {
                let e = one_line_error(&root, &opts(nodesize));
                assert!(e.starts_with("/l: symlink target of"), "{nodesize}: {e}");
            }
        }
        let value_max = max - DIR_ITEM_HEADER - b"user.x".len();
        for (len, ok) in [(value_max, true), (value_max + 1, false)] {
            let mut d = Entry::dir(Default::default());
            d.meta.xattrs = vec![(b"user.x".to_vec(), vec![1u8; len])];
            let root = dir_of(vec![(b"d".to_vec(), d)]);
            if ok {
                encode_all(plan_generated(&root, &opts(nodesize)).unwrap());
            } else {
                let e = one_line_error(&root, &opts(nodesize));
                assert!(e.starts_with("/d: extended attribute 'user.x'"), "{e}");
            }
        }
    }
}

/// Hard links overflow INODE_REF into INODE_EXTREF; names sharing an extref
/// hash beyond one item are refused (the kernel: EMLINK), as are more links
/// than the kernel allows.
#[test]
fn hard_link_names_overflow_then_fail() {
    let nodesize = 16384;
    let max = max_item_size(nodesize);
    let _fillers: Vec<Vec<u8>> = (0..max / (10 + 255) + 1)
        .map(|i| {
            let mut n = format!("a{i:04}").into_bytes();
            n.resize(255, b'f');
            n
        })
        .collect();
    // Directory "d" is inode 257 (the root is 256, "d" its first entry).
    // Names of one length that share an extref hash share every crc32c hash
    // (the CRC is affine in its seed), so they would collide as directory
    // entries first: use one name per length, 255 down.
    let colliding: Vec<Vec<u8>> = (0..100)
        .map(|i| names_with_extref_hash(257, 1, 255 - i, 42, b"z").remove(0))
        .collect();
    assert!(colliding.iter().all(|n| extref_hash(257, n) == 42));
    let mut total = 0;
    let fit = colliding
        .iter()
        .take_while(|n| {
            total += 18 + n.len();
            total <= max
        })
        .count();
    assert!(fit < 100);
    // 65,536 links of one file: one more than the kernel allows.
    let mut f = Entry::file(1, Fill::Zeros);
    f.link = Some(7);
    let many = dir_of(
        (0..65536u32)
            .map(|i| (format!("l{i:05}").into_bytes(), f.clone()))
            .collect(),
    );
    let e = one_line_error(&many, &opts(nodesize));
    assert!(e.contains("65536 hard links") && e.contains("65535"), "{e}");
}

/// Absurd sizes are refused before any work, with their bounds.
#[test]
fn sizes_have_upper_bounds() {
    let root = dir_of(vec![(b"f".to_vec(), Entry::file(5000, Fill::Zeros))]);
    for (size, ok) in [
        (i64::MAX as u64, true),
        (i64::MAX as u64 + 1, false),
        (u64::MAX, false),
    ] {
        let o = Options {
            size: Some(size),
            ..Options::default()
        };
        match plan_generated(&root, &o) {
            Ok(p) => {
                assert!(ok, "{size}");
                assert_eq!(p.total_bytes, i64::MAX as u64 / 4096 * 4096);
                // The image is mostly unallocated: seeking skips it, up to
                // the last superblock mirror (256 GiB) and then to the end.
                let img = Image::new(p);
                assert_eq!(img.seek_data(1 << 30), Some(0x40_0000_0000));
                assert_eq!(img.seek_data(1 << 40), None);
            }
            Err(e) => {
                assert!(!ok, "{size}: {e}");
                assert!(e.to_string().contains("too large"), "{e}");
            }
        }
    }
    let o = Options {
        extra_space: u64::MAX - 100,
        ..Options::default()
    };
    let e = plan_generated(&root, &o).err().unwrap().to_string();
    assert!(
        e.contains("--extra-space") && e.contains("too large"),
        "{e}"
    );
    // Files of 8 EiB with a little data at the end are fine: only data counts.
    let mut sparse = Entry::file(i64::MAX as u64, Fill::Random(3));
    sparse.content = Content::File {
        size: i64::MAX as u64,
        data: Some(vec![Segment {
            offset: i64::MAX as u64 - 5000,
            len: 5000,
        }]),
        fill: Fill::Random(3),
    };
    encode_all(plan_generated(&dir_of(vec![(b"s".to_vec(), sparse)]), &opts(4096)).unwrap());
    // More than 1 PiB of data is refused naming the file that crosses it.
    let big: Vec<(Vec<u8>, Entry)> = (0..3)
        .map(|i| {
            (
                format!("big{i}").into_bytes(),
                Entry::file(1 << 49, Fill::Zeros),
            )
        })
        .collect();
    let e = one_line_error(&dir_of(big), &opts(16384));
    assert!(e.starts_with("/big2: ") && e.contains("1 PiB"), "{e}");
}

/// `-O block-group-tree` with 3,000 block groups: they fill a multi-level
/// block-group tree (every block encoded, keys those of the chunks), the
/// extent tree holds none of them and shrinks by their leaves, and the
/// data extents' items stay as they were.
#[test]
fn three_tib_with_a_block_group_tree() {
    use btrfsimg::format::BLOCK_GROUP_ITEM_KEY;
    const TIB: u64 = 1 << 40;
    let files: Vec<(Vec<u8>, Entry)> = (0..3)
        .map(|i| {
            (
                format!("part{i}").into_bytes(),
                Entry::file(TIB, Fill::Zeros),
            )
        })
        .collect();
    let root = dir_of(files);
    let plain = plan_generated(&root, &Options::default()).unwrap();
    let opts = Options {
        block_group_tree: true,
        ..Options::default()
    };
    let plan = plan_generated(&root, &opts).unwrap();
    assert!(plan.chunks.len() > 3072, "{}", plan.chunks.len());
    let bgt = plan.tree(TreeId::BlockGroup);
    assert!(
        bgt.shape.levels.len() >= 2,
        "the block-group tree has a node"
    );
    let keys: Vec<(u64, u8, u64)> = bgt
        .items
        .iter_from(0)
        .map(|i| (i.key.objectid, i.key.ty, i.key.offset))
        .collect();
    let mut want: Vec<(u64, u8, u64)> = plan
        .chunks
        .iter()
        .map(|c| (c.logical, BLOCK_GROUP_ITEM_KEY, c.length))
        .collect();
    want.sort_unstable();
    assert_eq!(keys, want);
    let kinds = |p: &Plan, ty: u8| {
        p.tree(TreeId::Extent)
            .items
            .iter_from(0)
            .filter(|i| i.key.ty == ty)
            .count()
    };
    assert_eq!(kinds(&plan, BLOCK_GROUP_ITEM_KEY), 0);
    assert_eq!(kinds(&plain, BLOCK_GROUP_ITEM_KEY), plain.chunks.len());
    // EXTENT_ITEM: the data extents, the same in both.
    assert_eq!(kinds(&plan, 168), kinds(&plain, 168));
    let (with, without) = (
        plan.tree(TreeId::Extent).shape.blocks(),
        plain.tree(TreeId::Extent).shape.blocks(),
    );
    assert!(
        with < without,
        "extent tree {with} blocks, {without} without"
    );
    assert_eq!(plan.superblock.compat_ro_flags, 0xb);
    assert_eq!(plain.superblock.compat_ro_flags, 0x3);

    // Every block of the block-group tree encodes, with its owner.
    let img = Image::new(plan);
    let p = img.plan();
    let t = p
        .trees
        .iter()
        .position(|t| t.id == TreeId::BlockGroup)
        .unwrap() as u16;
    let mut buf = vec![0u8; 16384];
    let mut seen = 0;
    for b in p.blocks.iter().filter(|b| b.tree == t) {
        let phys = metadata_physical(p, b.logical);
        img.read_at(phys, &mut buf).unwrap();
        assert_eq!(&buf[0x30..0x38], &b.logical.to_le_bytes());
        assert_eq!(&buf[0x58..0x60], &11u64.to_le_bytes(), "owner");
        seen += 1;
    }
    assert_eq!(seen, p.tree(TreeId::BlockGroup).shape.blocks());
}

/// 3 TiB of file data in 1 GiB chunks: far more chunks than a fixed SYSTEM
/// chunk held. The plan is made, the SYSTEM chunk holds the whole chunk tree,
/// every tree but the csum tree encodes completely, and reading one block
/// allocates one page of the checksum table.
#[test]
fn three_tib_of_data() {
    const TIB: u64 = 1 << 40;
    let files: Vec<(Vec<u8>, Entry)> = (0..3)
        .map(|i| {
            (
                format!("part{i}").into_bytes(),
                Entry::file(TIB, Fill::Zeros),
            )
        })
        .collect();
    let plan = plan_generated(&dir_of(files), &Options::default()).unwrap();
    let data_chunks = plan.chunks.iter().filter(|c| c.ty & 1 != 0).count();
    assert!(data_chunks >= 3072, "{data_chunks}");
    let system = plan
        .chunks
        .iter()
        .find(|c| c.ty & BLOCK_GROUP_SYSTEM != 0)
        .unwrap();
    let chunk_tree = plan.tree(TreeId::Chunk);
    assert!(
        chunk_tree.shape.levels.len() >= 2,
        "the chunk tree has a node"
    );
    assert!(system.used == chunk_tree.shape.blocks() as u64 * 16384);
    assert!(system.length >= system.used + 240 * 1024);
    let csum_blocks = plan.tree(TreeId::Csum).shape.blocks();
    assert!(csum_blocks > 190_000, "{csum_blocks}");

    // Encode every block of every tree except the csum tree (its leaves read
    // 16 MiB of data each); of that one, the first and last leaf and the root.
    let img = Image::new(plan);
    let p = img.plan();
    let mut buf = vec![0u8; 16384];
    let csum_idx = p.trees.iter().position(|t| t.id == TreeId::Csum).unwrap() as u16;
    let leaves = p.trees[csum_idx as usize].shape.levels[0].len() as u32;
    let mut seen = 0;
    for b in p.blocks.iter() {
        let sample = b.tree != csum_idx || b.level > 0 || b.idx == 0 || b.idx == leaves - 1;
        if !sample {
            continue;
        }
        let phys = metadata_physical(p, b.logical);
        img.read_at(phys, &mut buf).unwrap();
        assert_eq!(
            &buf[0x30..0x38],
            &b.logical.to_le_bytes(),
            "bytenr in the header"
        );
        seen += 1;
    }
    assert!(seen > 1000, "{seen}");
    // Two csum leaves read 2 x 16 MiB of data: at most 2 pages of 64 MiB each
    // (a leaf may straddle two pages).
    assert!(img.csum_pages() <= 4, "{}", img.csum_pages());
}

/// Ten million entries: 10,000 directories of 1,000 empty files with 40-byte
/// names (400 MB of names). Planned, with a sample of fs tree blocks encoded.
#[test]
fn ten_million_entries() {
    let dirs = 10_000u32;
    let per = 1_000u32;
    let tree = build_with(&Meta::default(), |node, _| {
        Ok(if node == 0 {
            (0..dirs)
                .map(|d| {
                    (
                        format!("dir-{d:06}").into_bytes(),
                        Entry::dir(Default::default()),
                    )
                })
                .collect()
        } else {
            let file = Entry::file(0, Fill::Zeros);
            (0..per)
                .map(|f| {
                    let mut n = format!("file-{node:08}-{f:06}-").into_bytes();
                    n.resize(40, b'x');
                    (n, file.clone())
                })
                .collect()
        })
    })
    .unwrap();
    assert_eq!(tree.len(), 1 + (dirs + dirs * per) as usize);
    let plan = btrfsimg::plan::build(tree, &Options::default()).unwrap();
    let fs = plan.tree(TreeId::Fs(5));
    assert!(fs.shape.levels.len() >= 3);
    assert!(fs.shape.items >= 4 * 10_000_000);
    let img = Image::new(plan);
    let p = img.plan();
    let fs_idx = p.trees.iter().position(|t| t.id == TreeId::Fs(5)).unwrap() as u16;
    let mut buf = vec![0u8; 16384];
    let fs_blocks: Vec<_> = p.blocks.iter().filter(|b| b.tree == fs_idx).collect();
    for b in fs_blocks.iter().step_by(fs_blocks.len() / 500) {
        let phys = metadata_physical(p, b.logical);
        img.read_at(phys, &mut buf).unwrap();
        assert_eq!(&buf[0x30..0x38], &b.logical.to_le_bytes());
    }
}

/// Where the metadata block at `logical` is in the image (its first copy).
fn metadata_physical(p: &btrfsimg::plan::Plan, logical: u64) -> u64 {
    p.regions
        .iter()
        .find_map(|r| match r.kind {
            btrfsimg::plan::space::RegionKind::Metadata { logical: start }
                if start <= logical && logical < start + r.len =>
            {
                Some(r.start + logical - start)
            }
            _ => None,
        })
        .expect("every tree block is in a metadata region")
}

//! Layout policy: from a source tree to a complete, immutable description of the
//! image (every tree's items and block addresses, chunks, the region table and
//! the superblock). Planning never opens a file; the image layer does all I/O.

pub mod data;
pub mod fs;
pub mod items;
pub mod pack;
pub mod space;
pub mod trees;

use crate::error::{Error, Result};
use crate::format::items::DevItem;
use crate::format::superblock::{RootPtr, Superblock};
use crate::format::*;
use crate::source::{Kind, SourceTree};
use data::{DataAllocator, DataExtent};
use fs::{FsItems, InodePolicy};
use items::ItemSource;
use pack::{pack, Shape};
use sha2::{Digest, Sha256};
use space::{Chunk, Region};
use std::sync::Arc;
use trees::BlockInfo;

/// The single transaction id stamped on everything in a fresh image.
pub const GENERATION: u64 = 1;

#[derive(Clone, Debug)]
pub struct Options {
    pub nodesize: u32,
    pub metadata_dup: bool,
    pub label: Vec<u8>,
    /// Filesystem UUID; derived from the content when absent.
    pub fsid: Option<[u8; 16]>,
    pub owner: Option<(u32, u32)>,
    /// Seconds since the epoch for times the source does not provide (otime).
    pub timestamp: i64,
    /// Exact image size; an error if the content needs more.
    pub size: Option<u64>,
    /// Unallocated space added after the last chunk.
    pub extra_space: u64,
    pub max_inline: u64,
    /// Keep free metadata and data space so the image, at its exact size, can be
    /// mounted read-write and written a little (a first boot before a resize).
    pub rw_slack: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodesize: 16384,
            metadata_dup: true,
            label: Vec::new(),
            fsid: None,
            owner: None,
            timestamp: 1,
            size: None,
            extra_space: 0,
            max_inline: 2048,
            rw_slack: true,
        }
    }
}

/// Tree indexes in `Plan::trees`, in the order their blocks are allocated.
pub const T_FS: usize = 0;
pub const T_CSUM: usize = 1;
pub const T_EXTENT: usize = 2;
pub const T_FST: usize = 3;
pub const T_DEV: usize = 4;
pub const T_UUID: usize = 5;
pub const T_RELOC: usize = 6;
pub const T_ROOT: usize = 7;
pub const T_CHUNK: usize = 8;
const OWNERS: [u64; 9] = [
    FS_TREE,
    CSUM_TREE,
    EXTENT_TREE,
    FREE_SPACE_TREE,
    DEV_TREE,
    UUID_TREE,
    DATA_RELOC_TREE,
    ROOT_TREE,
    CHUNK_TREE,
];

pub struct TreePlan {
    pub owner: u64,
    pub items: Box<dyn ItemSource>,
    pub shape: Shape,
    /// `addrs[level][i]`: logical address of block `i` of that level.
    pub addrs: Vec<Vec<u64>>,
}

impl TreePlan {
    pub fn root(&self) -> RootPtr {
        RootPtr {
            bytenr: self
                .addrs
                .last()
                .and_then(|l| l.first())
                .copied()
                .unwrap_or(0),
            level: self.shape.root_level(),
        }
    }
}

/// Which tree block lives at a logical address.
#[derive(Clone, Copy, Debug)]
pub struct BlockRef {
    pub logical: u64,
    pub tree: u8,
    pub level: u8,
    pub idx: u32,
}

pub struct Plan {
    pub nodesize: u32,
    pub generation: u64,
    pub fsid: [u8; 16],
    pub chunk_tree_uuid: [u8; 16],
    pub source: Arc<SourceTree>,
    pub extents: Arc<Vec<DataExtent>>,
    pub trees: Vec<TreePlan>,
    /// Every tree block, sorted by logical address.
    pub blocks: Vec<BlockRef>,
    pub chunks: Vec<Chunk>,
    pub regions: Vec<Region>,
    pub superblock: Superblock,
    pub total_bytes: u64,
    /// Logical start of the data area; data sector `i` is at `data_start + i * 4096`.
    pub data_start: u64,
    pub data_sectors: u64,
}

impl Plan {
    /// A human-readable description of the layout.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mib = |b: u64| b as f64 / 1048576.0;
        let mut s = String::new();
        let u = &self.fsid;
        let _ = writeln!(
            s,
            "uuid: {:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
            u[0],
            u[1],
            u[2],
            u[3],
            u[4],
            u[5],
            u[6],
            u[7],
            u[8],
            u[9],
            u[10..]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let _ = writeln!(
            s,
            "image size: {} bytes ({:.2} MiB)",
            self.total_bytes,
            mib(self.total_bytes)
        );
        let _ = writeln!(s, "entries: {}", self.source.len());
        let data: u64 = self.extents.iter().map(|e| e.len).sum();
        let _ = writeln!(
            s,
            "file data: {} bytes in {} extents",
            data,
            self.extents.len()
        );
        let names = [
            "fs",
            "csum",
            "extent",
            "free-space",
            "dev",
            "uuid",
            "data-reloc",
            "root",
            "chunk",
        ];
        let total_blocks: usize = self.trees.iter().map(|t| t.shape.blocks()).sum();
        let _ = writeln!(
            s,
            "tree blocks: {} ({:.2} MiB): {}",
            total_blocks,
            mib(total_blocks as u64 * self.nodesize as u64),
            self.trees
                .iter()
                .zip(names)
                .map(|(t, n)| format!("{n} {}", t.shape.blocks()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for c in &self.chunks {
            let kind = if c.ty & BLOCK_GROUP_DATA != 0 {
                "data"
            } else if c.ty & BLOCK_GROUP_SYSTEM != 0 {
                "system"
            } else {
                "metadata"
            };
            let profile = if c.ty & BLOCK_GROUP_DUP != 0 {
                "dup"
            } else {
                "single"
            };
            let _ = writeln!(
                s,
                "chunk {kind:8} {profile:6} logical {:>12} length {:>11} used {:>11}",
                c.logical, c.length, c.used
            );
        }
        s
    }
}

fn derive_uuid(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    // RFC 9562 version 8 (custom), variant 10.
    u[6] = (u[6] & 0x0f) | 0x80;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// A filesystem UUID that depends only on the tree's content and the options.
fn content_uuid(tree: &SourceTree, opts: &Options) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"btrfsimg fsid v1");
    h.update(&opts.label);
    h.update(opts.nodesize.to_le_bytes());
    h.update([opts.metadata_dup as u8]);
    h.update(opts.timestamp.to_le_bytes());
    h.update(opts.size.unwrap_or(0).to_le_bytes());
    h.update(opts.extra_space.to_le_bytes());
    h.update(opts.max_inline.to_le_bytes());
    h.update([opts.rw_slack as u8]);
    if let Some((u, g)) = opts.owner {
        h.update(u.to_le_bytes());
        h.update(g.to_le_bytes());
    }
    for i in 0..tree.len() as u32 {
        let n = tree.node(i);
        h.update(n.parent.to_le_bytes());
        h.update((tree.name(i).len() as u32).to_le_bytes());
        h.update(tree.name(i));
        h.update(n.mode.to_le_bytes());
        h.update(n.uid.to_le_bytes());
        h.update(n.gid.to_le_bytes());
        h.update(n.mtime.sec.to_le_bytes());
        h.update(n.mtime.nsec.to_le_bytes());
        h.update(n.size.to_le_bytes());
        h.update(n.rdev().to_le_bytes());
        h.update(n.link_rep.to_le_bytes());
        if n.kind == Kind::Symlink {
            h.update(tree.link_target(i));
        }
    }
    derive_uuid(&[&h.finalize()[..]])
}

fn validate(tree: &SourceTree, opts: &Options) -> Result<()> {
    if !opts.nodesize.is_power_of_two() || !(4096..=65536).contains(&opts.nodesize) {
        return Err(Error::msg(format!(
            "invalid node size {}: must be a power of two from 4096 to 65536",
            opts.nodesize
        )));
    }
    if opts.label.len() > 255 {
        return Err(Error::msg(format!(
            "label is {} bytes long; at most 255 are allowed",
            opts.label.len()
        )));
    }
    let max_item = max_item_size(opts.nodesize);
    let max_inline_data = (SECTOR_SIZE as usize - 1).min(max_item - FILE_EXTENT_INLINE_HEADER);
    for i in 0..tree.len() as u32 {
        let n = tree.node(i);
        if n.kind == Kind::Symlink && (n.size == 0 || n.size as usize > max_inline_data) {
            return Err(Error::at(
                &tree.path(i),
                format!(
                    "symlink target of {} bytes does not fit (1 to {} bytes)",
                    n.size, max_inline_data
                ),
            ));
        }
        if let Some(bad) = oversized_xattr_item(tree.xattrs(i), max_item) {
            let msg = match &bad[..] {
                [(name, value)] => format!(
                    "extended attribute {} of {} bytes is too large for a {}-byte node",
                    String::from_utf8_lossy(name),
                    value.len(),
                    opts.nodesize
                ),
                group => format!(
                    "extended attributes {} share one name hash and together ({} bytes) \
                     are too large for a {}-byte node",
                    group
                        .iter()
                        .map(|(n, _)| String::from_utf8_lossy(n))
                        .collect::<Vec<_>>()
                        .join(", "),
                    group.iter().map(|(_, v)| v.len()).sum::<usize>(),
                    opts.nodesize
                ),
            };
            return Err(Error::at(&tree.path(i), msg));
        }
        if n.kind == Kind::Dir && n.nchildren() as u64 > u32::MAX as u64 - 3 {
            return Err(Error::at(&tree.path(i), "too many directory entries"));
        }
    }
    Ok(())
}

/// The first XATTR_ITEM of an inode that would not fit in a leaf: btrfs stores
/// every attribute whose name has the same hash in one item, so each such group
/// (usually a single attribute) must fit within `max_item` bytes; names are at
/// most 255 bytes. Returns that group's (name, value) pairs.
fn oversized_xattr_item<'a>(
    xattrs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    max_item: usize,
) -> Option<Vec<(&'a [u8], &'a [u8])>> {
    let mut all: Vec<(u64, &[u8], &[u8])> =
        xattrs.map(|(n, v)| (hash::name_hash(n), n, v)).collect();
    all.sort();
    all.chunk_by(|a, b| a.0 == b.0)
        .find(|group| {
            let size: usize = group
                .iter()
                .map(|(_, n, v)| DIR_ITEM_HEADER + n.len() + v.len())
                .sum();
            size > max_item || group.iter().any(|(_, n, _)| n.len() > 255)
        })
        .map(|group| group.iter().map(|&(_, n, v)| (n, v)).collect())
}

/// Metadata headroom so the image, at its exact size, can be mounted read-write
/// and take its first writes without any unallocated space: the kernel's global
/// block reserve (measured on Linux 6.18: 5.5 MiB = 22 "insert units" of
/// nodesize × 8 levels × 2 for a small 16 KiB-node image; it grows with the
/// extent, csum and free-space trees) plus 20 units of working room for the
/// first transactions (16 was measured to be enough, 14 not).
fn metadata_slack(nodesize: u32, self_trees_blocks: u64) -> u64 {
    let unit = nodesize as u64 * MAX_LEVEL as u64 * 2;
    let global = (self_trees_blocks * nodesize as u64).max(22 * unit);
    global + 20 * unit
}

pub fn build(source: SourceTree, opts: &Options) -> Result<Plan> {
    validate(&source, opts)?;
    let nodesize = opts.nodesize;
    let n64 = nodesize as u64;
    let g = GENERATION;
    let time = Timespec {
        sec: opts.timestamp,
        nsec: 0,
    };
    let fsid = match opts.fsid {
        Some(u) => u,
        None => content_uuid(&source, opts),
    };
    let chunk_tree_uuid = derive_uuid(&[&fsid, b"chunk tree"]);
    let dev_uuid = derive_uuid(&[&fsid, b"device"]);
    let fs_uuid = derive_uuid(&[&fsid, b"fs tree"]);
    let tree = Arc::new(source);

    // Inodes and data placement.
    let mut fs = FsItems::new(
        tree.clone(),
        InodePolicy {
            generation: g,
            owner: opts.owner,
            otime: time,
            max_inline: opts.max_inline,
        },
        nodesize,
    );
    let copies = if opts.metadata_dup { 2 } else { 1 };
    let system_len = space::system_len(nodesize);
    let data_start = space::SYSTEM_START + system_len * copies;
    let mut alloc = DataAllocator::new(
        data_start,
        space::DATA_CHUNK_MAX,
        space::data_exclusions(data_start),
    );
    let mut per_inode = vec![(0u32, 0u32); fs.inodes.len()];
    for (i, inode) in fs.inodes.iter().enumerate() {
        if tree.node(inode.node).kind == Kind::File && !inode.inline {
            per_inode[i] = alloc.place(inode.node, &tree.segments(inode.node));
        }
    }
    let data_end = alloc.pos;
    let extents = Arc::new(std::mem::take(&mut alloc.extents));
    let ext_ino: Arc<Vec<u64>> = Arc::new(
        extents
            .iter()
            .map(|e| fs.ino(fs.node_ino[e.node as usize]))
            .collect(),
    );
    fs.set_extents(extents.clone(), &per_inode);
    let data_slack = if opts.rw_slack { space::DATA_SLACK } else { 0 };
    let data_chunks = space::data_chunks(data_start, data_end, data_slack, &extents);
    let meta_ty = BLOCK_GROUP_METADATA
        | if opts.metadata_dup {
            BLOCK_GROUP_DUP
        } else {
            0
        };
    let sys_ty = BLOCK_GROUP_SYSTEM
        | if opts.metadata_dup {
            BLOCK_GROUP_DUP
        } else {
            0
        };
    let system = Chunk {
        logical: space::SYSTEM_START,
        length: system_len,
        ty: sys_ty,
        stripes: (0..copies)
            .map(|i| space::SYSTEM_START + i * system_len)
            .collect(),
        used: 0,
    };
    let meta_start = data_chunks.last().map(|c| c.end()).unwrap_or(data_start);

    // Trees whose shape does not depend on addresses.
    let fs_shape = pack(&fs, nodesize);
    let csum = trees::csum_tree(&extents, &data_chunks, nodesize);
    let csum_shape = pack(&csum, nodesize);
    let fixed_shape = |items: &dyn ItemSource| pack(items, nodesize);
    let uuid_items = trees::uuid_tree(fs_uuid);
    let uuid_shape = fixed_shape(&uuid_items);
    let reloc_items = trees::reloc_tree(g, time);
    let reloc_shape = fixed_shape(&reloc_items);
    let root_input = |infos: &[trees::RootInfo; 9]| trees::RootTreeInput {
        generation: g,
        nodesize,
        time,
        fs_uuid,
        extent: infos[T_EXTENT],
        dev: infos[T_DEV],
        fs: infos[T_FS],
        csum: infos[T_CSUM],
        uuid: infos[T_UUID],
        free_space: infos[T_FST],
        reloc: infos[T_RELOC],
    };
    let root_shape = fixed_shape(&trees::root_tree(&root_input(&Default::default())));

    // Fixed point: the extent and free-space trees describe all blocks, their
    // own too, and the number of metadata chunks (chunk and dev tree items)
    // follows from the number of blocks.
    let mut ext_shape = Shape {
        levels: vec![vec![0]],
        items: 0,
    };
    let mut fst_shape = ext_shape.clone();
    let mut chunk_shape = ext_shape.clone();
    let mut dev_shape = ext_shape.clone();
    for _ in 0..64 {
        let shapes: [&Shape; 9] = [
            &fs_shape,
            &csum_shape,
            &ext_shape,
            &fst_shape,
            &dev_shape,
            &uuid_shape,
            &reloc_shape,
            &root_shape,
            &chunk_shape,
        ];
        let meta_blocks: u64 = shapes[..T_CHUNK].iter().map(|s| s.blocks() as u64).sum();
        let self_blocks = (ext_shape.blocks() + csum_shape.blocks() + fst_shape.blocks()) as u64;
        let slack = if opts.rw_slack {
            metadata_slack(nodesize, self_blocks)
        } else {
            0
        };
        let mut metas = space::metadata_chunks(
            meta_start,
            meta_blocks * n64 + slack,
            opts.metadata_dup,
            meta_ty,
        );
        let mut sys = system.clone();
        sys.used = chunk_shape.blocks() as u64 * n64;
        if sys.used > sys.length {
            return Err(Error::msg("too many chunks for the system chunk"));
        }

        // Addresses: each tree's leaves first, then each node level, root last.
        let mut addrs: Vec<Vec<Vec<u64>>> = Vec::with_capacity(9);
        let mut slots = metas
            .iter()
            .flat_map(|m| space::block_slots(m, n64))
            .collect::<Vec<u64>>()
            .into_iter();
        let mut sys_slots = space::block_slots(&sys, n64);
        let mut blocks = Vec::new();
        for (t, s) in shapes.iter().enumerate() {
            let mut per_level = Vec::new();
            for (level, l) in s.levels.iter().enumerate() {
                let mut v = Vec::with_capacity(l.len());
                for _ in 0..l.len() {
                    let a = if t == T_CHUNK {
                        sys_slots.next()
                    } else {
                        slots.next()
                    }
                    .ok_or_else(|| Error::msg("internal error: metadata chunk too small"))?;
                    v.push(a);
                    blocks.push(BlockInfo {
                        logical: a,
                        level: level as u8,
                        owner: OWNERS[t],
                    });
                }
                per_level.push(v);
            }
            addrs.push(per_level);
        }
        for m in &mut metas {
            let n = blocks
                .iter()
                .filter(|b| b.logical >= m.logical && b.logical < m.end())
                .count() as u64;
            m.used = n * n64;
        }
        let layout_end = metas
            .last()
            .map(|m| m.stripes.last().copied().unwrap_or(0) + m.length)
            .unwrap_or(meta_start);
        let chunks: Vec<Chunk> = std::iter::once(sys)
            .chain(data_chunks.iter().cloned())
            .chain(metas)
            .collect();

        let ext_items = trees::extent_tree(&blocks, &extents, &ext_ino, &chunks, &OWNERS);
        let fst_items = trees::free_space_tree(&blocks, &extents, &chunks, nodesize);
        let new_shapes = [
            pack(&ext_items, nodesize),
            pack(&fst_items, nodesize),
            fixed_shape(&trees::chunk_tree(DevItem::default(), &chunks)),
            fixed_shape(&trees::dev_tree(&chunks, chunk_tree_uuid)),
        ];
        if new_shapes != [&ext_shape, &fst_shape, &chunk_shape, &dev_shape].map(Shape::clone) {
            [ext_shape, fst_shape, chunk_shape, dev_shape] = new_shapes;
            continue;
        }

        // Converged: fill in the trees whose items depend on the final layout.
        let min_total = layout_end + space::round_up(opts.extra_space, SECTOR_SIZE);
        let total_bytes = match opts.size {
            Some(s) if s < min_total => {
                return Err(Error::msg(format!(
                    "--size {} is too small: the content needs {} bytes",
                    s, min_total
                )))
            }
            Some(s) => s / SECTOR_SIZE * SECTOR_SIZE,
            None => min_total,
        };
        let dev_item = DevItem {
            devid: 1,
            total_bytes,
            bytes_used: chunks
                .iter()
                .map(|c| c.length * c.stripes.len() as u64)
                .sum(),
            sector_size: SECTOR_SIZE as u32,
            uuid: dev_uuid,
            fsid,
        };
        let infos: [trees::RootInfo; 9] = std::array::from_fn(|t| trees::RootInfo {
            bytenr: *addrs[t].last().and_then(|l| l.first()).unwrap_or(&0),
            level: shapes[t].root_level(),
            blocks: shapes[t].blocks() as u64,
        });
        let chunk_items = trees::chunk_tree(dev_item, &chunks);
        let dev_items = trees::dev_tree(&chunks, chunk_tree_uuid);
        let root_items = trees::root_tree(&root_input(&infos));
        debug_assert_eq!(pack(&chunk_items, nodesize), chunk_shape);
        debug_assert_eq!(pack(&dev_items, nodesize), dev_shape);
        debug_assert_eq!(pack(&root_items, nodesize), root_shape);

        let shapes_owned = [
            fs_shape.clone(),
            csum_shape.clone(),
            ext_shape.clone(),
            fst_shape.clone(),
            dev_shape.clone(),
            uuid_shape.clone(),
            reloc_shape.clone(),
            root_shape.clone(),
            chunk_shape.clone(),
        ];
        let sources: [Box<dyn ItemSource>; 9] = [
            Box::new(fs),
            Box::new(csum),
            Box::new(ext_items),
            Box::new(fst_items),
            Box::new(dev_items),
            Box::new(uuid_items),
            Box::new(reloc_items),
            Box::new(root_items),
            Box::new(chunk_items),
        ];
        let trees: Vec<TreePlan> = sources
            .into_iter()
            .zip(shapes_owned)
            .zip(addrs)
            .enumerate()
            .map(|(t, ((items, shape), addrs))| TreePlan {
                owner: OWNERS[t],
                items,
                shape,
                addrs,
            })
            .collect();
        let mut block_refs: Vec<BlockRef> = trees
            .iter()
            .enumerate()
            .flat_map(|(t, tp)| {
                tp.addrs.iter().enumerate().flat_map(move |(level, l)| {
                    l.iter().enumerate().map(move |(idx, &logical)| BlockRef {
                        logical,
                        tree: t as u8,
                        level: level as u8,
                        idx: idx as u32,
                    })
                })
            })
            .collect();
        block_refs.sort_by_key(|b| b.logical);

        let bytes_used = chunks.iter().map(|c| c.used).sum();
        let sys_chunks = chunks
            .iter()
            .filter(|c| c.ty & BLOCK_GROUP_SYSTEM != 0)
            .map(|c| (c.logical, trees::chunk_item(c, dev_uuid)))
            .collect();
        let superblock = Superblock {
            fsid,
            generation: g,
            root: trees[T_ROOT].root(),
            chunk_root: trees[T_CHUNK].root(),
            extent_root: trees[T_EXTENT].root(),
            fs_root: trees[T_FS].root(),
            dev_root: trees[T_DEV].root(),
            csum_root: trees[T_CSUM].root(),
            total_bytes,
            bytes_used,
            sectorsize: SECTOR_SIZE as u32,
            nodesize,
            compat_ro_flags: COMPAT_RO_FREE_SPACE_TREE | COMPAT_RO_FREE_SPACE_TREE_VALID,
            incompat_flags: INCOMPAT_MIXED_BACKREF
                | INCOMPAT_EXTENDED_IREF
                | INCOMPAT_SKINNY_METADATA
                | INCOMPAT_NO_HOLES
                | if nodesize as u64 > 4096 {
                    INCOMPAT_BIG_METADATA
                } else {
                    0
                },
            dev_item,
            label: opts.label.clone(),
            sys_chunks,
        };
        let regions = space::regions(&chunks, total_bytes);
        return Ok(Plan {
            nodesize,
            generation: g,
            fsid,
            chunk_tree_uuid,
            source: tree,
            extents,
            trees,
            blocks: block_refs,
            chunks,
            regions,
            superblock,
            total_bytes,
            data_start,
            data_sectors: (data_end - data_start) / SECTOR_SIZE,
        });
    }
    Err(Error::msg(
        "internal error: metadata layout did not converge",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattrs_sharing_a_hash_must_fit_one_item_together() {
        let max = max_item_size(16384);
        // "user.c1371838" and "user.c2000402" have the same name hash.
        let (a, b): (&[u8], &[u8]) = (b"user.c1371838", b"user.c2000402");
        assert_eq!(hash::name_hash(a), hash::name_hash(b));
        let v = vec![7u8; 9000];
        // Alone, each fits; another name with a different hash does not matter.
        assert!(
            oversized_xattr_item([(a, &v[..]), (&b"user.x"[..], &v[..])].into_iter(), max)
                .is_none()
        );
        // Together they exceed one item.
        let bad = oversized_xattr_item([(a, &v[..]), (b, &v[..])].into_iter(), max).unwrap();
        assert_eq!(bad.len(), 2);
        // Small values sharing a hash are fine.
        assert!(oversized_xattr_item([(a, &v[..10]), (b, &v[..10])].into_iter(), max).is_none());
        // The largest single value that fits, and one byte more.
        let fit = max - DIR_ITEM_HEADER - a.len();
        let big = vec![1u8; fit + 1];
        assert!(oversized_xattr_item([(a, &big[..fit])].into_iter(), max).is_none());
        assert_eq!(
            oversized_xattr_item([(a, &big[..])].into_iter(), max)
                .unwrap()
                .len(),
            1
        );
        // Names longer than 255 bytes never fit.
        let long = vec![b'u'; 256];
        assert!(oversized_xattr_item([(&long[..], &b""[..])].into_iter(), max).is_some());
    }
}

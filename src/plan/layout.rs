//! The metadata layout: where every tree block goes, found as a fixed point.
//!
//! The extent and free-space trees describe every tree block, their own too,
//! and the chunk and dev trees (and the block-group tree, when there is one)
//! list the chunks, whose number follows from the number of blocks; the
//! SYSTEM chunk grows with the chunk tree. So the shapes of those four (or
//! five) trees are guessed, the blocks placed, the trees built from the
//! placement and packed again, until nothing changes (two or three rounds).
//! Everything here is a pure function of its input.

use super::data::DataExtent;
use super::items::VecItems;
use super::pack::{pack_anchored, Shape};
use super::space::{self, Chunk};
use super::tree_id::TreeId;
use super::trees::{self, BlockInfo, ExtentItems, ExtentOwners};
use crate::error::{Error, Result};
use crate::format::items::DevItem;
use crate::format::*;
use std::sync::Arc;

pub struct LayoutInput<'a> {
    pub nodesize: u32,
    pub dup: bool,
    /// Keep free metadata for a first read-write mount (see `metadata_slack`).
    pub rw_slack: bool,
    /// Where new metadata chunks start (physical = logical): past the data
    /// chunks (and past everything a base allocated).
    pub meta_start: u64,
    /// The base layout's metadata and system chunks, kept in place.
    pub keep: Option<Kept<'a>>,
    pub data_chunks: &'a [Chunk],
    pub extents: &'a Arc<Vec<DataExtent>>,
    pub owners: &'a Arc<dyn ExtentOwners>,
    /// The trees whose shapes do not depend on the layout, in allocation order.
    pub fixed: &'a [(TreeId, Shape)],
    pub chunk_tree_uuid: [u8; 16],
    /// Block groups in a block-group tree of their own rather than in the
    /// extent tree.
    pub block_group_tree: bool,
}

/// Chunks an update keeps from its base: tree blocks fill the metadata
/// chunks first (new ones follow only when they are full), and the chunk
/// tree stays in the system chunk while it fits with its headroom.
///
/// A block keeps the address of the base block it takes the place of when
/// that is a free slot of a kept chunk: with anchored packing, a leaf of
/// unchanged items comes out byte for byte where it was.
#[derive(Clone, Copy)]
pub struct Kept<'a> {
    pub metadata: &'a [Chunk],
    pub system: Option<&'a Chunk>,
    pub base: &'a super::base::Base,
}

/// Bytes of tree blocks a chunk holds around its excluded ranges (which
/// are whole 64 KiB stripes, so node aligned: counted, not walked).
fn usable(c: &Chunk, nodesize: u64) -> u64 {
    let lost: u64 = c.excluded().iter().map(|x| x.len).sum();
    (c.length - lost) / nodesize * nodesize
}

/// The converged layout.
pub struct Layout {
    /// Every chunk, sorted by logical address: data, metadata, system.
    pub chunks: Vec<Chunk>,
    /// Every tree, in allocation order: the fixed ones, then extent,
    /// free-space, the block-group tree if any, dev, and the chunk tree (in
    /// the SYSTEM chunk).
    pub trees: Vec<(TreeId, Shape)>,
    /// `addrs[t][level][i]`: logical address of block `i` of that level of tree `t`.
    pub addrs: Vec<Vec<Vec<u64>>>,
    pub extent_items: ExtentItems,
    pub free_space_items: VecItems,
    /// The block-group tree's items, when block groups have their own tree.
    pub block_group_items: Option<VecItems>,
    pub dev_items: VecItems,
    /// Physical end of the last chunk stripe.
    pub end: u64,
    /// Blocks at the address of the base block they take the place of.
    pub kept_blocks: usize,
}

/// Metadata headroom so the image, at its exact size, can be mounted read-write
/// and take its first writes without any unallocated space: the kernel's global
/// block reserve (measured on Linux 6.18: 5.5 MiB = 22 "insert units" of
/// nodesize × 8 levels × 2 for a small 16 KiB-node image; it grows with the
/// extent, csum and free-space trees, and the kernel caps it at 512 MiB) plus
/// 20 units of working room for the first transactions (16 was measured to be
/// enough, 14 not).
pub fn metadata_slack(nodesize: u32, self_trees_blocks: u64) -> u64 {
    const GLOBAL_RESERVE_CAP: u64 = 512 << 20;
    let unit = nodesize as u64 * MAX_LEVEL as u64 * 2;
    let global = (self_trees_blocks * nodesize as u64)
        .max(22 * unit)
        .min(GLOBAL_RESERVE_CAP);
    global + 20 * unit
}

/// The trees the fixed point solves for, in allocation order after the
/// fixed ones (the chunk tree last: it alone goes to the SYSTEM chunk).
fn solved_trees(block_group_tree: bool) -> Vec<TreeId> {
    let mut v = vec![TreeId::Extent, TreeId::FreeSpace];
    if block_group_tree {
        v.push(TreeId::BlockGroup);
    }
    v.extend([TreeId::Dev, TreeId::Chunk]);
    v
}

fn ty(base: u64, dup: bool) -> u64 {
    base | if dup { BLOCK_GROUP_DUP } else { 0 }
}

pub fn solve(input: &LayoutInput) -> Result<Layout> {
    let n64 = input.nodesize as u64;
    let solved_ids = solved_trees(input.block_group_tree);
    let mut solved: Vec<Shape> = solved_ids.iter().map(|_| Shape::empty()).collect();
    let tree_ids: Vec<TreeId> = input
        .fixed
        .iter()
        .map(|(id, _)| *id)
        .chain(solved_ids.iter().copied())
        .collect();
    let owners: Arc<[u64]> = tree_ids.iter().map(|t| t.objectid()).collect();
    if tree_ids.len() > u16::MAX as usize {
        return Err(Error::msg("too many trees"));
    }
    for _round in 0..64 {
        let shapes: Vec<&Shape> = input
            .fixed
            .iter()
            .map(|(_, s)| s)
            .chain(solved.iter())
            .collect();
        let meta_blocks: u64 = shapes[..shapes.len() - 1]
            .iter()
            .map(|s| s.blocks() as u64)
            .sum();
        let slack = if input.rw_slack {
            let own = |id: TreeId| {
                tree_ids
                    .iter()
                    .position(|&t| t == id)
                    .map_or(0, |i| shapes[i].blocks() as u64)
            };
            metadata_slack(
                input.nodesize,
                own(TreeId::Extent)
                    + own(TreeId::Csum)
                    + own(TreeId::FreeSpace)
                    + own(TreeId::BlockGroup),
            )
        } else {
            0
        };
        let need = meta_blocks * n64 + slack;
        let mut metas: Vec<Chunk> = Vec::new();
        let mut kept_metas = 0;
        let mut have = 0;
        if let Some(k) = input.keep {
            for c in k.metadata {
                metas.push(Chunk {
                    used: 0,
                    ..c.clone()
                });
                have += usable(c, n64);
            }
            kept_metas = metas.len();
        }
        if have < need || metas.is_empty() {
            metas.extend(space::metadata_chunks(
                input.meta_start,
                need - have.min(need),
                input.dup,
                ty(BLOCK_GROUP_METADATA, input.dup),
            ));
        }
        let meta_end = metas
            .iter()
            .flat_map(|m| m.stripes.iter().map(move |s| s + m.length))
            .chain([input.meta_start])
            .max()
            .expect("the chain is never empty");
        let chunk_blocks = shapes[shapes.len() - 1].blocks();
        let sys_need = chunk_blocks as u64 * n64 + space::system_headroom(input.nodesize);
        let mut system_kept = false;
        let mut system = match input.keep.and_then(|k| k.system) {
            Some(c) if usable(c, n64) >= sys_need => {
                system_kept = true;
                Chunk {
                    used: 0,
                    ..c.clone()
                }
            }
            _ => space::system_chunk(
                meta_end,
                chunk_blocks,
                input.dup,
                ty(BLOCK_GROUP_SYSTEM, input.dup),
                input.nodesize,
            ),
        };
        let end = metas
            .iter()
            .chain([&system])
            .chain(input.data_chunks)
            .flat_map(|c| c.stripes.iter().map(move |s| s + c.length))
            .max()
            .expect("there is a system chunk");

        // Pinned blocks first (at their base addresses), then the rest:
        // each tree's leaves first, then each node level, root last.
        let (pins, claimed) = input.keep.map_or_else(Default::default, |k| {
            let kept_sys: &[Chunk] = match system_kept {
                true => std::slice::from_ref(&system),
                false => &[],
            };
            pins(
                &shapes,
                &tree_ids,
                k.base,
                (&metas[..kept_metas], kept_sys),
                n64,
            )
        });
        let mut blocks: Vec<BlockInfo> = Vec::new();
        let mut addrs: Vec<Vec<Vec<u64>>> = Vec::with_capacity(shapes.len());
        let mut meta_slots = Slots::new(&metas, n64, &claimed);
        let mut sys_slots = Slots::new(std::slice::from_ref(&system), n64, &claimed);
        for (t, s) in shapes.iter().enumerate() {
            let slots = if tree_ids[t].in_system_chunk() {
                &mut sys_slots
            } else {
                &mut meta_slots
            };
            let mut per_level = Vec::with_capacity(s.levels.len());
            for (level, l) in s.levels.iter().enumerate() {
                let mut v = Vec::with_capacity(l.len());
                for i in 0..l.len() {
                    let pinned = pins.get(t).and_then(|p| p[level][i]);
                    let a = match pinned {
                        Some(a) => a,
                        None => slots
                            .next()
                            .expect("metadata chunks are sized for every block"),
                    };
                    v.push(a);
                    blocks.push(BlockInfo {
                        logical: a,
                        level: level as u8,
                        owner: t as u16,
                    });
                }
                per_level.push(v);
            }
            addrs.push(per_level);
        }
        let mut used: Vec<u64> = blocks.iter().map(|b| b.logical).collect();
        used.sort_unstable();
        for c in metas.iter_mut().chain(std::iter::once(&mut system)) {
            let below = |x: u64| used.partition_point(|&a| a < x) as u64;
            c.used = (below(c.end()) - below(c.logical)) * n64;
        }

        let mut chunks: Vec<Chunk> = input
            .data_chunks
            .iter()
            .cloned()
            .chain(metas)
            .chain(std::iter::once(system))
            .collect();
        chunks.sort_by_key(|c| c.logical);

        let extent_items = trees::extent_tree(
            &blocks,
            input.extents,
            input.owners,
            &chunks,
            !input.block_group_tree,
            &owners,
            input.nodesize,
        );
        let free_space_items =
            trees::free_space_tree(&blocks, input.extents, &chunks, input.nodesize);
        let block_group_items = input
            .block_group_tree
            .then(|| trees::block_group_tree(&chunks));
        let dev_items = trees::dev_tree(&chunks, input.chunk_tree_uuid);
        let chunk_items = trees::chunk_tree(DevItem::default(), &chunks);
        let internal = |t: TreeId| {
            move |o: super::pack::Oversized| {
                Error::msg(format!(
                    "internal error: {} tree item {:?} of {} bytes does not fit a node",
                    t.name(),
                    o.key,
                    o.size
                ))
            }
        };
        let base = input.keep.map(|k| k.base);
        let pack = |items: &dyn super::items::ItemSource, t: TreeId| {
            pack_anchored(items, input.nodesize, &super::anchors(base, t)).map_err(internal(t))
        };
        let mut new = vec![
            pack(&extent_items, TreeId::Extent)?,
            pack(&free_space_items, TreeId::FreeSpace)?,
        ];
        if let Some(items) = &block_group_items {
            new.push(pack(items, TreeId::BlockGroup)?);
        }
        new.extend([
            pack(&dev_items, TreeId::Dev)?,
            pack(&chunk_items, TreeId::Chunk)?,
        ]);
        if new != solved {
            solved = new;
            continue;
        }
        let trees = input
            .fixed
            .iter()
            .cloned()
            .chain(solved_ids.into_iter().zip(solved))
            .collect();
        return Ok(Layout {
            chunks,
            trees,
            addrs,
            extent_items,
            free_space_items,
            block_group_items,
            dev_items,
            end,
            kept_blocks: claimed.len(),
        });
    }
    Err(Error::msg(
        "internal error: metadata layout did not converge",
    ))
}

/// `pins[tree][level][i]`: the base address block `i` keeps, if any.
type Pins = Vec<Vec<Vec<Option<u64>>>>;

/// For every block of every tree: the base address it keeps, if any, and
/// the set of those addresses. A block keeps the address of the base block
/// it takes the place of (of its tree and level, the last whose first key
/// is at or before its own) when that address is a node slot of a kept
/// chunk (of the block's kind: the chunk tree lives in the system chunk)
/// that no block before it in allocation order claimed.
fn pins(
    shapes: &[&Shape],
    tree_ids: &[TreeId],
    base: &super::base::Base,
    (kept_meta, kept_sys): (&[Chunk], &[Chunk]),
    n64: u64,
) -> (Pins, std::collections::BTreeSet<u64>) {
    let mut claimed = std::collections::BTreeSet::new();
    let slot_ok = |chunks: &[Chunk], a: u64| {
        chunks.iter().any(|c| {
            a >= c.logical
                && a + n64 <= c.end()
                && (a - c.logical) % n64 == 0
                && !c.excluded().iter().any(|x| x.overlaps(a, n64))
        })
    };
    let pins = shapes
        .iter()
        .zip(tree_ids)
        .map(|(s, id)| {
            let chunks = match id.in_system_chunk() {
                true => kept_sys,
                false => kept_meta,
            };
            s.levels
                .iter()
                .enumerate()
                .map(|(level, l)| {
                    (0..l.len())
                        .map(|i| {
                            let key = *s.keys[level].get(i)?;
                            let a = base.block_at(id.objectid(), level, key)?;
                            (slot_ok(chunks, a) && claimed.insert(a)).then_some(a)
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    (pins, claimed)
}

/// Hands out node-sized slots of a run of chunks in order, past the
/// addresses pinned blocks claimed.
struct Slots<'a> {
    chunks: &'a [Chunk],
    cur: usize,
    pos: u64,
    nodesize: u64,
    excluded: Vec<super::data::Excluded>,
    claimed: &'a std::collections::BTreeSet<u64>,
}

impl<'a> Slots<'a> {
    fn new(
        chunks: &'a [Chunk],
        nodesize: u64,
        claimed: &'a std::collections::BTreeSet<u64>,
    ) -> Slots<'a> {
        let excluded = chunks.first().map(Chunk::excluded).unwrap_or_default();
        let pos = chunks.first().map_or(0, |c| c.logical);
        Slots {
            chunks,
            cur: 0,
            pos,
            nodesize,
            excluded,
            claimed,
        }
    }

    fn next(&mut self) -> Option<u64> {
        loop {
            let c = self.chunks.get(self.cur)?;
            if self.pos + self.nodesize > c.end() {
                self.cur += 1;
                let c = self.chunks.get(self.cur)?;
                self.pos = c.logical;
                self.excluded = c.excluded();
                continue;
            }
            let a = self.pos;
            self.pos += self.nodesize;
            let n = self.nodesize;
            if self.claimed.contains(&a) || self.excluded.iter().any(|x| x.overlaps(a, n)) {
                continue;
            }
            return Some(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_counts_what_the_slots_give() {
        let mib = 1u64 << 20;
        for (start, len, dup) in [
            (30 * mib, 4 * mib, true),
            (62 * mib, 4 * mib, true),
            (63 * mib + (1 << 16), 2 * mib, false),
            (256 * 1024 * mib - mib, 3 * mib, true),
        ] {
            let c = space::metadata_chunks(start, len, dup, BLOCK_GROUP_METADATA)
                .pop()
                .unwrap();
            for nodesize in [4096u64, 16384, 65536] {
                assert_eq!(
                    usable(&c, nodesize),
                    space::block_slots(&c, nodesize).count() as u64 * nodesize,
                    "{c:?} {nodesize}"
                );
            }
        }
    }

    #[test]
    fn global_reserve_is_capped() {
        let unit = 16384u64 * 16;
        assert_eq!(metadata_slack(16384, 1), 42 * unit);
        assert_eq!(metadata_slack(16384, 1 << 30), (512 << 20) + 20 * unit);
    }
}

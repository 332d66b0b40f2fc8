//! Packs a tree's items into leaves and nodes. Greedy packing in key order (full
//! leaves and nodes) is valid for the kernel and minimises the image.
//!
//! An update packs against its base's blocks: a block also ends where a
//! base block of the same level began (before the first item or child at
//! or past that block's first key), so a change moves block bounds only up
//! to the next such anchor and the blocks between unchanged anchors hold
//! what they held. Two neighbours that together fit one block are then one
//! block (a leaf that lost most of its items joins the next): blocks stay
//! at least half full on average however many updates follow. Greedy
//! blocks never fit with their neighbour, so without anchors nothing
//! changes.
//!
//! This is also the one place where every item of every tree meets the leaf it
//! must fit in: an item larger than a leaf's largest item (the kernel's
//! BTRFS_MAX_ITEM_SIZE) is refused here, as `Oversized`, and the planner turns
//! that into an error naming the input that made it.

use super::items::ItemSource;
use crate::format::{leaf_data_size, max_item_size, node_ptrs_per_block, Key, ITEM_HEADER_SIZE};

/// The block structure of one tree. `levels[0][i]` is the index of the first item
/// of leaf `i`; `levels[l][j]` (l >= 1) is the index of the first child (a block of
/// level l-1) of node `j`. The last level holds exactly one block: the root.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Shape {
    pub levels: Vec<Vec<u64>>,
    pub items: u64,
    /// `keys[l][i]`: the first key below block `i` of level `l` (empty for
    /// a tree without items).
    pub keys: Vec<Vec<Key>>,
}

impl Shape {
    /// The shape of a tree not packed yet: one empty leaf.
    pub fn empty() -> Shape {
        Shape {
            levels: vec![vec![0]],
            items: 0,
            keys: vec![Vec::new()],
        }
    }

    pub fn blocks(&self) -> usize {
        self.levels.iter().map(|l| l.len()).sum()
    }

    pub fn root_level(&self) -> u8 {
        (self.levels.len() - 1) as u8
    }

    /// Range of children (or items, for leaves) of block `idx` at `level`.
    pub fn children(&self, level: usize, idx: usize) -> (u64, u64) {
        let l = &self.levels[level];
        let start = l[idx];
        let end = if idx + 1 < l.len() {
            l[idx + 1]
        } else if level == 0 {
            self.items
        } else {
            self.levels[level - 1].len() as u64
        };
        (start, end)
    }

    /// Index of the first item below block `idx` at `level`.
    pub fn first_item(&self, level: usize, idx: usize) -> u64 {
        let mut i = idx as u64;
        for l in (0..=level).rev() {
            i = self.levels[l][i as usize];
        }
        i
    }
}

/// An item that no leaf can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Oversized {
    /// Its index in the tree's item sequence.
    pub index: u64,
    pub key: Key,
    /// Its body size in bytes.
    pub size: usize,
    /// The largest body a leaf holds at this node size.
    pub max: usize,
}

pub fn pack(items: &dyn ItemSource, nodesize: u32) -> Result<Shape, Oversized> {
    pack_anchored(items, nodesize, &[])
}

/// Whether `key` reaches the next anchor of `sorted` (at or past it),
/// walking `at` past every anchor it reaches (keys come in order).
fn anchored(sorted: &[Key], at: &mut usize, key: Key) -> bool {
    let before = *at;
    while *at < sorted.len() && sorted[*at] <= key {
        *at += 1;
    }
    *at > before
}

/// Packs greedily, but also starts a block at the first item (or child) at
/// or past each key of `anchors[level]` (sorted).
pub fn pack_anchored(
    items: &dyn ItemSource,
    nodesize: u32,
    anchors: &[Vec<Key>],
) -> Result<Shape, Oversized> {
    let cap = leaf_data_size(nodesize);
    let max = max_item_size(nodesize);
    let none = Vec::new();
    let at_level = |l: usize| anchors.get(l).unwrap_or(&none);
    let mut leaves = vec![0u64];
    let mut leaf_keys = Vec::new();
    let mut fills = Vec::new();
    let mut used = 0usize;
    let mut n = 0u64;
    let mut at = 0usize;
    for item in items.iter_from(0) {
        let size = item.body.size();
        if size > max {
            return Err(Oversized {
                index: n,
                key: item.key,
                size,
                max,
            });
        }
        let need = ITEM_HEADER_SIZE + size;
        let anchor = anchored(at_level(0), &mut at, item.key);
        if (used + need > cap || anchor) && used > 0 {
            leaves.push(n);
            fills.push(used);
            used = 0;
        }
        if used == 0 {
            leaf_keys.push(item.key);
        }
        used += need;
        n += 1;
    }
    fills.push(used);
    if !at_level(0).is_empty() && n > 0 {
        merge_small(&mut leaves, &mut leaf_keys, &fills, cap);
    }
    let mut levels = vec![leaves];
    let mut keys = vec![leaf_keys];
    let per_node = node_ptrs_per_block(nodesize);
    while levels.last().map_or(1, Vec::len) > 1 {
        let below = keys.last().expect("a key per block below");
        let anchors = at_level(levels.len());
        let (mut starts, mut firsts, mut fills) = (Vec::new(), Vec::new(), Vec::new());
        let (mut count, mut at) = (0usize, 0usize);
        for (j, &k) in below.iter().enumerate() {
            let anchor = anchored(anchors, &mut at, k);
            if count == per_node || (anchor && count > 0) {
                fills.push(count);
                count = 0;
            }
            if count == 0 {
                starts.push(j as u64);
                firsts.push(k);
            }
            count += 1;
        }
        fills.push(count);
        if !anchors.is_empty() {
            merge_small(&mut starts, &mut firsts, &fills, per_node);
        }
        levels.push(starts);
        keys.push(firsts);
    }
    Ok(Shape {
        levels,
        items: n,
        keys,
    })
}

/// Joins each block with the next while both fit in one (`fills[i]` is
/// block `i`'s use, `cap` a block's room), left to right.
fn merge_small(starts: &mut Vec<u64>, keys: &mut Vec<Key>, fills: &[usize], cap: usize) {
    debug_assert_eq!(starts.len(), fills.len());
    let (mut s, mut k) = (
        Vec::with_capacity(starts.len()),
        Vec::with_capacity(keys.len()),
    );
    let mut cur = 0usize;
    for i in 0..starts.len() {
        if i > 0 && cur + fills[i] <= cap {
            cur += fills[i];
            continue;
        }
        s.push(starts[i]);
        k.push(keys[i]);
        cur = fills[i];
    }
    *starts = s;
    *keys = k;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{max_item_size, Key};
    use crate::plan::items::{Body, Item, VecItems};

    fn items(sizes: &[usize]) -> VecItems {
        VecItems(
            sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| Item {
                    key: Key::new(i as u64, 1, 0),
                    body: Body::Csum {
                        start: 0,
                        count: (s / 4) as u32,
                        csum: crate::format::CsumType::Crc32c,
                    },
                })
                .collect(),
        )
    }

    #[test]
    fn the_largest_item_fits_alone_and_one_byte_more_does_not() {
        for nodesize in [4096u32, 16384, 65536] {
            let max = max_item_size(nodesize) / 4 * 4;
            let s = pack(&items(&[max, max, 8]), nodesize).unwrap();
            assert_eq!(s.levels[0], vec![0, 1, 2]);
            assert_eq!(s.items, 3);
            // Csum bodies come in 4-byte steps: the next size is 4 more.
            let too_big = max_item_size(nodesize) / 4 * 4 + 4;
            let e = pack(&items(&[8, too_big]), nodesize).unwrap_err();
            assert_eq!(e.index, 1);
            assert_eq!(e.size, too_big);
            assert_eq!(e.max, max_item_size(nodesize));
        }
    }

    #[test]
    fn anchors_start_blocks_and_keep_the_blocks_between_them() {
        let greedy = pack(&items(&vec![1000; 40]), 4096).unwrap();
        // Item 1 removed: greedy packing shifts every later bound;
        // anchored at the old bounds, only the first leaf changes.
        let mut sizes = vec![1000; 40];
        let keys: Vec<Key> = (0..40).map(|i| Key::new(i, 1, 0)).collect();
        sizes.remove(1);
        let mut v = items(&sizes);
        for (i, it) in v.0.iter_mut().enumerate() {
            it.key = keys[if i == 0 { 0 } else { i + 1 }];
        }
        let anchors: Vec<Key> = greedy.levels[0].iter().map(|&i| keys[i as usize]).collect();
        let s = pack_anchored(&v, 4096, std::slice::from_ref(&anchors)).unwrap();
        assert_eq!(
            s.keys[0], anchors,
            "every old leaf start is a leaf start again"
        );
        // The first item of a leaf removed: the next one starts it.
        let gone = greedy.levels[0][2] as usize;
        let mut w = items(&vec![1000; 39]);
        let kept: Vec<Key> = keys
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != gone)
            .map(|(_, k)| *k)
            .collect();
        for (it, k) in w.0.iter_mut().zip(&kept) {
            it.key = *k;
        }
        let t = pack_anchored(&w, 4096, std::slice::from_ref(&anchors)).unwrap();
        assert_eq!(t.keys[0].len(), anchors.len());
        assert_eq!(t.keys[0][2], keys[gone + 1]);
        assert_eq!(
            t.levels[0][3],
            greedy.levels[0][3] - 1,
            "the leaf after it is as it was"
        );
        let (g, a) = (&greedy.levels[0], &s.levels[0]);
        assert_eq!(a.len(), g.len());
        for i in 1..a.len() {
            assert_eq!(a[i] + 1, g[i], "leaf {i} holds the same items");
        }
        // Items inserted: a leaf splits, the next anchor restores the bounds.
        let mut v = items(&vec![1000; 45]);
        let mut ks: Vec<Key> = keys.clone();
        ks.extend((0..5).map(|i| Key::new(5, 1, 1 + i)));
        ks.sort();
        for (it, k) in v.0.iter_mut().zip(&ks) {
            it.key = *k;
        }
        let s = pack_anchored(&v, 4096, std::slice::from_ref(&anchors)).unwrap();
        for k in &anchors {
            assert!(s.keys[0].contains(k), "{k:?} still starts a leaf");
        }
        assert!(s.levels[0].len() <= g.len() + 2);
        // Two leaves that lost most of their items become one.
        let (l1, l2) = (greedy.levels[0][1] as usize, greedy.levels[0][2] as usize);
        let l3 = greedy.levels[0][3] as usize;
        let kept: Vec<Key> = keys
            .iter()
            .enumerate()
            .filter(|&(i, _)| !(l1..l3).contains(&i) || i == l1 || i == l2)
            .map(|(_, k)| *k)
            .collect();
        let mut w = items(&vec![1000; kept.len()]);
        for (it, k) in w.0.iter_mut().zip(&kept) {
            it.key = *k;
        }
        let t = pack_anchored(&w, 4096, std::slice::from_ref(&anchors)).unwrap();
        assert_eq!(t.levels[0].len(), anchors.len() - 1, "one leaf fewer");
        assert!(!t.keys[0].contains(&anchors[2]));
        assert_eq!(
            t.keys[0][3..],
            anchors[4..],
            "the leaves after them are as they were"
        );
        // Unknown anchors change nothing.
        let none =
            pack_anchored(&items(&vec![1000; 40]), 4096, &[vec![Key::new(99, 9, 9)]]).unwrap();
        assert_eq!(none, greedy);
    }

    #[test]
    fn nodes_are_added_until_one_root() {
        // 4 KiB leaves hold few 1000-byte items; 3000 items need nodes.
        let s = pack(&items(&vec![1000; 3000]), 4096).unwrap();
        assert!(s.levels.len() >= 3, "{:?}", s.levels.len());
        assert_eq!(s.levels.last().map(Vec::len), Some(1));
        let leaves = s.levels[0].len();
        assert_eq!(
            s.levels[1].len(),
            leaves.div_ceil(node_ptrs_per_block(4096))
        );
    }
}

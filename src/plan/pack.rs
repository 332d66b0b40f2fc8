//! Packs a tree's items into leaves and nodes. Greedy packing in key order (full
//! leaves and nodes) is valid for the kernel and minimises the image.
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
}

impl Shape {
    /// The shape of a tree not packed yet: one empty leaf.
    pub fn empty() -> Shape {
        Shape {
            levels: vec![vec![0]],
            items: 0,
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
    let cap = leaf_data_size(nodesize);
    let max = max_item_size(nodesize);
    let mut leaves = vec![0u64];
    let mut used = 0usize;
    let mut n = 0u64;
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
        if used + need > cap && used > 0 {
            leaves.push(n);
            used = 0;
        }
        used += need;
        n += 1;
    }
    let mut levels = vec![leaves];
    let per_node = node_ptrs_per_block(nodesize);
    while levels.last().map_or(1, Vec::len) > 1 {
        let below = levels.last().map_or(0, |l| l.len() as u64);
        levels.push((0..below).step_by(per_node).collect());
    }
    Ok(Shape { levels, items: n })
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

//! Packs a tree's items into leaves and nodes. Greedy packing in key order (full
//! leaves and nodes) is valid for the kernel and minimises the image.

use super::items::ItemSource;
use crate::format::{leaf_data_size, node_ptrs_per_block, ITEM_HEADER_SIZE};

/// The block structure of one tree. `levels[0][i]` is the index of the first item
/// of leaf `i`; `levels[l][j]` (l >= 1) is the index of the first child (a block of
/// level l-1) of node `j`. The last level holds exactly one block: the root.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Shape {
    pub levels: Vec<Vec<u64>>,
    pub items: u64,
}

impl Shape {
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

    /// Counts blocks per level; used to detect the fixed point of self-describing trees.
    pub fn counts(&self) -> Vec<usize> {
        self.levels.iter().map(|l| l.len()).collect()
    }
}

pub fn pack(items: &dyn ItemSource, nodesize: u32) -> Shape {
    let cap = leaf_data_size(nodesize);
    let mut leaves = vec![0u64];
    let mut used = 0usize;
    let mut n = 0u64;
    for item in items.iter_from(0) {
        let need = ITEM_HEADER_SIZE + item.body.size();
        if used + need > cap && used > 0 {
            leaves.push(n);
            used = 0;
        }
        used += need;
        n += 1;
    }
    let mut levels = vec![leaves];
    let per_node = node_ptrs_per_block(nodesize) as u64;
    while levels.last().map(|l| l.len()).unwrap_or(1) > 1 {
        let below = levels.last().map(|l| l.len() as u64).unwrap_or(0);
        levels.push((0..below).step_by(per_node as usize).collect());
    }
    Shape { levels, items: n }
}

//! Inode numbers and directory indexes.
//!
//! A fresh image numbers each tree's inodes from 256 depth first (a
//! directory, then each child's whole subtree in name order, as
//! `mkfs.btrfs --rootdir` does), so a subtree's items lie together in the
//! fs tree and adding or removing one (a store path) touches few leaves;
//! each directory's entries are numbered from 2 in name order. An update keeps the
//! numbers its base layout recorded for the paths it still has, and gives
//! new inodes and entries numbers after the highest the base used: the
//! items of unchanged files keep their keys, so the leaves holding them
//! can come out byte for byte as they were. Numbers are keys, so the fs
//! tree goes in inode-number order; the dense inode *index* every table
//! uses is the position in that order.

use crate::source::SourceTree;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStringExt;

/// The first inode number of every tree (its root directory).
pub const ROOT_INO: u64 = 256;

/// The first index of a directory entry (0 and 1 are `.` and `..`).
pub const FIRST_INDEX: u64 = 2;

/// Largest inode number or directory index a base may name: far below the
/// kernel's limits, far above what any tree reaches.
pub const MAX_NUMBER: u64 = 1 << 48;

/// What a base layout recorded for one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryNumbers {
    /// The fs tree holding the entry's inode.
    pub tree: u64,
    pub ino: u64,
    /// Its index in its parent directory (0 for a tree's root).
    pub index: u64,
}

/// The numbers of a base layout's entries, by image path.
#[derive(Clone, Debug, Default)]
pub struct BaseNumbers {
    pub entries: BTreeMap<Vec<u8>, EntryNumbers>,
    /// The highest inode number of each tree.
    pub max_ino: BTreeMap<u64, u64>,
    /// The highest entry index of each directory, by its image path.
    pub max_index: BTreeMap<Vec<u8>, u64>,
}

impl BaseNumbers {
    /// Adds one recorded entry (the caller checks the numbers' ranges).
    pub fn insert(&mut self, path: Vec<u8>, n: EntryNumbers) -> bool {
        let m = self.max_ino.entry(n.tree).or_insert(ROOT_INO);
        *m = (*m).max(n.ino);
        let parent = parent_path(&path).to_vec();
        let m = self.max_index.entry(parent).or_insert(FIRST_INDEX - 1);
        *m = (*m).max(n.index);
        self.entries.insert(path, n).is_none()
    }
}

/// `/a/b` → `/a`; `/a` → `/`.
fn parent_path(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(0) => b"/",
        Some(i) => &p[..i],
        None => b"",
    }
}

/// Every node, depth first: a directory before its children, each child's
/// subtree whole before the next child's.
fn depth_first(tree: &SourceTree) -> Vec<u32> {
    let mut out = Vec::with_capacity(tree.len());
    if tree.is_empty() {
        return out;
    }
    let mut stack = vec![0u32];
    while let Some(d) = stack.pop() {
        out.push(d);
        stack.extend(tree.children(d).rev());
    }
    out
}

/// The numbering of every tree of an image.
#[derive(Debug, Default)]
pub struct Numbering {
    /// Inode index of every node in its own tree.
    pub node_ino: Vec<u32>,
    /// Per tree: the inode number of each index (`None`: 256 + index).
    pub inos: Vec<Option<Vec<u64>>>,
    /// Per tree: the first node (in source order) of each inode index.
    pub firsts: Vec<Vec<u32>>,
    /// Every node's index in its parent directory (`None`: 2 + position).
    pub dir_index: Option<Vec<u64>>,
    /// Every directory's children in index order, at the children's own
    /// positions (`None`: the children's order).
    pub index_order: Option<Vec<u32>>,
}

/// Numbers the inodes of every tree and the entries of every directory.
/// `tree_of(n)` is node `n`'s tree (an index into `tree_ids`); `first[n]`
/// the first node of `n`'s inode (`n` itself for an inode's first name).
pub fn number(
    tree: &SourceTree,
    tree_ids: &[u64],
    tree_of: &dyn Fn(u32) -> usize,
    first: &[u32],
    roots: &[u32],
    base: Option<&BaseNumbers>,
) -> Numbering {
    let n = tree.len();
    let base = base.filter(|b| !b.entries.is_empty());
    // Paths are made when looked up (at most twice a node), not kept: the
    // base's own table is the one copy of every path in memory.
    let path = |i: u32| tree.image_path(i).into_os_string().into_vec();
    let recorded = |i: u32| base.and_then(|b| b.entries.get(&path(i)));

    // Inodes: (number, first node) per tree.
    let mut per_tree: Vec<Vec<(u64, u32)>> = vec![Vec::new(); tree_ids.len()];
    let mut taken: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); tree_ids.len()];
    let mut fresh: Vec<u64> = tree_ids
        .iter()
        .map(|id| {
            base.and_then(|b| b.max_ino.get(id))
                .map_or(ROOT_INO, |&m| m.max(ROOT_INO))
        })
        .collect();
    let counted = base.is_none();
    for i in depth_first(tree) {
        if first[i as usize] != i {
            continue;
        }
        let t = tree_of(i);
        let list = &mut per_tree[t];
        let ino = if roots[t] == i {
            ROOT_INO
        } else if counted {
            ROOT_INO + list.len() as u64
        } else {
            match recorded(i) {
                Some(r) if r.tree == tree_ids[t] && r.ino > ROOT_INO && taken[t].insert(r.ino) => {
                    r.ino
                }
                _ => {
                    fresh[t] += 1;
                    fresh[t]
                }
            }
        };
        list.push((ino, i));
    }
    let mut node_ino = vec![0u32; n];
    let mut inos = Vec::with_capacity(tree_ids.len());
    let mut firsts = Vec::with_capacity(tree_ids.len());
    for mut list in per_tree {
        if !counted {
            list.sort_unstable();
        }
        for (idx, &(_, node)) in list.iter().enumerate() {
            node_ino[node as usize] = idx as u32;
        }
        let dense = list
            .iter()
            .enumerate()
            .all(|(idx, &(ino, _))| ino == ROOT_INO + idx as u64);
        inos.push((!dense).then(|| list.iter().map(|&(ino, _)| ino).collect()));
        firsts.push(list.into_iter().map(|(_, node)| node).collect());
    }
    for i in 0..n {
        node_ino[i] = node_ino[first[i] as usize];
    }

    // Directory indexes.
    let (mut dir_index, mut index_order) = (None, None);
    if let Some(b) = base {
        let mut idx = vec![0u64; n];
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut changed = false;
        for d in 0..n as u32 {
            let r = tree.children(d);
            if r.is_empty() {
                continue;
            }
            let mut next = b
                .max_index
                .get(&path(d))
                .map_or(FIRST_INDEX - 1, |&m| m.max(FIRST_INDEX - 1));
            let mut used = BTreeSet::new();
            for c in r.clone() {
                let i = match recorded(c) {
                    Some(e) if e.index >= FIRST_INDEX && used.insert(e.index) => e.index,
                    _ => {
                        next += 1;
                        next
                    }
                };
                idx[c as usize] = i;
                changed |= i != FIRST_INDEX + (c - r.start) as u64;
            }
            order[r.start as usize..r.end as usize].sort_by_key(|&c| idx[c as usize]);
        }
        if changed {
            dir_index = Some(idx);
            index_order = Some(order);
        }
    }
    Numbering {
        node_ino,
        inos,
        firsts,
        dir_index,
        index_order,
    }
}

impl Numbering {
    /// The inode number of index `idx` of tree `t`.
    pub fn ino(&self, t: usize, idx: u32) -> u64 {
        match &self.inos[t] {
            Some(v) => v[idx as usize],
            None => ROOT_INO + idx as u64,
        }
    }

    /// The index of inode number `ino` in tree `t`.
    pub fn index_of(&self, t: usize, ino: u64) -> Option<u32> {
        match &self.inos[t] {
            Some(v) => v.binary_search(&ino).ok().map(|i| i as u32),
            None => ino
                .checked_sub(ROOT_INO)
                .filter(|&i| i < self.firsts[t].len() as u64)
                .map(|i| i as u32),
        }
    }

    /// Child `c`'s index in its parent directory (`pos`: its position there).
    pub fn dir_index(&self, c: u32, pos: u32) -> u64 {
        match &self.dir_index {
            Some(v) => v[c as usize],
            None => FIRST_INDEX + pos as u64,
        }
    }

    /// The child of a directory whose children start at `first` that comes
    /// `k`-th in index order.
    pub fn index_child(&self, first: u32, k: u32) -> u32 {
        match &self.index_order {
            Some(v) => v[(first + k) as usize],
            None => first + k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::generated::Entry;
    use crate::source::Fill;
    use std::os::unix::ffi::OsStrExt;

    fn tree(names: &[&str]) -> SourceTree {
        let store = names
            .iter()
            .map(|n| (n.as_bytes().to_vec(), Entry::file(10, Fill::Zeros)))
            .collect();
        let root = Entry::dir(BTreeMap::from([(b"d".to_vec(), Entry::dir(store))]));
        crate::source::generated::build(&root).expect("builds")
    }

    fn number_of(t: &SourceTree, base: Option<&BaseNumbers>) -> Numbering {
        let first: Vec<u32> = (0..t.len() as u32).collect();
        number(t, &[5], &|_| 0, &first, &[0], base)
    }

    fn recorded(t: &SourceTree, n: &Numbering) -> BaseNumbers {
        let mut b = BaseNumbers::default();
        for i in 0..t.len() as u32 {
            let p = t.image_path(i).as_os_str().as_bytes().to_vec();
            let pos = match i {
                0 => 0,
                _ => i - t.node(t.node(i).parent).first_child(),
            };
            let index = if i == 0 { 0 } else { n.dir_index(i, pos) };
            b.insert(
                p,
                EntryNumbers {
                    tree: 5,
                    ino: n.ino(0, n.node_ino[i as usize]),
                    index,
                },
            );
        }
        b
    }

    #[test]
    fn a_fresh_tree_is_numbered_in_order() {
        let t = tree(&["a", "b", "c"]);
        let n = number_of(&t, None);
        assert!(n.inos[0].is_none() && n.dir_index.is_none());
        assert_eq!(n.node_ino, vec![0, 1, 2, 3, 4]);
        assert_eq!(n.ino(0, 4), 260);
        assert_eq!(n.index_of(0, 260), Some(4));
        assert_eq!(n.index_of(0, 261), None);
        // Depth first: /a's subtree before /b.
        let root = Entry::dir(BTreeMap::from([
            (
                b"a".to_vec(),
                Entry::dir(BTreeMap::from([(
                    b"x".to_vec(),
                    Entry::file(1, Fill::Zeros),
                )])),
            ),
            (b"b".to_vec(), Entry::file(1, Fill::Zeros)),
        ]));
        let t = crate::source::generated::build(&root).expect("builds");
        let n = number_of(&t, None);
        let x = t.child(t.child(0, b"a").expect("a"), b"x").expect("x");
        let b = t.child(0, b"b").expect("b");
        assert_eq!(
            (
                n.ino(0, n.node_ino[x as usize]),
                n.ino(0, n.node_ino[b as usize])
            ),
            (258, 259)
        );
    }

    #[test]
    fn an_update_keeps_numbers_and_appends_new_ones() {
        let v1 = tree(&["a", "b", "c", "d"]);
        let b1 = recorded(&v1, &number_of(&v1, None));
        // "b" is gone, "bb" and "z" are new.
        let v2 = tree(&["a", "bb", "c", "d", "z"]);
        let n = number_of(&v2, Some(&b1));
        let ino = |name: &str| {
            let d = v2.child(0, b"d").expect("d");
            let c = v2.child(d, name.as_bytes()).expect("child");
            (n.ino(0, n.node_ino[c as usize]), n.dir_index(c, 0))
        };
        // v1: / 256, d 257, a 258, b 259, c 260, d 261; indexes 2.. in d.
        assert_eq!(ino("a"), (258, 2));
        assert_eq!(ino("c"), (260, 4));
        assert_eq!(ino("d"), (261, 5));
        assert_eq!(ino("bb"), (262, 6));
        assert_eq!(ino("z"), (263, 7));
        // Index order is inode-number order; children in index order.
        let inos: Vec<u64> = (0..v2.len() as u32).map(|i| n.ino(0, i)).collect();
        assert!(inos.windows(2).all(|w| w[0] < w[1]), "{inos:?}");
        let d = v2.child(0, b"d").expect("d");
        let first = v2.node(d).first_child();
        let by_index: Vec<u64> = (0..5)
            .map(|k| n.dir_index(n.index_child(first, k), 0))
            .collect();
        assert_eq!(by_index, vec![2, 4, 5, 6, 7]);
        // The same base and tree: the same numbers.
        let again = number_of(&v2, Some(&b1));
        assert_eq!(again.node_ino, n.node_ino);
        assert_eq!(again.inos, n.inos);
    }

    #[test]
    fn colliding_recorded_numbers_go_to_the_first_claim() {
        let v1 = tree(&["a", "b"]);
        let mut b1 = recorded(&v1, &number_of(&v1, None));
        // A hostile record: both files claim inode 258 and index 2.
        for name in ["/d/a", "/d/b"] {
            let e = b1.entries.get_mut(name.as_bytes()).expect("recorded");
            e.ino = 258;
            e.index = 2;
        }
        let n = number_of(&v1, Some(&b1));
        let mut inos: Vec<u64> = (0..v1.len() as u32).map(|i| n.ino(0, i)).collect();
        inos.dedup();
        assert_eq!(inos.len(), v1.len(), "distinct inode numbers");
        let d = v1.child(0, b"d").expect("d");
        let (a, b) = (v1.child(d, b"a").expect("a"), v1.child(d, b"b").expect("b"));
        assert_ne!(n.dir_index(a, 0), n.dir_index(b, 1));
    }
}

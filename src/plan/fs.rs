//! The fs tree (subvolume 5): inode numbering and every item of every inode,
//! readable from any item index without materializing the tree.
//!
//! Inodes are numbered in source order (breadth-first, names sorted bytewise), so
//! the numbers depend only on the tree's content. Each inode's items come in key
//! order as "sections": INODE_ITEM, refs (INODE_REF then INODE_EXTREF), XATTR_ITEMs,
//! DIR_ITEMs, DIR_INDEXes, EXTENT_DATA. Per-inode section counts plus a prefix sum of
//! item indexes give O(log n) access to any item, which is what on-demand leaf
//! encoding needs.

use super::data::DataExtent;
use super::items::{Body, DirEntry, Item, ItemSource};
use crate::format::hash::{extref_hash, name_hash};
use crate::format::items::{InodeItem, RegularExtent};
use crate::format::*;
use crate::source::{Kind, SourceTree};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Inode attributes chosen by the caller rather than the source.
#[derive(Clone, Debug)]
pub struct InodePolicy {
    pub generation: u64,
    /// Force every inode's owner (uid, gid).
    pub owner: Option<(u32, u32)>,
    /// Creation time (otime) of every inode.
    pub otime: Timespec,
    /// Files up to this size are stored inline in the fs tree.
    pub max_inline: u64,
}

#[derive(Clone, Debug)]
pub struct Inode {
    /// The source node that holds this inode's attributes (first of its hard links).
    pub node: u32,
    pub nlink: u32,
    pub size: u64,
    pub first_item: u64,
    pub ext_start: u32,
    pub ext_count: u32,
    pub inline: bool,
    pub n_refs: u32,
    pub n_xattr: u32,
    pub n_dir: u32,
}

/// Extended attributes whose names share one hash: (name, value).
type XattrGroup<'a> = Vec<(&'a [u8], &'a [u8])>;

/// One INODE_REF or INODE_EXTREF item of a hard-linked inode.
#[derive(Clone, Debug)]
struct RefItem {
    key: Key,
    nodes: Vec<u32>,
}

pub struct FsItems {
    pub tree: Arc<SourceTree>,
    pub inodes: Vec<Inode>,
    /// Inode index (ino - 256) of every source node.
    pub node_ino: Vec<u32>,
    /// For every directory, its children sorted by (name hash, name); stored at the
    /// positions of the children themselves.
    hash_order: Vec<u32>,
    /// Directories with colliding name hashes: start offsets of each DIR_ITEM group.
    collisions: BTreeMap<u32, Vec<u32>>,
    /// Hard-linked inodes: their ref items.
    links: BTreeMap<u32, Vec<RefItem>>,
    pub extents: Arc<Vec<DataExtent>>,
    pub policy: InodePolicy,
    items: u64,
}

pub fn ftype(kind: Kind) -> u8 {
    match kind {
        Kind::Dir => FT_DIR,
        Kind::File => FT_REG_FILE,
        Kind::Symlink => FT_SYMLINK,
        Kind::Fifo => FT_FIFO,
        Kind::Socket => FT_SOCK,
        Kind::CharDev => FT_CHRDEV,
        Kind::BlockDev => FT_BLKDEV,
    }
}

impl FsItems {
    /// Numbers inodes and counts every section except file extents.
    pub fn new(tree: Arc<SourceTree>, policy: InodePolicy, nodesize: u32) -> FsItems {
        let n = tree.len();
        let mut node_ino = vec![0u32; n];
        let mut inodes: Vec<Inode> = Vec::new();
        for i in 0..n as u32 {
            let node = tree.node(i);
            if node.link_rep == i {
                node_ino[i as usize] = inodes.len() as u32;
                let size = match node.kind {
                    Kind::Dir => tree
                        .children(i)
                        .map(|c| 2 * tree.name(c).len() as u64)
                        .sum(),
                    Kind::File | Kind::Symlink => node.size,
                    _ => 0,
                };
                let n_xattr = {
                    let mut h: Vec<u64> = tree.xattrs(i).map(|(k, _)| name_hash(k)).collect();
                    h.sort_unstable();
                    h.dedup();
                    h.len() as u32
                };
                let inline = match node.kind {
                    Kind::Symlink => true,
                    Kind::File => {
                        node.size > 0
                            && node.size <= policy.max_inline
                            && !tree.segments(i).is_empty()
                    }
                    _ => false,
                };
                inodes.push(Inode {
                    node: i,
                    nlink: 1,
                    size,
                    first_item: 0,
                    ext_start: 0,
                    ext_count: 0,
                    inline,
                    n_refs: 1,
                    n_xattr,
                    n_dir: 0,
                });
            } else {
                let rep = node_ino[node.link_rep as usize];
                node_ino[i as usize] = rep;
                inodes[rep as usize].nlink += 1;
            }
        }

        // Hard links: group names by parent inode; overflow into INODE_EXTREF.
        let mut by_inode: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for i in 1..n as u32 {
            let ino = node_ino[i as usize];
            if inodes[ino as usize].nlink > 1 {
                by_inode.entry(ino).or_default().push(i);
            }
        }
        let max_item = max_item_size(nodesize);
        let mut links = BTreeMap::new();
        for (ino, mut names) in by_inode {
            names.sort_by_key(|&c| (node_ino[tree.node(c).parent as usize], c));
            let mut refs: Vec<RefItem> = Vec::new();
            let mut ext: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
            let mut cur_parent = u32::MAX;
            let mut cur_size = 0usize;
            for c in names {
                let parent = node_ino[tree.node(c).parent as usize];
                let rec = INODE_REF_HEADER + tree.name(c).len();
                if parent != cur_parent {
                    cur_parent = parent;
                    cur_size = rec;
                    refs.push(RefItem {
                        key: Key::new(256 + ino as u64, INODE_REF_KEY, 256 + parent as u64),
                        nodes: vec![c],
                    });
                } else if cur_size + rec <= max_item {
                    cur_size += rec;
                    if let Some(r) = refs.last_mut() {
                        r.nodes.push(c);
                    }
                } else {
                    let h = extref_hash(256 + parent as u64, tree.name(c));
                    ext.entry(h).or_default().push(c);
                }
            }
            for (h, nodes) in ext {
                refs.push(RefItem {
                    key: Key::new(256 + ino as u64, INODE_EXTREF_KEY, h),
                    nodes,
                });
            }
            inodes[ino as usize].n_refs = refs.len() as u32;
            links.insert(ino, refs);
        }

        // Directory items in hash order.
        let mut hash_order: Vec<u32> = (0..n as u32).collect();
        let mut collisions = BTreeMap::new();
        for inode in inodes.iter_mut() {
            let d = inode.node;
            if tree.node(d).kind != Kind::Dir {
                continue;
            }
            let r = tree.children(d);
            let slice = &mut hash_order[r.start as usize..r.end as usize];
            slice.sort_by_cached_key(|&c| (name_hash(tree.name(c)), c));
            let mut groups = Vec::new();
            let mut last = None;
            for (k, &c) in slice.iter().enumerate() {
                let h = name_hash(tree.name(c));
                if last != Some(h) {
                    groups.push(k as u32);
                    last = Some(h);
                }
            }
            inode.n_dir = groups.len() as u32;
            if groups.len() != slice.len() {
                collisions.insert(d, groups);
            }
        }

        FsItems {
            tree,
            inodes,
            node_ino,
            hash_order,
            collisions,
            links,
            extents: Arc::new(Vec::new()),
            policy,
            items: 0,
        }
    }

    /// Attaches the placed data extents and computes item indexes.
    pub fn set_extents(&mut self, extents: Arc<Vec<DataExtent>>, per_inode: &[(u32, u32)]) {
        self.extents = extents;
        let mut next = 0u64;
        for (i, inode) in self.inodes.iter_mut().enumerate() {
            let (s, c) = per_inode[i];
            inode.ext_start = s;
            inode.ext_count = c;
            inode.first_item = next;
            next += (0..6)
                .map(|sec| section_len(&self.tree, inode, sec) as u64)
                .sum::<u64>();
        }
        self.items = next;
    }

    pub fn ino(&self, inode_idx: u32) -> u64 {
        256 + inode_idx as u64
    }

    fn index_in_parent(&self, c: u32) -> u64 {
        let p = self.tree.node(c).parent;
        2 + (c - self.tree.node(p).first_child()) as u64
    }

    fn location(&self, c: u32) -> Key {
        Key::new(self.ino(self.node_ino[c as usize]), INODE_ITEM_KEY, 0)
    }

    pub fn nbytes(&self, inode: &Inode) -> u64 {
        let node = self.tree.node(inode.node);
        match node.kind {
            Kind::Symlink => node.size,
            Kind::File if inode.inline => node.size,
            Kind::File => self.extents[inode.ext_start as usize..][..inode.ext_count as usize]
                .iter()
                .map(|e| e.len)
                .sum(),
            _ => 0,
        }
    }

    fn inode_item(&self, idx: usize) -> InodeItem {
        let inode = &self.inodes[idx];
        let node = self.tree.node(inode.node);
        let p = &self.policy;
        let (uid, gid) = p.owner.unwrap_or((node.uid, node.gid));
        InodeItem {
            generation: p.generation,
            transid: p.generation,
            size: inode.size,
            nbytes: self.nbytes(inode),
            nlink: inode.nlink,
            uid,
            gid,
            mode: node.mode,
            rdev: node.rdev(),
            flags: 0,
            atime: node.mtime,
            ctime: node.mtime,
            mtime: node.mtime,
            otime: p.otime,
        }
    }

    fn item(&self, idx: usize, section: u8, k: u32) -> Item<'_> {
        let inode = &self.inodes[idx];
        let ino = self.ino(idx as u32);
        let tree = &*self.tree;
        let d = inode.node;
        match section {
            0 => Item {
                key: Key::new(ino, INODE_ITEM_KEY, 0),
                body: Body::Inode(self.inode_item(idx)),
            },
            1 => {
                if idx == 0 {
                    return Item {
                        key: Key::new(ino, INODE_REF_KEY, ino),
                        body: Body::InodeRef(vec![(0, b"..")]),
                    };
                }
                if let Some(refs) = self.links.get(&(idx as u32)) {
                    let r = &refs[k as usize];
                    let body = if r.key.ty == INODE_REF_KEY {
                        Body::InodeRef(
                            r.nodes
                                .iter()
                                .map(|&c| (self.index_in_parent(c), tree.name(c)))
                                .collect(),
                        )
                    } else {
                        Body::InodeExtref(
                            r.nodes
                                .iter()
                                .map(|&c| {
                                    let p = self.ino(self.node_ino[tree.node(c).parent as usize]);
                                    (p, self.index_in_parent(c), tree.name(c))
                                })
                                .collect(),
                        )
                    };
                    return Item { key: r.key, body };
                }
                let parent = self.ino(self.node_ino[tree.node(d).parent as usize]);
                Item {
                    key: Key::new(ino, INODE_REF_KEY, parent),
                    body: Body::InodeRef(vec![(self.index_in_parent(d), tree.name(d))]),
                }
            }
            2 => {
                let mut xs: Vec<(u64, &[u8], &[u8])> =
                    tree.xattrs(d).map(|(n, v)| (name_hash(n), n, v)).collect();
                xs.sort();
                let mut groups: Vec<(u64, XattrGroup)> = Vec::new();
                for (h, n, v) in xs {
                    match groups.last_mut() {
                        Some((lh, g)) if *lh == h => g.push((n, v)),
                        _ => groups.push((h, vec![(n, v)])),
                    }
                }
                let (h, g) = groups.swap_remove(k as usize);
                Item {
                    key: Key::new(ino, XATTR_ITEM_KEY, h),
                    body: Body::Xattrs(g),
                }
            }
            3 => {
                let first = tree.node(d).first_child() as usize;
                let (lo, hi) = match self.collisions.get(&d) {
                    Some(g) => {
                        let lo = g[k as usize] as usize;
                        let hi = g
                            .get(k as usize + 1)
                            .map(|&x| x as usize)
                            .unwrap_or(tree.node(d).nchildren() as usize);
                        (lo, hi)
                    }
                    None => (k as usize, k as usize + 1),
                };
                let kids = &self.hash_order[first + lo..first + hi];
                let h = name_hash(tree.name(kids[0]));
                Item {
                    key: Key::new(ino, DIR_ITEM_KEY, h),
                    body: Body::Dir(kids.iter().map(|&c| self.dir_entry(c)).collect()),
                }
            }
            4 => {
                let c = tree.node(d).first_child() + k;
                Item {
                    key: Key::new(ino, DIR_INDEX_KEY, 2 + k as u64),
                    body: Body::Dir(vec![self.dir_entry(c)]),
                }
            }
            _ => {
                let node = tree.node(d);
                if inode.inline {
                    let body = if node.kind == Kind::Symlink {
                        Body::InlineBytes(tree.link_target(d))
                    } else {
                        Body::InlineFile {
                            node: d,
                            len: node.size,
                        }
                    };
                    return Item {
                        key: Key::new(ino, EXTENT_DATA_KEY, 0),
                        body,
                    };
                }
                let e = &self.extents[(inode.ext_start + k) as usize];
                Item {
                    key: Key::new(ino, EXTENT_DATA_KEY, e.file_offset),
                    body: Body::Extent(RegularExtent {
                        generation: self.policy.generation,
                        ram_bytes: e.len,
                        disk_bytenr: e.logical,
                        disk_num_bytes: e.len,
                        offset: 0,
                        num_bytes: e.len,
                    }),
                }
            }
        }
    }

    fn dir_entry(&self, c: u32) -> DirEntry<'_> {
        let rep = self.tree.node(c).link_rep;
        DirEntry {
            location: self.location(c),
            ftype: ftype(self.tree.node(rep).kind),
            name: self.tree.name(c),
        }
    }
}

/// Number of items of `inode` in section `sec` (see the module comment).
fn section_len(tree: &SourceTree, inode: &Inode, sec: u8) -> u32 {
    let node = tree.node(inode.node);
    match sec {
        0 => 1,
        1 => inode.n_refs,
        2 => inode.n_xattr,
        3 => inode.n_dir,
        4 => node.nchildren(),
        _ => {
            if inode.inline {
                1
            } else {
                inode.ext_count
            }
        }
    }
}

struct FsIter<'a> {
    fs: &'a FsItems,
    inode: usize,
    section: u8,
    k: u32,
}

impl<'a> Iterator for FsIter<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        loop {
            let inode = self.fs.inodes.get(self.inode)?;
            if self.section > 5 {
                self.inode += 1;
                self.section = 0;
                self.k = 0;
                continue;
            }
            if self.k < section_len(&self.fs.tree, inode, self.section) {
                let item = self.fs.item(self.inode, self.section, self.k);
                self.k += 1;
                return Some(item);
            }
            self.section += 1;
            self.k = 0;
        }
    }
}

impl ItemSource for FsItems {
    fn count(&self) -> u64 {
        self.items
    }

    fn iter_from(&self, start: u64) -> Box<dyn Iterator<Item = Item<'_>> + '_> {
        let idx = self
            .inodes
            .partition_point(|i| i.first_item <= start)
            .saturating_sub(1);
        let mut it = FsIter {
            fs: self,
            inode: idx,
            section: 0,
            k: 0,
        };
        if let Some(inode) = self.inodes.get(idx) {
            let mut local = start - inode.first_item;
            while it.section <= 5 {
                let n = section_len(&self.tree, inode, it.section) as u64;
                if local < n {
                    it.k = local as u32;
                    break;
                }
                local -= n;
                it.section += 1;
            }
        }
        Box::new(it)
    }
}

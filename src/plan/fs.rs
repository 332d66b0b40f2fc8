//! A filesystem tree: inode numbering and every item of every inode, readable
//! from any item index without materializing the tree.
//!
//! Inodes are numbered in source order (breadth-first, names sorted bytewise), so
//! the numbers depend only on the tree's content. Each inode's items come in key
//! order as "sections": INODE_ITEM, refs (INODE_REF then INODE_EXTREF), XATTR_ITEMs,
//! DIR_ITEMs, DIR_INDEXes, EXTENT_DATA. Per-inode first item indexes give
//! O(log n) access to any item, which is what on-demand leaf encoding needs.
//! The rare cases (hash collisions, hard links) live in side tables, so an
//! ordinary inode costs 24 bytes here.

use super::data::DataExtent;
use super::items::{Body, DirEntry, Item, ItemSource};
use super::pack::Oversized;
use super::subvol::Partition;
use super::trees::{DataRef, ExtentOwners};
use crate::content::{ContentIndex, Stored};
use crate::error::{Error, Result};
use crate::format::hash::{extref_hash, name_hash};
use crate::format::items::{InodeItem, RegularExtent};
use crate::format::*;
use crate::source::{Kind, SourceTree, LINK_MAX};
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
    /// `--inode-flags`: NODATACOW and NODATASUM per inode.
    pub flags: Arc<super::inode_flags::InodeFlags>,
}

const INLINE: u8 = 1;
const LINKED: u8 = 2;
const XATTR_COLLISION: u8 = 4;
const DIR_COLLISION: u8 = 8;
/// Stored compressed (inline or in at least one extent): gets INODE_FLAG_COMPRESS.
const COMPRESSED: u8 = 16;
/// Shares another inode's extents (dedupe, or a hard link split between
/// subvolumes).
const SHARED: u8 = 32;

/// 24 bytes per inode: the flags live in the top byte of the item index.
#[derive(Clone, Copy, Debug)]
struct Inode {
    /// The source node of this inode's first name in this tree (its
    /// attributes are its first hard link's, `SourceTree::link_rep`).
    node: u32,
    /// Its data extents (its node's, placed in node order).
    ext_start: u32,
    ext_len: u32,
    /// Index of its first item (low 56 bits) and its flags (top 8 bits).
    item_flags: u64,
}

const ITEM_BITS: u32 = 56;

impl Inode {
    fn new(node: u32, flags: u8) -> Inode {
        Inode {
            node,
            ext_start: 0,
            ext_len: 0,
            item_flags: (flags as u64) << ITEM_BITS,
        }
    }

    fn first_item(&self) -> u64 {
        self.item_flags & ((1 << ITEM_BITS) - 1)
    }

    fn set_first_item(&mut self, i: u64) {
        assert!(i < 1 << ITEM_BITS, "item indexes fit 56 bits");
        self.item_flags = (self.item_flags & !((1 << ITEM_BITS) - 1)) | i;
    }

    fn has(&self, flag: u8) -> bool {
        (self.item_flags >> ITEM_BITS) as u8 & flag != 0
    }

    fn set(&mut self, flag: u8) {
        self.item_flags |= (flag as u64) << ITEM_BITS;
    }
}

/// One INODE_REF or INODE_EXTREF item of a hard-linked inode.
#[derive(Clone, Debug)]
struct RefItem {
    key: Key,
    nodes: Vec<u32>,
}

#[derive(Clone, Debug)]
struct Links {
    nlink: u32,
    refs: Vec<RefItem>,
}

/// Extended attributes whose names share one hash: (name, value).
type XattrGroup<'a> = Vec<(&'a [u8], &'a [u8])>;

pub struct FsItems {
    tree: Arc<SourceTree>,
    /// Which tree each node is in, and its inode index there.
    part: Arc<Partition>,
    /// This tree's index in `part.subvols`.
    this: usize,
    /// The tree's object id (5 for the top-level fs tree).
    objectid: u64,
    inodes: Vec<Inode>,
    /// For every directory, its children sorted by (name hash, node); stored at
    /// the positions of the children themselves (one for all trees).
    hash_order: Arc<Vec<u32>>,
    /// Directories with colliding name hashes: start of each DIR_ITEM group.
    dir_groups: BTreeMap<u32, Vec<u32>>,
    /// Inodes whose xattr names collide: the number of XATTR_ITEMs.
    xattr_items: BTreeMap<u32, u32>,
    links: BTreeMap<u32, Links>,
    /// Inodes sharing another file's extents: sharer -> the source node
    /// that has them (in this tree or another).
    shared: BTreeMap<u32, u32>,
    /// Extent ranges of the shared sources, once placed.
    shared_ranges: BTreeMap<u32, (u32, u32)>,
    extents: Arc<Vec<DataExtent>>,
    /// What the content pass decided, when there was one.
    content: Option<Arc<ContentIndex>>,
    policy: InodePolicy,
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

fn distinct_hashes<'a>(names: impl Iterator<Item = &'a [u8]>) -> u32 {
    let mut h: Vec<u64> = names.map(name_hash).collect();
    h.sort_unstable();
    h.dedup();
    h.len() as u32
}

/// Every directory's children sorted by (name hash, node), at the children's
/// own positions: the order of DIR_ITEMs, shared by all trees.
pub fn hash_order(tree: &SourceTree) -> Arc<Vec<u32>> {
    let mut order: Vec<u32> = (0..tree.len() as u32).collect();
    for d in 0..tree.len() as u32 {
        if tree.node(d).kind == Kind::Dir {
            let r = tree.children(d);
            order[r.start as usize..r.end as usize]
                .sort_by_cached_key(|&c| (name_hash(tree.name(c)), c));
        }
    }
    Arc::new(order)
}

impl FsItems {
    /// Numbers inodes and groups names of tree `this` of `part`; file
    /// extents are attached later.
    pub fn new(
        tree: Arc<SourceTree>,
        part: Arc<Partition>,
        this: usize,
        hash_order: Arc<Vec<u32>>,
        policy: InodePolicy,
        nodesize: u32,
        content: Option<Arc<ContentIndex>>,
    ) -> Result<FsItems> {
        let n = tree.len();
        let objectid = part.subvols[this].id;
        let node_ino = &part.numbering.node_ino;
        let firsts = &part.numbering.firsts[this];
        let ino_of = |idx: u32| part.numbering.ino(this, idx);
        let mut inodes: Vec<Inode> = Vec::with_capacity(firsts.len());
        let mut xattr_items = BTreeMap::new();
        let mut shared: BTreeMap<u32, u32> = BTreeMap::new();
        let mut nlinks: BTreeMap<u32, u32> = BTreeMap::new();
        for i in 0..n as u32 {
            let idx = node_ino[i as usize];
            if part.subvol(i) == this && firsts[idx as usize] != i {
                // A later name of an inode of this tree.
                *nlinks.entry(idx).or_insert(1) += 1;
            }
        }
        // Inodes in index (= inode number) order.
        for &i in firsts {
            // Attributes and data are the first hard link's (in this tree or,
            // for a link split between subvolumes, another).
            let a = tree.link_rep(i);
            let node = tree.node(a);
            let idx = inodes.len() as u32;
            let mut flags = 0;
            let stored = content.as_ref().and_then(|c| c.stored(a));
            let inline = match (node.kind, stored) {
                (Kind::Symlink, _) => true,
                (Kind::File, Some(s)) => matches!(s, Stored::Inline { .. }),
                (Kind::File, None) => {
                    node.size > 0 && node.size <= policy.max_inline && !tree.segments(a).is_empty()
                }
                _ => false,
            };
            if inline {
                flags |= INLINE;
            }
            let pieces_compressed = |s: Option<Stored>| match s {
                Some(Stored::Pieces { first, count }) => content
                    .as_ref()
                    .is_some_and(|c| c.pieces(first, count).iter().any(|p| p.algorithm.is_some())),
                _ => false,
            };
            let compressed = match stored {
                Some(Stored::Inline { algorithm, .. }) => algorithm.is_some(),
                Some(Stored::Shared { node: of }) => {
                    pieces_compressed(content.as_ref().and_then(|c| c.stored(of)))
                }
                s => pieces_compressed(s),
            };
            if compressed {
                flags |= COMPRESSED;
            }
            match stored {
                Some(Stored::Shared { node: of }) => {
                    flags |= SHARED;
                    shared.insert(idx, of);
                }
                _ if a != i && node.kind == Kind::File && !inline => {
                    flags |= SHARED;
                    shared.insert(idx, a);
                }
                _ => {}
            }
            let count = tree.xattr_count(a);
            if count > 1 {
                let groups = distinct_hashes(tree.xattrs(a).map(|(k, _)| k));
                if groups != count {
                    flags |= XATTR_COLLISION;
                    xattr_items.insert(idx, groups);
                }
            }
            inodes.push(Inode::new(i, flags));
        }

        // Hard links: group names by parent inode; overflow into INODE_EXTREF.
        let mut by_inode: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        if !nlinks.is_empty() {
            for i in 0..n as u32 {
                let ino = node_ino[i as usize];
                if part.subvol(i) == this && nlinks.contains_key(&ino) {
                    by_inode.entry(ino).or_default().push(i);
                }
            }
        }
        let max_item = max_item_size(nodesize);
        let mut links = BTreeMap::new();
        for (ino, mut names) in by_inode {
            let nlink = names.len() as u32;
            if nlink > LINK_MAX {
                return Err(Error::at(
                    &tree.path(inodes[ino as usize].node),
                    format!("has {nlink} hard links; the kernel allows at most {LINK_MAX}"),
                ));
            }
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
                        key: Key::new(ino_of(ino), INODE_REF_KEY, ino_of(parent)),
                        nodes: vec![c],
                    });
                } else if cur_size + rec <= max_item {
                    cur_size += rec;
                    if let Some(r) = refs.last_mut() {
                        r.nodes.push(c);
                    }
                } else {
                    let h = extref_hash(ino_of(parent), tree.name(c));
                    ext.entry(h).or_default().push(c);
                }
            }
            for (h, nodes) in ext {
                refs.push(RefItem {
                    key: Key::new(ino_of(ino), INODE_EXTREF_KEY, h),
                    nodes,
                });
            }
            inodes[ino as usize].set(LINKED);
            links.insert(ino, Links { nlink, refs });
        }

        // Directory items in hash order.
        let mut dir_groups = BTreeMap::new();
        for inode in inodes.iter_mut() {
            let d = inode.node;
            if tree.node(d).kind != Kind::Dir {
                continue;
            }
            let r = tree.children(d);
            let slice = &hash_order[r.start as usize..r.end as usize];
            let mut groups = Vec::new();
            let mut last = None;
            for (k, &c) in slice.iter().enumerate() {
                let h = name_hash(tree.name(c));
                if last != Some(h) {
                    groups.push(k as u32);
                    last = Some(h);
                }
            }
            if groups.len() != slice.len() {
                inode.set(DIR_COLLISION);
                dir_groups.insert(d, groups);
            }
        }

        Ok(FsItems {
            tree,
            part,
            this,
            objectid,
            inodes,
            hash_order,
            dir_groups,
            xattr_items,
            links,
            shared,
            shared_ranges: BTreeMap::new(),
            extents: Arc::new(Vec::new()),
            content,
            policy,
            items: 0,
        })
    }

    /// The source nodes of the inodes whose data goes into extents, in node (tree) order.
    pub fn extent_files(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .inodes
            .iter()
            .filter(|i| {
                !i.has(INLINE) && !i.has(SHARED) && self.tree.node(i.node).kind == Kind::File
            })
            .map(|i| i.node)
            .collect();
        // Placement (and the content pass) go in node order, which an
        // update's inode numbers need not follow.
        v.sort_unstable();
        v
    }

    /// The source nodes whose extents other inodes share.
    pub fn shared_sources(&self) -> impl Iterator<Item = u32> + '_ {
        self.shared.values().copied()
    }

    /// Attaches the placed data extents: `ranges` gives every file's
    /// (its own and those of the shared sources); computes item indexes.
    pub fn set_extents(
        &mut self,
        extents: Arc<Vec<DataExtent>>,
        ranges: &BTreeMap<u32, (u32, u32)>,
    ) {
        self.shared_ranges = self
            .shared
            .values()
            .map(|&src| (src, ranges.get(&src).copied().unwrap_or((0, 0))))
            .collect();
        let mut next = 0u64;
        for idx in 0..self.inodes.len() {
            let node = self.inodes[idx].node;
            let (start, end) = ranges.get(&node).copied().unwrap_or((0, 0));
            let len = end - start;
            self.inodes[idx].ext_start = start;
            self.inodes[idx].ext_len = len;
            self.inodes[idx].set_first_item(next);
            let ext_count = match self.shared.get(&(idx as u32)) {
                Some(src) => {
                    let (s, e) = self.shared_ranges[src];
                    (e - s) as u64
                }
                None => len as u64,
            };
            next += (0..5)
                .map(|sec| self.section_len(idx, sec) as u64)
                .sum::<u64>()
                + if self.inodes[idx].has(INLINE) {
                    1
                } else {
                    ext_count
                };
        }
        self.extents = extents;
        self.items = next;
    }

    /// The tree's object id (5, or the subvolume's id).
    pub fn objectid(&self) -> u64 {
        self.objectid
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    fn ino(&self, inode_idx: u32) -> u64 {
        self.part.numbering.ino(self.this, inode_idx)
    }

    fn ext_range(&self, idx: usize) -> std::ops::Range<usize> {
        if let Some(src) = self.shared.get(&(idx as u32)) {
            let (s, e) = self.shared_ranges[src];
            return s as usize..e as usize;
        }
        let i = &self.inodes[idx];
        i.ext_start as usize..(i.ext_start + i.ext_len) as usize
    }

    /// The node holding inode `idx`'s attributes and data.
    fn attr(&self, idx: usize) -> u32 {
        self.tree.link_rep(self.inodes[idx].node)
    }

    fn index_in_parent(&self, c: u32) -> u64 {
        self.part.dir_index(&self.tree, c)
    }

    /// Where a directory entry points: the child's inode, or for the root
    /// of a nested subvolume, its ROOT_ITEM (as `btrfs subvolume create`
    /// writes it).
    fn location(&self, c: u32) -> Key {
        if self.part.subvol(c) != self.this {
            return Key::new(self.part.id_of(c), ROOT_ITEM_KEY, 0);
        }
        Key::new(self.part.ino_of(c), INODE_ITEM_KEY, 0)
    }

    fn nbytes(&self, idx: usize) -> u64 {
        let inode = &self.inodes[idx];
        let node = self.tree.node(self.attr(idx));
        match node.kind {
            Kind::Symlink => node.size,
            Kind::File if inode.has(INLINE) => node.size,
            Kind::File => self.extents[self.ext_range(idx)]
                .iter()
                .map(|e| e.ram())
                .sum(),
            _ => 0,
        }
    }

    fn inode_item(&self, idx: usize) -> InodeItem {
        let inode = &self.inodes[idx];
        let node = self.tree.node(self.attr(idx));
        let p = &self.policy;
        let (uid, gid) = p.owner.unwrap_or((node.uid, node.gid));
        let nlink = match self.links.get(&(idx as u32)) {
            Some(l) => l.nlink,
            None => 1,
        };
        let mtime = node.mtime();
        InodeItem {
            generation: p.generation,
            transid: p.generation,
            size: node.size,
            nbytes: self.nbytes(idx),
            nlink,
            uid,
            gid,
            mode: node.mode(),
            rdev: node.rdev(),
            // Files stored compressed keep compressing when a booted system
            // rewrites or appends to them, whatever the mount options say.
            // Files without checksums are never stored compressed.
            flags: if inode.has(COMPRESSED) {
                INODE_FLAG_COMPRESS
            } else {
                0
            } | p.flags.inode_flags(&self.tree, self.attr(idx)),
            atime: mtime,
            ctime: mtime,
            mtime,
            otime: p.otime,
        }
    }

    /// Number of items of inode `idx` in section `sec` (see the module comment).
    fn section_len(&self, idx: usize, sec: u8) -> u32 {
        let inode = &self.inodes[idx];
        let node = self.tree.node(inode.node);
        match sec {
            0 => 1,
            1 if inode.has(LINKED) => self
                .links
                .get(&(idx as u32))
                .map_or(1, |l| l.refs.len() as u32),
            1 => 1,
            2 if inode.has(XATTR_COLLISION) => {
                self.xattr_items.get(&(idx as u32)).copied().unwrap_or(0)
            }
            2 => self.tree.xattr_count(self.attr(idx)),
            3 if inode.has(DIR_COLLISION) => self
                .dir_groups
                .get(&inode.node)
                .map_or(0, |g| g.len() as u32),
            3 | 4 => node.nchildren(),
            _ if inode.has(INLINE) => 1,
            _ => self.ext_range(idx).len() as u32,
        }
    }

    /// The XATTR_ITEMs of a node in key (hash) order.
    fn xattr_groups(&self, node: u32) -> Vec<(u64, XattrGroup<'_>)> {
        let mut xs: Vec<(u64, &[u8], &[u8])> = self
            .tree
            .xattrs(node)
            .map(|(n, v)| (name_hash(n), n, v))
            .collect();
        xs.sort();
        let mut groups: Vec<(u64, XattrGroup)> = Vec::new();
        for (h, n, v) in xs {
            match groups.last_mut() {
                Some((lh, g)) if *lh == h => g.push((n, v)),
                _ => groups.push((h, vec![(n, v)])),
            }
        }
        groups
    }

    fn ref_item(&self, idx: usize, k: u32) -> Item<'_> {
        let ino = self.ino(idx as u32);
        let tree = &*self.tree;
        let d = self.inodes[idx].node;
        if idx == 0 {
            return Item {
                key: Key::new(ino, INODE_REF_KEY, ino),
                body: Body::InodeRef(vec![(0, b"..")]),
            };
        }
        if let Some(l) = self.links.get(&(idx as u32)) {
            let r = &l.refs[k as usize];
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
                            let p = self.part.ino_of(tree.node(c).parent);
                            (p, self.index_in_parent(c), tree.name(c))
                        })
                        .collect(),
                )
            };
            return Item { key: r.key, body };
        }
        let parent = self.part.ino_of(tree.node(d).parent);
        Item {
            key: Key::new(ino, INODE_REF_KEY, parent),
            body: Body::InodeRef(vec![(self.index_in_parent(d), tree.name(d))]),
        }
    }

    fn dir_item(&self, idx: usize, k: u32) -> Item<'_> {
        let d = self.inodes[idx].node;
        let tree = &*self.tree;
        let first = tree.node(d).first_child() as usize;
        let (lo, hi) = match self.dir_groups.get(&d) {
            Some(g) => {
                let lo = g[k as usize] as usize;
                let hi = g
                    .get(k as usize + 1)
                    .map_or(tree.node(d).nchildren() as usize, |&x| x as usize);
                (lo, hi)
            }
            None => (k as usize, k as usize + 1),
        };
        let kids = &self.hash_order[first + lo..first + hi];
        let h = name_hash(tree.name(kids[0]));
        Item {
            key: Key::new(self.ino(idx as u32), DIR_ITEM_KEY, h),
            body: Body::Dir(kids.iter().map(|&c| self.dir_entry(c)).collect()),
        }
    }

    fn extent_item(&self, idx: usize, k: u32) -> Item<'_> {
        let ino = self.ino(idx as u32);
        let inode = &self.inodes[idx];
        let d = self.attr(idx);
        let node = self.tree.node(d);
        if inode.has(INLINE) {
            let compressed = self.content.as_ref().and_then(|c| match c.stored(d) {
                Some(Stored::Inline {
                    algorithm: Some(a),
                    payload,
                }) => Some((a, payload)),
                _ => None,
            });
            let body = match (node.kind, compressed) {
                (Kind::Symlink, _) => Body::InlineBytes(self.tree.link_target(d)),
                (_, Some((a, len))) => Body::InlineCompressed {
                    node: d,
                    compression: a.code(),
                    ram: node.size,
                    len,
                },
                _ => Body::InlineFile {
                    node: d,
                    len: node.size,
                },
            };
            return Item {
                key: Key::new(ino, EXTENT_DATA_KEY, 0),
                body,
            };
        }
        let e = &self.extents[self.ext_range(idx).start + k as usize];
        Item {
            key: Key::new(ino, EXTENT_DATA_KEY, e.file_offset),
            body: Body::Extent(RegularExtent {
                generation: self.policy.generation,
                ram_bytes: e.ram(),
                compression: e.algorithm.map_or(0, |a| a.code()),
                disk_bytenr: e.logical,
                disk_num_bytes: e.size(),
                offset: 0,
                num_bytes: e.ram(),
            }),
        }
    }

    fn dir_entry(&self, c: u32) -> DirEntry<'_> {
        let rep = self.tree.link_rep(c);
        DirEntry {
            location: self.location(c),
            ftype: ftype(self.tree.node(rep).kind),
            name: self.tree.name(c),
        }
    }

    /// The error for an item no leaf can hold, naming the entry that made it.
    pub fn oversized(&self, o: &Oversized, nodesize: u32) -> Error {
        let Some(idx) = self.part.numbering.index_of(self.this, o.key.objectid) else {
            return Error::msg(format!(
                "internal error: an oversized item of no inode ({:?})",
                o.key
            ));
        };
        let node = self.inodes[idx as usize].node;
        let path = self.tree.path(node);
        let Some(item) = self.iter_from(o.index).next() else {
            return Error::at(&path, "internal error: oversized item vanished");
        };
        let list = |names: Vec<&[u8]>| {
            let shown: Vec<String> = names
                .iter()
                .take(3)
                .map(|n| match n.len() {
                    // Long names are cut: the message stays readable.
                    l if l > 40 => format!("'{}...' ({l} bytes)", crate::error::shown(&n[..32])),
                    _ => format!("'{}'", crate::error::shown(n)),
                })
                .collect();
            match names.len() {
                n if n > 3 => format!("{} and {} more", shown.join(", "), n - 3),
                _ => shown.join(", "),
            }
        };
        let limit = format!(
            "too large for a {nodesize}-byte node ({} bytes in one item, at most {})",
            o.size, o.max
        );
        match item.body {
            Body::Dir(entries) => Error::at(
                &path,
                format!(
                    "{} names share one name hash ({:#010x}): {}; their directory item is {limit}; \
                     the kernel refuses such a directory too (EOVERFLOW)",
                    entries.len(),
                    o.key.offset,
                    list(entries.iter().map(|e| e.name).collect())
                ),
            ),
            Body::Xattrs(x) if x.len() == 1 => Error::at(
                &path,
                format!(
                    "extended attribute {} of {} bytes is {limit}",
                    list(vec![x[0].0]),
                    x[0].1.len()
                ),
            ),
            Body::Xattrs(x) => Error::at(
                &path,
                format!(
                    "extended attributes {} share one name hash and together are {limit}",
                    list(x.iter().map(|(n, _)| *n).collect())
                ),
            ),
            Body::InodeExtref(r) => Error::at(
                &path,
                format!(
                    "{} hard-link names share one hash and their item is {limit}; \
                     the kernel refuses more links (EMLINK): {}",
                    r.len(),
                    list(r.iter().map(|(_, _, n)| *n).collect())
                ),
            ),
            Body::InlineBytes(t) => Error::at(
                &path,
                format!(
                    "symlink target of {} bytes is too large for a {nodesize}-byte node (at most {} bytes)",
                    t.len(),
                    o.max - FILE_EXTENT_INLINE_HEADER
                ),
            ),
            Body::InlineFile { len, .. } => Error::msg(format!(
                "max_inline {} is too large for a {nodesize}-byte node ({}: {len} bytes inline are {limit})",
                self.policy.max_inline,
                crate::error::shown_path(&path)
            )),
            _ => Error::at(&path, format!("an item of this entry is {limit}")),
        }
    }
}

/// (fs tree, inode number) of each data extent, over all trees.
struct FsOwners {
    part: Arc<Partition>,
    extents: Arc<Vec<DataExtent>>,
    /// Source node -> the (tree, inode) of every inode sharing its extents.
    sharers: BTreeMap<u32, Vec<(u64, u64)>>,
}

/// Which inodes of which fs trees refer to each data extent (for the extent
/// tree), once every tree has its extents.
pub fn owners(trees: &[FsItems]) -> Arc<dyn ExtentOwners> {
    let first = trees.first().expect("there is a top-level tree");
    let mut sharers: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for t in trees {
        for (&idx, &src) in &t.shared {
            sharers
                .entry(src)
                .or_default()
                .push((t.objectid, t.ino(idx)));
        }
    }
    Arc::new(FsOwners {
        part: first.part.clone(),
        extents: first.extents.clone(),
        sharers,
    })
}

impl ExtentOwners for FsOwners {
    fn owners(&self, extent: u32) -> Vec<DataRef> {
        let e = &self.extents[extent as usize];
        let own = (self.part.id_of(e.node), self.part.ino_of(e.node));
        std::iter::once(own)
            .chain(self.sharers.get(&e.node).into_iter().flatten().copied())
            .map(|(root, ino)| DataRef {
                root,
                ino,
                offset: e.file_offset,
                count: 1,
            })
            .collect()
    }
}

struct FsIter<'a> {
    fs: &'a FsItems,
    inode: usize,
    section: u8,
    k: u32,
    /// XATTR_ITEMs of the current inode, once its xattr section is reached.
    xattrs: Option<std::vec::IntoIter<(u64, XattrGroup<'a>)>>,
}

impl<'a> Iterator for FsIter<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        loop {
            self.fs.inodes.get(self.inode)?;
            if self.section > 5 {
                self.inode += 1;
                self.section = 0;
                self.k = 0;
                self.xattrs = None;
                continue;
            }
            if self.k >= self.fs.section_len(self.inode, self.section) {
                self.section += 1;
                self.k = 0;
                continue;
            }
            let (idx, k) = (self.inode, self.k);
            self.k += 1;
            return Some(match self.section {
                0 => Item {
                    key: Key::new(self.fs.ino(idx as u32), INODE_ITEM_KEY, 0),
                    body: Body::Inode(self.fs.inode_item(idx)),
                },
                1 => self.fs.ref_item(idx, k),
                2 => {
                    let fs = self.fs;
                    let groups = self.xattrs.get_or_insert_with(|| {
                        let mut g = fs.xattr_groups(fs.attr(idx)).into_iter();
                        if k > 0 {
                            g.nth(k as usize - 1);
                        }
                        g
                    });
                    let (h, g) = groups
                        .next()
                        .expect("xattr section length matches its groups");
                    Item {
                        key: Key::new(self.fs.ino(idx as u32), XATTR_ITEM_KEY, h),
                        body: Body::Xattrs(g),
                    }
                }
                3 => self.fs.dir_item(idx, k),
                4 => {
                    let first = self.fs.tree.node(self.fs.inodes[idx].node).first_child();
                    let c = self.fs.part.numbering.index_child(first, k);
                    Item {
                        key: Key::new(
                            self.fs.ino(idx as u32),
                            DIR_INDEX_KEY,
                            self.fs.index_in_parent(c),
                        ),
                        body: Body::Dir(vec![self.fs.dir_entry(c)]),
                    }
                }
                _ => self.fs.extent_item(idx, k),
            });
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
            .partition_point(|i| i.first_item() <= start)
            .saturating_sub(1);
        let mut it = FsIter {
            fs: self,
            inode: idx,
            section: 0,
            k: 0,
            xattrs: None,
        };
        if let Some(inode) = self.inodes.get(idx) {
            let mut local = start - inode.first_item();
            while it.section <= 5 {
                let n = self.section_len(idx, it.section) as u64;
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

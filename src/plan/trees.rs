//! Items of the trees that describe the filesystem itself: chunk, dev, root,
//! uuid, data-reloc, extent and free-space trees. All are derived from the chunk
//! layout and the block addresses; none depends on file contents.

use super::data::DataExtent;
use super::items::{Body, Item, ItemSource, VecItems};
use super::space::Chunk;
use super::tree_id::TreeId;
use crate::format::hash::{extent_data_ref_hash, name_hash};
use crate::format::items::{ChunkItem, DevExtent, DevItem, InodeItem, RootItem, Stripe};
use crate::format::*;
use std::sync::Arc;

/// One tree block as the extent and free-space trees see it.
#[derive(Clone, Copy, Debug)]
pub struct BlockInfo {
    pub logical: u64,
    pub level: u8,
    /// Index of the block's tree in the plan's tree table.
    pub owner: u16,
}

pub fn chunk_item(c: &Chunk, dev_uuid: [u8; 16]) -> ChunkItem {
    ChunkItem {
        length: c.length,
        ty: c.ty,
        sector_size: SECTOR_SIZE as u32,
        stripes: c
            .stripes
            .iter()
            .map(|&offset| Stripe {
                devid: 1,
                offset,
                dev_uuid,
            })
            .collect(),
    }
}

pub fn chunk_tree(dev: DevItem, chunks: &[Chunk]) -> VecItems {
    let mut v = vec![Item {
        key: Key::new(DEV_ITEMS_OBJECTID, DEV_ITEM_KEY, 1),
        body: Body::Dev(dev),
    }];
    let mut sorted: Vec<&Chunk> = chunks.iter().collect();
    sorted.sort_by_key(|c| c.logical);
    for c in sorted {
        v.push(Item {
            key: Key::new(FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM_KEY, c.logical),
            body: Body::Chunk(chunk_item(c, dev.uuid)),
        });
    }
    VecItems(v)
}

pub fn dev_tree(chunks: &[Chunk], chunk_tree_uuid: [u8; 16]) -> VecItems {
    let mut ext: Vec<(u64, DevExtent)> = chunks
        .iter()
        .flat_map(|c| {
            c.stripes.iter().map(move |&p| {
                (
                    p,
                    DevExtent {
                        chunk_offset: c.logical,
                        length: c.length,
                        chunk_tree_uuid,
                    },
                )
            })
        })
        .collect();
    ext.sort_by_key(|e| e.0);
    let mut v = vec![Item {
        key: Key::new(DEV_STATS_OBJECTID, PERSISTENT_ITEM_KEY, 1),
        body: Body::DevStats,
    }];
    v.extend(ext.into_iter().map(|(p, d)| Item {
        key: Key::new(1, DEV_EXTENT_KEY, p),
        body: Body::DevExtent(d),
    }));
    VecItems(v)
}

/// The UUID tree: each fs tree's (uuid, id), keyed by the uuid's halves.
pub fn uuid_tree(trees: &[([u8; 16], u64)]) -> VecItems {
    let half = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let mut v: Vec<Item<'static>> = trees
        .iter()
        .map(|(u, id)| Item {
            key: Key::new(half(&u[0..8]), UUID_KEY_SUBVOL, half(&u[8..16])),
            body: Body::Uuid(*id),
        })
        .collect();
    v.sort_by_key(|i| i.key);
    VecItems(v)
}

fn empty_dir_inode(generation: u64, time: Timespec) -> InodeItem {
    InodeItem {
        generation,
        transid: generation,
        nlink: 1,
        mode: 0o40755,
        atime: time,
        ctime: time,
        mtime: time,
        otime: time,
        ..Default::default()
    }
}

pub fn reloc_tree(generation: u64, time: Timespec) -> VecItems {
    VecItems(vec![
        Item {
            key: Key::new(FIRST_FREE_OBJECTID, INODE_ITEM_KEY, 0),
            body: Body::Inode(empty_dir_inode(generation, time)),
        },
        Item {
            key: Key::new(FIRST_FREE_OBJECTID, INODE_REF_KEY, FIRST_FREE_OBJECTID),
            body: Body::InodeRef(vec![(0, b"..")]),
        },
    ])
}

/// Where a tree's root block is, for its ROOT_ITEM.
#[derive(Clone, Copy, Debug, Default)]
pub struct RootInfo {
    pub bytenr: u64,
    pub level: u8,
    pub blocks: u64,
}

/// A subvolume, for its ROOT_ITEM, ROOT_REF and ROOT_BACKREF.
#[derive(Clone, Debug)]
pub struct SubvolRoot {
    pub id: u64,
    /// The tree holding its directory entry.
    pub parent: u64,
    /// That directory's inode number there, and the entry's DIR_INDEX.
    pub dirid: u64,
    pub sequence: u64,
    pub name: Box<[u8]>,
    pub uuid: [u8; 16],
    pub readonly: bool,
}

pub struct RootTreeInput<'a> {
    pub generation: u64,
    pub nodesize: u32,
    pub time: Timespec,
    /// Every tree that has a ROOT_ITEM, with where its root block is.
    pub roots: &'a [(TreeId, RootInfo)],
    /// UUID of the top-level fs tree.
    pub fs_uuid: [u8; 16],
    pub subvols: &'a [SubvolRoot],
    /// The subvolume mounted by default, if not the top level.
    pub default_subvol: Option<u64>,
}

pub fn root_tree(r: &RootTreeInput) -> VecItems {
    let g = r.generation;
    // The embedded inode mkfs and the kernel write for tree roots.
    let embedded = InodeItem {
        generation: 1,
        size: 3,
        nlink: 1,
        nbytes: r.nodesize as u64,
        mode: 0o40755,
        ..Default::default()
    };
    let mut v: Vec<Item<'static>> = Vec::new();
    for &(id, info) in r.roots {
        let mut ri = RootItem {
            inode: embedded,
            generation: g,
            root_dirid: 0,
            bytenr: info.bytenr,
            bytes_used: info.blocks * r.nodesize as u64,
            refs: 1,
            level: info.level,
            ..Default::default()
        };
        match id {
            TreeId::Fs(fs) => {
                let sv = r.subvols.iter().find(|s| s.id == fs);
                ri.root_dirid = FIRST_FREE_OBJECTID;
                ri.inode.flags = INODE_FLAG_ROOT_ITEM_INIT;
                ri.uuid = sv.map_or(r.fs_uuid, |s| s.uuid);
                if sv.is_some_and(|s| s.readonly) {
                    ri.flags = ROOT_SUBVOL_RDONLY;
                }
                ri.ctransid = g;
                ri.otransid = g;
                ri.ctime = r.time;
                ri.otime = r.time;
            }
            TreeId::DataReloc => ri.root_dirid = FIRST_FREE_OBJECTID,
            _ => {}
        }
        v.push(Item {
            key: Key::new(id.objectid(), ROOT_ITEM_KEY, 0),
            body: Body::Root(ri),
        });
    }
    // The root tree's directory (6) holding "default", the top-level fs tree,
    // as mkfs writes it.
    v.extend([
        Item {
            key: Key::new(FS_TREE, INODE_REF_KEY, ROOT_TREE_DIR),
            body: Body::InodeRef(vec![(0, b"default")]),
        },
        Item {
            key: Key::new(ROOT_TREE_DIR, INODE_ITEM_KEY, 0),
            body: Body::Inode(empty_dir_inode(g, r.time)),
        },
        Item {
            key: Key::new(ROOT_TREE_DIR, INODE_REF_KEY, ROOT_TREE_DIR),
            body: Body::InodeRef(vec![(0, b"..")]),
        },
        Item {
            key: Key::new(ROOT_TREE_DIR, DIR_ITEM_KEY, name_hash(b"default")),
            body: Body::Dir(vec![super::items::DirEntry {
                // `btrfs subvolume set-default` points it at the subvolume's
                // ROOT_ITEM (offset 0); mkfs writes the top level's as -1.
                location: match r.default_subvol {
                    Some(id) => Key::new(id, ROOT_ITEM_KEY, 0),
                    None => Key::new(FS_TREE, ROOT_ITEM_KEY, u64::MAX),
                },
                ftype: FT_DIR,
                name: b"default",
            }]),
        },
    ]);
    for sv in r.subvols {
        let body = Body::RootRef {
            dirid: sv.dirid,
            sequence: sv.sequence,
            name: sv.name.clone(),
        };
        v.push(Item {
            key: Key::new(sv.parent, ROOT_REF_KEY, sv.id),
            body: body.clone(),
        });
        v.push(Item {
            key: Key::new(sv.id, ROOT_BACKREF_KEY, sv.parent),
            body,
        });
    }
    v.sort_by_key(|i| i.key);
    VecItems(v)
}

/// Checksum items, computed rather than stored: maximal runs of adjacent data
/// extents within one chunk, each cut into items on an absolute grid of the
/// kernel's per-item count (a cell is that many sectors from logical 0): an
/// item's bounds depend only on the data in its own cell, so an update that
/// adds data in one place leaves every other item, and the leaves holding
/// them, as they were. Memory is one entry per run, whatever the amount of
/// data.
pub struct CsumItems {
    /// (logical start, length, index of the run's first item).
    runs: Vec<(u64, u64, u64)>,
    per_item: u64,
    items: u64,
    csum: CsumType,
}

/// Builds the csum items of `extents` (sorted by address) in `chunks`: as
/// many checksums per item as the kernel puts there for this node size and
/// checksum size. The extents of files `nodatasum` names (NODATASUM) have
/// none.
pub fn csum_tree<'a>(
    extents: impl Iterator<Item = &'a DataExtent>,
    chunks: &[Chunk],
    nodesize: u32,
    csum: CsumType,
    nodatasum: &dyn Fn(u32) -> bool,
) -> CsumItems {
    let per_item = max_csums_per_item(nodesize, csum) as u64 * SECTOR_SIZE;
    let mut sorted: Vec<&Chunk> = chunks.iter().collect();
    sorted.sort_by_key(|c| c.logical);
    let mut c = 0;
    let mut chunk_of = |l: u64| {
        while c + 1 < sorted.len() && sorted[c].end() <= l {
            c += 1;
        }
        c
    };
    let mut runs: Vec<(u64, u64, usize)> = Vec::new();
    for e in extents.filter(|e| !nodatasum(e.node)) {
        let chunk = chunk_of(e.logical);
        match runs.last_mut() {
            Some((s, len, ch)) if *s + *len == e.logical && *ch == chunk => *len += e.size(),
            _ => runs.push((e.logical, e.size(), chunk)),
        }
    }
    let mut items = 0;
    let runs = runs
        .into_iter()
        .map(|(s, len, _)| {
            let first = items;
            items += cells(s, len, per_item);
            (s, len, first)
        })
        .collect();
    CsumItems {
        runs,
        per_item,
        items,
        csum,
    }
}

/// Grid cells of `cell` bytes that `[s, s + len)` touches.
fn cells(s: u64, len: u64, cell: u64) -> u64 {
    (s + len).div_ceil(cell) - s / cell
}

impl CsumItems {
    fn item(&self, run: usize, k: u64) -> Item<'static> {
        let (s, len, _) = self.runs[run];
        let cell = s / self.per_item + k;
        let start = s.max(cell * self.per_item);
        let n = (s + len).min((cell + 1) * self.per_item) - start;
        Item {
            key: Key::new(EXTENT_CSUM_OBJECTID, EXTENT_CSUM_KEY, start),
            body: Body::Csum {
                start,
                count: (n / SECTOR_SIZE) as u32,
                csum: self.csum,
            },
        }
    }
}

impl ItemSource for CsumItems {
    fn count(&self) -> u64 {
        self.items
    }

    fn iter_from(&self, start: u64) -> Box<dyn Iterator<Item = Item<'_>> + '_> {
        let mut run = self
            .runs
            .partition_point(|r| r.2 <= start)
            .saturating_sub(1);
        let mut k = start - self.runs.get(run).map_or(0, |r| r.2);
        Box::new(std::iter::from_fn(move || {
            let &(s, len, _) = self.runs.get(run)?;
            if k >= cells(s, len, self.per_item) {
                run += 1;
                k = 0;
                self.runs.get(run)?;
            }
            let item = self.item(run, k);
            k += 1;
            Some(item)
        }))
    }
}

/// An extent-tree record, kept small (16 bytes) because there is one per tree
/// block and per data extent: data extents and block groups are referenced by
/// index rather than copied.
#[derive(Clone, Copy, Debug)]
pub enum ExtentRec {
    Block {
        logical: u64,
        level: u8,
        owner: u16,
    },
    Data(u32),
    /// Keyed data ref group `k` of data extent `e`.
    DataRef {
        e: u32,
        k: u32,
    },
    Group(u32),
}

/// One file's reference to a data extent (EXTENT_DATA_REF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRef {
    pub root: u64,
    pub ino: u64,
    /// File offset minus the EXTENT_DATA's offset into the extent.
    pub offset: u64,
    /// That inode's EXTENT_DATA items with this offset pointing here.
    pub count: u32,
}

impl DataRef {
    pub fn hash(&self) -> u64 {
        extent_data_ref_hash(self.root, self.ino, self.offset)
    }
}

/// Which files a data extent belongs to (more than one: dedupe).
pub trait ExtentOwners: Send + Sync {
    fn owners(&self, extent: u32) -> Vec<DataRef>;
}

/// Inline data refs an EXTENT_ITEM takes before the rest become keyed
/// items: the kernel adds one while the item stays under a sixteenth of a
/// leaf (33 at 16 KiB nodes, 6 at 4 KiB, 139 at 64 KiB).
pub fn max_inline_refs(nodesize: u32) -> usize {
    let limit = (leaf_data_size(nodesize) >> 4) - ITEM_HEADER_SIZE;
    (limit - 24 - 1) / 29
}

/// A data extent's refs split as the extent tree holds them: inline ones
/// (hash descending, the order the tree-checker demands) and keyed groups
/// (one item per distinct hash, ascending), and the total count.
fn split_refs(mut refs: Vec<DataRef>, nodesize: u32) -> (u64, Vec<DataRef>, Vec<Vec<DataRef>>) {
    let total = refs.iter().map(|r| r.count as u64).sum();
    refs.sort_by_key(|r| (std::cmp::Reverse(r.hash()), r.ino, r.offset));
    let keyed_part = refs.split_off(refs.len().min(max_inline_refs(nodesize)));
    let mut keyed: Vec<Vec<DataRef>> = Vec::new();
    let mut by_hash = keyed_part;
    by_hash.sort_by_key(|r| (r.hash(), r.ino, r.offset));
    for r in by_hash {
        match keyed.last_mut() {
            Some(g) if g[0].hash() == r.hash() => g.push(r),
            _ => keyed.push(vec![r]),
        }
    }
    (total, refs, keyed)
}

pub struct ExtentItems {
    recs: Vec<ExtentRec>,
    extents: Arc<Vec<DataExtent>>,
    owners: Arc<dyn ExtentOwners>,
    groups: Vec<Chunk>,
    /// Tree object ids, indexed by `ExtentRec::Block::owner`.
    trees: Arc<[u64]>,
    nodesize: u32,
}

impl ExtentItems {
    fn key(&self, r: &ExtentRec) -> Key {
        match *r {
            ExtentRec::Block { logical, level, .. } => {
                Key::new(logical, METADATA_ITEM_KEY, level as u64)
            }
            ExtentRec::Data(i) => {
                let e = &self.extents[i as usize];
                Key::new(e.logical, EXTENT_ITEM_KEY, e.size())
            }
            ExtentRec::DataRef { e, k } => {
                let (_, _, keyed) = split_refs(self.owners.owners(e), self.nodesize);
                Key::new(
                    self.extents[e as usize].logical,
                    EXTENT_DATA_REF_KEY,
                    keyed[k as usize][0].hash(),
                )
            }
            ExtentRec::Group(i) => {
                let c = &self.groups[i as usize];
                Key::new(c.logical, BLOCK_GROUP_ITEM_KEY, c.length)
            }
        }
    }

    fn item(&self, r: &ExtentRec) -> Item<'static> {
        let body = match *r {
            ExtentRec::Block { owner, .. } => Body::MetadataExtent {
                owner: self.trees[owner as usize],
            },
            ExtentRec::Data(i) => {
                let (refs, inline, _) = split_refs(self.owners.owners(i), self.nodesize);
                Body::DataExtent { refs, inline }
            }
            ExtentRec::DataRef { e, k } => {
                let (_, _, mut keyed) = split_refs(self.owners.owners(e), self.nodesize);
                Body::DataRefs(keyed.swap_remove(k as usize))
            }
            ExtentRec::Group(i) => {
                let c = &self.groups[i as usize];
                Body::BlockGroup {
                    used: c.used,
                    flags: c.ty,
                }
            }
        };
        Item {
            key: self.key(r),
            body,
        }
    }
}

impl ItemSource for ExtentItems {
    fn count(&self) -> u64 {
        self.recs.len() as u64
    }
    fn iter_from(&self, start: u64) -> Box<dyn Iterator<Item = Item<'_>> + '_> {
        Box::new(self.recs[start as usize..].iter().map(|r| self.item(r)))
    }
}

/// The extent tree: every tree block, data extent and (without a
/// block-group tree, `groups`) block group. `trees[b.owner]` is the object
/// id of block `b`'s tree.
pub fn extent_tree(
    blocks: &[BlockInfo],
    extents: &Arc<Vec<DataExtent>>,
    owners: &Arc<dyn ExtentOwners>,
    chunks: &[Chunk],
    groups: bool,
    trees: &Arc<[u64]>,
    nodesize: u32,
) -> ExtentItems {
    let mut recs: Vec<ExtentRec> = Vec::with_capacity(blocks.len() + extents.len() + chunks.len());
    recs.extend(blocks.iter().map(|b| ExtentRec::Block {
        logical: b.logical,
        level: b.level,
        owner: b.owner,
    }));
    for i in 0..extents.len() as u32 {
        recs.push(ExtentRec::Data(i));
        let refs = owners.owners(i);
        if refs.len() > max_inline_refs(nodesize) {
            let (_, _, keyed) = split_refs(refs, nodesize);
            recs.extend((0..keyed.len() as u32).map(|k| ExtentRec::DataRef { e: i, k }));
        }
    }
    if groups {
        recs.extend((0..chunks.len() as u32).map(ExtentRec::Group));
    }
    let mut items = ExtentItems {
        recs: Vec::new(),
        extents: extents.clone(),
        owners: owners.clone(),
        groups: chunks.to_vec(),
        trees: trees.clone(),
        nodesize,
    };
    recs.sort_unstable_by_key(|r| items.key(r));
    items.recs = recs;
    items
}

/// The block-group tree (`-O block-group-tree`): every BLOCK_GROUP_ITEM,
/// the same bodies the extent tree holds without it, in key order.
pub fn block_group_tree(chunks: &[Chunk]) -> VecItems {
    let mut sorted: Vec<&Chunk> = chunks.iter().collect();
    sorted.sort_by_key(|c| c.logical);
    VecItems(
        sorted
            .into_iter()
            .map(|c| Item {
                key: Key::new(c.logical, BLOCK_GROUP_ITEM_KEY, c.length),
                body: Body::BlockGroup {
                    used: c.used,
                    flags: c.ty,
                },
            })
            .collect(),
    )
}

/// Free-space tree: for every block group, the maximal ranges not covered by a
/// tree block or data extent. Mirror-excluded ranges are listed as free, as the
/// kernel does.
pub fn free_space_tree(
    blocks: &[BlockInfo],
    extents: &[DataExtent],
    chunks: &[Chunk],
    nodesize: u32,
) -> VecItems {
    let mut used: Vec<(u64, u64)> = blocks
        .iter()
        .map(|b| (b.logical, nodesize as u64))
        .chain(extents.iter().map(|e| (e.logical, e.size())))
        .collect();
    used.sort_unstable();
    let mut sorted: Vec<&Chunk> = chunks.iter().collect();
    sorted.sort_by_key(|c| c.logical);
    let mut v = Vec::new();
    let mut u = 0;
    for c in sorted {
        let mut free = Vec::new();
        let mut pos = c.logical;
        while u < used.len() && used[u].0 < c.end() {
            let (s, l) = used[u];
            if s > pos {
                free.push((pos, s - pos));
            }
            pos = pos.max(s + l);
            u += 1;
        }
        if pos < c.end() {
            free.push((pos, c.end() - pos));
        }
        v.push(Item {
            key: Key::new(c.logical, FREE_SPACE_INFO_KEY, c.length),
            body: Body::FreeSpaceInfo {
                extent_count: free.len() as u32,
            },
        });
        v.extend(free.into_iter().map(|(s, l)| Item {
            key: Key::new(s, FREE_SPACE_EXTENT_KEY, l),
            body: Body::Empty,
        }));
    }
    VecItems(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csum_items_hold_as_many_checksums_as_the_kernel_puts_in_one() {
        assert_eq!(
            CsumType::ALL.map(|c| max_csums_per_item(16384, c)),
            [4057, 2028, 506, 506]
        );
        assert_eq!(
            CsumType::ALL.map(|c| max_csums_per_item(4096, c)),
            [985, 492, 122, 122]
        );
        let chunk = Chunk {
            logical: 1 << 20,
            length: 1 << 30,
            ty: BLOCK_GROUP_DATA,
            stripes: vec![1 << 20],
            used: 0,
        };
        // One run of 10,000 sectors in two adjacent extents.
        let s = SECTOR_SIZE;
        let extents = [
            DataExtent::new(1 << 20, 6000 * s, 1, 0),
            DataExtent::new((1 << 20) + 6000 * s, 4000 * s, 2, 0),
        ];
        for csum in CsumType::ALL {
            let per = max_csums_per_item(16384, csum) as u64;
            let items = csum_tree(
                extents.iter(),
                std::slice::from_ref(&chunk),
                16384,
                csum,
                &|_| false,
            );
            // Cut on the grid of `per` sectors from logical 0.
            let first_cell = 256 / per;
            let last_cell = (256 + 10_000 - 1) / per;
            assert_eq!(items.count(), last_cell - first_cell + 1, "{csum:?}");
            let mut next = 1u64 << 20;
            let mut total = 0;
            for item in items.iter_from(0) {
                let Body::Csum { start, count, .. } = item.body else {
                    panic!("{csum:?}: not a csum item")
                };
                assert_eq!((item.key.offset, start), (next, next), "{csum:?}");
                assert!(count as u64 <= per, "{csum:?}");
                let sector = start / s;
                assert_eq!(sector / per, (sector + count as u64 - 1) / per, "one cell");
                assert_eq!(item.body.size(), count as usize * csum.size());
                assert!(item.body.size() <= max_item_size(16384));
                next += count as u64 * s;
                total += count as u64;
            }
            assert_eq!(total, 10_000, "{csum:?}");
        }
    }
}

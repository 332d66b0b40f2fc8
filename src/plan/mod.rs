//! Layout policy: from a source tree to a complete, immutable description of the
//! image (every tree's items and block addresses, chunks, the region table and
//! the superblock). Planning never opens a file; the image layer does all I/O.
//!
//! `build` runs named phases, each a function of the previous ones' results:
//! checks, identities, inode numbering, data placement, the trees whose shape
//! is known before any address, the metadata layout (a fixed point), and the
//! final assembly of the trees that point at addresses.

pub mod base;
pub mod data;
pub mod fs;
pub mod gaps;
pub mod inode_flags;
pub mod items;
pub mod layout;
pub mod limits;
pub mod numbering;
pub mod pack;
pub mod record;
pub mod space;
pub mod subvol;
pub mod tree_id;
pub mod trees;
pub mod uuid;

use crate::compress::Algorithm;
use crate::content::{ContentIndex, Stored};
use crate::error::{Error, Result};
use crate::format::items::DevItem;
use crate::format::superblock::{RootPtr, Superblock};
use crate::format::*;
use crate::source::SourceTree;
use data::{DataAllocator, DataExtent};
use fs::{FsItems, InodePolicy};
use items::ItemSource;
use pack::Shape;
use space::{Chunk, Region};
use std::sync::Arc;
pub use tree_id::TreeId;

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
    /// Store file data compressed (needs the content pass's result).
    pub compression: Option<crate::compress::Compression>,
    /// Files with equal content share one set of extents (needs the content
    /// pass's result).
    pub dedupe: bool,
    /// Directories of the top-level view that become subvolumes (the
    /// mount-view form is applied to the sources before planning).
    pub subvolumes: Vec<subvol::SubvolSpec>,
    /// The checksum algorithm of the superblock, tree blocks and data.
    pub csum: CsumType,
    /// Block groups in a tree of their own (`-O block-group-tree`, compat_ro
    /// BLOCK_GROUP_TREE) rather than in the extent tree; Linux 6.1 and later.
    pub block_group_tree: bool,
    /// `--inode-flags`: inodes without data copy-on-write or checksums.
    pub inode_flags: Vec<inode_flags::InodeFlagsSpec>,
    /// `--base-layout`: the image this one updates; unchanged files keep
    /// their data where it was, its chunks stay in place.
    pub base: Option<Arc<base::Base>>,
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
            compression: None,
            dedupe: false,
            subvolumes: Vec::new(),
            csum: CsumType::Crc32c,
            block_group_tree: false,
            inode_flags: Vec::new(),
            base: None,
        }
    }
}

pub struct TreePlan {
    pub id: TreeId,
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
                .expect("every tree has a root block"),
            level: self.shape.root_level(),
        }
    }
}

/// Which tree block lives at a logical address.
#[derive(Clone, Copy, Debug)]
pub struct BlockRef {
    pub logical: u64,
    /// Index into `Plan::trees`.
    pub tree: u16,
    pub level: u8,
    pub idx: u32,
}

pub struct Plan {
    pub nodesize: u32,
    /// How the superblock, tree blocks and data sectors are checksummed.
    pub csum_type: CsumType,
    pub generation: u64,
    pub fsid: [u8; 16],
    pub chunk_tree_uuid: [u8; 16],
    pub source: Arc<SourceTree>,
    /// The content pass's result (compressed sizes, kept payloads), if any.
    pub content: Option<Arc<ContentIndex>>,
    /// Every data extent, in placement order (tree by tree, file by file in tree order).
    pub extents: Arc<Vec<DataExtent>>,
    /// Indexes of `extents` by logical address.
    pub by_logical: Arc<Vec<u32>>,
    /// With a base layout: where the data went.
    pub update: Option<data::UpdateStats>,
    /// With a base layout: tree blocks at their base blocks' addresses.
    pub kept_tree_blocks: usize,
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
    /// `--inode-flags`, resolved: which inodes are NODATACOW or NODATASUM.
    pub inode_flags: Arc<inode_flags::InodeFlags>,
    /// The subvolumes, and every entry's inode number and directory index.
    pub partition: Arc<subvol::Partition>,
}

impl Plan {
    pub fn tree(&self, id: TreeId) -> &TreePlan {
        self.trees
            .iter()
            .find(|t| t.id == id)
            .expect("every image has this tree")
    }

    /// A human-readable description of the layout.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mib = |b: u64| b as f64 / 1048576.0;
        let mut s = String::new();
        let _ = writeln!(s, "uuid: {}", format_uuid(&self.fsid));
        let _ = writeln!(
            s,
            "image size: {} bytes ({:.2} MiB)",
            self.total_bytes,
            mib(self.total_bytes)
        );
        let _ = writeln!(
            s,
            "checksum: {} ({} bytes per data sector)",
            self.csum_type.name(),
            self.csum_type.size()
        );
        let _ = writeln!(s, "entries: {}", self.source.len());
        let data: u64 = self.extents.iter().map(|e| e.size()).sum();
        let _ = writeln!(
            s,
            "file data: {} bytes in {} extents",
            data,
            self.extents.len()
        );
        if let Some(u) = &self.update {
            let _ = writeln!(
                s,
                "update: {} unchanged files keep {} bytes in place; {} new bytes in freed space, {} after the base; {} bytes free in the base's data chunks",
                u.files_unchanged, u.kept, u.in_gaps, u.appended, u.free_left
            );
        }
        let total_blocks: usize = self.trees.iter().map(|t| t.shape.blocks()).sum();
        if self.update.is_some() {
            let _ = writeln!(
                s,
                "update: {} of {} tree blocks at their base blocks' addresses",
                self.kept_tree_blocks, total_blocks
            );
        }
        let _ = writeln!(
            s,
            "tree blocks: {} ({:.2} MiB): {}",
            total_blocks,
            mib(total_blocks as u64 * self.nodesize as u64),
            self.trees
                .iter()
                .map(|t| format!("{} {}", t.id.name(), t.shape.blocks()))
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

pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The UUIDs of one image.
struct Ids {
    fsid: [u8; 16],
    chunk_tree: [u8; 16],
    device: [u8; 16],
    fs_tree: [u8; 16],
}

impl Ids {
    /// The UUID of fs tree `id` (5 or a subvolume).
    fn tree_uuid(&self, id: u64) -> [u8; 16] {
        match id {
            FS_TREE => self.fs_tree,
            _ => uuid::derive_uuid(&[&self.fsid, b"subvolume", &id.to_le_bytes()]),
        }
    }
}

impl Ids {
    fn derive(tree: &SourceTree, content: Option<&ContentIndex>, opts: &Options) -> Ids {
        // An update keeps its base's UUID unless told otherwise.
        let base = opts.base.as_deref().map(|b| b.fsid);
        let fsid = opts.fsid.or(base).unwrap_or_else(|| {
            let u = uuid::content_uuid(tree, opts);
            match content {
                // File bytes were read: the UUID covers them too.
                Some(c) => uuid::derive_uuid(&[&u, &c.digest]),
                None => u,
            }
        });
        Ids {
            fsid,
            chunk_tree: uuid::derive_uuid(&[&fsid, b"chunk tree"]),
            device: uuid::derive_uuid(&[&fsid, b"device"]),
            fs_tree: uuid::derive_uuid(&[&fsid, b"fs tree"]),
        }
    }
}

/// File data placed in DATA chunks.
struct Placement {
    /// In placement order: tree by tree, file by file in tree order.
    extents: Arc<Vec<DataExtent>>,
    /// Indexes of `extents` by logical address.
    by_logical: Arc<Vec<u32>>,
    chunks: Vec<Chunk>,
    /// Past the last data extent.
    end: u64,
    /// Where metadata chunks new to this image may start.
    meta_start: u64,
    update: Option<data::UpdateStats>,
}

/// Packs every regular file's data, tree by tree in tree order: as the
/// content pass cut it, or (without one) as its data segments; from
/// `space::DATA_START`, or into a base layout's free space and then after
/// it.
fn place_data(
    tree: &SourceTree,
    tree_of: &[u16],
    fs_trees: &[FsItems],
    content: Option<&ContentIndex>,
    opts: &Options,
) -> Result<Placement> {
    let mut alloc = DataAllocator::for_tree(tree, opts.base.as_deref(), tree_of);
    for fs in fs_trees {
        for node in fs.extent_files() {
            match content.and_then(|c| c.stored(node)) {
                Some(Stored::Pieces { first, count }) => {
                    let c = content.expect("a stored file has a content index");
                    alloc.place_pieces(node, c.pieces(first, count));
                }
                _ => alloc.place(node, tree.segments(node)),
            }
        }
    }
    if alloc.extents.len() >= u32::MAX as usize {
        return Err(Error::msg(format!(
            "the files need {} data extents; at most {} are supported",
            alloc.extents.len(),
            u32::MAX - 1
        )));
    }
    alloc.finish();
    let appended = alloc.pos;
    let free_in_base = alloc.free_in_base();
    let update = opts.base.is_some().then(|| alloc.update_stats());
    let extents = std::mem::take(&mut alloc.extents);
    let mut by_logical: Vec<u32> = (0..extents.len() as u32).collect();
    if !extents.windows(2).all(|w| w[0].logical < w[1].logical) {
        by_logical.sort_unstable_by_key(|&i| extents[i as usize].logical);
    }
    let sorted = || by_logical.iter().map(|&i| &extents[i as usize]);
    let end = sorted()
        .next_back()
        .map_or(space::DATA_START, DataExtent::end);
    // The kernel reserves data space for every buffered write: a first
    // read-write mount needs some free data space somewhere.
    let slack = match opts.rw_slack && free_in_base < space::DATA_SLACK {
        true => space::DATA_SLACK,
        false => 0,
    };
    let (chunks, meta_start) = match opts.base.as_deref() {
        None => {
            let chunks = space::data_chunks(alloc.start, appended, slack, sorted());
            let meta_start = chunks.last().map_or(space::DATA_START, Chunk::end);
            (chunks, meta_start)
        }
        Some(b) => {
            let mut chunks = b.data_chunks.clone();
            if appended > alloc.start || slack > 0 {
                chunks.extend(space::data_chunks(
                    alloc.start,
                    appended,
                    slack,
                    sorted().filter(|e| e.logical >= alloc.start),
                ));
            }
            space::count_used(&mut chunks, sorted());
            let meta_start = chunks.last().map_or(b.end, Chunk::end).max(b.end);
            (chunks, meta_start)
        }
    };
    Ok(Placement {
        update,
        extents: Arc::new(extents),
        by_logical: Arc::new(by_logical),
        chunks,
        end,
        meta_start,
    })
}

/// The extent range of every file with extents (a file's extents are
/// contiguous).
fn file_ranges(extents: &[DataExtent]) -> std::collections::BTreeMap<u32, (u32, u32)> {
    let mut ranges = std::collections::BTreeMap::new();
    let mut i = 0;
    while i < extents.len() {
        let (node, first) = (extents[i].node, i);
        while i < extents.len() && extents[i].node == node {
            i += 1;
        }
        ranges.insert(node, (first as u32, i as u32));
    }
    ranges
}

/// Where each subvolume's entry is, for the root tree.
fn subvol_roots(tree: &SourceTree, part: &subvol::Partition, ids: &Ids) -> Vec<trees::SubvolRoot> {
    part.subvols[1..]
        .iter()
        .map(|sv| {
            let dir = tree.node(sv.root).parent;
            trees::SubvolRoot {
                id: sv.id,
                parent: part.subvols[sv.parent].id,
                dirid: part.ino_of(dir),
                sequence: part.dir_index(tree, sv.root),
                name: tree.name(sv.root).into(),
                uuid: ids.tree_uuid(sv.id),
                readonly: sv.readonly,
            }
        })
        .collect()
}

/// Packs a tree whose items came from input: an item that fits no leaf is
/// the input's fault, explained by `explain`.
fn pack_input(
    items: &dyn ItemSource,
    nodesize: u32,
    anchors: &[Vec<Key>],
    explain: impl FnOnce(&pack::Oversized) -> Error,
) -> Result<Shape> {
    pack::pack_anchored(items, nodesize, anchors).map_err(|o| explain(&o))
}

/// Where a base layout's blocks of tree `id` began (none without a base).
fn anchors(base: Option<&base::Base>, id: TreeId) -> Vec<Vec<Key>> {
    base.map_or_else(Vec::new, |b| b.anchors(id.objectid()))
}

fn pack_internal(
    id: TreeId,
    items: &dyn ItemSource,
    nodesize: u32,
    anchors: &[Vec<Key>],
) -> Result<Shape> {
    pack::pack_anchored(items, nodesize, anchors).map_err(|o| {
        Error::msg(format!(
            "internal error: {} tree item {:?} of {} bytes does not fit a node",
            id.name(),
            o.key,
            o.size
        ))
    })
}

/// The largest file stored inline: `max_inline`, but never more than one
/// leaf item holds (the kernel's BTRFS_MAX_INLINE_DATA_SIZE).
pub fn max_inline(opts: &Options) -> u64 {
    opts.max_inline
        .min((max_item_size(opts.nodesize) - FILE_EXTENT_INLINE_HEADER) as u64)
}

/// Plans a tree without reading any file data (no compression).
pub fn build(source: SourceTree, opts: &Options) -> Result<Plan> {
    build_with(source, None, opts)
}

/// Plans a tree with what the content pass learned of its file data
/// (required when `opts.compression` is set).
pub fn build_with(
    source: SourceTree,
    content: Option<ContentIndex>,
    opts: &Options,
) -> Result<Plan> {
    // Checks and identities.
    limits::validate_options(opts)?;
    limits::validate_tree(&source)?;
    let expected =
        (opts.compression.is_some() || opts.dedupe).then_some((opts.compression, opts.dedupe));
    if content.as_ref().map(|c| (c.compression, c.dedupe)) != expected {
        return Err(Error::msg(
            "internal error: the content pass used other compression options",
        ));
    }
    let nodesize = opts.nodesize;
    let g = GENERATION;
    let time = Timespec {
        sec: opts.timestamp,
        nsec: 0,
    };
    let ids = Ids::derive(&source, content.as_ref(), opts);
    let tree = Arc::new(source);
    let content = content.map(Arc::new);

    // Subvolumes, inodes, then data placement tree by tree in tree order.
    let (part, warnings) = subvol::resolve(
        &tree,
        &opts.subvolumes,
        opts.base.as_deref().map(|b| &b.numbers),
    )?;
    for w in &warnings {
        log::warn!("{w}");
    }
    let part = Arc::new(part);
    let flags = Arc::new(inode_flags::InodeFlags::resolve(
        &tree,
        &opts.inode_flags,
        &subvol::roots(&tree, &opts.subvolumes)?,
    )?);
    let hash_order = fs::hash_order(&tree);
    let policy = InodePolicy {
        generation: g,
        owner: opts.owner,
        otime: time,
        max_inline: max_inline(opts),
        flags: flags.clone(),
    };
    let mut fs_trees: Vec<FsItems> = (0..part.subvols.len())
        .map(|s| {
            FsItems::new(
                tree.clone(),
                part.clone(),
                s,
                hash_order.clone(),
                policy.clone(),
                nodesize,
                content.clone(),
            )
        })
        .collect::<Result<_>>()?;
    drop(hash_order);
    let tree_of: &[u16] = match opts.subvolumes.is_empty() {
        true => &[],
        false => part.tree_of(),
    };
    let data = place_data(&tree, tree_of, &fs_trees, content.as_deref(), opts)?;
    if data
        .extents
        .iter()
        .any(|e| e.algorithm.is_some() && flags.nodatasum(&tree, e.node))
    {
        return Err(Error::msg(
            "internal error: the content pass compressed a file without checksums",
        ));
    }
    let ranges = file_ranges(&data.extents);
    for t in fs_trees.iter_mut() {
        t.set_extents(data.extents.clone(), &ranges);
    }
    let owners = fs::owners(&fs_trees);
    let subvols = subvol_roots(&tree, &part, &ids);
    let default_subvol = part.default().map(|s| s.id);

    // Trees whose shape does not depend on addresses. The fs trees are where
    // input meets leaves: their oversized items are the input's errors.
    let mut fs_shapes = Vec::with_capacity(fs_trees.len());
    for t in &fs_trees {
        fs_shapes.push((
            TreeId::Fs(t.objectid()),
            pack_input(
                t,
                nodesize,
                &anchors(opts.base.as_deref(), TreeId::Fs(t.objectid())),
                |o| t.oversized(o, nodesize),
            )?,
        ));
    }
    let csum = trees::csum_tree(
        data.by_logical.iter().map(|&i| &data.extents[i as usize]),
        &data.chunks,
        nodesize,
        opts.csum,
        &|n| flags.nodatasum(&tree, n),
    );
    let csum_shape = pack_internal(
        TreeId::Csum,
        &csum,
        nodesize,
        &anchors(opts.base.as_deref(), TreeId::Csum),
    )?;
    let uuid_items = trees::uuid_tree(
        &part
            .subvols
            .iter()
            .map(|s| (ids.tree_uuid(s.id), s.id))
            .collect::<Vec<_>>(),
    );
    let reloc_items = trees::reloc_tree(g, time);
    let mut rooted: Vec<TreeId> = vec![TreeId::Extent, TreeId::Dev];
    rooted.extend(fs_shapes.iter().map(|(id, _)| *id));
    rooted.extend([
        TreeId::Csum,
        TreeId::Uuid,
        TreeId::FreeSpace,
        TreeId::DataReloc,
    ]);
    if opts.block_group_tree {
        rooted.push(TreeId::BlockGroup);
    }
    let root_items = |infos: &[(TreeId, trees::RootInfo)]| {
        root_tree(opts, ids.fs_tree, infos, &subvols, default_subvol)
    };
    let placeholder: Vec<(TreeId, trees::RootInfo)> =
        rooted.iter().map(|&t| (t, Default::default())).collect();
    let root_shape = pack_internal(
        TreeId::Root,
        &root_items(&placeholder),
        nodesize,
        &anchors(opts.base.as_deref(), TreeId::Root),
    )?;
    let mut fixed = fs_shapes;
    fixed.extend([
        (TreeId::Csum, csum_shape),
        (
            TreeId::Uuid,
            pack_internal(TreeId::Uuid, &uuid_items, nodesize, &[])?,
        ),
        (
            TreeId::DataReloc,
            pack_internal(TreeId::DataReloc, &reloc_items, nodesize, &[])?,
        ),
        (TreeId::Root, root_shape),
    ]);

    // Where every block goes.
    let layout = layout::solve(&layout::LayoutInput {
        nodesize,
        dup: opts.metadata_dup,
        rw_slack: opts.rw_slack,
        meta_start: data.meta_start,
        keep: opts.base.as_deref().map(|b| layout::Kept {
            metadata: &b.metadata_chunks,
            system: b.system_chunk.as_ref(),
            base: b,
        }),
        data_chunks: &data.chunks,
        extents: &data.extents,
        owners: &owners,
        fixed: &fixed,
        chunk_tree_uuid: ids.chunk_tree,
        block_group_tree: opts.block_group_tree,
    })?;

    // The image's size.
    let min_total = layout
        .end
        .checked_add(space::round_up(opts.extra_space, SECTOR_SIZE))
        .filter(|&t| t <= limits::MAX_IMAGE_SIZE)
        .ok_or_else(|| {
            Error::msg(format!(
                "--extra-space {} makes the image larger than {} bytes",
                opts.extra_space,
                limits::MAX_IMAGE_SIZE
            ))
        })?;
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

    assemble(Assembly {
        opts,
        ids,
        tree,
        content,
        data,
        layout,
        total_bytes,
        fs_trees,
        subvols,
        default_subvol,
        csum,
        uuid_items,
        reloc_items,
        rooted,
        flags,
        partition: part,
    })
}

/// The root tree's items for trees whose roots are at `infos`.
fn root_tree(
    opts: &Options,
    fs_uuid: [u8; 16],
    infos: &[(TreeId, trees::RootInfo)],
    subvols: &[trees::SubvolRoot],
    default_subvol: Option<u64>,
) -> items::VecItems {
    trees::root_tree(&trees::RootTreeInput {
        generation: GENERATION,
        nodesize: opts.nodesize,
        time: Timespec {
            sec: opts.timestamp,
            nsec: 0,
        },
        roots: infos,
        fs_uuid,
        subvols,
        default_subvol,
    })
}

/// Everything the final phase puts together.
struct Assembly<'a> {
    opts: &'a Options,
    ids: Ids,
    tree: Arc<SourceTree>,
    content: Option<Arc<ContentIndex>>,
    data: Placement,
    layout: layout::Layout,
    total_bytes: u64,
    fs_trees: Vec<FsItems>,
    subvols: Vec<trees::SubvolRoot>,
    default_subvol: Option<u64>,
    csum: trees::CsumItems,
    uuid_items: items::VecItems,
    reloc_items: items::VecItems,
    rooted: Vec<TreeId>,
    flags: Arc<inode_flags::InodeFlags>,
    partition: Arc<subvol::Partition>,
}

/// Builds the trees that point at final addresses (chunk, root), the
/// superblock and the region table.
fn assemble(a: Assembly) -> Result<Plan> {
    let nodesize = a.opts.nodesize;
    let lay = a.layout;
    let chunks = lay.chunks;
    let dev_item = DevItem {
        devid: 1,
        total_bytes: a.total_bytes,
        bytes_used: chunks
            .iter()
            .map(|c| c.length * c.stripes.len() as u64)
            .sum(),
        sector_size: SECTOR_SIZE as u32,
        uuid: a.ids.device,
        fsid: a.ids.fsid,
    };
    let position = |id: TreeId| {
        lay.trees
            .iter()
            .position(|(t, _)| *t == id)
            .expect("the layout has every tree")
    };
    let infos: Vec<(TreeId, trees::RootInfo)> = a
        .rooted
        .iter()
        .map(|&id| {
            let i = position(id);
            let shape = &lay.trees[i].1;
            (
                id,
                trees::RootInfo {
                    bytenr: lay.addrs[i]
                        .last()
                        .and_then(|l| l.first())
                        .copied()
                        .unwrap_or(0),
                    level: shape.root_level(),
                    blocks: shape.blocks() as u64,
                },
            )
        })
        .collect();
    let chunk_items = trees::chunk_tree(dev_item, &chunks);
    let root_items = root_tree(a.opts, a.ids.fs_tree, &infos, &a.subvols, a.default_subvol);
    for (id, items) in [
        (TreeId::Chunk, &chunk_items as &dyn ItemSource),
        (TreeId::Root, &root_items),
    ] {
        if pack_internal(id, items, nodesize, &anchors(a.opts.base.as_deref(), id))?
            != lay.trees[position(id)].1
        {
            return Err(Error::msg(format!(
                "internal error: the {} tree changed shape after layout",
                id.name()
            )));
        }
    }

    let mut sources: Vec<(TreeId, Box<dyn ItemSource>)> = a
        .fs_trees
        .into_iter()
        .map(|t| (TreeId::Fs(t.objectid()), Box::new(t) as Box<dyn ItemSource>))
        .collect();
    sources.extend([
        (TreeId::Csum, Box::new(a.csum) as Box<dyn ItemSource>),
        (TreeId::Uuid, Box::new(a.uuid_items)),
        (TreeId::DataReloc, Box::new(a.reloc_items)),
        (TreeId::Root, Box::new(root_items)),
        (TreeId::Extent, Box::new(lay.extent_items)),
        (TreeId::FreeSpace, Box::new(lay.free_space_items)),
        (TreeId::Dev, Box::new(lay.dev_items)),
        (TreeId::Chunk, Box::new(chunk_items)),
    ]);
    if let Some(items) = lay.block_group_items {
        sources.push((TreeId::BlockGroup, Box::new(items)));
    }
    let mut trees: Vec<TreePlan> = Vec::with_capacity(lay.trees.len());
    for ((id, shape), addrs) in lay.trees.into_iter().zip(lay.addrs) {
        let k = sources
            .iter()
            .position(|(t, _)| *t == id)
            .expect("every laid-out tree has items");
        let (_, items) = sources.swap_remove(k);
        trees.push(TreePlan {
            id,
            items,
            shape,
            addrs,
        });
    }
    let mut blocks: Vec<BlockRef> = trees
        .iter()
        .enumerate()
        .flat_map(|(t, tp)| {
            tp.addrs.iter().enumerate().flat_map(move |(level, l)| {
                l.iter().enumerate().map(move |(idx, &logical)| BlockRef {
                    logical,
                    tree: t as u16,
                    level: level as u8,
                    idx: idx as u32,
                })
            })
        })
        .collect();
    blocks.sort_by_key(|b| b.logical);

    let root_of = |id: TreeId| {
        trees
            .iter()
            .find(|t| t.id == id)
            .expect("every image has this tree")
            .root()
    };
    let superblock = Superblock {
        fsid: a.ids.fsid,
        generation: GENERATION,
        root: root_of(TreeId::Root),
        chunk_root: root_of(TreeId::Chunk),
        extent_root: root_of(TreeId::Extent),
        fs_root: root_of(TreeId::Fs(FS_TREE)),
        dev_root: root_of(TreeId::Dev),
        csum_root: root_of(TreeId::Csum),
        total_bytes: a.total_bytes,
        bytes_used: chunks.iter().map(|c| c.used).sum(),
        sectorsize: SECTOR_SIZE as u32,
        nodesize,
        compat_ro_flags: COMPAT_RO_FREE_SPACE_TREE
            | COMPAT_RO_FREE_SPACE_TREE_VALID
            | if a.opts.block_group_tree {
                COMPAT_RO_BLOCK_GROUP_TREE
            } else {
                0
            },
        incompat_flags: INCOMPAT_MIXED_BACKREF
            | if a.default_subvol.is_some() {
                INCOMPAT_DEFAULT_SUBVOL
            } else {
                0
            }
            | INCOMPAT_EXTENDED_IREF
            | INCOMPAT_SKINNY_METADATA
            | INCOMPAT_NO_HOLES
            | if nodesize as u64 > 4096 {
                INCOMPAT_BIG_METADATA
            } else {
                0
            }
            | match &a.content {
                Some(c) if c.uses(Algorithm::Zstd) => INCOMPAT_COMPRESS_ZSTD,
                Some(c) if c.uses(Algorithm::Lzo) => INCOMPAT_COMPRESS_LZO,
                _ => 0,
            },
        csum_type: a.opts.csum,
        dev_item,
        label: a.opts.label.clone(),
        sys_chunks: chunks
            .iter()
            .filter(|c| c.ty & BLOCK_GROUP_SYSTEM != 0)
            .map(|c| (c.logical, trees::chunk_item(c, a.ids.device)))
            .collect(),
    };
    let regions = space::regions(&chunks, a.total_bytes);
    Ok(Plan {
        nodesize,
        csum_type: a.opts.csum,
        generation: GENERATION,
        fsid: a.ids.fsid,
        chunk_tree_uuid: a.ids.chunk_tree,
        source: a.tree,
        content: a.content,
        extents: a.data.extents,
        by_logical: a.data.by_logical,
        update: a.data.update,
        kept_tree_blocks: lay.kept_blocks,
        trees,
        blocks,
        chunks,
        regions,
        superblock,
        total_bytes: a.total_bytes,
        data_start: space::DATA_START,
        data_sectors: (a.data.end - space::DATA_START) / SECTOR_SIZE,
        inode_flags: a.flags,
        partition: a.partition,
    })
}

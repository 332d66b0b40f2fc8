//! Items as the planner describes them: a key plus just enough data to encode the
//! body later. Bodies borrow names and targets from the source tree, so the plan
//! never holds encoded leaves.

use crate::format::items::{ChunkItem, DevExtent, DevItem, InodeItem, RegularExtent, RootItem};
use crate::format::*;

/// One directory entry record (DIR_ITEM / DIR_INDEX).
#[derive(Clone, Debug)]
pub struct DirEntry<'a> {
    pub location: Key,
    pub ftype: u8,
    pub name: &'a [u8],
}

#[derive(Clone, Debug)]
pub enum Body<'a> {
    Inode(InodeItem),
    /// INODE_REF records: (dir index, name).
    InodeRef(Vec<(u64, &'a [u8])>),
    /// INODE_EXTREF records: (parent inode, dir index, name).
    InodeExtref(Vec<(u64, u64, &'a [u8])>),
    /// XATTR_ITEM records sharing one name hash: (name, value).
    Xattrs(Vec<(&'a [u8], &'a [u8])>),
    /// DIR_ITEM (possibly several colliding names) or DIR_INDEX (one entry).
    Dir(Vec<DirEntry<'a>>),
    /// Inline extent whose bytes are the whole content of source node `node`.
    InlineFile {
        node: u32,
        len: u64,
    },
    /// Inline extent with bytes known at plan time (symlink targets).
    InlineBytes(&'a [u8]),
    /// Inline extent holding the compressed payload (`len` bytes) of the
    /// whole of source node `node` (`ram` bytes).
    InlineCompressed {
        node: u32,
        compression: u8,
        ram: u64,
        len: u32,
    },
    Extent(RegularExtent),
    /// Checksums of `count` data sectors starting at logical `start`.
    Csum {
        start: u64,
        count: u32,
        csum: CsumType,
    },
    Root(RootItem),
    Chunk(ChunkItem),
    Dev(DevItem),
    DevExtent(DevExtent),
    DevStats,
    BlockGroup {
        used: u64,
        flags: u64,
    },
    MetadataExtent {
        owner: u64,
    },
    /// A data EXTENT_ITEM: all its references, the inline ones listed.
    DataExtent {
        refs: u64,
        inline: Vec<super::trees::DataRef>,
    },
    /// A keyed EXTENT_DATA_REF item: the refs that share its hash.
    DataRefs(Vec<super::trees::DataRef>),
    FreeSpaceInfo {
        extent_count: u32,
    },
    /// Zero-length item (FREE_SPACE_EXTENT).
    Empty,
    /// UUID tree entry: the subvolume id.
    Uuid(u64),
    /// ROOT_REF / ROOT_BACKREF: where a subvolume's entry is.
    RootRef {
        dirid: u64,
        sequence: u64,
        name: Box<[u8]>,
    },
}

impl Body<'_> {
    /// Encoded size in bytes.
    pub fn size(&self) -> usize {
        match self {
            Body::Inode(_) => INODE_ITEM_SIZE,
            Body::InodeRef(r) => r.iter().map(|(_, n)| INODE_REF_HEADER + n.len()).sum(),
            Body::InodeExtref(r) => r
                .iter()
                .map(|(_, _, n)| INODE_EXTREF_HEADER + n.len())
                .sum(),
            Body::Xattrs(x) => x
                .iter()
                .map(|(n, v)| DIR_ITEM_HEADER + n.len() + v.len())
                .sum(),
            Body::Dir(d) => d.iter().map(|e| DIR_ITEM_HEADER + e.name.len()).sum(),
            Body::InlineFile { len, .. } => FILE_EXTENT_INLINE_HEADER + *len as usize,
            Body::InlineBytes(b) => FILE_EXTENT_INLINE_HEADER + b.len(),
            Body::InlineCompressed { len, .. } => FILE_EXTENT_INLINE_HEADER + *len as usize,
            Body::Extent(_) => FILE_EXTENT_REG_SIZE,
            Body::Csum { count, csum, .. } => *count as usize * csum.size(),
            Body::Root(_) => ROOT_ITEM_SIZE,
            Body::Chunk(c) => c.size(),
            Body::Dev(_) => DEV_ITEM_SIZE,
            Body::DevExtent(_) => DEV_EXTENT_SIZE,
            Body::DevStats => DEV_STATS_SIZE,
            Body::BlockGroup { .. } => BLOCK_GROUP_ITEM_SIZE,
            Body::MetadataExtent { .. } => METADATA_ITEM_SIZE,
            Body::DataExtent { inline, .. } => {
                EXTENT_ITEM_HEADER + inline.len() * INLINE_DATA_REF_SIZE
            }
            Body::DataRefs(r) => r.len() * KEYED_DATA_REF_SIZE,
            Body::FreeSpaceInfo { .. } => FREE_SPACE_INFO_SIZE,
            Body::Empty => 0,
            Body::Uuid(_) => 8,
            Body::RootRef { name, .. } => ROOT_REF_HEADER + name.len(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Item<'a> {
    pub key: Key,
    pub body: Body<'a>,
}

/// A tree's items in key order, readable from any position. Leaves are encoded by
/// reading `iter_from(first item of the leaf)`, so a source only needs cheap seeks.
pub trait ItemSource: Send + Sync {
    fn count(&self) -> u64;
    fn iter_from(&self, start: u64) -> Box<dyn Iterator<Item = Item<'_>> + '_>;
}

/// Items held in memory, for the small trees (chunk, dev, root, uuid, ...).
pub struct VecItems(pub Vec<Item<'static>>);

impl ItemSource for VecItems {
    fn count(&self) -> u64 {
        self.0.len() as u64
    }
    fn iter_from(&self, start: u64) -> Box<dyn Iterator<Item = Item<'_>> + '_> {
        Box::new(self.0[start as usize..].iter().cloned())
    }
}

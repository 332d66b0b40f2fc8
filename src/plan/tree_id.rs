//! The trees of an image, named. A plan holds one `TreePlan` per tree, found by
//! its `TreeId`; adding a tree (a subvolume's fs tree) is adding a value, not
//! editing tables that must agree on indices.

use crate::format::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TreeId {
    Root,
    Extent,
    Chunk,
    Dev,
    /// A filesystem tree: the top-level one (5) or a subvolume (256 and up).
    Fs(u64),
    Csum,
    Uuid,
    FreeSpace,
    DataReloc,
    /// The block-group tree (11, `-O block-group-tree`).
    BlockGroup,
}

impl TreeId {
    /// The tree's object id: the `owner` of its blocks and the key of its ROOT_ITEM.
    pub fn objectid(self) -> u64 {
        match self {
            TreeId::Root => ROOT_TREE,
            TreeId::Extent => EXTENT_TREE,
            TreeId::Chunk => CHUNK_TREE,
            TreeId::Dev => DEV_TREE,
            TreeId::Fs(id) => id,
            TreeId::Csum => CSUM_TREE,
            TreeId::Uuid => UUID_TREE,
            TreeId::FreeSpace => FREE_SPACE_TREE,
            TreeId::DataReloc => DATA_RELOC_TREE,
            TreeId::BlockGroup => BLOCK_GROUP_TREE,
        }
    }

    pub fn name(self) -> String {
        match self {
            TreeId::Root => "root".into(),
            TreeId::Extent => "extent".into(),
            TreeId::Chunk => "chunk".into(),
            TreeId::Dev => "dev".into(),
            TreeId::Fs(FS_TREE) => "fs".into(),
            TreeId::Fs(id) => format!("subvolume {id}"),
            TreeId::Csum => "csum".into(),
            TreeId::Uuid => "uuid".into(),
            TreeId::FreeSpace => "free-space".into(),
            TreeId::DataReloc => "data-reloc".into(),
            TreeId::BlockGroup => "block-group".into(),
        }
    }

    /// Whether the tree's blocks live in the SYSTEM chunk (only the chunk tree:
    /// the superblock's sys_chunk_array is all the kernel has to find it).
    pub fn in_system_chunk(self) -> bool {
        self == TreeId::Chunk
    }

    /// Whether the tree has a ROOT_ITEM in the root tree (all but the root
    /// and chunk trees, which the superblock points at).
    pub fn has_root_item(self) -> bool {
        !matches!(self, TreeId::Root | TreeId::Chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids() {
        assert_eq!(TreeId::Fs(FS_TREE).objectid(), 5);
        assert_eq!(TreeId::Fs(256).objectid(), 256);
        assert_eq!(TreeId::DataReloc.objectid(), (-9i64) as u64);
        assert!(TreeId::Chunk.in_system_chunk());
        assert!(!TreeId::Root.has_root_item());
        assert!(TreeId::Csum.has_root_item());
        assert_eq!(TreeId::BlockGroup.objectid(), 11);
        assert!(TreeId::BlockGroup.has_root_item());
        assert!(!TreeId::BlockGroup.in_system_chunk());
    }
}

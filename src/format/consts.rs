//! Constants of the btrfs format (object ids, key types, flags, fixed sizes).

pub const SECTOR_SIZE: u64 = 4096;
pub const STRIPE_LEN: u64 = 65536;
pub const SUPER_INFO_SIZE: usize = 4096;
/// Physical offsets of the superblock and its two mirrors.
pub const SUPER_OFFSETS: [u64; 3] = [0x1_0000, 0x400_0000, 0x40_0000_0000];
pub const MAGIC: &[u8; 8] = b"_BHRfS_M";

pub const HEADER_SIZE: usize = 101;
pub const KEY_SIZE: usize = 17;
pub const ITEM_HEADER_SIZE: usize = 25;
pub const KEY_PTR_SIZE: usize = 33;
pub const SYS_CHUNK_ARRAY_MAX: usize = 2048;
pub const MAX_LEVEL: usize = 8;

// Tree ids and special object ids.
pub const ROOT_TREE: u64 = 1;
pub const EXTENT_TREE: u64 = 2;
pub const CHUNK_TREE: u64 = 3;
pub const DEV_TREE: u64 = 4;
pub const FS_TREE: u64 = 5;
pub const ROOT_TREE_DIR: u64 = 6;
pub const CSUM_TREE: u64 = 7;
pub const UUID_TREE: u64 = 9;
pub const FREE_SPACE_TREE: u64 = 10;
/// The block-group tree (compat_ro BLOCK_GROUP_TREE): found only through
/// its ROOT_ITEM in the root tree.
pub const BLOCK_GROUP_TREE: u64 = 11;
pub const DATA_RELOC_TREE: u64 = -9i64 as u64;
pub const EXTENT_CSUM_OBJECTID: u64 = -10i64 as u64;
pub const DEV_ITEMS_OBJECTID: u64 = 1;
pub const DEV_STATS_OBJECTID: u64 = 0;
pub const FIRST_FREE_OBJECTID: u64 = 256;
pub const FIRST_CHUNK_TREE_OBJECTID: u64 = 256;

// Key types.
pub const INODE_ITEM_KEY: u8 = 1;
pub const INODE_REF_KEY: u8 = 12;
pub const INODE_EXTREF_KEY: u8 = 13;
pub const XATTR_ITEM_KEY: u8 = 24;
pub const DIR_ITEM_KEY: u8 = 84;
pub const DIR_INDEX_KEY: u8 = 96;
pub const EXTENT_DATA_KEY: u8 = 108;
pub const EXTENT_CSUM_KEY: u8 = 128;
pub const ROOT_ITEM_KEY: u8 = 132;
pub const ROOT_BACKREF_KEY: u8 = 144;
pub const ROOT_REF_KEY: u8 = 156;
pub const EXTENT_ITEM_KEY: u8 = 168;
pub const METADATA_ITEM_KEY: u8 = 169;
pub const TREE_BLOCK_REF_KEY: u8 = 176;
pub const EXTENT_DATA_REF_KEY: u8 = 178;
pub const BLOCK_GROUP_ITEM_KEY: u8 = 192;
pub const FREE_SPACE_INFO_KEY: u8 = 198;
pub const FREE_SPACE_EXTENT_KEY: u8 = 199;
pub const DEV_EXTENT_KEY: u8 = 204;
pub const DEV_ITEM_KEY: u8 = 216;
pub const CHUNK_ITEM_KEY: u8 = 228;
pub const PERSISTENT_ITEM_KEY: u8 = 249;
pub const UUID_KEY_SUBVOL: u8 = 251;

// Block group / chunk type flags.
pub const BLOCK_GROUP_DATA: u64 = 0x1;
pub const BLOCK_GROUP_SYSTEM: u64 = 0x2;
pub const BLOCK_GROUP_METADATA: u64 = 0x4;
pub const BLOCK_GROUP_DUP: u64 = 0x20;

// Extent item flags.
pub const EXTENT_FLAG_DATA: u64 = 0x1;
pub const EXTENT_FLAG_TREE_BLOCK: u64 = 0x2;

// Feature flags.
pub const INCOMPAT_MIXED_BACKREF: u64 = 0x1;
pub const INCOMPAT_DEFAULT_SUBVOL: u64 = 0x2;
/// ROOT_ITEM flags: a read-only subvolume.
pub const ROOT_SUBVOL_RDONLY: u64 = 0x1;
pub const INCOMPAT_COMPRESS_LZO: u64 = 0x8;
pub const INCOMPAT_COMPRESS_ZSTD: u64 = 0x10;
pub const INCOMPAT_BIG_METADATA: u64 = 0x20;
pub const INCOMPAT_EXTENDED_IREF: u64 = 0x40;
pub const INCOMPAT_SKINNY_METADATA: u64 = 0x100;
pub const INCOMPAT_NO_HOLES: u64 = 0x200;
pub const COMPAT_RO_FREE_SPACE_TREE: u64 = 0x1;
pub const COMPAT_RO_FREE_SPACE_TREE_VALID: u64 = 0x2;
/// Every BLOCK_GROUP_ITEM lives in the block-group tree (11), none in the
/// extent tree. Needs NO_HOLES and FREE_SPACE_TREE; Linux 6.1 and later.
pub const COMPAT_RO_BLOCK_GROUP_TREE: u64 = 0x8;

/// Header flags of every tree block: WRITTEN plus backref revision 1 (MIXED_BACKREF).
pub const HEADER_FLAGS: u64 = 0x0100_0000_0000_0001;
pub const SUPER_FLAG_WRITTEN: u64 = 0x1;

// Directory entry file types.
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;
pub const FT_XATTR: u8 = 8;

/// INODE_ITEM flag: the file's data has no checksums.
pub const INODE_FLAG_NODATASUM: u64 = 0x1;
/// INODE_ITEM flag: data is overwritten in place (chattr +C); inherited by
/// what is created in such a directory.
pub const INODE_FLAG_NODATACOW: u64 = 0x2;
/// INODE_ITEM flag: new writes to this file are compressed (chattr +c).
pub const INODE_FLAG_COMPRESS: u64 = 0x800;
/// Embedded inode flag of a ROOT_ITEM whose flags and byte limit are valid:
/// the kernel clears both (a read-only subvolume becomes writable) on
/// reading a root item without it.
pub const INODE_FLAG_ROOT_ITEM_INIT: u64 = 1 << 31;

pub const FILE_EXTENT_INLINE: u8 = 0;
pub const FILE_EXTENT_REG: u8 = 1;

/// Size of the fixed part of a file extent item (before inline data).
pub const FILE_EXTENT_INLINE_HEADER: usize = 21;
pub const FILE_EXTENT_REG_SIZE: usize = 53;
pub const INODE_ITEM_SIZE: usize = 160;
pub const ROOT_ITEM_SIZE: usize = 439;
pub const DIR_ITEM_HEADER: usize = 30;
pub const INODE_REF_HEADER: usize = 10;
/// ROOT_REF / ROOT_BACKREF body before the name.
pub const ROOT_REF_HEADER: usize = 18;
pub const INODE_EXTREF_HEADER: usize = 18;
pub const CHUNK_ITEM_BASE: usize = 48;
pub const CHUNK_STRIPE_SIZE: usize = 32;
pub const DEV_ITEM_SIZE: usize = 98;
pub const DEV_EXTENT_SIZE: usize = 48;
pub const DEV_STATS_SIZE: usize = 40;
pub const BLOCK_GROUP_ITEM_SIZE: usize = 24;
pub const FREE_SPACE_INFO_SIZE: usize = 8;
pub const METADATA_ITEM_SIZE: usize = 33;
pub const DATA_EXTENT_ITEM_SIZE: usize = 53;
/// EXTENT_ITEM before its inline refs (refs, generation, flags).
pub const EXTENT_ITEM_HEADER: usize = 24;
/// Inline EXTENT_DATA_REF: type byte, root, objectid, offset, count.
pub const INLINE_DATA_REF_SIZE: usize = 29;
/// Keyed EXTENT_DATA_REF record: root, objectid, offset, count.
pub const KEYED_DATA_REF_SIZE: usize = 28;

/// Largest item that fits in one leaf.
pub const fn max_item_size(nodesize: u32) -> usize {
    nodesize as usize - HEADER_SIZE - ITEM_HEADER_SIZE
}

/// Bytes available for items (headers and data) in one leaf.
pub const fn leaf_data_size(nodesize: u32) -> usize {
    nodesize as usize - HEADER_SIZE
}

/// Key pointers that fit in one node.
pub const fn node_ptrs_per_block(nodesize: u32) -> usize {
    (nodesize as usize - HEADER_SIZE) / KEY_PTR_SIZE
}

/// The largest number of checksums the kernel puts in one csum item
/// (MAX_CSUM_ITEMS): 4,057 crc32c, 2,028 xxhash, 506 sha256 or blake2 at
/// 16 KiB nodes.
pub const fn max_csums_per_item(nodesize: u32, csum: super::CsumType) -> usize {
    (nodesize as usize - HEADER_SIZE - 2 * ITEM_HEADER_SIZE) / csum.size() - 1
}

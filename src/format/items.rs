//! Item bodies. Each struct holds the values of one item and writes its exact
//! bytes; `size()` is what goes in the leaf item header.

use super::*;

/// INODE_ITEM (also embedded in ROOT_ITEM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeItem {
    pub generation: u64,
    pub transid: u64,
    pub size: u64,
    pub nbytes: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub rdev: u64,
    pub flags: u64,
    pub atime: Timespec,
    pub ctime: Timespec,
    pub mtime: Timespec,
    pub otime: Timespec,
}

impl InodeItem {
    pub fn write(&self, b: &mut [u8]) {
        b[..INODE_ITEM_SIZE].fill(0);
        put_u64(b, 0, self.generation);
        put_u64(b, 8, self.transid);
        put_u64(b, 16, self.size);
        put_u64(b, 24, self.nbytes);
        put_u32(b, 40, self.nlink);
        put_u32(b, 44, self.uid);
        put_u32(b, 48, self.gid);
        put_u32(b, 52, self.mode);
        put_u64(b, 56, self.rdev);
        put_u64(b, 64, self.flags);
        self.atime.write(&mut b[112..]);
        self.ctime.write(&mut b[124..]);
        self.mtime.write(&mut b[136..]);
        self.otime.write(&mut b[148..]);
    }
}

/// One INODE_REF record; returns the bytes written.
pub fn write_inode_ref(b: &mut [u8], index: u64, name: &[u8]) -> usize {
    put_u64(b, 0, index);
    put_u16(b, 8, name.len() as u16);
    b[10..10 + name.len()].copy_from_slice(name);
    INODE_REF_HEADER + name.len()
}

/// A ROOT_REF or ROOT_BACKREF body: the directory (in the parent tree)
/// holding a subvolume's entry, the entry's DIR_INDEX, and its name.
pub fn write_root_ref(b: &mut [u8], dirid: u64, sequence: u64, name: &[u8]) -> usize {
    put_u64(b, 0, dirid);
    put_u64(b, 8, sequence);
    put_u16(b, 16, name.len() as u16);
    b[18..18 + name.len()].copy_from_slice(name);
    ROOT_REF_HEADER + name.len()
}

/// One INODE_EXTREF record; returns the bytes written.
pub fn write_inode_extref(b: &mut [u8], parent: u64, index: u64, name: &[u8]) -> usize {
    put_u64(b, 0, parent);
    put_u64(b, 8, index);
    put_u16(b, 16, name.len() as u16);
    b[18..18 + name.len()].copy_from_slice(name);
    INODE_EXTREF_HEADER + name.len()
}

/// One DIR_ITEM / DIR_INDEX / XATTR_ITEM record; returns the bytes written.
pub fn write_dir_record(
    b: &mut [u8],
    location: Key,
    transid: u64,
    ftype: u8,
    name: &[u8],
    data: &[u8],
) -> usize {
    location.write(&mut b[0..]);
    put_u64(b, 17, transid);
    put_u16(b, 25, data.len() as u16);
    put_u16(b, 27, name.len() as u16);
    b[29] = ftype;
    b[30..30 + name.len()].copy_from_slice(name);
    b[30 + name.len()..30 + name.len() + data.len()].copy_from_slice(data);
    DIR_ITEM_HEADER + name.len() + data.len()
}

/// Header of an inline file extent holding `ram_bytes` file bytes; the caller
/// writes the data (or, with `compression`, its payload) after it.
pub fn write_inline_extent_header(b: &mut [u8], generation: u64, ram_bytes: u64, compression: u8) {
    put_u64(b, 0, generation);
    put_u64(b, 8, ram_bytes);
    b[16] = compression;
    b[17] = 0;
    put_u16(b, 18, 0);
    b[20] = FILE_EXTENT_INLINE;
}

/// A regular file extent (compression 0: stored as is; 1 zlib, 2 lzo, 3 zstd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegularExtent {
    pub generation: u64,
    pub ram_bytes: u64,
    pub compression: u8,
    pub disk_bytenr: u64,
    pub disk_num_bytes: u64,
    pub offset: u64,
    pub num_bytes: u64,
}

impl RegularExtent {
    pub fn write(&self, b: &mut [u8]) {
        put_u64(b, 0, self.generation);
        put_u64(b, 8, self.ram_bytes);
        b[16] = self.compression;
        b[17] = 0;
        put_u16(b, 18, 0);
        b[20] = FILE_EXTENT_REG;
        put_u64(b, 21, self.disk_bytenr);
        put_u64(b, 29, self.disk_num_bytes);
        put_u64(b, 37, self.offset);
        put_u64(b, 45, self.num_bytes);
    }
}

/// ROOT_ITEM: where a tree's root block is, and the subvolume's identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootItem {
    pub inode: InodeItem,
    pub generation: u64,
    pub root_dirid: u64,
    pub bytenr: u64,
    pub bytes_used: u64,
    pub refs: u32,
    pub level: u8,
    /// ROOT_SUBVOL_RDONLY for a read-only subvolume.
    pub flags: u64,
    pub uuid: [u8; 16],
    pub ctransid: u64,
    pub otransid: u64,
    pub ctime: Timespec,
    pub otime: Timespec,
}

impl RootItem {
    pub fn write(&self, b: &mut [u8]) {
        b[..ROOT_ITEM_SIZE].fill(0);
        self.inode.write(&mut b[0..]);
        put_u64(b, 160, self.generation);
        put_u64(b, 168, self.root_dirid);
        put_u64(b, 176, self.bytenr);
        put_u64(b, 192, self.bytes_used);
        put_u64(b, 208, self.flags);
        put_u32(b, 216, self.refs);
        b[238] = self.level;
        put_u64(b, 239, self.generation);
        b[247..263].copy_from_slice(&self.uuid);
        put_u64(b, 295, self.ctransid);
        put_u64(b, 303, self.otransid);
        self.ctime.write(&mut b[327..]);
        self.otime.write(&mut b[339..]);
    }
}

/// One stripe of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stripe {
    pub devid: u64,
    pub offset: u64,
    pub dev_uuid: [u8; 16],
}

/// CHUNK_ITEM body (also the payload of sys_chunk_array entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkItem {
    pub length: u64,
    pub ty: u64,
    pub sector_size: u32,
    pub stripes: Vec<Stripe>,
}

impl ChunkItem {
    pub fn size(&self) -> usize {
        CHUNK_ITEM_BASE + CHUNK_STRIPE_SIZE * self.stripes.len()
    }

    pub fn write(&self, b: &mut [u8]) {
        put_u64(b, 0, self.length);
        put_u64(b, 8, EXTENT_TREE);
        put_u64(b, 16, STRIPE_LEN);
        put_u64(b, 24, self.ty);
        put_u32(b, 32, STRIPE_LEN as u32);
        put_u32(b, 36, STRIPE_LEN as u32);
        put_u32(b, 40, self.sector_size);
        put_u16(b, 44, self.stripes.len() as u16);
        put_u16(b, 46, 1);
        for (i, s) in self.stripes.iter().enumerate() {
            let o = CHUNK_ITEM_BASE + i * CHUNK_STRIPE_SIZE;
            put_u64(b, o, s.devid);
            put_u64(b, o + 8, s.offset);
            b[o + 16..o + 32].copy_from_slice(&s.dev_uuid);
        }
    }
}

/// DEV_ITEM: the single device (also embedded in the superblock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevItem {
    pub devid: u64,
    pub total_bytes: u64,
    pub bytes_used: u64,
    pub sector_size: u32,
    pub uuid: [u8; 16],
    pub fsid: [u8; 16],
}

impl DevItem {
    pub fn write(&self, b: &mut [u8]) {
        b[..DEV_ITEM_SIZE].fill(0);
        put_u64(b, 0, self.devid);
        put_u64(b, 8, self.total_bytes);
        put_u64(b, 16, self.bytes_used);
        put_u32(b, 24, self.sector_size);
        put_u32(b, 28, self.sector_size);
        put_u32(b, 32, self.sector_size);
        b[66..82].copy_from_slice(&self.uuid);
        b[82..98].copy_from_slice(&self.fsid);
    }
}

/// DEV_EXTENT: one chunk stripe seen from the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevExtent {
    pub chunk_offset: u64,
    pub length: u64,
    pub chunk_tree_uuid: [u8; 16],
}

impl DevExtent {
    pub fn write(&self, b: &mut [u8]) {
        put_u64(b, 0, CHUNK_TREE);
        put_u64(b, 8, FIRST_CHUNK_TREE_OBJECTID);
        put_u64(b, 16, self.chunk_offset);
        put_u64(b, 24, self.length);
        b[32..48].copy_from_slice(&self.chunk_tree_uuid);
    }
}

/// BLOCK_GROUP_ITEM.
pub fn write_block_group(b: &mut [u8], used: u64, flags: u64) {
    put_u64(b, 0, used);
    put_u64(b, 8, FIRST_CHUNK_TREE_OBJECTID);
    put_u64(b, 16, flags);
}

/// Skinny METADATA_ITEM with one inline TREE_BLOCK_REF to its owner tree.
pub fn write_metadata_extent(b: &mut [u8], generation: u64, owner: u64) {
    put_u64(b, 0, 1);
    put_u64(b, 8, generation);
    put_u64(b, 16, EXTENT_FLAG_TREE_BLOCK);
    b[24] = TREE_BLOCK_REF_KEY;
    put_u64(b, 25, owner);
}

/// Data EXTENT_ITEM holding `refs` references, with inline EXTENT_DATA_REFs
/// of (root, objectid, offset, count), in the order given.
pub fn write_data_extent(
    b: &mut [u8],
    generation: u64,
    refs: u64,
    inline: &[(u64, u64, u64, u32)],
) {
    put_u64(b, 0, refs);
    put_u64(b, 8, generation);
    put_u64(b, 16, EXTENT_FLAG_DATA);
    for (i, &(root, ino, offset, count)) in inline.iter().enumerate() {
        let o = EXTENT_ITEM_HEADER + i * INLINE_DATA_REF_SIZE;
        b[o] = EXTENT_DATA_REF_KEY;
        put_u64(b, o + 1, root);
        put_u64(b, o + 9, ino);
        put_u64(b, o + 17, offset);
        put_u32(b, o + 25, count);
    }
}

/// Keyed EXTENT_DATA_REF records (root, objectid, offset, count).
pub fn write_data_refs(b: &mut [u8], refs: &[(u64, u64, u64, u32)]) {
    for (i, &(root, ino, offset, count)) in refs.iter().enumerate() {
        let o = i * KEYED_DATA_REF_SIZE;
        put_u64(b, o, root);
        put_u64(b, o + 8, ino);
        put_u64(b, o + 16, offset);
        put_u32(b, o + 24, count);
    }
}

/// FREE_SPACE_INFO in extent (not bitmap) mode.
pub fn write_free_space_info(b: &mut [u8], extent_count: u32) {
    put_u32(b, 0, extent_count);
    put_u32(b, 4, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_item_sizes() {
        let s = Stripe {
            devid: 1,
            offset: 0,
            dev_uuid: [0; 16],
        };
        let single = ChunkItem {
            length: 1,
            ty: 1,
            sector_size: 4096,
            stripes: vec![s],
        };
        assert_eq!(single.size(), 80);
        let dup = ChunkItem {
            stripes: vec![s, s],
            ..single
        };
        assert_eq!(dup.size(), 112);
    }

    #[test]
    fn dir_record_layout() {
        let mut b = [0u8; 64];
        let n = write_dir_record(&mut b, Key::new(257, 1, 0), 1, FT_REG_FILE, b"ab", &[]);
        assert_eq!(n, 32);
        assert_eq!(&b[0..8], &257u64.to_le_bytes());
        assert_eq!(b[8], 1);
        assert_eq!(b[29], FT_REG_FILE);
        assert_eq!(&b[30..32], b"ab");
    }
}

//! The superblock: the one fixed-position structure that locates everything else.

use super::items::{ChunkItem, DevItem};
use super::*;

/// Where one tree's root block is (for backup root slot 0).
#[derive(Clone, Copy, Debug, Default)]
pub struct RootPtr {
    pub bytenr: u64,
    pub level: u8,
}

#[derive(Clone, Debug)]
pub struct Superblock {
    pub fsid: [u8; 16],
    pub generation: u64,
    pub root: RootPtr,
    pub chunk_root: RootPtr,
    pub extent_root: RootPtr,
    pub fs_root: RootPtr,
    pub dev_root: RootPtr,
    pub csum_root: RootPtr,
    pub total_bytes: u64,
    pub bytes_used: u64,
    pub sectorsize: u32,
    pub nodesize: u32,
    pub compat_ro_flags: u64,
    pub incompat_flags: u64,
    pub csum_type: CsumType,
    pub dev_item: DevItem,
    pub label: Vec<u8>,
    /// SYSTEM chunks as (logical start, chunk) for sys_chunk_array.
    pub sys_chunks: Vec<(u64, ChunkItem)>,
}

impl Superblock {
    /// Encodes the copy that lives at physical offset `bytenr`.
    pub fn encode(&self, bytenr: u64) -> Vec<u8> {
        let mut b = vec![0u8; SUPER_INFO_SIZE];
        b[0x20..0x30].copy_from_slice(&self.fsid);
        put_u64(&mut b, 0x30, bytenr);
        put_u64(&mut b, 0x38, SUPER_FLAG_WRITTEN);
        b[0x40..0x48].copy_from_slice(MAGIC);
        put_u64(&mut b, 0x48, self.generation);
        put_u64(&mut b, 0x50, self.root.bytenr);
        put_u64(&mut b, 0x58, self.chunk_root.bytenr);
        put_u64(&mut b, 0x70, self.total_bytes);
        put_u64(&mut b, 0x78, self.bytes_used);
        put_u64(&mut b, 0x80, ROOT_TREE_DIR);
        put_u64(&mut b, 0x88, 1);
        put_u32(&mut b, 0x90, self.sectorsize);
        put_u32(&mut b, 0x94, self.nodesize);
        put_u32(&mut b, 0x98, self.nodesize);
        put_u32(&mut b, 0x9c, self.sectorsize);
        put_u64(&mut b, 0xa4, self.generation);
        put_u64(&mut b, 0xb4, self.compat_ro_flags);
        put_u64(&mut b, 0xbc, self.incompat_flags);
        put_u16(&mut b, 0xc4, self.csum_type.code());
        b[0xc6] = self.root.level;
        b[0xc7] = self.chunk_root.level;
        self.dev_item.write(&mut b[0xc9..]);
        let label = &self.label[..self.label.len().min(255)];
        b[0x12b..0x12b + label.len()].copy_from_slice(label);
        put_u64(&mut b, 0x233, self.generation);

        let mut off = 0x32b;
        for (logical, chunk) in &self.sys_chunks {
            Key::new(FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM_KEY, *logical).write(&mut b[off..]);
            off += KEY_SIZE;
            chunk.write(&mut b[off..]);
            off += chunk.size();
        }
        let array_size = off - 0x32b;
        assert!(array_size <= SYS_CHUNK_ARRAY_MAX);
        put_u32(&mut b, 0xa0, array_size as u32);

        // Backup root slot 0 describes the current roots.
        let r = 0xb2b;
        let g = self.generation;
        let slots = [
            (0, self.root),
            (16, self.chunk_root),
            (32, self.extent_root),
            (48, self.fs_root),
            (64, self.dev_root),
            (80, self.csum_root),
        ];
        for (i, (o, p)) in slots.iter().enumerate() {
            put_u64(&mut b, r + o, p.bytenr);
            put_u64(&mut b, r + o + 8, g);
            b[r + 152 + i] = p.level;
        }
        put_u64(&mut b, r + 96, self.total_bytes);
        put_u64(&mut b, r + 104, self.bytes_used);
        put_u64(&mut b, r + 112, 1);

        let c = self.csum_type.compute(&b[CSUM_FIELD_SIZE..]);
        b[..CSUM_FIELD_SIZE].copy_from_slice(&c);
        b
    }
}

//! Tree block framing: header, leaf item table, node key pointers, checksum.

use super::*;

/// Fields of a tree block header that vary per block.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub fsid: [u8; 16],
    pub chunk_tree_uuid: [u8; 16],
    pub bytenr: u64,
    pub generation: u64,
    pub owner: u64,
    pub nritems: u32,
    pub level: u8,
}

impl Header {
    pub fn write(&self, b: &mut [u8]) {
        b[..HEADER_SIZE].fill(0);
        b[0x20..0x30].copy_from_slice(&self.fsid);
        put_u64(b, 0x30, self.bytenr);
        put_u64(b, 0x38, HEADER_FLAGS);
        b[0x40..0x50].copy_from_slice(&self.chunk_tree_uuid);
        put_u64(b, 0x50, self.generation);
        put_u64(b, 0x58, self.owner);
        put_u32(b, 0x60, self.nritems);
        b[0x64] = self.level;
    }
}

/// Writes the checksum of bytes [0x20, len) into the checksum field.
pub fn seal(block: &mut [u8], csum: CsumType) {
    let c = csum.compute(&block[CSUM_FIELD_SIZE..]);
    block[..CSUM_FIELD_SIZE].copy_from_slice(&c);
}

/// Fills a leaf from the front (item headers) and the back (item data).
pub struct LeafWriter<'a> {
    buf: &'a mut [u8],
    nritems: u32,
    data_end: usize,
}

impl<'a> LeafWriter<'a> {
    /// `buf` is the whole block; it must be zeroed by the caller.
    pub fn new(buf: &'a mut [u8]) -> Self {
        let data_end = buf.len();
        LeafWriter {
            buf,
            nritems: 0,
            data_end,
        }
    }

    /// Reserves an item and returns its data area to fill.
    pub fn push(&mut self, key: Key, size: usize) -> &mut [u8] {
        let hdr = HEADER_SIZE + self.nritems as usize * ITEM_HEADER_SIZE;
        let start = self.data_end - size;
        assert!(
            hdr + ITEM_HEADER_SIZE <= start,
            "leaf overflow: planner packed too many items"
        );
        key.write(&mut self.buf[hdr..]);
        put_u32(self.buf, hdr + 17, (start - HEADER_SIZE) as u32);
        put_u32(self.buf, hdr + 21, size as u32);
        self.nritems += 1;
        self.data_end = start;
        &mut self.buf[start..start + size]
    }
}

/// Writes key pointer `i` of a node.
pub fn write_key_ptr(b: &mut [u8], i: usize, key: Key, blockptr: u64, generation: u64) {
    let o = HEADER_SIZE + i * KEY_PTR_SIZE;
    key.write(&mut b[o..]);
    put_u64(b, o + 17, blockptr);
    put_u64(b, o + 25, generation);
}

//! On-disk encoding of btrfs structures. Nothing here decides anything: every
//! function turns values chosen by the planner into the exact little-endian bytes
//! the kernel expects. Layout policy lives in `plan`.

pub mod block;
pub mod consts;
pub mod csum;
pub mod hash;
pub mod items;
pub mod superblock;

pub use consts::*;
pub use csum::{Csum, CsumType, CSUM_FIELD_SIZE};

/// A btrfs disk key. Field order matters: the derived `Ord` compares
/// (objectid, type, offset) numerically, which is exactly btrfs key order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    pub objectid: u64,
    pub ty: u8,
    pub offset: u64,
}

impl Key {
    pub const fn new(objectid: u64, ty: u8, offset: u64) -> Key {
        Key {
            objectid,
            ty,
            offset,
        }
    }

    pub fn write(&self, out: &mut [u8]) {
        put_u64(out, 0, self.objectid);
        out[8] = self.ty;
        put_u64(out, 9, self.offset);
    }
}

/// A btrfs timespec: signed seconds since the epoch and nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    pub fn write(&self, out: &mut [u8]) {
        put_u64(out, 0, self.sec as u64);
        put_u32(out, 8, self.nsec);
    }
}

#[inline]
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

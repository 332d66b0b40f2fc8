//! Chunks, where their stripes sit on the device, and the ranges that
//! superblock mirrors take out of them.
//!
//! Physical order is: reserved first MiB (primary superblock), DATA chunks,
//! METADATA chunks, the SYSTEM chunk. Data comes before metadata so that a
//! sequential reader has served (and checksummed) every data sector before it
//! reaches the csum tree; the SYSTEM chunk comes last so that its size can follow
//! the chunk tree (the number of chunks) without moving any data.

use super::data::Excluded;
use crate::format::{SECTOR_SIZE, STRIPE_LEN, SUPER_INFO_SIZE, SUPER_OFFSETS};

pub const MIB: u64 = 1 << 20;
/// The first MiB is reserved (boot loaders, the primary superblock); data
/// starts right after it, logical = physical.
pub const DATA_START: u64 = MIB;

/// Free room in the SYSTEM chunk beyond the chunk tree itself: enough for the
/// kernel to copy-on-write the chunk tree and record new chunks after a resize
/// before it needs another SYSTEM chunk.
pub fn system_headroom(nodesize: u32) -> u64 {
    (256u64 << 10).max(8 * nodesize as u64) - nodesize as u64
}

/// The SYSTEM chunk at physical (= logical) `start`, sized for a chunk tree of
/// `blocks` blocks plus headroom, around any excluded mirror ranges.
pub fn system_chunk(start: u64, blocks: usize, dup: bool, ty: u64, nodesize: u32) -> Chunk {
    let need = blocks as u64 * nodesize as u64 + system_headroom(nodesize);
    metadata_chunk(start, need, dup, ty, u64::MAX)
}
/// Largest DATA chunk (what the kernel allocates on a large device).
pub const DATA_CHUNK_MAX: u64 = 1 << 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub logical: u64,
    pub length: u64,
    /// Block group type flags (DATA / SYSTEM / METADATA, optionally DUP).
    pub ty: u64,
    /// Physical start of each stripe.
    pub stripes: Vec<u64>,
    /// Bytes allocated to extents or tree blocks (block group `used`).
    pub used: u64,
}

impl Chunk {
    pub fn end(&self) -> u64 {
        self.logical + self.length
    }

    /// Logical ranges that map onto a superblock mirror through any stripe.
    pub fn excluded(&self) -> Vec<Excluded> {
        let mut out = Vec::new();
        for &s in &self.stripes {
            for &p in &SUPER_OFFSETS[1..] {
                if p >= s && p < s + self.length {
                    let rel = (p - s) / STRIPE_LEN * STRIPE_LEN;
                    out.push(Excluded {
                        start: self.logical + rel,
                        len: STRIPE_LEN.min(self.length - rel),
                    });
                }
            }
        }
        out.sort_by_key(|x| x.start);
        out.dedup();
        out
    }
}

pub fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Logical ranges excluded from data placement, for an identity-mapped data area.
pub fn data_exclusions(start: u64) -> Vec<Excluded> {
    SUPER_OFFSETS[1..]
        .iter()
        .filter(|&&p| p >= start)
        .map(|&p| Excluded {
            start: p,
            len: STRIPE_LEN,
        })
        .collect()
}

/// Free data space left in the last DATA chunk. The kernel reserves data space
/// for every buffered write, inline ones included, so an image without any free
/// data space cannot take even a one-byte file before it is resized.
pub const DATA_SLACK: u64 = 64 << 10;

/// Cuts the used data area `[start, end)` plus `slack` into DATA chunks of at
/// most `DATA_CHUNK_MAX`, the last one rounded up to 64 KiB, with the bytes
/// of `extents` (sorted by address) in each counted as used.
pub fn data_chunks<'a>(
    start: u64,
    end: u64,
    slack: u64,
    extents: impl Iterator<Item = &'a super::data::DataExtent>,
) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut s = start;
    let end = round_up(end + slack, STRIPE_LEN);
    while s < end {
        let len = (end - s).min(DATA_CHUNK_MAX);
        chunks.push(Chunk {
            logical: s,
            length: len,
            ty: crate::format::BLOCK_GROUP_DATA,
            stripes: vec![s],
            used: 0,
        });
        s += len;
    }
    count_used(&mut chunks, extents);
    chunks
}

/// Sets each of `chunks`' (sorted by address) `used` to the bytes of
/// `extents` (sorted by address, none crossing a chunk end) inside it.
pub fn count_used<'a>(
    chunks: &mut [Chunk],
    extents: impl Iterator<Item = &'a super::data::DataExtent>,
) {
    for c in chunks.iter_mut() {
        c.used = 0;
    }
    let mut c = 0;
    for e in extents {
        while c < chunks.len() && chunks[c].end() <= e.logical {
            c += 1;
        }
        match chunks.get_mut(c) {
            Some(ch) if ch.logical <= e.logical => ch.used += e.size(),
            _ => debug_assert!(false, "every extent is in a data chunk"),
        }
    }
}

/// Largest METADATA chunk. With DUP, a sequential reader meets the second copy
/// of a block one chunk length after the first; small chunks keep that distance
/// (and so the block cache a reader needs) bounded.
pub const METADATA_CHUNK_MAX: u64 = 4 * MIB;

/// Lays out METADATA chunks from physical (= logical) `start`, each with its
/// stripes side by side, until `need` bytes of tree blocks fit around the
/// excluded mirror ranges.
pub fn metadata_chunks(start: u64, need: u64, dup: bool, ty: u64) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::new();
    let mut left = need.max(1);
    let mut pos = start;
    while left > 0 {
        let c = metadata_chunk(
            pos,
            left.min(METADATA_CHUNK_MAX),
            dup,
            ty,
            METADATA_CHUNK_MAX,
        );
        let usable = c.length - c.excluded().iter().map(|x| x.len).sum::<u64>();
        left = left.saturating_sub(usable);
        pos = c.stripes.last().copied().unwrap_or(pos) + c.length;
        out.push(c);
    }
    out
}

/// One METADATA chunk at physical (= logical) `start` holding `need` bytes of
/// tree blocks around the excluded mirror ranges, at most `max` bytes long.
fn metadata_chunk(start: u64, need: u64, dup: bool, ty: u64, max: u64) -> Chunk {
    let mut length = round_up(need.max(STRIPE_LEN), STRIPE_LEN);
    loop {
        let stripes = if dup {
            vec![start, start + length]
        } else {
            vec![start]
        };
        let c = Chunk {
            logical: start,
            length,
            ty,
            stripes,
            used: 0,
        };
        let lost: u64 = c.excluded().iter().map(|x| x.len).sum();
        if length - lost >= need || length >= max {
            return c;
        }
        length += STRIPE_LEN;
    }
}

/// Iterates over node-sized, node-aligned slots of a chunk, skipping excluded ranges.
pub fn block_slots(chunk: &Chunk, nodesize: u64) -> impl Iterator<Item = u64> {
    let excl = chunk.excluded();
    let logical = chunk.logical;
    (0..chunk.length / nodesize)
        .map(move |i| logical + i * nodesize)
        .filter(move |a| !excl.iter().any(|x| x.overlaps(*a, nodesize)))
}

/// What fills a physical range of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Superblock copy `i` (0 primary, 1-2 mirrors).
    Super(u8),
    /// Tree blocks; the region's first byte is at this logical address.
    Metadata { logical: u64 },
    /// File data; the region's first byte is at this logical address.
    Data { logical: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub len: u64,
    pub kind: RegionKind,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The sorted, non-overlapping region table. Superblock copies cut holes into
/// the stripes that contain them (their logical range is excluded anyway).
pub fn regions(chunks: &[Chunk], total_bytes: u64) -> Vec<Region> {
    let supers: Vec<Region> = SUPER_OFFSETS
        .iter()
        .enumerate()
        .filter(|(_, &o)| o + SUPER_INFO_SIZE as u64 <= total_bytes)
        .map(|(i, &o)| Region {
            start: o,
            len: SUPER_INFO_SIZE as u64,
            kind: RegionKind::Super(i as u8),
        })
        .collect();
    let mut out = supers.clone();
    for c in chunks {
        for &s in &c.stripes {
            let mut pieces = vec![(s, s + c.length)];
            for sb in &supers {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(a, b)| {
                        if sb.start < b && a < sb.end() {
                            vec![(a, sb.start), (sb.end(), b)]
                        } else {
                            vec![(a, b)]
                        }
                    })
                    .filter(|(a, b)| a < b)
                    .collect();
            }
            for (a, b) in pieces {
                let logical = c.logical + (a - s);
                let kind = if c.ty & crate::format::BLOCK_GROUP_DATA != 0 {
                    RegionKind::Data { logical }
                } else {
                    RegionKind::Metadata { logical }
                };
                out.push(Region {
                    start: a,
                    len: b - a,
                    kind,
                });
            }
        }
    }
    out.sort_by_key(|r| r.start);
    debug_assert!(out.windows(2).all(|w| w[0].end() <= w[1].start));
    debug_assert!(out.iter().all(|r| r.start % SECTOR_SIZE == 0 || r.len > 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dup_metadata_skips_mirror_in_second_stripe() {
        let c = metadata_chunk(61 * MIB, 3 * MIB, true, 0x24, METADATA_CHUNK_MAX);
        assert_eq!(
            metadata_chunks(61 * MIB, 3 * MIB, true, 0x24),
            vec![c.clone()]
        );
        // Stripe 1 covers [61+L, 61+2L) which contains 64 MiB.
        let ex = c.excluded();
        assert_eq!(ex.len(), 1);
        assert!(c.length - 65536 >= 3 * MIB);
        assert_eq!(
            block_slots(&c, 16384).count() as u64,
            (c.length - 65536) / 16384
        );
    }

    #[test]
    fn large_metadata_is_split_into_bounded_chunks() {
        let cs = metadata_chunks(3 * MIB, 100 * MIB, true, 0x24);
        assert!(cs.iter().all(|c| c.length <= METADATA_CHUNK_MAX));
        let usable: u64 = cs
            .iter()
            .map(|c| c.length - c.excluded().iter().map(|x| x.len).sum::<u64>())
            .sum();
        assert!(usable >= 100 * MIB);
        for w in cs.windows(2) {
            assert_eq!(w[1].stripes[0], w[0].stripes[1] + w[0].length);
        }
    }

    #[test]
    fn regions_cut_around_supers() {
        let c = Chunk {
            logical: 3 * MIB,
            length: 100 * MIB,
            ty: 1,
            stripes: vec![3 * MIB],
            used: 0,
        };
        let r = regions(&[c], 200 * MIB);
        assert_eq!(r.len(), 4);
        assert_eq!(r[2].kind, RegionKind::Super(1));
        assert_eq!(
            r[3].kind,
            RegionKind::Data {
                logical: 64 * MIB + 4096
            }
        );
    }
}

//! Data placement: every regular file's data segments become extents packed
//! back to back in DATA chunks, in inode order, so a sequential read of the image
//! reads each source file once, front to back.

use crate::format::SECTOR_SIZE;
use crate::source::{Segment, Segments};

/// Largest extent the kernel itself creates.
pub const MAX_EXTENT: u64 = 128 << 20;

/// One data extent: `len` bytes (a sector multiple, at most `MAX_EXTENT`) at
/// `logical`, holding the source bytes of `node` from `file_offset` (zeros past
/// the end of the file). 24 bytes: there is one per extent of every file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataExtent {
    pub logical: u64,
    pub file_offset: u64,
    pub node: u32,
    len: u32,
}

impl DataExtent {
    pub fn new(logical: u64, len: u64, node: u32, file_offset: u64) -> DataExtent {
        DataExtent {
            logical,
            file_offset,
            node,
            len: u32::try_from(len).expect("extents are at most MAX_EXTENT long"),
        }
    }

    pub fn size(&self) -> u64 {
        self.len as u64
    }

    pub fn end(&self) -> u64 {
        self.logical + self.len as u64
    }
}

/// A contiguous logical range that must not hold data (a superblock mirror's stripe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Excluded {
    pub start: u64,
    pub len: u64,
}

/// Appends extents to the data area, cutting them at chunk boundaries and around
/// excluded ranges.
pub struct DataAllocator {
    pub start: u64,
    pub pos: u64,
    chunk_size: u64,
    excluded: Vec<Excluded>,
    pub extents: Vec<DataExtent>,
}

impl DataAllocator {
    pub fn new(start: u64, chunk_size: u64, excluded: Vec<Excluded>) -> Self {
        DataAllocator {
            start,
            pos: start,
            chunk_size,
            excluded,
            extents: Vec::new(),
        }
    }

    /// Places one file's data segments.
    pub fn place(&mut self, node: u32, segments: Segments<'_>) {
        for seg in aligned(segments.iter()) {
            let mut off = seg.offset;
            let end = seg.offset + seg.len;
            while off < end {
                if let Some(x) = self
                    .excluded
                    .iter()
                    .find(|x| x.start <= self.pos && self.pos < x.start + x.len)
                {
                    self.pos = x.start + x.len;
                    continue;
                }
                let chunk_end =
                    self.start + ((self.pos - self.start) / self.chunk_size + 1) * self.chunk_size;
                let next_excl = self
                    .excluded
                    .iter()
                    .filter(|x| x.start > self.pos)
                    .map(|x| x.start)
                    .min()
                    .unwrap_or(u64::MAX);
                let len = (end - off)
                    .min(MAX_EXTENT)
                    .min(chunk_end - self.pos)
                    .min(next_excl - self.pos);
                self.extents.push(DataExtent::new(self.pos, len, node, off));
                self.pos += len;
                off += len;
            }
        }
    }
}

/// Rounds segments out to whole sectors and merges the ones that then touch.
fn aligned(segments: impl Iterator<Item = Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for s in segments {
        let a = s.offset / SECTOR_SIZE * SECTOR_SIZE;
        let b = (s.offset + s.len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        match out.last_mut() {
            Some(l) if l.offset + l.len >= a => l.len = l.len.max(b - l.offset),
            _ => out.push(Segment {
                offset: a,
                len: b - a,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_max_extent_and_exclusions() {
        let mb = 1u64 << 20;
        let mut a = DataAllocator::new(
            3 * mb,
            1 << 30,
            vec![Excluded {
                start: 64 * mb,
                len: 64 << 10,
            }],
        );
        a.place(1, Segments::Whole(129 * mb + 1));
        let e = &a.extents;
        assert_eq!(e[0].logical, 3 * mb);
        assert_eq!(e[0].size(), 61 * mb);
        assert_eq!(e[1].logical, 64 * mb + (64 << 10));
        assert_eq!(e[1].file_offset, 61 * mb);
        let total: u64 = e.iter().map(|x| x.size()).sum();
        assert_eq!(total, 129 * mb + 4096);
        assert!(e.iter().all(|x| x.size() <= MAX_EXTENT));
    }

    #[test]
    fn aligns_and_merges_segments() {
        let segs = [
            Segment {
                offset: 100,
                len: 10,
            },
            Segment {
                offset: 5000,
                len: 10,
            },
            Segment {
                offset: 10000,
                len: 1,
            },
        ];
        assert_eq!(
            aligned(segs.into_iter()),
            vec![Segment {
                offset: 0,
                len: 12288
            }]
        );
    }
}

//! Data placement: every regular file's data segments become extents packed
//! back to back in DATA chunks, in tree order, so a sequential read of the image
//! reads each source file once, front to back. With a base layout, unchanged
//! files keep their extents and new data fills the space the base freed
//! before the data area grows, so an update rewrites little of the image.

use super::base::{Base, BaseExtent};
use super::gaps::Gaps;
use super::space;
use crate::compress::Algorithm;
use crate::content::Piece;
use crate::format::SECTOR_SIZE;
use crate::source::{Segment, Segments, SourceTree};
use std::collections::BTreeMap;

/// Largest extent the kernel itself creates.
pub const MAX_EXTENT: u64 = 128 << 20;

/// One data extent: `size()` bytes on disk (a sector multiple, at most
/// `MAX_EXTENT`) at `logical`, holding the source bytes of `node` from
/// `file_offset`: as they are (zeros past the end of the file), or, with an
/// algorithm, `ram()` file bytes compressed. 32 bytes: there is one per
/// extent of every file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataExtent {
    pub logical: u64,
    pub file_offset: u64,
    pub node: u32,
    len: u32,
    ram: u32,
    pub algorithm: Option<Algorithm>,
}

impl DataExtent {
    pub fn new(logical: u64, len: u64, node: u32, file_offset: u64) -> DataExtent {
        let len = u32::try_from(len).expect("extents are at most MAX_EXTENT long");
        DataExtent {
            logical,
            file_offset,
            node,
            len,
            ram: len,
            algorithm: None,
        }
    }

    /// A compressed extent of `disk` bytes holding `ram` file bytes.
    pub fn compressed(
        logical: u64,
        disk: u64,
        ram: u32,
        node: u32,
        file_offset: u64,
        algorithm: Algorithm,
    ) -> DataExtent {
        DataExtent {
            logical,
            file_offset,
            node,
            len: u32::try_from(disk).expect("compressed extents are at most 128 KiB"),
            ram,
            algorithm: Some(algorithm),
        }
    }

    /// Bytes on disk.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// File bytes it holds (ram_bytes, num_bytes).
    pub fn ram(&self) -> u64 {
        self.ram as u64
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

impl Excluded {
    /// Whether `[a, a + len)` touches this range.
    pub fn overlaps(&self, a: u64, len: u64) -> bool {
        a < self.start + self.len && self.start < a + len
    }
}

/// Places extents: into the free space of a base layout's data chunks first
/// (lowest address first), then appended to the data area, cutting them at
/// chunk boundaries and around excluded ranges. Files unchanged since the
/// base keep their recorded extents, reserved before anything is placed.
pub struct DataAllocator {
    /// Where the appended data area starts.
    pub start: u64,
    /// End of the appended data so far.
    pub pos: u64,
    chunk_size: u64,
    excluded: Vec<Excluded>,
    /// Free space in the base's data chunks.
    gaps: Gaps,
    /// Unchanged files' recorded extents (reserved: not in `gaps`).
    reuse: BTreeMap<u32, Reserved>,
    /// Files whose reservations are still held, by placement rank.
    pending: BTreeMap<u64, u32>,
    /// Each node's fs tree (placement goes tree by tree); empty: one tree.
    tree_of: Vec<u16>,
    pub extents: Vec<DataExtent>,
    /// `extents.len()`, `pos` and the node placed at the last checkpoint.
    mark: (usize, u64, Option<u32>),
}

/// An unchanged file's recorded extents, reserved until its turn in
/// placement has passed: those it did not take (its pieces came out
/// otherwise, it became a copy of an earlier file, ...) are then free
/// again for the files after it.
struct Reserved {
    extents: Vec<BaseExtent>,
    used: Vec<bool>,
}

/// Where an update's data went, for the plan's summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Unchanged files (with data in extents) the base had.
    pub files_unchanged: u64,
    /// Bytes on disk of extents at their recorded places.
    pub kept: u64,
    /// Bytes of new or changed data in the base's free space.
    pub in_gaps: u64,
    /// Bytes of data after everything the base allocated.
    pub appended: u64,
    /// Free bytes left in the base's data chunks.
    pub free_left: u64,
}

impl DataAllocator {
    pub fn new(start: u64, chunk_size: u64, excluded: Vec<Excluded>) -> Self {
        DataAllocator {
            start,
            pos: start,
            chunk_size,
            excluded,
            gaps: Gaps::new([], Vec::new(), SECTOR_SIZE),
            reuse: BTreeMap::new(),
            pending: BTreeMap::new(),
            tree_of: Vec::new(),
            extents: Vec::new(),
            mark: (0, start, None),
        }
    }

    /// Where `node` comes in placement order: tree by tree, in node (tree)
    /// order within each (inode numbers need not follow it).
    fn rank(&self, node: u32) -> u64 {
        let t = self.tree_of.get(node as usize).copied().unwrap_or(0) as u64;
        (t << 32) | node as u64
    }

    /// Starts placing `node`: the reservations of every file before it in
    /// placement order are over, and what they did not take is free again.
    /// Placing calls it; the content pass's export calls it before its
    /// checkpoint, so that taking a file back never takes back a release.
    pub fn begin(&mut self, node: u32) {
        let r = self.rank(node);
        while let Some((&k, &n)) = self.pending.first_key_value() {
            if k >= r {
                break;
            }
            self.pending.remove(&k);
            self.release(n);
        }
    }

    /// Ends every reservation (placement is over).
    pub fn finish(&mut self) {
        let rest: Vec<u32> = std::mem::take(&mut self.pending).into_values().collect();
        for n in rest {
            self.release(n);
        }
    }

    fn release(&mut self, node: u32) {
        let Some(r) = self.reuse.get(&node) else {
            return;
        };
        let free: Vec<(u64, u64)> = r
            .extents
            .iter()
            .zip(&r.used)
            .filter(|(_, &u)| !u)
            .map(|(e, _)| (e.logical, e.end()))
            .collect();
        for (a, b) in free {
            self.gaps.put(a, b);
        }
    }

    /// The allocator of an image of `tree`: a fresh data area from
    /// `DATA_START`, or, with a base layout, the base's data chunks (its
    /// unchanged files' extents reserved) and a data area after everything
    /// the base allocated.
    pub fn for_tree(tree: &SourceTree, base: Option<&Base>, tree_of: &[u16]) -> Self {
        let Some(base) = base else {
            let start = space::DATA_START;
            return DataAllocator::new(start, space::DATA_CHUNK_MAX, space::data_exclusions(start));
        };
        let mut a = DataAllocator::new(
            base.end,
            space::DATA_CHUNK_MAX,
            space::data_exclusions(base.end),
        );
        let mut free = Vec::new();
        for c in &base.data_chunks {
            let mut pos = c.logical;
            for x in c.excluded() {
                free.push((pos, x.start.max(pos)));
                pos = pos.max(x.start + x.len);
            }
            free.push((pos, c.end().max(pos)));
        }
        a.gaps = Gaps::new(
            free,
            base.data_chunks.iter().map(|c| c.logical).collect(),
            SECTOR_SIZE,
        );
        for (node, extents) in base.matches(tree) {
            // A checked base never claims a byte twice or outside its data
            // chunks; a file whose extents are not all free keeps none.
            if extents.iter().all(|e| a.gaps.is_free(e.logical, e.end())) {
                for e in extents {
                    a.gaps.take(e.logical, e.end());
                }
                a.reuse.insert(
                    node,
                    Reserved {
                        extents: extents.to_vec(),
                        used: vec![false; extents.len()],
                    },
                );
            }
        }
        a.tree_of = tree_of.to_vec();
        let pending: BTreeMap<u64, u32> = a.reuse.keys().map(|&n| (a.rank(n), n)).collect();
        a.pending = pending;
        a
    }

    /// Free bytes left in the base's data chunks.
    pub fn free_in_base(&self) -> u64 {
        self.gaps.total()
    }

    /// Where the extents placed so far went.
    pub fn update_stats(&self) -> UpdateStats {
        let mut st = UpdateStats {
            files_unchanged: self
                .reuse
                .values()
                .filter(|r| r.used.iter().any(|&u| u))
                .count() as u64,
            free_left: self.gaps.total(),
            ..UpdateStats::default()
        };
        for e in &self.extents {
            let kept = self
                .recorded_at(e.node, e.file_offset)
                .is_some_and(|(_, b)| b.logical == e.logical);
            match () {
                _ if kept => st.kept += e.size(),
                _ if e.logical >= self.start => st.appended += e.size(),
                _ => st.in_gaps += e.size(),
            }
        }
        st
    }

    /// Places one file's data segments.
    pub fn place(&mut self, node: u32, segments: Segments<'_>) {
        self.begin(node);
        for seg in aligned(segments.iter()) {
            self.place_raw(node, seg);
        }
    }

    /// Places the pieces the content pass made of one file, one extent per
    /// piece (so placing them one at a time, as the content pass meets them,
    /// gives the same extents): a raw piece as an ordinary extent (split at a
    /// chunk end or excluded range), a compressed one whole, moved past a
    /// chunk end or an excluded range it would cross.
    pub fn place_pieces(&mut self, node: u32, pieces: &[Piece]) {
        self.begin(node);
        for p in pieces {
            match p.algorithm {
                None => self.place_raw(
                    node,
                    Segment {
                        offset: p.file_offset,
                        len: p.ram as u64,
                    },
                ),
                Some(a) => {
                    let disk = p.disk();
                    let kept = self.recorded_at(node, p.file_offset).filter(|&(_, e)| {
                        e.ram == p.ram as u64 && e.disk == disk && e.algorithm == Some(a)
                    });
                    let at = match kept {
                        Some((k, e)) => {
                            let at = e.logical;
                            self.mark_used(node, k..k + 1);
                            at
                        }
                        None => match self.gaps.first_fit(disk) {
                            Some((s, _)) => {
                                self.gaps.take(s, s + disk);
                                s
                            }
                            None => {
                                let at = self.fit(disk);
                                self.pos = at + disk;
                                at
                            }
                        },
                    };
                    self.extents.push(DataExtent::compressed(
                        at,
                        disk,
                        p.ram,
                        node,
                        p.file_offset,
                        a,
                    ));
                }
            }
        }
    }

    /// Marks the state `rollback` returns to: the start of `node`.
    pub fn checkpoint(&mut self, node: u32) {
        self.mark = (self.extents.len(), self.pos, Some(node));
        self.gaps.checkpoint();
    }

    /// Takes back everything placed since the checkpoint (the file it was
    /// set for is not stored after all), and returns it.
    pub fn rollback(&mut self) -> Vec<DataExtent> {
        let undone = self.extents.split_off(self.mark.0);
        self.pos = self.mark.1;
        self.gaps.rollback();
        if let Some(r) = self.mark.2.and_then(|n| self.reuse.get_mut(&n)) {
            r.used.fill(false);
        }
        undone
    }

    fn mark_used(&mut self, node: u32, k: std::ops::Range<usize>) {
        if let Some(r) = self.reuse.get_mut(&node) {
            r.used[k].fill(true);
        }
    }

    /// The first position from `pos` where `len` bytes fit without crossing
    /// a chunk end or an excluded range.
    fn fit(&mut self, len: u64) -> u64 {
        loop {
            if let Some(x) = self.excluded.iter().find(|x| x.overlaps(self.pos, len)) {
                self.pos = x.start + x.len;
                continue;
            }
            let chunk_end =
                self.start + ((self.pos - self.start) / self.chunk_size + 1) * self.chunk_size;
            if self.pos + len > chunk_end {
                self.pos = chunk_end;
                continue;
            }
            return self.pos;
        }
    }

    /// The recorded extent of an unchanged file that starts at
    /// `file_offset` (a checked record's extents are in file order).
    fn recorded_at(&self, node: u32, file_offset: u64) -> Option<(usize, &BaseExtent)> {
        let r = &self.reuse.get(&node)?.extents;
        let i = r.partition_point(|e| e.file_offset < file_offset);
        r.get(i)
            .filter(|e| e.file_offset == file_offset)
            .map(|e| (i, e))
    }

    /// The recorded raw extents of an unchanged file that hold exactly
    /// `seg` of it, back to back in the file.
    fn kept_raw(&self, node: u32, seg: Segment) -> Option<std::ops::Range<usize>> {
        let r = &self.reuse.get(&node)?.extents;
        let first = r.partition_point(|e| e.file_offset < seg.offset);
        r.get(first).filter(|e| e.file_offset == seg.offset)?;
        let mut at = seg.offset;
        let end = seg.offset + seg.len;
        for (k, e) in r[first..].iter().enumerate() {
            if e.algorithm.is_some() || e.file_offset != at {
                return None;
            }
            at += e.disk;
            if at == end {
                return Some(first..first + k + 1);
            }
            if at > end {
                return None;
            }
        }
        None
    }

    fn place_raw(&mut self, node: u32, seg: Segment) {
        if let Some(k) = self.kept_raw(node, seg) {
            let r = &self.reuse[&node].extents[k.clone()];
            let v: Vec<DataExtent> = r
                .iter()
                .map(|e| DataExtent::new(e.logical, e.disk, node, e.file_offset))
                .collect();
            self.extents.extend(v);
            self.mark_used(node, k);
            return;
        }
        let mut off = seg.offset;
        let end = seg.offset + seg.len;
        while off < end {
            if let Some((s, e)) = self.gaps.first_fit(SECTOR_SIZE) {
                let len = (end - off).min(MAX_EXTENT).min(e - s);
                self.gaps.take(s, s + len);
                self.extents.push(DataExtent::new(s, len, node, off));
                off += len;
                continue;
            }
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

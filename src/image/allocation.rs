//! Which bytes of the image are *mapped*: the ones a writer of the image must
//! put on the target. That is every byte btrfs reads before it has written
//! it: the superblock copies, every tree block (both copies with DUP
//! metadata), every data extent, and the first MiB (zeros but for the
//! primary superblock), which wipes whatever signatures (a partition table,
//! an old filesystem) an SD card or disk carried before; blkid otherwise
//! finds two filesystems. Everything else is a hole: it reads as zeros, and
//! btrfs never reads it before writing it (free space in block groups is
//! known from the free-space tree, unallocated space from the device tree),
//! so a flasher may leave whatever the target holds there.
//!
//! One map answers every frontend that reports holes: `bmap` files (mapped
//! ranges), NBD `base:allocation`, and `SEEK_DATA`/`SEEK_HOLE` on `fs.img`,
//! so they agree block for block. Runs are 4 KiB aligned.

use crate::format::SECTOR_SIZE;
use crate::plan::space::{RegionKind, MIB};
use crate::plan::Plan;

/// The leading range written even though it is zeros (see the module doc).
pub const WIPED_HEAD: u64 = MIB;

/// A mapped range `[start, end)` of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub end: u64,
}

impl Run {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// The sorted, disjoint, coalesced mapped runs of an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocationMap {
    runs: Vec<Run>,
    size: u64,
}

impl AllocationMap {
    /// The map of `plan`'s image.
    pub fn of(plan: &Plan) -> AllocationMap {
        let size = plan.total_bytes;
        let mut runs: Vec<Run> = Vec::new();
        let mut add = |start: u64, end: u64| {
            let start = start / SECTOR_SIZE * SECTOR_SIZE;
            let end = end.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
            let end = end.min(size);
            if start < end {
                runs.push(Run { start, end });
            }
        };
        add(0, WIPED_HEAD.min(size));
        for r in &plan.regions {
            if let RegionKind::Super(_) = r.kind {
                add(r.start, r.end());
            }
        }
        // Both walks are sorted by logical address, as are the chunks: one
        // pass over the chunks for each.
        let nodesize = plan.nodesize as u64;
        let mut ci = 0;
        for b in &plan.blocks {
            while plan.chunks[ci].end() <= b.logical {
                ci += 1;
            }
            let c = &plan.chunks[ci];
            debug_assert!(c.logical <= b.logical && b.logical + nodesize <= c.end());
            for &s in &c.stripes {
                let p = s + (b.logical - c.logical);
                add(p, p + nodesize);
            }
        }
        let data: Vec<&crate::plan::space::Chunk> = plan
            .chunks
            .iter()
            .filter(|c| c.ty & crate::format::BLOCK_GROUP_DATA != 0)
            .collect();
        let mut ci = 0;
        for e in plan.by_logical.iter().map(|&i| &plan.extents[i as usize]) {
            // An extent may cross from one data chunk into the next.
            let mut at = e.logical;
            while at < e.end() {
                while data[ci].end() <= at {
                    ci += 1;
                }
                let c = data[ci];
                let upto = e.end().min(c.end());
                for &s in &c.stripes {
                    add(s + (at - c.logical), s + (upto - c.logical));
                }
                at = upto;
            }
        }
        runs.sort_by_key(|r| r.start);
        let mut merged: Vec<Run> = Vec::with_capacity(runs.len().min(1 << 16));
        for r in runs {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged.shrink_to_fit();
        AllocationMap { runs: merged, size }
    }

    /// The mapped runs, sorted.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Mapped bytes in all.
    pub fn mapped_bytes(&self) -> u64 {
        self.runs.iter().map(Run::len).sum()
    }

    /// Whether `offset` is mapped, and where the run of that kind holding it
    /// ends (at most the image size). `offset` must be below the image size.
    pub fn at(&self, offset: u64) -> (bool, u64) {
        debug_assert!(offset < self.size);
        let i = self.runs.partition_point(|r| r.end <= offset);
        match self.runs.get(i) {
            Some(r) if r.start <= offset => (true, r.end),
            Some(r) => (false, r.start),
            None => (false, self.size),
        }
    }

    /// First mapped offset at or after `offset`, if any (SEEK_DATA).
    pub fn next_mapped(&self, offset: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.end <= offset);
        self.runs.get(i).map(|r| r.start.max(offset))
    }

    /// First unmapped offset at or after `offset` (SEEK_HOLE); the image's end
    /// counts as one.
    pub fn next_hole(&self, offset: u64) -> u64 {
        if offset >= self.size {
            return self.size;
        }
        match self.at(offset) {
            (true, end) => end,
            (false, _) => offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::generated::Entry;
    use crate::source::Fill;
    use crate::Options;
    use std::collections::BTreeMap;

    fn plan(opts: &Options) -> Plan {
        let name = |s: &str| s.as_bytes().to_vec();
        let many: BTreeMap<Vec<u8>, Entry> = (0..300)
            .map(|i| {
                (
                    name(&format!("f{i:04}")),
                    Entry::file(4097, Fill::Random(i)),
                )
            })
            .collect();
        let root = Entry::dir(BTreeMap::from([
            (name("small"), Entry::file(3000, Fill::Random(1))),
            (name("big"), Entry::file(5 << 20, Fill::Random(2))),
            (name("text"), Entry::file(300 << 10, Fill::Text(3))),
            (name("many"), Entry::dir(many)),
        ]));
        crate::plan_generated(&root, opts).expect("a small tree plans")
    }

    /// Every hole reads as zeros, every run is aligned and inside the image,
    /// and every tree block's copies and every extent are mapped.
    fn check(opts: &Options) {
        let p = plan(opts);
        let map = AllocationMap::of(&p);
        let image = crate::Image::new(p);
        let p = image.plan();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < image.size() {
            let (mapped, end) = map.at(off);
            assert!(end > off && end <= image.size());
            if !mapped {
                let mut o = off;
                while o < end {
                    let n = ((end - o) as usize).min(buf.len());
                    image.read_at(o, &mut buf[..n]).expect("reads");
                    assert!(buf[..n].iter().all(|&b| b == 0), "hole at {o} is not zeros");
                    o += n as u64;
                }
            }
            off = end;
        }
        for w in map.runs().windows(2) {
            assert!(w[0].end < w[1].start, "runs are coalesced");
        }
        for r in map.runs() {
            assert_eq!(r.start % SECTOR_SIZE, 0);
            assert!(r.end % SECTOR_SIZE == 0 || r.end == image.size());
        }
        assert_eq!(map.at(0), (true, map.runs()[0].end));
        for b in &p.blocks {
            let c = p
                .chunks
                .iter()
                .find(|c| c.logical <= b.logical && b.logical < c.end());
            for &s in &c.expect("in a chunk").stripes {
                let at = s + b.logical - c.expect("in a chunk").logical;
                assert!(map.at(at).0 && map.at(at).1 >= at + p.nodesize as u64);
            }
        }
        for e in p.extents.iter() {
            assert!(map.at(e.logical).0, "data chunks map one to one");
        }
        assert_eq!(map.next_hole(image.size()), image.size());
        assert_eq!(map.next_mapped(image.size()), None);
    }

    #[test]
    fn holes_read_as_zeros_dup() {
        check(&Options::default());
    }

    #[test]
    fn holes_read_as_zeros_single_compressed() {
        check(&Options {
            metadata_dup: false,
            compression: crate::compress::Compression::parse("zstd").expect("zstd parses"),
            extra_space: 64 << 20,
            ..Options::default()
        });
    }
}

//! Free space inside the data chunks an image keeps from its base layout:
//! a canonical set of maximal free ranges (never merged across a chunk
//! boundary, since no extent may cross one), handed out first fit, lowest
//! address first, so that the same base and the same files always give the
//! same placement.
//!
//! Changes since the last `checkpoint` can be taken back exactly (a file
//! the content pass wrote and then found to equal an earlier one): the set
//! is canonical, so putting the taken ranges back restores it.

use std::collections::BTreeMap;

/// Sizes, in sectors, up to which first-fit keeps a cursor. Compressed
/// extents are at most 128 KiB on disk (32 sectors).
const CURSORS: usize = 32;

#[derive(Clone, Debug)]
pub struct Gaps {
    /// start -> end of each free range.
    free: BTreeMap<u64, u64>,
    /// Chunk starts: ranges are never merged across them.
    bounds: Vec<u64>,
    /// `cursor[s - 1]`: no free range below it is `s` sectors long or more
    /// (taking space only shrinks ranges, so first fit never moves down).
    cursor: [u64; CURSORS],
    /// Ranges as they were before each change since the checkpoint:
    /// (start, Some(end)) existed, (start, None) did not. None before the
    /// first checkpoint: planning never takes anything back, so it keeps no
    /// journal.
    undo: Option<Vec<(u64, Option<u64>)>>,
    sector: u64,
}

impl Gaps {
    /// Free `ranges` (sorted or not; they must not overlap), never merged
    /// across any of `bounds`.
    pub fn new(
        ranges: impl IntoIterator<Item = (u64, u64)>,
        bounds: Vec<u64>,
        sector: u64,
    ) -> Gaps {
        let mut g = Gaps {
            free: BTreeMap::new(),
            bounds,
            cursor: [0; CURSORS],
            undo: None,
            sector,
        };
        g.bounds.sort_unstable();
        for (s, e) in ranges {
            if s < e {
                g.put(s, e);
            }
        }
        g
    }

    /// Free bytes.
    pub fn total(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    /// The free ranges, lowest first.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.free.iter().map(|(&s, &e)| (s, e))
    }

    fn set(&mut self, start: u64, end: Option<u64>) {
        let before = match end {
            Some(e) => self.free.insert(start, e),
            None => self.free.remove(&start),
        };
        if let Some(u) = &mut self.undo {
            u.push((start, before));
        }
    }

    /// Whether `a` and `b` lie in the same chunk (a range may end at `b`).
    fn same_chunk(&self, a: u64, b: u64) -> bool {
        let i = self.bounds.partition_point(|&x| x <= a);
        self.bounds.get(i).is_none_or(|&next| b < next)
    }

    /// Adds the free range [start, end) (which must not be free), merged
    /// with its neighbours in the same chunk.
    pub fn put(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.free.range(..start).next_back() {
            if e == start && self.same_chunk(s, start) {
                start = s;
                self.set(s, None);
            }
        }
        if let Some(&e) = self.free.get(&end) {
            if self.same_chunk(start, end) {
                self.set(end, None);
                end = e;
            }
        }
        self.set(start, Some(end));
        for c in &mut self.cursor {
            *c = (*c).min(start);
        }
    }

    /// Takes [start, end) out, which must be free.
    pub fn take(&mut self, start: u64, end: u64) {
        let (&s, &e) = self
            .free
            .range(..=start)
            .next_back()
            .filter(|(_, &e)| e >= end)
            .expect("only free space is taken");
        self.set(s, None);
        if s < start {
            self.set(s, Some(start));
        }
        if end < e {
            self.set(end, Some(e));
        }
    }

    /// Whether all of [start, end) is free.
    pub fn is_free(&self, start: u64, end: u64) -> bool {
        self.free
            .range(..=start)
            .next_back()
            .is_some_and(|(_, &e)| e >= end)
    }

    /// The lowest free range at least `len` bytes long: its start and end.
    pub fn first_fit(&mut self, len: u64) -> Option<(u64, u64)> {
        if self.free.is_empty() {
            return None;
        }
        let sectors = (len / self.sector).max(1) as usize;
        let slot = sectors.min(CURSORS) - 1;
        let from = self.cursor[slot];
        let found = self
            .free
            .range(from..)
            .map(|(&s, &e)| (s, e))
            .find(|(s, e)| e - s >= len);
        // Only a size with a cursor of its own may move it.
        if sectors <= CURSORS {
            self.cursor[slot] = found.map_or(u64::MAX, |(s, _)| s);
        }
        found
    }

    /// Marks the state that `rollback` returns to.
    pub fn checkpoint(&mut self) {
        self.undo = Some(Vec::new());
    }

    /// Undoes every change since the last checkpoint.
    pub fn rollback(&mut self) {
        let undo = self.undo.as_mut().expect("rollback follows a checkpoint");
        while let Some((start, before)) = undo.pop() {
            match before {
                Some(e) => {
                    self.free.insert(start, e);
                    for c in &mut self.cursor {
                        *c = (*c).min(start);
                    }
                }
                None => {
                    self.free.remove(&start);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 4096;

    fn ranges(g: &Gaps) -> Vec<(u64, u64)> {
        g.ranges().collect()
    }

    #[test]
    fn merges_within_a_chunk_only() {
        let g = Gaps::new([(0, S), (S, 2 * S), (2 * S, 3 * S)], vec![2 * S], S);
        assert_eq!(ranges(&g), vec![(0, 2 * S), (2 * S, 3 * S)]);
    }

    #[test]
    fn first_fit_is_lowest_address_and_take_splits() {
        let mut g = Gaps::new([(0, S), (10 * S, 14 * S), (20 * S, 30 * S)], vec![], S);
        assert_eq!(g.first_fit(2 * S), Some((10 * S, 14 * S)));
        g.take(10 * S, 12 * S);
        assert_eq!(g.first_fit(2 * S), Some((12 * S, 14 * S)));
        g.take(12 * S, 14 * S);
        assert_eq!(g.first_fit(2 * S), Some((20 * S, 30 * S)));
        assert_eq!(g.first_fit(S), Some((0, S)));
        g.take(22 * S, 23 * S);
        assert_eq!(ranges(&g), vec![(0, S), (20 * S, 22 * S), (23 * S, 30 * S)]);
        assert_eq!(g.first_fit(100 * S), None);
        assert!(g.is_free(24 * S, 30 * S));
        assert!(!g.is_free(21 * S, 23 * S));
    }

    #[test]
    fn rollback_restores_exactly() {
        let mut g = Gaps::new([(0, 8 * S), (16 * S, 24 * S)], vec![], S);
        g.take(0, S);
        g.checkpoint();
        let before = ranges(&g);
        assert_eq!(g.first_fit(7 * S), Some((S, 8 * S)));
        g.take(S, 8 * S);
        g.take(16 * S, 17 * S);
        assert_eq!(g.first_fit(2 * S), Some((17 * S, 24 * S)));
        g.rollback();
        assert_eq!(ranges(&g), before);
        assert_eq!(g.first_fit(2 * S), Some((S, 8 * S)), "cursors go back too");
    }
}

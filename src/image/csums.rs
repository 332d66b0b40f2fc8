//! Data checksums recorded as data is served. The table is paged and a page
//! is allocated only when a sector in it is first checksummed, so a mount
//! that reads one block of a 3 TiB image holds one page (66 KiB with
//! crc32c), not 3 GiB of zeroed memory.
//!
//! A sector's checksum is kept as `size / 4` 32-bit words (little-endian
//! pieces of the stored bytes): one for crc32c, as many bytes per sector as
//! the checksum has whatever the algorithm, and nothing more.

use crate::format::{Csum, CsumType, CSUM_FIELD_SIZE};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Sectors per page: 64 MiB of data, 64 KiB of crc32c checksums (128 KiB
/// xxhash, 512 KiB sha256 or blake2).
const PAGE: usize = 16384;

struct Page {
    /// `words` words per sector.
    csums: Box<[AtomicU32]>,
    /// One bit per sector: its checksum is recorded.
    known: Box<[AtomicU64]>,
}

impl Page {
    fn new(words: usize) -> Page {
        Page {
            csums: (0..PAGE * words).map(|_| AtomicU32::new(0)).collect(),
            known: (0..PAGE / 64).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

pub struct CsumTable {
    pages: Box<[OnceLock<Box<Page>>]>,
    sectors: u64,
    csum: CsumType,
    /// 32-bit words per checksum.
    words: usize,
}

impl CsumTable {
    pub fn new(sectors: u64, csum: CsumType) -> CsumTable {
        let pages = (sectors as usize).div_ceil(PAGE);
        CsumTable {
            pages: (0..pages).map(|_| OnceLock::new()).collect(),
            sectors,
            csum,
            words: csum.size() / 4,
        }
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn csum_type(&self) -> CsumType {
        self.csum
    }

    fn page(&self, i: u64) -> Option<(&Page, usize)> {
        let page = self.pages.get(i as usize / PAGE)?.get()?;
        Some((page, i as usize % PAGE))
    }

    /// Whether the checksum of sector `i` is recorded.
    pub fn is_known(&self, i: u64) -> bool {
        self.page(i).is_some_and(|(page, j)| {
            page.known[j / 64].load(Ordering::Acquire) & (1u64 << (j % 64)) != 0
        })
    }

    /// The checksum of sector `i` (its first `size()` bytes), if recorded.
    pub fn get(&self, i: u64) -> Option<Csum> {
        if !self.is_known(i) {
            return None;
        }
        let (page, j) = self.page(i)?;
        let mut out = [0u8; CSUM_FIELD_SIZE];
        let words = &page.csums[j * self.words..(j + 1) * self.words];
        for (o, w) in out.chunks_exact_mut(4).zip(words) {
            o.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        Some(out)
    }

    /// Records the checksum of sector `i` (the same value every time it is
    /// computed, so racing writers agree). Only its first `size()` bytes
    /// are kept.
    pub fn set(&self, i: u64, csum: &Csum) {
        let Some(slot) = self.pages.get(i as usize / PAGE) else {
            return;
        };
        let page = slot.get_or_init(|| Box::new(Page::new(self.words)));
        let j = i as usize % PAGE;
        let words = &page.csums[j * self.words..(j + 1) * self.words];
        for (w, b) in words.iter().zip(csum.chunks_exact(4)) {
            w.store(
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                Ordering::Release,
            );
        }
        page.known[j / 64].fetch_or(1 << (j % 64), Ordering::AcqRel);
    }

    /// Computes and records the checksum of sector `i` from its bytes.
    pub fn record(&self, i: u64, sector: &[u8]) {
        self.set(i, &self.csum.compute(sector));
    }

    /// Pages allocated so far (for memory accounting and tests).
    pub fn pages_allocated(&self) -> usize {
        self.pages.iter().filter(|p| p.get().is_some()).count()
    }

    /// Bytes of one allocated page.
    pub fn page_bytes(&self) -> usize {
        PAGE * self.words * 4 + PAGE / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(v: u8) -> Csum {
        let mut x = [0u8; CSUM_FIELD_SIZE];
        x.iter_mut().enumerate().for_each(|(k, b)| *b = v ^ k as u8);
        x
    }

    #[test]
    fn pages_are_allocated_on_first_write_only() {
        // 3 TiB of data.
        let t = CsumTable::new(3 << 28, CsumType::Crc32c);
        assert_eq!(t.pages_allocated(), 0);
        assert_eq!(t.get(12345), None);
        t.set(12345, &c(7));
        t.set((3 << 28) - 1, &c(9));
        assert_eq!(
            t.get(12345).map(|x| x[..4].to_vec()),
            Some(c(7)[..4].to_vec())
        );
        assert_eq!(t.get(12346), None);
        assert_eq!(t.get((3 << 28) - 1).map(|x| x[0]), Some(9));
        assert_eq!(t.pages_allocated(), 2);
        // Out of range is ignored, never a panic.
        t.set(3 << 28, &c(1));
        assert_eq!(t.get(3 << 28), None);
        assert_eq!(t.page_bytes(), 64 * 1024 + 2048);
    }

    #[test]
    fn keeps_exactly_the_checksum_bytes() {
        for csum in CsumType::ALL {
            let t = CsumTable::new(100_000, csum);
            for i in [0u64, 1, 16383, 16384, 99_999] {
                t.set(i, &c(i as u8));
            }
            for i in [0u64, 1, 16383, 16384, 99_999] {
                let got = t.get(i).expect("recorded");
                let n = csum.size();
                assert_eq!(got[..n], c(i as u8)[..n], "{csum:?} {i}");
                assert!(got[n..].iter().all(|&b| b == 0), "{csum:?} {i}");
            }
            assert!(!t.is_known(2));
            assert_eq!(t.page_bytes(), 16384 * csum.size() + 2048);
            t.record(5, &[0u8; 4096]);
            assert_eq!(t.get(5), Some(csum.compute(&[0u8; 4096])));
        }
    }
}

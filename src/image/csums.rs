//! Data checksums recorded as data is served. The table is paged and a page
//! is allocated only when a sector in it is first checksummed, so a mount
//! that reads one block of a 3 TiB image holds one page (66 KiB), not 3 GiB
//! of zeroed memory.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Sectors per page: 64 MiB of data, 64 KiB of checksums.
const PAGE: usize = 16384;

struct Page {
    csums: Box<[AtomicU32]>,
    /// One bit per sector: its checksum is recorded.
    known: Box<[AtomicU64]>,
}

impl Page {
    fn new() -> Page {
        Page {
            csums: (0..PAGE).map(|_| AtomicU32::new(0)).collect(),
            known: (0..PAGE / 64).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

pub struct CsumTable {
    pages: Box<[OnceLock<Box<Page>>]>,
    sectors: u64,
}

impl CsumTable {
    pub fn new(sectors: u64) -> CsumTable {
        let pages = (sectors as usize).div_ceil(PAGE);
        CsumTable {
            pages: (0..pages).map(|_| OnceLock::new()).collect(),
            sectors,
        }
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The checksum of sector `i`, if it was recorded.
    pub fn get(&self, i: u64) -> Option<u32> {
        let page = self.pages.get(i as usize / PAGE)?.get()?;
        let j = i as usize % PAGE;
        let bit = 1u64 << (j % 64);
        (page.known[j / 64].load(Ordering::Acquire) & bit != 0)
            .then(|| page.csums[j].load(Ordering::Acquire))
    }

    /// Records the checksum of sector `i` (the same value every time it is
    /// computed, so racing writers agree).
    pub fn set(&self, i: u64, csum: u32) {
        let Some(slot) = self.pages.get(i as usize / PAGE) else {
            return;
        };
        let page = slot.get_or_init(|| Box::new(Page::new()));
        let j = i as usize % PAGE;
        page.csums[j].store(csum, Ordering::Release);
        page.known[j / 64].fetch_or(1 << (j % 64), Ordering::AcqRel);
    }

    /// Pages allocated so far (for memory accounting and tests).
    pub fn pages_allocated(&self) -> usize {
        self.pages.iter().filter(|p| p.get().is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_allocated_on_first_write_only() {
        // 3 TiB of data.
        let t = CsumTable::new(3 << 28);
        assert_eq!(t.pages_allocated(), 0);
        assert_eq!(t.get(12345), None);
        t.set(12345, 7);
        t.set((3 << 28) - 1, 9);
        assert_eq!(t.get(12345), Some(7));
        assert_eq!(t.get(12346), None);
        assert_eq!(t.get((3 << 28) - 1), Some(9));
        assert_eq!(t.pages_allocated(), 2);
        // Out of range is ignored, never a panic.
        t.set(3 << 28, 1);
        assert_eq!(t.get(3 << 28), None);
    }
}

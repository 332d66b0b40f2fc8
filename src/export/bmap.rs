//! `export --bmap FILE`: a block map (bmaptool's format 2.0) of the image,
//! so that `bmaptool copy` writes only the mapped blocks and checks each
//! range's SHA-256 as it goes.
//!
//! What is mapped is `Image::allocation()`, the one map that fs.img's
//! `SEEK_DATA`/`SEEK_HOLE` also report: superblocks, every tree block copy,
//! data extents and the wiped first MiB. Everything else may keep whatever
//! the target held, because btrfs never reads it before writing it.
//!
//! The hashes are computed from the bytes the export produces anyway, in
//! the same pass: a range's hash needs its bytes in order, and with
//! `--zstd` the image is read by parallel workers, one frame each. So
//! every mapped run is cut at a fixed grid (`GRID`) and each frame covers
//! whole grid cells (frames start at multiples of their power-of-two
//! length); a worker then hashes the ranges of its own frame. The grid
//! also makes the bmap depend on the image alone: a plain file, stdout,
//! `--zstd` and any `--threads` give the same bytes.
//!
//! Three pure parts: `Layout` (the ranges), `Hasher` (fed the image's
//! bytes in order, it hashes the ranges it covers) and `render` (the XML).

use crate::image::allocation::Run;
use quick_xml::events::{BytesDecl, BytesStart, BytesText, Event};
use quick_xml::Writer;
use sha2::{Digest as _, Sha256};
use std::io;

/// bmaptool's block size: ranges are numbered in 4 KiB blocks.
pub const BLOCK_SIZE: u64 = 4096;

/// No bmap range crosses a multiple of this (see the module doc). 8 MiB is
/// the shortest `--zstd` frame, so every frame covers whole cells; it makes
/// a range of mapped data at most 2,048 blocks, which costs one line of
/// about 120 bytes per 8 MiB of data.
pub const GRID: u64 = 8 << 20;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// One bmap range: image bytes `[start, end)`, `start` block aligned, `end`
/// block aligned or the image's end; never across a `GRID` boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    /// First block number (bmaptool's inclusive numbering).
    pub fn first_block(&self) -> u64 {
        self.start / BLOCK_SIZE
    }

    /// Last block number, inclusive.
    pub fn last_block(&self) -> u64 {
        (self.end - 1) / BLOCK_SIZE
    }

    pub fn blocks(&self) -> u64 {
        self.last_block() - self.first_block() + 1
    }
}

/// The ranges of a bmap: the image's mapped runs cut at the grid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    size: u64,
    ranges: Vec<Range>,
}

impl Layout {
    /// The layout of an image of `size` bytes whose mapped runs are `runs`
    /// (sorted, disjoint, as `AllocationMap::runs`).
    pub fn new(runs: &[Run], size: u64) -> Layout {
        let mut ranges = Vec::with_capacity(runs.len());
        for r in runs {
            let (mut at, end) = (r.start, r.end.min(size));
            while at < end {
                let cell_end = (at / GRID + 1) * GRID;
                let upto = end.min(cell_end);
                ranges.push(Range {
                    start: at,
                    end: upto,
                });
                at = upto;
            }
        }
        Layout { size, ranges }
    }

    /// The layout of `image`.
    pub fn of(image: &crate::Image) -> Layout {
        Layout::new(image.allocation().runs(), image.size())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    /// Blocks of the image, the last one possibly partial (BlocksCount).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }

    /// Blocks in the ranges (MappedBlocksCount).
    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(Range::blocks).sum()
    }

    /// A hasher for the ranges that lie inside `[start, end)`: a frame of
    /// whole grid cells, or the whole image. A range only partly inside is
    /// left to nobody, and `Digests::add` then reports the gap.
    pub fn hasher(&self, start: u64, end: u64) -> Hasher<'_> {
        let from = self.ranges.partition_point(|r| r.start < start);
        let to = from + self.ranges[from..].partition_point(|r| r.end <= end);
        Hasher {
            ranges: &self.ranges[from..to],
            first: from,
            pos: start,
            sha: Sha256::new(),
            digests: Vec::with_capacity(to - from),
        }
    }
}

/// Hashes the ranges of one frame from the image bytes, fed in order.
pub struct Hasher<'a> {
    ranges: &'a [Range],
    /// Index (in the layout) of `ranges[0]`.
    first: usize,
    /// Everything before this offset is accounted for.
    pos: u64,
    /// The state of range `digests.len()`.
    sha: Sha256,
    digests: Vec<Digest>,
}

/// Zeros fed to a range for a gap in the input.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl Hasher<'_> {
    /// Takes the image bytes at `offset`. Offsets must not go back; bytes
    /// before a gap's end that were never given are zeros (the export skips
    /// ranges the image knows to be zero, such as most of the first MiB).
    pub fn feed(&mut self, offset: u64, bytes: &[u8]) {
        self.advance(offset, None);
        let skip = self.pos.saturating_sub(offset).min(bytes.len() as u64) as usize;
        self.advance(
            offset + bytes.len() as u64,
            Some((offset + skip as u64, &bytes[skip..])),
        );
    }

    /// The parts of `[start, end)` that ranges still want, in order: what a
    /// feeder that skipped producing them must fetch elsewhere.
    pub fn wanted(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let start = start.max(self.pos);
        self.ranges[self.digests.len()..]
            .iter()
            .take_while(move |r| r.start < end)
            .map(move |r| (r.start.max(start), r.end.min(end)))
            .filter(|(a, b)| a < b)
    }

    /// Moves the position to `upto`, hashing the range bytes on the way
    /// from `data` (which starts at its offset and reaches `upto`) or, when
    /// `None`, zeros.
    fn advance(&mut self, upto: u64, data: Option<(u64, &[u8])>) {
        if upto <= self.pos {
            return;
        }
        while let Some(r) = self.ranges.get(self.digests.len()) {
            if r.start >= upto {
                break;
            }
            let (lo, hi) = (r.start.max(self.pos), r.end.min(upto));
            if lo < hi {
                match data {
                    Some((base, bytes)) => {
                        self.sha
                            .update(&bytes[(lo - base) as usize..(hi - base) as usize]);
                    }
                    None => {
                        let mut left = hi - lo;
                        while left > 0 {
                            let n = left.min(ZEROS.len() as u64) as usize;
                            self.sha.update(&ZEROS[..n]);
                            left -= n as u64;
                        }
                    }
                }
            }
            if hi < r.end {
                break;
            }
            self.digests.push(self.sha.finalize_reset().into());
            self.pos = r.end;
        }
        self.pos = self.pos.max(upto);
    }

    /// The digests of every range of the frame; what was not fed is zeros.
    pub fn finish(mut self) -> Hashed {
        self.advance(u64::MAX, None);
        Hashed {
            first: self.first,
            digests: self.digests,
        }
    }
}

/// The digests of consecutive ranges, from range `first` on.
#[derive(Debug)]
pub struct Hashed {
    pub first: usize,
    pub digests: Vec<Digest>,
}

/// Digests of a layout's ranges, collected frame by frame in order.
#[derive(Debug, Default)]
pub struct Digests(Vec<Digest>);

impl Digests {
    /// Appends a frame's digests; they must continue where the last ended.
    pub fn add(&mut self, h: Hashed) -> io::Result<()> {
        if h.first != self.0.len() {
            return Err(io::Error::other(format!(
                "internal error: bmap range {} hashed out of order",
                self.0.len().min(h.first)
            )));
        }
        self.0.extend(h.digests);
        Ok(())
    }

    pub fn as_slice(&self) -> &[Digest] {
        &self.0
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The bmap file of `layout` with the ranges' `digests`, laid out as
/// bmaptool 3.6 writes format 2.0 (values padded by one space, which its
/// reader strips). Its BmapFileChecksum is the SHA-256 of the file with
/// that value written as 64 zeros: bmaptool replaces the value it finds
/// with zeros and hashes the whole file.
pub fn render(layout: &Layout, digests: &[Digest]) -> io::Result<Vec<u8>> {
    if digests.len() != layout.ranges.len() {
        return Err(io::Error::other(format!(
            "internal error: {} of {} bmap ranges hashed",
            digests.len(),
            layout.ranges.len()
        )));
    }
    let zeros = "0".repeat(64);
    let draft = render_with(layout, digests, &zeros)?;
    let sum = hex(&Sha256::digest(&draft));
    render_with(layout, digests, &sum)
}

fn render_with(layout: &Layout, digests: &[Digest], file_checksum: &str) -> io::Result<Vec<u8>> {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 4);
    // bmaptool's spelling of the declaration, with a space before "?>".
    w.write_event(Event::Decl(BytesDecl::from_start(
        BytesStart::from_content("xml version=\"1.0\" ", 3),
    )))?;
    let value = |v: &str| BytesText::new(&format!(" {v} ")).into_owned();
    w.create_element("bmap")
        .with_attribute(("version", "2.0"))
        .write_inner_content(|w| {
            let fields = [
                ("ImageSize", layout.size.to_string()),
                ("BlockSize", BLOCK_SIZE.to_string()),
                ("BlocksCount", layout.blocks().to_string()),
                ("MappedBlocksCount", layout.mapped_blocks().to_string()),
                ("ChecksumType", "sha256".to_string()),
                ("BmapFileChecksum", file_checksum.to_string()),
            ];
            for (name, v) in fields {
                w.create_element(name).write_text_content(value(&v))?;
            }
            w.create_element("BlockMap").write_inner_content(|w| {
                for (r, d) in layout.ranges.iter().zip(digests) {
                    let blocks = match (r.first_block(), r.last_block()) {
                        (a, b) if a == b => a.to_string(),
                        (a, b) => format!("{a}-{b}"),
                    };
                    w.create_element("Range")
                        .with_attribute(("chksum", hex(d).as_str()))
                        .write_text_content(value(&blocks))?;
                }
                Ok(())
            })?;
            Ok(())
        })?;
    // The final newline.
    w.write_indent()?;
    Ok(w.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn run(start: u64, end: u64) -> Run {
        Run { start, end }
    }

    fn r(start: u64, end: u64) -> Range {
        Range { start, end }
    }

    #[test]
    fn runs_are_cut_at_the_grid() {
        let size = 40 * MIB + 1000;
        let l = Layout::new(
            &[
                run(0, MIB),
                run(7 * MIB, 17 * MIB + 4096),
                run(24 * MIB, 24 * MIB + 4096),
                run(40 * MIB, size),
            ],
            size,
        );
        assert_eq!(
            l.ranges(),
            &[
                r(0, MIB),
                r(7 * MIB, 8 * MIB),
                r(8 * MIB, 16 * MIB),
                r(16 * MIB, 17 * MIB + 4096),
                r(24 * MIB, 24 * MIB + 4096),
                r(40 * MIB, size),
            ]
        );
        for x in l.ranges() {
            assert_eq!(x.start / GRID, (x.end - 1) / GRID);
        }
        assert_eq!(l.blocks(), 40 * 256 + 1);
        assert_eq!(l.mapped_blocks(), 256 + 10 * 256 + 1 + 1 + 1);
        assert_eq!(l.ranges()[5].first_block(), 40 * 256);
        assert_eq!(l.ranges()[5].last_block(), 40 * 256);
    }

    fn image(size: usize, seed: u8) -> Vec<u8> {
        (0..size)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    }

    fn expected(l: &Layout, img: &[u8]) -> Vec<Digest> {
        l.ranges()
            .iter()
            .map(|x| Sha256::digest(&img[x.start as usize..x.end as usize]).into())
            .collect()
    }

    /// However the bytes come (any slicing, gaps of zeros left out, whole
    /// or frame by frame), the digests are the ranges' SHA-256.
    #[test]
    fn hasher_gives_each_ranges_sha256() {
        let size = 3 * GRID as usize + 5 * 4096;
        let mut img = image(size, 7);
        // A zero stretch (inside a range) that the feeder leaves out.
        let gap = (GRID as usize + 4096)..(GRID as usize + 300_000);
        img[gap.clone()].fill(0);
        let runs = [
            run(0, 4096),
            run(3 * 4096, GRID + 5 * 4096 + 0x10000),
            run(2 * GRID - 4096, 2 * GRID + 4096),
            run(3 * GRID, size as u64),
        ];
        let l = Layout::new(&runs, size as u64);
        let want = expected(&l, &img);
        for slice in [1usize, 4095, 4096, 65536, 1 << 20, size] {
            // Whole image, one feeder.
            let mut h = l.hasher(0, size as u64);
            let mut off = 0;
            while off < size {
                let n = slice.min(size - off);
                let piece = off..off + n;
                // Leave out what overlaps the zero gap.
                let a = piece.start.max(gap.start);
                let b = piece.end.min(gap.end);
                if a < b {
                    if piece.start < a {
                        h.feed(piece.start as u64, &img[piece.start..a]);
                    }
                    if b < piece.end {
                        h.feed(b as u64, &img[b..piece.end]);
                    }
                } else {
                    h.feed(off as u64, &img[piece]);
                }
                off += n;
            }
            let mut d = Digests::default();
            d.add(h.finish()).unwrap();
            assert_eq!(d.as_slice(), &want[..], "slices of {slice}");

            // Frame by frame (16 MiB frames), as the zstd workers do.
            let mut d = Digests::default();
            let frame = 2 * GRID as usize;
            for f in (0..size).step_by(frame) {
                let end = (f + frame).min(size);
                let mut h = l.hasher(f as u64, end as u64);
                for p in (f..end).step_by(slice) {
                    let e = (p + slice).min(end);
                    h.feed(p as u64, &img[p..e]);
                }
                d.add(h.finish()).unwrap();
            }
            assert_eq!(d.as_slice(), &want[..], "frames, slices of {slice}");
        }
    }

    /// Frames finished out of order, or a range no frame covered, are an
    /// error rather than a wrong bmap.
    #[test]
    fn digests_must_come_in_order() {
        let l = Layout::new(&[run(0, 4096), run(GRID, GRID + 4096)], 2 * GRID);
        let mut d = Digests::default();
        assert!(d.add(l.hasher(GRID, 2 * GRID).finish()).is_err());
        d.add(l.hasher(0, GRID).finish()).unwrap();
        d.add(l.hasher(GRID, 2 * GRID).finish()).unwrap();
        assert_eq!(d.as_slice().len(), 2);
        assert!(render(&l, &d.as_slice()[..1]).is_err());
        // A frame boundary inside a range: that range is nobody's.
        let l = Layout::new(&[run(0, 3 * 4096)], GRID);
        let mut d = Digests::default();
        d.add(l.hasher(0, 4096).finish()).unwrap();
        assert!(d.as_slice().is_empty());
    }

    #[test]
    fn wanted_lists_what_is_left_in_a_stretch() {
        let l = Layout::new(&[run(0, 4096), run(8192, 5 * 4096)], GRID);
        let mut h = l.hasher(0, GRID);
        h.feed(0, &[1; 10000]);
        let w: Vec<_> = h.wanted(0, 4 * 4096).collect();
        assert_eq!(w, vec![(10000, 4 * 4096)]);
        assert_eq!(h.wanted(6 * 4096, GRID).count(), 0);
    }

    fn text_of(rendered: &[u8]) -> String {
        String::from_utf8(rendered.to_vec()).unwrap()
    }

    /// The layout bmaptool writes, and a file checksum computed as its
    /// reader checks it: the value replaced by zeros, the file hashed.
    #[test]
    fn renders_bmaptool_format_2_0() {
        let size = GRID + 4096 * 3 + 100;
        let l = Layout::new(&[run(0, 4096), run(GRID, size)], size);
        let d = [[0xab; 32], [0x01; 32]];
        let out = render(&l, &d).unwrap();
        let text = text_of(&out);
        let sum = text
            .split("<BmapFileChecksum> ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap()
            .to_string();
        assert_eq!(sum.len(), 64);
        let zeroed = text.replacen(&sum, &"0".repeat(64), 1);
        assert_eq!(hex(&Sha256::digest(zeroed.as_bytes())), sum);
        let want = format!(
            "<?xml version=\"1.0\" ?>\n\
             <bmap version=\"2.0\">\n\
             \x20   <ImageSize> {size} </ImageSize>\n\
             \x20   <BlockSize> 4096 </BlockSize>\n\
             \x20   <BlocksCount> 2052 </BlocksCount>\n\
             \x20   <MappedBlocksCount> 5 </MappedBlocksCount>\n\
             \x20   <ChecksumType> sha256 </ChecksumType>\n\
             \x20   <BmapFileChecksum> {sum} </BmapFileChecksum>\n\
             \x20   <BlockMap>\n\
             \x20       <Range chksum=\"{}\"> 0 </Range>\n\
             \x20       <Range chksum=\"{}\"> 2048-2051 </Range>\n\
             \x20   </BlockMap>\n\
             </bmap>\n",
            "ab".repeat(32),
            "01".repeat(32),
        );
        assert_eq!(text, want);
        // Deterministic.
        assert_eq!(render(&l, &d).unwrap(), out);
    }
}

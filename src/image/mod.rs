//! `Image::read_at`: any byte range of the image, synthesized from the plan.
//!
//! A sorted region table says what fills each physical range (superblock copy,
//! tree blocks, file data, or zeros). Tree blocks are encoded on demand
//! (`encode`) and kept in an LRU cache; file data comes from the source through
//! `source::files`. Data checksums are recorded as data is served (`csums`),
//! so a sequential reader (data chunks come before metadata) reads every
//! source byte exactly once; a csum leaf requested first reads the data it
//! covers itself.

pub mod allocation;
pub mod csums;
pub mod encode;

use crate::content::Stored;
use crate::format::*;
use crate::plan::data::DataExtent;
use crate::plan::space::RegionKind;
use crate::plan::{BlockRef, Plan};
use crate::source::files::{self, FileData};
use csums::CsumTable;
use encode::BlockInputs;
use lru::LruCache;
use parking_lot::Mutex;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Encoded tree blocks kept in memory (bytes): more than one metadata chunk
/// (`plan::space::METADATA_CHUNK_MAX`), so a sequential reader of a DUP image
/// finds every block's second copy still cached.
pub const BLOCK_CACHE_BYTES: usize = crate::plan::space::METADATA_CHUNK_MAX as usize + (2 << 20);

/// Recompressed payloads kept for readers that come back to the same extent
/// (a 4 KiB reader of a 128 KiB compressed extent asks 32 times).
const PAYLOAD_CACHE: usize = 128;

pub struct Image {
    plan: Plan,
    files: Box<dyn FileData>,
    supers: Vec<Vec<u8>>,
    blocks: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    /// Payloads of compressed extents made again, by logical address.
    payloads: Mutex<LruCache<u64, Arc<[u8]>>>,
    csums: CsumTable,
    source_bytes: AtomicU64,
    /// Made when a frontend first asks which bytes are mapped.
    allocation: std::sync::OnceLock<allocation::AllocationMap>,
}

impl Image {
    /// The image of `plan`, reading file bytes from where the plan's tree came from.
    pub fn new(plan: Plan) -> Image {
        Image::with_block_cache(plan, BLOCK_CACHE_BYTES)
    }

    /// Like `new`, keeping up to `cache_bytes` of encoded tree blocks. Readers
    /// that come back to the same blocks (O_DIRECT readers such as QEMU with
    /// `cache=none`) are served from it instead of re-encoding them.
    pub fn with_block_cache(plan: Plan, cache_bytes: usize) -> Image {
        let files = files::reader(plan.source.clone());
        Image::with_files(plan, files, cache_bytes)
    }

    /// An image whose file bytes come from `files`.
    pub fn with_files(plan: Plan, files: Box<dyn FileData>, cache_bytes: usize) -> Image {
        let supers = SUPER_OFFSETS
            .iter()
            .map(|&o| plan.superblock.encode(o))
            .collect();
        let cap = (cache_bytes.max(BLOCK_CACHE_BYTES) / plan.nodesize as usize).max(16);
        Image {
            supers,
            files,
            blocks: Mutex::new(LruCache::new(
                NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN),
            )),
            payloads: Mutex::new(LruCache::new(
                NonZeroUsize::new(PAYLOAD_CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
            csums: CsumTable::new(plan.data_sectors, plan.csum_type),
            source_bytes: AtomicU64::new(0),
            allocation: std::sync::OnceLock::new(),
            plan,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// File data bytes read from the sources so far (a sequential read of the
    /// whole image reads each byte once).
    pub fn source_bytes_read(&self) -> u64 {
        self.source_bytes.load(Ordering::Relaxed)
    }

    /// Pages of the checksum table allocated so far.
    pub fn csum_pages(&self) -> usize {
        self.csums.pages_allocated()
    }

    /// Which bytes a writer of the image must write (see `allocation`).
    pub fn allocation(&self) -> &allocation::AllocationMap {
        self.allocation
            .get_or_init(|| allocation::AllocationMap::of(&self.plan))
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.plan.total_bytes
    }

    /// Fills `buf` with the image bytes at `offset`; returns how many bytes were
    /// filled (fewer only at the end of the image).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let total = self.size();
        if offset >= total {
            return Ok(0);
        }
        let end = offset.saturating_add(buf.len() as u64).min(total);
        let regions = &self.plan.regions;
        let mut pos = offset;
        while pos < end {
            let idx = regions.partition_point(|r| r.start <= pos);
            let out_start = (pos - offset) as usize;
            match idx.checked_sub(1).map(|i| &regions[i]) {
                Some(r) if r.end() > pos => {
                    let n = (end.min(r.end()) - pos) as usize;
                    let out = &mut buf[out_start..out_start + n];
                    let rel = pos - r.start;
                    match r.kind {
                        RegionKind::Super(i) => {
                            let s = &self.supers[i as usize];
                            out.copy_from_slice(&s[rel as usize..rel as usize + n]);
                        }
                        RegionKind::Metadata { logical } => self.read_meta(logical + rel, out)?,
                        RegionKind::Data { logical } => self.read_data(logical + rel, out)?,
                    }
                    pos += n as u64;
                }
                _ => {
                    let next = regions.get(idx).map_or(end, |r| r.start).min(end);
                    buf[out_start..(next - offset) as usize].fill(0);
                    pos = next;
                }
            }
        }
        Ok((end - offset) as usize)
    }

    /// Whether `[offset, offset + len)` is known to read as zeros without
    /// producing it (unallocated space and gaps between regions).
    pub fn is_zero_range(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let regions = &self.plan.regions;
        let idx = regions.partition_point(|r| r.end() <= offset);
        regions.get(idx).is_none_or(|r| r.start >= end)
    }

    /// The first data region (file data) that ends after `offset`, as
    /// physical (start, end).
    pub fn data_region(&self, offset: u64) -> Option<(u64, u64)> {
        let regions = &self.plan.regions;
        let idx = regions.partition_point(|r| r.end() <= offset);
        regions[idx..]
            .iter()
            .find(|r| matches!(r.kind, RegionKind::Data { .. }))
            .map(|r| (r.start, r.end()))
    }

    /// Checksums of the data sectors from the start of the data area, as a
    /// frontend that wrote them computed them (`csum_type().size()` bytes
    /// each): csum leaves then need no data.
    pub fn preload_csums(&self, csums: &[u8]) {
        let size = self.plan.csum_type.size();
        for (i, c) in csums.chunks_exact(size).enumerate() {
            let mut full = [0u8; CSUM_FIELD_SIZE];
            full[..size].copy_from_slice(c);
            self.csums.set(i as u64, &full);
        }
    }

    /// First offset at or after `offset` that may hold non-zero bytes (SEEK_DATA).
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        let regions = &self.plan.regions;
        let idx = regions.partition_point(|r| r.end() <= offset);
        regions
            .get(idx)
            .map(|r| r.start.max(offset))
            .filter(|&o| o < self.size())
    }

    /// First offset at or after `offset` where a run of zeros starts (SEEK_HOLE);
    /// the end of the image counts as a hole.
    pub fn seek_hole(&self, offset: u64) -> u64 {
        let regions = &self.plan.regions;
        let mut idx = regions.partition_point(|r| r.end() <= offset);
        let mut pos = offset;
        while let Some(r) = regions.get(idx) {
            if r.start > pos {
                break;
            }
            pos = r.end();
            idx += 1;
        }
        pos.min(self.size())
    }

    fn read_meta(&self, logical: u64, out: &mut [u8]) -> io::Result<()> {
        let n = self.plan.nodesize as u64;
        let mut done = 0usize;
        while done < out.len() {
            let l = logical + done as u64;
            let base = l / n * n;
            let within = (l - base) as usize;
            let take = (n as usize - within).min(out.len() - done);
            let dst = &mut out[done..done + take];
            match self.block_at(base) {
                Some(b) => {
                    let block = self.block(b)?;
                    dst.copy_from_slice(&block[within..within + take]);
                }
                None => dst.fill(0),
            }
            done += take;
        }
        Ok(())
    }

    fn block_at(&self, logical: u64) -> Option<BlockRef> {
        let blocks = &self.plan.blocks;
        let i = blocks.partition_point(|b| b.logical < logical);
        blocks.get(i).filter(|b| b.logical == logical).copied()
    }

    fn block(&self, b: BlockRef) -> io::Result<Arc<Vec<u8>>> {
        if let Some(v) = self.blocks.lock().get(&b.logical) {
            return Ok(v.clone());
        }
        let v = Arc::new(encode::encode_block(&self.plan, b, self)?);
        self.blocks.lock().put(b.logical, v.clone());
        Ok(v)
    }

    fn sector_index(&self, logical: u64) -> u64 {
        (logical - self.plan.data_start) / SECTOR_SIZE
    }

    /// Serves logical data bytes and records the checksum of every whole sector.
    fn read_data(&self, logical: u64, out: &mut [u8]) -> io::Result<()> {
        let exts = &self.plan.extents;
        let order = &self.plan.by_logical;
        let end = logical + out.len() as u64;
        let mut i = order.partition_point(|&k| exts[k as usize].end() <= logical);
        let mut pos = logical;
        while pos < end {
            let o = (pos - logical) as usize;
            match order.get(i).map(|&k| &exts[k as usize]) {
                Some(e) if e.logical < end => {
                    if e.logical > pos {
                        let n = (e.logical - pos) as usize;
                        out[o..o + n].fill(0);
                        pos = e.logical;
                        continue;
                    }
                    let n = (end.min(e.end()) - pos) as usize;
                    let within = pos - e.logical;
                    if e.algorithm.is_some() {
                        let p = self.payload(e)?;
                        let dst = &mut out[o..o + n];
                        let from = (within as usize).min(p.len());
                        let have = (p.len() - from).min(n);
                        dst[..have].copy_from_slice(&p[from..from + have]);
                        dst[have..].fill(0);
                    } else {
                        self.read_file(e.node, e.file_offset + within, &mut out[o..o + n])?;
                    }
                    pos += n as u64;
                    i += 1;
                }
                _ => {
                    out[o..].fill(0);
                    pos = end;
                }
            }
        }
        self.record_csums(logical, out);
        Ok(())
    }

    fn record_csums(&self, logical: u64, data: &[u8]) {
        let s = SECTOR_SIZE;
        let data_end = self.plan.data_start + self.plan.data_sectors * s;
        let mut a = logical.div_ceil(s) * s;
        let end = (logical + data.len() as u64).min(data_end);
        while a + s <= end {
            let i = self.sector_index(a);
            if !self.csums.is_known(i) {
                let off = (a - logical) as usize;
                self.csums.record(i, &data[off..off + s as usize]);
            }
            a += s;
        }
    }

    /// Source bytes of `node` from `offset`; zeros past the planned file size.
    fn read_file(&self, node: u32, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let size = self.plan.source.node(node).size;
        let n = size.saturating_sub(offset).min(out.len() as u64) as usize;
        out[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        self.files.read(node, offset, &mut out[..n])?;
        self.source_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Image {
    /// The payload of compressed extent `e`: kept by the content pass, or
    /// recently made, or made again now from the source (deterministically:
    /// the same bytes the plan was made with, or the source changed).
    fn payload(&self, e: &DataExtent) -> io::Result<Arc<[u8]>> {
        let content = self
            .plan
            .content
            .as_ref()
            .expect("compressed extents come from a content pass");
        let Some(Stored::Pieces { first, count }) = content.stored(e.node) else {
            unreachable!("a compressed extent's file is stored in pieces")
        };
        let pieces = content.pieces(first, count);
        let k = pieces.partition_point(|p| p.file_offset < e.file_offset);
        let piece = pieces[k];
        if let Some(p) = content.kept(first + k as u32) {
            return Ok(p);
        }
        if let Some(p) = self.payloads.lock().get(&e.logical) {
            return Ok(p.clone());
        }
        let size = self.plan.source.node(e.node).size;
        let len = (piece.ram as u64).min(size - piece.file_offset) as usize;
        let mut data = vec![0u8; len];
        self.read_file(e.node, piece.file_offset, &mut data)?;
        let c = content
            .compression
            .expect("compressed extents come with a compression");
        let p: Arc<[u8]> = c.extent_payload(&data).into();
        if p.len() != piece.payload as usize {
            return Err(self.changed(e.node, "its data compresses to another size"));
        }
        self.payloads.lock().put(e.logical, p.clone());
        Ok(p)
    }

    fn changed(&self, node: u32, what: &str) -> io::Error {
        io::Error::other(format!(
            "{}: source file changed after planning ({what})",
            crate::error::shown_path(&self.plan.source.path(node))
        ))
    }
}

impl BlockInputs for Image {
    fn inline_payload(&self, node: u32, out: &mut [u8]) -> io::Result<()> {
        let content = self
            .plan
            .content
            .as_ref()
            .expect("compressed inline files come from a content pass");
        let p = match content.kept_inline(node) {
            Some(p) => p,
            None => {
                let mut data = vec![0u8; self.plan.source.node(node).size as usize];
                self.read_file(node, 0, &mut data)?;
                content
                    .compression
                    .expect("compressed inline items come with a compression")
                    .inline_payload(&data)
                    .into()
            }
        };
        if p.len() != out.len() {
            return Err(self.changed(node, "its data compresses to another size"));
        }
        out.copy_from_slice(&p);
        Ok(())
    }

    fn inline_bytes(&self, node: u32, out: &mut [u8]) -> io::Result<()> {
        self.read_file(node, 0, out)
    }

    /// Writes the checksums of `count` sectors from `start` (`csum_size`
    /// bytes each), reading any sector whose checksum has not been recorded
    /// yet.
    fn csums(&self, start: u64, count: u64, out: &mut [u8]) -> io::Result<()> {
        let first = self.sector_index(start);
        let mut i = 0u64;
        let mut scratch = Vec::new();
        while i < count {
            if self.csums.is_known(first + i) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < count && !self.csums.is_known(first + j) && j - i < 256 {
                j += 1;
            }
            scratch.resize(((j - i) * SECTOR_SIZE) as usize, 0);
            self.read_data(start + i * SECTOR_SIZE, &mut scratch)?;
            i = j;
        }
        let size = self.plan.csum_type.size();
        for (k, o) in out.chunks_exact_mut(size).take(count as usize).enumerate() {
            let c = self
                .csums
                .get(first + k as u64)
                .expect("every sector was just read and checksummed");
            o.copy_from_slice(&c[..size]);
        }
        Ok(())
    }
}

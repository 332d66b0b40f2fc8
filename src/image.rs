//! `Image::read_at`: any byte range of the image, synthesized from the plan.
//!
//! A sorted region table says what fills each physical range (superblock copy,
//! tree blocks, file data, or zeros). Tree blocks are encoded on demand and kept
//! in an LRU cache; file data comes from the source files with positioned reads.
//! Data checksums are recorded as data is served, so a sequential reader (data
//! chunks come before metadata) reads every source byte exactly once; a csum leaf
//! requested first reads the data it covers itself.

use crate::format::block::{seal, write_key_ptr, Header, LeafWriter};
use crate::format::items::{
    write_block_group, write_data_extent, write_dir_record, write_free_space_info,
    write_inline_extent_header, write_inode_extref, write_inode_ref, write_metadata_extent,
};
use crate::format::*;
use crate::plan::data::DataExtent;
use crate::plan::items::Body;
use crate::plan::space::RegionKind;
use crate::plan::{BlockRef, Plan};
use crate::source::Node;
use lru::LruCache;
use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Encoded tree blocks kept in memory (bytes): more than one metadata chunk
/// (`plan::space::METADATA_CHUNK_MAX`), so a sequential reader of a DUP image
/// finds every block's second copy still cached.
pub const BLOCK_CACHE_BYTES: usize = 40 << 20;
/// Source files kept open at most (fewer under a low open-file limit).
const OPEN_FILES: usize = 128;

/// How many source files to keep open: at most half the soft open-file limit,
/// leaving the rest to the frontends (stdio, output, /dev/fuse clones).
fn open_files_cap() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return OPEN_FILES;
    }
    usize::try_from(r.rlim_cur / 2)
        .unwrap_or(OPEN_FILES)
        .clamp(1, OPEN_FILES)
}

pub struct Image {
    plan: Plan,
    supers: Vec<Vec<u8>>,
    blocks: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    files: Mutex<LruCache<u32, Arc<File>>>,
    csums: Vec<AtomicU32>,
    csum_known: Vec<AtomicU64>,
    source_bytes: AtomicU64,
}

fn changed(path: &std::path::Path, what: &str) -> io::Error {
    io::Error::other(format!(
        "{}: source file changed after planning ({what})",
        path.display()
    ))
}

impl Image {
    pub fn new(plan: Plan) -> Image {
        Image::with_block_cache(plan, BLOCK_CACHE_BYTES)
    }

    /// Like `new`, keeping up to `cache_bytes` of encoded tree blocks. Readers
    /// that come back to the same blocks (O_DIRECT readers such as QEMU with
    /// `cache=none`) are served from it instead of re-encoding them.
    pub fn with_block_cache(plan: Plan, cache_bytes: usize) -> Image {
        let supers = SUPER_OFFSETS
            .iter()
            .map(|&o| plan.superblock.encode(o))
            .collect();
        let cap = (cache_bytes.max(BLOCK_CACHE_BYTES) / plan.nodesize as usize).max(16);
        let sectors = plan.data_sectors as usize;
        Image {
            supers,
            blocks: Mutex::new(LruCache::new(
                NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN),
            )),
            files: Mutex::new(LruCache::new(
                NonZeroUsize::new(open_files_cap()).unwrap_or(NonZeroUsize::MIN),
            )),
            csums: (0..sectors).map(|_| AtomicU32::new(0)).collect(),
            csum_known: (0..sectors.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            source_bytes: AtomicU64::new(0),
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
        let end = (offset + buf.len() as u64).min(total);
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
                    let next = regions.get(idx).map(|r| r.start).unwrap_or(end).min(end);
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
        let end = offset + len;
        let regions = &self.plan.regions;
        let idx = regions.partition_point(|r| r.end() <= offset);
        regions.get(idx).is_none_or(|r| r.start >= end)
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
        let v = Arc::new(self.encode_block(b)?);
        self.blocks.lock().put(b.logical, v.clone());
        Ok(v)
    }

    fn encode_block(&self, b: BlockRef) -> io::Result<Vec<u8>> {
        let plan = &self.plan;
        let tree = &plan.trees[b.tree as usize];
        let level = b.level as usize;
        let idx = b.idx as usize;
        let (start, end) = tree.shape.children(level, idx);
        let mut buf = vec![0u8; plan.nodesize as usize];
        if level == 0 {
            let mut w = LeafWriter::new(&mut buf);
            for item in tree.items.iter_from(start).take((end - start) as usize) {
                let out = w.push(item.key, item.body.size());
                self.encode_body(&item.body, out)?;
            }
        } else {
            for (i, child) in (start..end).enumerate() {
                let first = tree.shape.first_item(level - 1, child as usize);
                let key = tree
                    .items
                    .iter_from(first)
                    .next()
                    .map(|it| it.key)
                    .unwrap_or_default();
                let addr = tree.addrs[level - 1][child as usize];
                write_key_ptr(&mut buf, i, key, addr, plan.generation);
            }
        }
        Header {
            fsid: plan.fsid,
            chunk_tree_uuid: plan.chunk_tree_uuid,
            bytenr: b.logical,
            generation: plan.generation,
            owner: tree.owner,
            nritems: (end - start) as u32,
            level: b.level,
        }
        .write(&mut buf);
        seal(&mut buf);
        Ok(buf)
    }

    fn encode_body(&self, body: &Body<'_>, out: &mut [u8]) -> io::Result<()> {
        let g = self.plan.generation;
        match body {
            Body::Inode(i) => i.write(out),
            Body::InodeRef(recs) => {
                let mut o = 0;
                for (index, name) in recs {
                    o += write_inode_ref(&mut out[o..], *index, name);
                }
            }
            Body::InodeExtref(recs) => {
                let mut o = 0;
                for (parent, index, name) in recs {
                    o += write_inode_extref(&mut out[o..], *parent, *index, name);
                }
            }
            Body::Xattrs(list) => {
                let mut o = 0;
                for (name, value) in list {
                    o += write_dir_record(&mut out[o..], Key::default(), g, FT_XATTR, name, value);
                }
            }
            Body::Dir(entries) => {
                let mut o = 0;
                for e in entries {
                    o += write_dir_record(&mut out[o..], e.location, g, e.ftype, e.name, &[]);
                }
            }
            Body::InlineFile { node, len } => {
                write_inline_extent_header(out, g, *len);
                self.read_file(*node, 0, &mut out[FILE_EXTENT_INLINE_HEADER..])?;
            }
            Body::InlineBytes(b) => {
                write_inline_extent_header(out, g, b.len() as u64);
                out[FILE_EXTENT_INLINE_HEADER..].copy_from_slice(b);
            }
            Body::Extent(e) => e.write(out),
            Body::Csum { start, count } => self.fill_csums(*start, *count as u64, out)?,
            Body::Root(r) => r.write(out),
            Body::Chunk(c) => c.write(out),
            Body::Dev(d) => d.write(out),
            Body::DevExtent(d) => d.write(out),
            Body::DevStats | Body::Empty => {}
            Body::BlockGroup { used, flags } => write_block_group(out, *used, *flags),
            Body::MetadataExtent { owner } => write_metadata_extent(out, g, *owner),
            Body::DataExtent { ino, offset } => write_data_extent(out, g, FS_TREE, *ino, *offset),
            Body::FreeSpaceInfo { extent_count } => write_free_space_info(out, *extent_count),
            Body::Uuid(id) => put_u64(out, 0, *id),
        }
        Ok(())
    }

    fn sector_index(&self, logical: u64) -> usize {
        ((logical - self.plan.data_start) / SECTOR_SIZE) as usize
    }

    fn known(&self, i: usize) -> bool {
        self.csum_known[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Writes the checksums of `count` sectors from `start`, reading any sector
    /// whose checksum has not been recorded yet.
    fn fill_csums(&self, start: u64, count: u64, out: &mut [u8]) -> io::Result<()> {
        let first = self.sector_index(start);
        let mut i = 0usize;
        let mut scratch = Vec::new();
        while i < count as usize {
            if self.known(first + i) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < count as usize && !self.known(first + j) && j - i < 256 {
                j += 1;
            }
            scratch.resize((j - i) * SECTOR_SIZE as usize, 0);
            self.read_data(start + i as u64 * SECTOR_SIZE, &mut scratch)?;
            i = j;
        }
        for k in 0..count as usize {
            let c = self.csums[first + k].load(Ordering::Acquire);
            put_u32(out, k * CSUM_SIZE, c);
        }
        Ok(())
    }

    /// Serves logical data bytes and records the checksum of every whole sector.
    fn read_data(&self, logical: u64, out: &mut [u8]) -> io::Result<()> {
        let exts = &self.plan.extents;
        let end = logical + out.len() as u64;
        let mut i = exts.partition_point(|e| e.logical + e.len <= logical);
        let mut pos = logical;
        while pos < end {
            let o = (pos - logical) as usize;
            match exts.get(i) {
                Some(e) if e.logical < end => {
                    if e.logical > pos {
                        let n = (e.logical - pos) as usize;
                        out[o..o + n].fill(0);
                        pos = e.logical;
                        continue;
                    }
                    let n = (end.min(e.logical + e.len) - pos) as usize;
                    self.read_extent(e, pos - e.logical, &mut out[o..o + n])?;
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
            if !self.known(i) {
                let off = (a - logical) as usize;
                let c = hash::crc32c(&data[off..off + s as usize]);
                self.csums[i].store(c, Ordering::Release);
                self.csum_known[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel);
            }
            a += s;
        }
    }

    fn read_extent(&self, e: &DataExtent, within: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_file(e.node, e.file_offset + within, out)
    }

    /// Source bytes of `node` from `offset`; zeros past the planned file size.
    /// The file is checked against the plan (size, mtime, ctime) after every
    /// read, so bytes of a file that changed before or while it was read are
    /// never returned, even through a descriptor opened before the change.
    fn read_file(&self, node: u32, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let size = self.plan.source.node(node).size;
        let n = size.saturating_sub(offset).min(out.len() as u64) as usize;
        out[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        let f = self.open(node)?;
        let mut done = 0;
        while done < n {
            match f.read_at(&mut out[done..n], offset + done as u64) {
                Ok(0) => {
                    return Err(changed(
                        &self.plan.source.path(node),
                        "it is shorter than when planned",
                    ))
                }
                Ok(k) => {
                    done += k;
                    self.source_bytes.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: {}", self.plan.source.path(node).display(), e),
                    ))
                }
            }
        }
        let path = || self.plan.source.path(node);
        let m = f
            .metadata()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {}", path().display(), e)))?;
        verify_unchanged(self.plan.source.node(node), &m).map_err(|what| changed(&path(), what))
    }

    /// An open descriptor of `node`'s source file, from the cache if it is
    /// there. When the process runs out of descriptors, cached ones are
    /// closed, least recently used first, until the open succeeds.
    fn open(&self, node: u32) -> io::Result<Arc<File>> {
        if let Some(f) = self.files.lock().get(&node) {
            return Ok(f.clone());
        }
        let path = self.plan.source.path(node);
        let f = loop {
            match File::open(&path) {
                Ok(f) => break f,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                        && self.files.lock().pop_lru().is_some() => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: {}", path.display(), e),
                    ))
                }
            }
        };
        let f = Arc::new(f);
        self.files.lock().put(node, f.clone());
        Ok(f)
    }
}

fn verify_unchanged(n: &Node, m: &std::fs::Metadata) -> Result<(), &'static str> {
    if m.len() != n.size {
        return Err("size differs");
    }
    if m.mtime() != n.mtime.sec || m.mtime_nsec() as u32 != n.mtime.nsec {
        return Err("mtime differs");
    }
    if m.ctime() != n.host_ctime.sec || m.ctime_nsec() as u32 != n.host_ctime.nsec {
        return Err("ctime differs");
    }
    Ok(())
}

//! The base layout (`--base-layout FILE`): the layout record of the image
//! this one updates, read, checked against this image's options, and
//! checked for sense (a record is input: a corrupt or hostile one must give
//! an error, never an image whose chunks or extents overlap).
//!
//! What placement takes from it: the data chunks to fill, the metadata and
//! system chunks to keep in place, the end of everything it allocated (new
//! chunks go after it), and, by image path, each file's identity and
//! extents.

use super::data::MAX_EXTENT;
use super::limits::MAX_IMAGE_SIZE;
use super::numbering::{BaseNumbers, EntryNumbers, MAX_NUMBER, ROOT_INO};
use super::record::{self, FileRecord, Record};
use super::space::{self, Chunk};
use super::Options;
use crate::compress::Algorithm;
use crate::error::{Error, Result};
use crate::format::*;
use crate::source::{Kind, SourceTree};
use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Most chunks a base may have (a 1 GiB data chunk each: 64 TiB of data,
/// or many small metadata chunks).
const MAX_CHUNKS: usize = 1 << 16;

/// Largest metadata or system chunk a base may have (this tool makes them
/// of at most 4 MiB; the kernel of at most 1 GiB).
const MAX_METADATA_CHUNK: u64 = 1 << 30;

/// Largest compressed extent (file bytes and bytes on disk).
const MAX_COMPRESSED: u64 = 128 << 10;

/// A base's tree blocks: by tree object id, level by level, (first key,
/// logical address) sorted by key.
pub type BaseBlocks = BTreeMap<u64, Vec<Vec<(Key, u64)>>>;

/// One recorded extent of a base file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseExtent {
    pub file_offset: u64,
    pub logical: u64,
    pub disk: u64,
    pub ram: u64,
    pub algorithm: Option<Algorithm>,
}

impl BaseExtent {
    pub fn end(&self) -> u64 {
        self.logical + self.disk
    }
}

/// A base file: what makes it the same file, and where its data was.
#[derive(Clone, Debug)]
struct BaseFile {
    size: u64,
    mtime: (i64, u32),
    mode: u32,
    extents: Vec<BaseExtent>,
}

pub struct Base {
    /// The record's path, for messages.
    pub path: PathBuf,
    pub data_chunks: Vec<Chunk>,
    pub metadata_chunks: Vec<Chunk>,
    pub system_chunk: Option<Chunk>,
    /// Past every logical range and every physical stripe of the base:
    /// where new chunks may start (logical = physical).
    pub end: u64,
    /// The base image's filesystem UUID: an update keeps it (tree block
    /// headers carry it, and `/etc/fstab` may name it).
    pub fsid: [u8; 16],
    /// Every recorded entry's inode number and directory index.
    pub numbers: BaseNumbers,
    /// Each tree's blocks (by tree object id), level by level: (first key,
    /// logical address), sorted by key.
    pub blocks: BaseBlocks,
    files: BTreeMap<Vec<u8>, BaseFile>,
}

impl fmt::Debug for Base {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Base({}: {} chunks, {} files)",
            self.path.display(),
            self.data_chunks.len() + self.metadata_chunks.len() + 1,
            self.files.len()
        )
    }
}

impl Base {
    /// Reads the record at `path` and checks it against `opts` (which must
    /// not carry a base already).
    pub fn load(path: &Path, opts: &Options) -> Result<Base> {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking: a FIFO given as the record must not hang the open.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::at(path, "not a regular file"));
        }
        let rec = record::read(std::io::BufReader::new(file)).map_err(|e| Error::at(path, e))?;
        Base::from_record(path, rec, opts).map_err(|e| Error::at(path, e))
    }

    /// Checks `rec` against `opts` and for sense. Errors do not name the
    /// record (the caller does).
    pub fn from_record(path: &Path, rec: Record, opts: &Options) -> Result<Base> {
        compatible(&rec.header, opts)?;
        let dup = rec.header.metadata == "dup";
        let mut data_chunks = Vec::new();
        let mut metadata_chunks = Vec::new();
        let mut system_chunk = None;
        if rec.header.chunks.len() > MAX_CHUNKS {
            return Err(Error::msg(format!(
                "line 1: {} chunks; at most {MAX_CHUNKS} are supported",
                rec.header.chunks.len()
            )));
        }
        for c in &rec.header.chunks {
            let chunk = chunk(c, dup).map_err(|e| Error::msg(format!("line 1: {e}")))?;
            match c.ty.as_str() {
                "data" => data_chunks.push(chunk),
                "metadata" => metadata_chunks.push(chunk),
                _ if system_chunk.is_some() => {
                    return Err(Error::msg("line 1: more than one system chunk"))
                }
                _ => system_chunk = Some(chunk),
            }
        }
        disjoint(&data_chunks, &metadata_chunks, system_chunk.as_ref())
            .map_err(|e| Error::msg(format!("line 1: {e}")))?;
        data_chunks.sort_by_key(|c| c.logical);
        metadata_chunks.sort_by_key(|c| c.logical);
        let end = data_chunks
            .iter()
            .chain(&metadata_chunks)
            .chain(system_chunk.as_ref())
            .flat_map(|c| c.stripes.iter().map(move |s| s + c.length).chain([c.end()]))
            .max()
            .unwrap_or(space::DATA_START)
            .max(space::DATA_START);
        // This tool lays chunks out back to back from the first MiB, and
        // updates add theirs after the end: what a base spans is what it
        // allocated. Memory (checksum tables) follows the span, so a record
        // spread much wider than its chunks is refused.
        let allocated: u64 = data_chunks
            .iter()
            .chain(&metadata_chunks)
            .chain(system_chunk.as_ref())
            .map(|c| c.length * c.stripes.len() as u64)
            .sum();
        if end > space::DATA_START + 2 * allocated + (1 << 30) {
            return Err(Error::msg(format!(
                "line 1: the chunks span {end} bytes for {allocated} allocated: not a layout this tool made"
            )));
        }

        let mut files = BTreeMap::new();
        let mut all: Vec<(u64, u64, usize)> = Vec::new();
        for (i, f) in rec.files.iter().enumerate() {
            let line = i + 2;
            let bad = |why: String| Error::msg(format!("line {line}: {why}"));
            let p = f.path();
            let base = file(f, &data_chunks).map_err(bad)?;
            all.extend(base.extents.iter().map(|e| (e.logical, e.end(), line)));
            if files.insert(p.clone(), base).is_some() {
                return Err(bad(format!(
                    "the path {} is recorded twice",
                    String::from_utf8_lossy(&p)
                )));
            }
        }
        all.sort_unstable();
        if let Some(w) = all.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(Error::msg(format!(
                "line {}: an extent at logical {} overlaps one of line {}",
                w[1].2, w[1].0, w[0].2
            )));
        }
        let fsid = super::uuid::parse_uuid(&rec.header.fsid).ok_or_else(|| {
            Error::msg(format!("line 1: fsid '{}' is not a UUID", rec.header.fsid))
        })?;
        let first_entry = 2 + rec.files.len();
        let numbers = numbers(&rec.entries, first_entry)?;
        let first_block = first_entry + rec.entries.len();
        let blocks = blocks(
            &rec.blocks,
            first_block,
            opts.nodesize,
            &metadata_chunks,
            system_chunk.as_ref(),
        )?;
        Ok(Base {
            path: path.to_path_buf(),
            data_chunks,
            metadata_chunks,
            system_chunk,
            end: space::round_up(end, STRIPE_LEN),
            fsid,
            numbers,
            blocks,
            files,
        })
    }

    /// Where blocks of tree `tree` (object id) began, level by level.
    pub fn anchors(&self, tree: u64) -> Vec<Vec<Key>> {
        self.blocks.get(&tree).map_or_else(Vec::new, |levels| {
            levels
                .iter()
                .map(|l| l.iter().map(|&(k, _)| k).collect())
                .collect()
        })
    }

    /// Where the base had the block of tree `tree` at `level` that a block
    /// with first key `key` takes the place of: the last one whose first
    /// key is at or before `key`.
    pub fn block_at(&self, tree: u64, level: usize, key: Key) -> Option<u64> {
        let l = self.blocks.get(&tree)?.get(level)?;
        let i = l.partition_point(|&(k, _)| k <= key).checked_sub(1)?;
        Some(l[i].1)
    }

    /// For each node of `tree` (by index): the recorded extents of the base
    /// file it is, when its identity is unchanged (same image path, size,
    /// mtime and mode; a store path's name carries its hash, so the path
    /// names Nix content) and it was stored in extents.
    pub fn matches<'a>(&'a self, tree: &SourceTree) -> BTreeMap<u32, &'a [BaseExtent]> {
        let mut out = BTreeMap::new();
        for n in 0..tree.len() as u32 {
            let node = tree.node(n);
            if node.kind != Kind::File || tree.link_rep(n) != n {
                continue;
            }
            let path = tree.image_path(n);
            let Some(f) = self.files.get(path.as_os_str().as_bytes()) else {
                continue;
            };
            let t = node.mtime();
            if f.size == node.size
                && f.mtime == (t.sec, t.nsec)
                && f.mode == node.mode()
                && !f.extents.is_empty()
            {
                out.insert(n, &f.extents[..]);
            }
        }
        out
    }
}

/// The recorded entries' numbers, checked: in range, each path once.
fn numbers(entries: &[record::EntryRecord], first_line: usize) -> Result<BaseNumbers> {
    let mut b = BaseNumbers::default();
    for (i, e) in entries.iter().enumerate() {
        let bad = |why: String| Error::msg(format!("line {}: {why}", first_line + i));
        let (tree, ino, index) = e.entry;
        if !(ROOT_INO..=MAX_NUMBER).contains(&ino) || index > MAX_NUMBER {
            return Err(bad(format!(
                "inode number {ino} or index {index} is out of range"
            )));
        }
        let p = e.path();
        if !p.starts_with(b"/") {
            return Err(bad("an entry path must start with '/'".into()));
        }
        if !b.insert(p, EntryNumbers { tree, ino, index }) {
            return Err(bad(format!(
                "the entry {} is recorded twice",
                String::from_utf8_lossy(&e.path())
            )));
        }
    }
    Ok(b)
}

/// The recorded tree blocks, checked: levels in range, node-aligned
/// addresses inside the base's metadata or system chunks, no address
/// twice, keys increasing within each level of a tree.
fn blocks(
    recs: &[record::BlockRecord],
    first_line: usize,
    nodesize: u32,
    meta: &[Chunk],
    system: Option<&Chunk>,
) -> Result<BaseBlocks> {
    let mut out = BaseBlocks::new();
    let mut seen = std::collections::BTreeSet::new();
    let n = nodesize as u64;
    for (i, r) in recs.iter().enumerate() {
        let bad = |why: String| Error::msg(format!("line {}: {why}", first_line + i));
        let (tree, level, objectid, ty, offset, logical) = r.block;
        if level as usize >= MAX_LEVEL {
            return Err(bad(format!("block level {level} is out of range")));
        }
        let inside = meta
            .iter()
            .chain(system)
            .any(|c| logical >= c.logical && logical.saturating_add(n) <= c.end());
        if logical % n != 0 || !inside {
            return Err(bad(format!(
                "a tree block at {logical} is not a node inside a metadata chunk"
            )));
        }
        if !seen.insert(logical) {
            return Err(bad(format!("two tree blocks at {logical}")));
        }
        let levels = out.entry(tree).or_default();
        if levels.len() <= level as usize {
            levels.resize(level as usize + 1, Vec::new());
        }
        let key = Key::new(objectid, ty, offset);
        let l = &mut levels[level as usize];
        if l.last().is_some_and(|&(k, _)| k >= key) {
            return Err(bad(format!(
                "tree {tree} level {level}: keys not increasing"
            )));
        }
        l.push((key, logical));
    }
    Ok(out)
}

/// The options that decide how data is cut and where tree blocks fit must
/// be the base's.
fn compatible(h: &record::Header, opts: &Options) -> Result<()> {
    let mine_comp = opts
        .compression
        .map(|c| format!("{}:{}", c.algorithm.name(), c.level));
    let show = |c: &Option<String>| c.clone().unwrap_or_else(|| "none".into());
    let checks: [(&str, String, String); 6] = [
        (
            "node size",
            h.nodesize.to_string(),
            opts.nodesize.to_string(),
        ),
        (
            "sector size",
            h.sectorsize.to_string(),
            SECTOR_SIZE.to_string(),
        ),
        ("checksum", h.csum.clone(), opts.csum.name().to_string()),
        (
            "metadata profile",
            h.metadata.clone(),
            if opts.metadata_dup { "dup" } else { "single" }.to_string(),
        ),
        ("compression", show(&h.compression), show(&mine_comp)),
        (
            "dedupe",
            if h.dedupe { "on" } else { "off" }.to_string(),
            if opts.dedupe { "on" } else { "off" }.to_string(),
        ),
    ];
    for (what, theirs, mine) in checks {
        if theirs != mine {
            return Err(Error::msg(format!(
                "the base layout was made with {what} {theirs}, this image has {mine}"
            )));
        }
    }
    Ok(())
}

/// One recorded chunk, checked: aligned, inside the largest image, past
/// the first MiB, identity-mapped (first stripe at its logical address, as
/// this tool lays chunks out), with the profile's number of stripes.
fn chunk(c: &record::ChunkRecord, dup: bool) -> Result<Chunk> {
    let (ty, stripes) = match c.ty.as_str() {
        "data" => (BLOCK_GROUP_DATA, 1),
        "metadata" => (BLOCK_GROUP_METADATA, if dup { 2 } else { 1 }),
        "system" => (BLOCK_GROUP_SYSTEM, if dup { 2 } else { 1 }),
        t => return Err(Error::msg(format!("unknown chunk type '{t}'"))),
    };
    let at = format!("{} chunk at {}", c.ty, c.logical);
    let aligned = |v: u64| v % STRIPE_LEN == 0;
    if c.length == 0 || !aligned(c.length) || !aligned(c.logical) {
        return Err(Error::msg(format!(
            "{at}: length {} or address not a multiple of 64 KiB",
            c.length
        )));
    }
    if c.length > space::DATA_CHUNK_MAX.max(MAX_METADATA_CHUNK) {
        return Err(Error::msg(format!(
            "{at}: length {} is over 1 GiB",
            c.length
        )));
    }
    if c.stripes.len() != stripes || c.stripes[0] != c.logical {
        return Err(Error::msg(format!(
            "{at}: stripes {:?} are not this tool's layout",
            c.stripes
        )));
    }
    for &s in &c.stripes {
        let end = s.checked_add(c.length).filter(|&e| e <= MAX_IMAGE_SIZE);
        if s < space::DATA_START || !aligned(s) || end.is_none() {
            return Err(Error::msg(format!("{at}: stripe at {s} is out of range")));
        }
    }
    let ty = ty | if stripes == 2 { BLOCK_GROUP_DUP } else { 0 };
    Ok(Chunk {
        logical: c.logical,
        length: c.length,
        ty,
        stripes: c.stripes.clone(),
        used: 0,
    })
}

/// No two chunks share a logical byte, and no two stripes a physical one.
fn disjoint(data: &[Chunk], meta: &[Chunk], system: Option<&Chunk>) -> Result<()> {
    let all: Vec<&Chunk> = data.iter().chain(meta).chain(system).collect();
    for (what, mut v) in [
        (
            "logical",
            all.iter().map(|c| (c.logical, c.end())).collect::<Vec<_>>(),
        ),
        (
            "physical",
            all.iter()
                .flat_map(|c| c.stripes.iter().map(|&s| (s, s + c.length)))
                .collect(),
        ),
    ] {
        v.sort_unstable();
        if let Some(w) = v.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(Error::msg(format!(
                "chunks overlap at {what} address {}",
                w[1].0
            )));
        }
    }
    Ok(())
}

/// One file's record, checked: its extents sector-aligned, of sizes the
/// format allows, in order and apart within the file, each inside one data
/// chunk and clear of the superblock mirrors.
fn file(f: &FileRecord, data_chunks: &[Chunk]) -> std::result::Result<BaseFile, String> {
    if f.path.is_none() && f.path_bytes.is_none() {
        return Err("a file record without a path".into());
    }
    let s = SECTOR_SIZE;
    let mut extents = Vec::with_capacity(f.extents.len());
    let mut file_end = 0u64;
    for &(file_offset, logical, disk, ram, ref algo) in &f.extents {
        let algorithm = match algo.as_deref() {
            None => None,
            Some("zstd") => Some(Algorithm::Zstd),
            Some("zlib") => Some(Algorithm::Zlib),
            Some("lzo") => Some(Algorithm::Lzo),
            Some(a) => return Err(format!("unknown compression '{a}'")),
        };
        let e = BaseExtent {
            file_offset,
            logical,
            disk,
            ram,
            algorithm,
        };
        let at = format!("extent at logical {logical}");
        let sizes_ok = match algorithm {
            None => disk == ram && disk <= MAX_EXTENT,
            Some(_) => disk <= MAX_COMPRESSED && ram <= MAX_COMPRESSED,
        };
        if [file_offset, logical, disk, ram].iter().any(|v| v % s != 0)
            || disk == 0
            || ram == 0
            || !sizes_ok
        {
            return Err(format!(
                "{at}: sizes {disk}/{ram} or offsets are not an extent's"
            ));
        }
        let in_file = file_offset.checked_add(ram).filter(|&end| {
            file_offset >= file_end && f.size.checked_next_multiple_of(s).is_some_and(|z| end <= z)
        });
        let Some(end) = in_file else {
            return Err(format!(
                "{at}: file offset {file_offset} is out of order or past the file's size {}",
                f.size
            ));
        };
        file_end = end;
        let Some(c) = logical.checked_add(disk).and_then(|end| {
            let i = data_chunks.partition_point(|c| c.end() <= logical);
            data_chunks
                .get(i)
                .filter(|c| c.logical <= logical && end <= c.end())
        }) else {
            return Err(format!("{at}: not inside a data chunk"));
        };
        if c.excluded().iter().any(|x| x.overlaps(logical, disk)) {
            return Err(format!("{at}: on a superblock mirror"));
        }
        extents.push(e);
    }
    Ok(BaseFile {
        size: f.size,
        mtime: f.mtime,
        mode: f.mode,
        extents,
    })
}

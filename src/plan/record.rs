//! The layout record (`--write-layout FILE`): where each file's data lives
//! in an image, so that the next image of an updated tree can keep
//! unchanged files where they were and a block-based updater sends only
//! what changed.
//!
//! Format (JSON Lines, one object per line, UTF-8):
//! - line 1, the header: `{"format": "btrfsimg-layout", "version": 1,
//!   "image_size", "fsid", "nodesize", "sectorsize", "csum", "metadata"
//!   ("dup"|"single"), "compression" (e.g. "zstd:3", or null), "dedupe",
//!   "chunks": [{"type": "data"|"metadata"|"system", "logical", "length",
//!   "stripes": [physical, ...]}]}`;
//! - then one line per regular file (a hard-linked inode once, under its
//!   first path in tree order), in tree order: `{"path"` (the path in the
//!   image, or `"path_bytes": [...]` when it is not UTF-8), `"size"`,
//!   `"mtime": [seconds, nanoseconds]`, `"mode"`, `"store_path"` (the
//!   `/nix/store/NAME` it belongs to, if any), `"stored"` ("extents",
//!   "inline", "shared", "empty"), `"shares"` (the path whose extents a
//!   deduplicated file shares), and `"extents": [[file_offset, logical,
//!   disk_bytes, file_bytes, "zstd"|"zlib"|"lzo"|null], ...]`}`;
//! - (version 2) then one line per entry, in tree order: `{"entry": [tree,
//!   ino, index], "path"}` (or `"path_bytes"`): the fs tree holding its
//!   inode, its inode number there and its index in its parent directory
//!   (0 for a tree's root);
//! - (version 2) then one line per tree block: `{"block": [tree, level,
//!   objectid, type, offset, logical]}`: the tree's object id, the block's
//!   level, the key of its first item and its logical address.
//!
//! Entry numbers keep unchanged files' fs-tree items as they were, and
//! block lines let those leaves keep their bounds and addresses. Version 1
//! records (files only) are still read.
//!
//! A file's identity is its path with size, mtime and mode (for Nix store
//! content the store path, whose name carries its hash). Logical addresses
//! map to physical ones through the header's chunks.

use super::Plan;
use crate::content::Stored;
use crate::error::{Error, Result};
use crate::format::{BLOCK_GROUP_DATA, BLOCK_GROUP_DUP, BLOCK_GROUP_SYSTEM, SECTOR_SIZE};
use crate::source::Kind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::os::unix::ffi::OsStrExt;

pub const FORMAT: &str = "btrfsimg-layout";
pub const VERSION: u32 = 2;

/// The oldest version `read` takes.
pub const OLDEST_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub image_size: u64,
    pub fsid: String,
    pub nodesize: u32,
    pub sectorsize: u32,
    pub csum: String,
    pub metadata: String,
    pub compression: Option<String>,
    pub dedupe: bool,
    pub chunks: Vec<ChunkRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    #[serde(rename = "type")]
    pub ty: String,
    pub logical: u64,
    pub length: u64,
    pub stripes: Vec<u64>,
}

/// One extent: file offset, logical address, bytes on disk, file bytes, and
/// the compression of the bytes on disk.
pub type ExtentRecord = (u64, u64, u64, u64, Option<String>);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path_bytes: Option<Vec<u8>>,
    pub size: u64,
    pub mtime: (i64, u32),
    pub mode: u32,
    pub store_path: Option<String>,
    pub stored: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shares: Option<String>,
    pub extents: Vec<ExtentRecord>,
}

/// A recorded path as bytes: `path`, or `path_bytes` when not UTF-8.
fn path_of(path: &Option<String>, bytes: &Option<Vec<u8>>) -> Vec<u8> {
    match (path, bytes) {
        (Some(p), _) => p.as_bytes().to_vec(),
        (None, Some(b)) => b.clone(),
        (None, None) => Vec::new(),
    }
}

impl FileRecord {
    /// The image path as bytes.
    pub fn path(&self) -> Vec<u8> {
        path_of(&self.path, &self.path_bytes)
    }
}

/// One entry's numbers: `(tree, ino, index)` and its image path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub entry: (u64, u64, u64),
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path_bytes: Option<Vec<u8>>,
}

impl EntryRecord {
    /// The image path as bytes.
    pub fn path(&self) -> Vec<u8> {
        path_of(&self.path, &self.path_bytes)
    }
}

/// One tree block: `(tree, level, key objectid, key type, key offset,
/// logical)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub block: (u64, u8, u64, u8, u64, u64),
}

/// A whole record, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub header: Header,
    pub files: Vec<FileRecord>,
    pub entries: Vec<EntryRecord>,
    pub blocks: Vec<BlockRecord>,
}

fn path_fields(p: &[u8]) -> (Option<String>, Option<Vec<u8>>) {
    match std::str::from_utf8(p) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (None, Some(p.to_vec())),
    }
}

/// `/nix/store/NAME` when `path` is inside it.
fn store_path(path: &[u8]) -> Option<String> {
    let rest = path.strip_prefix(b"/nix/store/")?;
    let name = rest
        .split(|&b| b == b'/')
        .next()
        .filter(|n| !n.is_empty())?;
    std::str::from_utf8(name)
        .ok()
        .map(|n| format!("/nix/store/{n}"))
}

fn header(plan: &Plan) -> Header {
    let ty = |t: u64| {
        if t & BLOCK_GROUP_DATA != 0 {
            "data"
        } else if t & BLOCK_GROUP_SYSTEM != 0 {
            "system"
        } else {
            "metadata"
        }
    };
    let dup = plan
        .chunks
        .iter()
        .any(|c| c.ty & BLOCK_GROUP_DATA == 0 && c.ty & BLOCK_GROUP_DUP != 0);
    Header {
        format: FORMAT.into(),
        version: VERSION,
        image_size: plan.total_bytes,
        fsid: super::format_uuid(&plan.fsid),
        nodesize: plan.nodesize,
        sectorsize: SECTOR_SIZE as u32,
        csum: plan.csum_type.name().into(),
        metadata: if dup { "dup" } else { "single" }.into(),
        compression: plan
            .content
            .as_ref()
            .and_then(|c| c.compression)
            .map(|c| format!("{}:{}", c.algorithm.name(), c.level)),
        dedupe: plan.content.as_ref().is_some_and(|c| c.dedupe),
        chunks: plan
            .chunks
            .iter()
            .map(|c| ChunkRecord {
                ty: ty(c.ty).into(),
                logical: c.logical,
                length: c.length,
                stripes: c.stripes.clone(),
            })
            .collect(),
    }
}

/// Writes the record of `plan` to `out`.
pub fn write(plan: &Plan, out: &mut dyn Write) -> io::Result<()> {
    line(out, &header(plan))?;
    let mut by_node: BTreeMap<u32, Vec<ExtentRecord>> = BTreeMap::new();
    for e in plan.extents.iter() {
        by_node.entry(e.node).or_default().push((
            e.file_offset,
            e.logical,
            e.size(),
            e.ram(),
            e.algorithm.map(|a| a.name().to_string()),
        ));
    }
    for v in by_node.values_mut() {
        v.sort();
    }
    let tree = &plan.source;
    for n in 0..tree.len() as u32 {
        let node = tree.node(n);
        if node.kind != Kind::File || tree.link_rep(n) != n {
            continue;
        }
        let path = tree.image_path(n);
        let bytes = path.as_os_str().as_bytes();
        let (p, pb) = path_fields(bytes);
        let extents = by_node.remove(&n).unwrap_or_default();
        let (stored, shares) = match plan.content.as_ref().and_then(|c| c.stored(n)) {
            Some(Stored::Inline { .. }) => ("inline", None),
            Some(Stored::Shared { node: of }) => (
                "shared",
                Some(
                    String::from_utf8_lossy(tree.image_path(of).as_os_str().as_bytes())
                        .into_owned(),
                ),
            ),
            _ if !extents.is_empty() => ("extents", None),
            _ if node.size == 0 => ("empty", None),
            // Without a content pass, small files are inline and files of
            // holes only have no extents.
            _ => ("inline", None),
        };
        let mtime = node.mtime();
        let rec = FileRecord {
            path: p,
            path_bytes: pb,
            size: node.size,
            mtime: (mtime.sec, mtime.nsec),
            mode: node.mode(),
            store_path: store_path(bytes),
            stored: stored.into(),
            shares,
            extents,
        };
        line(out, &rec)?;
    }
    let part = &plan.partition;
    for n in 0..tree.len() as u32 {
        let path = tree.image_path(n);
        let (path, path_bytes) = path_fields(path.as_os_str().as_bytes());
        let index = match n {
            0 => 0,
            _ => part.dir_index(tree, n),
        };
        let rec = EntryRecord {
            entry: (part.id_of(n), part.ino_of(n), index),
            path,
            path_bytes,
        };
        line(out, &rec)?;
    }
    for t in &plan.trees {
        if t.items.count() == 0 {
            continue;
        }
        for (level, addrs) in t.addrs.iter().enumerate() {
            for (i, &logical) in addrs.iter().enumerate() {
                let key = t.shape.keys[level][i];
                let rec = BlockRecord {
                    block: (
                        t.id.objectid(),
                        level as u8,
                        key.objectid,
                        key.ty,
                        key.offset,
                        logical,
                    ),
                };
                line(out, &rec)?;
            }
        }
    }
    out.flush()
}

/// The longest line `read` takes: a file of 1.5 million extents, or a
/// header of a million chunks. A longer one is not a record this tool
/// wrote, and reading it whole could take all memory.
pub const MAX_LINE: u64 = 64 << 20;

/// One line of at most `MAX_LINE` bytes (and one more, to tell).
fn read_bounded<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    io::Read::take(r, MAX_LINE + 2).read_until(b'\n', buf)
}

/// Lines of at most `MAX_LINE` bytes; a longer one is an error.
fn bounded_lines(mut r: impl BufRead) -> impl Iterator<Item = io::Result<String>> {
    std::iter::from_fn(move || {
        let mut buf = Vec::new();
        match read_bounded(&mut r, &mut buf) {
            Ok(0) => None,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                if buf.len() as u64 > MAX_LINE {
                    return Some(Err(io::Error::other(format!(
                        "a line longer than {MAX_LINE} bytes"
                    ))));
                }
                Some(
                    String::from_utf8(buf)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8")),
                )
            }
            Err(e) => Some(Err(e)),
        }
    })
}

/// Reads a record; a line that does not parse, another format or another
/// version is an error naming the line.
pub fn read(r: impl BufRead) -> Result<Record> {
    let mut lines = bounded_lines(r).enumerate();
    let bad = |n: usize, why: String| Error::msg(format!("line {}: {why}", n + 1));
    let (n, first) = lines
        .next()
        .ok_or_else(|| Error::msg("empty layout record"))?;
    let first = first.map_err(|e| bad(n, e.to_string()))?;
    let header: Header = serde_json::from_str(&first)
        .map_err(|e| bad(n, format!("not a btrfsimg layout record header: {e}")))?;
    if header.format != FORMAT {
        return Err(bad(
            n,
            format!("format '{}', not '{FORMAT}'", header.format),
        ));
    }
    if !(OLDEST_VERSION..=VERSION).contains(&header.version) {
        return Err(bad(
            n,
            format!(
                "version {} (this btrfsimg reads versions {OLDEST_VERSION} to {VERSION})",
                header.version
            ),
        ));
    }
    let mut files = Vec::new();
    let mut entries = Vec::new();
    let mut blocks = Vec::new();
    for (n, l) in lines {
        let l = l.map_err(|e| bad(n, e.to_string()))?;
        // The writer's own spelling tells the kinds of line apart; each
        // kind comes after the one before.
        let v2 = header.version >= 2;
        if v2 && l.starts_with("{\"block\":") {
            blocks.push(
                serde_json::from_str(&l).map_err(|e| bad(n, format!("not a block line: {e}")))?,
            );
        } else if v2 && l.starts_with("{\"entry\":") {
            if !blocks.is_empty() {
                return Err(bad(n, "an entry line after the block lines".into()));
            }
            entries.push(
                serde_json::from_str(&l).map_err(|e| bad(n, format!("not an entry line: {e}")))?,
            );
        } else {
            if !entries.is_empty() || !blocks.is_empty() {
                return Err(bad(n, "a file line after the entry or block lines".into()));
            }
            files.push(
                serde_json::from_str(&l).map_err(|e| bad(n, format!("not a file record: {e}")))?,
            );
        }
    }
    Ok(Record {
        header,
        files,
        entries,
        blocks,
    })
}

/// One JSON line.
fn line(out: &mut dyn Write, v: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, v).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::generated::Entry;
    use crate::source::Fill;

    fn plan(opts: &crate::Options) -> Plan {
        let n = |s: &str| s.as_bytes().to_vec();
        let store = Entry::dir(BTreeMap::from([(
            n("abc-hello"),
            Entry::dir(BTreeMap::from([(
                n("big"),
                Entry::file(300_000, Fill::Text(1)),
            )])),
        )]));
        let root = Entry::dir(BTreeMap::from([
            (n("nix"), Entry::dir(BTreeMap::from([(n("store"), store)]))),
            (n("small"), Entry::file(100, Fill::Random(2))),
            (n("empty"), Entry::file(0, Fill::Zeros)),
            (n("random"), Entry::file(1 << 20, Fill::Random(3))),
            (n("copy"), Entry::file(1 << 20, Fill::Random(3))),
        ]));
        crate::plan_generated(&root, opts).expect("plans")
    }

    fn record(opts: &crate::Options) -> (Plan, Record) {
        let p = plan(opts);
        let mut v = Vec::new();
        write(&p, &mut v).expect("writes");
        let r = read(&v[..]).expect("reads back");
        let mut again = Vec::new();
        write(&p, &mut again).expect("writes");
        assert_eq!(v, again, "the same plan, the same record");
        (p, r)
    }

    #[test]
    fn records_every_file_and_extent() {
        let (p, r) = record(&crate::Options::default());
        assert_eq!(r.header.image_size, p.total_bytes);
        assert_eq!(r.header.chunks.len(), p.chunks.len());
        let f = |path: &str| {
            r.files
                .iter()
                .find(|f| f.path.as_deref() == Some(path))
                .unwrap_or_else(|| panic!("{path} is recorded"))
        };
        let big = f("/nix/store/abc-hello/big");
        assert_eq!(big.store_path.as_deref(), Some("/nix/store/abc-hello"));
        assert_eq!(big.stored, "extents");
        assert_eq!(
            big.extents.iter().map(|e| e.3).sum::<u64>(),
            300_000u64.div_ceil(4096) * 4096
        );
        assert_eq!(f("/small").stored, "inline");
        assert_eq!(f("/empty").stored, "empty");
        assert!(f("/random").store_path.is_none());
        let all: usize = r.files.iter().map(|f| f.extents.len()).sum();
        assert_eq!(all, p.extents.len(), "every extent once");
    }

    #[test]
    fn records_compression_and_sharing() {
        let opts = crate::Options {
            compression: crate::compress::Compression::parse("zstd:5").expect("parses"),
            dedupe: true,
            ..crate::Options::default()
        };
        let (_, r) = record(&opts);
        assert_eq!(r.header.compression.as_deref(), Some("zstd:5"));
        assert!(r.header.dedupe);
        let copy = r
            .files
            .iter()
            .find(|f| f.path.as_deref() == Some("/random"))
            .expect("recorded");
        assert_eq!(
            copy.stored, "shared",
            "/random comes after /copy in tree order"
        );
        assert_eq!(copy.shares.as_deref(), Some("/copy"));
        let big = r
            .files
            .iter()
            .find(|f| f.path.as_deref() == Some("/nix/store/abc-hello/big"))
            .expect("recorded");
        assert!(big.extents.iter().all(|e| e.4.as_deref() == Some("zstd")));
    }

    #[test]
    fn wrong_records_are_refused() {
        assert!(read(&b""[..]).is_err());
        assert!(read(&b"{\"format\": \"x\"}\n"[..]).is_err());
        let (_, r) = record(&crate::Options::default());
        let mut h = r.header.clone();
        h.version = 99;
        let text = serde_json::to_string(&h).expect("serializes");
        let e = read(text.as_bytes()).expect_err("another version");
        assert!(e.to_string().contains("version 99"), "{e}");
        let mut text = serde_json::to_string(&r.header).expect("serializes");
        text.push_str("\n{\"path\": 3}\n");
        let e = read(text.as_bytes()).expect_err("a bad file line");
        assert!(e.to_string().starts_with("line 2:"), "{e}");
    }
}

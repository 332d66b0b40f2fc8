//! The content pass: what only file bytes can tell, learned before any
//! address is fixed. Every regular file is read once, in tree order, on all
//! cores. With compression, each piece of at most 128 KiB is compressed to
//! learn its size; with dedupe, every file's content is hashed and a file
//! whose bytes equal an earlier file's shares that file's extents. The result
//! is plain data for the planner (which pieces are stored compressed, how
//! long each payload is, which small files go inline, which files share)
//! plus the payloads that fit a memory budget. A payload not kept is made
//! again, identically, when its bytes are served.
//!
//! Decisions follow the kernel's (`compress_file_range`, `cow_file_range_inline`):
//! a piece is stored compressed only if that saves at least one sector; a
//! file of at most one sector is inlined compressed when its payload is
//! smaller than the file and at most `max_inline` bytes, inlined as is when
//! the file is at most `max_inline` bytes, and otherwise stored in a regular
//! extent. Holes stay holes: pieces cover data segments only. Files without
//! data checksums (`--inode-flags`) are never compressed, as the kernel
//! never compresses them: they are read (and hashed, for dedupe) like the
//! others and stored as they are.

use crate::compress::{Algorithm, Compression, MAX_UNCOMPRESSED};
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::source::files::FileData;
use crate::source::{Kind, Segments, SourceTree};
use sha2::Digest;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Raw pieces without compression (only with dedupe): large enough to keep
/// extents few, small enough to bound the memory of pieces in flight.
const RAW_PIECE: u64 = 1 << 20;

/// One piece of a file's data as it will be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub file_offset: u64,
    /// File bytes it covers, rounded up to a sector (ram_bytes, num_bytes).
    pub ram: u32,
    /// Payload bytes before the zero padding (= `ram` when stored raw).
    pub payload: u32,
    /// `None`: stored as is.
    pub algorithm: Option<Algorithm>,
}

impl Piece {
    /// Bytes on disk: the payload rounded up to a sector.
    pub fn disk(&self) -> u64 {
        (self.payload as u64).div_ceil(SECTOR_SIZE) * SECTOR_SIZE
    }
}

/// How one regular file is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Inline in the fs tree: `payload` bytes, compressed with `algorithm`
    /// (or the file itself when `None`).
    Inline {
        algorithm: Option<Algorithm>,
        payload: u32,
    },
    /// Pieces `first..first + count` of the index.
    Pieces { first: u32, count: u32 },
    /// The same bytes as the earlier file `node`: it shares its extents.
    Shared { node: u32 },
}

/// What the content pass learned.
pub struct ContentIndex {
    pub compression: Option<Compression>,
    pub dedupe: bool,
    /// (node, how it is stored), sorted by node.
    files: Vec<(u32, Stored)>,
    pieces: Vec<Piece>,
    /// Payloads kept in memory: by piece index, and inline ones by node.
    kept: HashMap<u32, Arc<[u8]>>,
    kept_inline: HashMap<u32, Arc<[u8]>>,
    /// SHA-256 over every file's pieces in order (payloads, or the bytes of
    /// raw pieces and inline files): the file content, for the default UUID.
    pub digest: [u8; 32],
    /// File bytes the pass read.
    pub bytes_read: u64,
    /// Bytes of payload kept.
    pub kept_bytes: u64,
    /// Files that share an earlier file's extents, and the data they did not add.
    pub shared_files: u64,
    pub shared_bytes: u64,
}

impl ContentIndex {
    pub fn stored(&self, node: u32) -> Option<Stored> {
        self.files
            .binary_search_by_key(&node, |f| f.0)
            .ok()
            .map(|i| self.files[i].1)
    }

    pub fn pieces(&self, first: u32, count: u32) -> &[Piece] {
        &self.pieces[first as usize..(first + count) as usize]
    }

    /// Whether any payload uses `a` (for the superblock's incompat bits).
    pub fn uses(&self, a: Algorithm) -> bool {
        self.pieces.iter().any(|p| p.algorithm == Some(a))
            || self
                .files
                .iter()
                .any(|f| matches!(f.1, Stored::Inline { algorithm: Some(x), .. } if x == a))
    }

    /// A kept payload of piece `index`.
    pub fn kept(&self, index: u32) -> Option<Arc<[u8]>> {
        self.kept.get(&index).cloned()
    }

    pub fn kept_inline(&self, node: u32) -> Option<Arc<[u8]>> {
        self.kept_inline.get(&node).cloned()
    }
}

pub struct ContentOptions {
    pub compression: Option<Compression>,
    pub dedupe: bool,
    /// Largest inline file (already clamped to what one leaf item holds).
    pub max_inline: u64,
    pub threads: usize,
    /// Payload bytes to keep in memory.
    pub keep_bytes: u64,
    /// The fs tree (subvolume index) of every node, when there are several:
    /// files are taken tree by tree, in the order the planner places their
    /// data, so a sink sees pieces where they will be (empty: one tree).
    pub tree_of: Vec<u16>,
    /// `--inode-flags`: files without checksums are stored uncompressed and
    /// share extents only with files like them.
    pub inode_flags: Arc<crate::plan::inode_flags::InodeFlags>,
}

/// Told, in tree order, every piece and its bytes as they will be on disk
/// before the zero padding (the payload, or the file's bytes of a raw piece),
/// so that a frontend writing them now need not make them again; and told
/// when the pieces of the file last given turned out to duplicate an earlier
/// file's (dedupe): they are not stored after all.
pub trait PieceSink {
    /// Given, before any piece, the allocator the plan will place data
    /// with (the same base layout), so pieces go where the plan puts them.
    fn start(&mut self, alloc: crate::plan::data::DataAllocator);
    fn piece(&mut self, node: u32, piece: &Piece, bytes: &[u8]) -> Result<()>;
    fn discard(&mut self, node: u32) -> Result<()>;
}

/// One unit of work: a small file (inline candidate) or one piece.
enum Job {
    Small { node: u32, size: u64 },
    Piece { node: u32, offset: u64, len: u64 },
}

enum Done {
    Small {
        node: u32,
        stored: Stored,
        payload: Vec<u8>,
        digest: [u8; 32],
    },
    Piece {
        node: u32,
        piece: Piece,
        /// The payload of a compressed piece, or the bytes of a raw one
        /// when a sink wants them.
        payload: Option<Vec<u8>>,
        digest: [u8; 32],
    },
}

fn sha256(b: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(b).into()
}

/// The pieces of a file's data: each aligned data segment cut into runs of
/// at most `max` bytes from its start; `len` is the real bytes (the last
/// piece of the file ends at its size).
pub fn cut(size: u64, segments: Segments<'_>, max: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let s = SECTOR_SIZE;
    let mut aligned: Vec<(u64, u64)> = Vec::new();
    for seg in segments.iter() {
        let a = seg.offset / s * s;
        let b = (seg.offset + seg.len).div_ceil(s) * s;
        match aligned.last_mut() {
            Some(l) if l.1 >= a => l.1 = l.1.max(b),
            _ => aligned.push((a, b)),
        }
    }
    for (a, b) in aligned {
        let mut pos = a;
        while pos < b {
            let end = (pos + max).min(b);
            out.push((pos, end.min(size) - pos));
            pos = end;
        }
    }
    out
}

/// The file being assembled by the consumer (for dedupe: its pieces are
/// placed, then dropped if the whole file equals an earlier one).
struct Current {
    node: u32,
    first_piece: usize,
    hasher: sha2::Sha256,
    kept: Vec<(u32, u64)>,
    bytes: u64,
}

/// Runs the pass over every regular file of `tree` (first links only), in
/// node order, reading through `files`. `progress(done, total)` is called
/// with file bytes as they are done.
pub fn scan(
    tree: &SourceTree,
    files: &dyn FileData,
    opts: &ContentOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
    mut sink: Option<&mut dyn PieceSink>,
) -> Result<ContentIndex> {
    let want_raw = sink.is_some();
    // The compression of file `n` (none for files without checksums).
    let raw = |n: u32| opts.inode_flags.nodatasum(tree, n);
    let comp = |n: u32| opts.compression.filter(|_| !raw(n));
    let mut nodes: Vec<u32> = (0..tree.len() as u32)
        .filter(|&n| tree.node(n).kind == Kind::File && tree.link_rep(n) == n)
        .filter(|&n| !tree.segments(n).is_empty())
        .collect();
    if !opts.tree_of.is_empty() {
        // Stable: node order within each tree.
        nodes.sort_by_key(|&n| opts.tree_of[n as usize]);
    }
    let total: u64 = nodes
        .iter()
        .map(|&n| tree.segments(n).iter().map(|s| s.len).sum::<u64>())
        .sum();
    let small =
        |n: u32| tree.node(n).size <= SECTOR_SIZE && matches!(tree.segments(n), Segments::Whole(_));
    let piece_max = |n: u32| {
        if comp(n).is_some() {
            MAX_UNCOMPRESSED as u64
        } else {
            RAW_PIECE
        }
    };
    let jobs = nodes.iter().flat_map(|&n| {
        let size = tree.node(n).size;
        let v: Vec<Job> = if small(n) {
            vec![Job::Small { node: n, size }]
        } else {
            cut(size, tree.segments(n), piece_max(n))
                .into_iter()
                .map(|(offset, len)| Job::Piece {
                    node: n,
                    offset,
                    len,
                })
                .collect()
        };
        v
    });
    let read = AtomicU64::new(0);
    let read_bytes = |node: u32, offset: u64, len: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        files.read(node, offset, &mut buf).map_err(Error::named)?;
        let done = read.fetch_add(len, Ordering::Relaxed) + len;
        progress(done, total);
        Ok(buf)
    };
    let raw_piece = |offset: u64, ram: u64| Piece {
        file_offset: offset,
        ram: ram as u32,
        payload: ram as u32,
        algorithm: None,
    };
    let work = |j: Job| -> Result<Done> {
        match j {
            Job::Small { node, size } => {
                let data = read_bytes(node, 0, size)?;
                let ram = size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
                let digest = sha256(&data);
                let c = comp(node);
                let p = c.map(|c| c.inline_payload(&data));
                let (stored, payload) = match p {
                    Some(p) if (p.len() as u64) < size && p.len() as u64 <= opts.max_inline => (
                        Stored::Inline {
                            algorithm: c.map(|c| c.algorithm),
                            payload: p.len() as u32,
                        },
                        p,
                    ),
                    _ if size <= opts.max_inline => (
                        Stored::Inline {
                            algorithm: None,
                            payload: size as u32,
                        },
                        Vec::new(),
                    ),
                    _ => {
                        return Ok(Done::Piece {
                            node,
                            piece: raw_piece(0, ram),
                            payload: want_raw.then_some(data),
                            digest,
                        })
                    }
                };
                Ok(Done::Small {
                    node,
                    stored,
                    payload,
                    digest,
                })
            }
            Job::Piece { node, offset, len } => {
                let data = read_bytes(node, offset, len)?;
                let ram = len.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
                if let Some(c) = comp(node) {
                    let p = c.extent_payload(&data);
                    let disk = (p.len() as u64).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
                    if disk < ram {
                        return Ok(Done::Piece {
                            node,
                            piece: Piece {
                                file_offset: offset,
                                ram: ram as u32,
                                payload: p.len() as u32,
                                algorithm: Some(c.algorithm),
                            },
                            digest: sha256(&p),
                            payload: Some(p),
                        });
                    }
                }
                Ok(Done::Piece {
                    node,
                    piece: raw_piece(offset, ram),
                    digest: sha256(&data),
                    payload: want_raw.then_some(data),
                })
            }
        }
    };
    let mut index = ContentIndex {
        compression: opts.compression,
        dedupe: opts.dedupe,
        files: Vec::with_capacity(nodes.len()),
        pieces: Vec::new(),
        kept: HashMap::new(),
        kept_inline: HashMap::new(),
        digest: [0; 32],
        bytes_read: 0,
        kept_bytes: 0,
        shared_files: 0,
        shared_bytes: 0,
    };
    let mut current: Option<Current> = None;
    // Whole-file digests of files stored in pieces (dedupe), apart for
    // files without checksums: the kernel shares extents only between files
    // that agree on NODATASUM.
    let mut seen: HashMap<([u8; 32], bool), u32> = HashMap::new();
    let mut tree_hash = sha2::Sha256::new();

    // Closes the file being assembled: with dedupe, a file equal to an
    // earlier one gives its pieces back and shares that file's.
    let mut close = |index: &mut ContentIndex,
                     cur: Option<Current>,
                     sink: &mut Option<&mut dyn PieceSink>|
     -> Result<()> {
        let Some(cur) = cur else { return Ok(()) };
        if !opts.dedupe {
            return Ok(());
        }
        let d: ([u8; 32], bool) = (cur.hasher.finalize().into(), raw(cur.node));
        match seen.get(&d) {
            None => {
                seen.insert(d, cur.node);
            }
            Some(&of) => {
                index.pieces.truncate(cur.first_piece);
                for (i, len) in cur.kept {
                    index.kept.remove(&i);
                    index.kept_bytes -= len;
                }
                let last = index
                    .files
                    .last_mut()
                    .expect("the current file is recorded");
                debug_assert_eq!(last.0, cur.node);
                last.1 = Stored::Shared { node: of };
                index.shared_files += 1;
                index.shared_bytes += cur.bytes;
                if let Some(s) = sink.as_mut() {
                    s.discard(cur.node)?;
                }
            }
        }
        Ok(())
    };
    let consume = |d: Done| -> Result<()> {
        match d {
            Done::Small {
                node,
                stored,
                payload,
                digest,
            } => {
                close(&mut index, current.take(), &mut sink)?;
                tree_hash.update(node.to_le_bytes());
                tree_hash.update(digest);
                if !payload.is_empty() && index.kept_bytes + payload.len() as u64 <= opts.keep_bytes
                {
                    index.kept_bytes += payload.len() as u64;
                    index.kept_inline.insert(node, payload.into());
                }
                index.files.push((node, stored));
            }
            Done::Piece {
                node,
                piece,
                payload,
                digest,
            } => {
                tree_hash.update(node.to_le_bytes());
                tree_hash.update(piece.file_offset.to_le_bytes());
                tree_hash.update(digest);
                if current.as_ref().is_none_or(|c| c.node != node) {
                    // May give back the previous file's pieces: index after it.
                    close(&mut index, current.take(), &mut sink)?;
                }
                let i = u32::try_from(index.pieces.len())
                    .ok()
                    .filter(|&i| i < u32::MAX)
                    .ok_or_else(|| Error::msg("too many data pieces"))?;
                if current.as_ref().is_none_or(|c| c.node != node) {
                    let mut hasher = sha2::Sha256::new();
                    hasher.update(tree.node(node).size.to_le_bytes());
                    current = Some(Current {
                        node,
                        first_piece: index.pieces.len(),
                        hasher,
                        kept: Vec::new(),
                        bytes: 0,
                    });
                    index
                        .files
                        .push((node, Stored::Pieces { first: i, count: 0 }));
                }
                let cur = current.as_mut().expect("just set");
                cur.hasher.update(piece.file_offset.to_le_bytes());
                cur.hasher.update(piece.ram.to_le_bytes());
                cur.hasher.update(digest);
                cur.bytes += piece.disk();
                if let Some(Stored::Pieces { count, .. }) = index.files.last_mut().map(|f| &mut f.1)
                {
                    *count += 1;
                }
                if let (Some(s), Some(p)) = (sink.as_mut(), &payload) {
                    s.piece(node, &piece, p)?;
                }
                if let (Some(p), Some(_)) = (payload, piece.algorithm) {
                    if index.kept_bytes + p.len() as u64 <= opts.keep_bytes {
                        index.kept_bytes += p.len() as u64;
                        cur.kept.push((i, p.len() as u64));
                        index.kept.insert(i, p.into());
                    }
                }
                index.pieces.push(piece);
            }
        }
        Ok(())
    };
    crate::pipeline::ordered(
        jobs,
        opts.threads,
        8 * opts.threads.max(1),
        work,
        consume,
        || Error::msg("internal error: a content pass worker panicked"),
    )?;
    close(&mut index, current.take(), &mut sink)?;
    index.bytes_read = read.load(Ordering::Relaxed);
    index.digest = tree_hash.finalize().into();
    // Files were taken tree by tree: `stored` looks them up by node.
    index.files.sort_by_key(|f| f.0);
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Segment;

    #[test]
    fn pieces_are_runs_of_aligned_segments() {
        let k = 1024u64;
        let m = 128 * k;
        assert_eq!(
            cut(300 * k, Segments::Whole(300 * k), m),
            vec![(0, 128 * k), (128 * k, 128 * k), (256 * k, 44 * k)]
        );
        assert_eq!(cut(5000, Segments::Whole(5000), m), vec![(0, 5000)]);
        let segs = [
            Segment {
                offset: 100,
                len: 10,
            },
            Segment {
                offset: 1 << 20,
                len: 130 * k,
            },
        ];
        assert_eq!(
            cut(2 << 20, Segments::Sparse(&segs), m),
            vec![(0, 4096), (1 << 20, 128 * k), ((1 << 20) + 128 * k, 4096)]
        );
    }
}

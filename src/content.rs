//! The content pass: what only file bytes can tell, learned before any
//! address is fixed. With compression, every regular file is read once, in
//! inode order, on all cores, and each piece of at most 128 KiB is compressed
//! to learn its size; the result is plain data for the planner (which pieces
//! are stored compressed, how long each payload is, which small files go
//! inline) plus the payloads that fit a memory budget. A payload not kept is
//! made again, identically, when its bytes are served.
//!
//! Decisions follow the kernel's (`compress_file_range`, `cow_file_range_inline`):
//! a piece is stored compressed only if that saves at least one sector; a
//! file of at most one sector is inlined compressed when its payload is
//! smaller than the file and at most `max_inline` bytes, inlined as is when
//! the file is at most `max_inline` bytes, and otherwise stored in a regular
//! extent. Holes stay holes: pieces cover data segments only.

use crate::compress::{Algorithm, Compression, MAX_UNCOMPRESSED};
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::source::files::FileData;
use crate::source::{Kind, Segments, SourceTree};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
}

/// What the content pass learned.
pub struct ContentIndex {
    pub compression: Compression,
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

    /// Bytes of the file stored in pieces (for the UUID): each piece's
    /// offset, size and payload size.
    pub fn summary_of(&self, node: u32) -> Vec<u64> {
        match self.stored(node) {
            None => Vec::new(),
            Some(Stored::Inline { algorithm, payload }) => {
                vec![0, algorithm.map_or(0, |a| a.code() as u64), payload as u64]
            }
            Some(Stored::Pieces { first, count }) => self
                .pieces(first, count)
                .iter()
                .flat_map(|p| {
                    [
                        p.file_offset,
                        p.ram as u64,
                        p.payload as u64,
                        p.algorithm.map_or(0, |a| a.code() as u64),
                    ]
                })
                .collect(),
        }
    }
}

pub struct ContentOptions {
    pub compression: Compression,
    /// Largest inline file (already clamped to what one leaf item holds).
    pub max_inline: u64,
    pub threads: usize,
    /// Payload bytes to keep in memory.
    pub keep_bytes: u64,
}

/// Called, in inode order, with every piece and its bytes as they will be on
/// disk before the zero padding (the payload, or the file's bytes of a raw
/// piece): a frontend that writes them now need not make them again.
pub type PieceSink<'a> = &'a mut dyn FnMut(u32, &Piece, &[u8]) -> Result<()>;

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
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// The pieces of a file's data: each aligned data segment cut into runs of
/// at most 128 KiB from its start; `len` is the real bytes (the last piece of
/// the file ends at its size).
pub fn cut(size: u64, segments: Segments<'_>) -> Vec<(u64, u64)> {
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
            let end = (pos + MAX_UNCOMPRESSED as u64).min(b);
            out.push((pos, end.min(size) - pos));
            pos = end;
        }
    }
    out
}

/// Runs the pass over every regular file of `tree` (first links only), in
/// node order, reading through `files`. `progress(done, total)` is called
/// with file bytes as they are done.
pub fn scan(
    tree: &SourceTree,
    files: &dyn FileData,
    opts: &ContentOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
    mut sink: Option<PieceSink<'_>>,
) -> Result<ContentIndex> {
    let want_raw = sink.is_some();
    let c = opts.compression;
    let nodes: Vec<u32> = (0..tree.len() as u32)
        .filter(|&n| tree.node(n).kind == Kind::File && tree.link_rep(n) == n)
        .filter(|&n| !tree.segments(n).is_empty())
        .collect();
    let total: u64 = nodes
        .iter()
        .map(|&n| tree.segments(n).iter().map(|s| s.len).sum::<u64>())
        .sum();
    let small = |n: u32| {
        let node = tree.node(n);
        node.size <= SECTOR_SIZE && matches!(tree.segments(n), Segments::Whole(_))
    };
    let jobs = nodes.iter().flat_map(|&n| {
        let size = tree.node(n).size;
        let v: Vec<Job> = if small(n) {
            vec![Job::Small { node: n, size }]
        } else {
            cut(size, tree.segments(n))
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
    let work = |j: Job| -> Result<Done> {
        match j {
            Job::Small { node, size } => {
                let data = read_bytes(node, 0, size)?;
                let p = c.inline_payload(&data);
                let ram = size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
                let digest = sha256(&data);
                let (stored, payload) =
                    if (p.len() as u64) < size && p.len() as u64 <= opts.max_inline {
                        let len = p.len() as u32;
                        (
                            Stored::Inline {
                                algorithm: Some(c.algorithm),
                                payload: len,
                            },
                            p,
                        )
                    } else if size <= opts.max_inline {
                        (
                            Stored::Inline {
                                algorithm: None,
                                payload: size as u32,
                            },
                            Vec::new(),
                        )
                    } else {
                        let piece = Piece {
                            file_offset: 0,
                            ram: ram as u32,
                            payload: ram as u32,
                            algorithm: None,
                        };
                        return Ok(Done::Piece {
                            node,
                            piece,
                            payload: want_raw.then_some(data),
                            digest,
                        });
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
                let p = c.extent_payload(&data);
                let disk = (p.len() as u64).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
                let keep = disk < ram;
                let digest = sha256(if keep { &p } else { &data });
                Ok(if keep {
                    Done::Piece {
                        node,
                        piece: Piece {
                            file_offset: offset,
                            ram: ram as u32,
                            payload: p.len() as u32,
                            algorithm: Some(c.algorithm),
                        },
                        payload: Some(p),
                        digest,
                    }
                } else {
                    Done::Piece {
                        node,
                        piece: Piece {
                            file_offset: offset,
                            ram: ram as u32,
                            payload: ram as u32,
                            algorithm: None,
                        },
                        payload: want_raw.then_some(data),
                        digest,
                    }
                })
            }
        }
    };
    let mut index = ContentIndex {
        compression: c,
        files: Vec::with_capacity(nodes.len()),
        pieces: Vec::new(),
        kept: HashMap::new(),
        kept_inline: HashMap::new(),
        digest: [0; 32],
        bytes_read: 0,
        kept_bytes: 0,
    };
    let mut current: Option<u32> = None;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let consume = |d: Done| -> Result<()> {
        match d {
            Done::Small {
                node,
                stored,
                payload,
                digest,
            } => {
                sha2::Digest::update(&mut hasher, node.to_le_bytes());
                sha2::Digest::update(&mut hasher, digest);
                if !payload.is_empty() && index.kept_bytes + payload.len() as u64 <= opts.keep_bytes
                {
                    index.kept_bytes += payload.len() as u64;
                    index.kept_inline.insert(node, payload.into());
                }
                index.files.push((node, stored));
                current = None;
            }
            Done::Piece {
                node,
                piece,
                payload,
                digest,
            } => {
                sha2::Digest::update(&mut hasher, node.to_le_bytes());
                sha2::Digest::update(&mut hasher, piece.file_offset.to_le_bytes());
                sha2::Digest::update(&mut hasher, digest);
                let i = u32::try_from(index.pieces.len())
                    .ok()
                    .filter(|&i| i < u32::MAX)
                    .ok_or_else(|| Error::msg("too many data pieces"))?;
                if current != Some(node) {
                    index
                        .files
                        .push((node, Stored::Pieces { first: i, count: 0 }));
                    current = Some(node);
                }
                if let Some(Stored::Pieces { count, .. }) = index.files.last_mut().map(|f| &mut f.1)
                {
                    *count += 1;
                }
                if let (Some(s), Some(p)) = (sink.as_mut(), &payload) {
                    s(node, &piece, p)?;
                }
                if let (Some(p), Some(_)) = (payload, piece.algorithm) {
                    if index.kept_bytes + p.len() as u64 <= opts.keep_bytes {
                        index.kept_bytes += p.len() as u64;
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
    index.bytes_read = read.load(Ordering::Relaxed);
    index.digest = sha2::Digest::finalize(hasher).into();
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Segment;

    #[test]
    fn pieces_are_128k_runs_of_aligned_segments() {
        let k = 1024u64;
        assert_eq!(
            cut(300 * k, Segments::Whole(300 * k)),
            vec![(0, 128 * k), (128 * k, 128 * k), (256 * k, 44 * k)]
        );
        assert_eq!(cut(5000, Segments::Whole(5000)), vec![(0, 5000)]);
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
            cut(2 << 20, Segments::Sparse(&segs)),
            vec![(0, 4096), (1 << 20, 128 * k), ((1 << 20) + 128 * k, 4096)]
        );
    }
}

//! Source trees described in memory: names, modes, owners, times, sizes,
//! holes, xattrs and hard links, with file bytes made from a seed. They let
//! tests and fuzzers drive the whole planner and every block encoder without
//! a filesystem, and check the kernel's view of an export against the
//! description itself.

use super::{Fill, Kind, NewNode, Origin, Segment, SourceTree, NONE};
use crate::error::{Error, Result};
use crate::format::Timespec;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Attributes every entry has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (0o7777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
    /// Sorted by name; names must be unique.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            perm: 0o644,
            uid: 0,
            gid: 0,
            mtime: Timespec { sec: 1, nsec: 0 },
            xattrs: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Dir(BTreeMap<Vec<u8>, Entry>),
    File {
        size: u64,
        /// Data ranges; `None`: no holes. Must be sorted, disjoint, inside `size`.
        data: Option<Vec<Segment>>,
        fill: Fill,
    },
    Symlink(Vec<u8>),
    Fifo,
    Socket,
    /// Device number in the kernel's encoding (major << 20 | minor).
    CharDev(u64),
    BlockDev(u64),
}

/// One entry. Entries (other than directories) with the same `link` id are
/// hard links of one inode; the first in tree order gives its attributes and
/// content, as the first stat of a host inode does in the walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub meta: Meta,
    pub content: Content,
    pub link: Option<u64>,
}

impl Entry {
    pub fn dir(children: BTreeMap<Vec<u8>, Entry>) -> Entry {
        Entry {
            meta: Meta {
                perm: 0o755,
                ..Meta::default()
            },
            content: Content::Dir(children),
            link: None,
        }
    }

    pub fn file(size: u64, fill: Fill) -> Entry {
        Entry {
            meta: Meta::default(),
            content: Content::File {
                size,
                data: None,
                fill,
            },
            link: None,
        }
    }

    pub fn symlink(target: &[u8]) -> Entry {
        Entry {
            meta: Meta {
                perm: 0o777,
                ..Meta::default()
            },
            content: Content::Symlink(target.to_vec()),
            link: None,
        }
    }

    pub fn kind(&self) -> Kind {
        match self.content {
            Content::Dir(_) => Kind::Dir,
            Content::File { .. } => Kind::File,
            Content::Symlink(_) => Kind::Symlink,
            Content::Fifo => Kind::Fifo,
            Content::Socket => Kind::Socket,
            Content::CharDev(_) => Kind::CharDev,
            Content::BlockDev(_) => Kind::BlockDev,
        }
    }
}

fn child_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

fn bad(path: &[u8], why: impl std::fmt::Display) -> Error {
    let p = if path.is_empty() { b"/" } else { path };
    Error::at(&PathBuf::from(OsStr::from_bytes(p)), why)
}

/// Builds the arena of `root` (a directory) breadth-first with names in byte
/// order, exactly as the walk orders a host tree.
pub fn build(root: &Entry) -> Result<SourceTree> {
    let Content::Dir(_) = &root.content else {
        return Err(bad(b"", "the root of a generated tree must be a directory"));
    };
    // Directories in the order `build_with` asks for their children.
    let mut dirs: VecDeque<&Entry> = VecDeque::from([root]);
    build_with(&root.meta, |_, _| {
        let Some(Entry {
            content: Content::Dir(children),
            ..
        }) = dirs.pop_front()
        else {
            return Ok(Vec::new());
        };
        for e in children.values() {
            if let Content::Dir(_) = e.content {
                dirs.push_back(e);
            }
        }
        Ok(children
            .iter()
            .map(|(n, e)| {
                let shallow = match &e.content {
                    Content::Dir(_) => Entry {
                        meta: e.meta.clone(),
                        content: Content::Dir(BTreeMap::new()),
                        link: e.link,
                    },
                    _ => e.clone(),
                };
                (n.clone(), shallow)
            })
            .collect())
    })
}

/// Builds a tree one directory at a time: `children(node, path)` returns the
/// entries of directory `node` (at image path `path`), sorted by name, and is
/// called for every directory in breadth-first order. A child directory's own
/// entries in the returned `Content::Dir` are ignored: they come from its own
/// call. Only one directory's description is held at a time, so very large
/// trees can be described cheaply.
pub fn build_with(
    root: &Meta,
    mut children: impl FnMut(u32, &[u8]) -> Result<Vec<(Vec<u8>, Entry)>>,
) -> Result<SourceTree> {
    let mut tree = SourceTree::new(Origin::Generated { fills: Vec::new() });
    let mut fills = Vec::new();
    let mut links: HashMap<u64, u32> = HashMap::new();
    let root_entry = Entry {
        meta: root.clone(),
        content: Content::Dir(BTreeMap::new()),
        link: None,
    };
    let idx = push(
        &mut tree,
        &mut fills,
        &mut links,
        NONE,
        b"",
        &root_entry,
        b"",
    )?;
    let mut queue: VecDeque<(u32, Vec<u8>)> = VecDeque::from([(idx, Vec::new())]);
    while let Some((dir, path)) = queue.pop_front() {
        let kids = children(dir, &path)?;
        let first = tree.len() as u32;
        for (i, (name, child)) in kids.iter().enumerate() {
            if i > 0 && kids[i - 1].0 >= *name {
                return Err(bad(
                    &child_path(&path, name),
                    "entries must be given sorted by name, each name once",
                ));
            }
            if name.is_empty()
                || name.contains(&b'/')
                || name.contains(&0)
                || name == b"."
                || name == b".."
            {
                return Err(bad(
                    &child_path(&path, name),
                    "not a valid file name (empty, '.', '..', or containing '/' or NUL)",
                ));
            }
            let p = child_path(&path, name);
            let idx = push(&mut tree, &mut fills, &mut links, dir, name, child, &p)?;
            if matches!(child.content, Content::Dir(_)) {
                queue.push_back((idx, p));
            }
        }
        let count = u32::try_from(kids.len()).map_err(|_| bad(&path, "too many entries"))?;
        tree.set_children(dir, first, count);
    }
    tree.origin = Origin::Generated { fills };
    tree.shrink_to_fit();
    Ok(tree)
}

fn push(
    tree: &mut SourceTree,
    fills: &mut Vec<Fill>,
    links: &mut HashMap<u64, u32>,
    parent: u32,
    name: &[u8],
    e: &Entry,
    path: &[u8],
) -> Result<u32> {
    let idx = tree.len() as u32;
    let mut n = NewNode::new(e.kind(), e.meta.perm);
    n.uid = e.meta.uid;
    n.gid = e.meta.gid;
    n.mtime = e.meta.mtime;
    if e.meta.mtime.nsec >= 1_000_000_000 {
        return Err(bad(path, "nanoseconds of mtime must be below 1e9"));
    }
    if e.meta.xattrs.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(bad(path, "xattrs must be sorted by name and unique"));
    }
    n.xattrs = &e.meta.xattrs;
    if let (Some(id), false) = (e.link, matches!(e.content, Content::Dir(_))) {
        let rep = *links.entry(id).or_insert(idx);
        if rep != idx {
            let kind = tree.node(rep).kind;
            if kind != e.kind() {
                return Err(bad(path, "a hard link of an entry of another kind"));
            }
            n.link_rep = Some(rep);
        }
    }
    match &e.content {
        Content::File { size, data, fill } => {
            n.size = *size;
            if let Some(segs) = data {
                let sorted = segs
                    .windows(2)
                    .all(|w| w[0].offset + w[0].len <= w[1].offset);
                let inside = segs
                    .iter()
                    .all(|s| s.len > 0 && s.offset.checked_add(s.len).is_some_and(|e| e <= *size));
                if !sorted || !inside {
                    return Err(bad(
                        path,
                        "data segments must be non-empty, sorted, disjoint and inside the file",
                    ));
                }
            }
            n.segments = data.as_deref();
            if n.link_rep.is_none() {
                n.host = u32::try_from(fills.len()).map_err(|_| bad(path, "too many files"))?;
                fills.push(*fill);
            }
        }
        Content::Symlink(t) => n.target = t,
        Content::CharDev(r) | Content::BlockDev(r) => n.rdev = *r,
        _ => {}
    }
    tree.push(parent, name, n)
}

/// The bytes of a generated file at `offset` (`out.len()` bytes): a pure
/// function of the fill and the position.
pub fn fill_bytes(fill: Fill, offset: u64, out: &mut [u8]) {
    match fill {
        Fill::Zeros => out.fill(0),
        Fill::Random(seed) => {
            let mut pos = offset;
            let mut i = 0;
            while i < out.len() {
                let word = mix(seed ^ mix(pos / 8));
                let bytes = word.to_le_bytes();
                let start = (pos % 8) as usize;
                let n = (8 - start).min(out.len() - i);
                out[i..i + n].copy_from_slice(&bytes[start..start + n]);
                i += n;
                pos += n as u64;
            }
        }
        Fill::Text(seed) => {
            // Lines of 64 bytes, each made of words chosen by a hash of the
            // seed and the line number.
            const WORDS: [&[u8]; 16] = [
                b"the ", b"btrfs ", b"image ", b"of ", b"a ", b"store ", b"path ", b"is ",
                b"built ", b"from ", b"files ", b"and ", b"their ", b"bytes ", b"never ", b"move ",
            ];
            let mut pos = offset;
            let mut i = 0;
            let mut line_no = u64::MAX;
            let mut line = [0u8; 64];
            while i < out.len() {
                if pos / 64 != line_no {
                    line_no = pos / 64;
                    let mut h = mix(seed ^ mix(line_no));
                    let mut l = 0;
                    while l < 63 {
                        let w = WORDS[(h & 15) as usize];
                        h = h.rotate_right(4) ^ line_no;
                        let n = w.len().min(63 - l);
                        line[l..l + n].copy_from_slice(&w[..n]);
                        l += n;
                    }
                    line[63] = b'\n';
                }
                let start = (pos % 64) as usize;
                let n = (64 - start).min(out.len() - i);
                out[i..i + n].copy_from_slice(&line[start..start + n]);
                i += n;
                pos += n as u64;
            }
        }
    }
}

/// SplitMix64's finalizer: a cheap bijective mixer.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bytes of `[offset, offset + out.len())` of a generated file with
/// `segments` (holes read as zeros, as does anything past `size`).
pub fn file_bytes(fill: Fill, size: u64, data: Option<&[Segment]>, offset: u64, out: &mut [u8]) {
    let end = offset + out.len() as u64;
    out.fill(0);
    let whole = [Segment {
        offset: 0,
        len: size,
    }];
    for s in data.unwrap_or(&whole) {
        let a = s.offset.max(offset);
        let b = (s.offset + s.len).min(end).min(size);
        if a < b {
            fill_bytes(
                fill,
                a,
                &mut out[(a - offset) as usize..(b - offset) as usize],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_are_random_access() {
        for fill in [Fill::Random(7), Fill::Text(9), Fill::Zeros] {
            let mut whole = vec![0u8; 1000];
            fill_bytes(fill, 0, &mut whole);
            for (a, b) in [(0, 1), (3, 17), (63, 129), (500, 1000), (999, 1000)] {
                let mut part = vec![0u8; b - a];
                fill_bytes(fill, a as u64, &mut part);
                assert_eq!(part, whole[a..b], "{fill:?} {a}..{b}");
            }
        }
        let mut t = vec![0u8; 128];
        fill_bytes(Fill::Text(1), 0, &mut t);
        assert!(t.iter().all(|b| b.is_ascii()));
    }

    #[test]
    fn builds_in_name_order_breadth_first() {
        let mut sub = BTreeMap::new();
        sub.insert(b"z".to_vec(), Entry::file(5, Fill::Zeros));
        let mut root = BTreeMap::new();
        root.insert(b"b".to_vec(), Entry::dir(sub));
        root.insert(b"a".to_vec(), Entry::symlink(b"target"));
        let t = build(&Entry::dir(root)).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t.name(1), b"a");
        assert_eq!(t.name(2), b"b");
        assert_eq!(t.name(3), b"z");
        assert_eq!(t.link_target(1), b"target");
        assert_eq!(t.image_path(3), PathBuf::from("/b/z"));
        assert_eq!(t.fill(3), Some(Fill::Zeros));
    }

    #[test]
    fn bad_descriptions_are_errors_naming_the_path() {
        let mut root = BTreeMap::new();
        root.insert(
            b"f".to_vec(),
            Entry {
                content: Content::File {
                    size: 10,
                    data: Some(vec![Segment { offset: 8, len: 4 }]),
                    fill: Fill::Zeros,
                },
                ..Entry::file(0, Fill::Zeros)
            },
        );
        let e = build(&Entry::dir(root)).unwrap_err().to_string();
        assert!(e.starts_with("/f: "), "{e}");
    }
}

//! The staged tree as read from the host: one arena of entries in breadth-first
//! order with every directory's children contiguous and sorted by name bytes.
//! Nothing here reads file data; the planner never sees the host again.

mod spec;
mod sys;
mod walk;

use crate::format::Timespec;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

pub use spec::{Closure, Sources, VEntry, VirtualDir, DEFAULT_REGISTRATION_PATH, STORE_DIR};
pub use walk::{walk, walk_dir, WalkOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// Sentinel for "no index".
pub const NONE: u32 = u32::MAX;

/// One directory entry of the staged tree (node 0 is the root directory).
#[derive(Clone, Debug)]
pub struct Node {
    pub parent: u32,
    /// Host directory this entry was listed from (`SourceTree::path`), or `NONE`.
    host_dir: u32,
    name_off: u32,
    name_len: u16,
    pub kind: Kind,
    /// Full st_mode, type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
    /// Host ctime, kept only to notice a source that changed after planning.
    pub host_ctime: Timespec,
    /// i_size (regular files), target length (symlinks), 0 otherwise.
    pub size: u64,
    /// Hard links: the first node (in tree order) of the same host inode; itself otherwise.
    pub link_rep: u32,
    xattr_start: u32,
    xattr_count: u32,
    /// Kind-specific values, kept in one place because every entry has one kind:
    /// directories: first child, child count; regular files: first data segment
    /// (`NONE` = the whole file is data), segment count; symlinks: target offset in
    /// the blob arena (`wide`), target length; devices: rdev (`wide`).
    wide: u64,
    a: u32,
    b: u32,
}

impl Node {
    /// Device number in the kernel's internal encoding (major << 20 | minor).
    pub fn rdev(&self) -> u64 {
        match self.kind {
            Kind::CharDev | Kind::BlockDev => self.wide,
            _ => 0,
        }
    }

    /// Directories: number of entries.
    pub fn nchildren(&self) -> u32 {
        if self.kind == Kind::Dir {
            self.b
        } else {
            0
        }
    }

    /// Directories: node index of the first entry.
    pub fn first_child(&self) -> u32 {
        self.a
    }
}

#[derive(Clone, Copy, Debug)]
struct XattrRef {
    off: u64,
    name_len: u32,
    value_len: u32,
}

/// A byte range of a file that holds data (everything else is a hole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug)]
pub struct SourceTree {
    pub nodes: Vec<Node>,
    /// Every host directory that was listed; nodes refer to their parent's.
    dirs: Vec<PathBuf>,
    /// Host paths of entries whose host name differs from their image name, or
    /// that were grafted (closure store paths, the registration, ROOT itself).
    host_paths: BTreeMap<u32, PathBuf>,
    names: Vec<u8>,
    blobs: Vec<u8>,
    xattrs: Vec<XattrRef>,
    segments: Vec<Segment>,
}

impl SourceTree {
    pub fn name(&self, n: u32) -> &[u8] {
        let node = &self.nodes[n as usize];
        &self.names[node.name_off as usize..node.name_off as usize + node.name_len as usize]
    }

    pub fn node(&self, n: u32) -> &Node {
        &self.nodes[n as usize]
    }

    /// Symlink target bytes (no trailing NUL).
    pub fn link_target(&self, n: u32) -> &[u8] {
        let node = &self.nodes[n as usize];
        if node.kind != Kind::Symlink {
            return &[];
        }
        &self.blobs[node.wide as usize..node.wide as usize + node.b as usize]
    }

    /// Extended attributes as (name, value), sorted by name.
    pub fn xattrs(&self, n: u32) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let node = &self.nodes[n as usize];
        self.xattrs[node.xattr_start as usize..(node.xattr_start + node.xattr_count) as usize]
            .iter()
            .map(move |x| {
                let o = x.off as usize;
                let n = x.name_len as usize;
                (
                    &self.blobs[o..o + n],
                    &self.blobs[o + n..o + n + x.value_len as usize],
                )
            })
    }

    pub fn xattr_count(&self, n: u32) -> u32 {
        self.nodes[n as usize].xattr_count
    }

    /// Data segments of a regular file; a file without holes is one segment.
    pub fn segments(&self, n: u32) -> Vec<Segment> {
        let node = &self.nodes[n as usize];
        if node.kind != Kind::File || node.a == NONE {
            if node.size == 0 {
                Vec::new()
            } else {
                vec![Segment {
                    offset: 0,
                    len: node.size,
                }]
            }
        } else {
            self.segments[node.a as usize..(node.a + node.b) as usize].to_vec()
        }
    }

    /// Children of a directory node, in name order.
    pub fn children(&self, n: u32) -> std::ops::Range<u32> {
        let node = &self.nodes[n as usize];
        node.first_child()..node.first_child() + node.nchildren()
    }

    /// Host path of a node (for reading and for messages); for directories that
    /// exist only in the image, their image path.
    pub fn path(&self, n: u32) -> PathBuf {
        if let Some(p) = self.host_paths.get(&n) {
            return p.clone();
        }
        let node = &self.nodes[n as usize];
        if node.host_dir != NONE {
            return self.dirs[node.host_dir as usize].join(OsStr::from_bytes(self.name(n)));
        }
        self.image_path(n)
    }

    /// Absolute path of a node inside the image.
    pub fn image_path(&self, n: u32) -> PathBuf {
        let mut parts = Vec::new();
        let mut cur = n;
        while cur != 0 {
            parts.push(cur);
            cur = self.nodes[cur as usize].parent;
        }
        let mut p = PathBuf::from("/");
        for &c in parts.iter().rev() {
            p.push(OsStr::from_bytes(self.name(c)));
        }
        p
    }

    /// Number of entries (including the root directory).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

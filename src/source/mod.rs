//! The staged tree: one arena of entries in breadth-first order with every
//! directory's children contiguous and sorted by name bytes. It comes either
//! from the host (the walk: ROOT, a Nix closure, overlays) or from a
//! description in memory (`generated`: tests and fuzzing drive the planner
//! without a filesystem). Nothing here reads file data at planning time; file
//! bytes are read later through [`files::FileData`].

pub mod files;
pub mod generated;
pub mod layout;
mod spec;
mod sys;
mod walk;

use crate::error::{Error, Result};
use crate::format::Timespec;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

pub use spec::{
    check_mountpoint, in_image, Closure, Sources, VEntry, VirtualDir, DEFAULT_REGISTRATION_PATH,
    STORE_DIR,
};
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

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::Dir => libc::S_IFDIR,
            Kind::File => libc::S_IFREG,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind of an `st_mode`.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// Sentinel for "no index".
pub const NONE: u32 = u32::MAX;

/// Longest name of one directory entry (Linux NAME_MAX; btrfs stores a u16
/// but the kernel refuses longer names).
pub const NAME_MAX: usize = 255;

/// The kernel's limit on links to one inode (BTRFS_LINK_MAX).
pub const LINK_MAX: u32 = 65535;

/// One directory entry of the staged tree (node 0 is the root directory).
/// Kept small: there is one per entry and the budget is ~150 bytes per entry.
#[derive(Clone, Debug)]
pub struct Node {
    pub parent: u32,
    name_off: u64,
    /// i_size (regular files), target length (symlinks), twice the bytes of
    /// the names in it (directories, as btrfs counts), 0 otherwise.
    pub size: u64,
    mtime_sec: i64,
    /// Host ctime and inode number: only to recognise the planned file later.
    ctime_sec: i64,
    ino: u64,
    /// Kind-specific: symlink target offset in the blob arena; device rdev in
    /// the kernel's encoding (major << 20 | minor). A hard link that is not
    /// the first of its inode (`LINK_COPY`) has none of these: here is the
    /// index of the first.
    wide: u64,
    mtime_nsec: u32,
    ctime_nsec: u32,
    pub uid: u32,
    pub gid: u32,
    /// Host: the listed directory this entry came from (`NONE`: grafted or
    /// virtual). Generated: the file's fill index.
    host: u32,
    /// Index into the xattr spans (`NONE`: no extended attributes).
    xattrs: u32,
    /// Directories: first child, child count. Regular files: index of the
    /// data-segment span (`NONE`: the whole file is data), and of the host
    /// device in the device table.
    a: u32,
    b: u32,
    /// Permission bits, and `LINK_COPY`.
    perm: u16,
    name_len: u8,
    pub kind: Kind,
}

/// In `Node::perm`: a hard link whose inode is an earlier node's.
const LINK_COPY: u16 = 0x8000;

impl Node {
    /// Full st_mode, type bits included.
    pub fn mode(&self) -> u32 {
        self.kind.type_bits() | (self.perm & 0o7777) as u32
    }

    fn is_link_copy(&self) -> bool {
        self.perm & LINK_COPY != 0
    }

    pub fn mtime(&self) -> Timespec {
        Timespec {
            sec: self.mtime_sec,
            nsec: self.mtime_nsec,
        }
    }

    /// Device number in the kernel's internal encoding (major << 20 | minor).
    pub fn rdev(&self) -> u64 {
        match self.kind {
            Kind::CharDev | Kind::BlockDev if !self.is_link_copy() => self.wide,
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

/// A byte range of a file that holds data (everything else is a hole).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

/// Who a host file was when it was planned: a file is served only while it is
/// still this inode with the planned size, mtime and ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub ctime: Timespec,
}

/// How the bytes of generated files are made (a pure function of the seed
/// and the offset, so any range can be produced in any order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fill {
    /// Incompressible pseudo-random bytes.
    Random(u64),
    /// All zeros (data, not holes).
    Zeros,
    /// Words from a small vocabulary: compresses like text.
    Text(u64),
}

/// Where the tree's entries came from, and so how their bytes are read.
#[derive(Debug)]
pub enum Origin {
    Host(HostPaths),
    /// Built in memory; `fills[node.host]` makes a file's bytes.
    Generated {
        fills: Vec<Fill>,
    },
}

/// Host locations of the walked entries.
#[derive(Debug, Default)]
pub struct HostPaths {
    /// Every host directory that was listed; nodes refer to their parent's.
    dirs: Vec<PathBuf>,
    /// Entries whose host path is not `dirs[node.host]/name` (closure store
    /// paths, the registration, ROOT itself).
    grafts: BTreeMap<u32, PathBuf>,
    /// Distinct `st_dev` values, so nodes keep a 4-byte index.
    devices: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
struct XattrRef {
    off: u64,
    name_len: u32,
    value_len: u32,
}

#[derive(Debug)]
pub struct SourceTree {
    nodes: Vec<Node>,
    names: Vec<u8>,
    /// Symlink targets, xattr names and values.
    blobs: Vec<u8>,
    xattrs: Vec<XattrRef>,
    /// (first xattr, count) of the nodes that have any.
    xattr_spans: Vec<(u32, u32)>,
    segments: Vec<Segment>,
    /// (first segment, count) of sparse files.
    segment_spans: Vec<(u32, u32)>,
    origin: Origin,
}

/// Data segments of one regular file.
#[derive(Clone, Copy, Debug)]
pub enum Segments<'a> {
    /// No holes: `[0, size)` (nothing when the file is empty).
    Whole(u64),
    Sparse(&'a [Segment]),
}

impl<'a> Segments<'a> {
    pub fn is_empty(&self) -> bool {
        match self {
            Segments::Whole(size) => *size == 0,
            Segments::Sparse(s) => s.is_empty(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Segment> + 'a {
        let (whole, sparse) = match *self {
            Segments::Whole(size) => (
                (size > 0).then_some(Segment {
                    offset: 0,
                    len: size,
                }),
                &[][..],
            ),
            Segments::Sparse(s) => (None, s),
        };
        whole.into_iter().chain(sparse.iter().copied())
    }
}

impl SourceTree {
    pub fn name(&self, n: u32) -> &[u8] {
        let node = &self.nodes[n as usize];
        let o = node.name_off as usize;
        &self.names[o..o + node.name_len as usize]
    }

    pub fn node(&self, n: u32) -> &Node {
        &self.nodes[n as usize]
    }

    /// Hard links: the first node (in tree order) of the same inode; `n` itself otherwise.
    pub fn link_rep(&self, n: u32) -> u32 {
        let node = &self.nodes[n as usize];
        if node.is_link_copy() {
            node.wide as u32
        } else {
            n
        }
    }

    /// Symlink target bytes (no trailing NUL).
    pub fn link_target(&self, n: u32) -> &[u8] {
        let node = &self.nodes[self.link_rep(n) as usize];
        if node.kind != Kind::Symlink {
            return &[];
        }
        let o = node.wide as usize;
        &self.blobs[o..o + node.size as usize]
    }

    /// Extended attributes as (name, value), sorted by name.
    pub fn xattrs(&self, n: u32) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let span = match self.nodes[n as usize].xattrs {
            NONE => &[][..],
            i => {
                let (s, c) = self.xattr_spans[i as usize];
                &self.xattrs[s as usize..(s + c) as usize]
            }
        };
        span.iter().map(move |x| {
            let o = x.off as usize;
            let n = x.name_len as usize;
            (
                &self.blobs[o..o + n],
                &self.blobs[o + n..o + n + x.value_len as usize],
            )
        })
    }

    pub fn xattr_count(&self, n: u32) -> u32 {
        match self.nodes[n as usize].xattrs {
            NONE => 0,
            i => self.xattr_spans[i as usize].1,
        }
    }

    /// Data segments of a regular file.
    pub fn segments(&self, n: u32) -> Segments<'_> {
        let node = &self.nodes[self.link_rep(n) as usize];
        if node.kind != Kind::File {
            return Segments::Whole(0);
        }
        match node.a {
            NONE => Segments::Whole(node.size),
            i => {
                let (s, c) = self.segment_spans[i as usize];
                Segments::Sparse(&self.segments[s as usize..(s + c) as usize])
            }
        }
    }

    /// The child of directory `dir` named `name`.
    pub fn child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        if self.nodes[dir as usize].kind != Kind::Dir {
            return None;
        }
        let kids = self.children(dir);
        let (mut lo, mut hi) = (kids.start, kids.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.name(mid).cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// Whether a node's host path is recorded rather than derived (ROOT,
    /// store paths, the registration).
    pub(crate) fn has_graft(&self, n: u32) -> bool {
        matches!(&self.origin, Origin::Host(h) if h.grafts.contains_key(&n))
    }

    /// Children of a directory node, in name order.
    pub fn children(&self, n: u32) -> std::ops::Range<u32> {
        let node = &self.nodes[n as usize];
        node.first_child()..node.first_child() + node.nchildren()
    }

    /// Host path of a node (for reading and for messages); for entries that
    /// exist only in the image, and for generated trees, their image path.
    pub fn path(&self, n: u32) -> PathBuf {
        if let Origin::Host(h) = &self.origin {
            if let Some(p) = h.grafts.get(&n) {
                return p.clone();
            }
            let node = &self.nodes[n as usize];
            if node.host != NONE {
                return h.dirs[node.host as usize].join(OsStr::from_bytes(self.name(n)));
            }
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

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The host identity of a walked regular file.
    pub fn identity(&self, n: u32) -> Option<Identity> {
        let Origin::Host(h) = &self.origin else {
            return None;
        };
        let node = &self.nodes[n as usize];
        (node.kind == Kind::File).then(|| Identity {
            dev: h.devices.get(node.b as usize).copied().unwrap_or(0),
            ino: node.ino,
            ctime: Timespec {
                sec: node.ctime_sec,
                nsec: node.ctime_nsec,
            },
        })
    }

    /// How a generated file's bytes are made.
    pub fn fill(&self, n: u32) -> Option<Fill> {
        match &self.origin {
            Origin::Generated { fills } => fills.get(self.nodes[n as usize].host as usize).copied(),
            Origin::Host(_) => None,
        }
    }

    /// Bytes of names, targets and xattrs (for memory accounting).
    pub fn name_bytes(&self) -> usize {
        self.names.len()
    }
}

/// Everything about a new entry that the arena stores.
pub(crate) struct NewNode<'a> {
    pub kind: Kind,
    /// Permission bits (the type comes from `kind`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
    /// Regular files: i_size.
    pub size: u64,
    /// The first node of the same inode, for hard links.
    pub link_rep: Option<u32>,
    /// Host directory index or fill index.
    pub host: u32,
    pub identity: Option<Identity>,
    pub target: &'a [u8],
    pub rdev: u64,
    /// Regular files with holes: the data segments.
    pub segments: Option<&'a [Segment]>,
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

impl<'a> NewNode<'a> {
    pub fn new(kind: Kind, perm: u32) -> NewNode<'a> {
        NewNode {
            kind,
            perm,
            uid: 0,
            gid: 0,
            mtime: Timespec::default(),
            size: 0,
            link_rep: None,
            host: NONE,
            identity: None,
            target: &[],
            rdev: 0,
            segments: None,
            xattrs: &[],
        }
    }
}

fn index(len: usize, what: &str) -> Result<u32> {
    u32::try_from(len)
        .ok()
        .filter(|&i| i != NONE)
        .ok_or_else(|| {
            Error::msg(format!(
                "too many {what} in the tree (at most {})",
                NONE - 1
            ))
        })
}

impl SourceTree {
    pub(crate) fn new(origin: Origin) -> SourceTree {
        SourceTree {
            nodes: Vec::new(),
            names: Vec::new(),
            blobs: Vec::new(),
            xattrs: Vec::new(),
            xattr_spans: Vec::new(),
            segments: Vec::new(),
            segment_spans: Vec::new(),
            origin,
        }
    }

    /// Appends an entry under `parent` (`NONE` for the root) and returns its
    /// index. Children of one directory must be pushed contiguously, in name
    /// order, and then recorded with `set_children`.
    pub(crate) fn push(&mut self, parent: u32, name: &[u8], n: NewNode<'_>) -> Result<u32> {
        let idx = index(self.nodes.len(), "entries")?;
        if name.len() > NAME_MAX {
            let mut p = if parent == NONE {
                PathBuf::from("/")
            } else {
                self.image_path(parent)
            };
            p.push(OsStr::from_bytes(name));
            return Err(Error::at(
                &p,
                format!(
                    "name of {} bytes is longer than {NAME_MAX} bytes",
                    name.len()
                ),
            ));
        }
        let name_off = self.names.len() as u64;
        self.names.extend_from_slice(name);
        let dev = match (&mut self.origin, n.identity) {
            (Origin::Host(h), Some(id)) => match h.devices.iter().position(|&d| d == id.dev) {
                Some(i) => i as u32,
                None => {
                    h.devices.push(id.dev);
                    (h.devices.len() - 1) as u32
                }
            },
            _ => 0,
        };
        let id = n.identity.unwrap_or(Identity {
            dev: 0,
            ino: 0,
            ctime: Timespec::default(),
        });
        let mut node = Node {
            parent,
            name_off,
            size: 0,
            mtime_sec: n.mtime.sec,
            ctime_sec: id.ctime.sec,
            ino: id.ino,
            wide: 0,
            mtime_nsec: n.mtime.nsec,
            ctime_nsec: id.ctime.nsec,
            uid: n.uid,
            gid: n.gid,
            host: n.host,
            xattrs: NONE,
            a: NONE,
            b: 0,
            perm: (n.perm & 0o7777) as u16,
            name_len: name.len() as u8,
            kind: n.kind,
        };
        if let Some(rep) = n.link_rep {
            // Everything but the name and parent is the first link's.
            node.perm |= LINK_COPY;
            node.wide = rep as u64;
            node.size = self.nodes[rep as usize].size;
            self.nodes.push(node);
            return Ok(idx);
        }
        match n.kind {
            Kind::File => {
                node.size = n.size;
                node.b = dev;
                let whole = [Segment {
                    offset: 0,
                    len: n.size,
                }];
                let sparse = n.segments.filter(|s| s[..] != whole);
                if let (Some(segs), None) = (sparse, n.link_rep) {
                    let start = index(self.segments.len(), "data segments")?;
                    index(self.segments.len() + segs.len(), "data segments")?;
                    node.a = index(self.segment_spans.len(), "sparse files")?;
                    self.segment_spans.push((start, segs.len() as u32));
                    self.segments.extend_from_slice(segs);
                }
            }
            Kind::Symlink => {
                node.size = n.target.len() as u64;
                node.wide = self.blobs.len() as u64;
                self.blobs.extend_from_slice(n.target);
            }
            Kind::CharDev | Kind::BlockDev => node.wide = n.rdev,
            _ => {}
        }
        if !n.xattrs.is_empty() {
            let start = index(self.xattrs.len(), "extended attributes")?;
            index(self.xattrs.len() + n.xattrs.len(), "extended attributes")?;
            node.xattrs = index(self.xattr_spans.len(), "entries with extended attributes")?;
            self.xattr_spans.push((start, n.xattrs.len() as u32));
            for (name, value) in n.xattrs {
                self.xattrs.push(XattrRef {
                    off: self.blobs.len() as u64,
                    name_len: name.len() as u32,
                    value_len: value.len() as u32,
                });
                self.blobs.extend_from_slice(name);
                self.blobs.extend_from_slice(value);
            }
        }
        self.nodes.push(node);
        Ok(idx)
    }

    /// Records that directory `dir`'s children are nodes `first..first + count`
    /// and sets its size as btrfs counts it (twice the bytes of its names).
    pub(crate) fn set_children(&mut self, dir: u32, first: u32, count: u32) {
        let size: u64 = (first..first + count)
            .map(|c| 2 * self.nodes[c as usize].name_len as u64)
            .sum();
        let node = &mut self.nodes[dir as usize];
        debug_assert_eq!(node.kind, Kind::Dir);
        node.a = first;
        node.b = count;
        node.size = size;
    }

    pub(crate) fn host_paths_mut(&mut self) -> Option<&mut HostPaths> {
        match &mut self.origin {
            Origin::Host(h) => Some(h),
            Origin::Generated { .. } => None,
        }
    }

    pub(crate) fn shrink_to_fit(&mut self) {
        self.nodes.shrink_to_fit();
        self.names.shrink_to_fit();
        self.blobs.shrink_to_fit();
        self.xattrs.shrink_to_fit();
        self.xattr_spans.shrink_to_fit();
    }
}

impl HostPaths {
    /// Records a listed host directory; returns its index.
    pub(crate) fn add_dir(&mut self, p: PathBuf) -> Result<u32> {
        let i = index(self.dirs.len(), "directories")?;
        self.dirs.push(p);
        Ok(i)
    }

    pub(crate) fn dir(&self, i: u32) -> &std::path::Path {
        &self.dirs[i as usize]
    }

    pub(crate) fn graft(&mut self, node: u32, p: PathBuf) {
        self.grafts.insert(node, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_stays_small() {
        assert!(
            std::mem::size_of::<Node>() <= 88,
            "{}",
            std::mem::size_of::<Node>()
        );
    }

    #[test]
    fn names_over_255_bytes_are_refused_with_their_path() {
        let mut t = SourceTree::new(Origin::Generated { fills: Vec::new() });
        let root = t.push(NONE, b"", NewNode::new(Kind::Dir, 0o755)).unwrap();
        let e = t
            .push(root, &[b'x'; 256], NewNode::new(Kind::File, 0o644))
            .unwrap_err();
        assert!(e.to_string().starts_with("/xxx"), "{e}");
        assert!(e.to_string().contains("256 bytes"), "{e}");
    }
}

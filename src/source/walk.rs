//! Reads the staged tree breadth-first: lstat, readlink, xattrs and hole maps,
//! never file contents. Every image directory may have several contributors
//! (ROOT, virtual closure directories, overlay directories); their entries are
//! merged by name. Children are sorted by name bytes so nothing of the host's
//! readdir order or inode numbering reaches the image.

use super::spec::{Sources, VEntry, VirtualDir};
use super::*;
use crate::error::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

#[derive(Clone, Debug, Default)]
pub struct WalkOptions {
    /// Read extended attributes of every entry.
    pub xattrs: bool,
    /// mtime of directories that exist only in the image (/nix, /nix/store).
    pub virtual_time: i64,
}

/// One source of a directory's entries.
enum Contrib {
    Host(PathBuf),
    Virtual(VirtualDir),
}

/// One candidate for a name: where it comes from and what it is.
enum Cand {
    /// Listed from host directory `dirs[dir]`.
    Listed {
        dir: u32,
        meta: fs::Metadata,
    },
    /// Grafted host path (store path, registration).
    Graft {
        path: PathBuf,
        meta: fs::Metadata,
    },
    Virtual(VirtualDir),
}

impl Cand {
    fn is_dir(&self) -> bool {
        match self {
            Cand::Listed { meta, .. } | Cand::Graft { meta, .. } => meta.is_dir(),
            Cand::Virtual(_) => true,
        }
    }
}

struct Builder {
    tree: SourceTree,
    links: HashMap<(u64, u64), u32>,
    opts: WalkOptions,
    pending: VecDeque<Vec<Contrib>>,
}

/// Walks a single directory (`mkfs.btrfs --rootdir` style).
pub fn walk_dir(root: &Path, opts: &WalkOptions) -> Result<SourceTree> {
    walk(
        &Sources {
            root: Some(root.to_path_buf()),
            ..Default::default()
        },
        opts,
    )
}

fn check_dir(p: &Path, what: &str) -> Result<fs::Metadata> {
    let m = fs::symlink_metadata(p).map_err(|e| Error::io(p, e))?;
    if !m.is_dir() {
        return Err(Error::at(p, format!("{what} is not a directory")));
    }
    Ok(m)
}

/// Walks all sources into one `SourceTree`.
pub fn walk(sources: &Sources, opts: &WalkOptions) -> Result<SourceTree> {
    let mut contribs = Vec::new();
    let root_meta = match &sources.root {
        Some(r) => {
            let m = check_dir(r, "ROOT")?;
            contribs.push(Contrib::Host(r.clone()));
            Some(m)
        }
        None => None,
    };
    let vroot = sources.virtual_root()?;
    if !vroot.entries.is_empty() {
        contribs.push(Contrib::Virtual(vroot));
    }
    for f in &sources.files {
        check_dir(f, "--files directory")?;
        contribs.push(Contrib::Host(f.clone()));
    }
    let mut b = Builder {
        tree: SourceTree {
            nodes: Vec::new(),
            dirs: Vec::new(),
            host_paths: BTreeMap::new(),
            names: Vec::new(),
            blobs: Vec::new(),
            xattrs: Vec::new(),
            segments: Vec::new(),
        },
        links: HashMap::new(),
        opts: opts.clone(),
        pending: VecDeque::new(),
    };
    match (&sources.root, root_meta) {
        (Some(r), Some(m)) => {
            b.push_host(r, NONE, NONE, b"", &m)?;
            b.tree.host_paths.insert(0, r.clone());
        }
        _ => b.push_virtual_dir(NONE, b""),
    }
    b.pending.push_back(contribs);

    let mut i = 0usize;
    while i < b.tree.nodes.len() {
        if b.tree.nodes[i].kind == Kind::Dir {
            let c = b.pending.pop_front().unwrap_or_default();
            b.read_dir(i as u32, c)?;
        }
        i += 1;
    }
    Ok(b.tree)
}

impl Builder {
    fn read_dir(&mut self, n: u32, contribs: Vec<Contrib>) -> Result<()> {
        let mut cands: BTreeMap<Vec<u8>, Vec<Cand>> = BTreeMap::new();
        for c in contribs {
            match c {
                Contrib::Host(dir) => {
                    let idx = self.tree.dirs.len() as u32;
                    let rd = fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
                    let mut names = Vec::new();
                    for ent in rd {
                        let ent = ent.map_err(|e| Error::io(&dir, e))?;
                        names.push(ent.file_name().as_bytes().to_vec());
                    }
                    for name in names {
                        let path = dir.join(OsStr::from_bytes(&name));
                        let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
                        cands
                            .entry(name)
                            .or_default()
                            .push(Cand::Listed { dir: idx, meta });
                    }
                    self.tree.dirs.push(dir);
                }
                Contrib::Virtual(v) => {
                    for (name, e) in v.entries {
                        let cand = match e {
                            VEntry::Dir(d) => Cand::Virtual(d),
                            VEntry::Host(path) => {
                                let meta =
                                    fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
                                Cand::Graft { path, meta }
                            }
                        };
                        cands.entry(name).or_default().push(cand);
                    }
                }
            }
        }

        let first = self.tree.nodes.len();
        if first + cands.len() >= NONE as usize {
            return Err(Error::at(
                &self.tree.path(n),
                "too many entries in the tree",
            ));
        }
        let count = cands.len() as u32;
        for (name, list) in cands {
            if list.len() > 1 && !list.iter().all(Cand::is_dir) {
                return Err(self.conflict(n, &name, &list));
            }
            let mut children = Vec::new();
            let mut pushed = false;
            for cand in list {
                match cand {
                    Cand::Listed { dir, meta } => {
                        let path = self.tree.dirs[dir as usize].join(OsStr::from_bytes(&name));
                        if !pushed {
                            self.push_host(&path, n, dir, &name, &meta)?;
                            pushed = true;
                        }
                        if meta.is_dir() {
                            children.push(Contrib::Host(path));
                        }
                    }
                    Cand::Graft { path, meta } => {
                        if !pushed {
                            let idx = self.tree.nodes.len() as u32;
                            self.push_host(&path, n, NONE, &name, &meta)?;
                            self.tree.host_paths.insert(idx, path.clone());
                            pushed = true;
                        }
                        if meta.is_dir() {
                            children.push(Contrib::Host(path));
                        }
                    }
                    Cand::Virtual(d) => {
                        if !pushed {
                            self.push_virtual_dir(n, &name);
                            pushed = true;
                        }
                        children.push(Contrib::Virtual(d));
                    }
                }
            }
            if self.tree.nodes.last().map(|x| x.kind) == Some(Kind::Dir) {
                self.pending.push_back(children);
            }
        }
        let node = &mut self.tree.nodes[n as usize];
        node.a = first as u32;
        node.b = count;
        Ok(())
    }

    /// The error for two sources providing the same non-directory path.
    fn conflict(&self, parent: u32, name: &[u8], list: &[Cand]) -> Error {
        let describe = |c: &Cand| match c {
            Cand::Listed { dir, .. } => self.tree.dirs[*dir as usize]
                .join(OsStr::from_bytes(name))
                .display()
                .to_string(),
            Cand::Graft { path, .. } => path.display().to_string(),
            Cand::Virtual(_) => "a directory created for the closure".to_string(),
        };
        let mut image = self.tree.image_path(parent);
        image.push(OsStr::from_bytes(name));
        Error::at(
            &image,
            format!(
                "provided by both {} and {}",
                describe(&list[0]),
                describe(&list[1])
            ),
        )
    }

    fn new_node(&mut self, parent: u32, host_dir: u32, name: &[u8], kind: Kind) -> Node {
        let idx = self.tree.nodes.len() as u32;
        let name_off = self.tree.names.len() as u32;
        self.tree.names.extend_from_slice(name);
        Node {
            parent,
            host_dir,
            name_off,
            name_len: name.len() as u16,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: Timespec::default(),
            host_ctime: Timespec::default(),
            size: 0,
            link_rep: idx,
            xattr_start: self.tree.xattrs.len() as u32,
            xattr_count: 0,
            wide: 0,
            a: NONE,
            b: 0,
        }
    }

    /// A directory that exists only in the image: root-owned, 0755, `--timestamp`.
    fn push_virtual_dir(&mut self, parent: u32, name: &[u8]) {
        let mut node = self.new_node(parent, NONE, name, Kind::Dir);
        node.mode = libc::S_IFDIR | 0o755;
        node.mtime = Timespec {
            sec: self.opts.virtual_time,
            nsec: 0,
        };
        node.host_ctime = node.mtime;
        self.tree.nodes.push(node);
    }

    fn push_host(
        &mut self,
        path: &Path,
        parent: u32,
        host_dir: u32,
        name: &[u8],
        meta: &fs::Metadata,
    ) -> Result<()> {
        let idx = self.tree.nodes.len() as u32;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::CharDev
        } else if ft.is_block_device() {
            Kind::BlockDev
        } else {
            return Err(Error::at(path, "unsupported file type"));
        };
        let mut node = self.new_node(parent, host_dir, name, kind);
        if kind != Kind::Dir && meta.nlink() > 1 {
            node.link_rep = *self.links.entry((meta.dev(), meta.ino())).or_insert(idx);
        }
        node.mode = meta.mode();
        node.uid = meta.uid();
        node.gid = meta.gid();
        node.mtime = Timespec {
            sec: meta.mtime(),
            nsec: meta.mtime_nsec() as u32,
        };
        node.host_ctime = Timespec {
            sec: meta.ctime(),
            nsec: meta.ctime_nsec() as u32,
        };

        match kind {
            Kind::File => {
                node.size = meta.len();
                if node.link_rep == idx && meta.len() > 0 && meta.blocks() * 512 < meta.len() {
                    let segs = data_segments(path, meta.len())?;
                    node.a = self.tree.segments.len() as u32;
                    node.b = segs.len() as u32;
                    self.tree.segments.extend(segs);
                }
            }
            Kind::Symlink => {
                let target = fs::read_link(path).map_err(|e| Error::io(path, e))?;
                let t = target.as_os_str().as_bytes();
                node.size = t.len() as u64;
                node.wide = self.tree.blobs.len() as u64;
                node.b = t.len() as u32;
                self.tree.blobs.extend_from_slice(t);
            }
            Kind::CharDev | Kind::BlockDev => {
                let dev = meta.rdev();
                let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
                node.wide = (major << 20) | minor;
            }
            _ => {}
        }

        if self.opts.xattrs {
            let list = read_xattrs(path)?;
            node.xattr_count = list.len() as u32;
            for (name, value) in list {
                self.tree.xattrs.push(XattrRef {
                    off: self.tree.blobs.len() as u64,
                    name_len: name.len() as u32,
                    value_len: value.len() as u32,
                });
                self.tree.blobs.extend_from_slice(&name);
                self.tree.blobs.extend_from_slice(&value);
            }
        }

        self.tree.nodes.push(node);
        Ok(())
    }
}
/// Data ranges of a sparse file found with SEEK_DATA/SEEK_HOLE.
fn data_segments(path: &Path, size: u64) -> Result<Vec<Segment>> {
    let f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let fd = f.as_raw_fd();
    let mut segs = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a valid open fd has no memory-safety preconditions.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            if err.raw_os_error() == Some(libc::EINVAL) {
                // The filesystem does not support SEEK_DATA: all of it is data.
                return Ok(vec![Segment {
                    offset: 0,
                    len: size,
                }]);
            }
            return Err(Error::io(path, err));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(Error::io(path, io::Error::last_os_error()));
        }
        let end = (hole as u64).min(size);
        if end > data as u64 {
            segs.push(Segment {
                offset: data as u64,
                len: end - data as u64,
            });
        }
        pos = hole;
    }
    Ok(segs)
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::at(path, "path contains a NUL byte"))
}

/// All extended attributes of `path` (not following symlinks), sorted by name.
fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cpath(path)?;
    let mut list = vec![0u8; 1024];
    let len = loop {
        // SAFETY: the buffer pointer and length describe a valid writable allocation.
        let r = unsafe { libc::llistxattr(c.as_ptr(), list.as_mut_ptr() as *mut _, list.len()) };
        if r >= 0 {
            break r as usize;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) => list.resize(list.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(Error::io(path, err)),
        }
    };
    let mut out = Vec::new();
    for name in list[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).map_err(|_| Error::at(path, "bad xattr name"))?;
        let mut val = vec![0u8; 256];
        loop {
            // SAFETY: valid C strings and a valid writable buffer.
            let r = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    val.as_mut_ptr() as *mut _,
                    val.len(),
                )
            };
            if r >= 0 {
                val.truncate(r as usize);
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                val.resize(val.len().max(1024) * 4, 0);
                continue;
            }
            return Err(Error::io(path, err));
        }
        out.push((name.to_vec(), val));
    }
    out.sort();
    Ok(out)
}

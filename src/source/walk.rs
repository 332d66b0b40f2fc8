//! Reads the staged tree breadth-first: lstat, readlink, xattrs and hole maps,
//! never file contents. Children are sorted by name bytes so nothing of the host's
//! readdir order or inode numbering reaches the image.

use super::*;
use crate::error::{Error, Result};
use std::collections::HashMap;
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
}

struct Builder {
    tree: SourceTree,
    links: HashMap<(u64, u64), u32>,
    opts: WalkOptions,
}

/// Walks `root` (a directory) into a `SourceTree`.
pub fn walk(root: &Path, opts: &WalkOptions) -> Result<SourceTree> {
    let meta = fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::at(root, "not a directory"));
    }
    let mut b = Builder {
        tree: SourceTree {
            root_path: root.to_path_buf(),
            nodes: Vec::new(),
            names: Vec::new(),
            blobs: Vec::new(),
            xattrs: Vec::new(),
            segments: Vec::new(),
        },
        links: HashMap::new(),
        opts: opts.clone(),
    };
    b.push(root, NONE, b"", &meta)?;

    let mut i = 0usize;
    while i < b.tree.nodes.len() {
        if b.tree.nodes[i].kind == Kind::Dir {
            b.read_dir(i as u32)?;
        }
        i += 1;
    }
    Ok(b.tree)
}

impl Builder {
    fn read_dir(&mut self, n: u32) -> Result<()> {
        let dir = self.tree.path(n);
        let rd = fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(&dir, e))?;
            names.push(ent.file_name().as_bytes().to_vec());
        }
        names.sort_unstable();
        let first = self.tree.nodes.len();
        if first + names.len() >= NONE as usize {
            return Err(Error::at(&dir, "too many entries in the tree"));
        }
        for name in &names {
            let path = dir.join(OsStr::from_bytes(name));
            let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            self.push(&path, n, name, &meta)?;
        }
        let node = &mut self.tree.nodes[n as usize];
        node.first_child = first as u32;
        node.nchildren = names.len() as u32;
        Ok(())
    }

    fn push(&mut self, path: &Path, parent: u32, name: &[u8], meta: &fs::Metadata) -> Result<()> {
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

        let name_off = self.tree.names.len() as u32;
        self.tree.names.extend_from_slice(name);

        let mut link_rep = idx;
        if kind != Kind::Dir && meta.nlink() > 1 {
            link_rep = *self.links.entry((meta.dev(), meta.ino())).or_insert(idx);
        }

        let mut node = Node {
            parent,
            name_off,
            name_len: name.len() as u16,
            kind,
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: Timespec {
                sec: meta.mtime(),
                nsec: meta.mtime_nsec() as u32,
            },
            host_ctime: Timespec {
                sec: meta.ctime(),
                nsec: meta.ctime_nsec() as u32,
            },
            size: 0,
            rdev: 0,
            first_child: 0,
            nchildren: 0,
            link_rep,
            xattr_start: self.tree.xattrs.len() as u32,
            xattr_count: 0,
            seg_start: NONE,
            seg_count: 0,
            blob_off: 0,
            blob_len: 0,
        };

        match kind {
            Kind::File => {
                node.size = meta.len();
                // Ask every non-empty file for its holes: st_blocks proves
                // nothing (ext4 counts its xattr and extent-tree blocks in it,
                // and preallocated space past EOF), so a sparse file can
                // have as many blocks as bytes.
                if link_rep == idx && meta.len() > 0 {
                    let segs = data_segments(path, meta.len())?;
                    let whole = [Segment {
                        offset: 0,
                        len: meta.len(),
                    }];
                    if segs != whole {
                        node.seg_start = self.tree.segments.len() as u32;
                        node.seg_count = segs.len() as u32;
                        self.tree.segments.extend(segs);
                    }
                }
            }
            Kind::Symlink => {
                let target = fs::read_link(path).map_err(|e| Error::io(path, e))?;
                let t = target.as_os_str().as_bytes();
                node.size = t.len() as u64;
                node.blob_off = self.tree.blobs.len() as u64;
                node.blob_len = t.len() as u32;
                self.tree.blobs.extend_from_slice(t);
            }
            Kind::CharDev | Kind::BlockDev => {
                let dev = meta.rdev();
                let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
                node.rdev = (major << 20) | minor;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A file with a leading hole and space preallocated past its end has
    /// more blocks than bytes; its hole must still be found.
    #[test]
    fn holes_found_when_blocks_cover_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = fs::File::create(&p).unwrap();
        f.write_all_at(&[7u8; 4096], 4096).unwrap();
        // SAFETY: fallocate on a valid open fd.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 8192, 1 << 20) };
        assert_eq!(r, 0, "fallocate: {}", io::Error::last_os_error());
        f.sync_all().unwrap();
        drop(f);
        let meta = fs::metadata(&p).unwrap();
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "precondition: {} blocks",
            meta.blocks()
        );

        let tree = walk(dir.path(), &WalkOptions::default()).unwrap();
        let n = tree.children(0).start;
        assert_eq!(tree.name(n), b"f");
        assert_eq!(
            tree.segments(n),
            vec![Segment {
                offset: 4096,
                len: 4096
            }]
        );
    }

    /// Dense files and empty files keep the compact "whole file" form.
    #[test]
    fn dense_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"dense").unwrap();
        fs::write(dir.path().join("b"), b"").unwrap();
        let tree = walk(dir.path(), &WalkOptions::default()).unwrap();
        let (a, b) = (tree.children(0).start, tree.children(0).start + 1);
        assert_eq!(tree.segments(a), vec![Segment { offset: 0, len: 5 }]);
        assert_eq!(tree.nodes[a as usize].seg_start, NONE);
        assert!(tree.segments(b).is_empty());
    }
}

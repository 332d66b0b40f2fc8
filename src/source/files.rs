//! Reading file bytes after planning. Host files are opened so that nothing
//! swapped in for them can block or be read (a FIFO, a device, a symlink):
//! one `open` with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` (a symlink is
//! refused, a FIFO's open and reads never wait, a socket cannot be opened),
//! then nothing is read unless that descriptor is the planned regular file
//! (same device and inode number, size, mtime and ctime). Every read is
//! checked against the plan again afterwards, so bytes of a file that
//! changed before or while it was read are never returned.
//!
//! A device node swapped in for a source file (which takes CAP_MKNOD, that
//! is root, and a filesystem without `nodev`) is opened read-only and
//! non-blocking, found not to be the file, and closed unread. Opening an
//! `O_PATH` descriptor first and reopening it through `/proc/self/fd` would
//! not open even that, but costs twice per file: 10 µs instead of 5 µs
//! (43,900 files of /usr/share, warm cache), the largest part of serving an
//! image of small files (`benches/serve.rs`).

use super::generated::file_bytes;
use super::{Identity, Kind, Origin, SourceTree};
use lru::LruCache;
use parking_lot::Mutex;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

/// File bytes of a planned tree.
pub trait FileData: Send + Sync {
    /// Fills `out` with the bytes of regular file `node` at `offset`. The range
    /// lies within the planned size. Errors name the file.
    fn read(&self, node: u32, offset: u64, out: &mut [u8]) -> io::Result<()>;
}

/// The reader for a tree's origin.
pub fn reader(tree: Arc<SourceTree>) -> Box<dyn FileData> {
    match tree.origin() {
        Origin::Host(_) => Box::new(HostFiles::new(tree)),
        Origin::Generated { .. } => Box::new(GeneratedFiles { tree }),
    }
}

/// Generated trees: bytes from each file's fill.
struct GeneratedFiles {
    tree: Arc<SourceTree>,
}

impl FileData for GeneratedFiles {
    fn read(&self, node: u32, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let fill = self.tree.fill(node).ok_or_else(|| {
            io::Error::other(format!(
                "{}: generated file without a fill",
                crate::error::shown_path(&self.tree.image_path(node))
            ))
        })?;
        let n = self.tree.node(node);
        match self.tree.segments(node) {
            super::Segments::Whole(_) => file_bytes(fill, n.size, None, offset, out),
            super::Segments::Sparse(s) => file_bytes(fill, n.size, Some(s), offset, out),
        }
        Ok(())
    }
}

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

/// Walked trees: positioned reads of the host files through a small cache of
/// verified descriptors.
pub struct HostFiles {
    tree: Arc<SourceTree>,
    files: Mutex<LruCache<u32, Arc<File>>>,
}

fn changed(path: &Path, what: &str) -> io::Error {
    io::Error::other(format!(
        "{}: source file changed after planning ({what})",
        crate::error::shown_path(path)
    ))
}

fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{}: {}", crate::error::shown_path(path), e),
    )
}

/// Why an open file is not the planned one, if it is not.
fn mismatch(
    planned: &Identity,
    size: u64,
    mtime: crate::format::Timespec,
    m: &std::fs::Metadata,
) -> Option<&'static str> {
    if Kind::from_mode(m.mode()) != Some(Kind::File) {
        return Some("it is no longer a regular file");
    }
    if m.dev() != planned.dev || m.ino() != planned.ino {
        return Some("it was replaced by another file");
    }
    if m.len() != size {
        return Some("size differs");
    }
    if m.mtime() != mtime.sec || m.mtime_nsec() as u32 != mtime.nsec {
        return Some("mtime differs");
    }
    if m.ctime() != planned.ctime.sec || m.ctime_nsec() as u32 != planned.ctime.nsec {
        return Some("ctime differs");
    }
    None
}

impl HostFiles {
    pub fn new(tree: Arc<SourceTree>) -> HostFiles {
        HostFiles {
            tree,
            files: Mutex::new(LruCache::new(
                NonZeroUsize::new(open_files_cap()).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn verify(&self, node: u32, path: &Path, m: &std::fs::Metadata) -> io::Result<()> {
        let n = self.tree.node(node);
        let id = self.tree.identity(node).ok_or_else(|| {
            io::Error::other(format!(
                "{}: not a planned regular file",
                crate::error::shown_path(path)
            ))
        })?;
        match mismatch(&id, n.size, n.mtime(), m) {
            Some(what) => Err(changed(path, what)),
            None => Ok(()),
        }
    }

    /// Opens the planned inode at `path` for reading, or says why not.
    fn open_verified(&self, node: u32, path: &Path) -> io::Result<File> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: a valid C string. O_NOFOLLOW refuses a final symlink,
        // O_NONBLOCK makes a FIFO's open return at once (and its reads never
        // wait), O_NOCTTY keeps a terminal from becoming ours, and a socket
        // cannot be opened at all.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY
                    | libc::O_NOFOLLOW
                    | libc::O_NONBLOCK
                    | libc::O_NOCTTY
                    | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ELOOP) => Err(changed(path, "it is now a symbolic link")),
                Some(libc::ENXIO) => Err(changed(path, "it is no longer a regular file")),
                _ => Err(e),
            };
        }
        // SAFETY: fd is a fresh descriptor we own.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // Nothing is read before the descriptor is known to be the planned file.
        self.verify(node, path, &f.metadata()?)?;
        Ok(f)
    }

    /// An open, verified descriptor of `node`'s source file, from the cache
    /// if it is there. When the process runs out of descriptors, cached ones
    /// are closed, least recently used first, until the open succeeds.
    fn open(&self, node: u32) -> io::Result<Arc<File>> {
        if let Some(f) = self.files.lock().get(&node) {
            return Ok(f.clone());
        }
        let path = self.tree.path(node);
        let f = loop {
            match self.open_verified(node, &path) {
                Ok(f) => break f,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                        && self.files.lock().pop_lru().is_some() => {}
                Err(e) if e.raw_os_error().is_some() => return Err(named(&path, e)),
                Err(e) => return Err(e),
            }
        };
        let f = Arc::new(f);
        self.files.lock().put(node, f.clone());
        Ok(f)
    }
}

impl FileData for HostFiles {
    fn read(&self, node: u32, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let f = self.open(node)?;
        let path = || self.tree.path(node);
        let mut done = 0;
        while done < out.len() {
            match f.read_at(&mut out[done..], offset + done as u64) {
                Ok(0) => {
                    self.files.lock().pop(&node);
                    return Err(changed(&path(), "it is shorter than when planned"));
                }
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(named(&path(), e)),
            }
        }
        let m = f.metadata().map_err(|e| named(&path(), e))?;
        let r = self.verify(node, &path(), &m);
        if r.is_err() {
            self.files.lock().pop(&node);
        }
        r
    }
}

//! Directory-relative system calls for the walk. Looking names up relative to
//! an open directory avoids resolving the whole path again for every entry,
//! which dominated planning time on large trees.

use super::Segment;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the walk needs of `struct stat`.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub dev: u64,
    pub ino: u64,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
}

impl Stat {
    fn from_raw(st: &libc::stat) -> Stat {
        Stat {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: st.st_nlink,
            dev: st.st_dev,
            ino: st.st_ino,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime, st.st_ctime_nsec as u32),
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

/// lstat by full path.
pub fn lstat(path: &Path) -> io::Result<Stat> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: valid C string and an out buffer of the right type.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::lstat(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Stat::from_raw(&st))
}

/// An open directory.
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = cstr(path.as_os_str().as_bytes())?;
        // SAFETY: valid C string; the returned fd is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Dir {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Entry names, excluding "." and "..", in readdir order.
    pub fn names(&self) -> io::Result<Vec<Vec<u8>>> {
        // SAFETY: dup gives fdopendir its own descriptor, closed by closedir.
        let fd = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let dir = unsafe { libc::fdopendir(fd) };
        if dir.is_null() {
            let e = io::Error::last_os_error();
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let mut out = Vec::new();
        loop {
            // SAFETY: errno is thread-local; readdir on our own DIR stream.
            unsafe { *libc::__errno_location() = 0 };
            let ent = unsafe { libc::readdir64(dir) };
            if ent.is_null() {
                let errno = unsafe { *libc::__errno_location() };
                unsafe { libc::closedir(dir) };
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                return Ok(out);
            }
            // SAFETY: d_name is NUL-terminated within the dirent.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                out.push(name.to_vec());
            }
        }
    }

    pub fn lstat(&self, name: &[u8]) -> io::Result<Stat> {
        let c = cstr(name)?;
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid dirfd, C string and out buffer.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Stat::from_raw(&st))
    }

    pub fn readlink(&self, name: &[u8]) -> io::Result<Vec<u8>> {
        let c = cstr(name)?;
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: valid dirfd, C string and buffer.
            let n = unsafe {
                libc::readlinkat(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    buf.as_mut_ptr() as *mut libc::c_char,
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if (n as usize) < buf.len() {
                // An exact copy: the 4 KiB probe buffer is not kept per symlink.
                return Ok(buf[..n as usize].to_vec());
            }
            buf.resize(buf.len() * 2, 0);
        }
    }

    /// Opens a regular file below this directory for reading (not following symlinks).
    pub fn open_file(&self, name: &[u8]) -> io::Result<OwnedFd> {
        let c = cstr(name)?;
        // SAFETY: valid dirfd and C string; the fd is owned below.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Names of the extended attributes of `name` (not following symlinks).
    /// Uses listxattrat(2) (Linux 6.13) relative to this directory, else the
    /// full path.
    pub fn xattr_names(&self, name: &[u8], full: &Path) -> io::Result<Vec<u8>> {
        static NO_LISTXATTRAT: AtomicBool = AtomicBool::new(false);
        const SYS_LISTXATTRAT: libc::c_long = 465;
        if !NO_LISTXATTRAT.load(Ordering::Relaxed) {
            let c = cstr(name)?;
            let r = fill(|buf| {
                // SAFETY: valid dirfd, C string and buffer.
                unsafe {
                    libc::syscall(
                        SYS_LISTXATTRAT,
                        self.fd.as_raw_fd(),
                        c.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        buf.as_mut_ptr(),
                        buf.len(),
                    ) as isize
                }
            });
            match r {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    NO_LISTXATTRAT.store(true, Ordering::Relaxed)
                }
                r => return r,
            }
        }
        let c = cstr(full.as_os_str().as_bytes())?;
        // SAFETY: valid C string and buffer.
        fill(|buf| unsafe {
            libc::llistxattr(c.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len())
        })
    }
}

/// Calls a size-probing syscall with a growing buffer until the result fits.
fn fill(mut call: impl FnMut(&mut [u8]) -> isize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        let r = call(&mut buf);
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

/// All extended attributes of `full` (not following symlinks), sorted by name;
/// `names` is the NUL-separated list from `Dir::xattr_names`.
pub fn xattrs(full: &Path, names: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cstr(full.as_os_str().as_bytes())?;
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = cstr(name)?;
        // SAFETY: valid C strings and buffer.
        let val = fill(|buf| unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                buf.as_mut_ptr() as *mut _,
                buf.len(),
            )
        })?;
        out.push((name.to_vec(), val));
    }
    out.sort();
    Ok(out)
}

/// Data ranges of an open sparse file found with SEEK_DATA/SEEK_HOLE.
pub fn data_segments(fd: &OwnedFd, size: u64) -> io::Result<Vec<Segment>> {
    let fd = fd.as_raw_fd();
    let mut segs = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a valid open fd.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENXIO) => break,
                // The filesystem cannot tell: all of it is data.
                Some(libc::EINVAL) => {
                    return Ok(vec![Segment {
                        offset: 0,
                        len: size,
                    }])
                }
                _ => return Err(err),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
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

pub fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

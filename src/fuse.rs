//! The FUSE frontend: a read-only directory holding one file, `fs.img`, whose
//! bytes are `Image::read_at`. Nothing is materialized; the kernel's page cache
//! (kept across opens) does the caching of image bytes.

use crate::image::Image;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request, SessionACL,
};
use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const IMAGE_NAME: &str = "fs.img";
const ROOT: INodeNo = INodeNo::ROOT;
const IMG: INodeNo = INodeNo(2);
/// The attributes never change while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// Largest read the kernel sends us, and its readahead window.
pub const MAX_READ: u32 = 1 << 20;

/// Who may use the mount besides the user who mounted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Access {
    #[default]
    Owner,
    /// `allow_root`: root too.
    Root,
    /// `allow_other`: everybody (non-root needs `user_allow_other` in /etc/fuse.conf).
    All,
}

#[derive(Clone, Debug)]
pub struct MountOptions {
    pub threads: usize,
    pub access: Access,
    /// Have fusermount unmount when this process dies, even by SIGKILL.
    pub auto_unmount: bool,
    /// mtime of fs.img and the directory.
    pub timestamp: i64,
}

struct ImageFs {
    image: Arc<Image>,
    mtime: SystemTime,
    uid: u32,
    gid: u32,
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl ImageFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o555, 0, 2),
            IMG => (FileType::RegularFile, 0o444, self.image.size(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_readahead(MAX_READ) {
            let _ = config.set_max_readahead(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, name.to_str()) {
            (ROOT, Some(IMAGE_NAME)) => match self.attr(IMG) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != IMG {
            return reply.error(Errno::EISDIR);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != IMG {
            return reply.error(Errno::EISDIR);
        }
        let len = (size as u64).min(self.image.size().saturating_sub(offset)) as usize;
        BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match self.image.read_at(offset, &mut buf[..len]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => {
                    log::error!("{IMAGE_NAME}: read of {len} bytes at {offset} failed: {e}");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if ino != IMG || offset < 0 {
            return reply.error(Errno::EINVAL);
        }
        let off = offset as u64;
        if off >= self.image.size() {
            return reply.error(Errno::ENXIO);
        }
        match whence {
            // The holes every frontend reports (`image::allocation`).
            libc::SEEK_DATA => match self.image.allocation().next_mapped(off) {
                Some(o) => reply.offset(o as i64),
                None => reply.error(Errno::ENXIO),
            },
            libc::SEEK_HOLE => reply.offset(self.image.allocation().next_hole(off) as i64),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (IMG, FileType::RegularFile, IMAGE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// Nothing is ever written, so there is nothing to sync (loop devices ask).
    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.image.size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }
}

/// Refuses mountpoints that would hide data or stack on another mount.
pub fn check_mountpoint(path: &Path) -> crate::Result<PathBuf> {
    use crate::Error;
    let err = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ENOTCONN) => Error::at(
            path,
            "a dead FUSE mount (its server was killed); remove it with fusermount3 -u",
        ),
        _ => Error::io(path, e),
    };
    let canon = path.canonicalize().map_err(err)?;
    if !std::fs::metadata(&canon).map_err(err)?.is_dir() {
        return Err(Error::at(path, "mountpoint is not a directory"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target = canon.to_string_lossy();
    let mounted = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mountinfo(m) == target);
    if mounted {
        return Err(Error::at(path, "something is already mounted there"));
    }
    let mut rd = std::fs::read_dir(&canon).map_err(|e| Error::io(path, e))?;
    if rd.next().is_some() {
        return Err(Error::at(path, "mountpoint is not empty"));
    }
    Ok(canon)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Blocks the termination signals in this thread (and threads it creates later)
/// so that one dedicated thread can wait for them.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, properly initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn lazy_unmount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(path)
        .status();
}

/// The kernel caps FUSE readahead at the backing device's `read_ahead_kb`
/// (128 KiB by default) whatever the filesystem asks for; raising it makes a
/// sequential reader send 1 MiB requests (measured: ~30 % faster `dd`). Only
/// root may; otherwise reads just stay at 128 KiB.
fn raise_readahead(mnt: &Path) {
    let Some(dev) = mounted_device(mnt) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, format!("{}", MAX_READ / 1024)) {
        log::debug!("{knob}: {e}; readahead stays at the kernel default");
    }
}

/// The device number ("major:minor") of the mount at `mnt`, from mountinfo:
/// the session loop may not be running, so nothing may stat the mountpoint.
fn mounted_device(mnt: &Path) -> Option<String> {
    let target = mnt.to_string_lossy();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.len() > 4 && unescape_mountinfo(f[4]) == target)
        .map(|f| f[2].to_string())
        .next_back()
}

/// Whether a failed session loop is the end of an unmount after all: the
/// kernel answers a request it was handing out while it tore the connection
/// down with ECONNABORTED instead of ENODEV, a race a lazy unmount hits when
/// the last reader closes. The unmount is told apart from an abort through
/// /sys/fs/fuse/connections (which also gives ECONNABORTED but leaves the
/// mount in place) by the mount being gone.
fn ended_by_unmount(e: &std::io::Error, mnt: &Path, dev: Option<&str>) -> bool {
    e.raw_os_error() == Some(libc::ECONNABORTED)
        && dev.is_some()
        && mounted_device(mnt).as_deref() != dev
}

/// Mounts `image` at `mountpoint` and serves it until unmounted or signalled.
/// `ready` is called once `fs.img` can be read.
pub fn serve(
    image: Arc<Image>,
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(&Path),
) -> crate::Result<()> {
    let mnt = check_mountpoint(mountpoint)?;
    let sigs = block_termination_signals();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::FSName("btrfsimg".into()),
        MountOption::Subtype("btrfsimg".into()),
    ];
    if opts.auto_unmount {
        config.mount_options.push(MountOption::AutoUnmount);
    }
    config.acl = match opts.access {
        Access::Owner => SessionACL::Owner,
        Access::Root => SessionACL::RootAndOwner,
        Access::All => SessionACL::All,
    };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = opts.threads > 1;
    let fs = ImageFs {
        image,
        mtime: UNIX_EPOCH + Duration::from_secs(opts.timestamp.max(0) as u64),
        // SAFETY: getuid/getgid cannot fail.
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
    };
    let mut session = fuser::Session::new(fs, &mnt, &config)
        .map_err(|e| crate::Error::at(&mnt, format!("cannot mount: {e}")))?;
    let dev = mounted_device(&mnt);
    raise_readahead(&mnt);
    let mut unmounter = session.unmount_callable();
    let mnt_for_signal = mnt.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waits on the set blocked above; sig is a valid out pointer.
            if unsafe { libc::sigwait(&sigs, &mut sig) } == 0 {
                log::info!("signal {sig}: unmounting {}", mnt_for_signal.display());
                if let Err(e) = unmounter.unmount() {
                    log::warn!(
                        "{}: {e}; detaching lazily, open users keep being served",
                        mnt_for_signal.display()
                    );
                    lazy_unmount(&mnt_for_signal);
                }
            }
        })
        .map_err(|e| crate::Error::msg(format!("cannot start signal thread: {e}")))?;
    ready(&mnt.join(IMAGE_NAME));
    match session.run() {
        Err(e) if ended_by_unmount(&e, &mnt, dev.as_deref()) => {
            log::info!("{}: unmounted ({e} on the last request)", mnt.display());
            Ok(())
        }
        r => r.map_err(|e| crate::Error::at(&mnt, format!("FUSE session failed: {e}"))),
    }
}

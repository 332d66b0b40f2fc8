//! Reads the staged tree breadth-first: lstat, readlink, xattrs and hole maps,
//! never file contents. Every image directory may have several contributors
//! (ROOT, virtual closure directories, overlay directories); their entries are
//! merged by name. Children are sorted by name bytes so nothing of the host's
//! readdir order or inode numbering reaches the image.
//!
//! Directories are listed (readdir + fstatat relative to the open directory) by
//! a few threads in batches, then merged into the tree by one thread in queue
//! order, so the result does not depend on which thread finished first.

use super::spec::{Sources, VEntry, VirtualDir};
use super::sys::{self, Dir, Stat};
use super::*;
use crate::error::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::fs;

use std::path::Path;

#[derive(Clone, Debug, Default)]
pub struct WalkOptions {
    /// Read extended attributes of every entry.
    pub xattrs: bool,
    /// mtime of directories that exist only in the image (/nix, /nix/store).
    pub virtual_time: i64,
    /// Threads listing directories (0 = one per core, at most 8).
    pub threads: usize,
}

/// One source of a directory's entries.
enum Contrib {
    Host(PathBuf),
    Virtual(VirtualDir),
}

/// Where one name of a directory comes from.
enum EntryOrigin {
    /// Listed from the listing's host directory number `dir`.
    Listed {
        dir: usize,
    },
    /// A grafted host path (store path, registration).
    Graft(PathBuf),
    Virtual(VirtualDir),
}

/// One name from one contributor, with everything the tree needs about it.
struct Entry {
    name: Vec<u8>,
    origin: EntryOrigin,
    stat: Option<Stat>,
    target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    segments: Option<Vec<Segment>>,
}

impl Entry {
    fn is_dir(&self) -> bool {
        self.stat.as_ref().is_none_or(Stat::is_dir)
    }
}

/// All contributors of one image directory, read.
struct Listing {
    host_dirs: Vec<PathBuf>,
    entries: Vec<Entry>,
}

struct Builder {
    tree: SourceTree,
    links: HashMap<(u64, u64), u32>,
    opts: WalkOptions,
    /// Directory nodes still to be listed, in node order, with their contributors.
    pending: VecDeque<(u32, Vec<Contrib>)>,
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

fn check_dir(p: &Path, what: &str) -> Result<Stat> {
    let m = sys::lstat(p).map_err(|e| Error::io(p, e))?;
    if !m.is_dir() {
        return Err(Error::at(p, format!("{what} is not a directory")));
    }
    Ok(m)
}

/// Walks all sources into one `SourceTree`.
pub fn walk(sources: &Sources, opts: &WalkOptions) -> Result<SourceTree> {
    let mut contribs = Vec::new();
    let root_stat = match &sources.root {
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
        tree: SourceTree::new(super::Origin::Host(HostPaths::default())),
        links: HashMap::new(),
        opts: opts.clone(),
        pending: VecDeque::new(),
    };
    match (&sources.root, root_stat) {
        (Some(r), Some(st)) => {
            let e = read_entry(r, b"", EntryOrigin::Graft(r.clone()), opts.xattrs)?;
            debug_assert!(e.stat.is_some_and(|s| s.mode == st.mode));
            b.push_entry(NONE, NONE, e)?;
            b.host_paths().graft(0, r.clone());
        }
        _ => {
            b.push_virtual_dir(NONE, b"")?;
        }
    }
    b.pending.push_back((0, contribs));

    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
        n => n,
    };
    if threads <= 1 {
        while let Some((n, contribs)) = b.pending.pop_front() {
            let listing = list(&contribs, opts.xattrs)?;
            b.merge(n, listing)?;
        }
    } else {
        walk_parallel(&mut b, threads)?;
    }
    b.tree.shrink_to_fit();
    Ok(b.tree)
}

/// Directories listed ahead of the merge, per lister thread: enough to keep
/// the listers busy, few enough that the listings in flight (the walk's
/// transient memory) stay small however wide the tree is.
const AHEAD_PER_THREAD: u64 = 8;

/// Work shared by the listers and the merging thread. Directories are
/// numbered in queue order; listings are merged strictly in that order, so
/// the tree does not depend on which lister finished first.
struct Pipeline {
    /// Directories not yet being listed: (sequence number, node, contributors).
    jobs: VecDeque<(u64, u32, Vec<Contrib>)>,
    /// Finished listings waiting for their turn.
    done: BTreeMap<u64, Result<Listing>>,
    /// Sequence number of the next listing to merge.
    merged: u64,
    /// Listers stop when set (finished, or an error ended the walk).
    stop: bool,
}

fn walk_parallel(b: &mut Builder, threads: usize) -> Result<()> {
    let xattrs = b.opts.xattrs;
    let ahead = AHEAD_PER_THREAD * threads as u64;
    let mut next_seq = 0u64;
    let mut nodes: VecDeque<u32> = VecDeque::new();
    let state = std::sync::Mutex::new(Pipeline {
        jobs: VecDeque::new(),
        done: BTreeMap::new(),
        merged: 0,
        stop: false,
    });
    let cv = std::sync::Condvar::new();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    // Moves the directories the last merge found into the job queue.
    let enqueue = |b: &mut Builder, p: &mut Pipeline, nodes: &mut VecDeque<u32>, next: &mut u64| {
        for (n, c) in b.pending.drain(..) {
            p.jobs.push_back((*next, n, c));
            nodes.push_back(n);
            *next += 1;
        }
    };
    enqueue(b, &mut lock(), &mut nodes, &mut next_seq);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let (seq, contribs) = {
                    let mut p = lock();
                    loop {
                        if p.stop {
                            return;
                        }
                        let ready = p.jobs.front().is_some_and(|j| j.0 < p.merged + ahead);
                        if ready {
                            let (seq, _, c) = p.jobs.pop_front().expect("a job is ready");
                            break (seq, c);
                        }
                        p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                };
                // A panic in a lister must not leave the merge waiting forever.
                let listing = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    list(&contribs, xattrs)
                }))
                .unwrap_or_else(|_| Err(Error::msg("internal error: directory listing panicked")));
                lock().done.insert(seq, listing);
                cv.notify_all();
            });
        }
        let result = (|| {
            while let Some(n) = nodes.pop_front() {
                let listing = {
                    let mut p = lock();
                    loop {
                        let m = p.merged;
                        if let Some(l) = p.done.remove(&m) {
                            break l;
                        }
                        p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                };
                b.merge(n, listing?)?;
                let mut p = lock();
                p.merged += 1;
                enqueue(b, &mut p, &mut nodes, &mut next_seq);
                drop(p);
                cv.notify_all();
            }
            Ok(())
        })();
        lock().stop = true;
        cv.notify_all();
        result
    })
}

/// Reads every contributor of one directory.
fn list(contribs: &[Contrib], xattrs: bool) -> Result<Listing> {
    let mut l = Listing {
        host_dirs: Vec::new(),
        entries: Vec::new(),
    };
    for c in contribs {
        match c {
            Contrib::Host(dir) => {
                let d = Dir::open(dir).map_err(|e| Error::io(dir, e))?;
                let names = d.names().map_err(|e| Error::io(dir, e))?;
                let idx = l.host_dirs.len();
                for name in names {
                    l.entries.push(read_listed(&d, dir, name, idx, xattrs)?);
                }
                l.host_dirs.push(dir.clone());
            }
            Contrib::Virtual(v) => {
                for (name, e) in &v.entries {
                    l.entries.push(match e {
                        VEntry::Dir(d) => Entry {
                            name: name.clone(),
                            origin: EntryOrigin::Virtual(d.clone()),
                            stat: None,
                            target: Vec::new(),
                            xattrs: Vec::new(),
                            segments: None,
                        },
                        VEntry::Host(path) => {
                            read_entry(path, name, EntryOrigin::Graft(path.clone()), xattrs)?
                        }
                    });
                }
            }
        }
    }
    Ok(l)
}

/// Whether a regular file may have holes, so SEEK_DATA/SEEK_HOLE must be asked.
/// A dense file's allocation is its size rounded up to 4 KiB. Anything else
/// (fewer blocks: holes; more: preallocation past the end, extent-tree blocks,
/// other block sizes) is probed. Files with extended attributes are probed
/// unless they have exactly one extra block (ext4's external xattr block), as
/// that block can hide a hole of the same size. Probing costs an open and a few
/// lseeks, which doing for every file would add to the whole walk.
fn may_have_holes(st: &Stat, has_xattrs: bool) -> bool {
    if st.file_type() != libc::S_IFREG || st.size == 0 {
        return false;
    }
    let alloc = st.blocks * 512;
    let dense = st.size.div_ceil(4096) * 4096;
    if has_xattrs {
        alloc != dense + 4096
    } else {
        alloc != dense
    }
}

/// One entry of an open host directory.
fn read_listed(d: &Dir, dir: &Path, name: Vec<u8>, idx: usize, xattrs: bool) -> Result<Entry> {
    let full = || dir.join(sys::os(&name));
    let st = d.lstat(&name).map_err(|e| Error::io(&full(), e))?;
    let mut e = Entry {
        name: Vec::new(),
        origin: EntryOrigin::Listed { dir: idx },
        stat: Some(st),
        target: Vec::new(),
        xattrs: Vec::new(),
        segments: None,
    };
    if st.file_type() == libc::S_IFLNK {
        e.target = d.readlink(&name).map_err(|e| Error::io(&full(), e))?;
    }
    if xattrs {
        let p = full();
        let names = d.xattr_names(&name, &p).map_err(|e| Error::io(&p, e))?;
        if !names.is_empty() {
            e.xattrs = sys::xattrs(&p, &names).map_err(|e| Error::io(&p, e))?;
        }
    }
    if may_have_holes(&st, !e.xattrs.is_empty()) {
        let f = d.open_file(&name).map_err(|e| Error::io(&full(), e))?;
        e.segments = Some(sys::data_segments(&f, st.size).map_err(|e| Error::io(&full(), e))?);
    }
    e.name = name;
    Ok(e)
}

/// A host path read on its own (ROOT, grafts).
fn read_entry(path: &Path, name: &[u8], origin: EntryOrigin, xattrs: bool) -> Result<Entry> {
    let st = sys::lstat(path).map_err(|e| Error::io(path, e))?;
    let mut e = Entry {
        name: name.to_vec(),
        origin,
        stat: Some(st),
        target: Vec::new(),
        xattrs: Vec::new(),
        segments: None,
    };
    if st.file_type() == libc::S_IFLNK {
        let t = fs::read_link(path).map_err(|e| Error::io(path, e))?;
        e.target = t.into_os_string().into_encoded_bytes();
    }
    if xattrs {
        // A relative path's parent may be empty ("root" → ""): that is ".".
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            Some(_) => Path::new("."),
            None => Path::new("/"),
        };
        let d = Dir::open(parent).map_err(|e| Error::io(parent, e))?;
        let base = path
            .file_name()
            .map(|b| b.as_encoded_bytes())
            .unwrap_or(b".");
        let names = d.xattr_names(base, path).map_err(|e| Error::io(path, e))?;
        if !names.is_empty() {
            e.xattrs = sys::xattrs(path, &names).map_err(|e| Error::io(path, e))?;
        }
    }
    if may_have_holes(&st, !e.xattrs.is_empty()) {
        let f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
        e.segments = Some(sys::data_segments(&f.into(), st.size).map_err(|e| Error::io(path, e))?);
    }
    Ok(e)
}

impl Builder {
    fn host_paths(&mut self) -> &mut HostPaths {
        self.tree
            .host_paths_mut()
            .expect("the walk builds a host tree")
    }

    fn dir_path(&mut self, i: u32) -> PathBuf {
        self.host_paths().dir(i).to_path_buf()
    }

    /// Adds the entries of directory node `n` (all contributors merged by name).
    fn merge(&mut self, n: u32, l: Listing) -> Result<()> {
        let mut base = NONE;
        for (i, d) in l.host_dirs.into_iter().enumerate() {
            let idx = self.host_paths().add_dir(d)?;
            if i == 0 {
                base = idx;
            }
        }
        let mut entries = l.entries;
        // Stable: for equal names, contributors keep their order (ROOT, closure, --files).
        entries.sort_by(|a, b| a.name.cmp(&b.name));

        let first = self.tree.len() as u32;
        let mut count = 0u32;
        let mut entries = entries.into_iter().peekable();
        while let Some(head) = entries.next() {
            // Other contributors of the same name (usually none: no allocation).
            let mut more: Vec<Entry> = Vec::new();
            while entries.peek().is_some_and(|e| e.name == head.name) {
                more.extend(entries.next());
            }
            count += 1;
            // Directories merge, except grafted ones: a store path is sealed, and
            // anything added to it would break its registered NAR hash.
            if !more.is_empty() {
                let group: Vec<&Entry> = std::iter::once(&head).chain(&more).collect();
                let sealed = group
                    .iter()
                    .any(|e| matches!(e.origin, EntryOrigin::Graft(_)));
                if sealed || !group.iter().all(|e| e.is_dir()) {
                    return Err(self.conflict(n, group[0], group[1], base));
                }
            }
            let mut children = Vec::new();
            for e in std::iter::once(&head).chain(&more) {
                if !e.is_dir() {
                    continue;
                }
                children.push(match &e.origin {
                    EntryOrigin::Listed { dir } => {
                        Contrib::Host(self.dir_path(base + *dir as u32).join(sys::os(&e.name)))
                    }
                    EntryOrigin::Graft(p) => Contrib::Host(p.clone()),
                    EntryOrigin::Virtual(d) => Contrib::Virtual(d.clone()),
                });
            }
            let is_dir = head.is_dir();
            let idx = match head.origin {
                EntryOrigin::Virtual(_) => self.push_virtual_dir(n, &head.name)?,
                EntryOrigin::Listed { dir } => self.push_entry(n, base + dir as u32, head)?,
                EntryOrigin::Graft(ref p) => {
                    let p = p.clone();
                    let idx = self.push_entry(n, NONE, head)?;
                    self.host_paths().graft(idx, p);
                    idx
                }
            };
            if is_dir {
                self.pending.push_back((idx, children));
            }
        }
        self.tree.set_children(n, first, count);
        Ok(())
    }

    /// The error for two sources providing the same non-directory path.
    fn conflict(&mut self, parent: u32, first: &Entry, second: &Entry, base: u32) -> Error {
        let mut describe = |e: &Entry| match &e.origin {
            EntryOrigin::Listed { dir } => {
                crate::error::shown_path(&self.dir_path(base + *dir as u32).join(sys::os(&e.name)))
            }
            EntryOrigin::Graft(p) => crate::error::shown_path(p),
            EntryOrigin::Virtual(_) => "a directory created for the closure".to_string(),
        };
        let (a, b) = (describe(first), describe(second));
        let mut image = self.tree.image_path(parent);
        image.push(sys::os(&first.name));
        Error::at(&image, format!("provided by both {a} and {b}"))
    }

    /// A directory that exists only in the image: root-owned, 0755, `--timestamp`.
    fn push_virtual_dir(&mut self, parent: u32, name: &[u8]) -> Result<u32> {
        let mut n = NewNode::new(Kind::Dir, 0o755);
        n.mtime = Timespec {
            sec: self.opts.virtual_time,
            nsec: 0,
        };
        self.tree.push(parent, name, n)
    }

    fn push_entry(&mut self, parent: u32, host_dir: u32, e: Entry) -> Result<u32> {
        let Some(st) = e.stat else {
            return self.push_virtual_dir(parent, &e.name);
        };
        let idx = self.tree.len() as u32;
        let kind = Kind::from_mode(st.mode).unwrap_or(Kind::BlockDev);
        let mut n = NewNode::new(kind, st.mode);
        if kind != Kind::Dir && st.nlink > 1 {
            let rep = *self.links.entry((st.dev, st.ino)).or_insert(idx);
            n.link_rep = (rep != idx).then_some(rep);
        }
        n.uid = st.uid;
        n.gid = st.gid;
        n.mtime = Timespec {
            sec: st.mtime.0,
            nsec: st.mtime.1,
        };
        n.host = host_dir;
        n.xattrs = &e.xattrs;
        match kind {
            Kind::File => {
                n.size = st.size;
                n.segments = e.segments.as_deref();
                n.identity = Some(Identity {
                    dev: st.dev,
                    ino: st.ino,
                    ctime: Timespec {
                        sec: st.ctime.0,
                        nsec: st.ctime.1,
                    },
                });
            }
            Kind::Symlink => n.target = &e.target,
            Kind::CharDev | Kind::BlockDev => {
                let (major, minor) = (libc::major(st.rdev) as u64, libc::minor(st.rdev) as u64);
                n.rdev = (major << 20) | minor;
            }
            _ => {}
        }
        self.tree.push(parent, &e.name, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    fn st(size: u64, blocks: u64) -> Stat {
        Stat {
            mode: libc::S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            dev: 0,
            ino: 0,
            rdev: 0,
            size,
            blocks,
            mtime: (0, 0),
            ctime: (0, 0),
        }
    }

    #[test]
    fn allocation_decides_whether_to_probe() {
        assert!(
            !may_have_holes(&st(5000, 16), false),
            "dense: 8 KiB for 5000 bytes"
        );
        assert!(may_have_holes(&st(8192, 8), false), "a 4 KiB hole");
        assert!(
            !may_have_holes(&st(8192, 24), true),
            "dense plus an xattr block"
        );
        assert!(
            may_have_holes(&st(8192, 16), true),
            "hole hidden by an xattr block"
        );
        assert!(
            may_have_holes(&st(8192, 4096), false),
            "preallocated past the end"
        );
        assert!(!may_have_holes(&st(0, 0), false));
    }

    /// A leading hole plus space preallocated past the end: more blocks than
    /// bytes, and the hole is still found.
    #[test]
    fn holes_found_behind_preallocation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = fs::File::create(&p).unwrap();
        f.write_all_at(&[7u8; 4096], 4096).unwrap();
        // SAFETY: fallocate on a valid open fd.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 8192, 1 << 20) };
        if r != 0 {
            eprintln!("fallocate unsupported here; skipping");
            return;
        }
        drop(f);
        let tree = walk_dir(dir.path(), &WalkOptions::default()).unwrap();
        let n = tree.children(0).start;
        assert_eq!(
            tree.segments(n).iter().collect::<Vec<_>>(),
            vec![Segment {
                offset: 4096,
                len: 4096
            }]
        );
    }
}

//! The mount-view subvolume form (`--subvol PATH=MOUNTPOINT`): from the tree
//! as the booted system sees it (the sources) to the image's top-level view,
//! where subvolume PATH holds what the system sees under MOUNTPOINT.
//!
//! Every source entry goes to exactly one place: under the subvolume with
//! the longest mountpoint that contains it, or (when no subvolume is mounted
//! at `/`) where it was, in the top level. A mountpoint inside another
//! subvolume's part of the tree stays there as an empty directory (with the
//! source directory's attributes, or made up when the sources lack it), so
//! that the booted system can mount on it; when the subvolume itself sits at
//! that place (`@=/` with `@/home=/home`), it is the directory.
//!
//! The new tree is written breadth-first like a walk, so inode numbers and
//! everything after stay a function of the sources. Hard links keep their
//! groups (the first name written carries the attributes).

use super::{HostPaths, Kind, NewNode, Origin, SourceTree, NONE};
use crate::error::{Error, Result};
use crate::format::Timespec;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// One mount-view subvolume: its path in the top-level view and its
/// mountpoint in the sources' view, both as components (the mountpoint `/`
/// has none).
#[derive(Clone, Debug)]
pub struct Graft {
    pub path: Vec<Vec<u8>>,
    pub mountpoint: Vec<Vec<u8>>,
    /// How the option was given, for messages.
    pub shown: String,
}

/// A directory of the new tree that is not simply a copy of a source subtree.
#[derive(Debug)]
enum Skel {
    /// The source directory, its children merged with `children`.
    Copy(u32, BTreeMap<Vec<u8>, Skel>),
    /// The source directory's attributes, only `children` inside.
    Empty(u32, BTreeMap<Vec<u8>, Skel>),
    /// A directory the sources do not have (0755, root, `--timestamp`).
    Made(BTreeMap<Vec<u8>, Skel>),
}

impl Skel {
    fn children(&mut self) -> &mut BTreeMap<Vec<u8>, Skel> {
        match self {
            Skel::Copy(_, c) | Skel::Empty(_, c) | Skel::Made(c) => c,
        }
    }

    fn source(&self) -> Option<u32> {
        match self {
            Skel::Copy(n, _) => Some(*n),
            _ => None,
        }
    }
}

fn shown(parts: &[Vec<u8>]) -> PathBuf {
    let mut p = PathBuf::from("/");
    for c in parts {
        p.push(OsStr::from_bytes(c));
    }
    p
}

/// The source node at `parts`, if there is one; symlinks and
/// non-directories on the way (or at the end) are errors.
fn find_dir(tree: &SourceTree, parts: &[Vec<u8>], g: &Graft) -> Result<Option<u32>> {
    let mut cur = 0u32;
    for (i, name) in parts.iter().enumerate() {
        let Some(c) = tree.child(cur, name) else {
            return Ok(None);
        };
        match tree.node(tree.link_rep(c)).kind {
            Kind::Dir => cur = c,
            Kind::Symlink => {
                return Err(Error::at(
                    &shown(&parts[..=i]),
                    format!(
                        "is a symlink in the sources; a mountpoint may not go through one (--subvol {})",
                        g.shown
                    ),
                ))
            }
            _ => {
                return Err(Error::at(
                    &shown(&parts[..=i]),
                    format!(
                        "is not a directory in the sources (--subvol {})",
                        g.shown
                    ),
                ))
            }
        }
    }
    Ok(Some(cur))
}

/// Walks (making) the skeleton down `parts` from `root`, each step a copy
/// of the source directory at `from` + the step when `from` is given and
/// it exists, else made up.
fn ensure<'a>(
    root: &'a mut Skel,
    tree: &SourceTree,
    parts: &[Vec<u8>],
    g: &Graft,
) -> Result<&'a mut Skel> {
    let mut cur = root;
    for (i, name) in parts.iter().enumerate() {
        let source = cur.source().and_then(|n| tree.child(n, name));
        if let Some(c) = source {
            if tree.node(tree.link_rep(c)).kind != Kind::Dir {
                return Err(Error::at(
                    &shown(&parts[..=i]),
                    format!("is not a directory in the sources (--subvol {})", g.shown),
                ));
            }
        }
        cur = cur
            .children()
            .entry(name.clone())
            .or_insert_with(|| match source {
                Some(c) => Skel::Copy(c, BTreeMap::new()),
                None => Skel::Made(BTreeMap::new()),
            });
    }
    Ok(cur)
}

/// Applies the mount-view subvolumes `grafts` to `tree`.
pub fn apply(tree: SourceTree, grafts: &[Graft], timestamp: i64) -> Result<SourceTree> {
    if grafts.is_empty() {
        return Ok(tree);
    }
    // The source directory each graft takes (if the sources have it).
    let sources: Vec<Option<u32>> = grafts
        .iter()
        .map(|g| find_dir(&tree, &g.mountpoint, g))
        .collect::<Result<_>>()?;
    let claimed: BTreeSet<u32> = sources.iter().flatten().copied().collect();
    let at_root = grafts.iter().position(|g| g.mountpoint.is_empty());
    // Without a subvolume at `/`, the top level keeps the rest where it is.
    let mut top = match at_root {
        Some(_) => Skel::Made(BTreeMap::new()),
        None => Skel::Copy(0, BTreeMap::new()),
    };
    // The graft whose mountpoint is the longest proper prefix of each
    // graft's (None: the top level's remainder).
    let owner = |k: usize| -> Option<usize> {
        let mp = &grafts[k].mountpoint;
        (0..grafts.len())
            .filter(|&j| {
                j != k
                    && grafts[j].mountpoint.len() < mp.len()
                    && mp.starts_with(&grafts[j].mountpoint)
            })
            .max_by_key(|&j| grafts[j].mountpoint.len())
    };
    // Places in the top-level view: each graft's region starts at its
    // path; a mountpoint inside a region is at region path + rest.
    let region_path = |j: Option<usize>, k: usize| -> Vec<Vec<u8>> {
        let (base, mp): (&[Vec<u8>], &[Vec<u8>]) = match j {
            Some(j) => (&grafts[j].path, &grafts[j].mountpoint),
            None => (&[], &[]),
        };
        let mut p = base.to_vec();
        p.extend_from_slice(&grafts[k].mountpoint[mp.len()..]);
        p
    };
    // Graft roots, shallowest paths first so that nested ones find their
    // parents in place.
    let mut order: Vec<usize> = (0..grafts.len()).collect();
    order.sort_by_key(|&k| (grafts[k].path.len(), k));
    for &k in &order {
        let g = &grafts[k];
        let (parent, name) = g.path.split_at(g.path.len() - 1);
        let dir = ensure(&mut top, &tree, parent, g)?;
        let existing = dir.source().and_then(|n| tree.child(n, &name[0]));
        if existing.is_some_and(|c| Some(c) != sources[k]) || dir.children().contains_key(&name[0])
        {
            return Err(Error::at(
                &shown(&g.path),
                format!(
                    "already exists in the image's top level; the subvolume cannot go there (--subvol {})",
                    g.shown
                ),
            ));
        }
        dir.children().insert(
            name[0].clone(),
            match sources[k] {
                Some(n) => Skel::Copy(n, BTreeMap::new()),
                None => Skel::Made(BTreeMap::new()),
            },
        );
    }
    // Mountpoints left in the enclosing part of the tree.
    for k in 0..grafts.len() {
        if grafts[k].mountpoint.is_empty() {
            continue;
        }
        let j = owner(k).or(at_root);
        let place = region_path(j, k);
        if place == grafts[k].path {
            continue; // the subvolume itself is the directory there
        }
        let g = &grafts[k];
        let (parent, name) = place.split_at(place.len() - 1);
        let dir = ensure(&mut top, &tree, parent, g)?;
        let entry = match sources[k] {
            Some(n) => Skel::Empty(n, BTreeMap::new()),
            None => Skel::Made(BTreeMap::new()),
        };
        match dir.children().get(&name[0]) {
            None => {
                dir.children().insert(name[0].clone(), entry);
            }
            // A made-up directory on the way to a deeper mountpoint, or the
            // copy the walk down made: keep its children, drop the sources'.
            Some(_) => {
                let old = dir.children().remove(&name[0]).expect("just seen");
                let mut entry = entry;
                let kids = match old {
                    Skel::Copy(_, c) | Skel::Empty(_, c) | Skel::Made(c) => c,
                };
                entry.children().extend(kids);
                dir.children().insert(name[0].clone(), entry);
            }
        }
    }
    Writer::new(&tree, &claimed, timestamp).write(&top)
}

/// What one entry of the new tree comes from.
enum From<'a> {
    Skel(&'a Skel),
    /// A source entry and everything under it.
    Source(u32),
}

struct Writer<'a> {
    old: &'a SourceTree,
    claimed: &'a BTreeSet<u32>,
    time: Timespec,
    new: SourceTree,
    /// Source nodes that have later hard links.
    linked: BTreeSet<u32>,
    /// First new node of each source hard-link group.
    first_link: BTreeMap<u32, u32>,
    /// New nodes that need their source path for messages (renamed).
    grafts: Vec<(u32, PathBuf)>,
}

impl<'a> Writer<'a> {
    fn new(old: &'a SourceTree, claimed: &'a BTreeSet<u32>, timestamp: i64) -> Writer<'a> {
        let origin = match &old.origin {
            Origin::Host(h) => Origin::Host(HostPaths {
                dirs: h.dirs.clone(),
                grafts: BTreeMap::new(),
                devices: h.devices.clone(),
            }),
            Origin::Generated { fills } => Origin::Generated {
                fills: fills.clone(),
            },
        };
        Writer {
            old,
            claimed,
            time: Timespec {
                sec: timestamp,
                nsec: 0,
            },
            new: SourceTree::new(origin),
            linked: (0..old.len() as u32)
                .map(|n| old.link_rep(n))
                .enumerate()
                .filter(|&(n, r)| n as u32 != r)
                .map(|(_, r)| r)
                .collect(),
            first_link: BTreeMap::new(),
            grafts: Vec::new(),
        }
    }

    /// The children of a new directory, in name order.
    fn children<'s>(&self, from: &From<'s>) -> Vec<(Vec<u8>, From<'s>)> {
        let (source, skel) = match from {
            From::Skel(Skel::Copy(n, c)) => (Some(*n), Some(c)),
            From::Skel(Skel::Empty(_, c)) | From::Skel(Skel::Made(c)) => (None, Some(c)),
            From::Source(n) => (Some(*n), None),
        };
        let mut out: BTreeMap<Vec<u8>, From<'s>> = BTreeMap::new();
        if let Some(n) = source {
            if self.old.node(n).kind == Kind::Dir {
                for c in self.old.children(n) {
                    if !self.claimed.contains(&c) {
                        out.insert(self.old.name(c).to_vec(), From::Source(c));
                    }
                }
            }
        }
        if let Some(kids) = skel {
            for (name, k) in kids {
                out.insert(name.clone(), From::Skel(k));
            }
        }
        out.into_iter().collect()
    }

    /// Appends the entry `from` named `name` under `parent`.
    fn push(&mut self, parent: u32, name: &[u8], from: &From<'_>) -> Result<u32> {
        let old = self.old;
        let made = |kind| {
            let mut n = NewNode::new(kind, 0o755);
            n.mtime = self.time;
            n
        };
        let source = match from {
            From::Skel(Skel::Made(_)) => None,
            From::Skel(Skel::Copy(n, _)) | From::Skel(Skel::Empty(n, _)) | From::Source(n) => {
                Some(*n)
            }
        };
        let Some(n) = source else {
            return self.new.push(parent, name, made(Kind::Dir));
        };
        let rep = old.link_rep(n);
        let first = self.first_link.get(&rep).copied();
        let a = old.node(rep);
        let xattrs: Vec<(Vec<u8>, Vec<u8>)> = old
            .xattrs(rep)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        let segments = match old.segments(rep) {
            super::Segments::Sparse(s) => Some(s),
            super::Segments::Whole(_) => None,
        };
        let node = NewNode {
            kind: a.kind,
            perm: a.perm as u32,
            uid: a.uid,
            gid: a.gid,
            mtime: a.mtime(),
            size: a.size,
            link_rep: first,
            // The host directory of this name (the file is read there).
            host: old.node(n).host,
            identity: old.identity(rep),
            target: if a.kind == Kind::Symlink {
                old.link_target(rep)
            } else {
                &[]
            },
            rdev: a.rdev(),
            segments,
            xattrs: &xattrs,
        };
        let idx = self.new.push(parent, name, node)?;
        if first.is_none() && self.linked.contains(&rep) {
            self.first_link.insert(rep, idx);
        }
        if name != old.name(n) || old.has_graft(n) {
            self.grafts.push((idx, old.path(n)));
        }
        Ok(idx)
    }

    fn write(mut self, top: &Skel) -> Result<SourceTree> {
        let root = self.push(NONE, b"", &From::Skel(top))?;
        let mut queue: VecDeque<(u32, From<'_>)> = VecDeque::new();
        queue.push_back((root, From::Skel(top)));
        while let Some((dir, from)) = queue.pop_front() {
            let kids = self.children(&from);
            let first = self.new.nodes.len() as u32;
            let mut dirs = Vec::new();
            for (name, k) in kids {
                let idx = self.push(dir, &name, &k)?;
                if self.new.node(idx).kind == Kind::Dir {
                    dirs.push((idx, k));
                }
            }
            let count = self.new.nodes.len() as u32 - first;
            self.new.set_children(dir, first, count);
            queue.extend(dirs);
        }
        if let Some(h) = self.new.host_paths_mut() {
            for (idx, p) in std::mem::take(&mut self.grafts) {
                h.graft(idx, p);
            }
        }
        self.new.shrink_to_fit();
        Ok(self.new)
    }
}

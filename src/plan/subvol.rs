//! Subvolumes: which filesystem tree each entry of the image's top-level view
//! lives in, and each tree's inode numbering.
//!
//! A subvolume is a directory of the top-level view whose subtree (minus the
//! subvolumes nested in it) becomes its own fs tree, with its own inode 256.
//! Ids are given in source order (breadth-first, names sorted), so they depend
//! only on the tree. A hard link whose names fall into two subvolumes cannot
//! exist in btrfs (an inode lives in one tree): each subvolume gets its own
//! inode, and the later ones share the first one's data extents, as reflinked
//! copies do (no data is stored twice; mkfs.btrfs stores two copies).

use super::numbering::{self, BaseNumbers, Numbering};
use crate::error::{Error, Result};
use crate::format::FS_TREE;
use crate::source::{Kind, SourceTree, NAME_MAX};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The first subvolume id (BTRFS_FIRST_FREE_OBJECTID).
pub const FIRST_SUBVOL: u64 = 256;

/// `--subvol [TYPE:]PATH[=MOUNTPOINT]`, as given.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SubvolSpec {
    /// Path in the image's top-level view, without leading or trailing '/'.
    pub path: Vec<u8>,
    /// Mount-view form: the absolute path (in the sources' view) whose
    /// entries the subvolume holds.
    pub mountpoint: Option<Vec<u8>>,
    pub readonly: bool,
    pub default: bool,
}

/// Splits `p` into its components, refusing empty, `.`, `..` and over-long
/// ones (`what` names the argument in errors).
pub(crate) fn components<'a>(p: &'a [u8], what: &str) -> Result<Vec<&'a [u8]>> {
    let parts: Vec<&[u8]> = p.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
    for c in &parts {
        if *c == b"." || *c == b".." {
            return Err(Error::msg(format!(
                "{what} '{}': '.' and '..' are not allowed",
                crate::error::shown(p)
            )));
        }
        if c.len() > NAME_MAX {
            return Err(Error::msg(format!(
                "{what} '{}': a name of {} bytes is longer than {NAME_MAX} bytes",
                crate::error::shown(p),
                c.len()
            )));
        }
    }
    Ok(parts)
}

impl SubvolSpec {
    /// Parses mkfs.btrfs's spelling: TYPE is `rw` (default), `ro`,
    /// `default` or `default-ro`; `=MOUNTPOINT` selects the mount-view form.
    pub fn parse(arg: &str) -> Result<SubvolSpec> {
        let (readonly, default, rest) = match arg.split_once(':') {
            Some(("rw", r)) => (false, false, r),
            Some(("ro", r)) => (true, false, r),
            Some(("default", r)) => (false, true, r),
            Some(("default-ro", r)) => (true, true, r),
            _ => (false, false, arg),
        };
        let (path, mountpoint) = match rest.split_once('=') {
            Some((p, m)) => (p, Some(m)),
            None => (rest, None),
        };
        let what = format!("--subvol {arg}");
        let parts = components(path.as_bytes(), &what)?;
        if parts.is_empty() {
            return Err(Error::msg(format!(
                "{what}: the subvolume path is empty (the top level is no subvolume)"
            )));
        }
        let mountpoint = match mountpoint {
            None => None,
            Some(m) if !m.starts_with('/') => {
                return Err(Error::msg(format!(
                    "{what}: the mountpoint '{m}' must be an absolute path"
                )))
            }
            Some(m) => Some(components(m.as_bytes(), &what)?.join(&b'/')),
        };
        Ok(SubvolSpec {
            path: parts.join(&b'/'),
            mountpoint,
            readonly,
            default,
        })
    }

    /// How it was given, for messages.
    pub fn shown(&self) -> String {
        let ty = match (self.readonly, self.default) {
            (false, false) => "",
            (true, false) => "ro:",
            (false, true) => "default:",
            (true, true) => "default-ro:",
        };
        let m = self
            .mountpoint
            .as_ref()
            .map(|m| format!("=/{}", crate::error::shown(m)))
            .unwrap_or_default();
        format!("{ty}{}{m}", crate::error::shown(&self.path))
    }
}

/// Checks a set of specs against each other (before any walk).
pub fn validate_specs(specs: &[SubvolSpec]) -> Result<()> {
    let defaults: Vec<&SubvolSpec> = specs.iter().filter(|s| s.default).collect();
    if defaults.len() > 1 {
        return Err(Error::msg(format!(
            "--subvol: two default subvolumes ({} and {}); at most one may be the default",
            defaults[0].shown(),
            defaults[1].shown()
        )));
    }
    // Specs made by a library caller rather than `parse`: the same rules.
    for s in specs {
        let what = format!("--subvol {}", s.shown());
        if components(&s.path, &what)?.is_empty() {
            return Err(Error::msg(format!(
                "{what}: the subvolume path is empty (the top level is no subvolume)"
            )));
        }
        if let Some(m) = &s.mountpoint {
            components(m, &what)?;
        }
    }
    let mut paths: BTreeMap<&[u8], &SubvolSpec> = BTreeMap::new();
    let mut mounts: BTreeMap<&[u8], &SubvolSpec> = BTreeMap::new();
    for s in specs {
        if let Some(first) = paths.insert(&s.path, s) {
            return Err(Error::msg(format!(
                "--subvol: {} and {} name the same subvolume",
                first.shown(),
                s.shown()
            )));
        }
        if let Some(m) = &s.mountpoint {
            if let Some(first) = mounts.insert(m, s) {
                return Err(Error::msg(format!(
                    "--subvol: {} and {} claim the same mountpoint /{}",
                    first.shown(),
                    s.shown(),
                    crate::error::shown(m)
                )));
            }
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct Subvol {
    /// Tree id: 5 for the top level, 256 and up for subvolumes.
    pub id: u64,
    /// Its root directory's node (0 for the top level).
    pub root: u32,
    /// Index of the subvolume holding its directory entry (itself for the
    /// top level).
    pub parent: usize,
    pub readonly: bool,
    pub default: bool,
}

/// The subvolumes of one tree and every node's place in them.
#[derive(Debug)]
pub struct Partition {
    /// `[0]` is the top level; the rest in source order.
    pub subvols: Vec<Subvol>,
    /// Subvolume index of every node (empty: all in the top level).
    subvol_of: Vec<u16>,
    /// Inode numbers and directory indexes.
    pub numbering: Numbering,
    /// Nodes that start an inode of their own for a hard link whose first
    /// node is in another subvolume: node → that first node.
    pub cross_links: BTreeMap<u32, u32>,
}

impl Partition {
    pub fn subvol(&self, node: u32) -> usize {
        self.subvol_of.get(node as usize).map_or(0, |&s| s as usize)
    }

    pub fn id_of(&self, node: u32) -> u64 {
        self.subvols[self.subvol(node)].id
    }

    /// Inode index of `node` in its own tree.
    pub fn idx(&self, node: u32) -> u32 {
        self.numbering.node_ino[node as usize]
    }

    /// Inode number of `node` in its own tree.
    pub fn ino_of(&self, node: u32) -> u64 {
        self.numbering.ino(self.subvol(node), self.idx(node))
    }

    /// Index of entry `c` in its parent directory.
    pub fn dir_index(&self, tree: &SourceTree, c: u32) -> u64 {
        let p = tree.node(c).parent;
        self.numbering.dir_index(c, c - tree.node(p).first_child())
    }

    /// Every node's subvolume index (empty when there is only the top level).
    pub fn tree_of(&self) -> &[u16] {
        &self.subvol_of
    }

    pub fn default(&self) -> Option<&Subvol> {
        self.subvols.iter().find(|s| s.default)
    }
}

/// The node at image path `path` (components under the root), refusing
/// missing entries, symlinks on the way and non-directories.
fn lookup(tree: &SourceTree, spec: &SubvolSpec) -> Result<u32> {
    let shown = |upto: &[&[u8]]| PathBuf::from("/").join(OsStr::from_bytes(&upto.join(&b'/')));
    let parts: Vec<&[u8]> = spec.path.split(|&b| b == b'/').collect();
    let mut cur = 0u32;
    for (i, name) in parts.iter().enumerate() {
        let Some(c) = tree.child(cur, name) else {
            return Err(Error::at(
                &shown(&parts[..=i]),
                format!(
                    "no such directory in the sources (--subvol {})",
                    spec.shown()
                ),
            ));
        };
        let kind = tree.node(tree.link_rep(c)).kind;
        if kind == Kind::Symlink {
            return Err(Error::at(
                &shown(&parts[..=i]),
                format!(
                    "is a symlink; a subvolume path may not go through one (--subvol {})",
                    spec.shown()
                ),
            ));
        }
        if kind != Kind::Dir {
            return Err(Error::at(
                &shown(&parts[..=i]),
                format!("is not a directory (--subvol {})", spec.shown()),
            ));
        }
        cur = c;
    }
    Ok(cur)
}

/// The root directories of the subvolumes of `specs` in `tree`, sorted.
pub fn roots(tree: &SourceTree, specs: &[SubvolSpec]) -> Result<Vec<u32>> {
    let mut roots: Vec<u32> = specs
        .iter()
        .map(|s| lookup(tree, s))
        .collect::<Result<_>>()?;
    roots.sort_unstable();
    Ok(roots)
}

/// Finds every subvolume of `specs` in `tree` (the top-level view), gives ids
/// and numbers each tree's inodes. Also returns warnings (hard links split
/// between subvolumes).
pub fn resolve(
    tree: &SourceTree,
    specs: &[SubvolSpec],
    base: Option<&BaseNumbers>,
) -> Result<(Partition, Vec<String>)> {
    validate_specs(specs)?;
    let mut roots: Vec<(u32, &SubvolSpec)> = specs
        .iter()
        .map(|s| lookup(tree, s).map(|n| (n, s)))
        .collect::<Result<_>>()?;
    roots.sort_by_key(|&(n, _)| n);
    let n = tree.len();
    let mut subvols = vec![Subvol {
        id: FS_TREE,
        root: 0,
        parent: 0,
        readonly: false,
        default: false,
    }];
    if u16::try_from(roots.len() + 1).is_err() {
        return Err(Error::msg(format!(
            "--subvol: {} subvolumes; at most {} are supported",
            roots.len(),
            u16::MAX - 1
        )));
    }
    let mut subvol_of: Vec<u16> = Vec::new();
    if !roots.is_empty() {
        subvol_of = vec![0u16; n];
        let mut next = roots.iter().peekable();
        for i in 0..n as u32 {
            let parent_sv = if i == 0 {
                0
            } else {
                subvol_of[tree.node(i).parent as usize]
            };
            subvol_of[i as usize] = match next.peek() {
                Some(&&(r, spec)) if r == i => {
                    next.next();
                    subvols.push(Subvol {
                        id: FIRST_SUBVOL + subvols.len() as u64 - 1,
                        root: i,
                        parent: parent_sv as usize,
                        readonly: spec.readonly,
                        default: spec.default,
                    });
                    (subvols.len() - 1) as u16
                }
                _ => parent_sv,
            };
        }
    }
    let sv = |i: u32| subvol_of.get(i as usize).map_or(0, |&s| s as usize);

    // Inodes: a hard link's later names share its first name's inode,
    // unless they are in another subvolume.
    let mut first = vec![0u32; n];
    let mut cross_links = BTreeMap::new();
    let mut first_in: BTreeMap<(usize, u32), u32> = BTreeMap::new();
    let mut split: Vec<(u32, u32)> = Vec::new();
    for i in 0..n as u32 {
        let s = sv(i);
        let rep = tree.link_rep(i);
        first[i as usize] = if rep == i {
            i
        } else if sv(rep) == s {
            first[rep as usize]
        } else {
            match first_in.get(&(s, rep)) {
                Some(&f) => f,
                None => {
                    first_in.insert((s, rep), i);
                    cross_links.insert(i, rep);
                    split.push((rep, i));
                    i
                }
            }
        };
    }
    let ids: Vec<u64> = subvols.iter().map(|s| s.id).collect();
    let roots: Vec<u32> = subvols.iter().map(|s| s.root).collect();
    let numbering = numbering::number(tree, &ids, &sv, &first, &roots, base);
    let mut warnings = Vec::new();
    for &(rep, copy) in split.iter().take(5) {
        warnings.push(format!(
            "{} and {} are hard links in two subvolumes, which btrfs cannot link: \
             stored as two inodes sharing their data (reflinked copies)",
            crate::error::shown_path(&tree.image_path(rep)),
            crate::error::shown_path(&tree.image_path(copy)),
        ));
    }
    if split.len() > 5 {
        warnings.push(format!(
            "... and {} more hard links split between subvolumes",
            split.len() - 5
        ));
    }
    Ok((
        Partition {
            subvols,
            subvol_of,
            numbering,
            cross_links,
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mkfs_spellings() {
        let s = SubvolSpec::parse("default-ro:/@snap/").unwrap();
        assert_eq!(s.path, b"@snap");
        assert!(s.readonly && s.default && s.mountpoint.is_none());
        let s = SubvolSpec::parse("@nix=/nix/").unwrap();
        assert_eq!(s.mountpoint.as_deref(), Some(&b"nix"[..]));
        assert!(!s.readonly && !s.default);
        let s = SubvolSpec::parse("default:@=/").unwrap();
        assert_eq!(s.mountpoint.as_deref(), Some(&b""[..]));
        // An unknown prefix is part of the path, as mkfs.btrfs reads it.
        let s = SubvolSpec::parse("a:b").unwrap();
        assert_eq!(s.path, b"a:b");
        for bad in ["", "/", "ro:", "a/../b", "@=nix", "./x"] {
            assert!(SubvolSpec::parse(bad).is_err(), "{bad}");
        }
        let long = format!("@/{}", "n".repeat(256));
        assert!(SubvolSpec::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("256 bytes"));
    }

    #[test]
    fn specs_conflict() {
        let p = |s: &str| SubvolSpec::parse(s).unwrap();
        let e = validate_specs(&[p("default:a"), p("default-ro:b")]).unwrap_err();
        assert!(e.to_string().contains("two default"), "{e}");
        let e = validate_specs(&[p("a=/x"), p("b=/x/")]).unwrap_err();
        assert!(e.to_string().contains("same mountpoint /x"), "{e}");
        let e = validate_specs(&[p("a"), p("ro:a/")]).unwrap_err();
        assert!(e.to_string().contains("same subvolume"), "{e}");
        validate_specs(&[p("default:a=/"), p("b=/b"), p("a/c")]).unwrap();
        let made = SubvolSpec {
            path: b"/".to_vec(),
            mountpoint: None,
            readonly: false,
            default: false,
        };
        assert!(validate_specs(&[made])
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }
}

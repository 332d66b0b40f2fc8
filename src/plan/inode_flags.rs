//! `--inode-flags FLAGS:PATH` (mkfs.btrfs 6.15): inodes without data
//! copy-on-write (`nodatacow`, INODE_ITEM flag NODATACOW) or without data
//! checksums (`nodatasum`, NODATASUM).
//!
//! As mkfs.btrfs documents it, the flags apply to PATH and are inherited by
//! everything below it (a directory's children, their children, ...), but
//! not across a subvolume boundary: a subvolume's root directory gets flags
//! only from a spec naming it, and what is below it inherits from it (the
//! kernel does the same when it creates a subvolume). A hard-linked inode
//! gets the flags when any of its names is covered, so every inode made of
//! one source file (also one split between subvolumes) has the same flags.
//!
//! On disk, as the kernel sets them for files created in such a directory:
//! `nodatacow` gives NODATACOW to every covered inode and NODATASUM too to
//! regular files (no data checksums without copy-on-write); `nodatasum`
//! gives NODATASUM. A regular file with NODATASUM has no checksums in the
//! csum tree and its data is never stored compressed (the kernel compresses
//! neither kind of file).

use super::subvol::components;
use crate::error::{Error, Result};
use crate::format::{INODE_FLAG_NODATACOW, INODE_FLAG_NODATASUM};
use crate::source::{Kind, SourceTree};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The flag names `--inode-flags` takes (mkfs.btrfs's).
pub const FLAG_NAMES: [&str; 2] = ["nodatacow", "nodatasum"];

/// Requested: no copy-on-write.
const COW: u8 = 1;
/// Requested: no checksums.
const SUM: u8 = 2;

/// `--inode-flags FLAGS:PATH`, as given.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InodeFlagsSpec {
    /// Path in the image's top-level view, without leading or trailing '/'
    /// (empty: the image root).
    pub path: Vec<u8>,
    pub nodatacow: bool,
    pub nodatasum: bool,
}

impl InodeFlagsSpec {
    /// Parses mkfs.btrfs's spelling: a comma list of `nodatacow` and
    /// `nodatasum`, a colon, and a path in the image (`/` for its root).
    pub fn parse(arg: &str) -> Result<InodeFlagsSpec> {
        let what = format!("--inode-flags {arg}");
        let Some((flags, path)) = arg.split_once(':') else {
            return Err(Error::msg(format!(
                "{what}: expected FLAGS:PATH, e.g. nodatacow:var/lib/db"
            )));
        };
        let (mut nodatacow, mut nodatasum) = (false, false);
        for f in flags.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            match f {
                "nodatacow" => nodatacow = true,
                "nodatasum" => nodatasum = true,
                _ => {
                    return Err(Error::msg(format!(
                        "{what}: unknown flag '{f}' (known: {})",
                        FLAG_NAMES.join(", ")
                    )))
                }
            }
        }
        if !nodatacow && !nodatasum {
            return Err(Error::msg(format!(
                "{what}: no flag given (known: {})",
                FLAG_NAMES.join(", ")
            )));
        }
        if path.is_empty() {
            return Err(Error::msg(format!(
                "{what}: the path is empty (use / for the image root)"
            )));
        }
        Ok(InodeFlagsSpec {
            path: components(path.as_bytes(), &what)?.join(&b'/'),
            nodatacow,
            nodatasum,
        })
    }

    /// How it was given, for messages.
    pub fn shown(&self) -> String {
        let flags: Vec<&str> = [(self.nodatacow, "nodatacow"), (self.nodatasum, "nodatasum")]
            .into_iter()
            .filter_map(|(on, n)| on.then_some(n))
            .collect();
        format!("{}:/{}", flags.join(","), crate::error::shown(&self.path))
    }

    fn bits(&self) -> u8 {
        (if self.nodatacow { COW } else { 0 }) | if self.nodatasum { SUM } else { 0 }
    }
}

/// The node at image path `spec.path`, refusing missing entries and
/// symlinks (on the way and at the end: mkfs.btrfs would follow one, to
/// wherever it points; here a path names the entry itself).
fn lookup(tree: &SourceTree, spec: &InodeFlagsSpec) -> Result<u32> {
    let shown = |upto: &[&[u8]]| PathBuf::from("/").join(OsStr::from_bytes(&upto.join(&b'/')));
    let parts: Vec<&[u8]> = spec
        .path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let mut cur = 0u32;
    for (i, name) in parts.iter().enumerate() {
        let kind = tree.node(tree.link_rep(cur)).kind;
        if kind != Kind::Dir {
            return Err(Error::at(
                &shown(&parts[..i]),
                format!("is not a directory (--inode-flags {})", spec.shown()),
            ));
        }
        let Some(c) = tree.child(cur, name) else {
            return Err(Error::at(
                &shown(&parts[..=i]),
                format!(
                    "no such file or directory in the image (--inode-flags {})",
                    spec.shown()
                ),
            ));
        };
        if tree.node(tree.link_rep(c)).kind == Kind::Symlink {
            return Err(Error::at(
                &shown(&parts[..=i]),
                format!(
                    "is a symlink; --inode-flags follows none (--inode-flags {})",
                    spec.shown()
                ),
            ));
        }
        cur = c;
    }
    Ok(cur)
}

/// The flags of every inode of one tree, resolved.
#[derive(Debug, Default)]
pub struct InodeFlags {
    /// Requested bits per source node after inheritance, gathered on each
    /// hard link's first node; empty when no spec was given.
    req: Vec<u8>,
}

impl InodeFlags {
    /// No flags anywhere.
    pub fn none() -> InodeFlags {
        InodeFlags::default()
    }

    /// Finds every spec's entry in `tree` (the top-level view) and lets
    /// directories pass their flags down, stopping at `subvol_roots`
    /// (sorted source nodes of the subvolumes' root directories).
    pub fn resolve(
        tree: &SourceTree,
        specs: &[InodeFlagsSpec],
        subvol_roots: &[u32],
    ) -> Result<InodeFlags> {
        if specs.is_empty() {
            return Ok(InodeFlags::none());
        }
        let n = tree.len();
        let mut req = vec![0u8; n];
        for s in specs {
            let node = lookup(tree, s)?;
            req[node as usize] |= s.bits();
        }
        // Parents come before their children in node order.
        for i in 1..n {
            if subvol_roots.binary_search(&(i as u32)).is_err() {
                req[i] |= req[tree.node(i as u32).parent as usize];
            }
        }
        for i in 0..n as u32 {
            let rep = tree.link_rep(i);
            if rep != i {
                req[rep as usize] |= req[i as usize];
            }
        }
        Ok(InodeFlags { req })
    }

    pub fn is_empty(&self) -> bool {
        self.req.iter().all(|&r| r == 0)
    }

    fn bits(&self, tree: &SourceTree, node: u32) -> u8 {
        self.req
            .get(tree.link_rep(node) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The INODE_ITEM flags of the inode of source node `node`.
    pub fn inode_flags(&self, tree: &SourceTree, node: u32) -> u64 {
        let r = self.bits(tree, node);
        let file = tree.node(tree.link_rep(node)).kind == Kind::File;
        let mut f = 0;
        if r & COW != 0 {
            f |= INODE_FLAG_NODATACOW;
            if file {
                f |= INODE_FLAG_NODATASUM;
            }
        }
        if r & SUM != 0 {
            f |= INODE_FLAG_NODATASUM;
        }
        f
    }

    /// Whether regular file `node`'s data goes without checksums, and so
    /// uncompressed: NODATASUM, set directly or by NODATACOW.
    pub fn nodatasum(&self, tree: &SourceTree, node: u32) -> bool {
        self.bits(tree, node) != 0 && tree.node(tree.link_rep(node)).kind == Kind::File
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::generated::{build, Entry};
    use crate::source::Fill;
    use std::collections::BTreeMap;

    #[test]
    fn parses_mkfs_spellings() {
        let s = InodeFlagsSpec::parse("nodatacow:/var/lib/db/").unwrap();
        assert_eq!(s.path, b"var/lib/db");
        assert!(s.nodatacow && !s.nodatasum);
        let s = InodeFlagsSpec::parse("nodatasum,nodatacow:x").unwrap();
        assert!(s.nodatacow && s.nodatasum);
        assert_eq!(s.shown(), "nodatacow,nodatasum:/x");
        let s = InodeFlagsSpec::parse("nodatasum:/").unwrap();
        assert!(s.path.is_empty());
        for (bad, why) in [
            ("nodatacow", "FLAGS:PATH"),
            ("compress:x", "unknown flag 'compress'"),
            (":x", "no flag"),
            ("nodatacow:", "path is empty"),
            ("nodatacow:a/../b", "'..'"),
        ] {
            let e = InodeFlagsSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert_eq!(e.lines().count(), 1);
        }
    }

    fn dir(kids: Vec<(&str, Entry)>) -> Entry {
        Entry::dir(
            kids.into_iter()
                .map(|(n, e)| (n.as_bytes().to_vec(), e))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn directories_pass_flags_down_but_not_into_subvolumes() {
        let f = || Entry::file(10, Fill::Zeros);
        let root = dir(vec![
            (
                "db",
                dir(vec![
                    ("a", f()),
                    ("sub", dir(vec![("b", f())])),
                    ("sv", dir(vec![("c", f())])),
                ]),
            ),
            ("plain", f()),
            ("sum", f()),
        ]);
        let tree = build(&root).unwrap();
        let node = |p: &str| {
            p.split('/')
                .fold(0u32, |cur, n| tree.child(cur, n.as_bytes()).unwrap())
        };
        let specs = [
            InodeFlagsSpec::parse("nodatacow:db").unwrap(),
            InodeFlagsSpec::parse("nodatasum:sum").unwrap(),
        ];
        let flags = InodeFlags::resolve(&tree, &specs, &[node("db/sv")]).unwrap();
        let both = INODE_FLAG_NODATACOW | INODE_FLAG_NODATASUM;
        assert_eq!(flags.inode_flags(&tree, node("db")), INODE_FLAG_NODATACOW);
        assert_eq!(flags.inode_flags(&tree, node("db/a")), both);
        assert_eq!(
            flags.inode_flags(&tree, node("db/sub")),
            INODE_FLAG_NODATACOW
        );
        assert_eq!(flags.inode_flags(&tree, node("db/sub/b")), both);
        assert_eq!(flags.inode_flags(&tree, node("db/sv")), 0);
        assert_eq!(flags.inode_flags(&tree, node("db/sv/c")), 0);
        assert_eq!(flags.inode_flags(&tree, node("plain")), 0);
        assert_eq!(flags.inode_flags(&tree, node("sum")), INODE_FLAG_NODATASUM);
        assert!(flags.nodatasum(&tree, node("sum")) && flags.nodatasum(&tree, node("db/a")));
        assert!(!flags.nodatasum(&tree, node("db")) && !flags.nodatasum(&tree, node("plain")));
        let e = InodeFlags::resolve(
            &tree,
            &[InodeFlagsSpec::parse("nodatacow:db/nope").unwrap()],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/db/nope: no such file"), "{e}");
        let e = InodeFlags::resolve(
            &tree,
            &[InodeFlagsSpec::parse("nodatacow:plain/x").unwrap()],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/plain: is not a directory"), "{e}");
    }
}

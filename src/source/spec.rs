//! What goes into the image, before anything is read: an optional ROOT
//! directory, a Nix closure (store paths plus their registration), and overlay
//! directories. The closure becomes a small virtual directory tree of grafts
//! (`/nix/store/<name>` → the store path on the host) that the walk merges with
//! the host directories.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The Nix closure part of the sources.
#[derive(Clone, Debug, Default)]
pub struct Closure {
    /// Absolute store paths, e.g. `/nix/store/abc-hello-2.12`.
    pub store_paths: Vec<PathBuf>,
    /// Host file with the `nix-store --load-db` text.
    pub registration: Option<PathBuf>,
    /// Where the registration goes in the image.
    pub registration_path: PathBuf,
    /// Read `/nix/store/X` from `store_root/nix/store/X` (chroot stores).
    pub store_root: Option<PathBuf>,
}

pub const STORE_DIR: &str = "/nix/store";
pub const DEFAULT_REGISTRATION_PATH: &str = "/nix-path-registration";

#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub root: Option<PathBuf>,
    pub closure: Option<Closure>,
    /// Overlaid at the image root, in order.
    pub files: Vec<PathBuf>,
    /// Where the booted system mounts the image (`None`: `/`). ROOT and
    /// `files` are the tree at this path; store paths and the registration
    /// path are system paths, placed relative to it.
    pub mountpoint: Option<PathBuf>,
}

/// `path` (an absolute system path) relative to the image's `mountpoint`,
/// still absolute in the image; None when it lies outside.
pub fn in_image(path: &Path, mountpoint: Option<&Path>) -> Option<PathBuf> {
    match mountpoint {
        None => Some(path.to_path_buf()),
        Some(m) => path
            .strip_prefix(m)
            .ok()
            .filter(|rest| !rest.as_os_str().is_empty())
            .map(|rest| Path::new("/").join(rest)),
    }
}

/// Checks a `--mountpoint`: absolute, no `.` or `..`, not `/` itself
/// (which is no mountpoint at all: `None`).
pub fn check_mountpoint(m: &Path) -> Result<Option<PathBuf>> {
    let bytes = m.as_os_str().as_bytes();
    let comps: Vec<&[u8]> = bytes
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    if !bytes.starts_with(b"/") || comps.iter().any(|c| *c == b"." || *c == b"..") {
        return Err(Error::at(
            m,
            "--mountpoint must be an absolute path without '.' or '..'",
        ));
    }
    if comps.is_empty() {
        return Ok(None);
    }
    let mut p = PathBuf::from("/");
    for c in comps {
        p.push(OsStr::from_bytes(c));
    }
    Ok(Some(p))
}

impl Closure {
    /// Reads `DIR/store-paths` and `DIR/registration` (a closureInfo output).
    pub fn from_closure_info(dir: &Path) -> Result<Closure> {
        if !dir.is_dir() {
            return Err(Error::at(dir, "closure-info directory does not exist"));
        }
        let paths = dir.join("store-paths");
        if !paths.is_file() {
            return Err(Error::at(&paths, "missing from the closure-info directory"));
        }
        let mut c = Closure::from_store_paths_file(&paths)?;
        let reg = dir.join("registration");
        if !reg.is_file() {
            return Err(Error::at(&reg, "missing from the closure-info directory"));
        }
        c.registration = Some(reg);
        Ok(c)
    }

    /// Reads one absolute store path per line.
    pub fn from_store_paths_file(file: &Path) -> Result<Closure> {
        let text = fs::read(file).map_err(|e| Error::io(file, e))?;
        let store_paths = text
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.iter().all(|b| b.is_ascii_whitespace()))
            .map(|l| PathBuf::from(OsStr::from_bytes(l)))
            .collect();
        Ok(Closure {
            store_paths,
            registration: None,
            registration_path: PathBuf::from(DEFAULT_REGISTRATION_PATH),
            store_root: None,
        })
    }
}

/// A directory that exists only in the image (like /nix/store), holding grafts.
#[derive(Clone, Debug, Default)]
pub struct VirtualDir {
    pub entries: BTreeMap<Vec<u8>, VEntry>,
}

#[derive(Clone, Debug)]
pub enum VEntry {
    Dir(VirtualDir),
    /// A host file, directory or symlink placed at this name.
    Host(PathBuf),
}

impl VirtualDir {
    /// Places `host` at the absolute image path `at`, creating virtual parents.
    pub fn graft(&mut self, at: &Path, host: PathBuf) -> Result<()> {
        let comps: Vec<&[u8]> = at
            .as_os_str()
            .as_bytes()
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        if comps.is_empty() || comps.iter().any(|c| *c == b"." || *c == b"..") {
            return Err(Error::at(at, "not a usable absolute path in the image"));
        }
        if comps.iter().any(|c| c.len() > 255) {
            return Err(Error::at(
                at,
                "a name in this path is longer than 255 bytes",
            ));
        }
        let mut dir = self;
        for c in &comps[..comps.len() - 1] {
            let e = dir
                .entries
                .entry(c.to_vec())
                .or_insert_with(|| VEntry::Dir(VirtualDir::default()));
            dir = match e {
                VEntry::Dir(d) => d,
                VEntry::Host(other) => {
                    return Err(Error::at(
                        at,
                        format!(
                            "its parent is already provided by {}",
                            crate::error::shown_path(other)
                        ),
                    ))
                }
            };
        }
        let last = comps[comps.len() - 1].to_vec();
        match dir.entries.get(&last) {
            None => {
                dir.entries.insert(last, VEntry::Host(host));
                Ok(())
            }
            Some(VEntry::Host(h)) if *h == host => Ok(()),
            Some(VEntry::Host(h)) => Err(Error::at(
                at,
                format!(
                    "provided by both {} and {}",
                    crate::error::shown_path(h),
                    crate::error::shown_path(&host)
                ),
            )),
            Some(VEntry::Dir(_)) => Err(Error::at(
                at,
                format!(
                    "{} conflicts with a directory of the image",
                    crate::error::shown_path(&host)
                ),
            )),
        }
    }
}

impl Sources {
    /// Where system path `p` goes in the image, or why it cannot.
    fn placed(&self, p: &Path, what: &str) -> Result<PathBuf> {
        in_image(p, self.mountpoint.as_deref()).ok_or_else(|| {
            Error::at(
                p,
                format!(
                    "{what} is outside the image's mountpoint {}",
                    crate::error::shown_path(self.mountpoint.as_deref().unwrap_or(Path::new("/")))
                ),
            )
        })
    }

    /// The virtual tree of everything that is not a plain overlay directory.
    pub fn virtual_root(&self) -> Result<VirtualDir> {
        let mut root = VirtualDir::default();
        let Some(c) = &self.closure else {
            return Ok(root);
        };
        let prefix = format!("{STORE_DIR}/");
        for p in &c.store_paths {
            let bytes = p.as_os_str().as_bytes();
            let name = bytes.strip_prefix(prefix.as_bytes());
            let valid = matches!(name, Some(n) if !n.is_empty() && !n.contains(&b'/') && n != b"." && n != b"..");
            if !valid {
                return Err(Error::at(
                    p,
                    format!("not a store path (expected {prefix}NAME)"),
                ));
            }
            let host = match &c.store_root {
                Some(r) => r.join(p.strip_prefix("/").unwrap_or(p)),
                None => p.clone(),
            };
            if fs::symlink_metadata(&host).is_err() {
                return Err(Error::at(
                    p,
                    format!(
                        "store path does not exist ({})",
                        crate::error::shown_path(&host)
                    ),
                ));
            }
            let at = self.placed(p, "store path")?;
            root.graft(&at, host)?;
        }
        if let Some(reg) = &c.registration {
            let at = self.placed(&c.registration_path, "--registration-path")?;
            root.graft(&at, reg.clone())?;
        }
        Ok(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafts_reject_names_the_kernel_would_reject() {
        let mut root = VirtualDir::default();
        let long = format!("/nix/store/{}", "n".repeat(256));
        let e = root
            .graft(Path::new(&long), PathBuf::from("/x"))
            .unwrap_err();
        assert!(e.to_string().contains("255"), "{e}");
        assert!(root
            .graft(Path::new("/a/../b"), PathBuf::from("/x"))
            .is_err());
        let ok = format!("/nix/store/{}", "n".repeat(255));
        root.graft(Path::new(&ok), PathBuf::from("/x")).unwrap();
        // The same graft twice is fine; another host path for it is a conflict.
        root.graft(Path::new(&ok), PathBuf::from("/x")).unwrap();
        assert!(root.graft(Path::new(&ok), PathBuf::from("/y")).is_err());
    }
}

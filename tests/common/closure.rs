//! A synthetic Nix closure on disk: store paths named by a hash of their
//! identity, each with directories, files of closure-like sizes (mostly
//! small, some medium, few large; half text-like so `--compress` matters,
//! half random), a symlink or two, every mtime 1 as the store has; and a
//! small overlay tree outside the store with real-looking times. Updates
//! replace some store paths by new ones (new names, new content, similar
//! sizes) and rewrite one overlay file. Self-contained (std and
//! rand_chacha), so benches can include it with `#[path]`.

#![allow(dead_code)]

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

/// One store path: its identity (name, content) and its shape (how many
/// files of which sizes where): a new version of a package has the shape of
/// the one it replaces, its sizes a little off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorePath {
    pub id: u64,
    pub shape: u64,
}

/// A closure: its store paths and the generation of its overlay.
#[derive(Clone, Debug)]
pub struct Closure {
    pub paths: Vec<StorePath>,
    pub generation: u64,
}

impl Closure {
    pub fn new(paths: u64) -> Closure {
        Closure {
            paths: (0..paths).map(|id| StorePath { id, shape: id }).collect(),
            generation: 0,
        }
    }

    /// The next closure: `replace` store paths (spread over the closure,
    /// different ones each generation) replaced by new ones, and the
    /// overlay's generation stepped.
    pub fn update(&self, replace: usize) -> Closure {
        let generation = self.generation + 1;
        let mut paths = self.paths.clone();
        let n = paths.len();
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0000 + generation);
        let mut taken = std::collections::BTreeSet::new();
        while taken.len() < replace.min(n) {
            taken.insert(rng.random_range(0..n));
        }
        for (k, &i) in taken.iter().enumerate() {
            paths[i] = StorePath {
                id: generation * 1_000_000 + k as u64,
                shape: paths[i].shape,
            };
        }
        Closure { paths, generation }
    }

    /// Writes the closure under `root` (which must not exist).
    pub fn write(&self, root: &Path) {
        for p in &self.paths {
            write_store_path(root, *p);
        }
        let etc = root.join("etc");
        fs::create_dir_all(etc.join("ssh")).unwrap();
        fs::write(
            etc.join("os-release"),
            format!("NAME=Appliance\nVERSION_ID=\"{}\"\n", self.generation),
        )
        .unwrap();
        set_mtime(
            &etc.join("os-release"),
            1_700_000_000 + self.generation as i64,
        );
        write_bytes(&etc.join("ssh/moduli"), 240_000, 77, false);
        set_mtime(&etc.join("ssh/moduli"), 1_690_000_000);
        fs::write(etc.join("hostname"), b"appliance\n").unwrap();
        set_mtime(&etc.join("hostname"), 1_690_000_000);
        symlink("/nix/store", etc.join("store-link")).unwrap();
        set_mtime(&etc.join("store-link"), 1_700_000_000);
        for d in ["etc/ssh", "etc", "nix/store", "nix", ""] {
            set_mtime(&root.join(d), 1_700_000_000);
        }
    }
}

/// Nix's base32 alphabet.
const BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

fn store_name(id: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(id ^ 0x9e37_79b9_7f4a_7c15);
    let hash: String = (0..32)
        .map(|_| BASE32[rng.random_range(0..32)] as char)
        .collect();
    const NAMES: [&str; 12] = [
        "glibc",
        "openssl",
        "systemd",
        "bash",
        "coreutils",
        "python3",
        "perl",
        "zlib",
        "util-linux",
        "linux-firmware",
        "nix",
        "busybox",
    ];
    format!(
        "{hash}-{}-{}.{}",
        NAMES[(id % 12) as usize],
        1 + id % 5,
        id % 17
    )
}

/// A file size as closures have them: most small, some medium, few large.
fn file_size(rng: &mut ChaCha8Rng) -> u64 {
    let x: f64 = rng.random();
    if x < 0.58 {
        rng.random_range(60..3_000)
    } else if x < 0.913 {
        rng.random_range(3_000..40_000)
    } else if x < 0.995 {
        rng.random_range(40_000..200_000)
    } else {
        rng.random_range(200_000..1_500_000)
    }
}

fn write_store_path(root: &Path, p: StorePath) {
    let dir = root.join("nix/store").join(store_name(p.id));
    let mut rng = ChaCha8Rng::seed_from_u64(p.shape);
    let mut jitter = ChaCha8Rng::seed_from_u64(p.id ^ 0x0123_4567);
    let files = 1 + rng.random_range(0..16u32);
    const DIRS: [&str; 5] = ["bin", "lib", "share/doc", "share/man/man1", "etc"];
    for k in 0..files {
        let sub = DIRS[rng.random_range(0..DIRS.len())];
        let d = dir.join(sub);
        fs::create_dir_all(&d).unwrap();
        let f = d.join(format!("file-{k}"));
        let size = file_size(&mut rng);
        let text = rng.random_bool(0.5);
        // Another version: sizes within 10 %.
        let size = match p.id == p.shape {
            true => size,
            false => (size as f64 * jitter.random_range(0.9..1.1)) as u64,
        };
        write_bytes(&f, size, p.id * 1000 + k as u64, text);
        set_mtime(&f, 1);
    }
    if rng.random_bool(0.3) {
        fs::create_dir_all(dir.join("lib")).unwrap();
        symlink("file-0", dir.join("lib/link")).unwrap();
        set_mtime(&dir.join("lib/link"), 1);
    }
    // Directories carry the store's mtime too, deepest first.
    let mut dirs = vec![dir.clone()];
    let mut i = 0;
    while i < dirs.len() {
        for e in fs::read_dir(&dirs[i]).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            }
        }
        i += 1;
    }
    for d in dirs.iter().rev() {
        set_mtime(d, 1);
    }
}

/// `size` bytes: random, or text from a small vocabulary.
fn write_bytes(path: &Path, size: u64, seed: u64, text: bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut buf = vec![0u8; size as usize];
    if text {
        const WORDS: [&str; 16] = [
            "the ", "store ", "path ", "library ", "version ", "config ", "option ", "error ",
            "value\n", "system ", "build ", "image ", "kernel ", "module ", "service ", "file\n",
        ];
        let mut at = 0;
        while at < buf.len() {
            let w = WORDS[rng.random_range(0..WORDS.len())].as_bytes();
            let n = w.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&w[..n]);
            at += n;
        }
    } else {
        rng.fill_bytes(&mut buf);
    }
    fs::write(path, &buf).unwrap();
}

fn set_mtime(path: &Path, sec: i64) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: 0,
        },
    ];
    // SAFETY: a valid path and two timespecs; no symlink is followed.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

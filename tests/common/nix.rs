//! The Nix side of the system tests, with Debian's nix-bin and no daemon:
//! local chroot stores (`--store DIR`, the store's files under
//! `DIR/nix/store`), a realistic closure built offline, closureInfo
//! directories in nixpkgs' format, NAR hashes and store round trips.

#![allow(unused_imports, dead_code)]

use super::*;
use std::collections::{BTreeMap, HashMap};
use std::env;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tempfile::TempDir;

pub const NIX_TOOLS: &[&str] = &["nix-store", "nix-build", "nix-hash", "nix-instantiate"];

/// The system-test prerequisites plus nix-bin. Skips loudly (or panics under
/// `BTRFSIMG_REQUIRE_SYSTEM_TESTS=1`) when something is missing; always skips
/// in mkfs mode, which has no closure options.
pub fn nix_available(what: &str) -> bool {
    if !system_tests_available(what) {
        return false;
    }
    if is_mkfs_mode() {
        let line =
            format!("\nSKIPPED {what}: closures are a btrfsimg feature ({BUILDER_ENV}=mkfs)\n");
        let _ = io::stderr().lock().write_all(line.as_bytes());
        return false;
    }
    tools_available(what, NIX_TOOLS) && tools_available(what, &["zstd"])
}

/// Options for daemon-less, offline `nix-build` as root on a chroot store:
/// no binary cache (no network), builds run as root (no nixbld users
/// needed), and since builds for a chroot store always run in a chroot, the
/// host's /bin, /usr and /lib (and /lib64 where it exists) are made visible
/// in it so that `/bin/sh` builders and host tools run.
pub const OFFLINE_BUILD_OPTIONS: &[&str] = &[
    "--option",
    "substituters",
    "",
    "--option",
    "build-users-group",
    "",
    "--option",
    "sandbox-paths",
    "/bin /usr /lib /lib64?",
];

/// One path's entry in a `nix-store --load-db` registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub path: String,
    /// As written: base16 (`--dump-db`) or `sha256:` + base32 (closureInfo).
    pub nar_hash: String,
    pub nar_size: u64,
    pub deriver: String,
    pub references: Vec<String>,
}

impl Registration {
    /// The NAR hash as nix base32, whichever form the registration uses.
    pub fn nar_hash_base32(&self) -> String {
        match self.nar_hash.strip_prefix("sha256:") {
            Some(b32) => b32.to_string(),
            None => hashes_to_base32(&[self.nar_hash.as_str()]).remove(0),
        }
    }
}

/// Parses registration text: per path, the path, NAR hash, NAR size,
/// deriver (possibly empty), reference count and references, one per line.
pub fn parse_registration(text: &str) -> Vec<Registration> {
    let mut lines = text.lines();
    let mut out = Vec::new();
    while let Some(path) = lines.next() {
        if path.is_empty() && out.is_empty() {
            continue;
        }
        let mut next = |what: &str| {
            lines
                .next()
                .unwrap_or_else(|| panic!("registration ends before the {what} of {path}"))
                .to_string()
        };
        let nar_hash = next("NAR hash");
        let nar_size = next("NAR size").parse().expect("NAR size");
        let deriver = next("deriver");
        let n: usize = next("reference count").parse().expect("reference count");
        let references = (0..n).map(|_| next("reference")).collect();
        out.push(Registration {
            path: path.to_string(),
            nar_hash,
            nar_size,
            deriver,
            references,
        });
    }
    out
}

pub fn format_registration(entries: &[Registration]) -> String {
    let mut s = String::new();
    for e in entries {
        s.push_str(&format!(
            "{}\n{}\n{}\n{}\n{}\n",
            e.path,
            e.nar_hash,
            e.nar_size,
            e.deriver,
            e.references.len()
        ));
        for r in &e.references {
            s.push_str(r);
            s.push('\n');
        }
    }
    s
}

/// base16 SHA-256 hashes to nix base32 (`nix-hash --to-base32`).
pub fn hashes_to_base32(hex: &[&str]) -> Vec<String> {
    let mut cmd = Command::new(tool("nix-hash"));
    cmd.args(["--type", "sha256", "--to-base32"]).args(hex);
    let out: Vec<String> = run_stdout(&mut cmd).lines().map(str::to_string).collect();
    assert_eq!(out.len(), hex.len(), "nix-hash --to-base32 output");
    out
}

/// NAR hash of any path on the host: `nix-hash --type sha256 --base32 PATH`.
pub fn nar_hash_base32(p: &Path) -> String {
    let mut cmd = Command::new(tool("nix-hash"));
    cmd.args(["--type", "sha256", "--base32"]).arg(p);
    run_stdout(&mut cmd).trim().to_string()
}

/// NAR size of any path on the host: the length of `nix-store --dump PATH`.
pub fn nar_size(p: &Path) -> u64 {
    let mut cmd = Command::new(tool("nix-store"));
    cmd.arg("--dump")
        .arg(p)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(&cmd)));
    let n = io::copy(&mut child.stdout.take().unwrap(), &mut io::sink()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{} failed: {}",
        describe(&cmd),
        output_text(&o)
    );
    n
}

/// A closureInfo directory as nixpkgs' `closureInfo` writes it.
pub struct ClosureInfo {
    pub dir: PathBuf,
    /// Sorted store paths (the `store-paths` file).
    pub store_paths: Vec<String>,
    /// The `registration` file's entries: `sha256:`+base32 NAR hashes, empty
    /// derivers, as `exportReferencesGraph` reports them.
    pub registration: Vec<Registration>,
}

impl ClosureInfo {
    pub fn registration_path(&self) -> PathBuf {
        self.dir.join("registration")
    }

    pub fn store_paths_path(&self) -> PathBuf {
        self.dir.join("store-paths")
    }
}

/// A local Nix store whose files live under `root/nix/store` (a "chroot
/// store": `nix-store --store ROOT ...`).
pub struct ChrootStore {
    pub root: PathBuf,
}

impl ChrootStore {
    /// A new, empty store at ROOT (created).
    pub fn new(root: &Path) -> ChrootStore {
        fs::create_dir_all(root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        ChrootStore {
            root: root.to_path_buf(),
        }
    }

    /// `PROG --store ROOT` (nix-store, nix-build, nix-instantiate).
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(tool(prog));
        c.arg("--store").arg(&self.root);
        c
    }

    /// Where the store path `/nix/store/X` lives on the host.
    pub fn host_path(&self, store_path: &str) -> PathBuf {
        self.root.join(store_path.trim_start_matches('/'))
    }

    /// `nix-store --add PATH`: the new store path.
    pub fn add(&self, p: &Path) -> String {
        let mut c = self.cmd("nix-store");
        c.arg("--add").arg(p);
        run_stdout(&mut c).trim().to_string()
    }

    /// `nix-build FILE --argstr K V ... [-A ATTR]` offline: the output paths.
    pub fn build(&self, file: &Path, argstrs: &[(&str, &str)], attr: Option<&str>) -> Vec<String> {
        let mut c = self.cmd("nix-build");
        c.arg(file).arg("--no-out-link").args(OFFLINE_BUILD_OPTIONS);
        for (k, v) in argstrs {
            c.args(["--argstr", k, v]);
        }
        if let Some(a) = attr {
            c.args(["-A", a]);
        }
        run_stdout(&mut c)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// `nix-store -qR PATHS`, sorted.
    pub fn closure(&self, paths: &[String]) -> Vec<String> {
        let mut c = self.cmd("nix-store");
        c.arg("-qR").args(paths);
        let mut v: Vec<String> = run_stdout(&mut c).lines().map(str::to_string).collect();
        v.sort();
        v
    }

    /// `nix-store --dump-db PATHS`: registration with base16 hashes.
    pub fn dump_db(&self, paths: &[String]) -> String {
        let mut c = self.cmd("nix-store");
        c.arg("--dump-db").args(paths);
        run_stdout(&mut c)
    }

    /// Writes DIR/store-paths, DIR/registration and DIR/total-nar-size for
    /// the closure of ROOTS, in the format of nixpkgs' `closureInfo`. The
    /// data comes from the store's database (`--dump-db`).
    pub fn closure_info(&self, roots: &[String], dir: &Path) -> ClosureInfo {
        let paths = self.closure(roots);
        let mut reg = parse_registration(&self.dump_db(&paths));
        reg.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(
            reg.iter().map(|r| &r.path).collect::<Vec<_>>(),
            paths.iter().collect::<Vec<_>>(),
            "--dump-db did not list exactly the closure"
        );
        let hex: Vec<&str> = reg.iter().map(|r| r.nar_hash.as_str()).collect();
        let b32 = hashes_to_base32(&hex);
        for (r, h) in reg.iter_mut().zip(b32) {
            r.nar_hash = format!("sha256:{h}");
            r.deriver = String::new();
        }
        fs::create_dir_all(dir).unwrap();
        let mut sp = paths.join("\n");
        sp.push('\n');
        fs::write(dir.join("store-paths"), sp).unwrap();
        fs::write(dir.join("registration"), format_registration(&reg)).unwrap();
        let total: u64 = reg.iter().map(|r| r.nar_size).sum();
        fs::write(dir.join("total-nar-size"), format!("{total}\n")).unwrap();
        ClosureInfo {
            dir: dir.to_path_buf(),
            store_paths: paths,
            registration: reg,
        }
    }

    /// `nix-store --load-db < REGISTRATION`.
    pub fn load_db(&self, registration: &Path) {
        let mut c = self.cmd("nix-store");
        c.arg("--load-db");
        let f = File::open(registration)
            .unwrap_or_else(|e| panic!("open {}: {e}", registration.display()));
        let o = c
            .stdin(f)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(&c)));
        assert!(
            o.status.success(),
            "{} < {} failed: {}",
            describe(&c),
            registration.display(),
            output_text(&o)
        );
    }

    /// `nix-store --verify --check-contents` (not asserted).
    pub fn verify_contents(&self) -> Output {
        let mut c = self.cmd("nix-store");
        c.args(["--verify", "--check-contents"]);
        run(&mut c)
    }

    /// `nix-store --check-validity PATHS` must succeed.
    pub fn assert_valid(&self, paths: &[String]) {
        let mut c = self.cmd("nix-store");
        c.arg("--check-validity").args(paths);
        run_ok(&mut c);
    }
}

/// A closure in a fresh chroot store, built offline.
pub struct TestClosure {
    pub store: ChrootStore,
    /// The built derivation's `out` path (the closure's root).
    pub root: String,
    /// The `nix-store --add`ed directory tree.
    pub payload: String,
    pub info: ClosureInfo,
}

/// Builds a small but realistic closure in a new chroot store under WORK:
/// - `payload`: a directory tree added with `nix-store --add` (executable,
///   files at the inline and sector boundaries, a 300 KiB file, an empty
///   file, relative symlinks, a deep directory, a non-ASCII name);
/// - `greeting`, `refers.conf`: `builtins.toFile` texts, the second one
///   referring to the first and to `payload`;
/// - `small-1.0`: a derivation with outputs `out` and `doc`, built with
///   `nix-build`, whose `out` refers to `refers.conf`, `payload` and `doc`.
///
/// The closure info of `small-1.0`'s `out` is written to WORK/closure-info.
pub fn realistic_closure(work: &Path) -> TestClosure {
    let store = ChrootStore::new(&work.join("store"));

    let mut t = TreeBuilder::new(&work.join("payload"));
    t.file(b"bin/tool", b"#!/bin/sh\necho payload tool\n")
        .chmod(b"bin/tool", 0o755)
        .random_file(b"lib/data.bin", 300 * KIB, 1)
        .random_file(b"lib/edge-2048", 2048, 2)
        .random_file(b"lib/edge-2049", 2049, 3)
        .random_file(b"lib/edge-4097", 4097, 4)
        .file(b"share/empty", b"")
        .symlink(b"share/data", b"../lib/data.bin")
        .symlink(b"share/self", b".")
        .file(b"share/deep/a/b/c/leaf", b"leaf\n")
        .file("share/caf\u{e9} men\u{fc}".as_bytes(), b"non-ascii name\n")
        .finalize();
    let payload = store.add(t.root());

    let expr = work.join("closure.nix");
    fs::write(
        &expr,
        r#"{ payload }:
let
  payloadPath = builtins.storePath payload;
  greeting = builtins.toFile "greeting" "hello from the closure\n";
  refers = builtins.toFile "refers.conf" ''
    greeting=${greeting}
    payload=${payloadPath}
  '';
in
derivation {
  name = "small-1.0";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  outputs = [ "out" "doc" ];
  PATH = "/usr/bin:/bin";
  args = [ "-ec" ''
    mkdir -p $out/bin $out/share/small $doc/share/doc
    printf '#!/bin/sh\nexec cat %s\n' ${refers} > $out/bin/small
    chmod +x $out/bin/small
    ln -s ${payloadPath} $out/share/small/payload
    ln -s ../share/small $out/bin/data
    seq 1 60000 > $out/share/small/numbers
    : > $out/share/small/empty
    echo "documentation of small" > $doc/share/doc/README
    ln -s $doc/share/doc $out/share/doc
  '' ];
}
"#,
    )
    .unwrap();
    let built = store.build(&expr, &[("payload", &payload)], None);
    let root = built
        .iter()
        .find(|p| p.ends_with("-small-1.0"))
        .unwrap_or_else(|| panic!("nix-build printed no small-1.0 output: {built:?}"))
        .clone();
    let info = store.closure_info(std::slice::from_ref(&root), &work.join("closure-info"));
    let names: Vec<&str> = info
        .store_paths
        .iter()
        .map(|p| p.split_once('-').map_or(p.as_str(), |(_, n)| n))
        .collect();
    for want in [
        "small-1.0",
        "small-1.0-doc",
        "refers.conf",
        "greeting",
        "payload",
    ] {
        assert!(
            names.contains(&want),
            "closure of {root} lacks {want}: {:?}",
            info.store_paths
        );
    }
    TestClosure {
        store,
        root,
        payload,
        info,
    }
}

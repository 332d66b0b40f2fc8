//! Prerequisites: root, loop devices, tools; the builder under test.

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

/// Returns true when the system tests can run here. Otherwise panics when
/// `BTRFSIMG_REQUIRE_SYSTEM_TESTS=1`, or prints a loud SKIPPED line and
/// returns false (the test should then return early).
pub fn system_tests_available(what: &str) -> bool {
    match missing_prerequisite() {
        None => true,
        Some(reason) => skip_or_panic(what, &reason),
    }
}

/// Skip (return false, after a loud message) or panic under REQUIRE.
///
/// The message goes straight to the process's stderr, not through
/// `eprintln!`, which the test harness captures (and hides for passing
/// tests): a skipped test must be visible in `cargo test` output.
pub fn skip_or_panic(what: &str, reason: &str) -> bool {
    skip_or_panic_as(env::var(REQUIRE_ENV).as_deref() == Ok("1"), what, reason)
}

/// `skip_or_panic` with the requirement given rather than read from the environment.
pub fn skip_or_panic_as(required: bool, what: &str, reason: &str) -> bool {
    if required {
        panic!("{what}: system tests are required ({REQUIRE_ENV}=1) but cannot run: {reason}");
    }
    let line =
        format!("\nSKIPPED {what}: {reason} (set {REQUIRE_ENV}=1 to turn this into a failure)\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
    false
}

/// Prints a line the test harness does not capture (see `skip_or_panic`).
pub fn say(line: &str) {
    let _ = io::stderr()
        .lock()
        .write_all(format!("\n{line}\n").as_bytes());
}

/// The Debian package that provides a tool the tests run.
pub fn package_of(tool: &str) -> &'static str {
    match tool {
        "btrfs" | "mkfs.btrfs" => "btrfs-progs",
        "qemu-img" | "qemu-nbd" | "qemu-io" => "qemu-utils",
        "nbdcopy" | "nbdinfo" => "libnbd-bin",
        "nbdkit" => "nbdkit",
        "openssl" => "openssl",
        "qemu-system-x86_64" => "qemu-system-x86",
        "busybox" => "busybox-static",
        "fusermount3" => "fuse3",
        "setfacl" | "getfacl" => "acl",
        "setfattr" | "getfattr" => "attr",
        "setcap" | "getcap" => "libcap2-bin",
        "mkfs.ext4" => "e2fsprogs",
        "bmaptool" => "bmap-tools",
        "blkid" => "util-linux",
        "zstd" => "zstd",
        "git" => "git",
        "compsize" => "btrfs-compsize",
        "modprobe" => "kmod",
        "cpio" => "cpio",
        "dpkg-deb" | "dpkg" => "dpkg",
        "apt-get" => "apt",
        "mount" | "umount" | "dmesg" | "setpriv" | "losetup" => "mount / util-linux",
        t if t.starts_with("nix") => "nix-bin",
        _ => "coreutils",
    }
}

/// True when every tool in `tools` is installed; otherwise skips loudly (or
/// panics under `BTRFSIMG_REQUIRE_SYSTEM_TESTS=1`), naming what to install.
/// Every test calls this (or a helper that does) for each external tool it
/// runs beyond the system-test basics, before it starts.
pub fn tools_available(what: &str, tools: &[&str]) -> bool {
    tools_available_as(env::var(REQUIRE_ENV).as_deref() == Ok("1"), what, tools)
}

/// `tools_available` with the requirement given rather than read from the environment.
pub fn tools_available_as(required: bool, what: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|t| package_of(t)).collect();
    pkgs.dedup();
    skip_or_panic_as(
        required,
        what,
        &format!(
            "{} not found on PATH (apt-get install {})",
            missing
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", "),
            pkgs.join(" ")
        ),
    )
}

pub fn missing_prerequisite() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (needed for loop mounts, chown, mknod)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control does not exist (try `modprobe loop`)".into());
    }
    for t in ["btrfs", "mkfs.btrfs", "mount", "umount"] {
        if find_tool(t).is_none() {
            return Some(format!(
                "`{t}` not found on PATH (install btrfs-progs / mount)"
            ));
        }
    }
    if !kernel_has_btrfs() {
        let _ = Command::new(tool("modprobe"))
            .arg("btrfs")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !kernel_has_btrfs() {
            return Some("kernel has no btrfs support (/proc/filesystems)".into());
        }
    }
    None
}

pub fn kernel_has_btrfs() -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("btrfs"))
        })
        .unwrap_or(false)
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
    env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// True when the external tool NAME is installed; otherwise skips loudly (or
/// panics under `BTRFSIMG_REQUIRE_SYSTEM_TESTS=1`), naming the package.
pub fn tool_available(what: &str, name: &str, _package: &str) -> bool {
    tools_available(what, &[name])
}

/// Runs a command, asserts exit 0, returns its stdout alone.
pub fn run_stdout(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "command failed ({}): {}\n--- output ---\n{}",
        o.status,
        describe(cmd),
        output_text(&o)
    );
    String::from_utf8(o.stdout).expect("command printed non-UTF-8 output")
}

/// Full path of an external tool (PATH, then the usual sbin directories).
/// A tool that is missing here was not declared by the test that runs it
/// (see `tools_available`): say so rather than fail obscurely.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed (apt-get install {}) and the test running it \
             did not check for it first: add it to the test's tools_available list",
            package_of(name)
        )
    })
}

pub fn btrfsimg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_btrfsimg"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builder {
    /// `btrfsimg export` (the real thing).
    Btrfsimg,
    /// `mkfs.btrfs --rootdir` (harness validation only).
    Mkfs,
}

pub fn builder() -> Builder {
    match env::var(BUILDER_ENV) {
        Err(_) => Builder::Btrfsimg,
        Ok(v) if v.is_empty() || v == "btrfsimg" => Builder::Btrfsimg,
        Ok(v) if v == "mkfs" => Builder::Mkfs,
        Ok(v) => panic!("{BUILDER_ENV}={v:?}: expected `mkfs` or `btrfsimg`"),
    }
}

pub fn is_mkfs_mode() -> bool {
    builder() == Builder::Mkfs
}

/// A fresh temporary directory (removed on drop).
pub fn workdir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("btrfsimg-{tag}-"))
        .tempdir()
        .expect("create temp dir")
}

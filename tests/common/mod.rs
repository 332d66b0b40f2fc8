//! Shared harness for the system tests: building images, `btrfs check`,
//! loop mounts with cleanup guards, tree comparison, source-tree builders,
//! read-write cycles and reproducibility checks.
//!
//! Environment:
//! - `BTRFSIMG_REQUIRE_SYSTEM_TESTS=1`: missing prerequisites (root, loop
//!   devices, btrfs-progs) are a failure instead of a skip.
//! - `BTRFSIMG_TEST_BUILDER=mkfs`: build images with `mkfs.btrfs --rootdir`
//!   instead of `btrfsimg export` (only for validating the harness itself).
//!
//! The Nix side (chroot stores, closures, closureInfo) is in `nix.rs`.

#![allow(dead_code)]

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

pub mod nix;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

pub const REQUIRE_ENV: &str = "BTRFSIMG_REQUIRE_SYSTEM_TESTS";
pub const BUILDER_ENV: &str = "BTRFSIMG_TEST_BUILDER";

/// Arguments that pin every otherwise free choice (UUID, timestamp) so that
/// two exports of the same tree must be byte-identical. Give each test its
/// own UUID so parallel tests never mount different filesystems that share
/// an fsid.
pub fn fixed_args(uuid: &'static str) -> Vec<&'static str> {
    vec!["-U", uuid, "--timestamp", "1700000000"]
}

const CHUNK: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Prerequisites, tools, builder selection
// ---------------------------------------------------------------------------

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
pub fn skip_or_panic(what: &str, reason: &str) -> bool {
    if env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!("{what}: system tests are required ({REQUIRE_ENV}=1) but cannot run: {reason}");
    }
    eprintln!("SKIPPED {what}: {reason} (set {REQUIRE_ENV}=1 to turn this into a failure)");
    false
}

fn missing_prerequisite() -> Option<String> {
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

fn kernel_has_btrfs() -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("btrfs"))
        })
        .unwrap_or(false)
}

fn find_tool(name: &str) -> Option<PathBuf> {
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
pub fn tool_available(what: &str, name: &str, package: &str) -> bool {
    find_tool(name).is_some()
        || skip_or_panic(
            what,
            &format!("`{name}` not found on PATH (apt-get install {package})"),
        )
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
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
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

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

pub fn describe(cmd: &Command) -> String {
    format!("{cmd:?}")
}

/// Runs a command to completion, panicking only if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command, asserts exit 0, returns stdout+stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    let text = output_text(&o);
    assert!(
        o.status.success(),
        "command failed ({}): {}\n--- output ---\n{text}",
        o.status,
        describe(cmd)
    );
    text
}

// ---------------------------------------------------------------------------
// Exporting
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct ExportResult {
    pub success: bool,
    pub status: String,
    pub stderr: String,
    pub command: String,
}

/// Runs an export (of the selected builder) without asserting anything.
pub fn try_export(src: &Path, out: &Path, extra_args: &[&str]) -> ExportResult {
    match builder() {
        Builder::Btrfsimg => try_export_sources(Some(src), out, extra_args),
        Builder::Mkfs => mkfs_export(src, out, extra_args),
    }
}

/// Runs `btrfsimg export [ROOT] -o OUT ARGS` without asserting anything. ROOT
/// is optional here because closures and overlays (`--closure-info`,
/// `--files`, ...) can be the only sources; those options exist only in
/// btrfsimg, so this never goes through the mkfs emulation.
pub fn try_export_sources(root: Option<&Path>, out: &Path, extra_args: &[&str]) -> ExportResult {
    let mut cmd = Command::new(btrfsimg_bin());
    cmd.arg("export");
    if let Some(r) = root {
        cmd.arg(r);
    }
    cmd.arg("-o").arg(out).args(extra_args);
    let o = run(&mut cmd);
    ExportResult {
        success: o.status.success(),
        status: o.status.to_string(),
        stderr: output_text(&o),
        command: describe(&cmd),
    }
}

/// `try_export_sources` that must succeed and produce OUT; returns stderr.
pub fn export_sources(root: Option<&Path>, out: &Path, extra_args: &[&str]) -> String {
    let r = try_export_sources(root, out, extra_args);
    assert!(
        r.success,
        "export failed ({}): {}\n--- stderr ---\n{}",
        r.status, r.command, r.stderr
    );
    assert!(
        out.is_file(),
        "export succeeded but {} is missing",
        out.display()
    );
    r.stderr
}

/// `try_export_sources` that must fail with a single-line message on stderr
/// and leave no OUT (nor a temporary file beside it); returns that line.
pub fn export_sources_fails(root: Option<&Path>, out: &Path, extra_args: &[&str]) -> String {
    let r = try_export_sources(root, out, extra_args);
    assert!(
        !r.success,
        "export was expected to fail but succeeded: {}\n--- stderr ---\n{}",
        r.command, r.stderr
    );
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected a one-line error from {}, got:\n{}",
        r.command,
        r.stderr
    );
    assert!(
        fs::symlink_metadata(out).is_err(),
        "failed export left {} behind",
        out.display()
    );
    if let Some(dir) = out.parent() {
        let name = out.file_name().unwrap().to_string_lossy().into_owned();
        let leftovers: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != &name && n.contains(&name))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            leftovers.is_empty(),
            "failed export left temporary files: {leftovers:?}"
        );
    }
    lines[0].to_string()
}

/// Exports SRC to OUT, asserts success and that OUT exists; returns stderr.
pub fn export(src: &Path, out: &Path, extra_args: &[&str]) -> String {
    let r = try_export(src, out, extra_args);
    assert!(
        r.success,
        "export failed ({}): {}\n--- stderr ---\n{}",
        r.status, r.command, r.stderr
    );
    assert!(
        out.is_file(),
        "export reported success but {} is not a file: {}",
        out.display(),
        r.command
    );
    r.stderr
}

/// Runs an export that must fail; returns its stderr.
pub fn export_fails(src: &Path, out: &Path, extra_args: &[&str]) -> String {
    let r = try_export(src, out, extra_args);
    assert!(
        !r.success,
        "export was expected to fail but succeeded: {}\n--- stderr ---\n{}",
        r.command, r.stderr
    );
    r.stderr
}

/// `export SRC -o -`, reading the image from a pipe into DEST. Returns stderr.
pub fn export_to_stdout(src: &Path, dest: &Path, extra_args: &[&str]) -> String {
    // In mkfs mode the image is built into `_keep` and streamed by `cat`.
    let _keep;
    let mut cmd = match builder() {
        Builder::Btrfsimg => {
            let mut c = Command::new(btrfsimg_bin());
            c.arg("export").arg(src).arg("-o").arg("-").args(extra_args);
            c
        }
        Builder::Mkfs => {
            let dir = workdir("mkfs-stdout");
            let img = dir.path().join("image");
            export(src, &img, extra_args);
            let mut c = Command::new(tool("cat"));
            c.arg(&img);
            _keep = dir;
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(&cmd)));
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut s);
        s
    });
    let mut stdout_pipe = child.stdout.take().unwrap();
    let mut f = File::create(dest).expect("create stdout destination");
    let copied = io::copy(&mut stdout_pipe, &mut f);
    drop(stdout_pipe);
    let status = child.wait().expect("wait for exporter");
    let stderr = String::from_utf8_lossy(&stderr_thread.join().unwrap()).into_owned();
    let copied = copied.unwrap_or_else(|e| panic!("reading image from pipe failed: {e}"));
    assert!(
        status.success(),
        "stdout export failed ({status}): {}\n--- stderr ---\n{stderr}",
        describe(&cmd)
    );
    assert!(copied > 0, "stdout export produced no bytes");
    f.sync_all().unwrap();
    stderr
}

/// Parses SIZE with optional binary K/M/G/T suffix (as the CLI does).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], KIB),
        (i, 'm' | 'M') => (&s[..i], MIB),
        (i, 'g' | 'G') => (&s[..i], GIB),
        (i, 't' | 'T') => (&s[..i], GIB << 10),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Emulates `btrfsimg export` with mkfs.btrfs 6.2 (validation mode only):
/// temp file + rename, `--size` (fixed size, no shrink), `--extra-space`
/// (shrunk size + extra, second build), `-L`, `-U`, `--nodesize`,
/// `--metadata`; `--timestamp` is ignored.
fn mkfs_export(src: &Path, out: &Path, extra_args: &[&str]) -> ExportResult {
    let command = format!("[mkfs emulation] export {src:?} -o {out:?} {extra_args:?}");
    let fail = |msg: String| ExportResult {
        success: false,
        status: "mkfs emulation failed".into(),
        stderr: msg,
        command: command.clone(),
    };
    let mut mkfs_args: Vec<String> = Vec::new();
    let (mut size, mut extra) = (None, None);
    let mut it = extra_args.iter();
    while let Some(&a) = it.next() {
        let Some(&v) = it.next() else {
            return fail(format!("error: {a} needs a value"));
        };
        match a {
            "-L" | "--label" => mkfs_args.extend(["-L".into(), v.into()]),
            // mkfs.btrfs refuses a UUID the kernel has already seen (e.g.
            // from an earlier mount of the same test's image): drop it.
            "-U" | "--uuid" => {}
            "--nodesize" => mkfs_args.extend(["-n".into(), v.into()]),
            "--metadata" => mkfs_args.extend(["-m".into(), v.into()]),
            "--timestamp" => {}
            "--size" | "--extra-space" => {
                let Some(n) = parse_size(v) else {
                    return fail(format!("error: invalid size {v:?}"));
                };
                if a == "--size" {
                    size = Some(n)
                } else {
                    extra = Some(n)
                }
            }
            other => panic!("mkfs emulation: unsupported export argument {other:?}"),
        }
    }
    let name = out.file_name().expect("output file name").to_os_string();
    let mut tmp_name = OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(".mkfs-partial");
    let tmp = out.with_file_name(tmp_name);
    let build = |len: u64, shrink: bool| -> Result<(), String> {
        let _ = fs::remove_file(&tmp);
        let f = File::create(&tmp).map_err(|e| format!("error: create {tmp:?}: {e}"))?;
        f.set_len(len)
            .map_err(|e| format!("error: truncate: {e}"))?;
        drop(f);
        let mut cmd = Command::new(tool("mkfs.btrfs"));
        cmd.arg("-f").arg("--rootdir").arg(src).args(&mkfs_args);
        if shrink {
            cmd.arg("--shrink");
        }
        cmd.arg(&tmp);
        let o = run(&mut cmd);
        if o.status.success() {
            Ok(())
        } else {
            Err(format!("{} failed: {}", describe(&cmd), output_text(&o)))
        }
    };
    let res = match (size, extra) {
        // mkfs.btrfs silently extends a too small file: treat that as failure.
        (Some(s), _) => build(s, false).and_then(|_| {
            match fs::metadata(&tmp).map_err(|e| e.to_string())?.len() {
                len if len == s => Ok(()),
                len => Err(format!(
                    "error: content does not fit in {s} bytes (needs {len})"
                )),
            }
        }),
        (None, None) => build(2 * GIB, true),
        (None, Some(x)) => build(2 * GIB, true).and_then(|_| {
            let len = fs::metadata(&tmp).map_err(|e| e.to_string())?.len();
            build(len + x, false)
        }),
    };
    match res.and_then(|_| fs::rename(&tmp, out).map_err(|e| format!("error: rename: {e}"))) {
        Ok(()) => ExportResult {
            success: true,
            status: "exit status: 0".into(),
            stderr: String::new(),
            command,
        },
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            fail(e)
        }
    }
}

/// Builds an image of SRC with `mkfs.btrfs --rootdir --shrink` (whatever the
/// selected builder), for comparisons with btrfsimg.
pub fn mkfs_rootdir(src: &Path, out: &Path) {
    let r = mkfs_export(src, out, &[]);
    assert!(r.success, "{}: {}", r.command, r.stderr);
}

/// Export (with the selected builder), `btrfs check`, mount read-only and
/// compare entry by entry with the source (strict for btrfsimg).
pub fn export_and_verify(src: &Path, img: &Path, extra_args: &[&str]) {
    export(src, img, extra_args);
    btrfs_check(img);
    let m = LoopMount::new(img, false);
    compare_trees(src, m.path(), CompareOpts::for_builder());
    m.unmount();
}

/// For tests of what only btrfsimg promises: true (after a SKIPPED line) in
/// mkfs mode.
pub fn skip_in_mkfs_mode(what: &str) -> bool {
    if is_mkfs_mode() {
        eprintln!("SKIPPED {what}: checks btrfsimg-specific fidelity ({BUILDER_ENV}=mkfs)");
        return true;
    }
    false
}

// ---------------------------------------------------------------------------
// dump-tree
// ---------------------------------------------------------------------------

/// One leaf item as printed by `btrfs inspect-internal dump-tree`.
#[derive(Clone, Debug)]
pub struct DumpItem {
    /// Key objectid as printed (a number, or a name like `EXTENT_TREE`).
    pub objectid: String,
    /// Key type name, e.g. `INODE_EXTREF`.
    pub ty: String,
    /// Key offset as printed.
    pub offset: String,
    pub itemsize: u64,
    /// The item's body lines, trimmed.
    pub body: Vec<String>,
}

impl DumpItem {
    /// The objectid as a number (inode number in fs trees).
    pub fn ino(&self) -> Option<u64> {
        self.objectid.parse().ok()
    }

    pub fn offset_u64(&self) -> u64 {
        self.offset
            .parse()
            .unwrap_or_else(|_| panic!("key offset {:?} is not a number", self.offset))
    }

    /// The number after `word` in the body (e.g. `field("transid")`).
    pub fn field(&self, word: &str) -> Option<u64> {
        self.fields(word).into_iter().next()
    }

    /// Every number that follows `word` in the body, in order.
    pub fn fields(&self, word: &str) -> Vec<u64> {
        let mut out = Vec::new();
        for line in &self.body {
            let toks: Vec<&str> = line.split_whitespace().collect();
            for w in toks.windows(2) {
                if w[0] == word {
                    if let Ok(v) = w[1].parse() {
                        out.push(v);
                    }
                }
            }
        }
        out
    }
}

/// Every leaf item of one tree (`-t fs`, `-t extent`, ...) of an image.
pub fn dump_tree(img: &Path, tree: &str) -> Vec<DumpItem> {
    let mut cmd = Command::new(tool("btrfs"));
    cmd.args(["inspect-internal", "dump-tree", "-t", tree])
        .arg(img);
    let o = run(&mut cmd);
    assert!(
        o.status.success(),
        "{} failed: {}",
        describe(&cmd),
        output_text(&o)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let mut items: Vec<DumpItem> = Vec::new();
    let mut in_item = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("\titem ") {
            let key = rest
                .split_once(" key (")
                .and_then(|(_, k)| k.split_once(") "))
                .unwrap_or_else(|| panic!("unexpected dump-tree line: {line}"));
            let parts: Vec<&str> = key.0.split(' ').collect();
            assert_eq!(parts.len(), 3, "unexpected key in: {line}");
            let toks: Vec<&str> = key.1.split_whitespace().collect();
            let itemsize = toks
                .windows(2)
                .find(|w| w[0] == "itemsize")
                .and_then(|w| w[1].parse().ok())
                .unwrap_or(0);
            items.push(DumpItem {
                objectid: parts[0].to_string(),
                ty: parts[1].to_string(),
                offset: parts[2].to_string(),
                itemsize,
                body: Vec::new(),
            });
            in_item = true;
        } else if line.starts_with("\t\t") && in_item {
            items.last_mut().unwrap().body.push(line.trim().to_string());
        } else {
            in_item = false;
        }
    }
    items
}

/// The generation in the image's primary superblock.
pub fn super_generation(img: &Path) -> u64 {
    let text = run_ok(
        Command::new(tool("btrfs"))
            .args(["inspect-internal", "dump-super"])
            .arg(img),
    );
    text.lines()
        .find_map(|l| {
            let mut t = l.split_whitespace();
            (t.next() == Some("generation")).then(|| t.next()?.parse().ok())?
        })
        .expect("no generation in dump-super output")
}

/// Bytes of the DATA block groups in use (`btrfs filesystem df -b`).
pub fn data_used(mnt: &Path) -> u64 {
    let text = run_ok(
        Command::new(tool("btrfs"))
            .args(["filesystem", "df", "-b"])
            .arg(mnt),
    );
    text.lines()
        .find(|l| l.starts_with("Data,"))
        .and_then(|l| l.split("used=").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Data line in `btrfs filesystem df`: {text}"))
}

/// Data ranges of a file (SEEK_DATA/SEEK_HOLE), rounded out to 4 KiB sectors
/// and merged: the extents a no-holes btrfs should hold for it.
pub fn sector_data_ranges(p: &Path) -> Vec<(u64, u64)> {
    let f = open_noatime(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let len = f.metadata().unwrap().len();
    let segs = data_segments(&f, len)
        .into_iter()
        .map(|(a, b)| (a / 4096 * 4096, b.div_ceil(4096) * 4096))
        .collect();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in merge_segments(segs) {
        match out.last_mut() {
            Some(l) if l.1 >= a => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// btrfs check / scrub
// ---------------------------------------------------------------------------

fn suspicious_check_line(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    if l.contains("no error found") || l.contains("no errors found") {
        return false;
    }
    [
        "error",
        "mismatch",
        "missing",
        "corrupt",
        "invalid",
        "unresolved",
    ]
    .iter()
    .any(|w| l.contains(w))
}

/// `btrfs check --readonly --check-data-csum IMG` must exit 0 and print no
/// error/mismatch/missing lines.
pub fn btrfs_check(img: &Path) {
    let mut cmd = Command::new(tool("btrfs"));
    cmd.args(["check", "--readonly", "--check-data-csum"])
        .arg(img);
    let o = run(&mut cmd);
    let text = output_text(&o);
    let bad: Vec<&str> = text.lines().filter(|l| suspicious_check_line(l)).collect();
    // mkfs.btrfs 6.2 stores 4095-byte symlink targets in a way its own
    // `btrfs check` rejects (kernel-created ones pass): tolerated in mkfs
    // mode only, and only when that is the sole complaint.
    let mkfs_symlink_bug = |l: &&str| {
        l.contains("inline file extent too large")
            || l.contains("error(s) found")
            || l.contains("errors found in fs roots")
    };
    if is_mkfs_mode()
        && bad
            .iter()
            .any(|l| l.contains("inline file extent too large"))
        && bad.iter().all(mkfs_symlink_bug)
    {
        eprintln!(
            "TOLERATED (mkfs mode, mkfs.btrfs 6.2 bug) btrfs check on {}:\n{}",
            img.display(),
            bad.join("\n")
        );
        return;
    }
    assert!(
        o.status.success() && bad.is_empty(),
        "btrfs check failed for {} ({}); suspicious lines:\n{}\n--- full output ---\n{text}",
        img.display(),
        o.status,
        bad.join("\n")
    );
}

/// `btrfs inspect-internal dump-super IMG` (primary superblock), as text.
pub fn dump_super(img: &Path) -> String {
    let mut cmd = Command::new(tool("btrfs"));
    cmd.args(["inspect-internal", "dump-super"]).arg(img);
    run_ok(&mut cmd)
}

/// The value of one `dump-super` field (e.g. "label", "fsid"), if present.
pub fn super_field(dump: &str, field: &str) -> Option<String> {
    dump.lines().find_map(|l| {
        let (k, v) = l.split_once(char::is_whitespace)?;
        (k == field).then(|| v.trim().to_string())
    })
}

/// `btrfs scrub start -B MNT` must succeed and report no errors.
pub fn btrfs_scrub(mnt: &Path) {
    let mut cmd = Command::new(tool("btrfs"));
    cmd.args(["scrub", "start", "-B"]).arg(mnt);
    let o = run(&mut cmd);
    let text = output_text(&o);
    let summary_ok = text
        .lines()
        .any(|l| l.contains("Error summary") && l.contains("no errors found"));
    assert!(
        o.status.success() && summary_ok,
        "btrfs scrub reported problems on {} ({}):\n{text}",
        mnt.display(),
        o.status
    );
}

// ---------------------------------------------------------------------------
// Kernel log
// ---------------------------------------------------------------------------

static MARKER_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes a unique marker line into the kernel log and returns it.
pub fn kernel_log_marker() -> String {
    let marker = format!(
        "btrfsimg-test-marker-{}-{}-{}",
        std::process::id(),
        MARKER_SEQ.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    if let Ok(mut f) = OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(marker.as_bytes());
    }
    marker
}

/// Kernel log lines after `marker` (or a note if the log is unreadable).
pub fn kernel_log_since(marker: &str) -> String {
    let o = match Command::new(tool("dmesg")).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => return format!("(dmesg failed: {})", output_text(&o).trim()),
        Err(e) => return format!("(dmesg unavailable: {e})"),
    };
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    match lines.iter().rposition(|l| l.contains(marker)) {
        Some(i) => lines[i + 1..].join("\n"),
        None => "(marker not found in kernel log)".into(),
    }
}

// ---------------------------------------------------------------------------
// Loop mounts
// ---------------------------------------------------------------------------

/// A loop mount of an image on a private temp directory; unmounted on drop.
pub struct LoopMount {
    dir: Option<TempDir>,
    path: PathBuf,
    image: PathBuf,
    device: Option<String>,
    marker: String,
    mounted: bool,
}

impl LoopMount {
    /// `mount -o loop[,ro] -t btrfs IMG <tempdir>`; panics (with the kernel
    /// log) if the mount fails.
    pub fn new(img: &Path, rw: bool) -> LoopMount {
        let dir = tempfile::Builder::new()
            .prefix("btrfsimg-mnt-")
            .tempdir()
            .expect("create mount point");
        let path = fs::canonicalize(dir.path()).unwrap();
        let marker = kernel_log_marker();
        let mut cmd = Command::new(tool("mount"));
        cmd.args(["-t", "btrfs", "-o", if rw { "loop" } else { "loop,ro" }])
            .arg(img)
            .arg(&path);
        let o = run(&mut cmd);
        if !o.status.success() {
            panic!(
                "mount failed ({}): {}\n--- output ---\n{}\n--- kernel log ---\n{}",
                o.status,
                describe(&cmd),
                output_text(&o),
                kernel_log_since(&marker)
            );
        }
        let device = mount_source(&path);
        LoopMount {
            dir: Some(dir),
            path,
            image: img.to_path_buf(),
            device,
            marker,
            mounted: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The loop device backing the mount (e.g. "/dev/loop3"), if known.
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Unmounts now, panicking if that fails or if the kernel logged btrfs
    /// errors for this mount's device.
    pub fn unmount(mut self) {
        let res = self.try_unmount();
        self.mounted = res.is_err();
        if let Err(e) = res {
            panic!("unmounting {} failed: {e}", self.path.display());
        }
        let errors = self.kernel_errors();
        assert!(
            errors.is_empty(),
            "kernel logged btrfs problems while {} was mounted:\n{}",
            self.image.display(),
            errors.join("\n")
        );
    }

    /// Kernel log lines since the mount that mention this mount's device and
    /// look like errors. Warnings are printed to stderr but not returned.
    pub fn kernel_errors(&self) -> Vec<String> {
        let Some(dev) = self.device.as_deref() else {
            return Vec::new();
        };
        let name = dev.trim_start_matches("/dev/");
        let (tag1, tag2) = (format!("(device {name})"), format!("(device {name} "));
        let log = kernel_log_since(&self.marker);
        let mut errors = Vec::new();
        for line in log.lines() {
            if !(line.contains(&tag1) || line.contains(&tag2)) {
                continue;
            }
            let l = line.to_ascii_lowercase();
            if [
                "error",
                "critical",
                "corrupt",
                "csum failed",
                "bad tree block",
            ]
            .iter()
            .any(|w| l.contains(w))
            {
                errors.push(line.to_string());
            } else if l.contains("warning") {
                eprintln!("kernel warning for {}: {line}", self.image.display());
            }
        }
        errors
    }

    fn try_unmount(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        unmount_retrying(&self.path)
    }
}

/// `umount PATH`, retried for a few seconds; falls back to `umount -l` (and
/// then still reports an error).
fn unmount_retrying(path: &Path) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..10 {
        let o = Command::new(tool("umount")).arg(path).output();
        match o {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => last = output_text(&o),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
    }
    match Command::new(tool("umount")).arg("-l").arg(path).output() {
        Ok(o) if o.status.success() => Err(format!(
            "plain umount kept failing ({}); lazily unmounted instead",
            last.trim()
        )),
        Ok(o) => Err(format!("umount -l failed too: {}", output_text(&o))),
        Err(e) => Err(format!("umount -l failed too: {e}")),
    }
}

/// A scratch filesystem mounted on a private temp directory (unmounted on
/// drop), used as a source where the test filesystem could differ from what
/// a test needs. `tmpfs`: xattr values up to what a btrfs leaf item allows
/// (ext4 keeps all of an inode's xattrs in one 4 KiB block), the full 64-bit
/// time range, 200,000 files created quickly. `ext4`: a loop-mounted ext4
/// whatever /tmp is, for ext4's own block accounting.
pub struct ScratchFs {
    dir: Option<TempDir>,
    path: PathBuf,
    mounted: bool,
}

impl ScratchFs {
    /// `mount -t tmpfs -o size=SIZE tmpfs <tempdir>`.
    pub fn tmpfs(tag: &str, size: u64) -> ScratchFs {
        let dir = workdir(&format!("tmpfs-{tag}"));
        let path = fs::canonicalize(dir.path()).unwrap();
        run_ok(
            Command::new(tool("mount"))
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0755"))
                .arg("tmpfs")
                .arg(&path),
        );
        ScratchFs {
            dir: Some(dir),
            path,
            mounted: true,
        }
    }

    /// A fresh ext4 (4 KiB blocks) of SIZE bytes in a sparse file, loop-mounted.
    pub fn ext4(tag: &str, size: u64) -> ScratchFs {
        let dir = workdir(&format!("ext4-{tag}"));
        let img = dir.path().join("ext4.img");
        File::create(&img).unwrap().set_len(size).unwrap();
        run_ok(
            Command::new(tool("mkfs.ext4"))
                .args(["-q", "-F", "-b", "4096"])
                .arg(&img),
        );
        let path = fs::canonicalize(dir.path()).unwrap().join("mnt");
        fs::create_dir(&path).unwrap();
        run_ok(
            Command::new(tool("mount"))
                .args(["-t", "ext4", "-o", "loop"])
                .arg(&img)
                .arg(&path),
        );
        ScratchFs {
            dir: Some(dir),
            path,
            mounted: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if let Err(e) = unmount_retrying(&self.path) {
            eprintln!("warning: scratch fs {}: {e}", self.path.display());
            if mount_source(&self.path).is_some() {
                if let Some(d) = self.dir.take() {
                    let _ = d.keep();
                }
            }
        }
        self.mounted = false;
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if let Err(e) = self.try_unmount() {
            eprintln!("warning: {}: {e}", self.path.display());
            if mount_source(&self.path).is_some() {
                // Still mounted: never let TempDir recurse into it.
                if let Some(d) = self.dir.take() {
                    let _ = d.keep();
                }
            }
        }
        self.mounted = false;
    }
}

/// Mount source (device) of the mount at exactly `mnt`, from mountinfo.
fn mount_source(mnt: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_str()?;
    let mut found = None;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if pre.split(' ').nth(4) == Some(want) {
            found = post.split(' ').nth(1).map(str::to_string);
        }
    }
    found
}

// ---------------------------------------------------------------------------
// Files: content comparison, xattrs, small helpers
// ---------------------------------------------------------------------------

/// Opens for reading without updating atime when allowed.
pub fn open_noatime(p: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(p)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(p),
        r => r,
    }
}

/// Data ranges (SEEK_DATA/SEEK_HOLE) of a file, clipped to `len`. Falls back
/// to the whole file if the filesystem cannot tell.
pub fn data_segments(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let len_i = len as i64;
    let whole = if len == 0 { vec![] } else { vec![(0, len)] };
    let mut segs = Vec::new();
    let mut pos: i64 = 0;
    while pos < len_i {
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return whole;
        }
        if d >= len_i {
            break;
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h <= d {
            return whole;
        }
        let h = h.min(len_i);
        segs.push((d as u64, h as u64));
        pos = h;
    }
    segs
}

fn merge_segments(mut segs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    segs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in segs {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Compares two files' contents chunk by chunk, reading only the union of
/// their data ranges (holes in both are equal by definition). Returns a
/// description of the first difference.
pub fn compare_file_contents(a: &Path, b: &Path) -> Result<(), String> {
    let fa = open_noatime(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let fb = open_noatime(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let (la, lb) = (
        fa.metadata().map_err(|e| e.to_string())?.len(),
        fb.metadata().map_err(|e| e.to_string())?.len(),
    );
    if la != lb {
        return Err(format!("length {la} vs {lb}"));
    }
    let mut segs = data_segments(&fa, la);
    segs.extend(data_segments(&fb, lb));
    let segs = merge_segments(segs);
    // Buffers only as large as needed: most files are small or empty.
    let buf = segs
        .iter()
        .map(|(s, e)| (e - s) as usize)
        .max()
        .unwrap_or(0)
        .min(CHUNK);
    let (mut ba, mut bb) = (vec![0u8; buf], vec![0u8; buf]);
    for (start, end) in segs {
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK as u64) as usize;
            fa.read_exact_at(&mut ba[..n], off)
                .map_err(|e| format!("read {} at {off}: {e}", a.display()))?;
            fb.read_exact_at(&mut bb[..n], off)
                .map_err(|e| format!("read {} at {off}: {e}", b.display()))?;
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
                return Err(format!(
                    "content differs at byte offset {} ({:#04x} vs {:#04x})",
                    off + i as u64,
                    ba[i],
                    bb[i]
                ));
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Asserts two (image) files are byte-identical; reports the length and the
/// first few differing 4 KiB blocks plus their total count.
pub fn assert_files_identical(a: &Path, b: &Path) {
    let fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let mut segs = data_segments(&fa, la.min(lb));
    segs.extend(data_segments(&fb, la.min(lb)));
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut bad_blocks: Vec<u64> = Vec::new();
    for (start, end) in merge_segments(segs) {
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK as u64) as usize;
            fa.read_exact_at(&mut ba[..n], off).unwrap();
            fb.read_exact_at(&mut bb[..n], off).unwrap();
            if ba[..n] != bb[..n] {
                for i in (0..n).step_by(4096) {
                    let j = (i + 4096).min(n);
                    if ba[i..j] != bb[i..j] {
                        let blk = (off + i as u64) / 4096 * 4096;
                        if bad_blocks.last() != Some(&blk) {
                            bad_blocks.push(blk);
                        }
                    }
                }
            }
            off += n as u64;
        }
    }
    assert!(
        la == lb && bad_blocks.is_empty(),
        "{} and {} differ: lengths {la} vs {lb}; {} differing 4 KiB blocks, first at offsets {:?}",
        a.display(),
        b.display(),
        bad_blocks.len(),
        &bad_blocks[..bad_blocks.len().min(10)]
    );
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path contains NUL")
}

/// Every entry under `root` (including `root`) with its lstat metadata, as
/// (relative path shown with `show`, metadata), in a stable order.
pub fn metadata_under(root: &Path) -> Vec<(String, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let p = join_rel(root, &rel);
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        if m.is_dir() {
            for name in dir_names(&p).into_iter().rev() {
                stack.push(child_rel(&rel, &name));
            }
        }
        out.push((show(&rel), m));
    }
    out
}

/// Entries under `root` (including `root`) not owned by UID:GID.
pub fn entries_not_owned_by(root: &Path, uid: u32, gid: u32) -> Vec<String> {
    metadata_under(root)
        .into_iter()
        .filter(|(_, m)| (m.uid(), m.gid()) != (uid, gid))
        .map(|(rel, m)| format!("{rel} ({}:{})", m.uid(), m.gid()))
        .collect()
}

/// Decompresses SRC to DST with the `zstd` command-line tool (what image
/// consumers use), asserting success.
pub fn zstd_decompress(src: &Path, dst: &Path) {
    let mut cmd = Command::new(tool("zstd"));
    cmd.args(["-d", "-q", "-f"]).arg(src).arg("-o").arg(dst);
    run_ok(&mut cmd);
}

/// All extended attributes of a path (not following symlinks), name → value.
pub fn list_xattrs(p: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = cpath(p);
    let mut names = vec![0u8; 1024];
    let n = loop {
        let r = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(BTreeMap::new()),
            _ => return Err(e),
        }
    };
    let mut map = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut val = vec![0u8; 256];
        let len = loop {
            let r = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    val.as_mut_ptr().cast(),
                    val.len(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                val.resize(val.len() * 4, 0);
            } else {
                return Err(e);
            }
        };
        val.truncate(len);
        map.insert(name.to_vec(), val);
    }
    Ok(map)
}

pub fn set_xattr(p: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).expect("xattr name has NUL"));
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets atime and mtime (seconds, nanoseconds) without following symlinks.
pub fn set_times(p: &Path, sec: i64, nsec: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    };
    let times = [ts, ts];
    let c = cpath(p);
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Free bytes available to unprivileged users (statvfs f_bavail * f_frsize).
pub fn statvfs_avail(p: &Path) -> u64 {
    let c = cpath(p);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(
        r,
        0,
        "statvfs {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Names in a directory, sorted by bytes.
pub fn dir_names(p: &Path) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display()))
        .map(|e| e.unwrap().file_name().into_vec())
        .collect();
    v.sort();
    v
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Writes `size` deterministic pseudo-random bytes to a new file, streaming.
pub fn write_random_file(p: &Path, size: u64, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// Escaped, printable form of a relative path ("/" for the root).
pub fn show(rel: &[u8]) -> String {
    let mut s = String::from("/");
    for &b in rel {
        match b {
            b'\n' => s.push_str("\\n"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

fn join_rel(base: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(OsStr::from_bytes(rel))
    }
}

fn child_rel(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut r = parent.to_vec();
    if !r.is_empty() {
        r.push(b'/');
    }
    r.extend_from_slice(name);
    r
}

// ---------------------------------------------------------------------------
// Tree comparison
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
pub struct CompareOpts {
    /// Compare mtime seconds.
    pub mtime: bool,
    /// Also compare mtime nanoseconds.
    pub mtime_ns: bool,
    /// Compare the root directory's mtime.
    pub root_mtime: bool,
    /// Compare st_rdev of device nodes.
    pub rdev: bool,
    /// Compare extended attributes.
    pub xattrs: bool,
    /// Compare regular files' holes: their data ranges (SEEK_DATA /
    /// SEEK_HOLE, rounded out to 4 KiB sectors) must be the same.
    pub holes: bool,
    /// How many differences the panic message lists.
    pub max_reported: usize,
}

impl Default for CompareOpts {
    fn default() -> Self {
        CompareOpts {
            mtime: true,
            mtime_ns: true,
            root_mtime: true,
            rdev: true,
            xattrs: true,
            holes: true,
            max_reported: 50,
        }
    }
}

impl CompareOpts {
    /// Strict for btrfsimg; relaxed only where mkfs.btrfs 6.2 is known to
    /// lose information (nanoseconds, root dir times, rdev, holes).
    pub fn for_builder() -> Self {
        let mut o = CompareOpts::default();
        if is_mkfs_mode() {
            o.mtime_ns = false;
            o.root_mtime = false;
            o.rdev = false;
            o.holes = false;
        }
        o
    }
}

fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFCHR => "chardev",
        libc::S_IFBLK => "blockdev",
        libc::S_IFSOCK => "socket",
        _ => "unknown",
    }
}

struct LinkInfo {
    rel: Vec<u8>,
    src: (u64, u64),
    mnt: (u64, u64),
    mnt_nlink: u64,
}

/// All differences between the tree at `src` and the tree at `mnt`
/// (including the root directory itself), as "path: what" lines.
pub fn tree_differences(src: &Path, mnt: &Path, opts: CompareOpts) -> Vec<String> {
    let mut diffs: Vec<String> = Vec::new();
    let mut links: Vec<LinkInfo> = Vec::new();
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let (sp, mp) = (join_rel(src, &rel), join_rel(mnt, &rel));
        let mut d = |what: String| diffs.push(format!("{}: {what}", show(&rel)));
        let s = match fs::symlink_metadata(&sp) {
            Ok(m) => m,
            Err(e) => {
                d(format!("cannot stat source: {e}"));
                continue;
            }
        };
        let m = match fs::symlink_metadata(&mp) {
            Ok(m) => m,
            Err(e) => {
                d(format!("cannot stat in image: {e}"));
                continue;
            }
        };
        let (st, mt) = (s.mode() & libc::S_IFMT, m.mode() & libc::S_IFMT);
        if st != mt {
            d(format!(
                "type {} in source, {} in image",
                type_name(st),
                type_name(mt)
            ));
            continue;
        }
        if s.mode() != m.mode() {
            d(format!("mode {:o} vs {:o}", s.mode(), m.mode()));
        }
        if (s.uid(), s.gid()) != (m.uid(), m.gid()) {
            d(format!(
                "owner {}:{} vs {}:{}",
                s.uid(),
                s.gid(),
                m.uid(),
                m.gid()
            ));
        }
        if opts.mtime && (!rel.is_empty() || opts.root_mtime) {
            let ns = |x: i64| if opts.mtime_ns { x } else { 0 };
            if s.mtime() != m.mtime() || ns(s.mtime_nsec()) != ns(m.mtime_nsec()) {
                d(format!(
                    "mtime {}.{:09} vs {}.{:09}",
                    s.mtime(),
                    s.mtime_nsec(),
                    m.mtime(),
                    m.mtime_nsec()
                ));
            }
        }
        if opts.xattrs {
            match (list_xattrs(&sp), list_xattrs(&mp)) {
                (Ok(a), Ok(b)) if a != b => {
                    d(format!("xattrs differ: {}", describe_map_diff(&a, &b)))
                }
                (Ok(_), Ok(_)) => {}
                (ra, rb) => d(format!(
                    "cannot list xattrs: {:?} / {:?}",
                    ra.err(),
                    rb.err()
                )),
            }
        }
        if st != libc::S_IFDIR {
            links.push(LinkInfo {
                rel: rel.clone(),
                src: (s.dev(), s.ino()),
                mnt: (m.dev(), m.ino()),
                mnt_nlink: m.nlink(),
            });
        }
        match st {
            libc::S_IFREG => {
                if s.len() != m.len() {
                    d(format!("size {} vs {}", s.len(), m.len()));
                } else if let Err(e) = compare_file_contents(&sp, &mp) {
                    d(e);
                } else if opts.holes && s.len() > 0 {
                    let (a, b) = (sector_data_ranges(&sp), sector_data_ranges(&mp));
                    if a != b {
                        d(format!("data ranges {a:?} vs {b:?}"));
                    }
                }
            }
            libc::S_IFLNK => {
                if s.len() != m.len() {
                    d(format!("symlink size {} vs {}", s.len(), m.len()));
                }
                match (fs::read_link(&sp), fs::read_link(&mp)) {
                    (Ok(a), Ok(b)) if a != b => d(format!(
                        "symlink target {} vs {}",
                        show(a.as_os_str().as_bytes()),
                        show(b.as_os_str().as_bytes())
                    )),
                    (Ok(_), Ok(_)) => {}
                    (ra, rb) => d(format!("readlink: {:?} / {:?}", ra.err(), rb.err())),
                }
            }
            libc::S_IFCHR | libc::S_IFBLK if opts.rdev && s.rdev() != m.rdev() => {
                d(format!(
                    "rdev {}:{} vs {}:{}",
                    libc::major(s.rdev()),
                    libc::minor(s.rdev()),
                    libc::major(m.rdev()),
                    libc::minor(m.rdev())
                ));
            }
            libc::S_IFDIR => {
                let (sn, mn) = match (fs::read_dir(&sp), fs::read_dir(&mp)) {
                    (Ok(a), Ok(b)) => {
                        let names = |rd: fs::ReadDir| -> Vec<Vec<u8>> {
                            let mut v: Vec<Vec<u8>> = rd
                                .filter_map(|e| e.ok())
                                .map(|e| e.file_name().into_vec())
                                .collect();
                            v.sort();
                            v
                        };
                        (names(a), names(b))
                    }
                    (ra, rb) => {
                        d(format!("read_dir: {:?} / {:?}", ra.err(), rb.err()));
                        continue;
                    }
                };
                let (mut i, mut j) = (0, 0);
                let mut common = Vec::new();
                while i < sn.len() || j < mn.len() {
                    let ord = match (sn.get(i), mn.get(j)) {
                        (Some(a), Some(b)) => a.cmp(b),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        _ => std::cmp::Ordering::Greater,
                    };
                    match ord {
                        std::cmp::Ordering::Equal => {
                            common.push(sn[i].clone());
                            i += 1;
                            j += 1;
                        }
                        std::cmp::Ordering::Less => {
                            let r = child_rel(&rel, &sn[i]);
                            diffs.push(format!("{}: missing in image", show(&r)));
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            let r = child_rel(&rel, &mn[j]);
                            diffs.push(format!("{}: unexpected entry in image", show(&r)));
                            j += 1;
                        }
                    }
                }
                for name in common.iter().rev() {
                    stack.push(child_rel(&rel, name));
                }
            }
            _ => {}
        }
    }
    // Hard-link groups: each entry's group leader (first path visited with
    // the same inode) must be the same path on both sides, and the image's
    // link count must equal the group size.
    let mut src_groups: HashMap<(u64, u64), (usize, u64)> = HashMap::new();
    let mut mnt_groups: HashMap<(u64, u64), (usize, u64)> = HashMap::new();
    for (i, l) in links.iter().enumerate() {
        src_groups.entry(l.src).or_insert((i, 0)).1 += 1;
        mnt_groups.entry(l.mnt).or_insert((i, 0)).1 += 1;
    }
    for l in &links {
        let (sl, sc) = src_groups[&l.src];
        let (ml, mc) = mnt_groups[&l.mnt];
        if sl != ml {
            diffs.push(format!(
                "{}: hard-link group differs: in source same inode as {}, in image same inode as {}",
                show(&l.rel),
                show(&links[sl].rel),
                show(&links[ml].rel)
            ));
        }
        if sc != mc || l.mnt_nlink != sc {
            diffs.push(format!(
                "{}: link count: {sc} links in source tree, {mc} in image tree, image nlink {}",
                show(&l.rel),
                l.mnt_nlink
            ));
        }
    }
    diffs
}

fn describe_map_diff(a: &BTreeMap<Vec<u8>, Vec<u8>>, b: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let mut parts = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => parts.push(format!("{} missing in image", show(k))),
            Some(w) if w != v => parts.push(format!(
                "{} value differs ({} vs {} bytes)",
                show(k),
                v.len(),
                w.len()
            )),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        parts.push(format!("{} unexpected in image", show(k)));
    }
    parts.join(", ")
}

/// Asserts the trees are equal; the panic lists up to `opts.max_reported`
/// differences with their relative paths.
pub fn compare_trees(src: &Path, mnt: &Path, opts: CompareOpts) {
    let diffs = tree_differences(src, mnt, opts);
    if !diffs.is_empty() {
        let shown = diffs.len().min(opts.max_reported);
        panic!(
            "{} differences between {} and {} (showing {shown}):\n  {}",
            diffs.len(),
            src.display(),
            mnt.display(),
            diffs[..shown].join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------
// Source tree builder
// ---------------------------------------------------------------------------

/// Creates entries under a root directory. Names are raw bytes. Modes,
/// owners and times are recorded and applied by `finalize()` (owners, then
/// modes with directories last and deepest first, then times deepest first),
/// so setuid bits survive chown and directory times survive later creations.
/// Every created entry gets a deterministic default mode (0644 / 0755) and a
/// deterministic, path-derived mtime with nanoseconds unless overridden.
pub struct TreeBuilder {
    root: PathBuf,
    modes: BTreeMap<Vec<u8>, u32>,
    owners: BTreeMap<Vec<u8>, (u32, u32)>,
    times: BTreeMap<Vec<u8>, (i64, u32)>,
    dirs: std::collections::BTreeSet<Vec<u8>>,
}

/// Deterministic default mtime for a relative path.
pub fn default_time(rel: &[u8]) -> (i64, u32) {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in rel {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    (
        1_500_000_000 + (h % 200_000_000) as i64,
        ((h >> 32) % 1_000_000_000) as u32,
    )
}

/// Deterministic seed for a relative path's content.
pub fn seed_for(rel: &[u8]) -> u64 {
    default_time(rel).0 as u64 ^ ((default_time(rel).1 as u64) << 32)
}

impl TreeBuilder {
    /// Creates `root` (must not exist yet, its parent must).
    pub fn new(root: &Path) -> TreeBuilder {
        fs::create_dir(root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        let mut t = TreeBuilder {
            root: root.to_path_buf(),
            modes: BTreeMap::new(),
            owners: BTreeMap::new(),
            times: BTreeMap::new(),
            dirs: Default::default(),
        };
        t.record(b"", 0o755, true);
        t
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &[u8]) -> PathBuf {
        join_rel(&self.root, rel)
    }

    fn record(&mut self, rel: &[u8], mode: u32, is_dir: bool) {
        self.modes.insert(rel.to_vec(), mode);
        self.times.insert(rel.to_vec(), default_time(rel));
        if is_dir {
            self.dirs.insert(rel.to_vec());
        }
    }

    fn ensure_parents(&mut self, rel: &[u8]) {
        let mut end = 0;
        while let Some(i) = rel[end..].iter().position(|&b| b == b'/') {
            let prefix = &rel[..end + i];
            end += i + 1;
            if prefix.is_empty() {
                continue;
            }
            let p = self.path(prefix);
            if fs::symlink_metadata(&p).is_err() {
                fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.record(prefix, 0o755, true);
            }
        }
    }

    /// Directory (parents created as needed; existing is fine).
    pub fn dir(&mut self, rel: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let p = self.path(rel);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            self.record(rel, 0o755, true);
        }
        self
    }

    /// Regular file with the given bytes.
    pub fn file(&mut self, rel: &[u8], content: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let p = self.path(rel);
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self.record(rel, 0o644, false);
        self
    }

    /// Regular file of `size` deterministic pseudo-random bytes.
    pub fn random_file(&mut self, rel: &[u8], size: u64, seed: u64) -> &mut Self {
        self.ensure_parents(rel);
        write_random_file(&self.path(rel), size, seed);
        self.record(rel, 0o644, false);
        self
    }

    /// Sparse file of length `size` with data only at the given offsets.
    pub fn sparse_file(&mut self, rel: &[u8], size: u64, chunks: &[(u64, &[u8])]) -> &mut Self {
        self.ensure_parents(rel);
        let p = self.path(rel);
        let f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        for (off, data) in chunks {
            f.write_all_at(data, *off).unwrap();
        }
        f.set_len(size).unwrap();
        self.record(rel, 0o644, false);
        self
    }

    pub fn symlink(&mut self, rel: &[u8], target: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let p = self.path(rel);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &p)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self.times.insert(rel.to_vec(), default_time(rel));
        self
    }

    /// New name `rel` for the existing entry `existing` (shares its inode,
    /// mode, owner and times; nothing new is recorded).
    pub fn hardlink(&mut self, existing: &[u8], rel: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let (a, b) = (self.path(existing), self.path(rel));
        fs::hard_link(&a, &b).unwrap_or_else(|e| panic!("link {}: {e}", b.display()));
        self
    }

    pub fn fifo(&mut self, rel: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let c = cpath(&self.path(rel));
        let r = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
        assert_eq!(r, 0, "mkfifo {}: {}", show(rel), io::Error::last_os_error());
        self.record(rel, 0o644, false);
        self
    }

    fn mknod(&mut self, rel: &[u8], kind: u32, major: u32, minor: u32) -> &mut Self {
        self.ensure_parents(rel);
        let c = cpath(&self.path(rel));
        let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(major, minor)) };
        assert_eq!(r, 0, "mknod {}: {}", show(rel), io::Error::last_os_error());
        self.record(rel, 0o600, false);
        self
    }

    /// Unix socket inode (mknod S_IFSOCK: the same inode a bound socket leaves).
    pub fn socket(&mut self, rel: &[u8]) -> &mut Self {
        self.ensure_parents(rel);
        let c = cpath(&self.path(rel));
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFSOCK | 0o755, 0) };
        assert_eq!(
            r,
            0,
            "mknod socket {}: {}",
            show(rel),
            io::Error::last_os_error()
        );
        self.record(rel, 0o755, false);
        self
    }

    pub fn char_dev(&mut self, rel: &[u8], major: u32, minor: u32) -> &mut Self {
        self.mknod(rel, libc::S_IFCHR, major, minor)
    }

    pub fn block_dev(&mut self, rel: &[u8], major: u32, minor: u32) -> &mut Self {
        self.mknod(rel, libc::S_IFBLK, major, minor)
    }

    /// Permission bits (incl. setuid/setgid/sticky), applied by finalize().
    /// Not for symlinks.
    pub fn chmod(&mut self, rel: &[u8], mode: u32) -> &mut Self {
        assert!(
            !fs::symlink_metadata(self.path(rel)).unwrap().is_symlink(),
            "chmod on symlink {}",
            show(rel)
        );
        self.modes.insert(rel.to_vec(), mode & 0o7777);
        self
    }

    /// Owner (lchown), applied by finalize() before modes.
    pub fn chown(&mut self, rel: &[u8], uid: u32, gid: u32) -> &mut Self {
        self.owners.insert(rel.to_vec(), (uid, gid));
        self
    }

    /// mtime (and atime) with nanoseconds, applied by finalize_times().
    pub fn mtime(&mut self, rel: &[u8], sec: i64, nsec: u32) -> &mut Self {
        assert!(nsec < 1_000_000_000);
        self.times.insert(rel.to_vec(), (sec, nsec));
        self
    }

    /// Extended attribute (lsetxattr), set immediately.
    pub fn xattr(&mut self, rel: &[u8], name: &[u8], value: &[u8]) -> &mut Self {
        set_xattr(&self.path(rel), name, value)
            .unwrap_or_else(|e| panic!("setxattr {} {}: {e}", show(rel), show(name)));
        self
    }

    /// Removes an entry (recursively) and forgets everything recorded for it.
    pub fn remove(&mut self, rel: &[u8]) -> &mut Self {
        let p = self.path(rel);
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
        let under = |k: &Vec<u8>| -> bool {
            k.as_slice() == rel || (k.starts_with(rel) && k.get(rel.len()) == Some(&b'/'))
        };
        self.modes.retain(|k, _| !under(k));
        self.owners.retain(|k, _| !under(k));
        self.times.retain(|k, _| !under(k));
        self.dirs.retain(|k| !under(k));
        self
    }

    /// Applies owners, then modes (non-directories first, then directories
    /// deepest first, so a mode-000 directory comes last), then times.
    pub fn finalize(&mut self) -> &mut Self {
        for (rel, &(u, g)) in &self.owners {
            let p = join_rel(&self.root, rel);
            std::os::unix::fs::lchown(&p, Some(u), Some(g))
                .unwrap_or_else(|e| panic!("lchown {}: {e}", show(rel)));
        }
        let depth =
            |r: &[u8]| r.iter().filter(|&&b| b == b'/').count() + usize::from(!r.is_empty());
        let mut modes: Vec<(&Vec<u8>, &u32)> = self.modes.iter().collect();
        modes.sort_by_key(|(r, _)| (self.dirs.contains(*r), std::cmp::Reverse(depth(r))));
        for (rel, &mode) in modes {
            let p = join_rel(&self.root, rel);
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", show(rel)));
        }
        self.finalize_times()
    }

    /// Sets all recorded times, deepest entries first (root last).
    pub fn finalize_times(&mut self) -> &mut Self {
        let depth =
            |r: &[u8]| r.iter().filter(|&&b| b == b'/').count() + usize::from(!r.is_empty());
        let mut all: Vec<(&Vec<u8>, &(i64, u32))> = self.times.iter().collect();
        all.sort_by_key(|(r, _)| std::cmp::Reverse(depth(r)));
        for (rel, &(s, ns)) in all {
            set_times(&join_rel(&self.root, rel), s, ns)
                .unwrap_or_else(|e| panic!("utimensat {}: {e}", show(rel)));
        }
        self
    }
}

// ---------------------------------------------------------------------------
// Read-write scenarios and reproducibility
// ---------------------------------------------------------------------------

fn copy_image(img: &Path, dir: &Path, name: &str) -> PathBuf {
    let copy = dir.join(name);
    fs::copy(img, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", img.display()));
    copy
}

fn regular_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut names: Vec<PathBuf> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn unused_name(dir: &Path, base: &str) -> PathBuf {
    (0..)
        .map(|i| dir.join(format!("{base}{i}")))
        .find(|p| fs::symlink_metadata(p).is_err())
        .unwrap()
}

/// Copy the image, grow the copy by 256 MiB, mount rw, `resize max`, write
/// files (10 MiB + small), mkdir, delete some existing files, sync, scrub,
/// unmount, `btrfs check`, then remount ro and verify the changes persisted.
pub fn rw_cycle(img: &Path) {
    let work = workdir("rw-cycle");
    let copy = copy_image(img, work.path(), "rw.img");
    let f = OpenOptions::new().write(true).open(&copy).unwrap();
    f.set_len(f.metadata().unwrap().len() + 256 * MIB).unwrap();
    drop(f);

    let big = random_bytes(10 * MIB as usize, 0xb16);
    let small = b"small file written by rw_cycle\n".to_vec();
    let m = LoopMount::new(&copy, true);
    let mut cmd = Command::new(tool("btrfs"));
    cmd.args(["filesystem", "resize", "max"]).arg(m.path());
    run_ok(&mut cmd);

    let existing = regular_files(m.path());
    let mut victims: Vec<PathBuf> = Vec::new();
    if !existing.is_empty() {
        for i in [0, existing.len() / 2, existing.len() - 1] {
            if !victims.contains(&existing[i]) {
                victims.push(existing[i].clone());
            }
        }
    }
    let big_p = unused_name(m.path(), "rw-cycle-big-");
    let small_p = unused_name(m.path(), "rw-cycle-small-");
    let dir_p = unused_name(m.path(), "rw-cycle-dir-");
    for (p, data) in [(&big_p, &big), (&small_p, &small)] {
        let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
    fs::create_dir(&dir_p).unwrap();
    fs::write(dir_p.join("inner"), b"inner").unwrap();
    for v in &victims {
        fs::remove_file(v).unwrap_or_else(|e| panic!("delete {}: {e}", v.display()));
    }
    unsafe { libc::sync() };
    btrfs_scrub(m.path());
    let rel = |p: &Path| p.strip_prefix(m.path()).unwrap().to_path_buf();
    let (big_r, small_r, dir_r) = (rel(&big_p), rel(&small_p), rel(&dir_p));
    let victims_r: Vec<PathBuf> = victims.iter().map(|v| rel(v)).collect();
    m.unmount();
    btrfs_check(&copy);

    let m = LoopMount::new(&copy, false);
    assert_eq!(
        fs::read(m.path().join(&big_r)).unwrap(),
        big,
        "big file after remount"
    );
    assert_eq!(fs::read(m.path().join(&small_r)).unwrap(), small);
    assert_eq!(
        fs::read(m.path().join(&dir_r).join("inner")).unwrap(),
        b"inner"
    );
    for v in &victims_r {
        assert!(
            fs::symlink_metadata(m.path().join(v)).is_err(),
            "{} still exists after deletion",
            v.display()
        );
    }
    m.unmount();
}

/// Mount a copy of the image at its exact size read-write, create a
/// 100-byte file and a directory, unmount, `btrfs check`, verify.
pub fn first_boot_rw(img: &Path) {
    let work = workdir("first-boot");
    let copy = copy_image(img, work.path(), "first-boot.img");
    let data = random_bytes(100, 0xf00d);
    let m = LoopMount::new(&copy, true);
    let file = unused_name(m.path(), "first-boot-file-");
    let dir = unused_name(m.path(), "first-boot-dir-");
    {
        let mut f = File::create(&file).unwrap_or_else(|e| panic!("create on first boot: {e}"));
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir on first boot: {e}"));
    let (file_r, dir_r) = (
        file.strip_prefix(m.path()).unwrap().to_path_buf(),
        dir.strip_prefix(m.path()).unwrap().to_path_buf(),
    );
    m.unmount();
    assert_eq!(
        fs::metadata(&copy).unwrap().len(),
        fs::metadata(img).unwrap().len()
    );
    btrfs_check(&copy);
    let m = LoopMount::new(&copy, false);
    assert_eq!(fs::read(m.path().join(&file_r)).unwrap(), data);
    assert!(m.path().join(&dir_r).is_dir());
    m.unmount();
}

fn skip_determinism_in_mkfs_mode(what: &str) -> bool {
    if is_mkfs_mode() {
        eprintln!(
            "SKIPPED {what}: mkfs.btrfs ({BUILDER_ENV}=mkfs) is not deterministic; \
             byte-identity is only checked with btrfsimg"
        );
        return true;
    }
    false
}

/// Exports SRC again and asserts the result equals IMG byte for byte.
pub fn assert_export_matches(src: &Path, img: &Path, extra_args: &[&str]) {
    if skip_determinism_in_mkfs_mode("byte-identical re-export") {
        return;
    }
    let work = workdir("reexport");
    let again = work.path().join("again.img");
    export(src, &again, extra_args);
    assert_files_identical(img, &again);
}

/// Exports SRC twice and asserts the two images are byte-identical.
pub fn assert_reproducible(src: &Path, extra_args: &[&str]) {
    if skip_determinism_in_mkfs_mode("reproducibility") {
        return;
    }
    let work = workdir("repro");
    let (a, b) = (work.path().join("a.img"), work.path().join("b.img"));
    export(src, &a, extra_args);
    export(src, &b, extra_args);
    assert_files_identical(&a, &b);
}

// ---------------------------------------------------------------------------
// btrfsimg mount (FUSE)
// ---------------------------------------------------------------------------

/// Like `system_tests_available`, plus /dev/fuse and fusermount3.
pub fn fuse_available(what: &str) -> bool {
    if !system_tests_available(what) {
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        return skip_or_panic(what, "/dev/fuse is missing");
    }
    if Command::new("fusermount3").arg("-V").output().is_err() {
        return skip_or_panic(what, "fusermount3 not found (apt-get install fuse3)");
    }
    true
}

pub fn is_mounted(mnt: &Path) -> bool {
    let target = mnt.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

/// Waits until `mnt` is no longer mounted; false after `timeout`.
pub fn wait_unmounted(mnt: &Path, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while is_mounted(mnt) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A running `btrfsimg mount`, stopped (and cleaned up) on drop.
pub struct FuseMount {
    pub child: Option<std::process::Child>,
    pub mnt: PathBuf,
}

impl FuseMount {
    /// `btrfsimg mount SRC MNT EXTRA...` (MNT is created), stderr inherited.
    pub fn start(src: &Path, mnt: &Path, extra: &[&str]) -> FuseMount {
        let (cmd, mnt) = FuseMount::command(src, mnt, extra);
        FuseMount::start_cmd(cmd, &mnt)
    }

    /// Like `start`, with the server's stderr (its log) going to `log`.
    pub fn start_logged(src: &Path, mnt: &Path, extra: &[&str], log: &Path) -> FuseMount {
        let (mut cmd, mnt) = FuseMount::command(src, mnt, extra);
        cmd.stderr(File::create(log).expect("create mount log"));
        FuseMount::start_cmd(cmd, &mnt)
    }

    /// The command line of a mount and the canonical mountpoint (created).
    pub fn command(src: &Path, mnt: &Path, extra: &[&str]) -> (Command, PathBuf) {
        fs::create_dir_all(mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let mut cmd = Command::new(btrfsimg_bin());
        cmd.arg("mount").arg(src).arg(&mnt).args(extra);
        (cmd, mnt)
    }

    /// Starts `cmd` (a `btrfsimg mount` of `mnt`) and waits for the fs.img line.
    pub fn start_cmd(mut cmd: Command, mnt: &Path) -> FuseMount {
        let mnt = mnt.canonicalize().unwrap();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn btrfsimg mount");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let mut m = FuseMount {
            child: Some(child),
            mnt: mnt.clone(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("btrfsimg mount did not report fs.img");
        assert_eq!(
            line.trim_end(),
            mnt.join("fs.img").to_string_lossy(),
            "first stdout line must be the path of fs.img"
        );
        assert!(is_mounted(&mnt), "{} is not mounted", mnt.display());
        if let Some(c) = m.child.as_mut() {
            assert!(
                c.try_wait().unwrap().is_none(),
                "mount process exited early"
            );
        }
        m
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Bytes the serving process has read with read(2)-family calls so far.
    pub fn rchar(&self) -> u64 {
        let io = fs::read_to_string(format!("/proc/{}/io", self.pid())).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    /// Peak resident set of the serving process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let st = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * KIB
    }

    pub fn img(&self) -> PathBuf {
        self.mnt.join("fs.img")
    }

    /// Sends `sig` without waiting.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits for the process; returns its exit status.
    pub fn stop(mut self, sig: i32) -> std::process::ExitStatus {
        self.signal(sig);
        self.wait_exit(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("btrfsimg mount ignored signal {sig}"))
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// What FUSE tests start from: `fuse_test_tree` at WORK/src, exported with
/// ARGS to WORK/export.img, and the exported bytes.
pub struct FuseFixture {
    pub src: PathBuf,
    pub exported: PathBuf,
    pub want: std::sync::Arc<Vec<u8>>,
}

pub fn fuse_fixture(work: &Path, args: &[&str]) -> FuseFixture {
    let src = work.join("src");
    fuse_test_tree(&src);
    let exported = work.join("export.img");
    export(&src, &exported, args);
    let want = std::sync::Arc::new(fs::read(&exported).unwrap());
    FuseFixture {
        src,
        exported,
        want,
    }
}

/// A tree for FUSE tests: files around the inline/sector boundaries, a 9 MiB
/// file, 1,500 small files, a symlink and a sparse file.
pub fn fuse_test_tree(root: &Path) {
    let mut t = TreeBuilder::new(root);
    for (i, size) in [0u64, 1, 2048, 2049, 4096, 65537, (3 << 20) + 5, 9 << 20]
        .into_iter()
        .enumerate()
    {
        t.random_file(format!("files/f{i}").as_bytes(), size, 100 + i as u64);
    }
    for i in 0..1500u64 {
        t.random_file(format!("many/e{i:04}").as_bytes(), (i * 131) % 7000, i);
    }
    t.symlink(b"link", b"files/f1");
    t.sparse_file(b"sparse", 20 << 20, &[(8 << 20, b"middle")]);
    t.finalize();
}

/// What a soak run did.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub mounts: u64,
    pub reads: u64,
    pub bytes: u64,
}

/// Eight reader threads (every other one with O_DIRECT) read random ranges of
/// fs.img through fresh `btrfsimg mount`s of SRC (a new mount every
/// `per_mount`) for `total`, comparing every byte read with `want` (the
/// export). Panics on the first difference or read error.
pub fn fuse_soak(
    src: &Path,
    mnt: &Path,
    args: &[&str],
    want: std::sync::Arc<Vec<u8>>,
    total: Duration,
    per_mount: Duration,
) -> SoakReport {
    use rand::Rng;
    let start = std::time::Instant::now();
    let mut report = SoakReport::default();
    let mut round = 0u64;
    while report.mounts == 0 || start.elapsed() < total {
        let m = FuseMount::start(src, mnt, args);
        report.mounts += 1;
        let until =
            std::time::Instant::now() + per_mount.min(total.saturating_sub(start.elapsed()));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let want = want.clone();
                let img = m.img();
                let seed = round * 8 + t;
                std::thread::spawn(move || {
                    let mut rng = ChaCha8Rng::seed_from_u64(0x50a4 + seed);
                    let direct = t % 2 == 1;
                    let mut opts = OpenOptions::new();
                    opts.read(true);
                    if direct {
                        opts.custom_flags(libc::O_DIRECT);
                    }
                    let f = opts.open(&img).unwrap();
                    let size = want.len() as u64;
                    let mut buf = vec![0u8; 4 << 20];
                    let (mut reads, mut bytes) = (0u64, 0u64);
                    let mut i = 0u64;
                    while i == 0 || std::time::Instant::now() < until {
                        let len = match i % 3 {
                            0 => rng.random_range(1..=4096),
                            1 => rng.random_range(1..=256 << 10),
                            _ => rng.random_range(1..=4 << 20),
                        };
                        let off = rng.random_range(0..size);
                        let n = f.read_at(&mut buf[..len], off).unwrap_or_else(|e| {
                            panic!("thread {t} (direct={direct}) read {len} at {off}: {e}")
                        });
                        let expect = (size - off).min(len as u64) as usize;
                        assert!(n > 0 || expect == 0, "short read at {off}");
                        assert!(
                            buf[..n] == want[off as usize..off as usize + n],
                            "thread {t} (direct={direct}) read {len} at {off}: bytes differ"
                        );
                        reads += 1;
                        bytes += n as u64;
                        i += 1;
                    }
                    (reads, bytes)
                })
            })
            .collect();
        for t in threads {
            let (r, b) = t.join().expect("reader thread failed");
            report.reads += r;
            report.bytes += b;
        }
        let st = m.stop(libc::SIGTERM);
        assert!(st.success(), "mount exit status after SIGTERM: {st:?}");
        assert!(!is_mounted(mnt), "{} still mounted", mnt.display());
        round += 1;
    }
    report
}

// ---------------------------------------------------------------------------
// Processes: limits, resource usage, error lines
// ---------------------------------------------------------------------------

/// Makes `cmd` run with RLIMIT_NOFILE = `n` (soft and hard).
pub fn limit_open_files(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits for `child` with wait4; returns its status and peak RSS in bytes.
pub fn wait_with_peak_rss(child: std::process::Child) -> (std::process::ExitStatus, u64) {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; we wait for our own child exactly once
    // (the Child is forgotten so it does not wait again).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4: {}", io::Error::last_os_error());
    std::mem::forget(child);
    (
        std::process::ExitStatus::from_raw(status),
        ru.ru_maxrss as u64 * KIB,
    )
}

/// Asserts that a failed command printed exactly one line on stderr, of the
/// form `btrfsimg: ...`, containing every fragment and no panic message.
pub fn assert_error_line(stderr: &str, fragments: &[&str], what: &str) {
    let t = stderr.trim_end();
    assert!(
        !t.contains("panicked") && !t.contains("RUST_BACKTRACE"),
        "{what}: panic:\n{stderr}"
    );
    assert_eq!(
        t.lines().count(),
        1,
        "{what}: expected one line, got:\n{stderr}"
    );
    assert!(
        t.starts_with("btrfsimg: "),
        "{what}: not a btrfsimg error line: {t}"
    );
    for f in fragments {
        assert!(t.contains(f), "{what}: error line lacks {f:?}: {t}");
    }
}

/// Physical byte ranges of the image that hold the data of the file at
/// `image_path` (e.g. "/dir/file"), as (offset, len).
pub fn file_data_ranges(plan: &btrfsimg::plan::Plan, image_path: &str) -> Vec<(u64, u64)> {
    let tree = &plan.source;
    let node = (0..tree.len() as u32)
        .find(|&n| tree.image_path(n) == Path::new(image_path))
        .unwrap_or_else(|| panic!("{image_path} is not in the plan"));
    let mut out = Vec::new();
    for e in plan.extents.iter().filter(|e| e.node == node) {
        let mut l = e.logical;
        while l < e.end() {
            let r = plan
                .regions
                .iter()
                .find_map(|r| match r.kind {
                    btrfsimg::plan::space::RegionKind::Data { logical }
                        if logical <= l && l < logical + r.len =>
                    {
                        Some((r.start + (l - logical), logical + r.len))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("logical {l} of {image_path} is not mapped"));
            let n = (e.end()).min(r.1) - l;
            out.push((r.0, n));
            l += n;
        }
    }
    assert!(!out.is_empty(), "{image_path} has no data extents");
    out
}

//! Exporting images with btrfsimg (or mkfs.btrfs, to validate the harness).

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
pub fn mkfs_export(src: &Path, out: &Path, extra_args: &[&str]) -> ExportResult {
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
        say(&format!(
            "SKIPPED {what}: checks btrfsimg-specific fidelity ({BUILDER_ENV}=mkfs)"
        ));
        return true;
    }
    false
}

//! Running commands and processes: output, limits, resource usage, error lines.

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

/// Runs `cmd` with its stderr on a new pseudo-terminal of 120 columns (so it
/// draws its progress bars, as in a user's terminal) and returns its status
/// and everything it drew there.
pub fn run_on_terminal(mut cmd: Command) -> (std::process::ExitStatus, String) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on a descriptor this function owns; the name
    // buffer outlives the call that fills it.
    let (master, slave_path) = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(fd >= 0, "posix_openpt: {}", io::Error::last_os_error());
        assert_eq!(libc::grantpt(fd), 0, "grantpt");
        assert_eq!(libc::unlockpt(fd), 0, "unlockpt");
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        assert_eq!(libc::ioctl(fd, libc::TIOCSWINSZ, &ws), 0, "TIOCSWINSZ");
        let mut name = [0 as libc::c_char; 256];
        assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .into_owned();
        (File::from_raw_fd(fd), path)
    };
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)
        .unwrap_or_else(|e| panic!("{slave_path}: {e}"));
    cmd.stdin(Stdio::null()).stderr(slave);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(&cmd)));
    // The parent's copy of the terminal goes with the command, so the
    // reader sees the end (EIO) when the child's copies close.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        out
    });
    let status = child.wait().expect("wait");
    let out = reader.join().expect("terminal reader");
    (status, String::from_utf8_lossy(&out).into_owned())
}

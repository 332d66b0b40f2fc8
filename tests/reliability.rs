//! Reliability without privileges (as root, the "unreadable" cases drop to
//! nobody with setpriv): every bad input ends with one line naming the path and
//! the reason, exit status 1 and no output file; a source that changes after
//! planning is never served; signals and closed pipes end cleanly and leave
//! nothing named like the output; the open-file limit and memory stay bounded.
//! Disk-full and FUSE cases need root: tests/reliability_system.rs.

mod common;

use btrfsimg::format::BLOCK_GROUP_SYSTEM;
use btrfsimg::plan::space::RegionKind;
use btrfsimg::{export, plan_dir, Image, Options};
use common::*;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// A temporary directory for big (fallocated, never written) files: under the
/// target directory rather than /tmp, which may be a tmpfs held in memory.
fn big_workdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("btrfsimg-{tag}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create temp dir")
}

/// A file of `len` zero bytes whose blocks are allocated (fallocate), so that
/// btrfsimg reads it as data, without writing it.
fn allocated_file(p: &Path, len: u64) {
    use std::os::fd::AsRawFd;
    let f = File::create(p).unwrap();
    // SAFETY: fallocate on an open fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    assert_eq!(
        r,
        0,
        "fallocate {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn names(dir: &Path) -> Vec<String> {
    dir_names(dir).iter().map(|n| show(n)).collect()
}

// ---------------------------------------------------------------------------
// Bad inputs
// ---------------------------------------------------------------------------

struct Case {
    name: &'static str,
    args: Vec<OsString>,
    env: Vec<(&'static str, &'static str)>,
    /// Run as an unprivileged user (setpriv when root).
    unprivileged: bool,
    /// Every fragment must appear in the error line.
    expect: Vec<String>,
}

fn case(
    name: &'static str,
    args: &[&dyn AsRef<std::ffi::OsStr>],
    expect: &[&dyn ToString],
) -> Case {
    Case {
        name,
        args: args.iter().map(|a| a.as_ref().to_os_string()).collect(),
        env: Vec::new(),
        unprivileged: false,
        expect: expect.iter().map(|e| e.to_string()).collect(),
    }
}

struct D<'a>(&'a Path);
impl std::fmt::Display for D<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.display())
    }
}

/// The table: each row is a command line that must fail with exit status 1,
/// print one line on stderr naming the path (or option) and the reason, print
/// nothing on stdout, and leave nothing in the output directory.
#[test]
fn bad_inputs_fail_with_one_line_and_leave_nothing() {
    if !tools_available(
        "bad_inputs_fail_with_one_line_and_leave_nothing",
        &["setpriv"],
    ) {
        return;
    }
    let work = workdir("bad-input");
    let w = work.path().to_path_buf();
    chmod(&w, 0o755); // traversable for the unprivileged rows
    let src = w.join("src");
    let mut t = TreeBuilder::new(&src);
    t.file(b"a", b"hello\n")
        .random_file(b"big", 100 * KIB, 1)
        .file(b"d/x", b"x")
        .symlink(b"ln", b"d")
        .finalize();
    let file = w.join("file");
    fs::write(&file, b"not a directory").unwrap();
    let out_dir = w.join("out");
    fs::create_dir(&out_dir).unwrap();
    chmod(&out_dir, 0o777);
    let out = out_dir.join("x.img");
    // Closure inputs.
    let ci_empty = w.join("ci-empty");
    fs::create_dir(&ci_empty).unwrap();
    let ci_noreg = w.join("ci-noreg");
    fs::create_dir(&ci_noreg).unwrap();
    fs::write(ci_noreg.join("store-paths"), b"").unwrap();
    let missing_paths = w.join("missing.paths");
    fs::write(&missing_paths, b"/nix/store/abc-missing\n").unwrap();
    let elsewhere = w.join("elsewhere/pkg");
    fs::create_dir_all(&elsewhere).unwrap();
    let outside_paths = w.join("outside.paths");
    fs::write(&outside_paths, format!("{}\n", elsewhere.display())).unwrap();
    let chroot = w.join("chroot");
    fs::create_dir(&chroot).unwrap();
    let chroot_ok = w.join("chroot-ok");
    fs::create_dir_all(chroot_ok.join("nix/store/abc-ok")).unwrap();
    let ok_paths = w.join("ok.paths");
    fs::write(&ok_paths, b"/nix/store/abc-ok\n").unwrap();
    let reg_file = w.join("registration");
    fs::write(&reg_file, b"/nix/store/abc-ok\n").unwrap();
    // Overlay conflicting with src/a.
    let ov = w.join("ov");
    fs::create_dir(&ov).unwrap();
    fs::write(ov.join("a"), b"other").unwrap();
    // Unreadable inputs (for an unprivileged user).
    let unread_file = w.join("unreadable-file");
    let unread_inline = w.join("unreadable-inline");
    let unread_dir = w.join("unreadable-dir");
    for (root, rel, size) in [
        (&unread_file, "secret", 100 * KIB),
        (&unread_inline, "tiny", 10),
        (&unread_dir, "d/inner", 10),
    ] {
        let mut t = TreeBuilder::new(root);
        t.random_file(b"ok", 5000, 2)
            .random_file(rel.as_bytes(), size, 3)
            .finalize();
    }
    chmod(&unread_file.join("secret"), 0o000);
    chmod(&unread_inline.join("tiny"), 0o000);
    chmod(&unread_dir.join("d"), 0o000);
    // 60 names of 255 bytes sharing one name hash: more than one directory
    // item holds.
    let colliding = w.join("colliding");
    let mut t = TreeBuilder::new(&colliding);
    for n in names_with_hash(60, 255, 0xc0ffee, b"") {
        let mut rel = b"coll/".to_vec();
        rel.extend_from_slice(&n);
        t.file(&rel, b"x");
    }
    t.finalize();
    let coll_dir = colliding.join("coll");
    // Mountpoints.
    let mnt_full = w.join("mnt-full");
    fs::create_dir(&mnt_full).unwrap();
    fs::write(mnt_full.join("f"), b"f").unwrap();
    let mnt_empty = w.join("mnt-empty");
    fs::create_dir(&mnt_empty).unwrap();

    let long_label = "a".repeat(256);
    let (nosuch, nodir) = (w.join("nosuch"), w.join("nodir"));
    let e = "export";
    let o = "-o";
    let file_out = file.join("x.img");
    let nodir_out = nodir.join("x.img");
    let unexpected_ci = w.join("nosuch-ci");
    let old_bmap = w.join("old.bmap");
    fs::write(&old_bmap, b"an older bmap").unwrap();
    let out_respelled = out_dir.join("..").join("out").join("x.img");
    let ci_store_paths = ci_empty.join("store-paths");
    let ci_registration = ci_noreg.join("registration");
    let chroot_missing = chroot.join("nix/store/abc-missing");
    let mut cases = vec![
        case(
            "missing ROOT",
            &[&e, &nosuch, &o, &out],
            &[&D(&nosuch), &"No such file or directory"],
        ),
        case(
            "ROOT is a file",
            &[&e, &file, &o, &out],
            &[&D(&file), &"ROOT is not a directory"],
        ),
        case(
            "output directory missing",
            &[&e, &src, &o, &nodir_out],
            &[&D(&nodir), &"output directory does not exist"],
        ),
        case(
            "output directory is a file",
            &[&e, &src, &o, &file_out],
            &[&D(&file), &"not a directory"],
        ),
        case(
            "output is a directory",
            &[&e, &src, &o, &out_dir, &"--force"],
            &[&D(&out_dir), &"is a directory"],
        ),
        case(
            "invalid --uuid",
            &[&e, &src, &o, &out, &"-U", &"not-a-uuid"],
            &[&"--uuid", &"not-a-uuid"],
        ),
        case(
            "invalid --uuid digit",
            &[
                &e,
                &src,
                &o,
                &out,
                &"--uuid",
                &"0123456g-89ab-cdef-0123-456789abcdef",
            ],
            &[&"--uuid", &"0123456g"],
        ),
        case(
            "invalid --owner",
            &[&e, &src, &o, &out, &"--owner", &"root:root"],
            &[&"--owner", &"root:root"],
        ),
        case(
            "incomplete --owner",
            &[&e, &src, &o, &out, &"--owner", &"1:"],
            &[&"--owner", &"'1:'"],
        ),
        case(
            "invalid --size unit",
            &[&e, &src, &o, &out, &"--size", &"12Q"],
            &[&"--size", &"12Q"],
        ),
        case(
            "empty --size",
            &[&e, &src, &o, &out, &"--size", &""],
            &[&"--size"],
        ),
        case(
            "overflowing --size",
            &[&e, &src, &o, &out, &"--size", &"99999999T"],
            &[&"--size", &"too large"],
        ),
        case(
            "unknown --compress algorithm",
            &[&e, &src, &o, &out, &"--compress", &"lz4"],
            &[&"--compress", &"lz4"],
        ),
        case(
            "--compress level out of range",
            &[&e, &src, &o, &out, &"--compress", &"zstd:16"],
            &[&"--compress", &"1 to 15"],
        ),
        case(
            "--compress lzo with a level",
            &[&e, &src, &o, &out, &"--compress", &"lzo:1"],
            &[&"--compress", &"no levels"],
        ),
        case(
            "unknown --csum algorithm",
            &[&e, &src, &o, &out, &"--csum", &"md5"],
            &[
                &"--csum", &"'md5'", &"crc32c", &"xxhash", &"sha256", &"blake2",
            ],
        ),
        case(
            "unknown --csum algorithm for mount",
            &[&"mount", &src, &mnt_empty, &"--csum", &"crc32"],
            &[&"--csum", &"'crc32'", &"crc32c, xxhash, sha256, blake2"],
        ),
        case(
            "unknown -O feature",
            &[
                &e,
                &src,
                &o,
                &out,
                &"-O",
                &"block-group-tree,extent-tree-v2",
            ],
            &[&"-O", &"'extent-tree-v2'", &"block-group-tree"],
        ),
        case(
            "unknown -O feature turned off, for mount",
            &[&"mount", &src, &mnt_empty, &"--features", &"^no-holes"],
            &[
                &"-O",
                &"'^no-holes'",
                &"known features are block-group-tree",
            ],
        ),
        case(
            "unknown --inode-flags flag",
            &[
                &e,
                &src,
                &o,
                &out,
                &"--inode-flags",
                &"nodatacow,compress:d",
            ],
            &[
                &"--inode-flags nodatacow,compress:d",
                &"unknown flag 'compress'",
                &"nodatacow, nodatasum",
            ],
        ),
        case(
            "--inode-flags without a path",
            &[&e, &src, &o, &out, &"--inode-flags", &"nodatacow"],
            &[&"--inode-flags nodatacow", &"FLAGS:PATH"],
        ),
        case(
            "--inode-flags PATH missing",
            &[&e, &src, &o, &out, &"--inode-flags", &"nodatacow:d/nosuch"],
            &[
                &"/d/nosuch",
                &"no such file or directory in the image",
                &"--inode-flags",
            ],
        ),
        case(
            "--inode-flags PATH through a symlink",
            &[&e, &src, &o, &out, &"--inode-flags", &"nodatasum:ln/x"],
            &[&"/ln", &"is a symlink", &"--inode-flags nodatasum:/ln/x"],
        ),
        case(
            "--inode-flags PATH below a file",
            &[&e, &src, &o, &out, &"--inode-flags", &"nodatasum:a/b"],
            &[&"/a", &"is not a directory"],
        ),
        case(
            "--inode-flags PATH missing, for mount",
            &[
                &"mount",
                &src,
                &mnt_empty,
                &"--inode-flags",
                &"nodatacow:/nosuch",
            ],
            &[&"/nosuch", &"no such file or directory in the image"],
        ),
        case(
            "--size beyond 8 EiB",
            &[&e, &src, &o, &out, &"--size", &"9223372036854775808"],
            &[&"--size", &"too large", &"8 EiB"],
        ),
        case(
            "--extra-space beyond 8 EiB",
            &[&e, &src, &o, &out, &"--extra-space", &"8388608T"],
            &[&"--extra-space", &"too large"],
        ),
        case(
            "names sharing one hash overflow a directory item",
            &[&e, &colliding, &o, &out],
            &[&D(&coll_dir), &"60 names share one name hash", &"EOVERFLOW"],
        ),
        case(
            "--size too small",
            &[&e, &src, &o, &out, &"--size", &"1M"],
            &[&"--size", &"too small"],
        ),
        case(
            "invalid --extra-space",
            &[&e, &src, &o, &out, &"--extra-space", &"5X"],
            &[&"--extra-space", &"5X"],
        ),
        case(
            "invalid --timestamp",
            &[&e, &src, &o, &out, &"--timestamp", &"yesterday"],
            &[&"--timestamp", &"yesterday"],
        ),
        case(
            "label over 255 bytes",
            &[&e, &src, &o, &out, &"-L", &long_label],
            &[&"--label", &"256 bytes"],
        ),
        case(
            "invalid --nodesize",
            &[&e, &src, &o, &out, &"--nodesize", &"1000"],
            &[&"1000", &"power of two"],
        ),
        case(
            "--subvol PATH missing",
            &[&e, &src, &o, &out, &"--subvol", &"nosuch/dir"],
            &[&"/nosuch", &"no such directory", &"--subvol nosuch/dir"],
        ),
        case(
            "--subvol PATH is a file",
            &[&e, &src, &o, &out, &"--subvol", &"a"],
            &[&"/a", &"not a directory"],
        ),
        case(
            "--subvol PATH through a symlink",
            &[&e, &src, &o, &out, &"--subvol", &"ln/x"],
            &[&"/ln", &"symlink"],
        ),
        case(
            "two default subvolumes",
            &[
                &e,
                &src,
                &o,
                &out,
                &"--subvol",
                &"default:d",
                &"--subvol",
                &"default-ro:e=/e",
            ],
            &[&"two default subvolumes", &"default:d", &"default-ro:e=/e"],
        ),
        case(
            "a mountpoint claimed twice",
            &[
                &e,
                &src,
                &o,
                &out,
                &"--subvol",
                &"x=/d",
                &"--subvol",
                &"y=/d/",
            ],
            &[&"same mountpoint /d", &"x=/d", &"y=/d"],
        ),
        case(
            "a subvolume name over 255 bytes",
            &[&e, &src, &o, &out, &"--subvol", &long_label],
            &[&"--subvol", &"256 bytes"],
        ),
        case(
            "invalid --zstd level",
            &[&e, &src, &o, &out, &"--zstd=99"],
            &[&"--zstd", &"99"],
        ),
        case(
            "closure-info directory missing",
            &[&e, &o, &out, &"--closure-info", &unexpected_ci],
            &[&D(&unexpected_ci), &"does not exist"],
        ),
        case(
            "closure-info without store-paths",
            &[&e, &o, &out, &"--closure-info", &ci_empty],
            &[
                &D(&ci_store_paths),
                &"missing from the closure-info directory",
            ],
        ),
        case(
            "closure-info without registration",
            &[&e, &o, &out, &"--closure-info", &ci_noreg],
            &[
                &D(&ci_registration),
                &"missing from the closure-info directory",
            ],
        ),
        case(
            "store path missing",
            &[&e, &o, &out, &"--store-paths", &missing_paths],
            &[&"/nix/store/abc-missing", &"does not exist"],
        ),
        case(
            "store path missing under --store-root",
            &[
                &e,
                &o,
                &out,
                &"--store-paths",
                &missing_paths,
                &"--store-root",
                &chroot,
            ],
            &[
                &"/nix/store/abc-missing",
                &D(&chroot_missing),
                &"does not exist",
            ],
        ),
        case(
            "--mountpoint not absolute",
            &[&e, &src, &o, &out, &"--mountpoint", &"nix"],
            &[&"nix", &"--mountpoint must be an absolute path"],
        ),
        case(
            "store path outside --mountpoint",
            &[
                &e,
                &o,
                &out,
                &"--store-paths",
                &ok_paths,
                &"--store-root",
                &chroot_ok,
                &"--mountpoint",
                &"/opt",
            ],
            &[&"/nix/store/abc-ok", &"outside the image's mountpoint /opt"],
        ),
        case(
            "--registration-path outside --mountpoint",
            &[
                &e,
                &src,
                &o,
                &out,
                &"--registration",
                &reg_file,
                &"--mountpoint",
                &"/nix",
            ],
            &[
                &"/nix-path-registration",
                &"outside the image's mountpoint /nix",
            ],
        ),
        case(
            "--subvol mountpoint outside --mountpoint",
            &[
                &e,
                &src,
                &o,
                &out,
                &"--mountpoint",
                &"/nix",
                &"--subvol",
                &"@=/",
            ],
            &[&"--subvol @=/", &"outside the image's mountpoint /nix"],
        ),
        case(
            "store path outside the store directory",
            &[&e, &o, &out, &"--store-paths", &outside_paths],
            &[&D(&elsewhere), &"not a store path"],
        ),
        case(
            "registration file missing",
            &[&e, &src, &o, &out, &"--registration", &nosuch],
            &[&D(&nosuch), &"does not exist"],
        ),
        case(
            "overlay conflict",
            &[&e, &src, &o, &out, &"--files", &ov],
            &[
                &"/a",
                &"provided by both",
                &D(&src.join("a")),
                &D(&ov.join("a")),
            ],
        ),
        case(
            "overlay is a file",
            &[&e, &src, &o, &out, &"--files", &file],
            &[&D(&file), &"not a directory"],
        ),
        case(
            "nothing to put in the image",
            &[&e, &o, &out],
            &[&"nothing to put in the image"],
        ),
        case(
            "unreadable file",
            &[&e, &unread_file, &o, &out],
            &[&D(&unread_file.join("secret")), &"Permission denied"],
        ),
        case(
            "unreadable inline file",
            &[&e, &unread_inline, &o, &out],
            &[&D(&unread_inline.join("tiny")), &"Permission denied"],
        ),
        case(
            "unreadable directory",
            &[&e, &unread_dir, &o, &out],
            &[&D(&unread_dir.join("d")), &"Permission denied"],
        ),
        case(
            "unreadable file to stdout",
            &[&e, &unread_file, &o, &"-"],
            &[&D(&unread_file.join("secret")), &"Permission denied"],
        ),
        case(
            "--bmap directory missing",
            &[&e, &src, &o, &out, &"--bmap", &nodir_out],
            &[&D(&nodir), &"output directory does not exist"],
        ),
        case(
            "--bmap directory missing, image to stdout",
            &[&e, &src, &o, &"-", &"--bmap", &nodir_out],
            &[&D(&nodir), &"output directory does not exist"],
        ),
        case(
            "--bmap directory is a file",
            &[&e, &src, &o, &out, &"--bmap", &file_out],
            &[&D(&file), &"not a directory"],
        ),
        case(
            "--bmap is a directory",
            &[&e, &src, &o, &out, &"--bmap", &out_dir, &"--force"],
            &[&D(&out_dir), &"is a directory"],
        ),
        case(
            "--bmap exists",
            &[&e, &src, &o, &out, &"--bmap", &old_bmap],
            &[&D(&old_bmap), &"already exists", &"--force"],
        ),
        case(
            "--bmap is the output",
            &[&e, &src, &o, &out, &"--bmap", &out],
            &[&D(&out), &"is the output image too"],
        ),
        case(
            "--bmap is the output, spelled otherwise",
            &[&e, &src, &o, &out, &"--bmap", &out_respelled],
            &[&D(&out_respelled), &"is the output image too"],
        ),
        case(
            "--bmap to stdout",
            &[&e, &src, &o, &out, &"--bmap", &"-"],
            &[&"--bmap -", &"file"],
        ),
        case(
            "mountpoint missing",
            &[&"mount", &src, &nosuch],
            &[&D(&nosuch), &"No such file or directory"],
        ),
        case(
            "mountpoint is a file",
            &[&"mount", &src, &file],
            &[&D(&file), &"not a directory"],
        ),
        case(
            "mountpoint not empty",
            &[&"mount", &src, &mnt_full],
            &[&D(&mnt_full), &"not empty"],
        ),
        case(
            "mount of a missing ROOT",
            &[&"mount", &nosuch, &mnt_empty],
            &[&D(&nosuch), &"No such file"],
        ),
        case(
            "auto_unmount without allow_other",
            &[&"mount", &src, &mnt_empty, &"-o", &"auto_unmount"],
            &[&"auto_unmount", &"allow_other"],
        ),
    ];
    let mut env_case = case(
        "invalid SOURCE_DATE_EPOCH",
        &[&e, &src, &o, &out],
        &[&"SOURCE_DATE_EPOCH", &"'x'"],
    );
    env_case.env.push(("SOURCE_DATE_EPOCH", "x"));
    cases.push(env_case);
    for c in cases
        .iter_mut()
        .filter(|c| c.name.starts_with("unreadable"))
    {
        c.unprivileged = true;
    }

    let mut failed = Vec::new();
    for c in &cases {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_case(c, &out_dir, &nodir, &mnt_empty)
        }));
        if r.is_err() {
            failed.push(c.name);
        }
    }
    chmod(&unread_dir.join("d"), 0o755);
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

fn check_case(c: &Case, out_dir: &Path, nodir: &Path, mnt_empty: &Path) {
    {
        let mut cmd = if c.unprivileged && is_root() {
            let mut cmd = Command::new(tool("setpriv"));
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(btrfsimg_bin());
            cmd
        } else {
            Command::new(btrfsimg_bin())
        };
        cmd.args(&c.args)
            .env_remove("SOURCE_DATE_EPOCH")
            .env_remove("RUST_LOG");
        for (k, v) in &c.env {
            cmd.env(k, v);
        }
        let o = run(&mut cmd);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}: exit status {} (stderr: {stderr})",
            c.name,
            o.status
        );
        let fragments: Vec<&str> = c.expect.iter().map(String::as_str).collect();
        assert_error_line(&stderr, &fragments, c.name);
        assert!(o.stdout.is_empty(), "{}: wrote to stdout", c.name);
        assert!(
            names(out_dir).is_empty(),
            "{}: left {:?}",
            c.name,
            names(out_dir)
        );
        assert!(!nodir.exists(), "{}: created the output directory", c.name);
        assert_eq!(names(mnt_empty), Vec::<String>::new());
    }
}

/// An existing output is refused (and left alone) without --force, and
/// replaced by a whole image with it; nothing else appears next to it.
#[test]
fn existing_output_needs_force() {
    let work = workdir("exists");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.random_file(b"f", 300 * KIB, 7).finalize();
    let dir = work.path().join("out");
    fs::create_dir(&dir).unwrap();
    let out = dir.join("fs.img");
    fs::write(&out, b"precious").unwrap();
    for args in [&[][..], &["--zstd"][..]] {
        let r = try_export(&src, &out, args);
        assert!(!r.success, "overwrote without --force: {}", r.command);
        assert_error_line(
            &r.stderr,
            &[&out.display().to_string(), "already exists", "--force"],
            "existing output",
        );
        assert_eq!(fs::read(&out).unwrap(), b"precious");
        assert_eq!(names(&dir), vec!["/fs.img".to_string()]);
    }
    let mut args = fixed_args("0b0d0a0e-0007-4000-8000-000000000001");
    args.push("--force");
    export(&src, &out, &args);
    assert_eq!(names(&dir), vec!["/fs.img".to_string()]);
    let img = fs::read(&out).unwrap();
    assert_eq!(&img[0x10040..0x10048], b"_BHRfS_M");
    // Without --force again: refused, the image stays.
    let r = try_export(&src, &out, &[]);
    assert!(!r.success);
    assert_eq!(fs::read(&out).unwrap(), img);
}

/// An output that someone else creates while the export runs (after the
/// early check) is not replaced without --force: the export fails, naming
/// it, the other file stays, and the temporary file is removed.
#[test]
fn output_created_during_export_is_not_replaced() {
    let work = big_workdir("race");
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    allocated_file(&src.join("big"), 512 * MIB);
    let out_dir = work.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("fs.img");
    let mut child = Command::new(btrfsimg_bin())
        .arg("export")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = read_all(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while names(&out_dir).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "export ended too soon");
        assert!(Instant::now() < deadline, "no temporary file appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    fs::write(&out, b"someone else's").unwrap();
    let st = wait_timeout(&mut child, Duration::from_secs(120));
    let stderr = stderr.join().unwrap();
    assert_eq!(st.code(), Some(1), "{st:?}: {stderr}");
    assert_error_line(
        &stderr,
        &[&out.display().to_string(), "already exists"],
        "race",
    );
    assert_eq!(fs::read(&out).unwrap(), b"someone else's");
    assert_eq!(names(&out_dir), vec!["/fs.img".to_string()]);
}

/// Runs `btrfsimg export SRC ARGS` until a temporary file shows up in
/// `dir`, then calls `then`; returns the exit status and stderr.
fn export_until_temp(
    src: &Path,
    args: &[&dyn AsRef<std::ffi::OsStr>],
    dir: &Path,
    then: impl FnOnce(u32),
) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(btrfsimg_bin())
        .arg("export")
        .arg(src)
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = read_all(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !names(dir).iter().any(|n| n.ends_with(".tmp")) {
        assert!(child.try_wait().unwrap().is_none(), "export ended too soon");
        assert!(Instant::now() < deadline, "no temporary file appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    then(child.id());
    let st = wait_timeout(&mut child, Duration::from_secs(120));
    (st, stderr.join().unwrap())
}

/// A bmap appears only with its whole image: an export (to a file or to
/// stdout) stopped by a signal leaves neither; one whose bmap name is taken
/// by another process meanwhile fails naming it and leaves no image; an
/// existing bmap is kept without --force and replaced with it.
#[test]
fn bmap_appears_only_with_its_image() {
    let work = big_workdir("bmap-reliability");
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    allocated_file(&src.join("big"), 2 * GIB);
    fs::write(src.join("small"), b"small").unwrap();
    let dir = work.path().join("out");
    fs::create_dir(&dir).unwrap();
    let (out, bmap) = (dir.join("fs.img"), dir.join("fs.img.bmap"));
    let kill = |pid: u32| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    };
    let (st, stderr) = export_until_temp(&src, &[&"-o", &out, &"--bmap", &bmap], &dir, kill);
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert_error_line(&stderr, &["interrupted"], "signal with --bmap");
    assert!(names(&dir).is_empty(), "left {:?}", names(&dir));

    // To stdout: the bmap would be written after the stream; a signal
    // while streaming leaves none.
    let mut child = Command::new(btrfsimg_bin())
        .arg("export")
        .arg(&src)
        .args(["-o", "-", "--bmap"])
        .arg(&bmap)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = read_all(child.stderr.take().unwrap());
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    stdout.read_exact(&mut buf).unwrap();
    kill(child.id());
    let drain = read_all(stdout);
    let st = wait_timeout(&mut child, Duration::from_secs(30));
    drain.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{st:?}: {stderr}");
    assert!(names(&dir).is_empty(), "left {:?}", names(&dir));

    // Someone else's bmap appears during the export.
    let (st, stderr) = export_until_temp(&src, &[&"-o", &out, &"--bmap", &bmap], &dir, |_| {
        fs::write(&bmap, b"someone else's").unwrap();
    });
    assert_eq!(st.code(), Some(1), "{st:?}: {stderr}");
    assert_error_line(
        &stderr,
        &[&bmap.display().to_string(), "already exists"],
        "bmap race",
    );
    assert_eq!(fs::read(&bmap).unwrap(), b"someone else's");
    assert_eq!(names(&dir), vec!["/fs.img.bmap".to_string()]);

    // Existing: kept without --force, replaced with it.
    fs::remove_file(src.join("big")).unwrap();
    let r = try_export(&src, &out, &["--bmap", bmap.to_str().unwrap()]);
    assert!(!r.success);
    assert_error_line(&r.stderr, &["already exists", "--force"], "existing bmap");
    assert_eq!(fs::read(&bmap).unwrap(), b"someone else's");
    assert!(!out.exists());
    export(&src, &out, &["--bmap", bmap.to_str().unwrap(), "--force"]);
    let text = fs::read_to_string(&bmap).unwrap();
    assert!(text.starts_with("<?xml") && text.contains("<bmap version=\"2.0\">"));
    let mut n = names(&dir);
    n.sort();
    assert_eq!(n, vec!["/fs.img".to_string(), "/fs.img.bmap".to_string()]);
}

// ---------------------------------------------------------------------------
// Sources that change after planning
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Change {
    /// Bytes appended.
    Append,
    /// Truncated to half.
    Truncate,
    /// Same size, other bytes, new mtime.
    Rewrite,
    /// Same size and mtime, other bytes (only ctime tells).
    RewriteKeepMtime,
    /// Only the mtime (touch -d).
    Touch,
    /// Only the ctime (chmod).
    Chmod,
    /// Replaced by a new file (rename over it) with the same size and mtime.
    Replace,
    /// Deleted.
    Delete,
    /// Replaced by a FIFO: opening it for reading would wait for a writer.
    Fifo,
    /// Replaced by a symlink to an identical copy elsewhere.
    Symlink,
}

const CHANGES: [Change; 10] = [
    Change::Append,
    Change::Truncate,
    Change::Rewrite,
    Change::RewriteKeepMtime,
    Change::Touch,
    Change::Chmod,
    Change::Replace,
    Change::Delete,
    Change::Fifo,
    Change::Symlink,
];

fn mtime_of(p: &Path) -> (i64, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec() as u32)
}

fn apply(change: Change, p: &Path) {
    // ctime and mtime have a coarse clock: let it tick past planning.
    std::thread::sleep(Duration::from_millis(30));
    let len = fs::metadata(p).unwrap().len();
    let (sec, nsec) = mtime_of(p);
    match change {
        Change::Append => {
            let f = OpenOptions::new().append(true).open(p).unwrap();
            f.write_all_at(b"more", len).unwrap();
        }
        Change::Truncate => OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len / 2)
            .unwrap(),
        Change::Rewrite | Change::RewriteKeepMtime => {
            let f = OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(&random_bytes(len as usize, 0xbad), 0)
                .unwrap();
            drop(f);
            if matches!(change, Change::RewriteKeepMtime) {
                set_times(p, sec, nsec).unwrap();
            }
        }
        Change::Touch => set_times(p, sec - 1000, nsec).unwrap(),
        Change::Chmod => chmod(p, 0o600),
        Change::Replace => {
            let tmp = p.with_extension("new");
            fs::write(&tmp, random_bytes(len as usize, 0xbad)).unwrap();
            set_times(&tmp, sec, nsec).unwrap();
            fs::rename(&tmp, p).unwrap();
        }
        Change::Delete => fs::remove_file(p).unwrap(),
        Change::Fifo => {
            let tmp = p.with_extension("fifo");
            let c = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid C string.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            fs::rename(&tmp, p).unwrap();
        }
        Change::Symlink => {
            let copy = p.with_extension("copy");
            fs::copy(p, &copy).unwrap();
            set_times(&copy, sec, nsec).unwrap();
            let tmp = p.with_extension("link");
            std::os::unix::fs::symlink(&copy, &tmp).unwrap();
            fs::rename(&tmp, p).unwrap();
        }
    }
}

/// Runs `f` on another thread and fails the test if it has not returned
/// within `secs` seconds: a hang is a failure, not a stuck test run.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: did not return within {secs} s (hung)"))
}

fn reason(change: Change) -> &'static str {
    match change {
        Change::Delete => "No such file or directory",
        _ => "changed after planning",
    }
}

/// A tree with a file in data extents, an inline file and bystanders.
fn changing_tree(root: &Path) {
    let mut t = TreeBuilder::new(root);
    t.random_file(b"dir/victim", 300 * KIB + 5, 1)
        .random_file(b"dir/tiny", 1000, 2)
        .random_file(b"other", 200 * KIB, 3)
        .random_file(b"small", 100, 4)
        .finalize();
}

fn opts() -> Options {
    Options {
        fsid: Some([7; 16]),
        timestamp: 1_700_000_000,
        ..Options::default()
    }
}

/// Export (the library's write_file, as the CLI does it) of a plan whose
/// source changed afterwards fails naming the file and leaves no file.
#[test]
fn export_of_a_changed_source_fails_naming_it() {
    for victim in ["dir/victim", "dir/tiny"] {
        for change in CHANGES {
            let what = format!("{change:?} of {victim}");
            let work = workdir("changed-export");
            let src = work.path().join("src");
            changing_tree(&src);
            let plan = plan_dir(&src, &opts()).unwrap();
            let path = src.join(victim);
            apply(change, &path);
            let out_dir = work.path().join("out");
            fs::create_dir(&out_dir).unwrap();
            let img = std::sync::Arc::new(Image::new(plan));
            let (i, o) = (img.clone(), out_dir.join("x.img"));
            let err = within(30, &what, move || {
                export::write_file(&i, &o, false, &Default::default())
            })
            .expect_err(&what)
            .to_string();
            assert!(
                err.contains(&path.display().to_string()) && err.contains(reason(change)),
                "{what}: error does not name the file and the reason: {err}"
            );
            assert!(!err.contains('\n'), "{what}: multi-line error: {err}");
            assert!(
                names(&out_dir).is_empty(),
                "{what}: left {:?}",
                names(&out_dir)
            );

            // The stream export fails the same way.
            let i = img.clone();
            let err = within(30, &what, move || {
                export::write_stream(&i, &mut Vec::new(), &Default::default())
            })
            .expect_err(&what)
            .to_string();
            assert!(err.contains(&path.display().to_string()), "{what}: {err}");
        }
    }
}

/// `read_at` of the changed file's data fails naming it, even when the file
/// was already open (served once before it changed); the superblock, the
/// system chunk and other files' data still read, and equal a clean export.
#[test]
fn read_at_of_a_changed_source_fails_only_for_its_data() {
    for change in CHANGES {
        let what = format!("{change:?}");
        let work = workdir("changed-read");
        let src = work.path().join("src");
        changing_tree(&src);
        let clean = {
            let img = Image::new(plan_dir(&src, &opts()).unwrap());
            let mut v = Vec::new();
            export::write_stream(&img, &mut v, &Default::default()).unwrap();
            v
        };
        let plan = plan_dir(&src, &opts()).unwrap();
        let victim = file_data_ranges(&plan, "/dir/victim");
        let other = file_data_ranges(&plan, "/other");
        let system_start = plan
            .chunks
            .iter()
            .find(|c| c.ty & BLOCK_GROUP_SYSTEM != 0)
            .expect("a system chunk")
            .logical;
        let system = plan
            .regions
            .iter()
            .find(|r| {
                r.kind
                    == RegionKind::Metadata {
                        logical: system_start,
                    }
            })
            .map(|r| (r.start, r.len))
            .expect("system chunk region");
        let img = std::sync::Arc::new(Image::new(plan));
        let read = |(off, len): (u64, u64)| {
            let img = img.clone();
            within(30, &what, move || {
                let mut buf = vec![0u8; len as usize];
                img.read_at(off, &mut buf).map(|n| {
                    assert_eq!(n, len as usize);
                    buf
                })
            })
        };
        let expect = |(off, len): (u64, u64)| clean[off as usize..(off + len) as usize].to_vec();

        // Served once before the change: the file is now open and cached.
        assert_eq!(read(victim[0]).unwrap(), expect(victim[0]), "{what}");
        apply(change, &src.join("dir/victim"));
        for &r in &victim {
            let msg = match read(r) {
                Ok(_) => panic!("{what}: changed data at {r:?} was served"),
                Err(e) => e.to_string(),
            };
            assert!(
                msg.contains(&src.join("dir/victim").display().to_string()),
                "{what}: {msg}"
            );
        }
        for r in [(0, 128 * KIB), system, other[0]] {
            assert_eq!(read(r).unwrap(), expect(r), "{what}: range {r:?}");
        }
        // Still refused on a second attempt (nothing was cached as good).
        assert!(read(victim[0]).is_err(), "{what}: served on retry");
    }
}

/// The plan is a snapshot: entries added to or removed from a directory after
/// planning do not matter, only the planned files' data is read again.
#[test]
fn directory_changes_after_planning_do_not_matter() {
    let work = workdir("dir-change");
    let src = work.path().join("src");
    changing_tree(&src);
    let before = {
        let img = Image::new(plan_dir(&src, &opts()).unwrap());
        let mut v = Vec::new();
        export::write_stream(&img, &mut v, &Default::default()).unwrap();
        v
    };
    let plan = plan_dir(&src, &opts()).unwrap();
    fs::write(src.join("dir/new"), b"new").unwrap();
    fs::create_dir(src.join("newdir")).unwrap();
    let img = Image::new(plan);
    let mut after = Vec::new();
    export::write_stream(&img, &mut after, &Default::default()).unwrap();
    assert!(after == before, "export after adding entries differs");
}

// ---------------------------------------------------------------------------
// Signals and closed pipes
// ---------------------------------------------------------------------------

fn wait_timeout(child: &mut std::process::Child, t: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("btrfsimg did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// SIGINT, SIGTERM or SIGHUP while the image is being written: the export stops,
/// removes its temporary file, prints one line and exits with 128 + the signal.
#[test]
fn signals_during_export_remove_the_temporary_file() {
    let work = big_workdir("signals");
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    allocated_file(&src.join("big"), 2 * GIB);
    fs::write(src.join("small"), b"small").unwrap();
    let out_dir = work.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("fs.img");
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let mut child = Command::new(btrfsimg_bin())
            .arg("export")
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = read_all(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        while names(&out_dir).is_empty() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "export ended before its temporary file was seen"
            );
            assert!(Instant::now() < deadline, "no temporary file appeared");
            std::thread::sleep(Duration::from_millis(1));
        }
        let tmp = names(&out_dir);
        assert!(
            tmp.len() == 1 && tmp[0].starts_with("/.fs.img.") && tmp[0].ends_with(".tmp"),
            "temporary file named like the output: {tmp:?}"
        );
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let st = wait_timeout(&mut child, Duration::from_secs(30));
        let stderr = stderr.join().unwrap();
        assert_eq!(
            st.code(),
            Some(128 + sig),
            "signal {sig}: {st:?}, stderr: {stderr}"
        );
        assert_error_line(
            &stderr,
            &[&out.display().to_string(), "interrupted"],
            "signal",
        );
        assert!(
            names(&out_dir).is_empty(),
            "signal {sig} left {:?}",
            names(&out_dir)
        );
    }

    // To stdout: the stream stops, same status.
    let mut child = Command::new(btrfsimg_bin())
        .arg("export")
        .arg(&src)
        .args(["-o", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = read_all(child.stderr.take().unwrap());
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    stdout.read_exact(&mut buf).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let drain = read_all(stdout);
    let st = wait_timeout(&mut child, Duration::from_secs(30));
    drain.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(st.code(), Some(130), "{st:?}: {stderr}");
    assert_error_line(&stderr, &["interrupted"], "SIGINT to stdout");
}

/// A signal while the inputs are still being read (here: a store-paths FIFO
/// nobody writes) ends the process at once with 128 + the signal; nothing is
/// written.
#[test]
fn signal_while_reading_inputs_ends_at_once() {
    let work = workdir("signal-inputs");
    let fifo = work.path().join("store-paths");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let out_dir = work.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = Command::new(btrfsimg_bin())
            .arg("export")
            .arg("--store-paths")
            .arg(&fifo)
            .arg("-o")
            .arg(out_dir.join("fs.img"))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until it blocks opening the FIFO (the kernel's wait_for_partner).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(format!("/proc/{}/wchan", child.id()))
            .unwrap_or_default()
            .contains("partner")
        {
            assert!(Instant::now() < deadline, "never blocked on the FIFO");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let st = wait_timeout(&mut child, Duration::from_secs(10));
        assert_eq!(
            st.code(),
            Some(128 + sig),
            "signal {sig}: {st:?} (signal {:?})",
            st.signal()
        );
        assert!(names(&out_dir).is_empty());
    }
}

/// `export -o - | head`: the reader going away ends the export quietly with
/// 141 (128 + SIGPIPE), as a process killed by SIGPIPE would; plain and zstd.
#[test]
fn closed_stdout_pipe_ends_quietly() {
    let work = workdir("pipe");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.random_file(b"big", 40 * MIB, 1).finalize();
    for extra in [&[][..], &["--zstd=1"][..]] {
        let mut child = Command::new(btrfsimg_bin())
            .arg("export")
            .arg(&src)
            .args(["-o", "-"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = read_all(child.stderr.take().unwrap());
        let mut stdout = child.stdout.take().unwrap();
        let mut buf = [0u8; 1000];
        stdout.read_exact(&mut buf).unwrap();
        drop(stdout);
        let st = wait_timeout(&mut child, Duration::from_secs(60));
        let stderr = stderr.join().unwrap();
        assert_eq!(st.code(), Some(141), "{extra:?}: {st:?}, stderr: {stderr}");
        assert_eq!(
            stderr, "",
            "{extra:?}: a closed pipe is not an error to report"
        );
    }
}

// ---------------------------------------------------------------------------
// Resource limits
// ---------------------------------------------------------------------------

/// 1,000 files of data under an open-file limit of 64: the export succeeds
/// and equals an unlimited one byte for byte (the fd cache shrinks to fit).
#[test]
fn more_files_than_the_open_file_limit() {
    let work = workdir("nofile");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    for i in 0..1000u64 {
        t.random_file(format!("d{}/f{i:04}", i % 7).as_bytes(), 2049 + i * 17, i);
    }
    t.finalize();
    let args = fixed_args("0b0d0a0e-0007-4000-8000-000000000002");
    let free = work.path().join("free.img");
    export(&src, &free, &args);
    for extra in [&[][..], &["--zstd=1", "--threads", "2"][..]] {
        let limited = work.path().join("limited.img");
        let _ = fs::remove_file(&limited);
        let mut cmd = Command::new(btrfsimg_bin());
        cmd.arg("export")
            .arg(&src)
            .arg("-o")
            .arg(&limited)
            .args(&args)
            .args(extra);
        limit_open_files(&mut cmd, 64);
        run_ok(&mut cmd);
        if extra.is_empty() {
            assert_files_identical(&free, &limited);
        } else {
            let raw = zstd::stream::decode_all(File::open(&limited).unwrap()).unwrap();
            assert!(raw == fs::read(&free).unwrap(), "zstd export differs");
        }
    }
}

/// Streaming a 2 GiB image takes no more memory than a 256 MiB one, up to
/// the checksums (4 bytes per 4 KiB sector, held once in the checksum table
/// and once in the cached csum leaves); both stay under 100 MiB, the bound the
/// caches allow (40 MiB of encoded blocks, two 4 MiB buffers, code and plan).
/// The peak is VmHWM, sampled while btrfsimg is blocked writing the image's
/// last bytes (every byte has been produced by then); wait4's ru_maxrss would
/// include this test process's memory, which the child inherits at fork.
#[test]
fn memory_stays_bounded_while_streaming() {
    let work = big_workdir("memory");
    let mut peaks = Vec::new();
    for (name, size) in [("small", 256 * MIB), ("large", 2 * GIB)] {
        let src = work.path().join(name);
        fs::create_dir(&src).unwrap();
        allocated_file(&src.join("data"), size);
        for i in 0..2000u64 {
            fs::write(src.join(format!("f{i:04}")), random_bytes(3000, i)).unwrap();
        }
        let total = plan_dir(&src, &Options::default()).unwrap().total_bytes;
        let mut child = Command::new(btrfsimg_bin())
            .arg("export")
            .arg(&src)
            .args(["-o", "-"])
            .env_remove("SOURCE_DATE_EPOCH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let status = format!("/proc/{}/status", child.id());
        let hwm = || -> Option<u64> {
            fs::read_to_string(&status)
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|k| k * KIB)
        };
        // btrfsimg cannot run more than a pipe buffer ahead of this reader:
        // sampling after every read sees the peak up to the last few chunks.
        let mut stdout = child.stdout.take().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let (mut got, mut peak) = (0u64, 0u64);
        loop {
            let n = stdout.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n as u64;
            peak = peak.max(hwm().unwrap_or(0));
        }
        assert_eq!(got, total, "{name}: image size");
        assert!(child.wait().unwrap().success(), "{name}");
        eprintln!("{name} ({size} bytes of data): peak RSS {} KiB", peak / KIB);
        peaks.push((size, peak));
    }
    let ((s0, p0), (s1, p1)) = (peaks[0], peaks[1]);
    assert!(
        p1 < 100 * MIB,
        "peak RSS {p1} bytes streaming a 2 GiB image"
    );
    let allowed = 2 * (s1 - s0) / 1024 + 8 * MIB;
    assert!(
        p1 <= p0 + allowed,
        "peak RSS grew from {p0} to {p1} bytes for {} more bytes of data",
        s1 - s0
    );
}

/// ROOT, overlays and the output given as relative paths (the README's
/// `btrfsimg export ROOTDIR -o fs.img` run from the parent directory) give the
/// same image as absolute paths; so does "." as ROOT.
#[test]
fn relative_paths_work() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    fs::create_dir_all(dir.join("root/sub")).unwrap();
    fs::write(dir.join("root/sub/f"), b"relative").unwrap();
    fs::create_dir_all(dir.join("extra/etc")).unwrap();
    fs::write(dir.join("extra/etc/motd"), b"hi").unwrap();
    let args = [
        "-U",
        "0b0d0a0e-0007-4000-8000-000000000099",
        "--timestamp",
        "5",
    ];
    let run = |cwd: &Path, root: &str, files: &str, out: &str| {
        let o = Command::new(btrfsimg_bin())
            .current_dir(cwd)
            .args(["export", "-q", root, "--files", files, "-o", out])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "export {root} from {}: {}",
            cwd.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let abs = dir.join("abs.img");
    run(
        Path::new("/"),
        dir.join("root").to_str().unwrap(),
        dir.join("extra").to_str().unwrap(),
        abs.to_str().unwrap(),
    );
    run(dir, "root", "extra", "rel.img");
    run(&dir.join("root"), ".", "../extra", "../dot.img");
    let a = fs::read(&abs).unwrap();
    assert!(
        a == fs::read(dir.join("rel.img")).unwrap(),
        "relative ROOT differs"
    );
    assert!(
        a == fs::read(dir.join("dot.img")).unwrap(),
        "ROOT '.' differs"
    );
}

/// A missing tool makes a test skip loudly, or fail when the system tests are
/// required, naming the package to install; it never fails obscurely later.
#[test]
fn missing_tools_skip_or_fail_by_name() {
    assert!(tools_available_as(false, "probe", &["sh"]));
    assert!(!tools_available_as(
        false,
        "(a self-test of the skip message; no test is skipped)",
        &["sh", "qemu-img-that-does-not-exist"]
    ));
    let r = std::panic::catch_unwind(|| {
        tools_available_as(true, "probe", &["qemu-img-that-does-not-exist"])
    });
    let msg = r
        .err()
        .and_then(|e| e.downcast_ref::<String>().cloned())
        .expect("required and missing: a failure");
    assert!(msg.contains("qemu-img-that-does-not-exist"), "{msg}");
    assert_eq!(package_of("qemu-img"), "qemu-utils");
}

/// The largest --size is accepted and either exported at once (sparse: the
/// export jumps over unallocated space) or refused by the output's
/// filesystem (ext4: EFBIG) in one line; no walk over 8 EiB of zeros.
#[test]
fn largest_size_exports_or_fails_at_once() {
    let work = workdir("largest-size");
    let src = work.path().join("src");
    TreeBuilder::new(&src).file(b"f", b"data").finalize();
    let out = work.path().join("x.img");
    let child = Command::new(btrfsimg_bin())
        .args(["export", "-q", "--size", "9223372036854775807"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let st = wait_timeout(&mut child, Duration::from_secs(60));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    if st.success() {
        assert_eq!(
            fs::metadata(&out).unwrap().len(),
            i64::MAX as u64 / 4096 * 4096
        );
    } else {
        assert_eq!(st.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("File too large"), "{err}");
        assert_eq!(names(work.path()), ["/src"], "nothing left behind");
    }
}

/// The default UUID covers everything the plan knows: two trees that differ
/// only in one xattr value, or only in where a file's holes are, get
/// different UUIDs (kernels before 6.7 would take two devices with one fsid
/// for one filesystem). Identical trees still get the same one.
#[test]
fn default_uuid_covers_xattrs_and_holes() {
    let work = workdir("uuid");
    let uuid_of = |dir: &Path| {
        let out = run_stdout(Command::new(btrfsimg_bin()).arg("plan").arg(dir));
        out.lines()
            .find_map(|l| l.strip_prefix("uuid: "))
            .expect("plan prints the uuid")
            .to_string()
    };
    let make = |name: &str, xattr: &[u8], sparse: bool| {
        let dir = work.path().join(name);
        let mut t = TreeBuilder::new(&dir);
        t.file(b"f", b"same bytes");
        t.finalize();
        set_xattr(&dir.join("f"), b"user.note", xattr).unwrap();
        let z = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dir.join("zeros"))
            .unwrap();
        if sparse {
            z.set_len(1 << 20).unwrap();
        } else {
            z.write_all_at(&vec![0u8; 1 << 20], 0).unwrap();
        }
        set_times(&dir.join("zeros"), 1_000_000, 0).unwrap();
        set_times(&dir, 1_000_000, 0).unwrap();
        dir
    };
    let a = make("a", b"one", false);
    let b = make("b", b"two", false);
    let c = make("c", b"one", true);
    let a2 = make("a2", b"one", false);
    let (ua, ub, uc, ua2) = (uuid_of(&a), uuid_of(&b), uuid_of(&c), uuid_of(&a2));
    assert_ne!(ua, ub, "xattr value");
    assert_ne!(ua, uc, "hole layout");
    assert_eq!(ua, ua2, "same tree, same uuid");
}

/// `--compress` (in the filesystem) and `--zstd` (of the image) at once: the
/// zstd stream decodes to exactly the `--compress` image written to a file
/// (which the content pass writes itself), whatever the thread count.
#[test]
fn compress_and_zstd_together() {
    let work = workdir("compress-zstd");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.file(
        b"text",
        &b"compressible text compressible text\n".repeat(20_000),
    )
    .random_file(b"random", 300 * KIB, 5)
    .file(b"small", &b"inline ".repeat(100))
    .finalize();
    let args = [
        "-q",
        "--compress",
        "zstd",
        "-U",
        "0b0d0a0e-0e00-4000-8000-000000000001",
    ];
    let plain = work.path().join("plain.img");
    run_ok(
        Command::new(btrfsimg_bin())
            .arg("export")
            .args(args)
            .arg(&src)
            .arg("-o")
            .arg(&plain),
    );
    for threads in ["1", "2"] {
        let zst = work.path().join(format!("img-{threads}.zst"));
        run_ok(
            Command::new(btrfsimg_bin())
                .arg("export")
                .args(args)
                .args(["--zstd", "--threads", threads])
                .arg(&src)
                .arg("-o")
                .arg(&zst),
        );
        let decoded = zstd::stream::decode_all(fs::File::open(&zst).unwrap()).unwrap();
        assert!(decoded == fs::read(&plain).unwrap(), "threads {threads}");
    }
    // One pool makes both: the compressed bytes do not depend on it, and the
    // image (over 8 MiB) is several independent frames.
    let (one, two) = (
        fs::read(work.path().join("img-1.zst")).unwrap(),
        fs::read(work.path().join("img-2.zst")).unwrap(),
    );
    assert!(one == two, "--zstd bytes differ between 1 and 2 threads");
    let mut frames = 0;
    let mut rest = &one[..];
    while !rest.is_empty() {
        let n = zstd::zstd_safe::find_frame_compressed_size(rest).expect("a zstd frame");
        rest = &rest[n..];
        frames += 1;
    }
    assert!(frames > 1, "{frames} frame(s)");
}

/// The positions (`{bytes}` before `/{total_bytes}`) a bar drew on a
/// terminal, from the lines of `drawn` that `pick` selects.
fn bar_positions(drawn: &str, pick: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for line in drawn
        .split(['\r', '\n'])
        .filter(|l| l.contains(" ETA ") && pick(l))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in words.windows(2) {
            if let Some((unit, total)) = w[1].split_once('/') {
                if total.starts_with(|c: char| c.is_ascii_digit()) {
                    let pos = format!("{} {unit}", w[0]);
                    if seen.last() != Some(&pos) {
                        seen.push(pos);
                    }
                }
            }
        }
    }
    seen
}

/// Progress tells the truth while compressing: in a terminal, the content
/// pass of `--compress` and a `--zstd=19` export each draw their bar at many
/// positions on the way (bytes done, counted as the encoders take them), not
/// only at the start and at the end.
#[test]
fn progress_moves_while_compressing() {
    let work = workdir("progress");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    for i in 0..4u64 {
        t.random_file(format!("random-{i}").as_bytes(), 8 * MIB, 40 + i);
    }
    t.file(b"text", &b"progress tells the truth\n".repeat(400_000))
        .finalize();
    let out = work.path().join("img.zst");
    let mut cmd = Command::new(btrfsimg_bin());
    cmd.args([
        "export",
        "--compress",
        "zstd:15",
        "--zstd=19",
        "--threads",
        "2",
    ])
    .arg(&src)
    .arg("-o")
    .arg(&out);
    let (status, drawn) = run_on_terminal(cmd);
    assert!(status.success(), "{status:?}: {drawn}");
    let pass = bar_positions(&drawn, |l| l.contains("compressing "));
    let export = bar_positions(&drawn, |l| !l.contains("compressing "));
    for (what, seen) in [("content pass", &pass), ("--zstd=19 export", &export)] {
        assert!(
            seen.len() >= 4,
            "the {what} bar drew only {seen:?}; everything drawn: {drawn:?}"
        );
    }
    let decoded = zstd::stream::decode_all(File::open(&out).unwrap()).unwrap();
    assert!(decoded.len() > 40 << 20, "{}", decoded.len());
}

/// `btrfsimg plan … | head` where the reader is gone before the summary is
/// written: no panic, no error message, exit 0.
#[test]
fn plan_to_a_closed_pipe_is_quiet() {
    let work = workdir("plan-pipe");
    let src = work.path().join("src");
    TreeBuilder::new(&src).file(b"a", b"a").finalize();
    let mut child = Command::new(btrfsimg_bin())
        .arg("plan")
        .arg(&src)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.is_empty(),
        "{:?}: {err}",
        o.status
    );
}

//! Nix parity: images of a real closure (built offline with Debian's nix-bin
//! in a chroot store), proven with btrfs-progs, the kernel and Nix itself;
//! the closure options' errors; and the Nix expressions in nix/.
//! Needs what the other system tests need plus nix-bin and zstd
//! (see tests/common/mod.rs and tests/common/nix.rs).

mod common;

use common::nix::*;
use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const TS: &str = "1700000000";

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The store-path name part after `/nix/store/`.
fn base(store_path: &str) -> &str {
    store_path.rsplit('/').next().unwrap()
}

fn closure_args(c: &TestClosure) -> Vec<String> {
    vec![
        "--closure-info".into(),
        s(&c.info.dir).into(),
        "--store-root".into(),
        s(&c.store.root).into(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// An overlay for the image root whose every entry belongs to 1000:1000, so
/// that `--owner 0:0` is visible. It also reaches into /nix (merging with the
/// directories the closure creates).
fn overlay(dir: &Path, payload: &str) -> TreeBuilder {
    let mut t = TreeBuilder::new(dir);
    t.file(b"etc/motd", b"welcome to the image\n")
        .file(b"etc/secret", b"0600 file\n")
        .chmod(b"etc/secret", 0o600)
        .symlink(b"etc/payload", payload.as_bytes())
        .file(
            b"boot/extlinux/extlinux.conf",
            b"DEFAULT nixos\nLABEL nixos\n",
        )
        .random_file(b"boot/kernel", 64 * KIB, 7)
        .dir(b"nix/var/nix/profiles");
    for rel in [
        &b""[..],
        b"etc",
        b"etc/motd",
        b"etc/secret",
        b"etc/payload",
        b"boot",
        b"boot/extlinux",
        b"boot/extlinux/extlinux.conf",
        b"boot/kernel",
        b"nix",
        b"nix/var",
        b"nix/var/nix",
        b"nix/var/nix/profiles",
    ] {
        t.chown(rel, 1000, 1000);
    }
    t.finalize();
    t
}

fn assert_dir_meta(p: &Path, mode: u32, mtime: i64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    assert!(m.is_dir(), "{} is not a directory", p.display());
    assert_eq!(m.mode() & 0o7777, mode, "mode of {}", p.display());
    assert_eq!((m.uid(), m.gid()), (0, 0), "owner of {}", p.display());
    assert_eq!(m.mtime(), mtime, "mtime of {}", p.display());
}

fn sorted_names(p: &Path) -> Vec<String> {
    dir_names(p)
        .into_iter()
        .map(|n| String::from_utf8(n).unwrap())
        .collect()
}

/// Every store path of the closure in MNT has the NAR hash and NAR size its
/// registration line gives, and the same tree as in the chroot store.
fn assert_store_matches_registration(mnt: &Path, c: &TestClosure) {
    for r in &c.info.registration {
        let p = mnt.join(r.path.trim_start_matches('/'));
        let want = r
            .nar_hash
            .strip_prefix("sha256:")
            .expect("closureInfo hashes are sha256:BASE32");
        assert_eq!(
            nar_hash_base32(&p),
            want,
            "NAR hash of {} in the image",
            r.path
        );
        assert_eq!(
            nar_size(&p),
            r.nar_size,
            "NAR size of {} in the image",
            r.path
        );
        compare_trees(&c.store.host_path(&r.path), &p, CompareOpts::default());
    }
}

/// Copies the store paths out of the mounted image into a fresh chroot
/// store, loads the image's registration and has Nix check every path's
/// contents; then corrupts one copied file and expects Nix to notice.
fn round_trip(mnt: &Path, work: &Path, c: &TestClosure, registration: &Path) {
    let fresh = ChrootStore::new(&work.join("roundtrip"));
    let dest = fresh.root.join("nix/store");
    fs::create_dir_all(&dest).unwrap();
    for p in &c.info.store_paths {
        let mut cp = Command::new(tool("cp"));
        cp.arg("-a")
            .arg(mnt.join(p.trim_start_matches('/')))
            .arg(&dest);
        run_ok(&mut cp);
    }
    fresh.load_db(registration);
    fresh.assert_valid(&c.info.store_paths);
    assert_eq!(
        fresh.closure(std::slice::from_ref(&c.root)),
        c.info.store_paths,
        "references of {} after --load-db",
        c.root
    );
    let o = fresh.verify_contents();
    let text = output_text(&o);
    assert!(
        o.status.success() && !text.contains("modified") && !text.contains("error"),
        "nix-store --verify --check-contents on the copied store failed ({}):\n{text}",
        o.status
    );

    // Negative control: the check does look at the contents.
    let victim = fresh.host_path(&c.payload).join("lib/edge-2049");
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(&victim).unwrap();
    bytes[100] ^= 1;
    fs::write(&victim, bytes).unwrap();
    let o = fresh.verify_contents();
    let text = output_text(&o);
    assert!(
        !o.status.success() && text.contains(&c.payload),
        "nix-store --verify --check-contents missed a corrupted file ({}):\n{text}",
        o.status
    );
}

/// The issue's proof: a closure with overlay files, label, UUID and
/// `--owner 0:0`, checked by btrfs-progs, the kernel and Nix.
#[test]
fn nix_closure_image() {
    let what = "nix_closure_image";
    if !nix_available(what) {
        return;
    }
    let work = workdir("nix-closure");
    let c = realistic_closure(work.path());
    let files = overlay(&work.path().join("files"), &c.payload);
    let img = work.path().join("fs.img");
    let uuid = "0d9c3a1e-5b7f-4c2a-9e8d-1f2a3b4c5d6e";
    let mut args = closure_args(&c);
    args.extend(
        [
            "--files",
            s(files.root()),
            "-L",
            "NIXOS_SD",
            "-U",
            uuid,
            "--owner",
            "0:0",
            "--timestamp",
            TS,
        ]
        .map(String::from),
    );
    export_sources(None, &img, &strs(&args));

    btrfs_check(&img);
    let sup = dump_super(&img);
    assert_eq!(
        super_field(&sup, "label").as_deref(),
        Some("NIXOS_SD"),
        "{sup}"
    );
    assert_eq!(super_field(&sup, "fsid").as_deref(), Some(uuid), "{sup}");

    let m = LoopMount::new(&img, false);
    let mnt = m.path();
    assert_eq!(
        sorted_names(mnt),
        ["boot", "etc", "nix", "nix-path-registration"]
    );
    let want_store: Vec<&str> = c.info.store_paths.iter().map(|p| base(p)).collect();
    assert_eq!(sorted_names(&mnt.join("nix/store")), want_store);
    let ts: i64 = TS.parse().unwrap();
    assert_dir_meta(&mnt.join("nix"), 0o755, ts);
    assert_dir_meta(&mnt.join("nix/store"), 0o755, ts);
    assert_store_matches_registration(mnt, &c);
    assert_eq!(
        fs::read(mnt.join("nix-path-registration")).unwrap(),
        fs::read(c.info.registration_path()).unwrap(),
        "/nix-path-registration differs from the closure's registration"
    );
    for rel in [
        "etc/motd",
        "etc/secret",
        "boot/extlinux/extlinux.conf",
        "boot/kernel",
    ] {
        let (src, got) = (files.root().join(rel), mnt.join(rel));
        assert_eq!(fs::read(&got).unwrap(), fs::read(&src).unwrap(), "{rel}");
        assert_eq!(
            fs::metadata(&got).unwrap().mode(),
            fs::metadata(&src).unwrap().mode(),
            "mode of {rel}"
        );
    }
    assert_eq!(
        fs::read_link(mnt.join("etc/payload")).unwrap(),
        PathBuf::from(&c.payload)
    );
    assert!(mnt.join("nix/var/nix/profiles").is_dir());
    let not_root = entries_not_owned_by(mnt, 0, 0);
    assert!(not_root.is_empty(), "inodes not owned by 0:0: {not_root:?}");

    round_trip(mnt, work.path(), &c, &mnt.join("nix-path-registration"));
    m.unmount();
}

/// `--zstd` decompresses to the uncompressed export, whatever the thread
/// count; the default UUID is reproducible and follows the content; `-U`
/// sets the fsid.
#[test]
fn nix_zstd_and_uuid() {
    let what = "nix_zstd_and_uuid";
    if !nix_available(what) || !tool_available(what, "zstd", "zstd") {
        return;
    }
    let work = workdir("nix-zstd");
    let c = realistic_closure(work.path());
    let dir = work.path();
    let mut args = closure_args(&c);
    args.extend(["--timestamp", TS, "-L", "nix-store"].map(String::from));
    let args = strs(&args);

    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    export_sources(None, &a, &args);
    export_sources(None, &b, &args);
    assert_files_identical(&a, &b);
    btrfs_check(&a);
    let fsid = super_field(&dump_super(&a), "fsid").expect("fsid");
    assert_eq!(
        super_field(&dump_super(&b), "fsid").as_deref(),
        Some(fsid.as_str())
    );
    assert_ne!(fsid, "00000000-0000-0000-0000-000000000000");

    // Other content, other default UUID.
    let extra = TreeBuilder::new(&dir.join("extra"))
        .file(b"etc/hostname", b"other\n")
        .finalize()
        .root()
        .to_path_buf();
    let other = dir.join("other.img");
    let mut more = args.clone();
    more.extend(["--files", s(&extra)]);
    export_sources(None, &other, &more);
    let other_fsid = super_field(&dump_super(&other), "fsid").unwrap();
    assert_ne!(other_fsid, fsid, "different content, same default UUID");

    // -U sets the fsid, and it is the only thing that changes.
    let uuid = "12345678-9abc-4def-8123-456789abcdef";
    let u = dir.join("u.img");
    let mut with_u = args.clone();
    with_u.extend(["-U", uuid]);
    export_sources(None, &u, &with_u);
    assert_eq!(super_field(&dump_super(&u), "fsid").as_deref(), Some(uuid));
    btrfs_check(&u);

    // zstd: thread count does not change the compressed bytes, and the
    // zstd tool restores the uncompressed export exactly.
    let (z1, z2) = (dir.join("fs1.img.zst"), dir.join("fs2.img.zst"));
    let mut zargs = args.clone();
    zargs.extend(["--zstd", "--threads", "1"]);
    export_sources(None, &z1, &zargs);
    let mut zargs = args.clone();
    zargs.extend(["--zstd=19", "--threads", "2"]);
    let z19 = dir.join("fs19.img.zst");
    export_sources(None, &z19, &zargs);
    let mut zargs = args.clone();
    zargs.extend(["--zstd", "--threads", "2"]);
    export_sources(None, &z2, &zargs);
    assert_files_identical(&z1, &z2);
    assert!(
        fs::metadata(&z1).unwrap().len() < fs::metadata(&a).unwrap().len() / 4,
        "zstd output is not compressed"
    );
    for (z, name) in [(&z1, "d1.img"), (&z19, "d19.img")] {
        let d = dir.join(name);
        zstd_decompress(z, &d);
        assert_files_identical(&d, &a);
    }
}

/// `--store-paths` + `--registration` give the image `--closure-info` gives;
/// `--registration-path` moves the registration.
#[test]
fn nix_input_forms() {
    let what = "nix_input_forms";
    if !nix_available(what) {
        return;
    }
    let work = workdir("nix-forms");
    let c = realistic_closure(work.path());
    let dir = work.path();
    let common = ["--store-root", s(&c.store.root), "--timestamp", TS];

    let a = dir.join("info.img");
    let mut args = vec!["--closure-info", s(&c.info.dir)];
    args.extend(common);
    export_sources(None, &a, &args);

    let b = dir.join("files.img");
    let (sp, reg) = (c.info.store_paths_path(), c.info.registration_path());
    let mut args = vec!["--store-paths", s(&sp), "--registration", s(&reg)];
    args.extend(common);
    export_sources(None, &b, &args);
    assert_files_identical(&a, &b);

    let r = dir.join("regpath.img");
    let mut args = vec![
        "--closure-info",
        s(&c.info.dir),
        "--registration-path",
        "/nix/nix-path-registration",
    ];
    args.extend(common);
    export_sources(None, &r, &args);
    btrfs_check(&r);
    let m = LoopMount::new(&r, false);
    assert_eq!(sorted_names(m.path()), ["nix"]);
    let mut want: Vec<&str> = vec!["nix-path-registration", "store"];
    want.sort();
    assert_eq!(sorted_names(&m.path().join("nix")), want);
    assert_eq!(
        fs::read(m.path().join("nix/nix-path-registration")).unwrap(),
        fs::read(&reg).unwrap()
    );
    assert_dir_meta(&m.path().join("nix"), 0o755, TS.parse().unwrap());
    assert_store_matches_registration(m.path(), &c);
    m.unmount();
}

/// Every closure or overlay mistake is one line naming what is wrong, and
/// no image (or temporary file) is left.
#[test]
fn nix_errors() {
    let what = "nix_errors";
    if !nix_available(what) {
        return;
    }
    let work = workdir("nix-errors");
    let c = realistic_closure(work.path());
    let dir = work.path();
    let out = dir.join("out").join("fs.img");
    fs::create_dir(out.parent().unwrap()).unwrap();
    let base_args = closure_args(&c);
    let with = |more: &[&str]| -> Vec<String> {
        let mut v = base_args.clone();
        v.extend(more.iter().map(|x| x.to_string()));
        v
    };

    // Label: 255 bytes are fine, 256 are not.
    let l255 = "x".repeat(255);
    let ok = dir.join("label255.img");
    export_sources(None, &ok, &strs(&with(&["-L", &l255])));
    assert_eq!(super_field(&dump_super(&ok), "label"), Some(l255));
    let e = export_sources_fails(None, &out, &strs(&with(&["-L", &"x".repeat(256)])));
    assert!(e.contains("label") && e.contains("255"), "{e}");

    // Two overlays with the same file.
    let o1 = TreeBuilder::new(&dir.join("o1"))
        .file(b"etc/motd", b"one\n")
        .root()
        .to_path_buf();
    let o2 = TreeBuilder::new(&dir.join("o2"))
        .file(b"etc/motd", b"two\n")
        .file(b"nix-path-registration", b"not the registration\n")
        .root()
        .to_path_buf();
    let e = export_sources_fails(None, &out, &["--files", s(&o1), "--files", s(&o2)]);
    for want in [
        "/etc/motd",
        s(&o1.join("etc/motd")),
        s(&o2.join("etc/motd")),
    ] {
        assert!(e.contains(want), "error does not name {want}: {e}");
    }

    // An overlay file where the registration goes.
    let e = export_sources_fails(None, &out, &strs(&with(&["--files", s(&o2)])));
    let reg = c.info.registration_path();
    for want in [s(&reg), s(&o2.join("nix-path-registration"))] {
        assert!(e.contains(want), "error does not name {want}: {e}");
    }

    // An overlay file where a store path goes.
    let greeting = c
        .info
        .store_paths
        .iter()
        .find(|p| p.ends_with("-greeting"))
        .unwrap()
        .clone();
    let o3 = TreeBuilder::new(&dir.join("o3"))
        .file(&greeting.as_bytes()[1..], b"impostor\n")
        .root()
        .to_path_buf();
    let e = export_sources_fails(None, &out, &strs(&with(&["--files", s(&o3)])));
    let host = c.store.host_path(&greeting);
    for want in [s(&host), s(&o3.join(&greeting[1..]))] {
        assert!(e.contains(want), "error does not name {want}: {e}");
    }

    // An overlay may not add to a store path directory: the store path would
    // no longer match its registered NAR hash.
    let dir_path = c
        .info
        .store_paths
        .iter()
        .find(|p| c.store.host_path(p).is_dir())
        .unwrap()
        .clone();
    let mut extra = dir_path.as_bytes()[1..].to_vec();
    extra.extend_from_slice(b"/extra");
    let o5 = TreeBuilder::new(&dir.join("o5"))
        .file(&extra, b"smuggled\n")
        .root()
        .to_path_buf();
    let e = export_sources_fails(None, &out, &strs(&with(&["--files", s(&o5)])));
    let host = c.store.host_path(&dir_path);
    for want in [s(&host), s(&o5.join(&dir_path[1..]))] {
        assert!(e.contains(want), "error does not name {want}: {e}");
    }

    // A file in one overlay where another has a directory.
    let o4 = TreeBuilder::new(&dir.join("o4"))
        .file(b"etc", b"a file\n")
        .root()
        .to_path_buf();
    let e = export_sources_fails(None, &out, &["--files", s(&o1), "--files", s(&o4)]);
    for want in [s(&o1.join("etc")), s(&o4.join("etc"))] {
        assert!(e.contains(want), "error does not name {want}: {e}");
    }

    // Store paths that are missing, or not store paths at all.
    let missing = "/nix/store/00000000000000000000000000000000-missing";
    for bad in [missing, "/etc/passwd", "/nix/store/x/y", "nix/store/rel"] {
        let list = dir.join("bad-store-paths");
        let mut text = c.info.store_paths.join("\n");
        text.push_str(&format!("\n{bad}\n"));
        fs::write(&list, text).unwrap();
        let e = export_sources_fails(
            None,
            &out,
            &["--store-paths", s(&list), "--store-root", s(&c.store.root)],
        );
        assert!(e.contains(bad), "error does not name {bad}: {e}");
    }

    // The store paths are not where they are looked for (no --store-root).
    let e = export_sources_fails(None, &out, &["--closure-info", s(&c.info.dir)]);
    assert!(
        c.info.store_paths.iter().any(|p| e.contains(p.as_str())),
        "error names no store path: {e}"
    );

    // A closure-info directory without its registration.
    let partial = dir.join("partial-info");
    fs::create_dir(&partial).unwrap();
    fs::copy(c.info.store_paths_path(), partial.join("store-paths")).unwrap();
    let e = export_sources_fails(
        None,
        &out,
        &[
            "--closure-info",
            s(&partial),
            "--store-root",
            s(&c.store.root),
        ],
    );
    assert!(e.contains(s(&partial.join("registration"))), "{e}");
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `nix-instantiate --eval --strict --json -E EXPR` offline, as text.
fn nix_eval_json(store: &ChrootStore, expr: &str) -> String {
    let mut c = store.cmd("nix-instantiate");
    c.args([
        "--eval",
        "--strict",
        "--json",
        "--option",
        "substituters",
        "",
    ])
    .arg("-E")
    .arg(expr);
    run_stdout(&mut c).trim().to_string()
}

/// Both expressions parse; make-btrfs-fs.nix takes nixpkgs' arguments with
/// nixpkgs' defaults; package.nix describes this crate (evaluated against a
/// stand-in for the few nixpkgs functions it uses).
#[test]
fn nix_expressions_evaluate() {
    let what = "nix_expressions_evaluate";
    if !tool_available(what, "nix-instantiate", "nix-bin") {
        return;
    }
    let repo = repo();
    // A throwaway store, so that no system store or daemon is needed.
    let work = workdir("nix-eval");
    let store = ChrootStore::new(&work.path().join("store"));
    for f in [
        "nix/make-btrfs-fs.nix",
        "nix/package.nix",
        "nix/creators/subvolumes.nix",
        "nix/creators/nix-only.nix",
        "flake.nix",
    ] {
        let mut c = store.cmd("nix-instantiate");
        c.arg("--parse").arg(repo.join(f));
        run_stdout(&mut c);
    }

    // nixpkgs' make-btrfs-fs.nix: { pkgs, lib, storePaths, compressImage ?
    // false, zstd, populateImageCommands ? "", volumeLabel, uuid ? "4444...",
    // btrfs-progs, libfaketime, fakeroot }. Ours takes the same names with
    // the same optionality, plus optional extras, and `...` for the two
    // tools it no longer needs.
    let file = repo.join("nix/make-btrfs-fs.nix");
    let args = nix_eval_json(
        &store,
        &format!("builtins.functionArgs (import {})", file.display()),
    );
    let expected = r#"{"baseLayout":true,"btrfs-progs":false,"btrfsimg":true,"checkImage":true,"compressImage":true,"compression":true,"csum":true,"lib":false,"mountpoint":true,"nixPathRegistrationFile":true,"pkgs":false,"populateImageCommands":true,"storePaths":false,"subvolumes":true,"uuid":true,"volumeLabel":false,"zstd":false}"#;
    assert_eq!(args, expected, "argument set of make-btrfs-fs.nix");

    let lib_stub = r#"{
      optionalString = c: s: if c then s else "";
      concatMapStringsSep = sep: f: l: builtins.concatStringsSep sep (map f l);
      optional = c: x: if c then [ x ] else [ ];
      escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
      importTOML = p: builtins.fromTOML (builtins.readFile p);
      cleanSource = src: src;
      cleanSourceWith = { src, filter, name ? "source" }: { inherit src filter name; };
      licenses = { mit = "MIT"; asl20 = "Apache-2.0"; };
      platforms.linux = [ "x86_64-linux" ];
    }"#;
    // The derivation attributes make-btrfs-fs.nix asks stdenv for, with
    // defaults for everything (uuid, compressImage, populateImageCommands)
    // and libfaketime/fakeroot passed as nixpkgs' callers do.
    let mk_for = |file: &Path, extra: &str| {
        format!(
            r#"let
              lib = {lib_stub};
              pkgs = {{
                stdenv.mkDerivation = a: a;
                buildPackages.closureInfo = {{ rootPaths }}: "/nix/store/closure-info";
              }};
              d = import {file} ({{
                inherit pkgs lib;
                storePaths = [ "/nix/store/root" ];
                zstd = "/nix/store/zstd"; btrfs-progs = "/nix/store/btrfs-progs";
                btrfsimg = "/nix/store/btrfsimg";
                volumeLabel = "NIXOS SD";
                libfaketime = null; fakeroot = null;
              }} // {extra});
            in {{ inherit (d) name outputs nativeBuildInputs buildCommand; }}"#,
            file = file.display()
        )
    };
    let mk = |extra: &str| mk_for(&file, extra);
    let plain = nix_eval_json(&store, &mk("{ }"));
    assert!(plain.starts_with(r#"{"buildCommand":"#), "{plain}");
    for want in [
        r#""name":"btrfs-fs.img""#,
        r#""nativeBuildInputs":["/nix/store/btrfsimg","/nix/store/btrfs-progs"]"#,
        "btrfsimg export",
        "--closure-info /nix/store/closure-info",
        "--files ./files",
        "--owner 0:0",
        "--timestamp 1",
        "--label 'NIXOS SD'",
        "--uuid '44444444-4444-4444-8888-888888888888'",
        "-o \\\"$out\\\"",
        "btrfs check --readonly \\\"$out\\\"",
        "--write-layout \\\"$layout\\\"",
        r#""outputs":["out","layout"]"#,
    ] {
        assert!(
            plain.contains(want),
            "uncompressed build lacks {want}: {plain}"
        );
    }
    assert!(!plain.contains("--zstd"), "{plain}");
    assert!(!plain.contains("--base-layout"), "{plain}");
    let update = nix_eval_json(&store, &mk(r#"{ baseLayout = "/nix/store/old-layout"; }"#));
    assert!(
        update.contains("--base-layout '/nix/store/old-layout'"),
        "baseLayout lacks --base-layout: {update}"
    );
    let zst = nix_eval_json(&store, &mk(r#"{ compressImage = true; uuid = "1-2"; }"#));
    for want in [
        r#""name":"btrfs-fs.img.zst""#,
        r#""nativeBuildInputs":["/nix/store/btrfsimg","/nix/store/btrfs-progs","/nix/store/zstd"]"#,
        "--zstd",
        "--threads",
        "--uuid '1-2'",
    ] {
        assert!(zst.contains(want), "compressed build lacks {want}: {zst}");
    }
    assert!(!zst.contains("--compress"), "{zst}");
    let fs = nix_eval_json(&store, &mk(r#"{ compression = "zlib:9"; }"#));
    assert!(
        fs.contains("--compress 'zlib:9'"),
        "compression lacks --compress: {fs}"
    );
    assert!(!fs.contains("--zstd"), "{fs}");
    for absent in ["--subvol", "--mountpoint", "--registration-path", "--csum"] {
        assert!(
            !plain.contains(absent),
            "{absent} without its argument: {plain}"
        );
    }
    let layout = nix_eval_json(
        &store,
        &mk(
            r#"{ subvolumes = [ "default:@=/" "@nix=/nix" ]; mountpoint = "/"; nixPathRegistrationFile = "/nix/nix-path-registration"; csum = "xxhash"; }"#,
        ),
    );
    for want in [
        "--subvol 'default:@=/' --subvol '@nix=/nix'",
        "--mountpoint '/'",
        "--registration-path '/nix/nix-path-registration'",
        "--csum 'xxhash'",
    ] {
        assert!(layout.contains(want), "layout lacks {want}: {layout}");
    }

    // The creators for sdImage.rootFilesystemCreator: callPackage hands them
    // pkgs, lib and the tools (their formals), and they add the layout.
    for (creator, wants) in [
        (
            "nix/creators/subvolumes.nix",
            &[
                "--subvol 'default:@=/' --subvol '@nix=/nix' --subvol '@home=/home'",
                "--registration-path '/nix/nix-path-registration'",
                "--compress 'zstd'",
            ][..],
        ),
        (
            "nix/creators/nix-only.nix",
            &[
                "--mountpoint '/nix'",
                "--registration-path '/nix/nix-path-registration'",
                "--compress 'zstd'",
            ][..],
        ),
    ] {
        let f = repo.join(creator);
        let args = nix_eval_json(
            &store,
            &format!("builtins.functionArgs (import {})", f.display()),
        );
        assert_eq!(
            args, r#"{"btrfs-progs":false,"btrfsimg":true,"lib":false,"pkgs":false,"zstd":false}"#,
            "{creator}"
        );
        let d = nix_eval_json(&store, &mk_for(&f, r#"{ compression = null; }"#));
        assert!(!d.contains("--compress"), "{creator}: {d}");
        let d = nix_eval_json(&store, &mk_for(&f, "{ }"));
        for want in wants {
            assert!(d.contains(want), "{creator} lacks {want}: {d}");
        }
    }

    let pkg = nix_eval_json(
        &store,
        &format!(
            r#"let
          p = import {file} {{
            lib = {lib_stub};
            rustPlatform.buildRustPackage = a: a;
          }};
        in {{
          inherit (p) pname version doCheck;
          lock = toString p.cargoLock.lockFile;
          src = toString p.src.src;
          keepsSrc = p.src.filter "{repo}/src" "directory";
          dropsTarget = p.src.filter "{repo}/target" "directory";
          main = p.meta.mainProgram;
        }}"#,
            file = repo.join("nix/package.nix").display(),
            repo = repo.display(),
        ),
    );
    let want = format!(
        r#"{{"doCheck":false,"dropsTarget":false,"keepsSrc":true,"lock":"{}","main":"btrfsimg","pname":"btrfsimg","src":"{}","version":"{}"}}"#,
        repo.join("Cargo.lock").display(),
        repo.display(),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(pkg, want, "package.nix");
}

/// A store path holding `bin/NAME`: a copy of FILE (copy) or a symlink to it.
fn tool_package(store: &ChrootStore, work: &Path, name: &str, file: &Path, copy: bool) -> String {
    let pkg = work.join(format!("{name}-pkg"));
    fs::create_dir_all(pkg.join("bin")).unwrap();
    let dest = pkg.join("bin").join(name);
    if copy {
        fs::copy(file, &dest).unwrap();
    } else {
        std::os::unix::fs::symlink(fs::canonicalize(file).unwrap(), &dest).unwrap();
    }
    store.add(&pkg)
}

/// Stand-ins for the parts of nixpkgs make-btrfs-fs.nix uses, enough to run
/// its build offline in a chroot store: `stdenv.mkDerivation` runs
/// `buildCommand` with bash (`set -euo pipefail`, PATH from
/// nativeBuildInputs, then the host's /usr/bin and /bin for coreutils and
/// findutils), and `closureInfo` writes the closure info the test computed
/// (its output refers to the closure, which so is in the build's chroot).
const BUILDER_TEST_NIX: &str = r#"
{ repo, root, registration, storePathsText, btrfsimg, btrfsProgs, zstd, populate }:
let
  system = builtins.currentSystem;
  lib = {
    optionalString = c: s: if c then s else "";
    concatMapStringsSep = sep: f: l: builtins.concatStringsSep sep (map f l);
    optional = c: x: if c then [ x ] else [ ];
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
  };
  rootPath = builtins.storePath root;
  closureInfo = { rootPaths }:
    assert rootPaths == [ rootPath ];
    derivation {
      name = "closure-info";
      inherit system registration storePathsText;
      roots = rootPaths;
      builder = "/bin/sh";
      PATH = "/usr/bin:/bin";
      args = [ "-ec" ''
        mkdir $out
        printf '%s' "$registration" > $out/registration
        printf '%s' "$storePathsText" > $out/store-paths
      '' ];
    };
  pkgs = {
    stdenv.mkDerivation = { name, outputs ? [ "out" ], nativeBuildInputs ? [ ], buildCommand }:
      derivation {
        inherit name system outputs buildCommand;
        builder = "/bin/bash";
        args = [ "-euo" "pipefail" "-c" "eval \"$buildCommand\"" ];
        PATH = builtins.concatStringsSep ":"
          (map (p: "${p}/bin") nativeBuildInputs ++ [ "/usr/bin" "/bin" ]);
      };
    buildPackages.closureInfo = closureInfo;
  };
  image = compressImage: compression: imageWith { inherit compressImage compression; };
  imageWith = extra: import (repo + "/nix/make-btrfs-fs.nix") ({
    inherit pkgs lib;
    storePaths = [ rootPath ];
    zstd = builtins.storePath zstd;
    btrfs-progs = builtins.storePath btrfsProgs;
    btrfsimg = builtins.storePath btrfsimg;
    populateImageCommands = populate;
    volumeLabel = "NIXOS_SD";
    libfaketime = null;
    fakeroot = null;
  } // extra);
in
{
  subvols = imageWith {
    subvolumes = [ "default:@=/" "@nix=/nix" ];
    nixPathRegistrationFile = "/nix/nix-path-registration";
  };
  nixonly = imageWith {
    mountpoint = "/nix";
    nixPathRegistrationFile = "/nix/nix-path-registration";
  };
  plain = image false null;
  # An update of `plain` with nothing changed.
  updated = imageWith { baseLayout = (image false null).layout; };
  compressed = image true null;
  zstdfs = image false "zstd:5";
  info = closureInfo { rootPaths = [ rootPath ]; };
}
"#;

/// populateImageCommands for the builder test (run in the build, and on the
/// host to make the expected image).
fn populate_commands(payload: &str) -> String {
    format!(
        r#"mkdir -p ./files/boot/extlinux ./files/etc ./files/nix/var/nix/profiles
printf 'DEFAULT nixos\n' > ./files/boot/extlinux/extlinux.conf
cp {payload}/bin/tool ./files/boot/tool
ln -s {payload}/lib/data.bin ./files/etc/data
echo made-in-the-build > ./files/etc/motd
chmod 0700 ./files/etc
"#
    )
}

/// nix/make-btrfs-fs.nix, run by nix-build (offline, chroot store) with
/// stand-ins for stdenv and closureInfo, makes exactly the image the CLI
/// makes from the same closure info and files, with nixpkgs' default UUID;
/// with compressImage its output decompresses to that image.
#[test]
fn nix_make_btrfs_fs_builds_the_cli_image() {
    let what = "nix_make_btrfs_fs_builds_the_cli_image";
    if !nix_available(what) || !tool_available(what, "zstd", "zstd") {
        return;
    }
    let work = workdir("nix-builder");
    let dir = work.path();
    let c = realistic_closure(dir);
    let store = &c.store;
    let btrfsimg = tool_package(store, dir, "btrfsimg", &btrfsimg_bin(), true);
    let btrfs = tool_package(store, dir, "btrfs", &tool("btrfs"), false);
    let zstd = tool_package(store, dir, "zstd", &tool("zstd"), false);
    let expr = dir.join("builder-test.nix");
    fs::write(&expr, BUILDER_TEST_NIX).unwrap();
    let populate = populate_commands(&c.payload);
    let registration = fs::read_to_string(c.info.registration_path()).unwrap();
    let store_paths = fs::read_to_string(c.info.store_paths_path()).unwrap();
    let repo = repo();
    let argstrs = [
        ("repo", s(&repo)),
        ("root", c.root.as_str()),
        ("registration", registration.as_str()),
        ("storePathsText", store_paths.as_str()),
        ("btrfsimg", btrfsimg.as_str()),
        ("btrfsProgs", btrfs.as_str()),
        ("zstd", zstd.as_str()),
        ("populate", populate.as_str()),
    ];
    // Images have a second output, the layout record (`-layout`).
    let both = |attr: &str| -> Vec<String> { store.build(&expr, &argstrs, Some(attr)) };
    let one = |attr: &str| -> String {
        let out: Vec<String> = both(attr)
            .into_iter()
            .filter(|p| !p.ends_with("-layout"))
            .collect();
        assert_eq!(out.len(), 1, "nix-build -A {attr}: {out:?}");
        out[0].clone()
    };
    let plain = one("plain");
    let compressed = one("compressed");
    let zstdfs = one("zstdfs");
    let info = one("info");
    assert!(plain.ends_with("-btrfs-fs.img"), "{plain}");
    assert!(compressed.ends_with("-btrfs-fs.img.zst"), "{compressed}");
    let built = store.host_path(&plain);

    // The same files, made on the host the same way (with the chroot
    // store's paths), their symlink pointed back into the image's store, and
    // the mtime the build gives them.
    let host_files = dir.join("host");
    fs::create_dir(&host_files).unwrap();
    let mut sh = Command::new(tool("bash"));
    sh.args(["-euo", "pipefail", "-c"])
        .arg(format!(
            "umask 022\n{}",
            populate.replace("/nix/store/", &format!("{}/nix/store/", s(&store.root)))
        ))
        .current_dir(&host_files);
    run_ok(&mut sh);
    let link = host_files.join("files/etc/data");
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(format!("{}/lib/data.bin", c.payload), &link).unwrap();
    let mut touch = Command::new(tool("find"));
    touch
        .arg(host_files.join("files"))
        .args(["-exec", "touch", "-h", "-d", "@1", "{}", "+"]);
    run_ok(&mut touch);

    let expected = dir.join("expected.img");
    let info_host = store.host_path(&info);
    let files_dir = host_files.join("files");
    let cli = [
        "--closure-info",
        s(&info_host),
        "--store-root",
        s(&store.root),
        "--files",
        s(&files_dir),
        "--owner",
        "0:0",
        "--timestamp",
        "1",
        "-L",
        "NIXOS_SD",
        "-U",
        "44444444-4444-4444-8888-888888888888",
    ];
    let expected_layout = dir.join("expected.layout");
    let mut largs = cli.to_vec();
    largs.extend(["--write-layout", s(&expected_layout)]);
    export_sources(None, &expected, &largs);
    assert_files_identical(&built, &expected);
    // The `layout` output is the CLI's record, and an update built with it
    // as `baseLayout` and nothing changed is the same image.
    let layout = both("plain.layout")
        .into_iter()
        .find(|p| p.ends_with("-layout"))
        .expect("a layout output");
    assert_files_identical(&store.host_path(&layout), &expected_layout);
    assert_files_identical(&store.host_path(&one("updated")), &expected);
    // `compression = "zstd:5"`: the CLI's --compress zstd:5 image.
    let expected_zstd = dir.join("expected-zstd.img");
    let mut zargs = cli.to_vec();
    zargs.extend(["--compress", "zstd:5"]);
    export_sources(None, &expected_zstd, &zargs);
    assert_files_identical(&store.host_path(&zstdfs), &expected_zstd);
    btrfs_check(&store.host_path(&zstdfs));
    let unpacked = dir.join("unpacked.img");
    zstd_decompress(&store.host_path(&compressed), &unpacked);
    assert_files_identical(&unpacked, &expected);

    // And the image is what it should be.
    btrfs_check(&built);
    let sup = dump_super(&built);
    assert_eq!(super_field(&sup, "label").as_deref(), Some("NIXOS_SD"));
    assert_eq!(
        super_field(&sup, "fsid").as_deref(),
        Some("44444444-4444-4444-8888-888888888888")
    );
    let m = LoopMount::new(&built, false);
    let mnt = m.path();
    assert_eq!(
        sorted_names(mnt),
        ["boot", "etc", "nix", "nix-path-registration"]
    );
    assert_eq!(
        fs::read(mnt.join("nix-path-registration")).unwrap(),
        registration.as_bytes()
    );
    assert_eq!(
        fs::read(mnt.join("etc/motd")).unwrap(),
        b"made-in-the-build\n"
    );
    assert_eq!(
        fs::read(mnt.join("boot/tool")).unwrap(),
        fs::read(store.host_path(&c.payload).join("bin/tool")).unwrap()
    );
    assert_eq!(
        fs::metadata(mnt.join("etc")).unwrap().mode() & 0o7777,
        0o700
    );
    assert_store_matches_registration(mnt, &c);
    let not_root = entries_not_owned_by(mnt, 0, 0);
    assert!(not_root.is_empty(), "inodes not owned by 0:0: {not_root:?}");
    let recent: Vec<String> = metadata_under(mnt)
        .into_iter()
        .filter(|(_, m)| m.mtime() != 1)
        .map(|(rel, m)| format!("{rel} ({})", m.mtime()))
        .collect();
    assert!(
        recent.is_empty(),
        "build-time mtimes reached the image: {recent:?}"
    );
    m.unmount();

    // The @/@nix layout and the /nix-only image: each the CLI's image from
    // the same arguments, and mounted as a system would, a store Nix takes.
    for (attr, extra) in [
        (
            "subvols",
            &[
                "--subvol",
                "default:@=/",
                "--subvol",
                "@nix=/nix",
                "--registration-path",
                "/nix/nix-path-registration",
            ][..],
        ),
        (
            "nixonly",
            &[
                "--mountpoint",
                "/nix",
                "--registration-path",
                "/nix/nix-path-registration",
            ][..],
        ),
    ] {
        let built = store.host_path(&one(attr));
        let want = dir.join(format!("expected-{attr}.img"));
        let mut args = cli.to_vec();
        args.extend(extra);
        export_sources(None, &want, &args);
        assert_files_identical(&built, &want);
        btrfs_check(&built);
        let sysroot = workdir(&format!("nix-{attr}-root"));
        let r = sysroot.path().canonicalize().unwrap();
        let mut mounts = Vec::new();
        if attr == "subvols" {
            mounts.push(MountAt::new(&built, &r, "loop,ro"));
            mounts.push(MountAt::new(&built, &r.join("nix"), "loop,ro,subvol=@nix"));
            assert_eq!(sorted_names(&r), ["boot", "etc", "nix"]);
        } else {
            fs::create_dir(r.join("nix")).unwrap();
            mounts.push(MountAt::new(&built, &r.join("nix"), "loop,ro"));
        }
        assert_eq!(
            sorted_names(&r.join("nix")),
            if attr == "subvols" {
                &["nix-path-registration", "store", "var"][..]
            } else {
                &["boot", "etc", "nix", "nix-path-registration", "store"][..]
            }
        );
        let reg = r.join("nix/nix-path-registration");
        assert_eq!(fs::read(&reg).unwrap(), registration.as_bytes());
        assert_store_matches_registration(&r, &c);
        let rt = workdir(&format!("nix-{attr}-rt"));
        round_trip(&r, rt.path(), &c, &reg);
        while let Some(m) = mounts.pop() {
            drop(m);
        }
    }
}

/// A stand-in for the nixpkgs flake: `lib.genAttrs` and a `callPackage`
/// that says what it was given.
const STANDIN_NIXPKGS_FLAKE: &str = r#"{
  outputs = _: {
    lib.genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    legacyPackages = builtins.listToAttrs (map (s: {
      name = s;
      value.callPackage = f: args: { package = baseNameOf (toString f); system = s; };
    }) [ "x86_64-linux" "aarch64-linux" ]);
  };
}
"#;

/// flake.nix, evaluated offline with nixpkgs replaced by a stand-in: the
/// package for each system, the overlay's pkgs.btrfsimg, and the creator
/// files it exports.
#[test]
fn nix_flake_evaluates() {
    let what = "nix_flake_evaluates";
    if !tools_available(what, &["nix", "git"]) {
        return;
    }
    let work = workdir("nix-flake");
    let store = ChrootStore::new(&work.path().join("store"));
    let standin = work.path().join("nixpkgs");
    fs::create_dir(&standin).unwrap();
    fs::write(standin.join("flake.nix"), STANDIN_NIXPKGS_FLAKE).unwrap();
    let flake = format!("git+file://{}", repo().display());
    let eval = |attr: &str, apply: Option<&str>| -> String {
        let mut c = store.cmd("nix");
        c.args([
            "--extra-experimental-features",
            "nix-command flakes",
            "--option",
            "substituters",
            "",
            "eval",
            "--json",
            "--no-write-lock-file",
            "--override-input",
        ])
        .arg("nixpkgs")
        .arg(format!("path:{}", standin.display()))
        .arg(format!("{flake}#{attr}"));
        if let Some(a) = apply {
            c.arg("--apply").arg(a);
        }
        run_stdout(&mut c).trim().to_string()
    };
    for system in ["x86_64-linux", "aarch64-linux"] {
        let want = format!(r#"{{"package":"package.nix","system":"{system}"}}"#);
        assert_eq!(eval(&format!("packages.{system}.default"), None), want);
        assert_eq!(eval(&format!("packages.{system}.btrfsimg"), None), want);
    }
    assert_eq!(
        eval(
            "overlays.default",
            Some(r#"o: baseNameOf (toString (o { callPackage = f: a: f; } { }).btrfsimg)"#)
        ),
        r#""package.nix""#
    );
    assert_eq!(
        eval(
            "lib.rootFilesystemCreators",
            Some("c: builtins.mapAttrs (n: p: baseNameOf (toString p)) c")
        ),
        r#"{"default":"make-btrfs-fs.nix","nixOnly":"nix-only.nix","subvolumes":"subvolumes.nix"}"#
    );
}

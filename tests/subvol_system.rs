//! `--subvol` through the real oracles: `btrfs check`; mounted with no
//! options the kernel shows the default subvolume; `subvol=` and `subvolid=`
//! mounts show each subvolume equal to its source; `btrfs subvolume list`,
//! `get-default` and `property get ro` agree with the options; writing into
//! the read-only one fails with EROFS; `btrfs send` of it received into a
//! fresh filesystem compares equal; a snapshot, a full balance and a scrub
//! on the read-write mount; FUSE bytes equal the export; reproducible. The
//! mount-view form is mounted as a system's fileSystems would mount it (`@`
//! at /, `@nix` at /nix, `@home` at /home) and compared with the sources.
//! Needs root, loop devices, FUSE, btrfs-progs.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const MKFS_FORM: [&str; 8] = [
    "--subvol",
    "default:@",
    "--subvol",
    "@home",
    "--subvol",
    "ro:@snap",
    "--subvol",
    "@/var/lib/inner",
];

fn mkfs_form_tree(src: &Path) {
    let mut t = TreeBuilder::new(src);
    t.file(b"@/etc/hostname", b"appliance\n")
        .random_file(b"@/usr/bin/tool", 3 * MIB + 17, 1)
        .file(b"@/usr/share/doc", &b"documentation ".repeat(10_000))
        .hardlink(b"@/usr/bin/tool", b"@/usr/bin/tool-alias")
        .symlink(b"@/usr/bin/alias", b"tool")
        .sparse_file(b"@/var/sparse", 8 * MIB, &[(MIB, b"data between holes")])
        .file(b"@/var/lib/inner/state", b"inner state\n")
        .random_file(b"@/var/lib/inner/blob", 200 * KIB, 2)
        .xattr(b"@/etc/hostname", b"user.origin", b"test")
        .file(b"@home/alice/notes", b"notes\n")
        .random_file(b"@home/alice/photo", MIB, 3)
        .file(b"@snap/etc/hostname", b"snapshot of the appliance\n")
        .random_file(b"@snap/usr/bin/tool", 2 * MIB, 4)
        .file(b"top-level-file", b"outside every subvolume\n")
        .file(
            b"zz-plain/deeper",
            &b"placed before the subvolumes' data ".repeat(5000),
        )
        .finalize();
}

fn btrfs_out(args: &[&str], path: &Path) -> String {
    run_stdout(Command::new(tool("btrfs")).args(args).arg(path))
}

/// `ID 256 gen 1 top level 5 path @` lines of `btrfs subvolume list`.
fn subvolume_list(mnt: &Path) -> Vec<String> {
    btrfs_out(&["subvolume", "list"], mnt)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn subvolumes_as_mkfs_spells_them() {
    let what = "subvolumes_as_mkfs_spells_them";
    if !fuse_available(what) || !tools_available(what, &["cmp", "mkfs.btrfs"]) {
        return;
    }
    let work = workdir("subvol");
    let src = work.path().join("src");
    mkfs_form_tree(&src);
    let mut args = fixed_args("0b0d0a0e-5b00-4000-8000-000000000001");
    args.extend(MKFS_FORM);
    let img = work.path().join("sv.img");
    export(&src, &img, &args);
    btrfs_check(&img);

    // No options: the default subvolume.
    let m = LoopMount::new(&img, false);
    compare_trees(&src.join("@"), m.path(), CompareOpts::default());
    assert_eq!(
        btrfs_out(&["subvolume", "get-default"], m.path()).trim(),
        "ID 256 gen 1 top level 5 path @"
    );
    m.unmount();

    // The top level: everything, with the subvolumes where they were.
    let m = LoopMount::with_options(&img, "loop,ro,subvolid=5");
    compare_trees(&src, m.path(), CompareOpts::default());
    assert_eq!(
        subvolume_list(m.path()),
        [
            "ID 256 gen 1 top level 5 path @",
            "ID 257 gen 1 top level 5 path @home",
            "ID 258 gen 1 top level 5 path @snap",
            "ID 259 gen 1 top level 256 path @/var/lib/inner",
        ]
    );
    for (sub, ro) in [
        ("@", "false"),
        ("@home", "false"),
        ("@snap", "true"),
        ("@/var/lib/inner", "false"),
    ] {
        assert_eq!(
            btrfs_out(&["property", "get"], &m.path().join(sub)).trim(),
            format!("ro={ro}"),
            "{sub}"
        );
    }
    let show = btrfs_out(&["subvolume", "show"], &m.path().join("@snap"));
    assert!(show.contains("readonly"), "{show}");
    m.unmount();

    // Each subvolume by name and by id.
    for (opt, dir) in [
        ("subvol=@home", "@home"),
        ("subvol=/@snap", "@snap"),
        ("subvolid=259", "@/var/lib/inner"),
        ("subvol=@/var/lib/inner", "@/var/lib/inner"),
    ] {
        let m = LoopMount::with_options(&img, &format!("loop,ro,{opt}"));
        compare_trees(&src.join(dir), m.path(), CompareOpts::default());
        m.unmount();
    }

    // The same bytes served by FUSE, and again from a second export.
    let f = FuseMount::start(&src, &work.path().join("mnt"), &args);
    run_ok(Command::new(tool("cmp")).arg(&img).arg(f.img()));
    assert!(f.stop(libc::SIGTERM).success());
    assert_reproducible(&src, &args);

    read_write_cycle(&img, &src, work.path());

    // Compressed and deduplicated: the content pass takes files tree by tree
    // (the order the planner places them), so the file it writes itself
    // equals the stream.
    let mut cargs = args.clone();
    cargs.extend(["--compress", "zstd", "--dedupe"]);
    let cimg = work.path().join("compressed.img");
    export(&src, &cimg, &cargs);
    btrfs_check(&cimg);
    let streamed = work.path().join("streamed.img");
    export_to_stdout(&src, &streamed, &cargs);
    assert_files_identical(&cimg, &streamed);
    let m = LoopMount::with_options(&cimg, "loop,ro,subvolid=5");
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();
}

/// On a grown copy mounted read-write: the read-only subvolume refuses
/// writes (EROFS); `btrfs send` of it is received into a fresh filesystem
/// equal to its source; a snapshot of `@` takes writes; a full balance and a
/// scrub are clean, and so is `btrfs check` afterwards.
fn read_write_cycle(img: &Path, src: &Path, dir: &Path) {
    let copy = copy_image(img, dir, "rw.img");
    let f = fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.set_len(f.metadata().unwrap().len() + 256 * MIB).unwrap();
    drop(f);
    let m = LoopMount::with_options(&copy, "loop,subvolid=5");
    run_ok(
        Command::new(tool("btrfs"))
            .args(["filesystem", "resize", "max"])
            .arg(m.path()),
    );
    let e = fs::write(m.path().join("@snap/new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    let recv_img = dir.join("recv.img");
    fs::File::create(&recv_img)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    run_ok(Command::new(tool("mkfs.btrfs")).arg("-q").arg(&recv_img));
    let r = LoopMount::new(&recv_img, true);
    let mut send = std::process::Command::new(tool("btrfs"))
        .args(["send", "-q"])
        .arg(m.path().join("@snap"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("btrfs send");
    let o = Command::new(tool("btrfs"))
        .args(["receive", "-q"])
        .arg(r.path())
        .stdin(send.stdout.take().expect("send's stdout"))
        .output()
        .expect("btrfs receive");
    assert!(o.status.success(), "receive: {}", output_text(&o));
    assert!(
        send.wait().expect("wait for send").success(),
        "btrfs send failed"
    );
    compare_trees(
        &src.join("@snap"),
        &r.path().join("@snap"),
        CompareOpts::default(),
    );
    r.unmount();

    run_ok(
        Command::new(tool("btrfs"))
            .args(["subvolume", "snapshot"])
            .arg(m.path().join("@"))
            .arg(m.path().join("@snap2")),
    );
    fs::write(
        m.path().join("@snap2/etc/hostname"),
        b"changed in the snapshot\n",
    )
    .unwrap();
    fs::write(m.path().join("@home/alice/more"), random_bytes(300_000, 9)).unwrap();
    fs::remove_file(m.path().join("@/usr/bin/tool-alias")).unwrap();
    run_ok(
        Command::new(tool("btrfs"))
            .args(["balance", "start", "--full-balance"])
            .arg(m.path()),
    );
    btrfs_scrub(m.path());
    let p = m.path().to_path_buf();
    assert_eq!(fs::read(p.join("@/etc/hostname")).unwrap(), b"appliance\n");
    assert_eq!(
        fs::read(p.join("@snap2/etc/hostname")).unwrap(),
        b"changed in the snapshot\n"
    );
    m.unmount();
    btrfs_check(&copy);
}

/// The usual NixOS layout from one tree: `default:@=/`, `@nix=/nix`,
/// `@home=/home` and a mountpoint the sources lack (`@log=/var/log`).
/// Mounted as the system would (`@` by default at a root, `subvol=@nix` on
/// its nix, ...), the whole equals the sources; `@` keeps empty mountpoint
/// directories with the sources' attributes; the top level holds only the
/// subvolumes.
#[test]
fn mount_view_builds_the_nixos_layout() {
    let what = "mount_view_builds_the_nixos_layout";
    if !system_tests_available(what) || !tools_available(what, &["cp"]) {
        return;
    }
    let work = workdir("subvol-view");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.file(b"etc/hostname", b"nixos\n")
        .symlink(b"etc/static", b"/nix/store/aaaa-etc/etc")
        .random_file(b"nix/store/aaaa-etc/etc/big", 2 * MIB, 5)
        .file(
            b"nix/store/bbbb-hello/bin/hello",
            b"#!/bin/sh\necho hello\n",
        )
        .hardlink(b"nix/store/bbbb-hello/bin/hello", b"nix/store/.links/0abc")
        .file(b"nix/nix-path-registration", b"registration\n")
        .file(b"nix/var/nix/profiles/system", b"profile\n")
        .file(b"home/alice/notes", b"notes\n")
        .dir(b"var/lib")
        .xattr(b"nix", b"user.mountpoint", b"kept on the empty directory")
        .finalize();
    let mut args = fixed_args("0b0d0a0e-5b00-4000-8000-000000000002");
    args.extend([
        "--subvol",
        "default:@=/",
        "--subvol",
        "@nix=/nix",
        "--subvol",
        "@home=/home",
        "--subvol",
        "@log=/var/log",
    ]);
    let img = work.path().join("nixos.img");
    export(&src, &img, &args);
    btrfs_check(&img);

    let m = LoopMount::with_options(&img, "loop,ro,subvolid=5");
    assert_eq!(dir_names(m.path()), [&b"@"[..], b"@home", b"@log", b"@nix"]);
    for (empty, like) in [
        ("@/nix", Some("nix")),
        ("@/home", Some("home")),
        ("@/var/log", None),
    ] {
        assert!(dir_names(&m.path().join(empty)).is_empty(), "{empty}");
        if let Some(like) = like {
            let (a, b) = (
                fs::metadata(m.path().join(empty)).unwrap(),
                fs::metadata(src.join(like)).unwrap(),
            );
            use std::os::unix::fs::MetadataExt;
            assert_eq!((a.mode(), a.mtime()), (b.mode(), b.mtime()), "{empty}");
        }
    }
    assert_eq!(
        list_xattrs(&m.path().join("@/nix")).unwrap(),
        list_xattrs(&src.join("nix")).unwrap()
    );
    assert_eq!(
        subvolume_list(m.path()),
        [
            "ID 256 gen 1 top level 5 path @",
            "ID 257 gen 1 top level 5 path @home",
            "ID 258 gen 1 top level 5 path @log",
            "ID 259 gen 1 top level 5 path @nix",
        ]
    );
    m.unmount();

    // As the booted system sees it.
    let root = workdir("subvol-root");
    let r = root.path().canonicalize().unwrap();
    let top = MountAt::new(&img, &r, "loop,ro");
    let nix = MountAt::new(&img, &r.join("nix"), "loop,ro,subvol=@nix");
    let home = MountAt::new(&img, &r.join("home"), "loop,ro,subvol=@home");
    let log = MountAt::new(&img, &r.join("var/log"), "loop,ro,subvol=@log");
    let mut want = src.clone();
    want.set_file_name("src-with-log");
    run_ok(Command::new(tool("cp")).arg("-a").arg(&src).arg(&want));
    fs::create_dir(want.join("var/log")).unwrap();
    // The made-up @log root: 0755 root:root at --timestamp.
    set_times(&want.join("var/log"), 1_700_000_000, 0).unwrap();
    let var = fs::metadata(src.join("var")).unwrap();
    set_times(
        &want.join("var"),
        std::os::unix::fs::MetadataExt::mtime(&var),
        std::os::unix::fs::MetadataExt::mtime_nsec(&var) as u32,
    )
    .unwrap();
    compare_trees(&want, &r, CompareOpts::default());
    drop((log, home, nix, top));
}

/// A hard link whose names fall into two subvolumes: a warning naming both,
/// two inodes that share one data extent (EXTENT_ITEM with two refs, two
/// roots), check clean; deleting one name on a read-write mount leaves the
/// other intact.
#[test]
fn hard_links_across_subvolumes_share_their_data() {
    let what = "hard_links_across_subvolumes_share_their_data";
    if !system_tests_available(what) {
        return;
    }
    let work = workdir("subvol-links");
    let src = work.path().join("src");
    let mut t = TreeBuilder::new(&src);
    t.random_file(b"a/big", 3 * MIB, 7)
        .hardlink(b"a/big", b"b/big")
        .finalize();
    let img = work.path().join("links.img");
    let mut args = fixed_args("0b0d0a0e-5b00-4000-8000-000000000003");
    args.extend(["--subvol", "a", "--subvol", "b"]);
    let out = export(&src, &img, &args);
    assert!(
        out.contains("/a/big and /b/big are hard links in two subvolumes"),
        "{out}"
    );
    btrfs_check(&img);
    let refs: Vec<DumpItem> = dump_tree(&img, "extent")
        .into_iter()
        .filter(|i| i.ty == "EXTENT_ITEM" && i.offset == "3145728")
        .collect();
    assert_eq!(refs.len(), 1, "{refs:?}");
    let body = refs[0].body.join("\n");
    assert!(body.contains("refs 2"), "{body}");
    assert!(
        body.contains("root 256") && body.contains("root 257"),
        "{body}"
    );

    let copy = copy_image(&img, work.path(), "rw.img");
    let m = LoopMount::new(&copy, true);
    let want = fs::read(src.join("a/big")).unwrap();
    assert_eq!(fs::read(m.path().join("b/big")).unwrap(), want);
    fs::remove_file(m.path().join("a/big")).unwrap();
    m.unmount();
    btrfs_check(&copy);
    let m = LoopMount::new(&copy, false);
    assert_eq!(fs::read(m.path().join("b/big")).unwrap(), want);
    m.unmount();
}

/// An image whose top level is `/nix` (an ephemeral-root NixOS): store
/// paths and the registration path are system paths placed relative to
/// `--mountpoint /nix`; ROOT and `--files` are the tree at `/nix`. With
/// subvolumes, their mountpoints are system paths too.
#[test]
fn image_mounted_at_nix() {
    let what = "image_mounted_at_nix";
    if !system_tests_available(what) {
        return;
    }
    let work = workdir("subvol-nix");
    let w = work.path();
    let chroot = w.join("chroot");
    let mut t = TreeBuilder::new(&chroot);
    t.file(
        b"nix/store/aaaa-hello/bin/hello",
        b"#!/bin/sh\necho hello\n",
    )
    .random_file(b"nix/store/bbbb-lib/lib/libx.so", 300 * KIB, 6)
    .finalize();
    fs::write(
        w.join("paths"),
        b"/nix/store/aaaa-hello\n/nix/store/bbbb-lib\n",
    )
    .unwrap();
    fs::write(w.join("registration"), b"/nix/store/aaaa-hello\n").unwrap();
    let files = w.join("files");
    let mut t = TreeBuilder::new(&files);
    t.file(b"var/nix/profiles/system", b"profile\n").finalize();
    let common = |extra: &[&str]| -> PathBuf {
        let img = w.join(format!("nix{}.img", extra.len()));
        let mut args: Vec<String> = fixed_args("0b0d0a0e-5b00-4000-8000-000000000004")
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (k, v) in [
            ("--store-root", chroot.display().to_string()),
            ("--store-paths", w.join("paths").display().to_string()),
            (
                "--registration",
                w.join("registration").display().to_string(),
            ),
            ("--registration-path", "/nix/nix-path-registration".into()),
            ("--mountpoint", "/nix".into()),
            ("--files", files.display().to_string()),
        ] {
            args.push(k.into());
            args.push(v);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        export_sources(None, &img, &args);
        btrfs_check(&img);
        img
    };
    let img = common(&[]);
    let m = LoopMount::new(&img, false);
    assert_eq!(
        dir_names(m.path()),
        [&b"nix-path-registration"[..], b"store", b"var"]
    );
    compare_trees(
        &chroot.join("nix/store"),
        &m.path().join("store"),
        CompareOpts {
            root_mtime: false,
            ..CompareOpts::default()
        },
    );
    assert_eq!(
        fs::read(m.path().join("var/nix/profiles/system")).unwrap(),
        b"profile\n"
    );
    m.unmount();

    // The store in its own subvolume, the rest in the default one.
    let img = common(&[
        "--subvol",
        "default:@=/nix",
        "--subvol",
        "@store=/nix/store",
    ]);
    let m = LoopMount::new(&img, false);
    assert_eq!(
        dir_names(m.path()),
        [&b"nix-path-registration"[..], b"store", b"var"]
    );
    assert!(dir_names(&m.path().join("store")).is_empty());
    m.unmount();
    let m = LoopMount::with_options(&img, "loop,ro,subvol=@store");
    compare_trees(
        &chroot.join("nix/store"),
        m.path(),
        CompareOpts {
            root_mtime: false,
            ..CompareOpts::default()
        },
    );
    m.unmount();
}

/// The trixie chroot with mkfs.btrfs 6.14 (`.ci/trixie-mkfs`), or a loud
/// skip (a failure under BTRFSIMG_REQUIRE_SYSTEM_TESTS=1).
fn trixie_chroot(what: &str) -> Option<PathBuf> {
    let dir = std::env::var("BTRFSIMG_TRIXIE_CHROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/cache/btrfsimg/trixie"));
    if dir.join(".complete").exists() {
        return Some(dir);
    }
    skip_or_panic(
        what,
        &format!(
            "no mkfs.btrfs 6.14 chroot at {} (run .ci/trixie-mkfs, or set BTRFSIMG_TRIXIE_CHROOT)",
            dir.display()
        ),
    );
    None
}

/// (path, read-only) of every subvolume, and the default's path.
fn subvolume_layout(img: &Path) -> (Vec<(String, bool)>, String) {
    let m = LoopMount::with_options(img, "loop,ro,subvolid=5");
    let mut subvols: Vec<(String, bool)> = subvolume_list(m.path())
        .iter()
        .map(|l| {
            let path = l.split(" path ").nth(1).expect("a path").to_string();
            let ro = btrfs_out(&["property", "get"], &m.path().join(&path)).trim() == "ro=true";
            (path, ro)
        })
        .collect();
    subvols.sort();
    let default = btrfs_out(&["subvolume", "get-default"], m.path());
    let default = default
        .split(" path ")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    m.unmount();
    (subvols, default)
}

/// mkfs.btrfs 6.14 (Debian trixie) run with the same `--subvol` options on
/// the same tree lists the same subvolumes with the same flags, the same
/// default, and the same contents.
#[test]
fn mkfs_6_14_agrees_on_subvolumes() {
    let what = "mkfs_6_14_agrees_on_subvolumes";
    if !system_tests_available(what) || !tools_available(what, &["chroot", "cp"]) {
        return;
    }
    let Some(chroot) = trixie_chroot(what) else {
        return;
    };
    let work = workdir("subvol-mkfs");
    let src = work.path().join("src");
    mkfs_form_tree(&src);
    let mut args = fixed_args("0b0d0a0e-5b00-4000-8000-000000000005");
    args.extend(MKFS_FORM);
    let ours = work.path().join("ours.img");
    export(&src, &ours, &args);

    // mkfs.btrfs sees the tree inside the chroot.
    let inside = tempfile::Builder::new()
        .prefix("btrfsimg-mkfs-")
        .tempdir_in(chroot.join("tmp"))
        .unwrap();
    run_ok(
        Command::new(tool("cp"))
            .arg("-a")
            .arg(&src)
            .arg(inside.path()),
    );
    let rel = Path::new("/tmp").join(inside.path().file_name().unwrap());
    let mk = inside.path().join("mk.img");
    fs::File::create(&mk).unwrap().set_len(512 * MIB).unwrap();
    let mut cmd = Command::new(tool("chroot"));
    cmd.arg(&chroot)
        .arg("mkfs.btrfs")
        // -f: the chroot has no /proc to check mounts in.
        .arg("-f")
        .arg("-q")
        .arg("--rootdir")
        .arg(rel.join("src"));
    for spec in MKFS_FORM.iter().skip(1).step_by(2) {
        cmd.arg("--subvol").arg(spec);
    }
    cmd.arg(rel.join("mk.img"));
    run_ok(&mut cmd);
    btrfs_check(&mk);

    let (a, b) = (subvolume_layout(&ours), subvolume_layout(&mk));
    assert_eq!(a, b, "btrfsimg (left) and mkfs.btrfs 6.14 (right)");
    assert_eq!(a.1, "@");
    let m = LoopMount::with_options(&mk, "loop,ro,subvolid=5");
    // mkfs.btrfs 6.14 stores holes as zeros and drops the nanoseconds of
    // times; contents, modes, owners, seconds, links and xattrs are equal.
    compare_trees(
        &src,
        m.path(),
        CompareOpts {
            holes: false,
            mtime_ns: false,
            ..CompareOpts::default()
        },
    );
    m.unmount();
}

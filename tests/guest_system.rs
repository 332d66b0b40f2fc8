//! A real guest kernel reads the image: Debian's Linux 6.1 cloud kernel boots
//! in QEMU with `MNT/fs.img` from `btrfsimg mount` as a read-only virtio disk
//! (`cache=none`: O_DIRECT reads of the FUSE file), mounts it, lists every
//! entry and hashes every file; all of it must equal the source (also for a
//! zstd image, for one with a block-group tree, and for subvolumes mounted
//! as a system would mount them), and the image served over NBD by
//! `btrfsimg serve` (`-drive file=nbd+unix://...`). Needs root,
//! FUSE, qemu-system-x86, busybox-static and the kernel from
//! `.ci/guest-kernel`.

mod common;

use common::guest::*;
use common::*;
use std::time::Duration;

#[test]
fn guest_linux_6_1_reads_the_fuse_image() {
    guest_reads(
        "guest_linux_6_1_reads_the_fuse_image",
        &[],
        "0b0d0a0e-0011-4000-8000-000000000001",
    );
}

/// The same with zstd-compressed extents and inline items: Linux 6.1
/// decompresses every frame (128 KiB windows) as written.
#[test]
fn guest_linux_6_1_reads_a_zstd_image() {
    guest_reads(
        "guest_linux_6_1_reads_a_zstd_image",
        &["--compress", "zstd"],
        "0b0d0a0e-0011-4000-8000-000000000002",
    );
}

/// `-O block-group-tree` (the kernel's feature since 6.1) with
/// `--inode-flags`: Linux 6.1 finds its block groups in tree 11 and reads
/// the files without checksums.
#[test]
fn guest_linux_6_1_reads_a_block_group_tree_image() {
    guest_reads(
        "guest_linux_6_1_reads_a_block_group_tree_image",
        &[
            "-O",
            "block-group-tree",
            "--inode-flags",
            "nodatacow:extra/text",
            "--inode-flags",
            "nodatasum:extra/owned",
        ],
        "0b0d0a0e-0011-4000-8000-000000000003",
    );
}

/// Subvolumes in the mount-view form: Linux 6.1 mounts the default one
/// (`@`) without options and `subvol=@extra` on its `extra` mountpoint, as a
/// system's fileSystems would; together they are the source.
#[test]
fn guest_linux_6_1_mounts_subvolumes() {
    let script = subvolume_script();
    guest_reads_with(
        "guest_linux_6_1_mounts_subvolumes",
        &["--subvol", "default:@=/", "--subvol", "@extra=/extra"],
        "0b0d0a0e-0011-4000-8000-000000000004",
        &script,
    );
}

/// The same image served by `btrfsimg serve` on a Unix socket: QEMU's NBD
/// block driver (`-drive file=nbd+unix://...`) gives it to Linux 6.1 as a
/// virtio disk, which mounts it and reads every entry.
#[test]
fn guest_linux_6_1_mounts_the_image_over_nbd() {
    let what = "guest_linux_6_1_mounts_the_image_over_nbd";
    let Some(guest) = guest_available(what) else {
        return;
    };
    let work = workdir("guest-nbd");
    let src = work.path().join("src");
    fuse_test_tree(&src);
    let sock = work.path().join("nbd.sock");
    let mut args: Vec<&std::ffi::OsStr> = vec![src.as_os_str()];
    args.extend(
        fixed_args("0b0d0a0e-0011-4000-8000-000000000013")
            .into_iter()
            .map(std::ffi::OsStr::new),
    );
    args.extend([std::ffi::OsStr::new("--socket"), sock.as_os_str()]);
    let mut served = common::nbd::Served::start(&args, &work.path().join("serve.log"));
    let drive = format!("file={},format=raw,readonly=on", served.uri);
    let out = guest.run(&drive, LIST_AND_HASH, Duration::from_secs(300));
    assert!(served.stop_with(libc::SIGTERM).success());
    assert!(served.log().contains("connected"), "{}", served.log());
    let (got, want) = (guest_listing(&out), expected_listing(&src));
    assert!(
        got == want,
        "guest and source differ: {} vs {} lines",
        got.len(),
        want.len()
    );
    assert!(got.len() > 1500, "{} lines", got.len());
}

/// Linux 5.10 (bullseye's), the oldest kernel the default images are for,
/// reads them: plain, with zstd extents (frames of 128 KiB windows), and the
/// mount-view subvolumes with xxhash checksums (5.5+).
#[test]
fn guest_linux_5_10_reads_default_zstd_and_subvolume_images() {
    let what = "guest_linux_5_10_reads_default_zstd_and_subvolume_images";
    let Some(guest) = guest_5_10_available(what) else {
        return;
    };
    let subvols = subvolume_script();
    for (extra, uuid, script) in [
        (
            &[][..],
            "0b0d0a0e-0011-4000-8000-000000000510",
            LIST_AND_HASH,
        ),
        (
            &["--compress", "zstd"][..],
            "0b0d0a0e-0011-4000-8000-000000000511",
            LIST_AND_HASH,
        ),
        (
            &[
                "--subvol",
                "default:@=/",
                "--subvol",
                "@extra=/extra",
                "--csum",
                "xxhash",
            ][..],
            "0b0d0a0e-0011-4000-8000-000000000512",
            subvols.as_str(),
        ),
    ] {
        guest_reads_on(&guest, what, extra, uuid, script);
    }
}

/// An update planned from a base layout (data kept in place, new data in
/// freed space and in a data chunk after the base's metadata chunks) reads
/// as its source in Linux 5.10 and 6.1.
#[test]
fn guest_linux_5_10_and_6_1_read_an_update() {
    let what = "guest_linux_5_10_and_6_1_read_an_update";
    let Some(old) = guest_5_10_available(what) else {
        return;
    };
    let Some(new) = guest_available(what) else {
        return;
    };
    if !fuse_available(what) {
        return;
    }
    let work = workdir("guest-update");
    let src = work.path().join("src");
    fuse_test_tree(&src);
    let uuid = "0b0d0a0e-0011-4000-8000-000000000513";
    let base = work.path().join("v1.layout");
    let mut args = fixed_args(uuid);
    args.extend(["--write-layout", base.to_str().unwrap()]);
    export_sources(Some(&src), &work.path().join("v1.img"), &args);
    // v2: some files go, others come, one larger than all the freed space.
    let mut removed = 0;
    for e in walk_files(&src) {
        if removed < 40 && e.metadata().unwrap().len() > 1000 {
            std::fs::remove_file(&e).unwrap();
            removed += 1;
        }
    }
    let mut t = TreeBuilder::new(&src.join("update"));
    t.random_file(b"large", 24 << 20, 71);
    for i in 0..30u64 {
        t.random_file(format!("small-{i}").as_bytes(), 3000 + i * 4096, 80 + i);
    }
    t.finalize();
    let layout = work.path().join("v2.layout");
    let mut args = fixed_args(uuid);
    args.extend([
        "--base-layout",
        base.to_str().unwrap(),
        "--write-layout",
        layout.to_str().unwrap(),
    ]);
    let m = FuseMount::start(&src, &work.path().join("mnt"), &args);
    let rec = btrfsimg::plan::record::read(std::io::BufReader::new(
        std::fs::File::open(&layout).unwrap(),
    ))
    .unwrap();
    let meta_end = rec
        .header
        .chunks
        .iter()
        .filter(|c| c.ty == "metadata")
        .map(|c| c.logical)
        .min()
        .unwrap();
    assert!(
        rec.header
            .chunks
            .iter()
            .any(|c| c.ty == "data" && c.logical > meta_end),
        "a data chunk after metadata"
    );
    let drive = format!(
        "file={},format=raw,readonly=on,cache=none",
        m.img().display()
    );
    for guest in [&old, &new] {
        let out = guest.run(&drive, LIST_AND_HASH, Duration::from_secs(300));
        let (got, want) = (guest_listing(&out), expected_listing(&src));
        assert!(
            got == want,
            "guest and source differ: {} vs {} lines",
            got.len(),
            want.len()
        );
        assert!(got.len() > 1500, "{} lines", got.len());
    }
    assert!(m.stop(libc::SIGTERM).success());
}

/// Regular files under `dir`, sorted.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// LIST_AND_HASH with `@extra` mounted on its mountpoint.
fn subvolume_script() -> String {
    LIST_AND_HASH
        .replacen(
            "mount -t btrfs -o ro /dev/vda /mnt || exit 1\n",
            "mount -t btrfs -o ro /dev/vda /mnt || exit 1\n\
             mount -t btrfs -o ro,subvol=@extra /dev/vda /mnt/extra || exit 1\n",
            1,
        )
        .replacen("umount /mnt", "umount /mnt/extra\numount /mnt", 1)
}

fn guest_reads(what: &str, extra: &[&str], uuid: &'static str) {
    guest_reads_with(what, extra, uuid, LIST_AND_HASH)
}

fn guest_reads_with(what: &str, extra: &[&str], uuid: &'static str, script: &str) {
    let Some(guest) = guest_available(what) else {
        return;
    };
    guest_reads_on(&guest, what, extra, uuid, script)
}

fn guest_reads_on(guest: &Guest, what: &str, extra: &[&str], uuid: &'static str, script: &str) {
    if !fuse_available(what) {
        return;
    }
    let work = workdir("guest-read");
    let src = work.path().join("src");
    fuse_test_tree(&src);
    let mut t = TreeBuilder::new(&src.join("extra"));
    t.file(b"modes/setuid", b"s").chmod(b"modes/setuid", 0o4755);
    t.file(b"modes/private", b"p")
        .chmod(b"modes/private", 0o600);
    t.dir(b"modes/sticky").chmod(b"modes/sticky", 0o1777);
    t.file(b"owned", b"o").chown(b"owned", 1234, 5678);
    t.fifo(b"fifo");
    t.symlink(b"dangling", b"no/such/target");
    // Compressible data: extents and inline items that zstd keeps.
    let text = b"the quick brown fox jumps over the lazy dog 0123456789\n";
    t.file(b"text/big", &text.repeat(40_000));
    t.file(b"text/small", &text.repeat(30));
    t.file(b"text/sector", &text.repeat(74));
    t.finalize();
    let mut args = fixed_args(uuid);
    args.extend(extra);
    let m = FuseMount::start(&src, &work.path().join("mnt"), &args);
    let drive = format!(
        "file={},format=raw,readonly=on,cache=none",
        m.img().display()
    );
    let out = guest.run(&drive, script, Duration::from_secs(300));
    assert!(m.stop(libc::SIGTERM).success());
    let (got, want) = (guest_listing(&out), expected_listing(&src));
    let missing: Vec<_> = want.iter().filter(|l| !got.contains(l)).take(10).collect();
    let extra: Vec<_> = got.iter().filter(|l| !want.contains(l)).take(10).collect();
    assert!(
        got == want,
        "guest and source differ: {} vs {} lines; missing in the guest {missing:#?}; unexpected {extra:#?}",
        got.len(),
        want.len()
    );
    assert!(got.len() > 3000, "{} lines", got.len());
}

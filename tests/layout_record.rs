//! `--write-layout`: the record says where every file's data is, read back
//! from the exported image byte for byte; export, plan and serve write the
//! same record for the same input; a record directory that does not exist
//! is refused before planning. Needs no privileges.

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

fn tree(src: &Path) {
    let mut t = TreeBuilder::new(src);
    t.random_file(b"nix/store/aaaa-one/lib/big", 3 << 20, 1)
        .random_file(b"nix/store/bbbb-two/share/mid", 200_000, 2)
        .random_file(b"etc/small", 100, 3)
        .random_file(b"etc/edge", 4097, 4)
        .file(b"empty", b"")
        .sparse_file(b"sparse", 9 << 20, &[(4 << 20, b"middle")]);
    for i in 0..50u64 {
        t.random_file(format!("many/f{i:02}").as_bytes(), 5000 + i * 1000, 10 + i);
    }
    t.hardlink(b"etc/edge", b"etc/edge-link");
    t.finalize();
}

#[test]
fn the_record_locates_every_byte() {
    let work = workdir("layout-record");
    let src = work.path().join("src");
    tree(&src);
    let img = work.path().join("fs.img");
    let rec = work.path().join("fs.layout");
    let mut args = fixed_args("0b0d0a0e-0014-4000-8000-000000000001");
    args.extend(["--write-layout", rec.to_str().unwrap()]);
    export_sources(Some(&src), &img, &args);
    let r = read_record(&rec);
    assert_eq!(r.header.image_size, fs::metadata(&img).unwrap().len());
    let image = fs::File::open(&img).unwrap();

    let mut checked = 0u64;
    for f in r.files.iter().filter(|f| f.stored == "extents") {
        let rel = String::from_utf8(f.path()).unwrap();
        let want = fs::read(src.join(rel.trim_start_matches('/'))).unwrap();
        assert_eq!(want.len() as u64, f.size, "{rel}");
        for &(off, logical, disk, ram, ref algo) in &f.extents {
            assert!(algo.is_none());
            assert_eq!(disk, ram);
            let mut got = vec![0u8; disk as usize];
            image
                .read_exact_at(&mut got, physical(&r, logical))
                .unwrap();
            let n = (want.len() as u64 - off).min(ram) as usize;
            assert!(
                got[..n] == want[off as usize..off as usize + n],
                "{rel} at {off}"
            );
            assert!(
                got[n..].iter().all(|&b| b == 0),
                "{rel}: zeros past the end"
            );
            checked += n as u64;
        }
    }
    assert!(checked > 3 << 20, "{checked} bytes checked");
    let f = |p: &str| {
        r.files
            .iter()
            .find(|f| f.path.as_deref() == Some(p))
            .expect(p)
    };
    assert_eq!(
        f("/nix/store/aaaa-one/lib/big").store_path.as_deref(),
        Some("/nix/store/aaaa-one")
    );
    assert_eq!(f("/etc/small").stored, "inline");
    assert_eq!(f("/empty").stored, "empty");
    // A hard-linked inode once; holes are not extents.
    assert_eq!(
        r.files
            .iter()
            .filter(|x| x.path().starts_with(b"/etc/edge"))
            .count(),
        1
    );
    let sparse = f("/sparse");
    assert_eq!(sparse.extents.len(), 1);
    assert_eq!(sparse.extents[0].0, 4 << 20);

    // plan and serve write the same record.
    let rec2 = work.path().join("plan.layout");
    let mut pargs: Vec<&str> = fixed_args("0b0d0a0e-0014-4000-8000-000000000001");
    pargs.extend(["--write-layout", rec2.to_str().unwrap()]);
    run_ok(
        Command::new(btrfsimg_bin())
            .arg("plan")
            .arg(&src)
            .args(&pargs),
    );
    assert_eq!(
        fs::read(&rec2).unwrap(),
        fs::read(&rec).unwrap(),
        "plan's record"
    );
    let rec3 = work.path().join("serve.layout");
    let sock = work.path().join("s.sock");
    let mut sargs: Vec<&OsStr> = vec![src.as_os_str()];
    sargs.extend(
        fixed_args("0b0d0a0e-0014-4000-8000-000000000001")
            .into_iter()
            .map(OsStr::new),
    );
    sargs.extend([
        OsStr::new("--write-layout"),
        rec3.as_os_str(),
        OsStr::new("--socket"),
        sock.as_os_str(),
    ]);
    let served = common::nbd::Served::start(&sargs, &work.path().join("serve.log"));
    assert_eq!(
        fs::read(&rec3).unwrap(),
        fs::read(&rec).unwrap(),
        "serve's record"
    );
    drop(served);
    // No temporary files beside the records.
    let names: Vec<String> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn compressed_extents_are_recorded_and_bad_paths_refused() {
    let work = workdir("layout-record-zstd");
    let src = work.path().join("src");
    tree(&src);
    fs::write(src.join("text"), b"compressible text line\n".repeat(50_000)).unwrap();
    let img = work.path().join("fs.img");
    let rec = work.path().join("fs.layout");
    let mut args = fixed_args("0b0d0a0e-0014-4000-8000-000000000002");
    args.extend([
        "--compress",
        "zstd",
        "--write-layout",
        rec.to_str().unwrap(),
    ]);
    export_sources(Some(&src), &img, &args);
    let r = read_record(&rec);
    assert_eq!(r.header.compression.as_deref(), Some("zstd:3"));
    // Random data does not compress: raw extents; the record says which.
    assert!(r
        .files
        .iter()
        .flat_map(|f| &f.extents)
        .all(|e| e.4.is_none() || e.4.as_deref() == Some("zstd")));

    let missing = work.path().join("no/such/dir/x.layout");
    let o = run(Command::new(btrfsimg_bin())
        .arg("export")
        .arg(&src)
        .arg("-o")
        .arg(work.path().join("other.img"))
        .arg("--write-layout")
        .arg(&missing));
    assert_eq!(o.status.code(), Some(1));
    assert_error_line(
        &String::from_utf8_lossy(&o.stderr),
        &["no/such/dir", "does not exist"],
        "missing directory",
    );
    assert!(
        !work.path().join("other.img").exists(),
        "refused before anything was written"
    );
}

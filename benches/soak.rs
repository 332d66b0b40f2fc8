//! FUSE soak: 8 reader threads (every other one with O_DIRECT) read random
//! ranges of fs.img through fresh `btrfsimg mount`s, a new mount every
//! `BTRFSIMG_SOAK_MOUNT_SECS` (default 60), for `BTRFSIMG_SOAK_SECS` (default
//! 600), comparing every byte with the exported image. Panics on the first
//! difference or read error. Needs root, /dev/fuse and fusermount3.
//!
//! Tree: `BTRFSIMG_BENCH_TREE`, else the FUSE test tree (about 40 MiB).
//! The short version runs in the tests: `fuse_soak_short` in
//! tests/reliability_system.rs.
//!
//!     sudo cargo bench --bench soak
//!     sudo BTRFSIMG_SOAK_SECS=3600 cargo bench --bench soak

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default),
    )
}

fn main() {
    if !fuse_available("soak") {
        return;
    }
    let total = secs("BTRFSIMG_SOAK_SECS", 600);
    let per_mount = secs("BTRFSIMG_SOAK_MOUNT_SECS", 60);
    let work = workdir("soak");
    let src = match std::env::var_os("BTRFSIMG_BENCH_TREE") {
        Some(t) => PathBuf::from(t),
        None => {
            let src = work.path().join("src");
            fuse_test_tree(&src);
            src
        }
    };
    let args = fixed_args("0b0d0a0e-0009-4000-8000-000000000001");
    let exported = work.path().join("export.img");
    export(&src, &exported, &args);
    let want = Arc::new(std::fs::read(&exported).expect("read the export"));
    eprintln!(
        "soak: {} for {total:?}, a fresh mount every {per_mount:?}, image {} bytes",
        src.display(),
        want.len()
    );
    let start = Instant::now();
    let r = fuse_soak(
        &src,
        &work.path().join("mnt"),
        &args,
        want,
        total,
        per_mount,
    );
    let secs = start.elapsed().as_secs_f64();
    println!(
        "soak passed: {} mounts, {} reads, {:.1} GiB compared in {secs:.0} s ({:.2} GB/s), every byte equal to the export",
        r.mounts,
        r.reads,
        r.bytes as f64 / GIB as f64,
        r.bytes as f64 / secs / 1e9
    );
}

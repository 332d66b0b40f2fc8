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

#![allow(dead_code, unused_imports)]

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

pub const CHUNK: usize = 1 << 20;

pub mod btrfs;
pub mod compare;
pub mod cycles;
pub mod export;
pub mod files;
pub mod fuse;
pub mod fuzz;
pub mod guest;
pub mod layout;
pub mod model;
pub mod mounts;
pub mod nbd;
pub mod nix;
pub mod prereq;
pub mod process;
pub mod tree;

pub use btrfs::*;
pub use compare::*;
pub use cycles::*;
pub use export::*;
pub use files::*;
pub use fuse::*;
pub use layout::*;
pub use model::*;
pub use mounts::*;
pub use prereq::*;
pub use process::*;
pub use tree::*;

//! btrfsimg: build a btrfs filesystem image from a directory tree without ever
//! writing it out. The data flows one way:
//!
//! source walk → [`plan::Plan`] (pure data) → [`image::Image::read_at`] → frontends
//! ([`export`], FUSE).

pub mod error;
pub mod export;
pub mod format;
pub mod fuse;
pub mod image;
pub mod plan;
pub mod source;

pub use error::{Error, Result};
pub use image::Image;
pub use plan::Options;

use std::path::Path;

/// Walks `root` and plans its image (the `mkfs.btrfs --rootdir` case).
pub fn plan_dir(root: &Path, opts: &Options) -> Result<plan::Plan> {
    plan_sources(
        &source::Sources {
            root: Some(root.to_path_buf()),
            ..Default::default()
        },
        opts,
    )
}

/// Walks all sources (ROOT, a Nix closure, overlays) and plans their image.
/// Options are checked before anything is walked.
pub fn plan_sources(sources: &source::Sources, opts: &Options) -> Result<plan::Plan> {
    plan::limits::validate_options(opts)?;
    let tree = source::walk(
        sources,
        &source::WalkOptions {
            xattrs: true,
            virtual_time: opts.timestamp,
            threads: 0,
        },
    )?;
    plan::build(tree, opts)
}

/// Plans the image of a tree described in memory (`source::generated`).
pub fn plan_generated(root: &source::generated::Entry, opts: &Options) -> Result<plan::Plan> {
    plan::limits::validate_options(opts)?;
    plan::build(source::generated::build(root)?, opts)
}

//! btrfsimg: build a btrfs filesystem image from a directory tree without ever
//! writing it out. The data flows one way:
//!
//! source walk → [`plan::Plan`] (pure data) → [`image::Image::read_at`] → frontends
//! ([`export`], FUSE, [`serve`] over NBD).

pub mod compress;
pub mod content;
pub mod error;
pub mod export;
pub mod format;
pub mod fuse;
pub mod image;
pub mod pipeline;
pub mod plan;
pub mod serve;
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

/// How the content pass (with compression) runs.
pub struct PassOptions<'a> {
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Compressed payloads kept in memory for serving; the rest are made
    /// again when read.
    pub keep_bytes: u64,
    /// Called with (file bytes done, total) as the pass goes.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

impl Default for PassOptions<'_> {
    fn default() -> Self {
        PassOptions {
            threads: 0,
            keep_bytes: 256 << 20,
            progress: None,
        }
    }
}

/// Walks all sources (ROOT, a Nix closure, overlays) and plans their image.
/// Options are checked before anything is walked.
pub fn plan_sources(sources: &source::Sources, opts: &Options) -> Result<plan::Plan> {
    plan_sources_with(sources, opts, &PassOptions::default(), None)
}

/// `plan_sources`, running a content pass (when compressing) as `pass` says,
/// giving `sink` every piece's bytes (see `content::PieceSink`).
pub fn plan_sources_with(
    sources: &source::Sources,
    opts: &Options,
    pass: &PassOptions,
    sink: Option<&mut dyn content::PieceSink>,
) -> Result<plan::Plan> {
    plan::limits::validate_options(opts)?;
    let tree = source::walk(
        sources,
        &source::WalkOptions {
            xattrs: true,
            virtual_time: opts.timestamp,
            threads: 0,
        },
    )?;
    let grafts = mount_view(opts, sources.mountpoint.as_deref())?;
    let tree = source::layout::apply(tree, &grafts, opts.timestamp)?;
    plan_tree(tree, opts, pass, sink)
}

/// The mount-view subvolumes of `opts` (`--subvol PATH=MOUNTPOINT`), their
/// mountpoints (system paths) made relative to the image's `mountpoint`.
pub fn mount_view(opts: &Options, mountpoint: Option<&Path>) -> Result<Vec<source::layout::Graft>> {
    let parts = |p: &[u8]| -> Vec<Vec<u8>> {
        p.split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(|c| c.to_vec())
            .collect()
    };
    let skip = mountpoint.map_or(0, |m| parts(m.as_os_str().as_encoded_bytes()).len());
    opts.subvolumes
        .iter()
        .filter_map(|s| s.mountpoint.as_ref().map(|m| (s, parts(m))))
        .map(|(s, m)| {
            let inside = mountpoint.is_none_or(|mp| {
                m.len() >= skip && m[..skip] == parts(mp.as_os_str().as_encoded_bytes())[..]
            });
            if !inside {
                return Err(Error::msg(format!(
                    "--subvol {}: the mountpoint is outside the image's mountpoint {}",
                    s.shown(),
                    error::shown_path(mountpoint.unwrap_or(Path::new("/")))
                )));
            }
            Ok(source::layout::Graft {
                path: parts(&s.path),
                mountpoint: m[skip..].to_vec(),
                shown: s.shown(),
            })
        })
        .collect()
}

/// Plans a walked or generated tree, with a content pass when compressing.
pub fn plan_tree(
    tree: source::SourceTree,
    opts: &Options,
    pass: &PassOptions,
    sink: Option<&mut dyn content::PieceSink>,
) -> Result<plan::Plan> {
    if opts.compression.is_none() && !opts.dedupe {
        return plan::build(tree, opts);
    }
    let tree = std::sync::Arc::new(tree);
    let threads = match pass.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let inode_flags = std::sync::Arc::new(plan::inode_flags::InodeFlags::resolve(
        &tree,
        &opts.inode_flags,
        &plan::subvol::roots(&tree, &opts.subvolumes)?,
    )?);
    let tree_of = match opts.subvolumes.is_empty() {
        true => Vec::new(),
        false => plan::subvol::resolve(&tree, &opts.subvolumes, None)?
            .0
            .tree_of()
            .to_vec(),
    };
    let mut sink = sink;
    if let Some(s) = sink.as_mut() {
        s.start(plan::data::DataAllocator::for_tree(
            &tree,
            opts.base.as_deref(),
            &tree_of,
        ));
    }
    let index = {
        let reader = source::files::reader(tree.clone());
        content::scan(
            &tree,
            reader.as_ref(),
            &content::ContentOptions {
                compression: opts.compression,
                dedupe: opts.dedupe,
                max_inline: plan::max_inline(opts),
                threads,
                keep_bytes: pass.keep_bytes,
                tree_of,
                inode_flags,
            },
            pass.progress.unwrap_or(&|_, _| {}),
            sink,
        )?
    };
    let tree = std::sync::Arc::try_unwrap(tree)
        .map_err(|_| Error::msg("internal error: the source tree is still shared"))?;
    plan::build_with(tree, Some(index), opts)
}

/// Plans the image of a tree described in memory (`source::generated`).
pub fn plan_generated(root: &source::generated::Entry, opts: &Options) -> Result<plan::Plan> {
    plan::limits::validate_options(opts)?;
    plan_tree(
        source::generated::build(root)?,
        opts,
        &PassOptions::default(),
        None,
    )
}

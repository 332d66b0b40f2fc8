//! The bounds of what can be planned, checked before any work: option ranges,
//! the largest image, the most file data, and the per-entry rules that are not
//! about item sizes (those are checked where items meet leaves, in `pack`).

use super::Options;
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::source::{Kind, SourceTree};

/// The largest image: Linux file offsets are signed 64-bit (`off_t`), so no
/// file, FUSE file or block device can be larger. 8 EiB minus 4 KiB.
pub const MAX_IMAGE_SIZE: u64 = (i64::MAX as u64) / SECTOR_SIZE * SECTOR_SIZE;

/// The most file data (after holes) one plan may hold: 1 PiB. Planning keeps
/// about 24 bytes per data extent and per tree block, which is about 4 GiB of
/// memory per PiB of data.
pub const MAX_DATA_BYTES: u64 = 1 << 50;

/// The longest symlink target Linux creates (PATH_MAX - 1); the node size may
/// allow less.
pub const MAX_SYMLINK: u64 = 4095;

/// Largest `max_inline`: an inline extent must stay below one sector.
pub const MAX_INLINE: u64 = SECTOR_SIZE - 1;

pub fn validate_options(opts: &Options) -> Result<()> {
    super::subvol::validate_specs(&opts.subvolumes)?;
    if !opts.nodesize.is_power_of_two() || !(4096..=65536).contains(&opts.nodesize) {
        return Err(Error::msg(format!(
            "invalid node size {}: must be a power of two from 4096 to 65536",
            opts.nodesize
        )));
    }
    if opts.label.len() > 255 {
        return Err(Error::msg(format!(
            "label is {} bytes long; at most 255 are allowed",
            opts.label.len()
        )));
    }
    if opts.max_inline > MAX_INLINE {
        return Err(Error::msg(format!(
            "max_inline {} is too large: at most {MAX_INLINE} bytes",
            opts.max_inline
        )));
    }
    // --size is rounded down to a sector, --extra-space up.
    let size = opts.size.map(|s| s / SECTOR_SIZE * SECTOR_SIZE);
    let extra = opts
        .extra_space
        .div_ceil(SECTOR_SIZE)
        .saturating_mul(SECTOR_SIZE);
    for (what, v, given) in [
        ("--size", size, opts.size),
        ("--extra-space", Some(extra), Some(opts.extra_space)),
    ] {
        if let (Some(_), Some(v)) = (v.filter(|&v| v > MAX_IMAGE_SIZE), given) {
            return Err(Error::msg(format!(
                "{what} {v} is too large: an image is at most {MAX_IMAGE_SIZE} bytes (8 EiB - 4 KiB)"
            )));
        }
    }
    Ok(())
}

/// Rules on entries that no item size expresses.
pub fn validate_tree(tree: &SourceTree) -> Result<()> {
    let mut data = 0u64;
    for i in 0..tree.len() as u32 {
        let n = tree.node(i);
        match n.kind {
            Kind::Symlink if n.size == 0 => {
                return Err(Error::at(&tree.path(i), "symlink with an empty target"))
            }
            Kind::Symlink if n.size > MAX_SYMLINK => {
                return Err(Error::at(
                    &tree.path(i),
                    format!(
                        "symlink target of {} bytes is longer than {MAX_SYMLINK} bytes",
                        n.size
                    ),
                ))
            }
            Kind::Dir if n.nchildren() as u64 > u32::MAX as u64 - 3 => {
                return Err(Error::at(&tree.path(i), "too many directory entries"))
            }
            Kind::File if tree.link_rep(i) == i => {
                for s in tree.segments(i).iter() {
                    let a = s.offset / SECTOR_SIZE * SECTOR_SIZE;
                    let b = (s.offset + s.len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
                    data = data.saturating_add(b - a);
                }
                if data > MAX_DATA_BYTES {
                    return Err(Error::at(
                        &tree.path(i),
                        format!(
                            "with this file the tree holds more than {MAX_DATA_BYTES} bytes \
                             (1 PiB) of file data, more than btrfsimg plans"
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

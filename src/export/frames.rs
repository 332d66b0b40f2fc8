//! `--zstd` output: the image cut into frames that one pool of workers
//! produces and compresses side by side. A worker reads its frame through
//! `Image::read_at` (which recompresses any `--compress` extent the content
//! pass did not keep, so that work is spread over the same workers) and feeds
//! it to its own zstd stream a slice at a time, counting each slice on the
//! progress bar when the encoder has taken it. Frames are written in order.
//!
//! Frame boundaries depend only on the image and the level, and each frame is
//! compressed by itself, so the output is the same whatever the thread count
//! (libzstd's own multi-threading gives different bytes with and without
//! workers). The cost, measured on a 256 MiB image of /usr/share: frames of
//! four windows are 0.6 % (level 3) to about 1 % (level 19) larger than one
//! zstdmt frame. A `.zst` of several frames is what `zstd -d` and every
//! streaming decoder expect.
//!
//! Frames start at multiples of their length (a power of two, at least
//! `bmap::GRID`), and zero frames (runs the allocation map leaves unmapped)
//! end on such a multiple too. So each data frame covers whole grid cells,
//! its worker hashes the bmap ranges inside it from the bytes it reads
//! anyway, and zero frames hold no mapped byte.

use super::{bmap, cancelled, ExportOptions, Stop};
use crate::image::Image;
use crate::pipeline;
use indicatif::ProgressBar;
use std::io::{self, Write};
use zstd::zstd_safe::{
    self, zstd_sys::ZSTD_EndDirective as EndDirective, CCtx, CParameter, InBuffer, OutBuffer,
};

/// Bytes fed to an encoder at once: the bar advances after each.
const SLICE: usize = 1 << 20;
/// The longest frame of known zeros (they compress at memory speed).
const ZERO_FRAME_MAX: u64 = 1 << 30;

/// log2 of the window zstd uses at `level` for large inputs (its parameter
/// table for sources above 256 KiB).
fn window_log(level: i32) -> u32 {
    match level {
        ..=1 => 19,
        2 => 20,
        3..=7 => 21,
        8..=16 => 22,
        17..=19 => 23,
        20 => 25,
        21 => 26,
        _ => 27,
    }
}

/// Data frames span four windows (as zstdmt's jobs do), between 8 and
/// 128 MiB: shorter frames lose ratio, longer ones only delay progress.
/// Always a power of two and a multiple of `bmap::GRID`.
fn frame_len(level: i32) -> u64 {
    (4u64 << window_log(level)).clamp(bmap::GRID, 128 << 20)
}

/// One frame: `[offset, offset + len)` of the image, which is known to be
/// zeros when `zeros` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    offset: u64,
    len: u64,
    zeros: bool,
}

/// The frames of an image: the image cut at multiples of `len` (a power
/// of two); whole multiples of `len` with no mapped byte (which read as
/// zeros: see `image::allocation`) become zero frames of up to
/// `ZERO_FRAME_MAX`, the rest are data frames of `len` (the last one
/// shorter). Every frame starts at a multiple of `len`.
fn frames(image: &Image, len: u64) -> impl Iterator<Item = Frame> + '_ {
    debug_assert!(len.is_power_of_two() && ZERO_FRAME_MAX % len == 0);
    let size = image.size();
    let map = image.allocation();
    let mut off = 0u64;
    std::iter::from_fn(move || {
        if off >= size {
            return None;
        }
        let zeros_to = match map.next_mapped(off) {
            Some(m) => m / len * len,
            None => size,
        };
        let frame = if zeros_to > off {
            let end = zeros_to.min(off + ZERO_FRAME_MAX);
            Frame {
                offset: off,
                len: end - off,
                zeros: true,
            }
        } else {
            Frame {
                offset: off,
                len: len.min(size - off),
                zeros: false,
            }
        };
        off += frame.len;
        Some(frame)
    })
}

/// What a worker made of a frame: the zstd frame, and the digests of the
/// bmap ranges inside it (when a bmap is made).
type Compressed = (Vec<u8>, Option<bmap::Hashed>);

/// Compresses `frame` of `image` into one zstd frame, hashing the ranges
/// of `layout` inside it.
fn compress(
    image: &Image,
    frame: Frame,
    level: i32,
    opts: &ExportOptions,
    pb: &ProgressBar,
    layout: Option<&bmap::Layout>,
) -> Result<Compressed, Stop> {
    let mut hasher = layout.map(|l| l.hasher(frame.offset, frame.offset + frame.len));
    let zerr = |what: &str, code: usize| {
        Stop::Write(io::Error::other(format!(
            "zstd {what}: {}",
            zstd_safe::get_error_name(code)
        )))
    };
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(|c| zerr("level", c))?;
    cctx.set_parameter(CParameter::ChecksumFlag(true))
        .map_err(|c| zerr("checksum", c))?;
    cctx.set_pledged_src_size(Some(frame.len))
        .map_err(|c| zerr("size", c))?;
    let mut out: Vec<u8> = Vec::with_capacity(CCtx::out_size());
    let mut buf = vec![0u8; SLICE.min(frame.len as usize)];
    let mut done = 0u64;
    while done < frame.len {
        if cancelled(opts) {
            return Err(Stop::Interrupted);
        }
        let n = SLICE.min((frame.len - done) as usize);
        let off = frame.offset + done;
        if !frame.zeros {
            let got = image.read_at(off, &mut buf[..n]).map_err(Stop::Read)?;
            if got != n {
                return Err(Stop::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("image ended at {} inside a frame", off + got as u64),
                )));
            }
            if let Some(h) = hasher.as_mut() {
                h.feed(off, &buf[..n]);
            }
        }
        let mut input = InBuffer::around(&buf[..n]);
        while input.pos() < n {
            reserve(&mut out);
            let pos = out.len();
            let mut o = OutBuffer::around_pos(&mut out, pos);
            cctx.compress_stream2(&mut o, &mut input, EndDirective::ZSTD_e_continue)
                .map_err(|c| zerr("compress", c))?;
        }
        done += n as u64;
        pb.inc(n as u64);
    }
    loop {
        reserve(&mut out);
        let pos = out.len();
        let mut o = OutBuffer::around_pos(&mut out, pos);
        let left = cctx
            .compress_stream2(&mut o, &mut InBuffer::around(&[]), EndDirective::ZSTD_e_end)
            .map_err(|c| zerr("end", c))?;
        if left == 0 {
            return Ok((out, hasher.map(bmap::Hasher::finish)));
        }
    }
}

/// Room for one more encoder output block.
fn reserve(out: &mut Vec<u8>) {
    let want = CCtx::out_size();
    if out.capacity() - out.len() < want {
        out.reserve(want);
    }
}

/// Writes `image` to `out` as zstd frames at `level`, compressed by
/// `opts.threads` workers (at least one); returns the digests of
/// `layout`'s ranges, if given.
pub(super) fn write(
    image: &Image,
    out: &mut dyn Write,
    level: i32,
    opts: &ExportOptions,
    pb: &ProgressBar,
    layout: Option<&bmap::Layout>,
) -> Result<Option<bmap::Digests>, Stop> {
    let threads = (opts.threads as usize).max(1);
    let mut digests = layout.map(|_| bmap::Digests::default());
    pipeline::ordered(
        frames(image, frame_len(level)),
        threads,
        threads * 2,
        |frame| compress(image, frame, level, opts, pb, layout),
        |(bytes, hashed)| {
            out.write_all(&bytes).map_err(Stop::Write)?;
            match (digests.as_mut(), hashed) {
                (Some(d), Some(h)) => d.add(h).map_err(Stop::Read),
                _ => Ok(()),
            }
        },
        || Stop::Write(io::Error::other("a zstd worker panicked")),
    )?;
    out.flush().map_err(Stop::Write)?;
    Ok(digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_span_four_windows_within_bounds() {
        assert_eq!(frame_len(3), 8 << 20);
        assert_eq!(frame_len(1), 8 << 20);
        assert_eq!(frame_len(-5), 8 << 20);
        assert_eq!(frame_len(12), 16 << 20);
        assert_eq!(frame_len(19), 32 << 20);
        assert_eq!(frame_len(22), 128 << 20);
        for level in -5..=22 {
            let len = frame_len(level);
            assert!(len.is_power_of_two() && len % bmap::GRID == 0);
        }
    }

    /// Frames tile the image, each starts at a multiple of its length
    /// (so it covers whole bmap grid cells), and zero frames hold no
    /// mapped byte: with 3 GiB of unallocated space (zero frames of the
    /// 1 GiB maximum) and a data file larger than one frame.
    #[test]
    fn frames_are_aligned_and_zero_frames_unmapped() {
        use crate::source::generated::Entry;
        use crate::source::Fill;
        use std::collections::BTreeMap;
        let root = Entry::dir(BTreeMap::from([
            (b"big".to_vec(), Entry::file(20 << 20, Fill::Random(1))),
            (b"small".to_vec(), Entry::file(5000, Fill::Text(2))),
        ]));
        let opts = crate::Options {
            extra_space: 3 << 30,
            ..crate::Options::default()
        };
        let image = Image::new(crate::plan_generated(&root, &opts).expect("plans"));
        for level in [3, 19] {
            let len = frame_len(level);
            let mut at = 0;
            let mut zero_frames = 0;
            for f in frames(&image, len) {
                assert_eq!(f.offset, at, "frames tile the image");
                assert_eq!(f.offset % len, 0, "frame at {} not aligned", f.offset);
                assert!(f.len > 0 && f.len <= ZERO_FRAME_MAX);
                if f.zeros {
                    zero_frames += 1;
                    let next = image.allocation().next_mapped(f.offset);
                    assert!(next.is_none_or(|m| m >= f.offset + f.len));
                } else {
                    assert!(f.len == len || f.offset + f.len == image.size());
                }
                at += f.len;
            }
            assert_eq!(at, image.size());
            assert!(zero_frames >= 3, "level {level}: {zero_frames} zero frames");
        }
    }
}

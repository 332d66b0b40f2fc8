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

use super::{cancelled, ExportOptions, Stop};
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
fn frame_len(level: i32) -> u64 {
    (4u64 << window_log(level)).clamp(8 << 20, 128 << 20)
}

/// One frame: `[offset, offset + len)` of the image, which is known to be
/// zeros when `zeros` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    offset: u64,
    len: u64,
    zeros: bool,
}

/// The frames of an image of `size` bytes: runs of known zeros at least a
/// frame long become zero frames, the rest is cut into frames of `len`.
fn frames(image: &Image, len: u64) -> impl Iterator<Item = Frame> + '_ {
    let size = image.size();
    let mut off = 0u64;
    std::iter::from_fn(move || {
        if off >= size {
            return None;
        }
        let data = image.seek_data(off).unwrap_or(size);
        let frame = if data >= off.saturating_add(len) || data == size {
            let end = data.min(off + ZERO_FRAME_MAX);
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

/// Compresses `frame` of `image` into one zstd frame.
fn compress(
    image: &Image,
    frame: Frame,
    level: i32,
    opts: &ExportOptions,
    pb: &ProgressBar,
) -> Result<Vec<u8>, Stop> {
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
            return Ok(out);
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
/// `opts.threads` workers (at least one).
pub(super) fn write(
    image: &Image,
    out: &mut dyn Write,
    level: i32,
    opts: &ExportOptions,
    pb: &ProgressBar,
) -> Result<(), Stop> {
    let threads = (opts.threads as usize).max(1);
    pipeline::ordered(
        frames(image, frame_len(level)),
        threads,
        threads * 2,
        |frame| compress(image, frame, level, opts, pb),
        |bytes| out.write_all(&bytes).map_err(Stop::Write),
        || Stop::Write(io::Error::other("a zstd worker panicked")),
    )?;
    out.flush().map_err(Stop::Write)
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
    }
}

//! Compressed extent payloads exactly as btrfs stores them (encoding only; the
//! decision to compress is the content pass's). zstd: one single-segment frame
//! with its content size and a window of at most 128 KiB (what the kernel's
//! decompression workspace holds); zlib: one RFC 1950 stream; lzo: btrfs's own
//! framing of per-sector LZO1X segments. Every function is deterministic: the
//! same input gives the same bytes, whichever thread calls it, so a payload
//! dropped from memory can be made again.

pub mod lzo;

use crate::error::{Error, Result};
use std::io::Write;

/// Most file bytes in one compressed extent (BTRFS_MAX_UNCOMPRESSED).
pub const MAX_UNCOMPRESSED: usize = 128 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Zlib,
    Lzo,
    Zstd,
}

impl Algorithm {
    /// The `compression` byte of EXTENT_DATA items.
    pub fn code(self) -> u8 {
        match self {
            Algorithm::Zlib => 1,
            Algorithm::Lzo => 2,
            Algorithm::Zstd => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Zlib => "zlib",
            Algorithm::Lzo => "lzo",
            Algorithm::Zstd => "zstd",
        }
    }
}

/// An algorithm and its level, as `--compress ALGO[:LEVEL]` gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Compression {
    pub algorithm: Algorithm,
    pub level: u32,
}

impl Compression {
    /// Parses mkfs.btrfs's spelling: `no`, `zstd[:1..15]` (default 3),
    /// `zlib[:1..9]` (default 3), `lzo`. `None` for `no`.
    pub fn parse(s: &str) -> Result<Option<Compression>> {
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n, Some(l)),
            None => (s, None),
        };
        let (algorithm, range, default) = match name {
            "no" | "none" if level.is_none() => return Ok(None),
            "zstd" => (Algorithm::Zstd, 1..=15, 3),
            "zlib" => (Algorithm::Zlib, 1..=9, 3),
            "lzo" => (Algorithm::Lzo, 1..=1, 1),
            _ => {
                return Err(Error::msg(format!(
                    "invalid --compress '{s}': expected no, zstd[:LEVEL], zlib[:LEVEL] or lzo"
                )))
            }
        };
        let level = match level {
            None => default,
            Some(l) if algorithm == Algorithm::Lzo => {
                return Err(Error::msg(format!(
                    "invalid --compress '{s}': lzo has no levels ({l})"
                )))
            }
            Some(l) => match l.parse::<u32>() {
                Ok(v) if range.contains(&v) => v,
                _ => {
                    return Err(Error::msg(format!(
                        "invalid --compress '{s}': {} levels are {} to {}",
                        algorithm.name(),
                        range.start(),
                        range.end()
                    )))
                }
            },
        };
        Ok(Some(Compression { algorithm, level }))
    }

    /// The payload of a regular extent holding `data` (at most 128 KiB, the
    /// file's real bytes: the reader zero-fills the rest of the extent).
    pub fn extent_payload(&self, data: &[u8]) -> Vec<u8> {
        debug_assert!(data.len() <= MAX_UNCOMPRESSED);
        match self.algorithm {
            Algorithm::Zstd => zstd_frame(data, self.level),
            Algorithm::Zlib => zlib_stream(data, self.level),
            Algorithm::Lzo => lzo::extent_payload(data),
        }
    }

    /// The payload of an inline extent holding a whole small file (at most
    /// one sector). Only lzo frames inline data differently.
    pub fn inline_payload(&self, data: &[u8]) -> Vec<u8> {
        match self.algorithm {
            Algorithm::Lzo => lzo::inline_payload(data),
            _ => self.extent_payload(data),
        }
    }
}

fn zstd_frame(data: &[u8], level: u32) -> Vec<u8> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    let params = [
        CParameter::CompressionLevel(level as i32),
        // The kernel decompresses with a 128 KiB window.
        CParameter::WindowLog(17),
        CParameter::ContentSizeFlag(true),
        CParameter::ChecksumFlag(false),
        CParameter::DictIdFlag(false),
    ];
    for p in params {
        cctx.set_parameter(p)
            .expect("valid zstd parameters for any level 1..15");
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data)
        .expect("the output buffer holds the compress bound");
    out
}

fn zlib_stream(data: &[u8], level: u32) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::new(level),
    );
    enc.write_all(data).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

/// Decodes a payload (for tests and checks): the file bytes it holds,
/// at most `max` of them.
pub fn decode(algorithm: Algorithm, payload: &[u8], max: usize) -> Result<Vec<u8>> {
    match algorithm {
        Algorithm::Zstd => {
            // The frame is followed by the zero padding of its last sector.
            let n = zstd::zstd_safe::find_frame_compressed_size(payload).map_err(|e| {
                Error::msg(format!(
                    "zstd payload: {}",
                    zstd::zstd_safe::get_error_name(e)
                ))
            })?;
            zstd::bulk::decompress(&payload[..n], max)
                .map_err(|e| Error::msg(format!("zstd payload: {e}")))
        }
        Algorithm::Zlib => {
            use std::io::Read;
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(payload)
                .take(max as u64)
                .read_to_end(&mut out)
                .map_err(|e| Error::msg(format!("zlib payload: {e}")))?;
            Ok(out)
        }
        Algorithm::Lzo => lzo::decode_extent(payload, max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mkfs_spellings() {
        let z = |a, l| {
            Some(Compression {
                algorithm: a,
                level: l,
            })
        };
        assert_eq!(Compression::parse("no").unwrap(), None);
        assert_eq!(Compression::parse("zstd").unwrap(), z(Algorithm::Zstd, 3));
        assert_eq!(
            Compression::parse("zstd:15").unwrap(),
            z(Algorithm::Zstd, 15)
        );
        assert_eq!(Compression::parse("zlib:9").unwrap(), z(Algorithm::Zlib, 9));
        assert_eq!(Compression::parse("zlib").unwrap(), z(Algorithm::Zlib, 3));
        assert_eq!(Compression::parse("lzo").unwrap(), z(Algorithm::Lzo, 1));
        for bad in [
            "zstd:0", "zstd:16", "zlib:10", "lzo:1", "lz4", "zstd:x", "", "no:1",
        ] {
            let e = Compression::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--compress"), "{bad}: {e}");
        }
    }

    #[test]
    fn zstd_frames_are_single_segment_with_content_size() {
        let data: Vec<u8> = (0..MAX_UNCOMPRESSED).map(|i| (i / 100) as u8).collect();
        let c = Compression::parse("zstd").unwrap().unwrap();
        let f = c.extent_payload(&data);
        assert_eq!(&f[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        // Frame header descriptor: single segment, 4-byte content size, no
        // checksum, no dictionary (0xA0), as the kernel writes.
        assert_eq!(f[4], 0xa0);
        assert_eq!(
            u32::from_le_bytes(f[5..9].try_into().unwrap()),
            data.len() as u32
        );
        assert_eq!(decode(Algorithm::Zstd, &f, MAX_UNCOMPRESSED).unwrap(), data);
        // Deterministic.
        assert_eq!(c.extent_payload(&data), f);
        let small = c.extent_payload(&data[..5000]);
        assert_eq!(small[4], 0x60, "2-byte content size below 64 KiB + 256");
    }

    #[test]
    fn zlib_streams_round_trip() {
        let data = b"hello hello hello hello".repeat(500);
        let c = Compression::parse("zlib").unwrap().unwrap();
        let s = c.extent_payload(&data);
        assert_eq!(s[0], 0x78);
        assert_eq!(((s[0] as u16) << 8 | s[1] as u16) % 31, 0);
        assert_eq!(decode(Algorithm::Zlib, &s, 1 << 20).unwrap(), data);
    }
}

//! LZO1X streams and btrfs's lzo framing.
//!
//! Every LZO1X compressor on crates.io is GPL-2.0 (ports of liblzo2), which
//! this MIT/Apache project cannot link; so this is a small greedy encoder
//! written from the stream format (the instruction encodings the Linux
//! decompressor documents). Any valid LZO1X stream decodes, so the kernel
//! reads it; it compresses a little less than lzo1x_1. A decoder is here for
//! the tests.
//!
//! Instructions used (`S` = literals that follow a match, 0..3):
//! - first byte `17 + n`: `n` (1..=238) literals at the start;
//! - `0000LLLL [ext]`: a literal run of `L + 3` (or `18 + ext`) bytes, only
//!   after a match with `S = 0`;
//! - `01LDDDSS HHHHHHHH`: match of 3..4 bytes, distance 1..2048;
//! - `1LLDDDSS HHHHHHHH`: match of 5..8 bytes, distance 1..2048;
//! - `001LLLLL [ext] LE16(D << 2 | S)`: match of 3.. bytes, distance 1..16384;
//! - `0001HLLL [ext] LE16(D << 2 | S)`: match of 3.. bytes, distance
//!   16385..49151; `11 00 00` (distance 16384) ends the stream.

use crate::error::{Error, Result};

const SECTOR: usize = 4096;
const MIN_MATCH: usize = 4;
const MAX_DISTANCE: usize = 49151;
const HASH_BITS: u32 = 14;

/// Appends the variable-length extension of a length that did not fit the
/// instruction's bits: 255 per zero byte, then the remainder (1..=255).
fn push_ext(out: &mut Vec<u8>, mut rem: usize) {
    while rem > 255 {
        out.push(0);
        rem -= 255;
    }
    out.push(rem as u8);
}

/// Compresses `src` into one LZO1X stream.
pub fn compress(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() + src.len() / 16 + 67);
    let mut table = vec![u32::MAX; 1 << HASH_BITS];
    let hash = |p: usize| {
        let v = u32::from_le_bytes([src[p], src[p + 1], src[p + 2], src[p + 3]]);
        (v.wrapping_mul(0x9e37_79b1) >> (32 - HASH_BITS)) as usize
    };
    // Where the S bits of the last match are (None: no match yet).
    let mut last_s: Option<usize> = None;
    let mut lit_start = 0;
    let mut i = 0;
    while i + MIN_MATCH <= src.len() {
        let h = hash(i);
        let cand = table[h];
        table[h] = i as u32;
        let found = cand != u32::MAX && {
            let c = cand as usize;
            i - c <= MAX_DISTANCE && src[c..c + MIN_MATCH] == src[i..i + MIN_MATCH]
        };
        if !found {
            i += 1;
            continue;
        }
        let c = cand as usize;
        let mut len = MIN_MATCH;
        while i + len < src.len() && src[c + len] == src[i + len] {
            len += 1;
        }
        literals(&mut out, &src[lit_start..i], &last_s);
        last_s = Some(matched(&mut out, len, i - c));
        // Index a few positions inside the match, then move past it.
        for p in (i + 1..i + len).step_by(3) {
            if p + MIN_MATCH <= src.len() {
                table[hash(p)] = p as u32;
            }
        }
        i += len;
        lit_start = i;
    }
    literals(&mut out, &src[lit_start..], &last_s);
    out.extend_from_slice(&[0x11, 0, 0]);
    out
}

/// Emits the literals before a match (or the end).
fn literals(out: &mut Vec<u8>, lit: &[u8], last_s: &Option<usize>) {
    let n = lit.len();
    if n == 0 {
        return;
    }
    match *last_s {
        None if n <= 238 => out.push(17 + n as u8),
        Some(s) if n <= 3 => out[s] |= n as u8,
        _ => {
            if n - 3 <= 15 {
                out.push((n - 3) as u8);
            } else {
                out.push(0);
                push_ext(out, n - 18);
            }
        }
    }
    out.extend_from_slice(lit);
}

/// Emits a match; returns the index of the byte holding its S bits.
fn matched(out: &mut Vec<u8>, len: usize, dist: usize) -> usize {
    debug_assert!(len >= 3 && (1..=MAX_DISTANCE).contains(&dist));
    if len <= 8 && dist <= 2048 {
        let d = dist - 1;
        let first = if len <= 4 {
            0x40 | ((len - 3) << 5) | ((d & 7) << 2)
        } else {
            0x80 | ((len - 5) << 5) | ((d & 7) << 2)
        };
        out.push(first as u8);
        out.push((d >> 3) as u8);
        return out.len() - 2;
    }
    let d16 = if dist <= 16384 {
        if len - 2 <= 31 {
            out.push(0x20 | (len - 2) as u8);
        } else {
            out.push(0x20);
            push_ext(out, len - 33);
        }
        (dist - 1) << 2
    } else {
        let dd = dist - 16384;
        let h = (dd >> 14) as u8;
        if len - 2 <= 7 {
            out.push(0x10 | (h << 3) | (len - 2) as u8);
        } else {
            out.push(0x10 | (h << 3));
            push_ext(out, len - 9);
        }
        (dd & 0x3fff) << 2
    };
    out.push((d16 & 0xff) as u8);
    out.push((d16 >> 8) as u8);
    out.len() - 2
}

/// Decodes one LZO1X stream into at most `max` bytes.
pub fn decompress(src: &[u8], max: usize) -> Result<Vec<u8>> {
    let bad = || Error::msg("lzo: invalid stream");
    let mut out: Vec<u8> = Vec::new();
    let mut ip = 0;
    let byte = |ip: &mut usize| -> Result<usize> {
        let b = *src.get(*ip).ok_or_else(bad)? as usize;
        *ip += 1;
        Ok(b)
    };
    let ext = |ip: &mut usize, base: usize| -> Result<usize> {
        let mut n = base;
        loop {
            let b = *src.get(*ip).ok_or_else(bad)? as usize;
            *ip += 1;
            if b == 0 {
                n += 255;
            } else {
                return Ok(n + b);
            }
        }
    };
    let copy_lit = |out: &mut Vec<u8>, ip: &mut usize, n: usize| -> Result<()> {
        let s = src.get(*ip..*ip + n).ok_or_else(bad)?;
        out.extend_from_slice(s);
        *ip += n;
        Ok(())
    };
    let copy_match = |out: &mut Vec<u8>, dist: usize, len: usize| -> Result<()> {
        if dist == 0 || dist > out.len() {
            return Err(bad());
        }
        let start = out.len() - dist;
        for k in 0..len {
            let b = out[start + k];
            out.push(b);
        }
        Ok(())
    };
    let mut state;
    let first = *src.first().ok_or_else(bad)? as usize;
    if first > 17 {
        ip = 1;
        let n = first - 17;
        copy_lit(&mut out, &mut ip, n)?;
        state = if n <= 3 { n } else { 4 };
    } else {
        state = 0;
    }
    loop {
        if out.len() > max {
            return Err(Error::msg("lzo: stream longer than its extent"));
        }
        let t = byte(&mut ip)?;
        let s;
        if t < 16 {
            if state == 0 {
                let n = if t == 0 { ext(&mut ip, 18)? } else { t + 3 };
                copy_lit(&mut out, &mut ip, n)?;
                state = 4;
                continue;
            }
            let h = byte(&mut ip)?;
            let (dist, len) = if state == 4 {
                ((h << 2) + ((t >> 2) & 3) + 2049, 3)
            } else {
                ((h << 2) + ((t >> 2) & 3) + 1, 2)
            };
            copy_match(&mut out, dist, len)?;
            s = t & 3;
        } else if t < 32 {
            let len = if t & 7 == 0 {
                ext(&mut ip, 9)?
            } else {
                (t & 7) + 2
            };
            let lo = byte(&mut ip)?;
            let hi = byte(&mut ip)?;
            let d16 = lo | hi << 8;
            let dist = 16384 + ((t & 8) << 11) + (d16 >> 2);
            if dist == 16384 {
                break;
            }
            copy_match(&mut out, dist, len)?;
            s = d16 & 3;
        } else if t < 64 {
            let len = if t & 31 == 0 {
                ext(&mut ip, 33)?
            } else {
                (t & 31) + 2
            };
            let lo = byte(&mut ip)?;
            let hi = byte(&mut ip)?;
            let d16 = lo | hi << 8;
            copy_match(&mut out, (d16 >> 2) + 1, len)?;
            s = d16 & 3;
        } else {
            let h = byte(&mut ip)?;
            let dist = (h << 3) + ((t >> 2) & 7) + 1;
            let len = if t < 128 {
                3 + ((t >> 5) & 1)
            } else {
                5 + ((t >> 5) & 3)
            };
            copy_match(&mut out, dist, len)?;
            s = t & 3;
        }
        copy_lit(&mut out, &mut ip, s)?;
        state = s;
    }
    Ok(out)
}

/// btrfs's lzo payload of a regular extent: the total length (header and
/// pads included), then one segment per input sector (length, stream); a
/// segment header never crosses a sector boundary, the pad before one is zeros.
pub fn extent_payload(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    for sector in data.chunks(SECTOR) {
        let left = SECTOR - out.len() % SECTOR;
        if left < 4 {
            out.resize(out.len() + left, 0);
        }
        let seg = compress(sector);
        out.extend_from_slice(&(seg.len() as u32).to_le_bytes());
        out.extend_from_slice(&seg);
    }
    let total = out.len() as u32;
    out[..4].copy_from_slice(&total.to_le_bytes());
    out
}

/// btrfs's lzo payload of an inline extent: total length, one segment.
pub fn inline_payload(data: &[u8]) -> Vec<u8> {
    debug_assert!(data.len() <= SECTOR);
    let seg = compress(data);
    let mut out = Vec::with_capacity(seg.len() + 8);
    out.extend_from_slice(&((seg.len() + 8) as u32).to_le_bytes());
    out.extend_from_slice(&(seg.len() as u32).to_le_bytes());
    out.extend_from_slice(&seg);
    out
}

/// Decodes a regular extent's lzo payload (at most `max` bytes).
pub fn decode_extent(payload: &[u8], max: usize) -> Result<Vec<u8>> {
    let bad = || Error::msg("lzo: invalid btrfs framing");
    let total = u32::from_le_bytes(
        payload
            .get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    if total > payload.len() {
        return Err(bad());
    }
    let mut pos = 4;
    let mut out = Vec::new();
    while pos < total && out.len() < max {
        let left = SECTOR - pos % SECTOR;
        if left < 4 {
            pos += left;
            continue;
        }
        let len = u32::from_le_bytes(
            payload
                .get(pos..pos + 4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ) as usize;
        pos += 4;
        let seg = payload.get(pos..pos + len).ok_or_else(bad)?;
        out.extend(decompress(seg, SECTOR)?);
        pos += len;
    }
    out.truncate(max);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Vec<u8>> {
        let mut rng = 12345u64;
        let mut random = |n: usize| {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect::<Vec<u8>>()
        };
        vec![
            vec![7],
            b"abc".to_vec(),
            vec![0; 4096],
            b"the btrfs image of a store path ".repeat(128),
            random(4096),
            random(1),
            random(300),
            [random(100), vec![1; 3000], random(50)].concat(),
            (0..60000u32).map(|i| (i % 251) as u8).collect(),
            (0..60000u32)
                .map(|i| ((i / 20000) as u8) ^ (i % 7) as u8)
                .collect(),
        ]
    }

    #[test]
    fn streams_round_trip() {
        for s in samples() {
            let c = compress(&s);
            assert_eq!(&c[c.len() - 3..], &[0x11, 0, 0]);
            assert_eq!(decompress(&c, s.len()).unwrap(), s, "{} bytes", s.len());
            assert!(c.len() <= s.len() + s.len() / 16 + 67);
        }
        // Compressible data compresses.
        assert!(compress(&vec![0; 4096]).len() < 100);
    }

    #[test]
    fn btrfs_framing_keeps_headers_inside_sectors() {
        for s in samples() {
            let p = extent_payload(&s);
            let total = u32::from_le_bytes(p[..4].try_into().unwrap()) as usize;
            assert_eq!(total, p.len());
            assert_eq!(decode_extent(&p, s.len()).unwrap(), s);
        }
        // 32 sectors of random data: segment headers land near boundaries.
        let mut x = 99u64;
        let r: Vec<u8> = (0..131072)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect();
        let p = extent_payload(&r);
        assert_eq!(decode_extent(&p, r.len()).unwrap(), r);
        let i = inline_payload(b"tiny file");
        assert_eq!(
            u32::from_le_bytes(i[..4].try_into().unwrap()) as usize,
            i.len()
        );
        assert_eq!(
            u32::from_le_bytes(i[4..8].try_into().unwrap()) as usize,
            i.len() - 8
        );
    }
}

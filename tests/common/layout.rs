//! Layout records and images as block-based updaters see them.

use btrfsimg::plan::record::{self, Record};
use std::fs;
use std::io::BufReader;
use std::path::Path;

/// The record at `p`, which must be valid.
pub fn read_record(p: &Path) -> Record {
    record::read(BufReader::new(fs::File::open(p).unwrap())).expect("a valid record")
}

/// Where logical address `logical` is in the image (first stripe).
pub fn physical(r: &Record, logical: u64) -> u64 {
    let c = r
        .header
        .chunks
        .iter()
        .find(|c| c.logical <= logical && logical < c.logical + c.length)
        .expect("in a chunk");
    c.stripes[0] + (logical - c.logical)
}

/// 4 KiB blocks in which two images differ (the shorter read as zeros
/// past its end): what a block-based update sends.
pub fn differing_blocks(a: &Path, b: &Path) -> u64 {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    let n = x.len().max(y.len()).div_ceil(4096);
    let block = |v: &[u8], i: usize| -> Vec<u8> {
        let s = (i * 4096).min(v.len());
        let e = ((i + 1) * 4096).min(v.len());
        let mut b = v[s..e].to_vec();
        b.resize(4096, 0);
        b
    };
    (0..n).filter(|&i| block(&x, i) != block(&y, i)).count() as u64
}

//! Layout records and images as block-based updaters see them.

use btrfsimg::plan::record::{self, Record};
use std::fs;
use std::io::BufReader;
use std::path::Path;

/// The record at `p`, which must be valid.
pub fn read_record(p: &Path) -> Record {
    record::read(BufReader::new(fs::File::open(p).unwrap())).expect("a valid record")
}

/// The recorded chunk holding logical address `logical`.
fn chunk_of(r: &Record, logical: u64) -> &record::ChunkRecord {
    r.header
        .chunks
        .iter()
        .find(|c| c.logical <= logical && logical < c.logical + c.length)
        .expect("in a chunk")
}

/// Where logical address `logical` is in the image (first stripe).
pub fn physical(r: &Record, logical: u64) -> u64 {
    let c = chunk_of(r, logical);
    c.stripes[0] + (logical - c.logical)
}

/// 4 KiB blocks in which two images differ (the shorter read as zeros
/// past its end): what a block-based update sends.
pub fn differing_blocks(a: &Path, b: &Path) -> u64 {
    differing_block_list(a, b).len() as u64
}

/// The 4 KiB blocks of the image (every copy) that hold tree blocks, by
/// the record's block lines.
pub fn tree_block_indexes(r: &Record) -> Vec<u64> {
    let n = r.header.nodesize as u64;
    let mut out = Vec::new();
    for b in &r.blocks {
        let logical = b.block.5;
        let c = chunk_of(r, logical);
        for s in &c.stripes {
            let first = (s + logical - c.logical) / 4096;
            out.extend(first..first + n / 4096);
        }
    }
    out.sort_unstable();
    out
}

/// Indexes of the 4 KiB blocks in which two images differ.
pub fn differing_block_list(a: &Path, b: &Path) -> Vec<u64> {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    let n = x.len().max(y.len()).div_ceil(4096);
    let block = |v: &[u8], i: usize| -> Vec<u8> {
        let s = (i * 4096).min(v.len());
        let e = ((i + 1) * 4096).min(v.len());
        let mut b = v[s..e].to_vec();
        b.resize(4096, 0);
        b
    };
    (0..n)
        .filter(|&i| block(&x, i) != block(&y, i))
        .map(|i| i as u64)
        .collect()
}

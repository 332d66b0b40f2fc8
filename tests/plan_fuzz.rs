//! The planner fuzzed in CI: `BTRFSIMG_FUZZ_CASES` generated trees (default
//! 20,000, split over four tests so they run in parallel), hostile ones
//! included (hash-colliding names and xattrs, 255-byte names, deep paths,
//! thousands of hard links, items at and over the leaf limit, sparse files of
//! up to 4 PiB, every node size, both metadata profiles). Each is refused with
//! one line exactly when btrfs cannot hold it, and otherwise planned into an
//! image whose every block encodes and walks like a valid tree. The seeds are
//! fixed, so a run is reproducible; `BTRFSIMG_FUZZ_SEED=N` explores others.
//! `cargo bench --bench fuzz` runs millions of cases. No root needed.

mod common;

use common::fuzz::{check_spec, spec};
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

fn cases() -> u32 {
    std::env::var("BTRFSIMG_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn run(part: u64) {
    let seed = std::env::var("BTRFSIMG_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0x6274_7266_7369_6d67);
    let config = Config {
        cases: cases().div_ceil(4),
        rng_seed: RngSeed::Fixed(seed ^ part.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&spec(), |s| check_spec(&s).map_err(TestCaseError::fail));
    if let Err(e) = result {
        panic!("part {part}: {e}");
    }
}

#[test]
fn fuzz_part_0() {
    run(0);
}

#[test]
fn fuzz_part_1() {
    run(1);
}

#[test]
fn fuzz_part_2() {
    run(2);
}

#[test]
fn fuzz_part_3() {
    run(3);
}

//! The long fuzz run: the generator and checks of `tests/plan_fuzz.rs` for
//! `BTRFSIMG_FUZZ_CASES` cases (default 1,000,000) on every core, each worker
//! with its own seed from `BTRFSIMG_FUZZ_SEED` (default: the clock, printed so
//! a run can be repeated). Stops at the first failure and prints the minimal
//! failing case proptest shrinks it to. No root needed.
//!
//!     cargo bench --bench fuzz
//!     BTRFSIMG_FUZZ_CASES=10000000 BTRFSIMG_FUZZ_SEED=42 cargo bench --bench fuzz

#[path = "../tests/common/mod.rs"]
mod common;

use common::fuzz::{check_spec, spec};
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cases: u64 = std::env::var("BTRFSIMG_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("BTRFSIMG_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    // Cases per runner: small batches so progress shows and failures stop early.
    const BATCH: u64 = 1000;
    println!("fuzz: {cases} cases on {workers} threads, BTRFSIMG_FUZZ_SEED={seed}");
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let batch = next.fetch_add(1, Ordering::Relaxed);
                if batch * BATCH >= cases || failed.load(Ordering::Relaxed) {
                    return;
                }
                let config = Config {
                    cases: BATCH.min(cases - batch * BATCH) as u32,
                    rng_seed: RngSeed::Fixed(seed ^ batch.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    failure_persistence: None,
                    ..Config::default()
                };
                let mut runner = TestRunner::new(config);
                if let Err(e) = runner.run(&spec(), |s| check_spec(&s).map_err(TestCaseError::fail))
                {
                    failed.store(true, Ordering::Relaxed);
                    println!("FAILED in batch {batch} (seed {seed}): {e}");
                    return;
                }
                let done = (batch + 1) * BATCH;
                if done % (100 * BATCH) == 0 {
                    println!(
                        "{done} cases, {:.0} cases/s",
                        done as f64 / start.elapsed().as_secs_f64()
                    );
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        std::process::exit(1);
    }
    println!(
        "fuzz: {cases} cases passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
}

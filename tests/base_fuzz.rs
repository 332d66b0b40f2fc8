//! Hostile base layouts: a valid record of one tree, mutated at random
//! (numbers in file, entry and block lines set to edge values or to other
//! lines' values, lines duplicated, dropped or swapped), given as the base
//! of an update of a changed tree. Each is refused with an error, or planned
//! into an image whose every block encodes and walks like a valid tree:
//! never a panic, never a broken image. No root needed; in process.

mod common;

use btrfsimg::plan::base::Base;
use btrfsimg::plan::record;
use btrfsimg::source::generated::Entry;
use btrfsimg::source::Fill;
use btrfsimg::Options;
use common::fuzz::verify_encoding;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

fn n(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Store paths `p0..p11` but `skip`, each a few files and a hard link, a
/// symlink and an overlay directory; `extra` new paths.
fn tree(skip: &[usize], extra: usize) -> Entry {
    let mut store = BTreeMap::new();
    for i in (0..12).filter(|i| !skip.contains(i)) {
        let mut lib = BTreeMap::new();
        lib.insert(
            n("a.so"),
            Entry::file(9_000 + 3_000 * i as u64, Fill::Random(i as u64)),
        );
        lib.insert(
            n("small"),
            Entry::file(100 + i as u64, Fill::Text(i as u64)),
        );
        let mut linked = Entry::file(5_000, Fill::Random(100 + i as u64));
        linked.link = Some(i as u64);
        lib.insert(n("l1"), linked.clone());
        lib.insert(n("l2"), linked);
        lib.insert(n("link"), Entry::symlink(b"a.so"));
        let dir = Entry::dir(BTreeMap::from([(n("lib"), Entry::dir(lib))]));
        store.insert(n(&format!("{i:02}aaaa-p{i}")), dir);
    }
    for k in 0..extra {
        let f = Entry::file(20_000, Fill::Random(1000 + k as u64));
        store.insert(
            n(&format!("{k:02}zzzz-new{k}")),
            Entry::dir(BTreeMap::from([(n("data"), f)])),
        );
    }
    Entry::dir(BTreeMap::from([
        (
            n("nix"),
            Entry::dir(BTreeMap::from([(n("store"), Entry::dir(store))])),
        ),
        (
            n("etc"),
            Entry::dir(BTreeMap::from([(
                n("conf"),
                Entry::file(300, Fill::Text(7)),
            )])),
        ),
    ]))
}

fn opts(nodesize: u32, dup: bool) -> Options {
    Options {
        nodesize,
        metadata_dup: dup,
        fsid: Some([0x5a; 16]),
        ..Options::default()
    }
}

/// The record of `tree` as lines.
fn record_lines(root: &Entry, o: &Options) -> Vec<String> {
    let plan = btrfsimg::plan_generated(root, o).expect("the base plans");
    let mut v = Vec::new();
    record::write(&plan, &mut v).expect("writes");
    String::from_utf8(v)
        .expect("UTF-8")
        .lines()
        .map(str::to_string)
        .collect()
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Sets number `field` (in line order of appearance) of line `line`.
    Number {
        line: usize,
        field: usize,
        value: Value,
    },
    Duplicate(usize),
    Drop(usize),
    Swap(usize),
}

#[derive(Clone, Debug)]
enum Value {
    Edge(u64),
    /// The same field of another line.
    From(usize),
    Plus(i64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let edge = prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(255),
        Just(256),
        Just(257),
        Just(4096),
        Just(16384),
        Just(1 << 20),
        Just(1 << 48),
        Just((1 << 48) + 1),
        Just(u64::MAX),
        Just(u64::MAX - 8),
        any::<u32>().prop_map(u64::from),
    ];
    let value = prop_oneof![
        edge.prop_map(Value::Edge),
        any::<usize>().prop_map(Value::From),
        (-20_000i64..20_000).prop_map(Value::Plus),
    ];
    prop_oneof![
        6 => (any::<usize>(), any::<usize>(), value)
            .prop_map(|(line, field, value)| Mutation::Number { line, field, value }),
        1 => any::<usize>().prop_map(Mutation::Duplicate),
        1 => any::<usize>().prop_map(Mutation::Drop),
        1 => any::<usize>().prop_map(Mutation::Swap),
    ]
}

/// Visits the numbers of a JSON value in order; `f` sees each with its
/// position.
fn visit(
    v: &mut serde_json::Value,
    at: &mut usize,
    f: &mut dyn FnMut(usize, &mut serde_json::Value),
) {
    match v {
        serde_json::Value::Number(_) => {
            f(*at, v);
            *at += 1;
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| visit(x, at, f)),
        serde_json::Value::Object(m) => m.values_mut().for_each(|x| visit(x, at, f)),
        _ => {}
    }
}

fn count(v: &mut serde_json::Value) -> usize {
    let mut at = 0;
    visit(v, &mut at, &mut |_, _| {});
    at
}

/// Number `k` (modulo their count) of `v`, or sets it to `set`.
fn nth(v: &mut serde_json::Value, k: usize, set: Option<u64>) -> Option<u64> {
    let total = count(v);
    if total == 0 {
        return None;
    }
    let want = k % total;
    let mut found = None;
    let mut at = 0;
    visit(v, &mut at, &mut |i, x| {
        if i == want {
            found = x.as_u64();
            if let Some(n) = set {
                *x = n.into();
            }
        }
    });
    found
}

/// Applies `m` to `lines`, keeping the writer's spelling (compact JSON).
fn apply(lines: &mut Vec<String>, m: &Mutation) {
    let len = lines.len();
    match *m {
        Mutation::Number {
            line,
            field,
            ref value,
        } => {
            let i = line % len;
            let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&lines[i]) else {
                return;
            };
            let Some(old) = nth(&mut v, field, None) else {
                return;
            };
            let new = match *value {
                Value::Edge(e) => e,
                Value::From(j) => serde_json::from_str::<serde_json::Value>(&lines[j % len])
                    .ok()
                    .and_then(|mut o| nth(&mut o, field, None))
                    .unwrap_or(old),
                Value::Plus(d) => old.wrapping_add(d as u64),
            };
            nth(&mut v, field, Some(new));
            lines[i] = serde_json::to_string(&v).expect("serializes");
        }
        Mutation::Duplicate(i) => {
            let i = i % len;
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        Mutation::Drop(i) if len > 1 => {
            lines.remove(1 + i % (len - 1));
        }
        Mutation::Drop(_) => {}
        Mutation::Swap(i) if len > 2 => {
            let i = 1 + i % (len - 2);
            lines.swap(i, i + 1);
        }
        Mutation::Swap(_) => {}
    }
}

/// Outcomes: unreadable, refused as a base, refused by the planner, planned.
static OUTCOMES: [std::sync::atomic::AtomicUsize; 4] = [
    std::sync::atomic::AtomicUsize::new(0),
    std::sync::atomic::AtomicUsize::new(0),
    std::sync::atomic::AtomicUsize::new(0),
    std::sync::atomic::AtomicUsize::new(0),
];

fn outcome(k: usize) {
    OUTCOMES[k].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn check(base_lines: &[String], ms: &[Mutation], v2: &Entry, o: &Options) -> Result<(), String> {
    let mut lines = base_lines.to_vec();
    for m in ms {
        apply(&mut lines, m);
    }
    let text = lines.join("\n") + "\n";
    let Ok(rec) = record::read(text.as_bytes()) else {
        outcome(0);
        return Ok(());
    };
    let Ok(base) = Base::from_record(Path::new("fuzz.layout"), rec, o) else {
        outcome(1);
        return Ok(());
    };
    let with = Options {
        base: Some(Arc::new(base)),
        ..o.clone()
    };
    match btrfsimg::plan_generated(v2, &with) {
        Err(e) => {
            let s = e.to_string();
            if s.contains("internal error") || s.contains('\n') {
                return Err(format!("not a one-line input error: {s}"));
            }
            outcome(2);
            Ok(())
        }
        Ok(plan) => {
            outcome(3);
            verify_encoding(plan)
        }
    }
}

#[test]
fn mutated_base_records_are_refused_or_give_valid_images() {
    let cases = std::env::var("BTRFSIMG_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(3000, |c| (c / 50).max(50));
    let v1 = tree(&[], 0);
    let v2 = tree(&[3, 7], 2);
    for (k, (nodesize, dup)) in [(4096u32, true), (16384, false)].into_iter().enumerate() {
        let o = opts(nodesize, dup);
        let lines = record_lines(&v1, &o);
        // The record as it is: an update that keeps most of it.
        check(&lines, &[], &v2, &o).expect("the unmutated base");
        let config = Config {
            cases,
            rng_seed: RngSeed::Fixed(0x6261_7365 + k as u64),
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let r = runner.run(&proptest::collection::vec(mutation(), 1..5), |ms| {
            check(&lines, &ms, &v2, &o).map_err(TestCaseError::fail)
        });
        if let Err(e) = r {
            panic!("node size {nodesize}: {e}");
        }
    }
    let o: Vec<usize> = OUTCOMES
        .iter()
        .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    eprintln!(
        "{} unreadable, {} refused as a base, {} refused by the planner, {} planned and verified",
        o[0], o[1], o[2], o[3]
    );
    // The mutations must reach the planner, not only the parser.
    assert!(o[3] > o.iter().sum::<usize>() / 4, "{o:?}");
}

//! Property test: seeded random trees mixing every kind of entry (directories,
//! files of boundary and random sizes, sparse files, symlinks, hard links,
//! fifos, sockets, devices, xattrs including ACLs and capabilities, odd and
//! non-UTF-8 names, modes, owners, nanosecond and negative mtimes). Each case
//! is exported, checked with `btrfs check --readonly --check-data-csum`,
//! loop-mounted and compared entry by entry, and re-exported byte-identically.
//! Two cases in three are built on a tmpfs (xattrs up to a full leaf item,
//! any time), the third on a loop-mounted ext4 (its block accounting, smaller
//! xattrs, times clamped to 1901..2446 by ext4 itself).
//!
//! - `BTRFSIMG_PROPERTY_CASES=N`: number of cases (default 200), seeds
//!   `BTRFSIMG_PROPERTY_FIRST_SEED` (default 0) onwards.
//! - `BTRFSIMG_PROPERTY_SEED=N`: replay exactly one case (printed as
//!   `seed = N` when a case fails).
//!
//! Needs root, loop devices and btrfs-progs (see tests/common/mod.rs).

mod common;

use common::*;
use rand::seq::IndexedRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashSet};
use std::env;
use std::path::Path;
use std::time::Instant;

const CASES_ENV: &str = "BTRFSIMG_PROPERTY_CASES";
const FIRST_SEED_ENV: &str = "BTRFSIMG_PROPERTY_FIRST_SEED";
const SEED_ENV: &str = "BTRFSIMG_PROPERTY_SEED";
const DEFAULT_CASES: u64 = 200;

/// The largest xattr name + value one 16 KiB-node XATTR_ITEM holds.
const MAX_XATTR: usize = 16384 - 101 - 25 - 30;

const BOUNDARY_SIZES: &[u64] = &[
    0, 1, 2, 100, 2047, 2048, 2049, 4095, 4096, 4097, 8191, 8192, 8193, 65536, 131_073,
];

fn env_u64(name: &str) -> Option<u64> {
    env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// What a generated tree contains, summed over cases for the log.
#[derive(Default, Debug)]
struct Stats {
    counts: BTreeMap<&'static str, u64>,
}

impl Stats {
    fn add(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }
}

/// True when the case of `seed` is built on ext4 (else on tmpfs).
fn on_ext4(seed: u64) -> bool {
    seed % 3 == 2
}

struct Gen<'a> {
    rng: ChaCha8Rng,
    /// ext4 keeps an inode's xattrs in one 4 KiB block: smaller values.
    ext4: bool,
    t: TreeBuilder,
    dirs: Vec<Vec<u8>>,
    /// Non-directories that can get another name.
    linkable: Vec<Vec<u8>>,
    used: HashSet<Vec<u8>>,
    stats: &'a mut Stats,
}

impl Gen<'_> {
    fn name(&mut self) -> Vec<u8> {
        let r = &mut self.rng;
        let name: Vec<u8> = match r.random_range(0..100) {
            0..70 => {
                const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789._-";
                let n = r.random_range(1..=12);
                (0..n).map(|_| *CHARS.choose(r).unwrap()).collect()
            }
            70..80 => {
                self.stats.add("raw-byte names");
                let n = r.random_range(1..=40);
                (0..n)
                    .map(|_| loop {
                        let b = r.random::<u8>();
                        if b != 0 && b != b'/' {
                            break b;
                        }
                    })
                    .collect()
            }
            80..88 => {
                self.stats.add("names of 200-255 bytes");
                let n = r.random_range(200..=255);
                let c = b'A' + r.random_range(0..26u8);
                vec![c; n]
            }
            88..93 => {
                self.stats.add("hash-colliding names");
                [&b"zkeigdqd"[..], b"rmjmtlgc"].choose(r).unwrap().to_vec()
            }
            _ => [
                "caf\u{e9}",
                "\u{2603} snow",
                "new\nline",
                " sp ace ",
                "\u{1f600}",
            ]
            .choose(r)
            .unwrap()
            .as_bytes()
            .to_vec(),
        };
        if name == b"." || name == b".." {
            return b"dot".to_vec();
        }
        name
    }

    /// A fresh relative path in a random directory.
    fn fresh_path(&mut self) -> Vec<u8> {
        let parent = self.dirs.choose(&mut self.rng).unwrap().clone();
        let mut name = self.name();
        loop {
            let mut rel = parent.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&name);
            if self.used.insert(rel.clone()) {
                return rel;
            }
            if name.len() >= 250 {
                name.truncate(200);
            }
            name.push(b'0' + self.rng.random_range(0..10u8));
        }
    }

    fn size(&mut self) -> u64 {
        if self.rng.random_bool(0.5) {
            *BOUNDARY_SIZES.choose(&mut self.rng).unwrap()
        } else {
            self.rng.random_range(0..300_000)
        }
    }

    fn entry(&mut self) {
        let rel = self.fresh_path();
        let depth = rel.iter().filter(|&&b| b == b'/').count();
        let kind = self.rng.random_range(0..100);
        match kind {
            0..15 if depth < 5 => {
                self.t.dir(&rel);
                self.dirs.push(rel.clone());
                self.stats.add("directories");
            }
            0..45 => {
                let size = self.size();
                let seed = self.rng.next_u64();
                self.t.random_file(&rel, size, seed);
                self.linkable.push(rel.clone());
                self.stats.add("files");
            }
            45..55 => {
                let small = self.rng.random_bool(0.5);
                let size = if small {
                    self.rng.random_range(1..=64 * KIB)
                } else {
                    self.rng.random_range(1..=16 * MIB)
                };
                let mut chunks: Vec<(u64, Vec<u8>)> = Vec::new();
                for _ in 0..self.rng.random_range(0..=4) {
                    let len = self
                        .rng
                        .random_range(1..=if small { 8192 } else { 20_000usize });
                    let off = self.rng.random_range(0..size);
                    let mut d = vec![0u8; len];
                    self.rng.fill_bytes(&mut d);
                    chunks.push((off, d));
                }
                let refs: Vec<(u64, &[u8])> = chunks.iter().map(|(o, d)| (*o, &d[..])).collect();
                // set_len after the writes: chunks may run past `size`.
                self.t.sparse_file(&rel, size, &refs);
                self.linkable.push(rel.clone());
                self.stats.add("sparse files");
            }
            55..65 => {
                let len = if self.rng.random_bool(0.05) {
                    self.stats.add("symlink targets > 3000 bytes");
                    self.rng.random_range(3000..=4095)
                } else {
                    self.rng.random_range(1..=200)
                };
                let target: Vec<u8> = (0..len)
                    .map(|_| loop {
                        let b = self.rng.random::<u8>();
                        if b != 0 {
                            break b;
                        }
                    })
                    .collect();
                self.t.symlink(&rel, &target);
                self.linkable.push(rel.clone());
                self.stats.add("symlinks");
            }
            65..77 if !self.linkable.is_empty() => {
                let existing = self.linkable.choose(&mut self.rng).unwrap().clone();
                self.t.hardlink(&existing, &rel);
                self.linkable.push(rel.clone());
                self.stats.add("hard links");
                return; // attributes belong to the inode, set via its first name
            }
            65..83 => {
                self.t.fifo(&rel);
                self.linkable.push(rel.clone());
                self.stats.add("fifos");
            }
            83..88 => {
                self.t.socket(&rel);
                self.linkable.push(rel.clone());
                self.stats.add("sockets");
            }
            _ => {
                let (ma, mi) = (
                    self.rng.random_range(0..4096u32),
                    self.rng.random_range(0..1u32 << 20),
                );
                if self.rng.random_bool(0.5) {
                    self.t.char_dev(&rel, ma, mi);
                } else {
                    self.t.block_dev(&rel, ma, mi);
                }
                self.linkable.push(rel.clone());
                self.stats.add("devices");
            }
        }
        self.attributes(&rel);
    }

    fn attributes(&mut self, rel: &[u8]) {
        let md = std::fs::symlink_metadata(self.t.path(rel)).unwrap();
        let ft = md.file_type();
        let (is_link, is_dir, is_file) = (ft.is_symlink(), ft.is_dir(), ft.is_file());
        if !is_link && self.rng.random_bool(0.4) {
            let mode = self.rng.random_range(0..0o10000u32);
            self.t.chmod(rel, mode);
            self.stats.add("random modes");
        }
        if self.rng.random_bool(0.3) {
            let ids = [0, 1, 33, 1000, 65534, self.rng.random_range(0..1u32 << 31)];
            let (u, g) = (
                *ids.choose(&mut self.rng).unwrap(),
                *ids.choose(&mut self.rng).unwrap(),
            );
            self.t.chown(rel, u, g);
            self.stats.add("owners");
        }
        if self.rng.random_bool(0.4) {
            let sec = match self.rng.random_range(0..4) {
                0 => self.rng.random_range(-(1i64 << 35)..0),
                1 => self.rng.random_range((1i64 << 31)..(1i64 << 35)),
                _ => self.rng.random_range(0..(1i64 << 31)),
            };
            let nsec = *[0, 1, 999_999_999, self.rng.random_range(0..1_000_000_000)]
                .choose(&mut self.rng)
                .unwrap();
            self.t.mtime(rel, sec, nsec);
            self.stats.add(if sec < 0 {
                "mtimes before 1970"
            } else {
                "explicit mtimes"
            });
        }
        if self.rng.random_bool(0.3) {
            // user.* only on files and directories (the kernel's rule).
            let spaces: &[&str] = if is_file || is_dir {
                &["user.", "trusted.", "security."]
            } else {
                &["trusted.", "security."]
            };
            let mut names = HashSet::new();
            let most = if self.ext4 { 3 } else { 5 };
            for _ in 0..self.rng.random_range(1..=most) {
                let ns = *spaces.choose(&mut self.rng).unwrap();
                let mut name = ns.as_bytes().to_vec();
                let n = self.rng.random_range(1..=20);
                name.extend((0..n).map(|_| b'a' + self.rng.random_range(0..26u8)));
                if !names.insert(name.clone()) {
                    continue;
                }
                let len = match self.rng.random_range(0..20) {
                    0..4 => 0,
                    4..8 if self.ext4 => self.rng.random_range(0..600),
                    4 => {
                        self.stats.add("xattrs filling a leaf item");
                        MAX_XATTR - name.len()
                    }
                    5..8 => self.rng.random_range(0..4000),
                    _ => self.rng.random_range(0..64),
                };
                let mut v = vec![0u8; len];
                self.rng.fill_bytes(&mut v);
                self.t.xattr(rel, &name, &v);
                self.stats.add("xattrs");
            }
        }
        if (is_file || is_dir) && self.rng.random_bool(0.1) {
            let acl = self.acl();
            self.t.xattr(rel, b"system.posix_acl_access", &acl);
            self.stats.add("ACLs");
            if is_dir && self.rng.random_bool(0.5) {
                let acl = self.acl();
                self.t.xattr(rel, b"system.posix_acl_default", &acl);
                self.stats.add("default ACLs");
            }
        }
        if is_file && self.rng.random_bool(0.05) {
            // security.capability, VFS_CAP_REVISION_2 with the effective flag.
            let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
            for _ in 0..4 {
                v.extend((self.rng.random::<u32>() & 0xff).to_le_bytes());
            }
            self.t.xattr(rel, b"security.capability", &v);
            self.stats.add("capabilities");
        }
    }

    /// A valid POSIX ACL xattr value: owner, named users and groups in id
    /// order, the owning group, the mask, others.
    fn acl(&mut self) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        let mut entry = |tag: u16, perm: u16, id: u32| {
            v.extend(tag.to_le_bytes());
            v.extend(perm.to_le_bytes());
            v.extend(id.to_le_bytes());
        };
        let r = &mut self.rng;
        entry(1, r.random_range(0..8), u32::MAX);
        let mut users: Vec<u32> = (0..r.random_range(0..3))
            .map(|_| r.random_range(0..70_000))
            .collect();
        users.sort_unstable();
        users.dedup();
        for &u in &users {
            entry(2, r.random_range(0..8), u);
        }
        entry(4, r.random_range(0..8), u32::MAX);
        let mut groups: Vec<u32> = (0..r.random_range(0..3))
            .map(|_| r.random_range(0..70_000))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        for &g in &groups {
            entry(8, r.random_range(0..8), g);
        }
        if !users.is_empty() || !groups.is_empty() || r.random_bool(0.5) {
            entry(0x10, r.random_range(0..8), u32::MAX);
        }
        entry(0x20, r.random_range(0..8), u32::MAX);
        v
    }
}

/// Builds the random tree of `seed` at `root` (which must not exist).
fn generate(root: &Path, seed: u64, stats: &mut Stats) {
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
        ext4: on_ext4(seed),
        t: TreeBuilder::new(root),
        dirs: vec![Vec::new()],
        linkable: Vec::new(),
        used: HashSet::new(),
        stats,
    };
    let n = g.rng.random_range(1..=30);
    for _ in 0..n {
        g.entry();
    }
    if g.rng.random_bool(0.2) {
        g.attributes(b"");
    }
    g.t.finalize();
}

fn case_uuid(seed: u64) -> String {
    format!("0b0d0a0e-0003-4000-8000-{:012x}", seed & 0xffff_ffff_ffff)
}

/// One case: generate, export, check, mount, compare, re-export.
fn run_case(src_root: &Path, work: &Path, seed: u64, stats: &mut Stats) {
    let src = src_root.join(format!("case-{seed}"));
    stats.add(if on_ext4(seed) {
        "cases on ext4"
    } else {
        "cases on tmpfs"
    });
    generate(&src, seed, stats);
    let uuid = case_uuid(seed);
    let args = ["-U", uuid.as_str(), "--timestamp", "1700000000"];
    let img = work.join(format!("case-{seed}.img"));
    export(&src, &img, &args);
    btrfs_check(&img);
    let m = LoopMount::new(&img, false);
    compare_trees(&src, m.path(), CompareOpts::default());
    m.unmount();
    assert_export_matches(&src, &img, &args);
    std::fs::remove_file(&img).unwrap();
    std::fs::remove_dir_all(&src).unwrap();
}

#[test]
fn random_trees_round_trip() {
    if !tools_available("random_trees_round_trip", &["mkfs.ext4"]) {
        return;
    }
    if !system_tests_available("random_trees_round_trip")
        || skip_in_mkfs_mode("random_trees_round_trip")
    {
        return;
    }
    let seeds: Vec<u64> = match env_u64(SEED_ENV) {
        Some(s) => vec![s],
        None => {
            let first = env_u64(FIRST_SEED_ENV).unwrap_or(0);
            let n = env_u64(CASES_ENV).unwrap_or(DEFAULT_CASES);
            (first..first + n).collect()
        }
    };
    let tmp = ScratchFs::tmpfs("property", 512 * MIB);
    let ext4 = ScratchFs::ext4("property", GIB);
    let root_for = |seed: u64| {
        if on_ext4(seed) {
            ext4.path()
        } else {
            tmp.path()
        }
    };
    // Images on the tmpfs too: less disk writeback between cases.
    let work = tmp.path().join("images");
    std::fs::create_dir(&work).unwrap();
    let mut stats = Stats::default();
    let mut failed: Vec<(u64, String)> = Vec::new();
    let start = Instant::now();
    for &seed in &seeds {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_case(root_for(seed), &work, seed, &mut stats)
        }));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            eprintln!("property case failed: seed = {seed} (replay with {SEED_ENV}={seed})\n{msg}");
            failed.push((seed, msg));
            let _ = std::fs::remove_dir_all(root_for(seed).join(format!("case-{seed}")));
        }
    }
    eprintln!(
        "random_trees_round_trip: {} cases in {:.1?}; generated: {:?}",
        seeds.len(),
        start.elapsed(),
        stats.counts
    );
    assert!(
        failed.is_empty(),
        "{} of {} property cases failed: seeds {:?} (replay one with {SEED_ENV}=N)",
        failed.len(),
        seeds.len(),
        failed.iter().map(|f| f.0).collect::<Vec<_>>()
    );
}

/// The generator is a function of the seed (so a printed seed replays the
/// same tree), and different seeds make different trees.
#[test]
fn generator_is_deterministic() {
    if !system_tests_available("generator_is_deterministic") {
        return;
    }
    let tmp = ScratchFs::tmpfs("property-gen", 256 * MIB);
    let mut stats = Stats::default();
    for seed in [3, 77, 1234] {
        let (a, b) = (
            tmp.path().join(format!("a{seed}")),
            tmp.path().join(format!("b{seed}")),
        );
        generate(&a, seed, &mut stats);
        generate(&b, seed, &mut stats);
        compare_trees(&a, &b, CompareOpts::default());
        let c = tmp.path().join(format!("c{seed}"));
        generate(&c, seed + 1, &mut stats);
        assert!(
            !tree_differences(&a, &c, CompareOpts::default()).is_empty(),
            "seeds {seed} and {} made the same tree",
            seed + 1
        );
    }
}

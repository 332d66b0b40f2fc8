//! The planner under fuzzing: a proptest generator of whole source trees and
//! image options, hostile ones included, a prediction of which trees btrfs
//! cannot hold (and so must be refused), and a structural check of every
//! encoded block of the ones it can. Shared by `tests/plan_fuzz.rs` (the CI
//! run), `tests/model_system.rs` (a sample exported and checked by the kernel
//! and btrfs-progs) and `benches/fuzz.rs` (millions of cases).

#![allow(unused_imports, dead_code)]

use super::*;
use btrfsimg::format::hash::{extref_hash, name_hash};
use btrfsimg::format::{
    max_csums_per_item, max_item_size, CsumType, Key, Timespec, HEADER_SIZE, ITEM_HEADER_SIZE,
    KEY_PTR_SIZE,
};
use btrfsimg::plan::space::RegionKind;
use btrfsimg::plan::{Plan, TreeId};
use btrfsimg::source::generated::{Content, Entry, Meta};
use btrfsimg::source::{Fill, Segment};
use btrfsimg::{plan_generated, Image, Options};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use std::collections::{BTreeMap, VecDeque};

/// One generated case: the options and the tree.
#[derive(Clone, Debug)]
pub struct Spec {
    pub opts: Options,
    pub root: Entry,
}

const KIB: u64 = 1024;

fn short_name() -> impl Strategy<Value = Vec<u8>> {
    "[a-z0-9._-]{1,10}".prop_map(|s| s.into_bytes())
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => short_name(),
        1 => vec(1u8..=255, 1..=255),
        1 => Just(vec![b'n'; 255]),
        1 => (1usize..=255).prop_map(|n| vec![b'L'; n]),
    ]
    .prop_map(|mut n| {
        for b in n.iter_mut() {
            if *b == b'/' {
                *b = b'_';
            }
        }
        if n == b"." || n == b".." {
            n.push(b'x');
        }
        n
    })
}

fn time() -> impl Strategy<Value = Timespec> {
    prop_oneof![
        4 => (1_600_000_000i64..1_700_000_000, 0u32..1_000_000_000),
        1 => (-62_135_596_800i64..253_402_300_799, 0u32..1_000_000_000),
        1 => Just((0, 0)),
    ]
    .prop_map(|(sec, nsec)| Timespec { sec, nsec })
}

fn xattrs() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    prop_oneof![
        6 => Just(Vec::new()),
        2 => btree_map(
            "(user|trusted|security)\\.[a-z]{1,12}".prop_map(String::into_bytes),
            vec(any::<u8>(), 0..64),
            1..4
        )
        .prop_map(|m| m.into_iter().collect()),
    ]
}

fn meta(perm: impl Strategy<Value = u32>) -> impl Strategy<Value = Meta> {
    (
        perm,
        prop_oneof![4 => Just(0u32), 1 => 0u32..70000, 1 => Just(u32::MAX - 1)],
        prop_oneof![4 => Just(0u32), 1 => 0u32..70000],
        time(),
        xattrs(),
    )
        .prop_map(|(perm, uid, gid, mtime, xattrs)| Meta {
            perm,
            uid,
            gid,
            mtime,
            xattrs,
        })
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        3 => any::<u64>().prop_map(Fill::Random),
        1 => Just(Fill::Zeros),
        2 => any::<u64>().prop_map(Fill::Text),
    ]
}

fn file() -> impl Strategy<Value = Entry> {
    let size = prop_oneof![
        3 => 0u64..3000,
        2 => prop_oneof![Just(2047u64), Just(2048), Just(2049), Just(4095), Just(4096), Just(4097)],
        2 => 3000u64..300 * KIB,
        1 => Just(0u64),
    ];
    (meta(0u32..0o7777), size, fill(), any::<bool>()).prop_map(|(meta, size, fill, holes)| {
        // Some files get holes: data in every other 16 KiB, unaligned edges.
        let data = (holes && size > 20 * KIB).then(|| {
            (0..size / (32 * KIB))
                .map(|i| Segment {
                    offset: i * 32 * KIB + 100,
                    len: 9000,
                })
                .filter(|s| s.offset + s.len <= size)
                .collect::<Vec<_>>()
        });
        Entry {
            meta,
            content: Content::File { size, data, fill },
            link: None,
        }
    })
}

fn special() -> impl Strategy<Value = Entry> {
    let content = prop_oneof![
        4 => prop_oneof![
            60 => vec(1u8..=255, 1..64),
            1 => vec(1u8..=255, 3940..=3960),
            1 => vec(1u8..=255, 4090..=4096),
        ]
        .prop_map(Content::Symlink),
        1 => Just(Content::Fifo),
        1 => Just(Content::Socket),
        1 => (0u64..4096, 0u64..(1 << 20)).prop_map(|(ma, mi)| Content::CharDev(ma << 20 | mi)),
        1 => (0u64..4096, 0u64..(1 << 20)).prop_map(|(ma, mi)| Content::BlockDev(ma << 20 | mi)),
    ];
    (meta(0u32..0o7777), content).prop_map(|(mut meta, content)| {
        if let Content::Symlink(_) = content {
            meta.perm = 0o777;
        }
        Entry {
            meta,
            content,
            link: None,
        }
    })
}

fn tree() -> impl Strategy<Value = Entry> {
    let leaf = prop_oneof![5 => file(), 2 => special()];
    leaf.prop_recursive(5, 96, 10, |inner| {
        (meta(0u32..0o7777), btree_map(name(), inner, 0..10)).prop_map(|(meta, kids)| Entry {
            meta,
            content: Content::Dir(kids),
            link: None,
        })
    })
}

/// Something hostile added to a generated tree.
#[derive(Clone, Debug)]
pub enum Adversity {
    /// `count` names of `len` bytes sharing one name hash, in one directory.
    CollidingNames {
        dir: usize,
        count: usize,
        len: usize,
        hash: u32,
    },
    /// xattrs sharing one name hash on one entry.
    CollidingXattrs {
        at: usize,
        count: usize,
        value: usize,
        hash: u32,
    },
    /// One xattr near (or over) the largest item.
    HugeXattr { at: usize, slack: i64 },
    /// A file with `count` names spread over up to `dirs` directories.
    Links {
        dir: usize,
        count: usize,
        dirs: usize,
        long: bool,
    },
    /// A chain of `depth` directories with names of `len` bytes.
    Deep {
        dir: usize,
        depth: usize,
        len: usize,
    },
    /// A sparse file of 2^`log2` bytes with a few data ranges.
    Sparse { dir: usize, log2: u32, segs: usize },
    /// Many entries in one directory (multi-level trees at small node sizes).
    Wide { dir: usize, count: usize },
    /// Files with equal content (not hard links), for dedupe.
    Copies {
        dir: usize,
        count: usize,
        size: u64,
        text: bool,
    },
}

fn adversity() -> impl Strategy<Value = Adversity> {
    prop_oneof![
        (any::<usize>(), 2usize..80, 100usize..=255, any::<u32>()).prop_map(
            |(dir, count, len, hash)| Adversity::CollidingNames {
                dir,
                count,
                len,
                hash
            }
        ),
        (any::<usize>(), 2usize..5, 0usize..40000, any::<u32>()).prop_map(
            |(at, count, value, hash)| Adversity::CollidingXattrs {
                at,
                count,
                value,
                hash
            }
        ),
        (any::<usize>(), -40i64..40).prop_map(|(at, slack)| Adversity::HugeXattr { at, slack }),
        (any::<usize>(), 2usize..3000, 1usize..20, any::<bool>()).prop_map(
            |(dir, count, dirs, long)| Adversity::Links {
                dir,
                count,
                dirs,
                long
            }
        ),
        (any::<usize>(), 10usize..200, 1usize..=255).prop_map(|(dir, depth, len)| {
            Adversity::Deep {
                dir,
                depth,
                len: len.min(60),
            }
        }),
        (any::<usize>(), 30u32..=52, 1usize..6).prop_map(|(dir, log2, segs)| Adversity::Sparse {
            dir,
            log2,
            segs
        }),
        (any::<usize>(), 100usize..3000).prop_map(|(dir, count)| Adversity::Wide { dir, count }),
        (any::<usize>(), 2usize..40, 4097u64..200_000, any::<bool>()).prop_map(
            |(dir, count, size, text)| Adversity::Copies {
                dir,
                count,
                size,
                text
            }
        ),
    ]
}

fn options() -> impl Strategy<Value = Options> {
    (
        prop_oneof![
            Just(4096u32),
            Just(8192),
            Just(16384),
            Just(32768),
            Just(65536)
        ],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![4 => Just(2048u64), 1 => Just(0u64), 1 => 0u64..=4095],
        proptest::option::of((0u32..3, 0u32..3)),
        prop_oneof![3 => Just(Vec::new()), 1 => vec(any::<u8>(), 0..=255)],
        prop_oneof![
            9 => Just(None),
            1 => (1u32..=15).prop_map(|l| Some(format!("zstd:{l}"))),
            1 => (1u32..=9).prop_map(|l| Some(format!("zlib:{l}"))),
                        1 => Just(Some("lzo".to_string())),
        ],
        proptest::bool::weighted(0.12),
        prop_oneof![
            6 => Just(CsumType::Crc32c),
            1 => Just(CsumType::Xxhash),
            1 => Just(CsumType::Sha256),
            1 => Just(CsumType::Blake2),
        ],
        proptest::bool::weighted(0.25),
    )
        .prop_map(
            |(nodesize, dup, slack, max_inline, owner, label, compress, dedupe, csum, bgt)| {
                Options {
                    dedupe,
                    csum,
                    block_group_tree: bgt,
                    compression: compress.and_then(|c| {
                        btrfsimg::compress::Compression::parse(&c).expect("valid spelling")
                    }),
                    nodesize,
                    metadata_dup: dup,
                    rw_slack: slack,
                    max_inline,
                    owner,
                    label,
                    fsid: Some([0x5a; 16]),
                    timestamp: 1_700_000_000,
                    ..Options::default()
                }
            },
        )
}

/// Whole cases: options, a random tree, and up to three adversities.
pub fn spec() -> impl Strategy<Value = Spec> {
    (
        options(),
        meta(0u32..0o7777),
        btree_map(name(), tree(), 0..12),
        vec(adversity(), 0..3),
        proptest::option::weighted(0.05, (any::<usize>(), 0usize..4)),
        proptest::option::weighted(0.2, vec((any::<prop::sample::Index>(), 0u8..4), 1..4)),
        proptest::option::weighted(0.2, vec((any::<prop::sample::Index>(), 0u8..3), 1..4)),
    )
        .prop_map(|(opts, meta, kids, adv, extref, subvols, flags)| {
            let mut root = Entry {
                meta,
                content: Content::Dir(kids),
                link: None,
            };
            for (i, a) in adv.iter().enumerate() {
                apply(&mut root, a, i as u64);
            }
            if let Some((dir, over)) = extref {
                colliding_links(&mut root, dir, over, opts.nodesize);
            }
            let mut spec = Spec { opts, root };
            // Subvolumes on trees btrfs can hold (the model of the limits
            // numbers inodes as one tree; splitting only removes items).
            if let Some(picks) = subvols.filter(|_| extref.is_none()) {
                if predicted_errors(&spec).is_empty() {
                    spec.opts.subvolumes = subvolume_picks(&spec.root, &picks);
                }
            }
            if let Some(picks) = flags {
                spec.opts.inode_flags = inode_flag_picks(&spec.root, &picks);
            }
            spec
        })
}

/// `--inode-flags` specs for the entries `picks` selects (the root
/// included, symlinks not: kind 0 nodatacow, 1 nodatasum, 2 both).
fn inode_flag_picks(
    root: &Entry,
    picks: &[(prop::sample::Index, u8)],
) -> Vec<btrfsimg::plan::inode_flags::InodeFlagsSpec> {
    let mut entries: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut q: VecDeque<(Vec<Vec<u8>>, &Entry)> = VecDeque::from([(Vec::new(), root)]);
    while let Some((p, e)) = q.pop_front() {
        match &e.content {
            Content::Dir(kids) => {
                for (n, k) in kids {
                    let mut c = p.clone();
                    c.push(n.clone());
                    q.push_back((c, k));
                }
            }
            Content::Symlink(_) => continue,
            _ => {}
        }
        entries.push(p);
    }
    picks
        .iter()
        .map(|(i, kind)| btrfsimg::plan::inode_flags::InodeFlagsSpec {
            path: entries[i.index(entries.len())].join(&b'/'),
            nodatacow: *kind != 1,
            nodatasum: *kind != 0,
        })
        .collect()
}

/// Subvolume specs for the directories `picks` selects (kind: 0 rw, 1 ro,
/// 2 default, 3 default-ro; only the first default stays one).
fn subvolume_picks(
    root: &Entry,
    picks: &[(prop::sample::Index, u8)],
) -> Vec<btrfsimg::plan::subvol::SubvolSpec> {
    let mut dirs: Vec<Vec<u8>> = Vec::new();
    let mut q: VecDeque<(Vec<u8>, &Entry)> = VecDeque::from([(Vec::new(), root)]);
    while let Some((p, e)) = q.pop_front() {
        if let Content::Dir(kids) = &e.content {
            if !p.is_empty() {
                dirs.push(p.clone());
            }
            for (n, k) in kids {
                let mut c = p.clone();
                if !c.is_empty() {
                    c.push(b'/');
                }
                c.extend_from_slice(n);
                q.push_back((c, k));
            }
        }
    }
    if dirs.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<btrfsimg::plan::subvol::SubvolSpec> = Vec::new();
    for (i, kind) in picks {
        let path = dirs[i.index(dirs.len())].clone();
        if out.iter().any(|s| s.path == path) {
            continue;
        }
        let default = *kind >= 2 && !out.iter().any(|s| s.default);
        out.push(btrfsimg::plan::subvol::SubvolSpec {
            path,
            mountpoint: None,
            readonly: kind % 2 == 1,
            default,
        });
    }
    out
}

/// The inode number the planner gives the directory at `path`: breadth-first
/// order with names sorted, one number per inode (hard links share theirs).
fn ino_of(root: &Entry, path: &[Vec<u8>]) -> u64 {
    let mut q: VecDeque<(Vec<Vec<u8>>, &Entry)> = VecDeque::from([(Vec::new(), root)]);
    let mut seen_links = std::collections::BTreeSet::new();
    let mut next = 256;
    while let Some((p, e)) = q.pop_front() {
        let first = match (e.link, &e.content) {
            (Some(id), c) if !matches!(c, Content::Dir(_)) => seen_links.insert(id),
            _ => true,
        };
        if p == path {
            return next;
        }
        if first {
            next += 1;
        }
        if let Content::Dir(kids) = &e.content {
            for (n, k) in kids {
                let mut c = p.clone();
                c.push(n.clone());
                q.push_back((c, k));
            }
        }
    }
    unreachable!("the directory exists")
}

/// A file whose hard-link names in one directory first fill its INODE_REF
/// item, then share one INODE_EXTREF hash (one name per length, since names
/// of one length that share one crc32c hash share them all): as many as fit
/// one item, plus `over` more.
fn colliding_links(root: &mut Entry, dir: usize, over: usize, nodesize: u32) {
    let max = max_item_size(nodesize);
    let dirs = dirs_of(root);
    let d = dirs[dir % dirs.len()].clone();
    let parent = ino_of(root, &d);
    let mut f = Entry::file(7, Fill::Text(7));
    f.link = Some(7_777_777);
    let k = kids(at_path(root, &d));
    for i in 0..max / 265 + 1 {
        let mut n = format!("a-link-{i:04}").into_bytes();
        n.resize(255, b'f');
        k.insert(n, f.clone());
    }
    let mut total = 0;
    let mut extra = 0;
    for len in (100..=255).rev() {
        if total + 18 + len > max {
            if extra == over {
                break;
            }
            extra += 1;
        }
        total += 18 + len;
        k.insert(
            names_with_extref_hash(parent, 1, len, 0xe17e, b"z").remove(0),
            f.clone(),
        );
    }
}

/// Paths (as name lists) of every directory, breadth-first.
fn dirs_of(root: &Entry) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut q: VecDeque<(Vec<Vec<u8>>, &Entry)> = VecDeque::from([(Vec::new(), root)]);
    while let Some((p, e)) = q.pop_front() {
        if let Content::Dir(kids) = &e.content {
            for (n, k) in kids {
                let mut c = p.clone();
                c.push(n.clone());
                q.push_back((c, k));
            }
            out.push(p);
        }
    }
    out
}

/// Every entry's path, breadth-first (the root first).
fn entries_of(root: &Entry) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut q: VecDeque<(Vec<Vec<u8>>, &Entry)> = VecDeque::from([(Vec::new(), root)]);
    while let Some((p, e)) = q.pop_front() {
        if let Content::Dir(kids) = &e.content {
            for (n, k) in kids {
                let mut c = p.clone();
                c.push(n.clone());
                q.push_back((c, k));
            }
        }
        out.push(p);
    }
    out
}

fn at_path<'a>(root: &'a mut Entry, path: &[Vec<u8>]) -> &'a mut Entry {
    let mut e = root;
    for n in path {
        let Content::Dir(kids) = &mut e.content else {
            unreachable!("paths lead through directories")
        };
        e = kids.get_mut(n).expect("path exists");
    }
    e
}

fn kids(e: &mut Entry) -> &mut BTreeMap<Vec<u8>, Entry> {
    match &mut e.content {
        Content::Dir(k) => k,
        _ => unreachable!("a directory"),
    }
}

fn apply(root: &mut Entry, a: &Adversity, salt: u64) {
    let dirs = dirs_of(root);
    let pick = |i: usize| dirs[i % dirs.len()].clone();
    match *a {
        Adversity::CollidingNames {
            dir,
            count,
            len,
            hash,
        } => {
            let d = pick(dir);
            let k = kids(at_path(root, &d));
            for n in names_with_hash(count, len, hash, b"") {
                k.insert(n, Entry::file(salt, Fill::Random(salt)));
            }
        }
        Adversity::CollidingXattrs {
            at,
            count,
            value,
            hash,
        } => {
            let all = entries_of(root);
            let e = at_path(root, &all[at % all.len()]);
            for n in names_with_hash(count, 30, hash, b"user.") {
                e.meta.xattrs.push((n, vec![7u8; value]));
            }
            e.meta.xattrs.sort();
            e.meta.xattrs.dedup_by(|a, b| a.0 == b.0);
        }
        Adversity::HugeXattr { at, slack } => {
            let all = entries_of(root);
            let e = at_path(root, &all[at % all.len()]);
            // Near the largest item of a 16 KiB node.
            let len = (max_item_size(16384) as i64 - 30 - 10 + slack).max(0) as usize;
            e.meta.xattrs.retain(|x| x.0 != b"user.huge-xa");
            e.meta
                .xattrs
                .push((b"user.huge-xa".to_vec(), vec![9u8; len]));
            e.meta.xattrs.sort();
        }
        Adversity::Links {
            dir,
            count,
            dirs: spread,
            long,
        } => {
            let mut f = Entry::file(100 + salt, Fill::Text(salt));
            f.link = Some(1_000_000 + salt);
            for i in 0..count {
                let d = pick(dir + i % spread);
                let mut n = format!("link{salt}-{i}").into_bytes();
                if long {
                    n.resize(255, b'k');
                }
                kids(at_path(root, &d)).insert(n, f.clone());
            }
        }
        Adversity::Deep { dir, depth, len } => {
            let mut d = pick(dir);
            // Paths stay under PATH_MAX (with room for a mountpoint), so that
            // a mount can be compared by path.
            let used: usize = d.iter().map(|n| n.len() + 1).sum();
            let budget = 3000usize.saturating_sub(used);
            let depth = depth.min(budget / 12);
            let len = len.min((budget / depth.max(1)).saturating_sub(1)).max(10);
            for i in 0..depth {
                let mut n = format!("deep{i}-").into_bytes();
                n.resize(len.max(n.len()), b'd');
                kids(at_path(root, &d)).insert(n.clone(), Entry::dir(BTreeMap::new()));
                d.push(n);
            }
            kids(at_path(root, &d)).insert(b"bottom".to_vec(), Entry::file(5, Fill::Zeros));
        }
        Adversity::Sparse { dir, log2, segs } => {
            let size = 1u64 << log2;
            let data = (0..segs as u64)
                .map(|i| Segment {
                    offset: size / segs as u64 * i + 12345,
                    len: 5000 + i * 4096,
                })
                .filter(|s| s.offset + s.len <= size)
                .collect();
            let e = Entry {
                meta: Meta::default(),
                content: Content::File {
                    size,
                    data: Some(data),
                    fill: Fill::Random(salt),
                },
                link: None,
            };
            kids(at_path(root, &pick(dir))).insert(format!("sparse{salt}").into_bytes(), e);
        }
        Adversity::Copies {
            dir,
            count,
            size,
            text,
        } => {
            let fill = if text {
                Fill::Text(salt)
            } else {
                Fill::Random(salt)
            };
            for i in 0..count {
                let d = pick(dir + i % 3);
                kids(at_path(root, &d)).insert(
                    format!("copy{salt}-{i}").into_bytes(),
                    Entry::file(size, fill),
                );
            }
        }
        Adversity::Wide { dir, count } => {
            let k = kids(at_path(root, &pick(dir)));
            for i in 0..count {
                k.insert(
                    format!("w{salt}-{i:05}").into_bytes(),
                    Entry::file(0, Fill::Zeros),
                );
            }
        }
    }
}

/// Why btrfs cannot hold this tree with these options: every rule it breaks,
/// as a fragment the planner's error may contain (it reports the first it
/// meets). Empty when btrfs can hold it.
pub fn predicted_errors(spec: &Spec) -> Vec<&'static str> {
    let mut out = Vec::new();
    let max = max_item_size(spec.opts.nodesize);
    // BFS like the planner's node order.
    struct N<'a> {
        e: &'a Entry,
        parent: usize,
        name: &'a [u8],
    }
    let mut nodes: Vec<N> = vec![N {
        e: &spec.root,
        parent: usize::MAX,
        name: b"",
    }];
    let mut i = 0;
    while i < nodes.len() {
        if let Content::Dir(kids) = &nodes[i].e.content {
            for (n, k) in kids {
                nodes.push(N {
                    e: k,
                    parent: i,
                    name: n,
                });
            }
        }
        i += 1;
    }
    // A hard link's inode is its first name's in node order; inode
    // numbers go depth first (a directory, then each child's subtree).
    let mut first_of_link: BTreeMap<u64, usize> = BTreeMap::new();
    let mut rep = vec![0usize; nodes.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        rep[i] = match (n.e.link, &n.e.content) {
            (Some(id), c) if !matches!(c, Content::Dir(_)) => *first_of_link.entry(id).or_insert(i),
            _ => i,
        };
        if i > 0 {
            children[n.parent].push(i);
        }
    }
    let mut ino = vec![0u64; nodes.len()];
    let mut next = 256u64;
    let mut stack = vec![0usize];
    while let Some(i) = stack.pop() {
        if rep[i] == i {
            ino[i] = next;
            next += 1;
        }
        stack.extend(children[i].iter().rev());
    }
    for i in 0..nodes.len() {
        ino[i] = ino[rep[i]];
    }
    for (i, n) in nodes.iter().enumerate() {
        let rep_entry = match n.e.link {
            Some(id) if !matches!(n.e.content, Content::Dir(_)) => nodes[first_of_link[&id]].e,
            _ => n.e,
        };
        if let Content::Symlink(t) = &rep_entry.content {
            if t.len() > 4095 || t.len() + 21 > max {
                out.push("symlink target");
            }
        }
        if let Content::Dir(kids) = &n.e.content {
            let mut groups: BTreeMap<u64, usize> = BTreeMap::new();
            for name in kids.keys() {
                *groups.entry(name_hash(name)).or_default() += 30 + name.len();
            }
            if groups.values().any(|&s| s > max) {
                out.push("EOVERFLOW");
            }
        }
        let mut xg: BTreeMap<u64, usize> = BTreeMap::new();
        for (k, v) in &rep_entry.meta.xattrs {
            *xg.entry(name_hash(k)).or_default() += 30 + k.len() + v.len();
        }
        if xg.values().any(|&s| s > max) {
            out.push("extended attribute");
        }
        let _ = i;
    }
    // Hard links: INODE_REF items per parent up to the item limit, the rest
    // in INODE_EXTREF items grouped by hash.
    // inode -> (parent inode, node index, name) of each of its names.
    type Names<'a> = BTreeMap<u64, Vec<(u64, usize, &'a [u8])>>;
    let mut names: Names = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate().skip(1) {
        if n.e.link.is_some() && !matches!(n.e.content, Content::Dir(_)) {
            names
                .entry(ino[i])
                .or_default()
                .push((ino[n.parent], i, n.name));
        }
    }
    for (_, mut list) in names {
        if list.len() < 2 {
            continue;
        }
        if list.len() > 65535 {
            out.push("hard links");
        }
        list.sort();
        let mut ext: BTreeMap<u64, usize> = BTreeMap::new();
        let mut cur = (u64::MAX, 0usize);
        for (p, _, name) in list {
            let rec = 10 + name.len();
            if p != cur.0 {
                cur = (p, rec);
            } else if cur.1 + rec <= max {
                cur.1 += rec;
            } else {
                *ext.entry(extref_hash(p, name)).or_default() += 18 + name.len();
            }
        }
        if ext.values().any(|&s| s > max) {
            out.push("EMLINK");
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Reads `len` bytes at logical address `logical` of a metadata chunk.
fn read_logical(img: &Image, logical: u64, len: usize) -> Vec<u8> {
    let p = img.plan();
    let phys = p
        .regions
        .iter()
        .find_map(|r| match r.kind {
            RegionKind::Metadata { logical: l } if l <= logical && logical < l + r.len => {
                Some(r.start + (logical - l))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("logical {logical} is in no metadata region"));
    let mut buf = vec![0u8; len];
    assert_eq!(
        img.read_at(phys, &mut buf).expect("every block encodes"),
        len
    );
    buf
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn key_at(b: &[u8], o: usize) -> Key {
    Key::new(u64_at(b, o), b[o + 8], u64_at(b, o + 9))
}

/// Encodes every block of the plan and checks each tree as the kernel walks
/// it: checksums, header fields, levels, node keys equal to their children's
/// first keys, leaf item tables inside the block and not overlapping, keys
/// strictly increasing across the whole tree. Also reads all file data.
pub fn verify_encoding(plan: Plan) -> Result<(), String> {
    let nodesize = plan.nodesize as usize;
    let img = Image::new(plan);
    let p = img.plan();
    // Every superblock copy: its csum_type and its checksum.
    for r in &p.regions {
        if let RegionKind::Super(_) = r.kind {
            let mut sb = vec![0u8; 4096];
            img.read_at(r.start, &mut sb).map_err(|e| e.to_string())?;
            if u16::from_le_bytes([sb[0xc4], sb[0xc5]]) != p.csum_type.code()
                || p.csum_type.compute(&sb[0x20..]) != sb[..0x20]
            {
                return Err(format!(
                    "superblock at {}: bad csum_type or checksum",
                    r.start
                ));
            }
        }
    }
    let mut seen = 0usize;
    // BLOCK_GROUP_ITEMs found in each tree, and the data ranges csum items cover.
    let mut groups: BTreeMap<TreeId, usize> = BTreeMap::new();
    let mut csummed: Vec<(u64, u64)> = Vec::new();
    for t in &p.trees {
        let root = t.root();
        let mut last: Option<Key> = None;
        let mut items = 0u64;
        // (logical, level, first key expected)
        let mut stack = vec![(root.bytenr, root.level, None::<Key>)];
        while let Some((logical, level, want_first)) = stack.pop() {
            seen += 1;
            let b = read_logical(&img, logical, nodesize);
            let name = t.id.name();
            if p.csum_type.compute(&b[0x20..]) != b[..0x20] {
                return Err(format!("{name}: bad checksum at {logical}"));
            }
            if u64_at(&b, 0x30) != logical
                || b[0x64] != level
                || u64_at(&b, 0x58) != t.id.objectid()
            {
                return Err(format!("{name}: bad header at {logical}"));
            }
            let n = u32_at(&b, 0x60) as usize;
            if n == 0 && !(level == 0 && t.shape.items == 0) {
                return Err(format!("{name}: empty block at {logical}"));
            }
            if level == 0 {
                let mut data_end = nodesize;
                if HEADER_SIZE + n * ITEM_HEADER_SIZE > nodesize {
                    return Err(format!("{name}: too many items at {logical}"));
                }
                for i in 0..n {
                    let o = HEADER_SIZE + i * ITEM_HEADER_SIZE;
                    let key = key_at(&b, o);
                    let off = u32_at(&b, o + 17) as usize + HEADER_SIZE;
                    let size = u32_at(&b, o + 21) as usize;
                    if i == 0 && want_first.is_some_and(|k| k != key) {
                        return Err(format!("{name}: node key differs from child at {logical}"));
                    }
                    if last.is_some_and(|l| l >= key) {
                        return Err(format!("{name}: keys not increasing at {logical}: {key:?}"));
                    }
                    last = Some(key);
                    if off + size != data_end || off < HEADER_SIZE + n * ITEM_HEADER_SIZE {
                        return Err(format!("{name}: item {i} data misplaced at {logical}"));
                    }
                    data_end = off;
                    if t.id == TreeId::Csum {
                        check_csum_item(&img, key, &b[off..off + size])
                            .map_err(|e| format!("csum item {key:?} at {logical}: {e}"))?;
                        let sectors = (size / p.csum_type.size()) as u64;
                        csummed.push((key.offset, key.offset + sectors * 4096));
                    }
                    if key.ty == btrfsimg::format::BLOCK_GROUP_ITEM_KEY {
                        *groups.entry(t.id).or_default() += 1;
                    }
                    // No inode is both COMPRESS and NODATASUM (the kernel
                    // compresses no file without checksums).
                    if matches!(t.id, TreeId::Fs(_))
                        && key.ty == btrfsimg::format::INODE_ITEM_KEY
                        && u64_at(&b, off + 64) & 0x801 == 0x801
                    {
                        return Err(format!(
                            "{name}: inode {} is COMPRESS and NODATASUM",
                            key.objectid
                        ));
                    }
                }
                items += n as u64;
            } else {
                if HEADER_SIZE + n * KEY_PTR_SIZE > nodesize {
                    return Err(format!("{name}: too many pointers at {logical}"));
                }
                let mut kids = Vec::new();
                for i in 0..n {
                    let o = HEADER_SIZE + i * KEY_PTR_SIZE;
                    let key = key_at(&b, o);
                    if i == 0 && want_first.is_some_and(|k| k != key) {
                        return Err(format!("{name}: node key differs from child at {logical}"));
                    }
                    kids.push((u64_at(&b, o + 17), level - 1, Some(key)));
                }
                // Depth-first in key order: push in reverse.
                stack.extend(kids.into_iter().rev());
            }
        }
        if items != t.shape.items {
            return Err(format!(
                "{}: {} items reached, {} planned",
                t.id.name(),
                items,
                t.shape.items
            ));
        }
    }
    if seen != p.blocks.len() {
        return Err(format!(
            "{seen} blocks reachable, {} planned",
            p.blocks.len()
        ));
    }
    // Every block group once: in the block-group tree when there is one
    // (and the superblock says so), otherwise in the extent tree.
    let bgt = p.trees.iter().any(|t| t.id == TreeId::BlockGroup);
    let home = if bgt {
        TreeId::BlockGroup
    } else {
        TreeId::Extent
    };
    let want: BTreeMap<TreeId, usize> = [(home, p.chunks.len())].into();
    if groups != want {
        return Err(format!("block group items {groups:?}, expected {want:?}"));
    }
    if (p.superblock.compat_ro_flags & btrfsimg::format::COMPAT_RO_BLOCK_GROUP_TREE != 0) != bgt {
        return Err("compat_ro BLOCK_GROUP_TREE disagrees with the trees".into());
    }
    // Csum items cover exactly the data of files with checksums.
    let nodatasum =
        |e: &btrfsimg::plan::data::DataExtent| p.inode_flags.nodatasum(&p.source, e.node);
    csummed.sort_unstable();
    let covered: u64 = csummed.iter().map(|(a, b)| b - a).sum();
    let want_covered: u64 = p
        .extents
        .iter()
        .filter(|e| !nodatasum(e))
        .map(|e| e.size())
        .sum();
    if covered != want_covered {
        return Err(format!(
            "csum items cover {covered} bytes, files with checksums have {want_covered}"
        ));
    }
    for e in p.extents.iter().filter(|e| nodatasum(e)) {
        if e.algorithm.is_some() {
            return Err(format!(
                "extent at {} of a NODATASUM file is compressed",
                e.logical
            ));
        }
        let i = csummed.partition_point(|r| r.1 <= e.logical);
        if csummed.get(i).is_some_and(|r| r.0 < e.end()) {
            return Err(format!(
                "extent at {} of a NODATASUM file has checksums",
                e.logical
            ));
        }
    }
    // Every compressed extent decodes to the file bytes it stands for.
    if let Some(c) = &p.content {
        for e in p.extents.iter().filter(|e| e.algorithm.is_some()) {
            let algo = e.algorithm.expect("filtered");
            let phys = p
                .regions
                .iter()
                .find_map(|r| match r.kind {
                    RegionKind::Data { logical }
                        if logical <= e.logical && e.logical < logical + r.len =>
                    {
                        Some(r.start + e.logical - logical)
                    }
                    _ => None,
                })
                .ok_or("a compressed extent outside the data regions")?;
            let mut disk = vec![0u8; e.size() as usize];
            img.read_at(phys, &mut disk).map_err(|e| e.to_string())?;
            let got = btrfsimg::compress::decode(algo, &disk, e.ram() as usize)
                .map_err(|err| format!("extent at {}: {err}", e.logical))?;
            let tree = &p.source;
            let node = tree.node(e.node);
            let fill = tree.fill(e.node).ok_or("no fill")?;
            let mut want = vec![0u8; got.len()];
            let segs = match tree.segments(e.node) {
                btrfsimg::source::Segments::Sparse(s) => Some(s),
                _ => None,
            };
            btrfsimg::source::generated::file_bytes(
                fill,
                node.size,
                segs,
                e.file_offset,
                &mut want,
            );
            if got != want {
                return Err(format!(
                    "compressed extent at {} decodes to other bytes",
                    e.logical
                ));
            }
            let _ = c;
        }
    }
    // All file data, through the data regions.
    for r in &p.regions {
        if let RegionKind::Data { .. } = r.kind {
            let mut off = r.start;
            let mut buf = vec![0u8; 1 << 20];
            while off < r.start + r.len {
                let n = ((r.start + r.len - off) as usize).min(buf.len());
                img.read_at(off, &mut buf[..n]).map_err(|e| e.to_string())?;
                off += n as u64;
            }
        }
    }
    Ok(())
}

/// A csum item holds whole checksums, at most as many as the kernel puts in
/// one, and its first is the checksum of the sector it starts at.
fn check_csum_item(img: &Image, key: Key, body: &[u8]) -> Result<(), String> {
    let p = img.plan();
    let size = p.csum_type.size();
    if body.is_empty() || body.len() % size != 0 {
        return Err(format!("{} bytes for {size}-byte checksums", body.len()));
    }
    if body.len() / size > max_csums_per_item(p.nodesize, p.csum_type) {
        return Err(format!("{} checksums", body.len() / size));
    }
    let phys = p
        .regions
        .iter()
        .find_map(|r| match r.kind {
            RegionKind::Data { logical }
                if logical <= key.offset && key.offset < logical + r.len =>
            {
                Some(r.start + key.offset - logical)
            }
            _ => None,
        })
        .ok_or("it starts outside the data regions")?;
    let mut sector = vec![0u8; 4096];
    img.read_at(phys, &mut sector).map_err(|e| e.to_string())?;
    if p.csum_type.compute(&sector)[..size] != body[..size] {
        return Err("its first checksum is not that of its first sector".into());
    }
    Ok(())
}

/// One case: refused exactly when predicted (with one line naming the
/// reason), otherwise planned and every block verified.
pub fn check_spec(spec: &Spec) -> Result<(), String> {
    let predicted = predicted_errors(spec);
    match plan_generated(&spec.root, &spec.opts) {
        Ok(plan) if predicted.is_empty() => verify_encoding(plan),
        Ok(_) => Err(format!("planned although it should fail ({predicted:?})")),
        Err(e) if predicted.is_empty() => Err(format!("refused a valid tree: {e}")),
        Err(e) => {
            let e = e.to_string();
            if e.lines().count() == 1 && predicted.iter().any(|why| e.contains(why)) {
                Ok(())
            } else {
                Err(format!(
                    "error should be one line with one of {predicted:?}: {e}"
                ))
            }
        }
    }
}

/// Makes a generated tree one a Linux host could hold, for comparing with a
/// mount: the kernel hides `user.*` xattrs of anything but regular files and
/// directories (they cannot be set there), so those are dropped.
pub fn host_realistic(e: &mut Entry) {
    if !matches!(e.content, Content::Dir(_) | Content::File { .. }) {
        e.meta.xattrs.retain(|(k, _)| !k.starts_with(b"user."));
    }
    if let Content::Dir(kids) = &mut e.content {
        for k in kids.values_mut() {
            host_realistic(k);
        }
    }
}

/// `n` valid cases (no predicted error) drawn from `spec()` with a fixed seed.
pub fn sample_specs(n: usize, seed: u64) -> Vec<Spec> {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        ..Default::default()
    });
    let mut out = Vec::new();
    while out.len() < n {
        let mut s = spec()
            .new_tree(&mut runner)
            .expect("the generator makes trees")
            .current();
        host_realistic(&mut s.root);
        if predicted_errors(&s).is_empty() {
            out.push(s);
        }
    }
    out
}

//! Every UUID of the image, derived: the filesystem UUID from everything the
//! plan knows (options, names, attributes, xattrs, hole layout, symlink
//! targets, and for generated trees the fill of each file), the others from
//! the filesystem UUID. File bytes are not read at planning, so two host trees
//! that differ only in file content get the same default UUID.

use super::Options;
use crate::source::{Kind, SourceTree};
use sha2::{Digest, Sha256};

pub fn derive_uuid(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    // RFC 9562 version 8 (custom), variant 10.
    u[6] = (u[6] & 0x0f) | 0x80;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, read back.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let groups: Vec<usize> = s.split('-').map(|g| g.len()).collect();
    let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
    if groups != [8, 4, 4, 4, 12] || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&hex[2 * i..2 * i + 2]).ok()?;
        *b = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(u)
}

/// A filesystem UUID that depends only on the tree and the options.
pub fn content_uuid(tree: &SourceTree, opts: &Options) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"btrfsimg fsid v2");
    let field = |h: &mut Sha256, b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(&mut h, &opts.label);
    h.update(opts.nodesize.to_le_bytes());
    h.update([opts.metadata_dup as u8, opts.rw_slack as u8]);
    h.update(opts.timestamp.to_le_bytes());
    h.update(opts.size.unwrap_or(0).to_le_bytes());
    h.update(opts.extra_space.to_le_bytes());
    h.update(opts.max_inline.to_le_bytes());
    match opts.compression {
        Some(c) => {
            h.update([1, c.algorithm.code()]);
            h.update(c.level.to_le_bytes());
        }
        None => h.update([0]),
    }
    h.update([opts.dedupe as u8]);
    // Only images with subvolumes hash them: other UUIDs stay as they were.
    for sv in &opts.subvolumes {
        h.update(b"subvol");
        field(&mut h, &sv.path);
        field(&mut h, sv.mountpoint.as_deref().unwrap_or(b"\0none"));
        h.update([sv.readonly as u8, sv.default as u8]);
    }
    // Hashed only when not the default, so crc32c images keep their UUIDs.
    if opts.csum != crate::format::CsumType::Crc32c {
        h.update(b"csum");
        h.update(opts.csum.code().to_le_bytes());
    }
    // Likewise: images without a block-group tree keep their UUIDs.
    if opts.block_group_tree {
        h.update(b"block-group-tree");
    }
    for f in &opts.inode_flags {
        h.update(b"inode-flags");
        field(&mut h, &f.path);
        h.update([f.nodatacow as u8, f.nodatasum as u8]);
    }
    match opts.owner {
        Some((u, g)) => {
            h.update([1]);
            h.update(u.to_le_bytes());
            h.update(g.to_le_bytes());
        }
        None => h.update([0]),
    }
    for i in 0..tree.len() as u32 {
        let n = tree.node(i);
        h.update(n.parent.to_le_bytes());
        field(&mut h, tree.name(i));
        h.update(n.mode().to_le_bytes());
        h.update(n.uid.to_le_bytes());
        h.update(n.gid.to_le_bytes());
        h.update(n.mtime().sec.to_le_bytes());
        h.update(n.mtime().nsec.to_le_bytes());
        h.update(n.size.to_le_bytes());
        h.update(n.rdev().to_le_bytes());
        h.update(tree.link_rep(i).to_le_bytes());
        if n.kind == Kind::Symlink {
            field(&mut h, tree.link_target(i));
        }
        h.update(tree.xattr_count(i).to_le_bytes());
        for (name, value) in tree.xattrs(i) {
            field(&mut h, name);
            field(&mut h, value);
        }
        if n.kind == Kind::File {
            match tree.segments(i) {
                crate::source::Segments::Whole(_) => h.update([0]),
                crate::source::Segments::Sparse(segs) => {
                    h.update([1]);
                    h.update((segs.len() as u64).to_le_bytes());
                    for s in segs {
                        h.update(s.offset.to_le_bytes());
                        h.update(s.len.to_le_bytes());
                    }
                }
            }
            if let Some(fill) = tree.fill(i) {
                let (kind, seed) = match fill {
                    crate::source::Fill::Random(s) => (1u8, s),
                    crate::source::Fill::Zeros => (2, 0),
                    crate::source::Fill::Text(s) => (3, s),
                };
                h.update([kind]);
                h.update(seed.to_le_bytes());
            }
        }
    }
    derive_uuid(&[&h.finalize()[..]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::generated::{build, Content, Entry};
    use crate::source::{Fill, Segment};
    use std::collections::BTreeMap;

    fn uuid_of(f: Entry) -> [u8; 16] {
        let mut root = BTreeMap::new();
        root.insert(b"f".to_vec(), f);
        content_uuid(&build(&Entry::dir(root)).unwrap(), &Options::default())
    }

    #[test]
    fn covers_xattr_values_holes_and_fills() {
        let base = Entry::file(1 << 20, Fill::Random(1));
        let mut x1 = base.clone();
        x1.meta.xattrs = vec![(b"user.a".to_vec(), b"1".to_vec())];
        let mut x2 = base.clone();
        x2.meta.xattrs = vec![(b"user.a".to_vec(), b"2".to_vec())];
        let mut holes = base.clone();
        holes.content = Content::File {
            size: 1 << 20,
            data: Some(vec![Segment {
                offset: 4096,
                len: 4096,
            }]),
            fill: Fill::Random(1),
        };
        let other_fill = Entry::file(1 << 20, Fill::Random(2));
        let all = [base, x1, x2, holes, other_fill].map(uuid_of);
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "{i} and {j}");
            }
        }
    }

    #[test]
    fn covers_the_checksum_type() {
        use crate::format::CsumType;
        let tree = build(&Entry::dir(BTreeMap::new())).unwrap();
        let all = CsumType::ALL.map(|csum| {
            content_uuid(
                &tree,
                &Options {
                    csum,
                    ..Options::default()
                },
            )
        });
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "{i} and {j}");
            }
        }
    }
}

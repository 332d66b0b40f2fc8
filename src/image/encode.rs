//! Tree blocks from the plan: a leaf is its items' bodies written behind the
//! item table, a node is the first key and address of each child. The only
//! inputs beyond the plan are the bytes of inline files and the checksums of
//! data sectors, asked of `BlockInputs`, so every block can be encoded (and
//! tested) with fake inputs.

use crate::format::block::{seal, write_key_ptr, Header, LeafWriter};
use crate::format::items::{
    write_block_group, write_data_extent, write_data_refs, write_dir_record, write_free_space_info,
    write_inline_extent_header, write_inode_extref, write_inode_ref, write_metadata_extent,
    write_root_ref,
};
use crate::format::*;
use crate::plan::items::Body;
use crate::plan::{BlockRef, Plan};
use std::io;

/// What a block needs beyond the plan.
pub trait BlockInputs {
    /// The first `out.len()` bytes of inline file `node`.
    fn inline_bytes(&self, node: u32, out: &mut [u8]) -> io::Result<()>;
    /// The compressed payload of inline file `node` (exactly `out.len()` bytes).
    fn inline_payload(&self, node: u32, out: &mut [u8]) -> io::Result<()>;
    /// The checksums of `count` data sectors from logical `start`, each of
    /// the plan's checksum size.
    fn csums(&self, start: u64, count: u64, out: &mut [u8]) -> io::Result<()>;
}

/// Encodes block `b` of `plan`, sealed with its checksum.
pub fn encode_block(plan: &Plan, b: BlockRef, inputs: &dyn BlockInputs) -> io::Result<Vec<u8>> {
    let tree = &plan.trees[b.tree as usize];
    let level = b.level as usize;
    let idx = b.idx as usize;
    let (start, end) = tree.shape.children(level, idx);
    let mut buf = vec![0u8; plan.nodesize as usize];
    if level == 0 {
        let mut w = LeafWriter::new(&mut buf);
        for item in tree.items.iter_from(start).take((end - start) as usize) {
            let out = w.push(item.key, item.body.size());
            encode_body(&item.body, plan.generation, inputs, out)?;
        }
    } else {
        for (i, child) in (start..end).enumerate() {
            let first = tree.shape.first_item(level - 1, child as usize);
            let key = tree
                .items
                .iter_from(first)
                .next()
                .map(|it| it.key)
                .expect("every block holds at least one item");
            let addr = tree.addrs[level - 1][child as usize];
            write_key_ptr(&mut buf, i, key, addr, plan.generation);
        }
    }
    Header {
        fsid: plan.fsid,
        chunk_tree_uuid: plan.chunk_tree_uuid,
        bytenr: b.logical,
        generation: plan.generation,
        owner: tree.id.objectid(),
        nritems: (end - start) as u32,
        level: b.level,
    }
    .write(&mut buf);
    seal(&mut buf, plan.csum_type);
    Ok(buf)
}

/// Writes one item body into `out` (exactly `body.size()` bytes).
pub fn encode_body(
    body: &Body<'_>,
    g: u64,
    inputs: &dyn BlockInputs,
    out: &mut [u8],
) -> io::Result<()> {
    match body {
        Body::Inode(i) => i.write(out),
        Body::InodeRef(recs) => {
            let mut o = 0;
            for (index, name) in recs {
                o += write_inode_ref(&mut out[o..], *index, name);
            }
        }
        Body::InodeExtref(recs) => {
            let mut o = 0;
            for (parent, index, name) in recs {
                o += write_inode_extref(&mut out[o..], *parent, *index, name);
            }
        }
        Body::Xattrs(list) => {
            let mut o = 0;
            for (name, value) in list {
                o += write_dir_record(&mut out[o..], Key::default(), g, FT_XATTR, name, value);
            }
        }
        Body::Dir(entries) => {
            let mut o = 0;
            for e in entries {
                o += write_dir_record(&mut out[o..], e.location, g, e.ftype, e.name, &[]);
            }
        }
        Body::InlineFile { node, len } => {
            write_inline_extent_header(out, g, *len, 0);
            inputs.inline_bytes(*node, &mut out[FILE_EXTENT_INLINE_HEADER..])?;
        }
        Body::InlineBytes(b) => {
            write_inline_extent_header(out, g, b.len() as u64, 0);
            out[FILE_EXTENT_INLINE_HEADER..].copy_from_slice(b);
        }
        Body::InlineCompressed {
            node,
            compression,
            ram,
            ..
        } => {
            write_inline_extent_header(out, g, *ram, *compression);
            inputs.inline_payload(*node, &mut out[FILE_EXTENT_INLINE_HEADER..])?;
        }
        Body::Extent(e) => e.write(out),
        Body::Csum { start, count, .. } => inputs.csums(*start, *count as u64, out)?,
        Body::Root(r) => r.write(out),
        Body::Chunk(c) => c.write(out),
        Body::Dev(d) => d.write(out),
        Body::DevExtent(d) => d.write(out),
        Body::DevStats | Body::Empty => {}
        Body::BlockGroup { used, flags } => write_block_group(out, *used, *flags),
        Body::MetadataExtent { owner } => write_metadata_extent(out, g, *owner),
        Body::DataExtent { refs, inline } => {
            let r: Vec<_> = inline
                .iter()
                .map(|d| (d.root, d.ino, d.offset, d.count))
                .collect();
            write_data_extent(out, g, *refs, &r)
        }
        Body::DataRefs(refs) => {
            let r: Vec<_> = refs
                .iter()
                .map(|d| (d.root, d.ino, d.offset, d.count))
                .collect();
            write_data_refs(out, &r)
        }
        Body::FreeSpaceInfo { extent_count } => write_free_space_info(out, *extent_count),
        Body::Uuid(id) => put_u64(out, 0, *id),
        Body::RootRef {
            dirid,
            sequence,
            name,
        } => {
            write_root_ref(out, *dirid, *sequence, name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::items::DirEntry;

    /// Inline bytes are all 0xAB, checksums count up.
    struct Fake;

    impl BlockInputs for Fake {
        fn inline_bytes(&self, _node: u32, out: &mut [u8]) -> io::Result<()> {
            out.fill(0xab);
            Ok(())
        }
        fn inline_payload(&self, _node: u32, out: &mut [u8]) -> io::Result<()> {
            out.fill(0xcd);
            Ok(())
        }
        fn csums(&self, _start: u64, count: u64, out: &mut [u8]) -> io::Result<()> {
            let size = out.len() / count as usize;
            for i in 0..count as usize {
                out[i * size..(i + 1) * size].fill(i as u8);
            }
            Ok(())
        }
    }

    #[test]
    fn bodies_fill_exactly_their_size() {
        let bodies = [
            Body::InlineFile { node: 3, len: 100 },
            Body::Csum {
                start: 0,
                count: 5,
                csum: CsumType::Crc32c,
            },
            Body::Csum {
                start: 0,
                count: 3,
                csum: CsumType::Sha256,
            },
            Body::Dir(vec![DirEntry {
                location: Key::new(257, INODE_ITEM_KEY, 0),
                ftype: FT_REG_FILE,
                name: b"name",
            }]),
            Body::Xattrs(vec![(b"user.a", b"value")]),
            Body::InodeExtref(vec![(256, 2, b"x")]),
            Body::DataExtent {
                refs: 1,
                inline: vec![crate::plan::trees::DataRef {
                    root: 5,
                    ino: 257,
                    offset: 0,
                    count: 1,
                }],
            },
        ];
        for b in &bodies {
            // One byte of sentinel after the body must stay untouched.
            let mut out = vec![0x55u8; b.size() + 1];
            encode_body(b, 1, &Fake, &mut out[..b.size()]).unwrap();
            assert_eq!(out[b.size()], 0x55, "{b:?}");
        }
        let mut out = vec![0u8; 121];
        encode_body(&bodies[0], 1, &Fake, &mut out).unwrap();
        assert_eq!(out[FILE_EXTENT_INLINE_HEADER..], [0xab; 100]);
        assert_eq!(get_u64(&out, 8), 100, "ram_bytes");
        let mut c = vec![0u8; 20];
        encode_body(&bodies[1], 1, &Fake, &mut c).unwrap();
        assert_eq!(c[16..20], [4; 4]);
        let mut c = vec![0u8; 96];
        encode_body(&bodies[2], 1, &Fake, &mut c).unwrap();
        assert_eq!(c[64..96], [2; 32]);
    }

    fn get_u64(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
}

//! The checksums and name hashes btrfs uses.

/// Standard CRC32C (initial value !0, final inversion): block, superblock and
/// data-sector checksums.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC32C register update without the standard pre/post inversion. btrfs uses this
/// raw form with its own seeds for name hashes.
#[inline]
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    // crc32c_append inverts the seed on entry and the result on exit.
    !crc32c::crc32c_append(!seed, data)
}

/// Key offset of DIR_ITEM and XATTR_ITEM: the raw CRC32C of the name with seed ~1.
pub fn name_hash(name: &[u8]) -> u64 {
    crc32c_raw(!1u32, name) as u64
}

/// Key offset of INODE_EXTREF: raw CRC32C of the name seeded with the parent inode.
pub fn extref_hash(parent: u64, name: &[u8]) -> u64 {
    crc32c_raw(parent as u32, name) as u64
}

/// Key offset of keyed EXTENT_DATA_REF items and the order of inline ones:
/// (crc32c of the root << 31) ^ crc32c of the inode number and the offset.
pub fn extent_data_ref_hash(root: u64, ino: u64, offset: u64) -> u64 {
    let high = crc32c_raw(!0, &root.to_le_bytes()) as u64;
    let low = crc32c_raw(!0, &ino.to_le_bytes());
    let low = crc32c_raw(low, &offset.to_le_bytes()) as u64;
    (high << 31) ^ low
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_vector() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn name_hashes_match_real_images() {
        assert_eq!(name_hash(b"default"), 2378154706);
        assert_eq!(name_hash(b"f4096"), 842902969);
        assert_eq!(name_hash(b"chardev"), 885507238);
        assert_eq!(name_hash(b"tiny"), 1111767577);
        assert_eq!(name_hash(b"user.test"), 103394969);
        assert_eq!(name_hash(b"file_195"), 2747034);
        assert_eq!(name_hash(&[b'L'; 255]), 1888885866);
    }

    #[test]
    fn extent_data_ref_hashes_match_real_images() {
        assert_eq!(extent_data_ref_hash(5, 257, 0), 0x0DFB_591F_A80D_95EA);
        assert_eq!(extent_data_ref_hash(5, 258, 0), 0x0DFB_591F_BBF5_F519);
        assert_eq!(
            extent_data_ref_hash(5, 257, 2_097_152),
            0x0DFB_591F_2DF9_8367
        );
        assert_eq!(
            extent_data_ref_hash(5, 260, -8192i64 as u64),
            0x0DFB_591F_88CC_4A6B
        );
        assert_eq!(extent_data_ref_hash(256, 257, 0), 0x0DEA_30DE_A80D_95EA);
    }

    #[test]
    fn collision_pair_collides() {
        assert_eq!(name_hash(b"zkeigdqd"), 410757925);
        assert_eq!(name_hash(b"rmjmtlgc"), 410757925);
    }
}

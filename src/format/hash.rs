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
    fn collision_pair_collides() {
        assert_eq!(name_hash(b"zkeigdqd"), 410757925);
        assert_eq!(name_hash(b"rmjmtlgc"), 410757925);
    }
}

//! The checksum algorithms (`csum_type` in the superblock). One function is
//! used for everything a filesystem checksums: the superblock, every tree
//! block and every data sector. The result goes at the start of the 32-byte
//! checksum field; the rest stays zero.

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};

/// Bytes of the checksum field of the superblock and of tree block headers.
pub const CSUM_FIELD_SIZE: usize = 32;

/// A checksum as it is stored: its first `CsumType::size()` bytes hold it.
pub type Csum = [u8; CSUM_FIELD_SIZE];

/// The superblock's `csum_type`: which function checksums the filesystem.
/// No feature flag records it; kernels from 5.5 read all four.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CsumType {
    /// CRC32C, stored as a little-endian u32 (every kernel).
    #[default]
    Crc32c,
    /// XXH64 with seed 0, stored as a little-endian u64.
    Xxhash,
    /// SHA-256, its 32 digest bytes.
    Sha256,
    /// BLAKE2b with a digest size of 32 (not BLAKE2b-512 cut short), unkeyed.
    Blake2,
}

impl CsumType {
    pub const ALL: [CsumType; 4] = [
        CsumType::Crc32c,
        CsumType::Xxhash,
        CsumType::Sha256,
        CsumType::Blake2,
    ];

    /// The value of the superblock's `csum_type` field.
    pub const fn code(self) -> u16 {
        match self {
            CsumType::Crc32c => 0,
            CsumType::Xxhash => 1,
            CsumType::Sha256 => 2,
            CsumType::Blake2 => 3,
        }
    }

    /// Bytes of one checksum (per data sector in EXTENT_CSUM items).
    pub const fn size(self) -> usize {
        match self {
            CsumType::Crc32c => 4,
            CsumType::Xxhash => 8,
            CsumType::Sha256 | CsumType::Blake2 => 32,
        }
    }

    /// The name mkfs.btrfs's `--csum` takes (and btrfs-progs prints).
    pub const fn name(self) -> &'static str {
        match self {
            CsumType::Crc32c => "crc32c",
            CsumType::Xxhash => "xxhash",
            CsumType::Sha256 => "sha256",
            CsumType::Blake2 => "blake2",
        }
    }

    /// The algorithm called `name` (as mkfs.btrfs spells it), if any.
    pub fn from_name(name: &str) -> Option<CsumType> {
        CsumType::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The checksum of `data`, in its first `size()` bytes.
    pub fn compute(self, data: &[u8]) -> Csum {
        let mut out = [0u8; CSUM_FIELD_SIZE];
        match self {
            CsumType::Crc32c => out[..4].copy_from_slice(&crc32c::crc32c(data).to_le_bytes()),
            CsumType::Xxhash => {
                out[..8].copy_from_slice(&xxhash_rust::xxh64::xxh64(data, 0).to_le_bytes())
            }
            CsumType::Sha256 => out.copy_from_slice(&sha2::Sha256::digest(data)),
            CsumType::Blake2 => out.copy_from_slice(&Blake2b::<U32>::digest(data)),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn codes_sizes_and_names() {
        for (i, c) in CsumType::ALL.into_iter().enumerate() {
            assert_eq!(c.code(), i as u16);
            assert_eq!(CsumType::from_name(c.name()), Some(c));
        }
        assert_eq!(CsumType::from_name("md5"), None);
        assert_eq!(CsumType::from_name("CRC32C"), None);
        assert_eq!(CsumType::default(), CsumType::Crc32c);
        let sizes: Vec<usize> = CsumType::ALL.iter().map(|c| c.size()).collect();
        assert_eq!(sizes, [4, 8, 32, 32]);
    }

    /// The stored bytes for a zero sector and for "123456789" + zeros, as
    /// read from mkfs.btrfs and kernel images.
    #[test]
    fn sector_checksums_match_real_images() {
        let zeros = [0u8; 4096];
        let mut digits = [0u8; 4096];
        digits[..9].copy_from_slice(b"123456789");
        let want = [
            (CsumType::Crc32c, "8941f998", "0be671e3"),
            (CsumType::Xxhash, "dbbbd8326f9b86ac", "3adceaeb69aa7848"),
            (
                CsumType::Sha256,
                "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7",
                "",
            ),
            (
                CsumType::Blake2,
                "686ede9288c391e7e05026e56f2f91bfd879987a040ea98445dabc76f55b8e5f",
                "",
            ),
        ];
        for (c, zero, digit) in want {
            let z = c.compute(&zeros);
            assert_eq!(hex(&z[..c.size()]), zero, "{c:?}");
            assert!(
                z[c.size()..].iter().all(|&b| b == 0),
                "{c:?}: tail not zero"
            );
            if !digit.is_empty() {
                assert_eq!(hex(&c.compute(&digits)[..c.size()]), digit, "{c:?}");
            }
        }
    }

    #[test]
    fn crc32c_is_the_standard_one() {
        let c = CsumType::Crc32c.compute(b"123456789");
        assert_eq!(c[..4], 0xE306_9283u32.to_le_bytes());
    }
}

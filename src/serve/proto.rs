//! The NBD wire format (the protocol document of the NBD project): the
//! fixed newstyle handshake, option requests and replies, transmission
//! requests, simple and structured replies. Pure encoding and decoding, no
//! I/O and no policy: `session` decides what to answer.
//!
//! Every number on the wire is big-endian.

/// "NBDMAGIC", the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": after NBD_MAGIC, and in front of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// In front of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_READ_ONLY: u16 = 2;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// NBD_REP_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Error values (not the host's errno: the protocol fixes them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;

/// base:allocation status bits.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The longest string (export name, context query) accepted, as the
/// protocol document recommends.
pub const MAX_STRING: usize = 4096;

/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes of a simple reply header.
pub const SIMPLE_HEADER_LEN: usize = 16;

/// The greeting a server sends first.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// An option request's header: (magic, option, data length).
pub fn option_header(b: &[u8; 16]) -> (u64, u32, u32) {
    (
        u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
        u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
        u32::from_be_bytes(b[12..].try_into().expect("4 bytes")),
    )
}

/// An option reply: header and data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// NBD_REP_INFO NBD_INFO_EXPORT: the size and the transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION: a type and a string.
pub fn info_string(ty: u16, s: &str) -> Vec<u8> {
    let mut v = ty.to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum request sizes.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [min, preferred, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// NBD_REP_SERVER: one export name (LIST).
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// NBD_REP_META_CONTEXT: a context id and its name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless
/// the client asked for none.
pub fn export_name_reply(size: u64, flags: u16, zeroes: bool) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    if zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// Why option data did not parse.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// Reads big-endian fields off the front of option data.
pub struct Fields<'a>(pub &'a [u8]);

impl<'a> Fields<'a> {
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let (h, t) = self.0.split_at_checked(2).ok_or(Malformed)?;
        self.0 = t;
        Ok(u16::from_be_bytes(h.try_into().expect("2 bytes")))
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let (h, t) = self.0.split_at_checked(4).ok_or(Malformed)?;
        self.0 = t;
        Ok(u32::from_be_bytes(h.try_into().expect("4 bytes")))
    }

    /// A string of `len` bytes (at most MAX_STRING), which must be UTF-8.
    pub fn string(&mut self, len: u32) -> Result<&'a str, Malformed> {
        let len = len as usize;
        if len > MAX_STRING {
            return Err(Malformed);
        }
        let (h, t) = self.0.split_at_checked(len).ok_or(Malformed)?;
        self.0 = t;
        std::str::from_utf8(h).map_err(|_| Malformed)
    }

    /// A u32 length, then that many bytes of string.
    pub fn prefixed_string(&mut self) -> Result<&'a str, Malformed> {
        let len = self.u32()?;
        self.string(len)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO data: the export name and the info types asked for.
pub fn parse_info_request(data: &[u8]) -> Result<(&str, Vec<u16>), Malformed> {
    let mut f = Fields(data);
    let name = f.prefixed_string()?;
    let n = f.u16()?;
    let infos = (0..n).map(|_| f.u16()).collect::<Result<Vec<_>, _>>()?;
    match f.is_empty() {
        true => Ok((name, infos)),
        false => Err(Malformed),
    }
}

/// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT data: the export name and
/// the queries.
pub fn parse_meta_request(data: &[u8]) -> Result<(&str, Vec<&str>), Malformed> {
    let mut f = Fields(data);
    let name = f.prefixed_string()?;
    let n = f.u32()?;
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if n as usize > f.0.len() / 4 {
        return Err(Malformed);
    }
    let queries = (0..n)
        .map(|_| f.prefixed_string())
        .collect::<Result<Vec<_>, _>>()?;
    match f.is_empty() {
        true => Ok((name, queries)),
        false => Err(Malformed),
    }
}

/// A transmission request (the payload of a write follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a request header; `None` if the magic is wrong (the connection is
/// then out of step and must be closed).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    let magic = u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
    (magic == REQUEST_MAGIC).then(|| Request {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
        command: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(b[24..].try_into().expect("4 bytes")),
    })
}

/// A simple reply header (for a successful read, the data follows).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_HEADER_LEN] {
    let mut h = [0u8; SIMPLE_HEADER_LEN];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// A structured reply chunk header for `length` bytes of payload.
pub fn chunk_header(flags: u16, ty: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&ty.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..].copy_from_slice(&length.to_be_bytes());
    h
}

/// A whole NBD_REPLY_TYPE_ERROR chunk (the final one) with a message.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut v = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    )
    .to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A whole NBD_REPLY_TYPE_OFFSET_HOLE chunk.
pub fn hole_chunk(cookie: u64, offset: u64, len: u32) -> [u8; CHUNK_HEADER_LEN + 12] {
    let mut v = [0u8; CHUNK_HEADER_LEN + 12];
    v[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(0, REPLY_TYPE_OFFSET_HOLE, cookie, 12));
    v[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8].copy_from_slice(&offset.to_be_bytes());
    v[CHUNK_HEADER_LEN + 8..].copy_from_slice(&len.to_be_bytes());
    v
}

/// A whole NBD_REPLY_TYPE_BLOCK_STATUS chunk (the final one) of
/// (length, status) descriptors.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut v = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len).to_vec();
    v.extend_from_slice(&context.to_be_bytes());
    for (l, s) in extents {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&s.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_the_documented_bytes() {
        assert_eq!(&greeting()[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&greeting()[16..], &[0, 3]);
    }

    #[test]
    fn option_reply_layout() {
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(&r[8..], &[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(REP_ERR_TLS_REQD, 0x8000_0005);
    }

    #[test]
    fn info_request_parses_and_refuses_lies() {
        let mut d = 6u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"fs.img");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Ok(("fs.img", vec![INFO_BLOCK_SIZE, INFO_NAME]))
        );
        // A name longer than the data, a count beyond it, trailing bytes.
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'a']), Err(Malformed));
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 3, 0, 1]),
            Err(Malformed)
        );
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0, 0, 7]), Err(Malformed));
        // A name over MAX_STRING is refused without being read.
        assert_eq!(parse_info_request(&[0, 0, 0x10, 1]), Err(Malformed));
        // Not UTF-8.
        assert_eq!(
            parse_info_request(&[0, 0, 0, 1, 0xff, 0, 0]),
            Err(Malformed)
        );
    }

    #[test]
    fn meta_request_parses() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            parse_meta_request(&d),
            Ok(("", vec!["base:allocation", "qemu:dirty-bitmap:x"]))
        );
        // A count of four billion queries in eight bytes.
        assert_eq!(
            parse_meta_request(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(Malformed)
        );
    }

    #[test]
    fn request_and_replies() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_request(&b),
            Some(Request {
                flags: 0,
                command: CMD_READ,
                cookie: 7,
                offset: 4096,
                length: 512
            })
        );
        b[0] ^= 1;
        assert_eq!(parse_request(&b), None);
        let e = error_chunk(7, EINVAL, "beyond the end");
        assert_eq!(e.len(), CHUNK_HEADER_LEN + 6 + 14);
        assert_eq!(&e[4..8], &[0, 1, 0x80, 1]);
        let s = block_status_chunk(7, 1, &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(u32::from_be_bytes(s[16..20].try_into().unwrap()), 4 + 16);
        assert_eq!(&s[s.len() - 4..], &[0, 0, 0, 3]);
        let h = hole_chunk(7, 1 << 20, 65536);
        assert_eq!(&h[6..8], &[0, 2]);
    }
}

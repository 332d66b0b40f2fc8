//! One client, from the greeting to the last reply: option haggling (fixed
//! newstyle), then transmission. What a client may do, and what it gets for
//! what it must not, is decided here; the bytes are `proto`'s.
//!
//! A misbehaving client ends only its own session: bad magic, a message cut
//! short, an option too large or a handshake that does not finish in time
//! close the connection; a request the server will not carry out (a write,
//! a read beyond the end or over the cap) gets an NBD error and the session
//! goes on.

use super::conn::{Conn, Socket};
use super::proto::*;
use crate::image::Image;
use parking_lot::Mutex;
use rustls::ServerConfig;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The export names a client may ask for: "" (the default export) and this.
pub const EXPORT_NAME: &str = "fs.img";
/// The largest read (and the largest write payload skipped) served, as
/// advertised in NBD_INFO_BLOCK_SIZE: 32 MiB, the limit qemu and libnbd use.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Bytes of image data in one reply chunk: bounds a connection's memory
/// whatever it asks for.
const PIECE: usize = 1 << 20;
/// Zeros shorter than this are sent as data rather than as a hole chunk.
const HOLE_MIN: u64 = 64 << 10;
/// Option data above this ends the connection (the longest valid option,
/// SET_META_CONTEXT with a few names, is far shorter).
const MAX_OPTION: u32 = 64 << 10;
/// Options before transmission (a client cycling forever holds a slot).
const MAX_OPTIONS: usize = 256;
/// Block status descriptors in one reply.
const MAX_DESCRIPTORS: usize = 4096;
/// The id of base:allocation in this connection's replies.
const CONTEXT_ID: u32 = 1;

/// What a session is told by the server.
pub struct SessionConfig {
    /// TLS, required before anything but STARTTLS and ABORT, when set.
    pub tls: Option<Arc<ServerConfig>>,
    /// The whole handshake must end within this.
    pub handshake_timeout: Duration,
    /// How this connection is named in log lines.
    pub name: String,
    /// Threads answering one connection's requests side by side (TLS
    /// connections are answered one request at a time: a TLS stream is
    /// one state machine).
    pub workers: usize,
}

/// What one session did, for its closing log line.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: u64,
    pub bytes_read: u64,
    pub errors: u64,
}

/// Why a session ended early.
#[derive(Debug)]
pub enum End {
    /// The client closed or broke the connection, or broke the protocol.
    Client(String),
    /// The client asked to end (ABORT in haggling, DISC in transmission).
    Asked,
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        End::Client(match e.kind() {
            io::ErrorKind::UnexpectedEof => "closed by the client".to_string(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_string(),
            _ => e.to_string(),
        })
    }
}

/// What was agreed in haggling.
#[derive(Default)]
struct Agreed {
    structured: bool,
    /// base:allocation selected.
    allocation: bool,
    no_zeroes: bool,
}

/// Runs one session on `conn` until the client leaves or breaks it.
pub fn run(image: &Image, conn: &mut Conn, cfg: &SessionConfig, stats: &mut Stats) -> End {
    // A timeout too long to add to the clock is no timeout.
    let deadline = Instant::now().checked_add(cfg.handshake_timeout);
    let agreed = match negotiate(image, conn, cfg, deadline) {
        Ok(a) => a,
        Err(e) => return e,
    };
    log::info!(
        "{}: serving {} ({} bytes){}{}{}",
        cfg.name,
        EXPORT_NAME,
        image.size(),
        if conn.is_tls() { ", TLS" } else { "" },
        if agreed.structured {
            ", structured replies"
        } else {
            ""
        },
        if agreed.allocation {
            ", base:allocation"
        } else {
            ""
        },
    );
    // An idle client may stay as long as it likes once transmitting.
    if let Err(e) = conn.set_read_timeout(None) {
        return e.into();
    }
    match transmit(image, conn, &agreed, stats, cfg.workers) {
        Ok(()) => End::Asked,
        Err(e) => e,
    }
}

fn negotiate(
    image: &Image,
    conn: &mut Conn,
    cfg: &SessionConfig,
    deadline: Option<Instant>,
) -> Result<Agreed, End> {
    let timed = |conn: &mut Conn| -> Result<(), End> {
        let Some(deadline) = deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(End::Client("handshake timed out".into()));
        }
        conn.set_read_timeout(Some(left)).map_err(End::from)
    };
    conn.write_all(&greeting())?;
    timed(conn)?;
    let mut flags = [0u8; 4];
    conn.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(End::Client(format!("unknown client flags {flags:#x}")));
    }
    let mut agreed = Agreed {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        ..Agreed::default()
    };
    for _ in 0..MAX_OPTIONS {
        timed(conn)?;
        let mut h = [0u8; 16];
        conn.read_exact(&mut h)?;
        let (magic, option, len) = option_header(&h);
        if magic != IHAVEOPT {
            return Err(End::Client(format!("bad option magic {magic:#x}")));
        }
        if len > MAX_OPTION {
            let _ = conn.write_all(&option_reply(option, REP_ERR_TOO_BIG, b"option too long"));
            return Err(End::Client(format!("option {option} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        let reply = |conn: &mut Conn, ty: u32, d: &[u8]| -> Result<(), End> {
            conn.write_all(&option_reply(option, ty, d))?;
            Ok(())
        };
        if cfg.tls.is_some() && !conn.is_tls() {
            match option {
                OPT_STARTTLS if data.is_empty() => {
                    reply(conn, REP_ACK, &[])?;
                    let config = cfg.tls.clone().expect("checked above");
                    conn.start_tls(config)
                        .map_err(|e| End::Client(format!("TLS handshake failed: {e}")))?;
                    continue;
                }
                OPT_ABORT => {
                    let _ = reply(conn, REP_ACK, &[]);
                    return Err(End::Asked);
                }
                // No reply is possible: the protocol ends here.
                OPT_EXPORT_NAME => {
                    return Err(End::Client(
                        "EXPORT_NAME without TLS (TLS is required)".into(),
                    ))
                }
                _ => {
                    reply(conn, REP_ERR_TLS_REQD, b"TLS is required")?;
                    continue;
                }
            }
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&data).unwrap_or("\u{fffd}");
                if !is_ours(name) {
                    return Err(End::Client(format!("unknown export {name:?}")));
                }
                conn.write_all(&export_name_reply(
                    image.size(),
                    transmission_flags(),
                    !agreed.no_zeroes,
                ))?;
                return Ok(agreed);
            }
            OPT_ABORT => {
                let _ = reply(conn, REP_ACK, &[]);
                return Err(End::Asked);
            }
            OPT_LIST if data.is_empty() => {
                reply(conn, REP_SERVER, &rep_server(EXPORT_NAME))?;
                reply(conn, REP_ACK, &[])?;
            }
            OPT_STARTTLS if data.is_empty() => match conn.is_tls() {
                true => reply(conn, REP_ERR_INVALID, b"TLS is on already")?,
                false => reply(conn, REP_ERR_UNSUP, b"this server has no TLS certificate")?,
            },
            OPT_STRUCTURED_REPLY if data.is_empty() => {
                agreed.structured = true;
                reply(conn, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(Malformed) => reply(conn, REP_ERR_INVALID, b"malformed request")?,
                Ok((name, _)) if !is_ours(name) => {
                    reply(conn, REP_ERR_UNKNOWN, b"no such export: try fs.img")?
                }
                Ok((name, infos)) => {
                    let size = image.size();
                    reply(conn, REP_INFO, &info_export(size, transmission_flags()))?;
                    for i in infos {
                        match i {
                            INFO_NAME => reply(conn, REP_INFO, &info_string(INFO_NAME, name))?,
                            INFO_DESCRIPTION => reply(
                                conn,
                                REP_INFO,
                                &info_string(INFO_DESCRIPTION, &description(image)),
                            )?,
                            INFO_BLOCK_SIZE => {
                                reply(conn, REP_INFO, &info_block_size(1, 4096, MAX_REQUEST))?
                            }
                            _ => {}
                        }
                    }
                    reply(conn, REP_ACK, &[])?;
                    if option == OPT_GO {
                        return Ok(agreed);
                    }
                }
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                match parse_meta_request(&data) {
                    Err(Malformed) => reply(conn, REP_ERR_INVALID, b"malformed request")?,
                    Ok(_) if !agreed.structured => reply(
                        conn,
                        REP_ERR_INVALID,
                        b"metadata contexts need structured replies",
                    )?,
                    Ok((name, _)) if !is_ours(name) => {
                        reply(conn, REP_ERR_UNKNOWN, b"no such export: try fs.img")?
                    }
                    Ok((_, queries)) => {
                        let selected = match set {
                            true => queries.contains(&BASE_ALLOCATION),
                            // Listing: no query, "base:" or the name itself.
                            false => {
                                queries.is_empty()
                                    || queries
                                        .iter()
                                        .any(|q| *q == "base:" || *q == BASE_ALLOCATION)
                            }
                        };
                        if set {
                            agreed.allocation = selected;
                        }
                        if selected {
                            let id = if set { CONTEXT_ID } else { 0 };
                            reply(
                                conn,
                                REP_META_CONTEXT,
                                &rep_meta_context(id, BASE_ALLOCATION),
                            )?;
                        }
                        reply(conn, REP_ACK, &[])?;
                    }
                }
            }
            OPT_LIST | OPT_STARTTLS | OPT_STRUCTURED_REPLY => {
                reply(conn, REP_ERR_INVALID, b"this option takes no data")?
            }
            _ => reply(conn, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(End::Client(format!("more than {MAX_OPTIONS} options")))
}

fn is_ours(name: &str) -> bool {
    name.is_empty() || name == EXPORT_NAME
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
}

fn description(image: &Image) -> String {
    format!(
        "btrfs filesystem {} (read-only)",
        crate::plan::format_uuid(&image.plan().fsid)
    )
}

/// Why a request is refused: the NBD error and a message.
type Refusal = (u32, String);

fn transmit(
    image: &Image,
    conn: &mut Conn,
    agreed: &Agreed,
    stats: &mut Stats,
    workers: usize,
) -> Result<(), End> {
    if workers > 1 {
        if let Conn::Plain(sock) = conn {
            if let Ok(w) = sock.try_clone() {
                return transmit_parallel(image, sock, w, agreed, stats, workers);
            }
        }
    }
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(req) = next_request(conn)? else {
            return Ok(());
        };
        stats.requests += 1;
        answer(image, conn, agreed, &req, &mut buf, stats)?;
    }
}

/// The next request, its write payload skipped; `None` for NBD_CMD_DISC.
fn next_request(conn: &mut impl Read) -> Result<Option<Request>, End> {
    let mut h = [0u8; REQUEST_LEN];
    conn.read_exact(&mut h)?;
    let Some(req) = parse_request(&h) else {
        return Err(End::Client("bad request magic".into()));
    };
    if req.command == CMD_DISC {
        return Ok(None);
    }
    if req.command == CMD_WRITE {
        skip_payload(conn, req.length)?;
    }
    Ok(Some(req))
}

/// Carries out or refuses one request, writing its reply to `w`.
fn answer<W: Write + ?Sized>(
    image: &Image,
    w: &mut W,
    agreed: &Agreed,
    req: &Request,
    buf: &mut Vec<u8>,
    stats: &mut Stats,
) -> Result<(), End> {
    match check(image, agreed, req) {
        Err((error, msg)) => {
            stats.errors += 1;
            log::debug!("request {:?} refused: {msg}", req);
            send_error(w, agreed, req.cookie, error, &msg)
        }
        Ok(()) if req.command == CMD_READ => {
            stats.bytes_read += req.length as u64;
            read(image, w, agreed, req, buf)
        }
        Ok(()) => block_status(image, w, req),
    }
}

/// Writes each buffer whole under the connection's lock, so that the
/// chunks of replies made side by side never interleave mid-chunk (whole
/// structured chunks of different replies may: the cookie tells them apart).
struct Locked<'a>(&'a Mutex<Socket>);

impl Write for Locked<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Transmission with `workers` threads answering this connection's requests
/// side by side while this one reads the next: a client with many requests
/// in flight (nbdcopy, qemu) keeps several cores busy on one connection.
/// The queue holds a few requests per worker; beyond that the reader waits,
/// and so, through the socket, does the client. Every queued request is
/// answered before the session ends (as NBD_CMD_DISC requires).
fn transmit_parallel(
    image: &Image,
    reader: &mut Socket,
    writer: Socket,
    agreed: &Agreed,
    stats: &mut Stats,
    workers: usize,
) -> Result<(), End> {
    let writer = Mutex::new(writer);
    let shared = Mutex::new(Stats::default());
    let failed: Mutex<Option<End>> = Mutex::new(None);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Request>(workers * 4);
    let rx = Mutex::new(rx);
    let result = std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut buf = Vec::new();
                let mut mine = Stats::default();
                loop {
                    let next = rx.lock().recv();
                    let Ok(req) = next else { break };
                    let r = match agreed.structured {
                        true => answer(
                            image,
                            &mut Locked(&writer),
                            agreed,
                            &req,
                            &mut buf,
                            &mut mine,
                        ),
                        // A simple reply is one header and its data: one lock.
                        false => {
                            let mut w = writer.lock();
                            answer(image, &mut *w, agreed, &req, &mut buf, &mut mine)
                        }
                    };
                    if let Err(e) = r {
                        // The reader sees the socket end and stops.
                        writer.lock().shutdown();
                        failed.lock().get_or_insert(e);
                    }
                }
                let mut s = shared.lock();
                s.bytes_read += mine.bytes_read;
                s.errors += mine.errors;
            });
        }
        let read = loop {
            match next_request(reader) {
                Ok(Some(req)) => {
                    stats.requests += 1;
                    if tx.send(req).is_err() {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(tx);
        read
    });
    let s = shared.into_inner();
    stats.bytes_read += s.bytes_read;
    stats.errors += s.errors;
    match failed.into_inner() {
        Some(e) => Err(e),
        None => result,
    }
}

/// Whether `req` will be carried out.
fn check(image: &Image, agreed: &Agreed, req: &Request) -> Result<(), Refusal> {
    let beyond = req
        .offset
        .checked_add(req.length as u64)
        .is_none_or(|e| e > image.size());
    match req.command {
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => Err((EPERM, "the export is read-only".into())),
        CMD_READ | CMD_BLOCK_STATUS if beyond => Err((
            EINVAL,
            format!(
                "{} bytes at {} are beyond the end of the export ({} bytes)",
                req.length,
                req.offset,
                image.size()
            ),
        )),
        CMD_READ if req.length > MAX_REQUEST => Err((
            if agreed.structured { EOVERFLOW } else { EINVAL },
            format!("reads are at most {MAX_REQUEST} bytes"),
        )),
        CMD_READ if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 => {
            Err((EINVAL, format!("unsupported flags {:#x}", req.flags)))
        }
        CMD_READ => Ok(()),
        CMD_BLOCK_STATUS if !agreed.allocation => {
            Err((EINVAL, "no metadata context was selected".into()))
        }
        CMD_BLOCK_STATUS if req.length == 0 => Err((EINVAL, "empty block status request".into())),
        CMD_BLOCK_STATUS if req.flags & !CMD_FLAG_REQ_ONE != 0 => {
            Err((EINVAL, format!("unsupported flags {:#x}", req.flags)))
        }
        CMD_BLOCK_STATUS => Ok(()),
        c => Err((EINVAL, format!("command {c} is not supported"))),
    }
}

/// Reads and drops a write's payload, so that the next request is in step.
fn skip_payload(conn: &mut impl Read, len: u32) -> Result<(), End> {
    let mut left = len as u64;
    let mut sink = [0u8; 16384];
    while left > 0 {
        let n = (left as usize).min(sink.len());
        conn.read_exact(&mut sink[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn send_error<W: Write + ?Sized>(
    conn: &mut W,
    agreed: &Agreed,
    cookie: u64,
    error: u32,
    msg: &str,
) -> Result<(), End> {
    match agreed.structured {
        true => conn.write_all(&error_chunk(cookie, error, msg))?,
        false => conn.write_all(&simple_reply(error, cookie))?,
    }
    Ok(())
}

/// A piece of a read reply: image bytes, or a hole the client fills with zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Data { offset: u64, len: u64 },
    Hole { offset: u64, len: u64 },
}

/// How a structured read of `[offset, offset + len)` is cut into chunks:
/// holes of the allocation map at least HOLE_MIN long become hole chunks,
/// the rest data chunks of at most PIECE bytes.
fn pieces(image: &Image, offset: u64, len: u64) -> Vec<Piece> {
    let map = image.allocation();
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    let mut data_from = offset;
    let flush_data = |out: &mut Vec<Piece>, from: u64, to: u64| {
        let mut a = from;
        while a < to {
            let n = (to - a).min(PIECE as u64);
            out.push(Piece::Data { offset: a, len: n });
            a += n;
        }
    };
    while pos < end {
        let (mapped, run_end) = map.at(pos);
        let upto = run_end.min(end);
        if !mapped && upto - pos >= HOLE_MIN {
            flush_data(&mut out, data_from, pos);
            out.push(Piece::Hole {
                offset: pos,
                len: upto - pos,
            });
            data_from = upto;
        }
        pos = upto;
    }
    flush_data(&mut out, data_from, end);
    out
}

fn read<W: Write + ?Sized>(
    image: &Image,
    conn: &mut W,
    agreed: &Agreed,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<(), End> {
    let len = req.length as u64;
    if !agreed.structured {
        // The header goes first, so an error after it cannot be told: the
        // connection ends (as the protocol prescribes).
        conn.write_all(&simple_reply(0, req.cookie))?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE as u64) as usize;
            buf.resize(n, 0);
            image
                .read_at(req.offset + done, &mut buf[..n])
                .map_err(|e| End::Client(format!("read failed mid-reply: {e}")))?;
            conn.write_all(&buf[..n])?;
            done += n as u64;
        }
        return Ok(());
    }
    if len == 0 {
        conn.write_all(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            req.cookie,
            0,
        ))?;
        return Ok(());
    }
    let pieces = pieces(image, req.offset, len);
    let last = pieces.len() - 1;
    for (i, p) in pieces.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        match p {
            Piece::Hole { offset, len } => {
                let mut c = hole_chunk(req.cookie, offset, len as u32);
                c[4..6].copy_from_slice(&flags.to_be_bytes());
                conn.write_all(&c)?;
            }
            Piece::Data { offset, len } => {
                // Header, offset and data in one buffer: one write.
                let head = CHUNK_HEADER_LEN + 8;
                buf.resize(head + len as usize, 0);
                if let Err(e) = image.read_at(offset, &mut buf[head..]) {
                    log::error!("{EXPORT_NAME}: read of {len} bytes at {offset} failed: {e}");
                    return send_error(conn, agreed, req.cookie, EIO, &e.to_string());
                }
                buf[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    8 + len as u32,
                ));
                buf[CHUNK_HEADER_LEN..head].copy_from_slice(&offset.to_be_bytes());
                conn.write_all(buf)?;
            }
        }
    }
    Ok(())
}

/// base:allocation descriptors of `[offset, offset + len)`: mapped bytes
/// are data (0), the rest holes that read as zeros.
fn descriptors(image: &Image, offset: u64, len: u64, one: bool) -> Vec<(u32, u32)> {
    let map = image.allocation();
    let end = offset + len;
    let max = if one { 1 } else { MAX_DESCRIPTORS };
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max {
        let (mapped, run_end) = map.at(pos);
        let upto = run_end.min(end);
        let state = if mapped { 0 } else { STATE_HOLE | STATE_ZERO };
        out.push(((upto - pos) as u32, state));
        pos = upto;
    }
    out
}

fn block_status<W: Write + ?Sized>(image: &Image, conn: &mut W, req: &Request) -> Result<(), End> {
    let d = descriptors(
        image,
        req.offset,
        req.length as u64,
        req.flags & CMD_FLAG_REQ_ONE != 0,
    );
    conn.write_all(&block_status_chunk(req.cookie, CONTEXT_ID, &d))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::generated::Entry;
    use crate::source::Fill;
    use std::collections::BTreeMap;

    fn image() -> Image {
        let root = Entry::dir(BTreeMap::from([
            (b"a".to_vec(), Entry::file(3 << 20, Fill::Random(1))),
            (b"b".to_vec(), Entry::file(5000, Fill::Text(2))),
        ]));
        let opts = crate::Options {
            extra_space: 64 << 20,
            ..crate::Options::default()
        };
        Image::new(crate::plan_generated(&root, &opts).expect("plans"))
    }

    #[test]
    fn read_pieces_cover_the_request_in_order() {
        let img = image();
        let size = img.size();
        for (off, len) in [
            (0, size.min(32 << 20)),
            (size - 4096, 4096),
            (12345, 1),
            (0, 1),
        ] {
            let p = pieces(&img, off, len);
            let mut at = off;
            for x in &p {
                let (o, l) = match *x {
                    Piece::Data { offset, len } => {
                        assert!(len <= PIECE as u64);
                        (offset, len)
                    }
                    Piece::Hole { offset, len } => {
                        assert!(len >= HOLE_MIN);
                        (offset, len)
                    }
                };
                assert_eq!(o, at);
                at += l;
            }
            assert_eq!(at, off + len);
        }
        // The image has holes (extra space) that reads send as such.
        let whole = pieces(&img, size - (32 << 20), 32 << 20);
        assert!(whole.iter().any(|p| matches!(p, Piece::Hole { .. })));
    }

    #[test]
    fn descriptors_follow_the_map() {
        let img = image();
        let d = descriptors(&img, 0, img.size().min(u32::MAX as u64), false);
        assert_eq!(d[0].1, 0, "the head is mapped");
        assert!(d.iter().any(|x| x.1 == STATE_HOLE | STATE_ZERO));
        let total: u64 = d.iter().map(|x| x.0 as u64).sum();
        assert_eq!(total, img.size());
        assert_eq!(descriptors(&img, 0, 4096, true), vec![(4096, 0)]);
    }
}

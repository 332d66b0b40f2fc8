//! NBD on the test side: a `btrfsimg serve` process that stops when dropped,
//! and a raw client written from the protocol document (its own constants,
//! not the server's) for what real clients never send: garbage, cut-off
//! messages, oversized and out-of-range requests, writes.

use super::prereq::btrfsimg_bin;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `btrfsimg serve`, stopped with SIGTERM when dropped.
pub struct Served {
    pub child: Option<Child>,
    /// The URI it printed when ready.
    pub uri: String,
    pub stderr_path: std::path::PathBuf,
}

impl Served {
    /// Starts `btrfsimg serve ARGS`, waits for the URI line (at most 120 s).
    /// stderr goes to `log` (RUST_LOG=info: a line per connection).
    pub fn start(args: &[&std::ffi::OsStr], log: &Path) -> Served {
        let err = std::fs::File::create(log).expect("log file");
        let mut child = Command::new(btrfsimg_bin())
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start btrfsimg serve");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let uri = line.trim().to_string();
        if uri.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "btrfsimg serve printed no URI: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Served {
            child: Some(child),
            uri,
            stderr_path: log.to_path_buf(),
        }
    }

    /// The TCP port of an `nbd://ADDR:PORT/` URI.
    pub fn port(&self) -> u16 {
        let rest = self.uri.split("://").nth(1).expect("a URI");
        let hostport = rest.trim_end_matches('/');
        hostport
            .rsplit(':')
            .next()
            .expect("a port")
            .parse()
            .expect("a port number")
    }

    /// Whether the server is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends `sig` and waits (at most 30 s); returns the exit status.
    pub fn stop_with(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        for _ in 0..300 {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        panic!("btrfsimg serve did not stop within 30 s of signal {sig}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// A raw NBD client over a Unix socket.
pub struct Raw {
    pub s: UnixStream,
}

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;

/// One structured reply chunk.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect to the server");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Raw { s }
    }

    /// Reads the greeting and sends the client flags (fixed newstyle, no zeroes).
    pub fn hello(&mut self) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT", "greeting");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]) & 1, 1, "fixed newstyle");
        self.s.write_all(&3u32.to_be_bytes()).expect("client flags");
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("send option");
    }

    /// One option reply: (option, type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(
            &h[..8],
            &0x0003_e889_0455_65a9u64.to_be_bytes(),
            "reply magic"
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).expect("option reply data");
        (opt, ty, d)
    }

    /// Replies until (and with) the final ACK or error.
    pub fn option_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.option_reply();
            let end = r.1 == REP_ACK || r.1 & 0x8000_0000 != 0;
            v.push(r);
            if end {
                return v;
            }
        }
    }

    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Greeting, structured replies, base:allocation, GO: returns the size.
    pub fn ready(path: &Path) -> (Raw, u64) {
        let mut c = Raw::connect(path);
        c.hello();
        Raw::ready_on(c)
    }

    /// `ready` on a client past the greeting.
    pub fn ready_on(mut c: Raw) -> (Raw, u64) {
        c.send_option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_reply().1, REP_ACK);
        c.send_option(
            OPT_SET_META_CONTEXT,
            &Raw::meta_data("", &["base:allocation"]),
        );
        let r = c.option_replies();
        assert_eq!(r[0].1, REP_META_CONTEXT);
        let size = c.go("");
        (c, size)
    }

    /// GO with `name`; the export size.
    pub fn go(&mut self, name: &str) -> u64 {
        self.send_option(OPT_GO, &Raw::info_data(name, &[]));
        let r = self.option_replies();
        let info = r.iter().find(|x| x.1 == REP_INFO).expect("NBD_INFO_EXPORT");
        assert_eq!(u16::from_be_bytes([info.2[0], info.2[1]]), 0);
        assert_eq!(r.last().unwrap().1, REP_ACK, "{r:?}");
        u64::from_be_bytes(info.2[2..10].try_into().unwrap())
    }

    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&m).expect("request");
    }

    pub fn chunk(&mut self) -> Chunk {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("chunk header");
        assert_eq!(
            &h[..4],
            &0x668e_33efu32.to_be_bytes(),
            "structured reply magic"
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).expect("chunk payload");
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            ty: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload,
        }
    }

    /// A structured read: the bytes, or the NBD error.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, 99, offset, len);
        let mut out = vec![0u8; len as usize];
        let mut covered = 0u64;
        loop {
            let c = self.chunk();
            assert_eq!(c.cookie, 99);
            match c.ty {
                0 => {}
                1 => {
                    let at = u64::from_be_bytes(c.payload[..8].try_into().unwrap()) - offset;
                    out[at as usize..at as usize + c.payload.len() - 8]
                        .copy_from_slice(&c.payload[8..]);
                    covered += c.payload.len() as u64 - 8;
                }
                2 => {
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap());
                    covered += n as u64;
                }
                t if t & 0x8000 != 0 => {
                    assert_eq!(c.flags & 1, 1, "an error chunk ends the reply here");
                    return Err(u32::from_be_bytes(c.payload[..4].try_into().unwrap()));
                }
                t => panic!("unexpected chunk type {t}"),
            }
            if c.flags & 1 == 1 {
                assert_eq!(covered, len as u64, "the chunks cover the read");
                return Ok(out);
            }
        }
    }

    /// Block status: (length, flags) descriptors, or the NBD error.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        one: bool,
    ) -> Result<Vec<(u32, u32)>, u32> {
        self.request(if one { 8 } else { 0 }, CMD_BLOCK_STATUS, 7, offset, len);
        let c = self.chunk();
        assert_eq!(c.flags & 1, 1, "one final chunk");
        match c.ty {
            5 => Ok(c.payload[4..]
                .chunks_exact(8)
                .map(|d| {
                    (
                        u32::from_be_bytes(d[..4].try_into().unwrap()),
                        u32::from_be_bytes(d[4..].try_into().unwrap()),
                    )
                })
                .collect()),
            t if t & 0x8000 != 0 => Err(u32::from_be_bytes(c.payload[..4].try_into().unwrap())),
            t => panic!("unexpected chunk type {t}"),
        }
    }

    /// Whether the server closed the connection (EOF within 10 s).
    pub fn closed(&mut self) -> bool {
        let _ = self.s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

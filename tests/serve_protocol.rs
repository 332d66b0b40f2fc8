//! The NBD server against a client written from the protocol document
//! (tests/common/nbd.rs), in process: every option and command a client
//! may send, what a broken or hostile client may send instead, and that
//! none of it stops the server or the next good client. Needs no
//! privileges; the real clients (qemu, nbdcopy, nbdinfo) are in
//! serve_system.rs.

mod common;

use btrfsimg::serve::{self, Listen, ServeOptions, Shutdown, ShutdownHandle};
use btrfsimg::source::generated::Entry;
use btrfsimg::source::Fill;
use btrfsimg::{export, plan_generated, Image, Options};
use common::nbd::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn image() -> Image {
    let name = |s: &str| s.as_bytes().to_vec();
    let many: BTreeMap<Vec<u8>, Entry> = (0..400)
        .map(|i| {
            (
                name(&format!("f{i:04}")),
                Entry::file(i * 37, Fill::Text(i)),
            )
        })
        .collect();
    let root = Entry::dir(BTreeMap::from([
        (name("random"), Entry::file(9 << 20, Fill::Random(1))),
        (name("zeros"), Entry::file(2 << 20, Fill::Zeros)),
        (name("many"), Entry::dir(many)),
    ]));
    let opts = Options {
        // Unallocated space: holes in reads and block status.
        extra_space: 96 << 20,
        ..Options::default()
    };
    Image::new(plan_generated(&root, &opts).expect("the tree plans"))
}

fn reference(img: &Image) -> Vec<u8> {
    let mut v = Vec::new();
    export::write_stream(img, &mut v, &export::ExportOptions::default()).expect("export");
    v
}

struct Running {
    handle: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<btrfsimg::Result<()>>>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(image: Arc<Image>, tweak: impl FnOnce(&mut ServeOptions)) -> Running {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("nbd.sock");
        let mut opts = ServeOptions {
            listen: Listen::Unix(sock.clone()),
            tls: None,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
            threads: 4,
        };
        tweak(&mut opts);
        let shutdown = Shutdown::new().expect("shutdown pipe");
        let handle = shutdown.handle().expect("handle");
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            serve::serve(image, &opts, &shutdown, |uri| {
                let _ = tx.send(uri.to_string());
            })
        });
        let uri = rx.recv_timeout(Duration::from_secs(30)).expect("ready");
        assert!(uri.starts_with("nbd+unix:///?socket="), "{uri}");
        Running {
            handle,
            thread: Some(thread),
            sock,
            _dir: dir,
        }
    }

    fn stop(mut self) {
        self.handle.trigger();
        let r = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("no panic");
        r.expect("the server ends cleanly");
        assert!(!self.sock.exists(), "the socket file is removed");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A good client reads a few places correctly (after a bad one).
fn good_client_reads(sock: &Path, reference: &[u8]) {
    let (mut c, size) = Raw::ready(sock);
    assert_eq!(size, reference.len() as u64);
    for (off, len) in [(0u64, 1u32 << 20), (65536, 4096), (size - 8192, 8192)] {
        let got = c.read(off, len).expect("read");
        assert!(
            got == reference[off as usize..off as usize + len as usize],
            "read at {off}"
        );
    }
    c.request(0, CMD_DISC, 1, 0, 0);
    assert!(c.closed());
}

#[test]
fn every_way_in_reads_the_export() {
    let img = Arc::new(image());
    let reference = reference(&img);
    let size = reference.len() as u64;
    let srv = Running::start(img.clone(), |_| {});

    // Structured replies, GO with "" and with "fs.img", 4 MiB reads.
    for name in ["", "fs.img"] {
        let mut c = Raw::connect(&srv.sock);
        c.hello();
        c.send_option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_reply().1, REP_ACK);
        assert_eq!(c.go(name), size);
        let mut got = Vec::new();
        let mut off = 0u64;
        while off < size {
            let n = (4u64 << 20).min(size - off) as u32;
            got.extend(c.read(off, n).expect("read"));
            off += n as u64;
        }
        assert!(
            got == reference,
            "structured reads of {name:?} equal the export"
        );
        c.request(0, CMD_DISC, 1, 0, 0);
    }

    // EXPORT_NAME and simple replies, with and without the 124 zero bytes.
    for flags in [1u32, 3] {
        let mut c = Raw::connect(&srv.sock);
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).unwrap();
        c.s.write_all(&flags.to_be_bytes()).unwrap();
        c.send_option(OPT_EXPORT_NAME, b"fs.img");
        let mut r = vec![0u8; if flags & 2 == 2 { 10 } else { 134 }];
        c.s.read_exact(&mut r).unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), size);
        let tflags = u16::from_be_bytes([r[8], r[9]]);
        assert_eq!(tflags & 0b11, 0b11, "HAS_FLAGS and READ_ONLY");
        assert_ne!(tflags & (1 << 8), 0, "CAN_MULTI_CONN");
        assert!(r[10..].iter().all(|&b| b == 0));
        c.request(0, CMD_READ, 5, size - (3 << 20), 3 << 20);
        let mut h = [0u8; 16];
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply");
        assert_eq!(&h[4..8], &[0; 4], "no error");
        assert_eq!(u64::from_be_bytes(h[8..].try_into().unwrap()), 5);
        let mut data = vec![0u8; 3 << 20];
        c.s.read_exact(&mut data).unwrap();
        assert!(data[..] == reference[reference.len() - (3 << 20)..]);
        // A refused request in simple mode: an error, no data.
        c.request(0, CMD_READ, 6, size, 1);
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), EINVAL);
        c.request(0, CMD_DISC, 7, 0, 0);
        assert!(c.closed());
    }

    // INFO with every info type, then GO; LIST; LIST_META_CONTEXT.
    let mut c = Raw::connect(&srv.sock);
    c.hello();
    c.send_option(OPT_INFO, &Raw::info_data("fs.img", &[1, 2, 3]));
    let r = c.option_replies();
    let infos: Vec<u16> = r
        .iter()
        .filter(|x| x.1 == REP_INFO)
        .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
        .collect();
    assert_eq!(infos, vec![0, 1, 2, 3]);
    let bs = &r.iter().find(|x| x.1 == REP_INFO && x.2[1] == 3).unwrap().2;
    let max = u32::from_be_bytes(bs[10..14].try_into().unwrap());
    assert_eq!(max, 32 << 20, "the documented cap");
    let desc = &r.iter().find(|x| x.1 == REP_INFO && x.2[1] == 2).unwrap().2;
    assert!(String::from_utf8_lossy(&desc[2..]).contains("btrfs"));
    c.send_option(OPT_LIST, &[]);
    let r = c.option_replies();
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(&r[0].2[4..], b"fs.img");
    assert_eq!(r[1].1, REP_ACK);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    c.send_option(OPT_LIST_META_CONTEXT, &Raw::meta_data("", &[]));
    let r = c.option_replies();
    assert_eq!(r[0].1, REP_META_CONTEXT);
    assert_eq!(&r[0].2[4..], b"base:allocation");
    // Unknown contexts are not selected; the known one is.
    c.send_option(
        OPT_SET_META_CONTEXT,
        &Raw::meta_data("", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(c.option_replies().len(), 1, "only the ACK");
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    assert!(c.closed());
    srv.stop();
}

#[test]
fn block_status_is_the_allocation_map() {
    let img = Arc::new(image());
    let size = img.size();
    let srv = Running::start(img.clone(), |_| {});
    let (mut c, _) = Raw::ready(&srv.sock);
    let d = c.block_status(0, size as u32, false).expect("block status");
    let mut off = 0u64;
    let mut mapped = 0u64;
    for (len, flags) in &d {
        let (m, end) = img.allocation().at(off);
        assert_eq!(end.min(size) - off, *len as u64, "descriptor at {off}");
        assert_eq!(*flags, if m { 0 } else { 3 }, "flags at {off}");
        if m {
            mapped += *len as u64;
        }
        off += *len as u64;
    }
    assert_eq!(off, size);
    assert_eq!(mapped, img.allocation().mapped_bytes());
    assert!(d.iter().any(|x| x.1 == 3), "the extra space is a hole");
    // REQ_ONE: a single descriptor; inside a run it is cut at the request.
    let one = c.block_status(4096, 4096, true).expect("block status");
    assert_eq!(one, vec![(4096, 0)]);
    // Refusals: empty, beyond the end.
    assert_eq!(c.block_status(0, 0, false), Err(EINVAL));
    assert_eq!(c.block_status(size - 4096, 8192, false), Err(EINVAL));
    assert!(c.read(0, 4096).is_ok(), "the session goes on");
    srv.stop();
}

#[test]
fn refused_requests_get_errors_and_the_session_goes_on() {
    let img = Arc::new(image());
    let reference = reference(&img);
    let size = img.size();
    let srv = Running::start(img.clone(), |_| {});
    let (mut c, _) = Raw::ready(&srv.sock);
    assert_eq!(c.read(size - 10, 11), Err(EINVAL), "past the end");
    assert_eq!(c.read(u64::MAX - 10, 4096), Err(EINVAL), "offset overflow");
    assert_eq!(c.read(0, (32 << 20) + 1), Err(EOVERFLOW), "over the cap");
    assert_eq!(c.read(size, 0), Ok(Vec::new()), "an empty read at the end");
    // A write: its payload is skipped, EPERM comes back, the stream stays in step.
    c.request(0, CMD_WRITE, 11, 0, 70000);
    c.s.write_all(&vec![0xab; 70000]).unwrap();
    let ch = c.chunk();
    assert_eq!((ch.cookie, ch.flags & 1), (11, 1));
    assert_eq!(
        u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
        EPERM
    );
    for (cmd, want) in [
        (CMD_TRIM, EPERM),
        (6, EPERM),
        (CMD_FLUSH, EINVAL),
        (99, EINVAL),
    ] {
        c.request(0, cmd, 12, 0, 4096);
        let ch = c.chunk();
        assert_eq!(
            u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
            want,
            "command {cmd}"
        );
    }
    // A read with flags never advertised (DF).
    c.request(4, CMD_READ, 13, 0, 4096);
    let ch = c.chunk();
    assert_eq!(
        u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
        EINVAL
    );
    let got = c.read(1 << 20, 65536).expect("read after refusals");
    assert!(got[..] == reference[1 << 20..(1 << 20) + 65536]);

    // Block status without a selected context.
    let mut c = Raw::connect(&srv.sock);
    c.hello();
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    c.go("");
    assert_eq!(c.block_status(0, 4096, false), Err(EINVAL));
    srv.stop();
}

#[test]
fn broken_and_hostile_clients_end_only_their_own_session() {
    let img = Arc::new(image());
    let reference = reference(&img);
    let srv = Running::start(img.clone(), |_| {});
    let sock = srv.sock.clone();
    type Case = (&'static str, Box<dyn Fn(&Path)>);
    let cases: Vec<Case> = vec![
        (
            "connect and close",
            Box::new(|p| drop(UnixStream::connect(p).unwrap())),
        ),
        (
            "close mid-greeting",
            Box::new(|p| {
                let mut s = UnixStream::connect(p).unwrap();
                let mut g = [0u8; 5];
                s.read_exact(&mut g).unwrap();
                s.write_all(&[0, 0]).unwrap();
            }),
        ),
        (
            "unknown client flags",
            Box::new(|p| {
                let mut c = Raw::connect(p);
                let mut g = [0u8; 18];
                c.s.read_exact(&mut g).unwrap();
                c.s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
                assert!(c.closed());
            }),
        ),
        (
            "garbage instead of options",
            Box::new(|p| {
                let mut c = Raw::connect(p);
                c.hello();
                let _ = c.s.write_all(&[0x5a; 1 << 16]);
                assert!(c.closed());
            }),
        ),
        (
            "an option of 4 GiB",
            Box::new(|p| {
                let mut c = Raw::connect(p);
                c.hello();
                let mut m = b"IHAVEOPT".to_vec();
                m.extend_from_slice(&OPT_GO.to_be_bytes());
                m.extend_from_slice(&u32::MAX.to_be_bytes());
                c.s.write_all(&m).unwrap();
                assert_eq!(c.option_reply().1, 0x8000_0009, "NBD_REP_ERR_TOO_BIG");
                assert!(c.closed());
            }),
        ),
        (
            "option data cut short",
            Box::new(|p| {
                let mut c = Raw::connect(p);
                c.hello();
                let mut m = b"IHAVEOPT".to_vec();
                m.extend_from_slice(&OPT_GO.to_be_bytes());
                m.extend_from_slice(&100u32.to_be_bytes());
                m.extend_from_slice(&[0; 10]);
                c.s.write_all(&m).unwrap();
            }),
        ),
        (
            "malformed and unknown options, then garbage requests",
            Box::new(|p| {
                let mut c = Raw::connect(p);
                c.hello();
                c.send_option(OPT_GO, &[0, 0, 0, 50, 1, 2]);
                assert_eq!(c.option_reply().1, REP_ERR_INVALID);
                c.send_option(OPT_GO, &Raw::info_data("other", &[]));
                assert_eq!(c.option_reply().1, REP_ERR_UNKNOWN);
                c.send_option(
                    OPT_SET_META_CONTEXT,
                    &Raw::meta_data("", &["base:allocation"]),
                );
                assert_eq!(
                    c.option_reply().1,
                    REP_ERR_INVALID,
                    "needs structured replies"
                );
                c.send_option(OPT_STARTTLS, &[]);
                assert_eq!(c.option_reply().1, REP_ERR_UNSUP, "no certificate");
                c.send_option(4242, &[1, 2, 3]);
                assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
                c.send_option(OPT_LIST, &[1]);
                assert_eq!(c.option_reply().1, REP_ERR_INVALID);
                c.go("");
                c.s.write_all(&[0x77; 28]).unwrap();
                assert!(c.closed(), "bad request magic ends the session");
            }),
        ),
        (
            "EXPORT_NAME of an unknown export",
            Box::new(|p| {
                let mut c = Raw::connect(p);
                c.hello();
                c.send_option(OPT_EXPORT_NAME, b"nope");
                assert!(c.closed());
            }),
        ),
        (
            "a request cut mid-header",
            Box::new(|p| {
                let (mut c, _) = Raw::ready(p);
                c.s.write_all(&0x2560_9513u32.to_be_bytes()).unwrap();
            }),
        ),
        (
            "a write whose payload never comes",
            Box::new(|p| {
                let (mut c, _) = Raw::ready(p);
                c.request(0, CMD_WRITE, 1, 0, 1 << 20);
                c.s.write_all(&[1; 1000]).unwrap();
            }),
        ),
        (
            "leaving in the middle of a 32 MiB reply",
            Box::new(|p| {
                let (mut c, _) = Raw::ready(p);
                c.request(0, CMD_READ, 1, 0, 32 << 20);
                let mut part = [0u8; 4096];
                c.s.read_exact(&mut part).unwrap();
            }),
        ),
        (
            "many requests never read",
            Box::new(|p| {
                let (mut c, _) = Raw::ready(p);
                c.s.set_nonblocking(true).unwrap();
                for i in 0..2000 {
                    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
                    m.extend_from_slice(&[0, 0, 0, 0]);
                    m.extend_from_slice(&(i as u64).to_be_bytes());
                    m.extend_from_slice(&0u64.to_be_bytes());
                    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
                    if c.s.write_all(&m).is_err() {
                        break;
                    }
                }
            }),
        ),
    ];
    for (what, case) in &cases {
        case(&sock);
        // The good client may have to wait for a stuck session only in its
        // own thread: it reads at once.
        let t = Instant::now();
        good_client_reads(&sock, &reference);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: the good client waited"
        );
    }
    srv.stop();
}

/// A client past the greeting, once the server has a free slot for it
/// (a slot frees when the server has seen a session end): at most 10 s.
fn admitted(sock: &Path) -> Raw {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Raw::connect(sock);
        let mut g = [0u8; 18];
        if c.s.read_exact(&mut g).is_ok() {
            c.s.write_all(&3u32.to_be_bytes()).expect("client flags");
            return c;
        }
        assert!(Instant::now() < deadline, "no slot became free");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn caps_and_timeouts() {
    let img = Arc::new(image());
    let reference = reference(&img);
    let srv = Running::start(img.clone(), |o| {
        o.max_connections = 2;
        o.handshake_timeout = Duration::from_secs(1);
    });
    // Two sessions transmitting and idle beyond the handshake timeout stay.
    let (mut a, _) = Raw::ready(&srv.sock);
    let (mut b, _) = Raw::ready(&srv.sock);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        a.read(0, 4096).is_ok() && b.read(0, 4096).is_ok(),
        "idle sessions are kept"
    );
    // A third is closed at once.
    let mut c = Raw::connect(&srv.sock);
    assert!(c.closed(), "beyond --max-connections");
    drop(a);
    // The slot is free again once the server saw the close.
    let mut d = admitted(&srv.sock);
    let t = Instant::now();
    // A client silent in the handshake is dropped when the time is up.
    assert!(d.closed(), "handshake timeout");
    assert!(t.elapsed() < Duration::from_secs(5));
    b.request(0, CMD_DISC, 1, 0, 0);
    drop(b);
    // A good client, once a slot is free.
    let (mut c, size) = Raw::ready_on(admitted(&srv.sock));
    let got = c.read(size - 8192, 8192).expect("read");
    assert!(got[..] == reference[reference.len() - 8192..]);
    srv.stop();
}

/// A handshake timeout too long for the clock (`--handshake-timeout
/// 18446744073709551615`) is no timeout, not a panic in every session.
#[test]
fn endless_handshake_timeout() {
    let img = Arc::new(image());
    let reference = reference(&img);
    let srv = Running::start(img.clone(), |o| o.handshake_timeout = Duration::MAX);
    good_client_reads(&srv.sock, &reference);
    srv.stop();
}

#[test]
fn shutdown_ends_idle_and_busy_sessions() {
    let img = Arc::new(image());
    let srv = Running::start(img.clone(), |_| {});
    let (_idle, _) = Raw::ready(&srv.sock);
    let mut halfway = Raw::connect(&srv.sock);
    halfway.hello();
    let (mut busy, _) = Raw::ready(&srv.sock);
    busy.request(0, CMD_READ, 1, 0, 32 << 20);
    let t = Instant::now();
    srv.stop();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopped in {:?}",
        t.elapsed()
    );
}

/// A good conversation as bytes: client flags, options, requests.
fn transcript(size: u64) -> Vec<u8> {
    let opt = |o: u32, d: &[u8]| {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&o.to_be_bytes());
        m.extend_from_slice(&(d.len() as u32).to_be_bytes());
        m.extend_from_slice(d);
        m
    };
    let req = |flags: u16, cmd: u16, off: u64, len: u32| {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&7u64.to_be_bytes());
        m.extend_from_slice(&off.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m
    };
    let mut t = 3u32.to_be_bytes().to_vec();
    t.extend(opt(OPT_LIST, &[]));
    t.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    t.extend(opt(
        OPT_SET_META_CONTEXT,
        &Raw::meta_data("", &["base:allocation"]),
    ));
    t.extend(opt(OPT_INFO, &Raw::info_data("fs.img", &[1, 2, 3])));
    t.extend(opt(OPT_GO, &Raw::info_data("", &[3])));
    t.extend(req(0, CMD_READ, 0, 65536));
    t.extend(req(0, CMD_BLOCK_STATUS, 0, size as u32));
    t.extend(req(0, CMD_WRITE, 4096, 16));
    t.extend([0xee; 16]);
    t.extend(req(8, CMD_BLOCK_STATUS, size / 2, 4096));
    t.extend(req(0, CMD_READ, size - 4096, 4096));
    t.extend(req(0, CMD_DISC, 0, 0));
    t
}

mod mutated {
    use super::*;
    use btrfsimg::serve::conn::{Conn, Socket};
    use btrfsimg::serve::session;
    use proptest::prelude::*;

    /// Edits of a good conversation: flipped bytes, cut-off ends, junk inserted.
    #[derive(Debug, Clone)]
    enum Edit {
        Flip(usize, u8),
        Cut(usize),
        Insert(usize, Vec<u8>),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Edit::Flip(i, x)),
            any::<usize>().prop_map(Edit::Cut),
            (
                any::<usize>(),
                proptest::collection::vec(any::<u8>(), 1..40)
            )
                .prop_map(|(i, v)| Edit::Insert(i, v)),
        ]
    }

    fn apply(mut t: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
        for e in edits {
            match e {
                Edit::Flip(i, x) if !t.is_empty() => {
                    let n = t.len();
                    t[i % n] ^= x;
                }
                Edit::Cut(i) => t.truncate(i % (t.len() + 1)),
                Edit::Insert(i, v) => {
                    let at = i % (t.len() + 1);
                    t.splice(at..at, v.iter().copied());
                }
                _ => {}
            }
        }
        t
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Whatever the client sends, the session ends (when the client
        /// closes) without a panic, and answers only with well-formed
        /// messages up to that point.
        #[test]
        fn mutated_conversations_end_their_session(edits in proptest::collection::vec(edit(), 1..6)) {
            let img = IMAGE.with(|i| i.clone());
            let bytes = apply(transcript(img.size()), &edits);
            let (server, mut client) = UnixStream::pair().expect("socket pair");
            let writer = {
                let mut c = client.try_clone().expect("clone");
                std::thread::spawn(move || {
                    let _ = c.write_all(&bytes);
                    let _ = c.shutdown(std::net::Shutdown::Write);
                })
            };
            let reader = std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = client.read_to_end(&mut sink);
                sink.len()
            });
            let cfg = session::SessionConfig {
                tls: None,
                handshake_timeout: Duration::from_secs(10),
                name: "fuzz".into(),
                workers: 1 + edits.len() % 3,
            };
            let t = Instant::now();
            let mut conn = Conn::Plain(Socket::Unix(server));
            let mut stats = session::Stats::default();
            let _ = session::run(&img, &mut conn, &cfg, &mut stats);
            drop(conn);
            prop_assert!(t.elapsed() < Duration::from_secs(15));
            writer.join().expect("writer");
            let replied = reader.join().expect("reader");
            prop_assert!(replied >= 18, "the greeting at least");
        }
    }

    thread_local! {
        static IMAGE: Arc<Image> = Arc::new(image());
    }
}

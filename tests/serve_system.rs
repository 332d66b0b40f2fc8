//! `btrfsimg serve` to real NBD clients: qemu-img (Unix socket and TCP),
//! nbdcopy with four connections, eight clients at once, nbdinfo's map of
//! holes (which must be fs.img's SEEK_HOLE map), qemu-io writes refused,
//! TLS with qemu-img's and libnbd's x509 credentials (and clients refused
//! without TLS, with the wrong CA, without a client certificate), the
//! lifecycle (ready line, SIGTERM, SIGINT) and bad input. Needs qemu-utils,
//! libnbd-bin, openssl, and FUSE for the map comparison.

mod common;

use common::nbd::Served;
use common::*;
use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOOLS: &[&str] = &["qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "openssl"];

fn tree(src: &Path) {
    fuse_test_tree(src);
}

fn args<'a>(src: &'a Path, uuid: &'static str, more: &[&'a OsStr]) -> Vec<&'a OsStr> {
    let mut v: Vec<&OsStr> = vec![src.as_os_str()];
    v.extend(fixed_args(uuid).into_iter().map(OsStr::new));
    // Unallocated space: holes for the map and for sparse reads.
    v.extend(["--extra-space", "64M"].map(OsStr::new));
    v.extend(more);
    v
}

fn export_ref(src: &Path, out: &Path, uuid: &'static str) {
    let mut a: Vec<&str> = fixed_args(uuid);
    a.extend(["--extra-space", "64M"]);
    export_sources(Some(src), out, &a);
}

fn qemu_img_convert(from: &str, to: &Path) {
    let _ = fs::remove_file(to);
    run_ok(
        Command::new(tool("qemu-img"))
            .args(["convert", "-f", "raw", "-O", "raw", from])
            .arg(to),
    );
}

fn nbdcopy(from: &str, to: &Path, connections: u32) {
    let _ = fs::remove_file(to);
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(format!("--connections={connections}"))
            .arg(from)
            .arg(to),
    );
}

/// (offset, length, type) lines of `nbdinfo --map`.
fn nbd_map(uri: &str) -> Vec<(u64, u64, u32)> {
    run_ok(Command::new(tool("nbdinfo")).arg("--map").arg(uri))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

/// The mapped ranges of a file by SEEK_DATA / SEEK_HOLE.
fn seek_map(path: &Path) -> Vec<(u64, u64)> {
    let f = fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut off = 0i64;
    while off < size {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        out.push((data as u64, hole as u64));
        off = hole;
    }
    out
}

#[test]
fn real_clients_read_the_export() {
    let what = "real_clients_read_the_export";
    if !system_tests_available(what) || !tools_available(what, TOOLS) || !fuse_available(what) {
        return;
    }
    let uuid = "0b0d0a0e-0013-4000-8000-000000000001";
    let work = workdir("serve-clients");
    let src = work.path().join("src");
    tree(&src);
    let reference = work.path().join("ref.img");
    export_ref(&src, &reference, uuid);
    let sock = work.path().join("nbd.sock");
    let mut unix = Served::start(
        &args(&src, uuid, &[OsStr::new("--socket"), sock.as_os_str()]),
        &work.path().join("unix.log"),
    );
    assert_eq!(unix.uri, format!("nbd+unix:///?socket={}", sock.display()));
    let mut tcp = Served::start(
        &args(
            &src,
            uuid,
            &[OsStr::new("--listen"), OsStr::new("127.0.0.1:0")],
        ),
        &work.path().join("tcp.log"),
    );
    assert!(tcp.uri.starts_with("nbd://127.0.0.1:"), "{}", tcp.uri);

    let out = work.path().join("out.img");
    qemu_img_convert(&unix.uri, &out);
    assert_files_identical(&out, &reference);
    qemu_img_convert(&tcp.uri, &out);
    assert_files_identical(&out, &reference);
    nbdcopy(&unix.uri, &out, 4);
    assert_files_identical(&out, &reference);
    nbdcopy(&tcp.uri, &out, 4);
    assert_files_identical(&out, &reference);

    // Eight clients at once, both kinds, both sockets.
    let outs: Vec<PathBuf> = (0..8)
        .map(|i| work.path().join(format!("c{i}.img")))
        .collect();
    let children: Vec<_> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let uri = if i % 2 == 0 { &unix.uri } else { &tcp.uri };
            let mut c = if i < 4 {
                let mut c = Command::new(tool("nbdcopy"));
                c.arg("--connections=4").arg(uri).arg(o);
                c
            } else {
                let mut c = Command::new(tool("qemu-img"));
                c.args(["convert", "-f", "raw", "-O", "raw", uri]).arg(o);
                c
            };
            c.spawn().expect("start a client")
        })
        .collect();
    for (mut c, o) in children.into_iter().zip(&outs) {
        assert!(c.wait().unwrap().success(), "client for {}", o.display());
        assert_files_identical(o, &reference);
    }

    // nbdinfo: read-only, multi-conn, and the map of holes.
    let info = run_ok(Command::new(tool("nbdinfo")).arg(&unix.uri));
    for want in [
        "is_read_only: true",
        "can_multi_conn: true",
        "base:allocation",
    ] {
        assert!(info.contains(want), "nbdinfo lacks {want}:\n{info}");
    }
    let map = nbd_map(&unix.uri);
    let size = fs::metadata(&reference).unwrap().len();
    assert_eq!(
        map.iter().map(|m| m.1).sum::<u64>(),
        size,
        "the map covers the export"
    );
    assert!(
        map.iter().any(|m| m.2 == 3),
        "holes are reported (hole,zero): {map:?}"
    );
    assert!(map.iter().all(|m| m.2 == 0 || m.2 == 3), "{map:?}");
    let mapped: Vec<(u64, u64)> = map
        .iter()
        .filter(|m| m.2 == 0)
        .map(|m| (m.0, m.0 + m.1))
        .collect();
    // The same map as fs.img's SEEK_DATA/SEEK_HOLE from `btrfsimg mount`.
    let mut fargs: Vec<&str> = fixed_args(uuid);
    fargs.extend(["--extra-space", "64M"]);
    let m = FuseMount::start(&src, &work.path().join("mnt"), &fargs);
    assert_eq!(
        seek_map(&m.img()),
        mapped,
        "NBD and FUSE report the same holes"
    );
    assert!(m.stop(libc::SIGTERM).success());
    // Every hole of the map is zeros in the export.
    let bytes = fs::read(&reference).unwrap();
    for (o, l, t) in &map {
        if *t == 3 {
            assert!(
                bytes[*o as usize..(*o + *l) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "hole at {o}"
            );
        }
    }

    // qemu-io cannot write; the server goes on serving.
    let w = run(Command::new(tool("qemu-io"))
        .args(["-f", "raw", "-c", "write -P 0x55 0 4k"])
        .arg(&unix.uri));
    let text = output_text(&w);
    assert!(
        !w.status.success() || text.contains("not permitted") || text.contains("read-only"),
        "qemu-io write: {text}"
    );
    assert!(!text.contains("wrote 4096"), "qemu-io wrote: {text}");
    qemu_img_convert(&unix.uri, &out);
    assert_files_identical(&out, &reference);

    // A line per connection at info level, and a clean stop.
    let log = unix.log();
    assert!(log.contains("connected") && log.contains("closed"), "{log}");
    assert!(unix.alive() && tcp.alive());
    assert!(unix.stop_with(libc::SIGTERM).success());
    assert!(!sock.exists(), "the socket is removed");
    assert!(tcp.stop_with(libc::SIGINT).success());
}

/// A CA and certificates signed by it (ECDSA P-256), in the file names
/// qemu's and libnbd's x509 credentials look for.
fn make_certs(dir: &Path, ca_name: &str) {
    fs::create_dir_all(dir).unwrap();
    let ossl = |args: &[&str]| {
        run_ok(Command::new(tool("openssl")).args(args).current_dir(dir));
    };
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "3650",
        "-subj",
        &format!("/CN={ca_name}"),
    ]);
    for (who, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        ossl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{who}-key.pem"),
            "-out",
            &format!("{who}.csr"),
            "-subj",
            &format!("/CN={who}"),
        ]);
        fs::write(
            dir.join(format!("{who}.ext")),
            format!(
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n\
                 keyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n"
            ),
        )
        .unwrap();
        ossl(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{who}-cert.pem"),
            "-days",
            "3650",
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
}

/// A client directory holding only `files` of `from`.
fn client_dir(from: &Path, to: &Path, files: &[&str]) -> PathBuf {
    fs::create_dir_all(to).unwrap();
    for f in files {
        fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to.to_path_buf()
}

/// qemu-img convert over TLS with the x509 credentials in `dir`.
fn qemu_tls(port: u16, dir: &Path, out: &Path) -> std::process::Output {
    let _ = fs::remove_file(out);
    run(Command::new(tool("qemu-img"))
        .arg("convert")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,\
             file.server.port={port},file.tls-creds=tls0"
        ))
        .args(["-O", "raw"])
        .arg(out))
}

#[test]
fn tls_is_required_and_verified() {
    let what = "tls_is_required_and_verified";
    if !system_tests_available(what) || !tools_available(what, TOOLS) {
        return;
    }
    let uuid = "0b0d0a0e-0013-4000-8000-000000000002";
    let work = workdir("serve-tls");
    let src = work.path().join("src");
    tree(&src);
    let reference = work.path().join("ref.img");
    export_ref(&src, &reference, uuid);
    let pki = work.path().join("pki");
    make_certs(&pki, "btrfsimg test CA");
    let other = work.path().join("other");
    make_certs(&other, "some other CA");
    let cert = pki.join("server-cert.pem");
    let key = pki.join("server-key.pem");
    let tls_server = |more: &[&OsStr], log: &str| {
        let mut a: Vec<&OsStr> = vec![
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--tls-cert"),
            cert.as_os_str(),
            OsStr::new("--tls-key"),
            key.as_os_str(),
        ];
        a.extend(more);
        Served::start(&args(&src, uuid, &a), &work.path().join(log))
    };
    let mut srv = tls_server(&[], "tls.log");
    assert!(srv.uri.starts_with("nbds://127.0.0.1:"), "{}", srv.uri);
    let port = srv.port();
    let out = work.path().join("out.img");
    let good = client_dir(&pki, &work.path().join("good"), &["ca-cert.pem"]);
    let o = qemu_tls(port, &good, &out);
    assert!(o.status.success(), "qemu-img over TLS: {}", output_text(&o));
    assert_files_identical(&out, &reference);
    // libnbd with the CA reads; the size is the export's.
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        good.display()
    );
    let size = run_ok(Command::new(tool("nbdinfo")).arg("--size").arg(&uri));
    assert_eq!(
        size.trim(),
        fs::metadata(&reference).unwrap().len().to_string()
    );
    nbdcopy(&uri, &out, 4);
    assert_files_identical(&out, &reference);
    // Without TLS: refused (TLS is required).
    let plain = run(Command::new(tool("nbdinfo")).arg(format!("nbd://127.0.0.1:{port}/")));
    assert!(!plain.status.success(), "a client without TLS was served");
    let plain =
        run(Command::new(tool("qemu-img")).args(["info", &format!("nbd://127.0.0.1:{port}/")]));
    assert!(!plain.status.success(), "qemu-img without TLS was served");
    // Another CA: the server's certificate does not verify.
    let wrong = client_dir(&other, &work.path().join("wrong"), &["ca-cert.pem"]);
    assert!(
        !qemu_tls(port, &wrong, &out).status.success(),
        "a wrong CA was accepted"
    );
    // The server is unharmed.
    assert!(qemu_tls(port, &good, &out).status.success());
    assert_files_identical(&out, &reference);
    assert!(srv.stop_with(libc::SIGTERM).success());

    // With --tls-client-ca, clients must present a certificate of that CA.
    let ca = pki.join("ca-cert.pem");
    let mut srv = tls_server(&[OsStr::new("--tls-client-ca"), ca.as_os_str()], "mtls.log");
    let port = srv.port();
    assert!(
        !qemu_tls(port, &good, &out).status.success(),
        "a client without a certificate was served"
    );
    let withcert = client_dir(
        &pki,
        &work.path().join("withcert"),
        &["ca-cert.pem", "client-cert.pem", "client-key.pem"],
    );
    let o = qemu_tls(port, &withcert, &out);
    assert!(
        o.status.success(),
        "qemu-img with a client certificate: {}",
        output_text(&o)
    );
    assert_files_identical(&out, &reference);
    // A client certificate of another CA is refused.
    let foreign = work.path().join("foreign");
    client_dir(&pki, &foreign, &["ca-cert.pem"]);
    for f in ["client-cert.pem", "client-key.pem"] {
        fs::copy(other.join(f), foreign.join(f)).unwrap();
    }
    assert!(
        !qemu_tls(port, &foreign, &out).status.success(),
        "a foreign client certificate"
    );
    assert!(srv.stop_with(libc::SIGTERM).success());
}

#[test]
fn serve_bad_input_is_one_line() {
    let what = "serve_bad_input_is_one_line";
    if !tools_available(what, &["openssl"]) {
        return;
    }
    let work = workdir("serve-bad");
    let src = work.path().join("src");
    TreeBuilder::new(&src).file(b"a", b"a").finalize();
    let regular = work.path().join("regular");
    fs::write(&regular, b"x").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_at = taken.local_addr().unwrap().to_string();
    let pki = work.path().join("pki");
    make_certs(&pki, "ca");
    let other = work.path().join("other");
    make_certs(&other, "other");
    let missing = work.path().join("no/such/dir/sock");
    let garbage = work.path().join("garbage.pem");
    fs::write(&garbage, b"not a certificate").unwrap();
    let p = |x: &Path| x.display().to_string();
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "bad --listen",
            vec!["--listen".into(), "nowhere:port".into()],
            vec!["invalid --listen 'nowhere:port'".into()],
        ),
        (
            "socket in a missing directory",
            vec!["--socket".into(), p(&missing)],
            vec![p(&missing)],
        ),
        (
            "socket path is a file",
            vec!["--socket".into(), p(&regular)],
            vec![p(&regular), "not a socket".into()],
        ),
        (
            "port in use",
            vec!["--listen".into(), taken_at.clone()],
            vec![format!("cannot listen on {taken_at}")],
        ),
        (
            "missing certificate",
            vec![
                "--socket".into(),
                p(&work.path().join("s")),
                "--tls-cert".into(),
                p(&work.path().join("nope.pem")),
                "--tls-key".into(),
                p(&pki.join("server-key.pem")),
            ],
            vec!["nope.pem".into()],
        ),
        (
            "not a certificate",
            vec![
                "--socket".into(),
                p(&work.path().join("s")),
                "--tls-cert".into(),
                p(&garbage),
                "--tls-key".into(),
                p(&pki.join("server-key.pem")),
            ],
            vec![p(&garbage), "no PEM certificate".into()],
        ),
        (
            "key of another certificate",
            vec![
                "--socket".into(),
                p(&work.path().join("s")),
                "--tls-cert".into(),
                p(&pki.join("server-cert.pem")),
                "--tls-key".into(),
                p(&other.join("server-key.pem")),
            ],
            vec![
                p(&pki.join("server-cert.pem")),
                "cannot be used with the key".into(),
            ],
        ),
        (
            "no connections",
            vec![
                "--socket".into(),
                p(&work.path().join("s")),
                "--max-connections".into(),
                "0".into(),
            ],
            vec!["--max-connections".into()],
        ),
        (
            "absurd --threads",
            vec![
                "--socket".into(),
                p(&work.path().join("s")),
                "--threads".into(),
                "1000000000".into(),
            ],
            vec!["invalid --threads 1000000000".into()],
        ),
    ];
    for (what, extra, fragments) in cases {
        let o = run(Command::new(btrfsimg_bin())
            .arg("serve")
            .arg(&src)
            .args(&extra));
        assert_eq!(o.status.code(), Some(1), "{what}: {}", output_text(&o));
        let stderr = String::from_utf8_lossy(&o.stderr);
        let f: Vec<&str> = fragments.iter().map(String::as_str).collect();
        assert_error_line(&stderr, &f, what);
        assert!(o.stdout.is_empty(), "{what}: printed a URI");
    }
    assert!(!work.path().join("s").exists(), "no socket left behind");
    // Neither endpoint: a usage error.
    let o = run(Command::new(btrfsimg_bin()).arg("serve").arg(&src));
    assert_eq!(o.status.code(), Some(2));
    drop(taken);
}

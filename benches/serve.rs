//! Copying the image over NBD from `btrfsimg serve` against `nbdkit file`
//! serving the exported image and `nbdkit floppy` serving the same tree as
//! FAT32 (the other server that builds its image on demand), in the same
//! run, alternating, medians of `BTRFSIMG_BENCH_ROUNDS` (default 3).
//!
//! Every copy gets a fresh server, so the btrfsimg figures include planning
//! (in time to ready) and synthesizing every block (in the copy); floppy's
//! likewise include building its FAT. Before each server starts, the tree and
//! the exported image are read into the page cache (this VM's cache shrinks
//! over time). Time to ready is measured the same way for all three: from
//! spawning the server until a client connecting to its socket (polled every
//! millisecond) reads the NBD greeting; for btrfsimg also until the URI line
//! appears on its stdout. Clients: `nbdcopy --connections=4 URI null:`
//! (nbdcopy's own sink; to `/dev/null`, a character device, nbdcopy falls
//! back to one synchronous connection, which is measured too) and, when
//! installed, `qemu-img convert` to a null-co target. Also checks once,
//! outside timing, that `nbdcopy URI FILE` from btrfsimg equals the export.
//!
//! Tree: `BTRFSIMG_BENCH_TREE`, else a fresh copy of /usr/share.
//!
//!     cargo bench --bench serve

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_btrfsimg");

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Reads `f` to the end (into the page cache).
fn read_file(f: &Path, buf: &mut [u8]) -> u64 {
    let Ok(mut f) = fs::File::open(f) else {
        return 0;
    };
    let mut n = 0;
    while let Ok(k) = f.read(buf) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    n
}

/// Reads every regular file under `dir`: (entries, bytes in files).
fn read_tree(dir: &Path, buf: &mut [u8]) -> (u64, u64) {
    let (mut entries, mut bytes) = (0, 0);
    let Ok(rd) = fs::read_dir(dir) else {
        return (0, 0);
    };
    for e in rd.flatten() {
        entries += 1;
        let p = e.path();
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                let (a, b) = read_tree(&p, buf);
                entries += a;
                bytes += b;
            }
            Ok(m) if m.is_file() => bytes += read_file(&p, buf),
            _ => {}
        }
    }
    (entries, bytes)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Btrfsimg,
    File,
    Floppy,
}

const KINDS: [Kind; 3] = [Kind::Btrfsimg, Kind::File, Kind::Floppy];

/// A running server, stopped with SIGTERM and reaped on drop.
struct Server {
    child: Child,
    uri: String,
    /// Spawn to the first NBD greeting on the socket.
    ready: f64,
    /// Spawn to the URI line on stdout (btrfsimg only).
    uri_line: Option<f64>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(kind: Kind, tree: &Path, image: &Path, sock: &Path) -> Server {
        let _ = fs::remove_file(sock);
        let mut cmd = match kind {
            Kind::Btrfsimg => {
                let mut c = Command::new(BIN);
                c.arg("serve").arg(tree).arg("--socket").arg(sock);
                c
            }
            Kind::File | Kind::Floppy => {
                let mut c = Command::new("nbdkit");
                c.args(["--exit-with-parent", "-f", "-r", "-U"]).arg(sock);
                match kind {
                    Kind::File => c.arg("file").arg(image),
                    _ => c.arg("floppy").arg(tree),
                };
                c
            }
        };
        let start = Instant::now();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let line = std::thread::spawn(move || {
            let mut l = String::new();
            let _ = BufReader::new(stdout).read_line(&mut l);
            (l.trim_end().to_string(), start.elapsed().as_secs_f64())
        });
        let ready = loop {
            if let Ok(mut s) = UnixStream::connect(sock) {
                s.set_read_timeout(Some(Duration::from_secs(120)))
                    .expect("timeout");
                let mut magic = [0u8; 8];
                s.read_exact(&mut magic)
                    .unwrap_or_else(|e| panic!("{kind:?}: no greeting: {e}"));
                assert_eq!(&magic, b"NBDMAGIC", "{kind:?}: not an NBD server");
                break start.elapsed().as_secs_f64();
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{kind:?} server exited before serving: {st}");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let fallback = format!("nbd+unix:///?socket={}", sock.display());
        let (uri, uri_line) = match kind {
            Kind::Btrfsimg => {
                let (l, t) = line.join().expect("stdout reader");
                assert!(l.starts_with("nbd+unix://"), "unexpected: {l:?}");
                (l, Some(t))
            }
            // nbdkit prints nothing; its stdout closes when it exits.
            _ => (fallback, None),
        };
        Server {
            child,
            uri,
            ready,
            uri_line,
        }
    }

    /// User plus system CPU seconds of the server so far, every thread.
    fn cpu(&self) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("stat");
        let rest = &stat[stat.rfind(')').expect("comm") + 1..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().expect("ticks"))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (f[0] + f[1]) as f64 / hz
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    Nbdcopy,
    NbdcopySync,
    QemuImg,
}

/// Copies the whole export to nowhere; the wall time in seconds.
fn copy(client: Client, uri: &str, size: u64) -> f64 {
    let mut c = match client {
        Client::Nbdcopy => {
            let mut c = Command::new("nbdcopy");
            c.args(["--connections=4", uri, "null:"]);
            c
        }
        Client::NbdcopySync => {
            let mut c = Command::new("nbdcopy");
            c.args([uri, "/dev/null"]);
            c
        }
        Client::QemuImg => {
            let mut c = Command::new("qemu-img");
            c.args(["convert", "-n", "-f", "raw", "-O", "raw", uri])
                .arg(format!(
                    r#"json:{{"driver":"raw","file":{{"driver":"null-co","size":{size}}}}}"#
                ));
            c
        }
    };
    let start = Instant::now();
    let out = c.output().expect("run the client");
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut x, mut y) = (
        BufReader::with_capacity(1 << 20, fs::File::open(a).expect("open")),
        BufReader::with_capacity(1 << 20, fs::File::open(b).expect("open")),
    );
    let (mut p, mut q) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = x.read(&mut p).expect("read");
        if n == 0 {
            return y.read(&mut q).expect("read") == 0;
        }
        if y.read_exact(&mut q[..n]).is_err() || p[..n] != q[..n] {
            return false;
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for (cmd, arg) in [("nbdkit", "--version"), ("nbdcopy", "--version")] {
        if !have(cmd, arg) {
            eprintln!("SKIPPED serve bench: {cmd} not found (apt-get install nbdkit libnbd-bin)");
            return;
        }
    }
    let qemu = have("qemu-img", "--version");
    let work = tempfile::tempdir().expect("tempdir");
    let tree: PathBuf = match std::env::var_os("BTRFSIMG_BENCH_TREE") {
        Some(t) => PathBuf::from(t),
        None => {
            let t = work.path().join("share");
            let ok = Command::new("cp")
                .args(["-a", "/usr/share"])
                .arg(&t)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "copying /usr/share failed");
            t
        }
    };
    let rounds: usize = std::env::var("BTRFSIMG_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let image = work.path().join("ref.img");
    let ok = Command::new(BIN)
        .args(["export", "-q"])
        .arg(&tree)
        .arg("-o")
        .arg(&image)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "export failed");
    let meta = fs::metadata(&image).expect("stat");
    let size = meta.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut warm = || {
        read_file(&image, &mut buf);
        read_tree(&tree, &mut buf)
    };
    let (entries, file_bytes) = warm();
    let sock = |k: Kind| work.path().join(format!("{k:?}.sock"));

    // Outside timing: what nbdcopy gets from btrfsimg is the export, and
    // the floppy's size.
    {
        let s = Server::start(Kind::Btrfsimg, &tree, &image, &sock(Kind::Btrfsimg));
        let out = work.path().join("copied.img");
        let st = Command::new("nbdcopy")
            .arg(&s.uri)
            .arg(&out)
            .status()
            .expect("nbdcopy");
        assert!(st.success(), "nbdcopy into a file failed");
        assert!(
            same_bytes(&out, &image),
            "nbdcopy from btrfsimg serve differs from the export"
        );
        fs::remove_file(&out).expect("rm");
    }
    let floppy_size: u64 = {
        let s = Server::start(Kind::Floppy, &tree, &image, &sock(Kind::Floppy));
        let o = Command::new("nbdinfo")
            .args(["--size", &s.uri])
            .output()
            .expect("nbdinfo");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .expect("nbdinfo --size")
    };
    let size_of = |k: Kind| if k == Kind::Floppy { floppy_size } else { size };

    let mut clients = vec![Client::Nbdcopy, Client::NbdcopySync];
    if qemu {
        clients.push(Client::QemuImg);
    }
    let mut ready: [Vec<f64>; 3] = Default::default();
    let mut uri_line = vec![];
    let mut secs: std::collections::BTreeMap<(usize, usize), Vec<f64>> = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for (ci, &client) in clients.iter().enumerate() {
            for j in 0..KINDS.len() {
                // Each round and client starts with another server.
                let ki = (round + ci + j) % KINDS.len();
                let kind = KINDS[ki];
                warm();
                let s = Server::start(kind, &tree, &image, &sock(kind));
                ready[ki].push(s.ready);
                uri_line.extend(s.uri_line);
                let before = s.cpu();
                let t = copy(client, &s.uri, size_of(kind));
                if client == Client::Nbdcopy {
                    cpu[ki].push(s.cpu() - before);
                }
                secs.entry((ci, ki)).or_default().push(t);
            }
        }
    }

    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "\ntree: {} ({} entries, {:.0} MiB in files); btrfsimg image {:.1} MiB \
         ({:.1} MiB allocated), nbdkit floppy (FAT32) {:.1} MiB; {} rounds, medians; \
         a fresh server for every copy\n",
        tree.display(),
        entries,
        mib(file_bytes),
        mib(size),
        mib(meta.blocks() * 512),
        mib(floppy_size),
        rounds
    );
    println!(
        "| measure | btrfsimg serve | nbdkit file (exported image) | ratio | nbdkit floppy (same tree) | ratio | target |"
    );
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, v: [f64; 3], unit: &str, prec: usize, target: &str| {
        println!(
            "| {name} | {:.prec$} {unit} | {:.prec$} {unit} | {:.2} | {:.prec$} {unit} | {:.2} | {target} |",
            v[0],
            v[1],
            v[0] / v[1],
            v[2],
            v[0] / v[2]
        );
    };
    row(
        "image size",
        [mib(size), mib(size), mib(floppy_size)],
        "MiB",
        1,
        "",
    );
    let r = |k: usize| median(ready[k].clone());
    row(
        "time to ready (start → NBD greeting)",
        [r(0), r(1), r(2)],
        "s",
        3,
        "",
    );
    println!(
        "| time to ready (start → URI line on stdout) | {:.3} s | | | | | |",
        median(uri_line)
    );
    for (ci, client) in clients.iter().enumerate() {
        let (name, target) = match client {
            Client::Nbdcopy => ("`nbdcopy --connections=4 URI null:`", "≥ 0.8 (file)"),
            Client::NbdcopySync => ("`nbdcopy URI /dev/null` (synchronous)", ""),
            Client::QemuImg => ("`qemu-img convert` to null-co", ""),
        };
        let t = |k: usize| median(secs[&(ci, k)].clone());
        row(
            &format!("{name}: throughput (image bytes)"),
            [0, 1, 2].map(|k| size_of(KINDS[k]) as f64 / t(k) / 1e6),
            "MB/s",
            0,
            target,
        );
        row("same: whole-copy time", [t(0), t(1), t(2)], "s", 2, "");
    }
    row(
        "server CPU (user + sys) during the `nbdcopy --connections=4` copy",
        [0, 1, 2].map(|k| median(cpu[k].clone())),
        "s",
        2,
        "",
    );
    println!("\nratio: btrfsimg's figure divided by the other server's");
}

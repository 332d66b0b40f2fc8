//! The NBD frontend: `Image::read_at` to other machines, read-only, one
//! thread per connection (they share the image, its caches and its source
//! files). Clients that speak NBD (qemu, nbdcopy, nbd-client, libnbd) read
//! the same bytes as `export` writes.
//!
//! Plain NBD has no authentication: anyone who reaches the socket reads the
//! image. Hence `--listen` binds loopback unless told otherwise, a Unix
//! socket is guarded by its directory's permissions, and TLS
//! (NBD_OPT_STARTTLS, required once configured) gives privacy and, with a
//! client CA, authentication.

pub mod conn;
pub mod proto;
pub mod session;
pub mod tls;

use crate::error::{Error, Result};
use crate::image::Image;
use conn::{Conn, Socket};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// The port NBD clients try when given none.
pub const DEFAULT_PORT: u16 = 10809;

impl Listen {
    /// `--listen` values: `PORT`, `:PORT`, `ADDR:PORT`, `[V6ADDR]:PORT`, `ADDR`;
    /// without an address, loopback.
    pub fn parse_tcp(s: &str) -> Result<Listen> {
        let bad = || {
            Error::msg(format!(
                "invalid --listen '{s}': expected [ADDRESS]:PORT, PORT or ADDRESS"
            ))
        };
        let loopback = |port: u16| Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
        if let Ok(port) = s.parse::<u16>() {
            return Ok(loopback(port));
        }
        if let Some(port) = s.strip_prefix(':') {
            return port.parse::<u16>().map(loopback).map_err(|_| bad());
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Listen::Tcp(a));
        }
        let ip = s
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(s);
        ip.parse::<std::net::IpAddr>()
            .map(|ip| Listen::Tcp(SocketAddr::new(ip, DEFAULT_PORT)))
            .map_err(|_| bad())
    }
}

#[derive(Clone)]
pub struct ServeOptions {
    pub listen: Listen,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has from connecting to the end of option haggling.
    pub handshake_timeout: Duration,
    /// Threads answering each connection's requests (1: one at a time).
    pub threads: usize,
}

/// Stops a server from another thread or from a signal handler: a flag and
/// a socket pair whose write end wakes the accept loop.
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    wake_read: UnixStream,
    wake_write: UnixStream,
}

impl Shutdown {
    pub fn new() -> io::Result<Shutdown> {
        let (wake_read, wake_write) = UnixStream::pair()?;
        wake_write.set_nonblocking(true)?;
        Ok(Shutdown {
            flag: Arc::new(AtomicBool::new(false)),
            wake_read,
            wake_write,
        })
    }

    /// Makes `signals` stop the server (after `register` the handler only
    /// sets the flag and writes a byte).
    pub fn on_signals(&self, signals: &[i32]) -> io::Result<()> {
        for &sig in signals {
            signal_hook::flag::register(sig, self.flag.clone())?;
            signal_hook::low_level::pipe::register(sig, self.wake_write.try_clone()?)?;
        }
        Ok(())
    }

    pub fn trigger(&self) {
        wake(&self.flag, &self.wake_write);
    }

    /// A handle that can trigger this shutdown from another thread.
    pub fn handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle {
            flag: self.flag.clone(),
            wake: self.wake_write.try_clone()?,
        })
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// See `Shutdown::handle`.
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    wake: UnixStream,
}

impl ShutdownHandle {
    pub fn trigger(&self) {
        wake(&self.flag, &self.wake);
    }
}

/// Sets the stop flag, then wakes the accept loop.
fn wake(flag: &AtomicBool, wake: &UnixStream) {
    flag.store(true, Ordering::SeqCst);
    let _ = (&*wake).write(&[1]);
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn bind(listen: &Listen) -> Result<Listener> {
        match listen {
            Listen::Tcp(a) => TcpListener::bind(a)
                .map(Listener::Tcp)
                .map_err(|e| Error::msg(format!("cannot listen on {a}: {e}"))),
            Listen::Unix(p) => {
                remove_stale_socket(p)?;
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(|e| Error::io(p, e))
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    /// The URI clients use (qemu, nbdcopy, nbdinfo).
    fn uri(&self, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match self {
            Listener::Unix(_, p) => {
                format!("nbd{s}+unix:///?socket={}", crate::error::shown_path(p))
            }
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd{s}://{a}/"),
                Err(_) => format!("nbd{s}://?/"),
            },
        }
    }

    fn accept(&self) -> io::Result<(Socket, String)> {
        let (s, peer) = match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                (Socket::Unix(s), "unix socket".to_string())
            }
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                s.set_nodelay(true)?;
                (Socket::Tcp(s), a.to_string())
            }
        };
        // Accepted sockets inherit non-blocking mode from the listener on
        // some systems: sessions block.
        match &s {
            Socket::Unix(u) => u.set_nonblocking(false)?,
            Socket::Tcp(t) => t.set_nonblocking(false)?,
        }
        Ok((s, peer))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A socket file left by a server that is gone is replaced; anything else
/// at the path is an error.
fn remove_stale_socket(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
        Ok(m) if !m.file_type().is_socket() => Err(Error::at(p, "exists and is not a socket")),
        Ok(_) => match UnixStream::connect(p) {
            Ok(_) => Err(Error::at(p, "another server is listening on this socket")),
            Err(_) => std::fs::remove_file(p).map_err(|e| Error::io(p, e)),
        },
    }
}

/// Waits until the listener or the wake socket is readable.
fn wait(listener: RawFd, wake: RawFd) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfd entries of ours.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A bound listener, made before the image is planned so that a port in
/// use or a bad socket path is reported at once; clients that connect
/// while the image is planned wait in the listen queue.
pub struct Server {
    listener: Listener,
}

impl Server {
    pub fn bind(listen: &Listen) -> Result<Server> {
        let listener = Listener::bind(listen)?;
        listener
            .set_nonblocking()
            .map_err(|e| Error::msg(format!("cannot serve: {e}")))?;
        Ok(Server { listener })
    }

    /// The URI clients use to reach this server.
    pub fn uri(&self, tls: bool) -> String {
        self.listener.uri(tls)
    }

    /// Serves `image` until `shutdown` is triggered, calling `ready` with
    /// the URI once clients are answered. Returns when every session has
    /// ended.
    pub fn run(
        self,
        image: Arc<Image>,
        opts: &ServeOptions,
        shutdown: &Shutdown,
        ready: impl FnOnce(&str),
    ) -> Result<()> {
        run(self.listener, image, opts, shutdown, ready)
    }
}

/// `Server::bind` then `Server::run`.
pub fn serve(
    image: Arc<Image>,
    opts: &ServeOptions,
    shutdown: &Shutdown,
    ready: impl FnOnce(&str),
) -> Result<()> {
    Server::bind(&opts.listen)?.run(image, opts, shutdown, ready)
}

fn run(
    listener: Listener,
    image: Arc<Image>,
    opts: &ServeOptions,
    shutdown: &Shutdown,
    ready: impl FnOnce(&str),
) -> Result<()> {
    // The allocation map is made once, before the first client needs it.
    image.allocation();
    let uri = listener.uri(opts.tls.is_some());
    log::info!("listening on {uri}");
    ready(&uri);
    let live: Arc<parking_lot::Mutex<BTreeMap<u64, Socket>>> = Default::default();
    let mut next_id = 0u64;
    std::thread::scope(|scope| {
        let result = loop {
            if shutdown.requested() {
                break Ok(());
            }
            if let Err(e) = wait(listener.fd(), shutdown.wake_read.as_raw_fd()) {
                break Err(Error::msg(format!("cannot serve: {e}")));
            }
            if shutdown.requested() {
                break Ok(());
            }
            let (sock, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was
                    // taken: the server goes on.
                    log::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            next_id += 1;
            let id = next_id;
            let name = format!("connection {id} ({peer})");
            if live.lock().len() >= opts.max_connections {
                log::warn!(
                    "{name}: refused, {} connections are open (--max-connections)",
                    opts.max_connections
                );
                sock.shutdown();
                continue;
            }
            match sock.try_clone() {
                Ok(c) => {
                    live.lock().insert(id, c);
                }
                Err(e) => {
                    log::warn!("{name}: {e}");
                    continue;
                }
            }
            log::info!("{name}: connected");
            let image = image.clone();
            let their_live = live.clone();
            let cfg = session::SessionConfig {
                tls: opts.tls.clone(),
                handshake_timeout: opts.handshake_timeout,
                name,
                workers: opts.threads,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-{id}"))
                .spawn_scoped(scope, move || {
                    // A reply the client does not take within this ends it.
                    let _ = sock.set_write_timeout(Some(Duration::from_secs(600)));
                    let mut conn = Conn::Plain(sock);
                    let mut stats = session::Stats::default();
                    let end = session::run(&image, &mut conn, &cfg, &mut stats);
                    conn.close();
                    let why = match end {
                        session::End::Asked => "client disconnected".to_string(),
                        session::End::Client(w) => w,
                    };
                    log::info!(
                        "{}: closed ({why}): {} requests, {} bytes read, {} refused",
                        cfg.name,
                        stats.requests,
                        stats.bytes_read,
                        stats.errors
                    );
                    if let Some(s) = their_live.lock().remove(&id) {
                        s.shutdown();
                    }
                });
            if let Err(e) = spawned {
                log::warn!("connection {id}: cannot start a thread: {e}");
                if let Some(s) = live.lock().remove(&id) {
                    s.shutdown();
                }
            }
        };
        // Sessions blocked on their sockets return once these are shut.
        for s in live.lock().values() {
            s.shutdown();
        }
        result
    })?;
    drop(listener);
    // Drain wake bytes (none matter now).
    let _ = shutdown.wake_read.set_nonblocking(true);
    let _ = (&shutdown.wake_read).read(&mut [0u8; 64]);
    Ok(())
}

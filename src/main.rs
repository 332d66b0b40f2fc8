//! Command line: parse, call the library, turn errors into one line and an exit code.

use btrfsimg::source::{Closure, Sources};
use btrfsimg::{export, fuse, plan, serve, Error, Image, Options};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "btrfsimg",
    version,
    about = "Build btrfs images from a directory tree, without writing them out"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the image to a file or to stdout.
    Export {
        /// Directory whose contents become the image root.
        root: Option<PathBuf>,
        #[command(flatten)]
        image: ImageArgs,
        /// Output file; `-` (or omitted, when stdout is not a terminal) for stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Overwrite an existing output file.
        #[arg(short, long)]
        force: bool,
        /// Compress with zstd (default level 3).
        #[arg(long, value_name = "LEVEL", num_args = 0..=1, default_missing_value = "3",
              require_equals = true, allow_negative_numbers = true)]
        zstd: Option<i32>,
        /// Worker threads compressing (--compress, --zstd) [default: all cores];
        /// any number gives the same bytes.
        #[arg(long)]
        threads: Option<u32>,
        /// Also write a bmap of the image to FILE (bmaptool's block map,
        /// format 2.0): the mapped blocks with their SHA-256, made in the same
        /// pass, so that `bmaptool copy` writes only those. bmaptool finds
        /// IMAGE.bmap by itself (for fs.img.zst also fs.img.bmap).
        #[arg(long, value_name = "FILE")]
        bmap: Option<PathBuf>,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Plan the image and print its exact size and layout, without producing it.
    Plan {
        /// Directory whose contents become the image root.
        root: Option<PathBuf>,
        #[command(flatten)]
        image: ImageArgs,
        /// Print only the image size in bytes.
        #[arg(long)]
        bytes: bool,
    },
    /// Serve the image read-only over NBD (qemu, nbdcopy, nbd-client, nbdinfo)
    /// in the foreground until SIGINT or SIGTERM. Prints the URI clients use
    /// once ready. Plain NBD has no authentication: whoever reaches the
    /// socket reads the image (see --tls-cert).
    #[command(group(clap::ArgGroup::new("endpoint").required(true).args(["socket", "listen"])))]
    Serve {
        /// Directory whose contents become the image root.
        root: Option<PathBuf>,
        #[command(flatten)]
        image: ImageArgs,
        /// Listen on a Unix socket at PATH (nbd+unix:///?socket=PATH).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Listen on TCP at [ADDRESS]:PORT, PORT or ADDRESS (port 10809);
        /// loopback unless ADDRESS says otherwise (0.0.0.0 or [::] for
        /// every interface); port 0 picks a free one.
        #[arg(long, value_name = "[ADDRESS]:PORT")]
        listen: Option<String>,
        /// Require TLS (NBD_OPT_STARTTLS) with this PEM certificate chain.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Also require clients to present a certificate signed by this CA
        /// (PEM): authentication on top of TLS's privacy.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// Connections served at once; more are closed as they come.
        #[arg(long, default_value_t = 128)]
        max_connections: usize,
        /// Seconds a client has to finish the handshake.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        handshake_timeout: u64,
        /// Threads answering each connection's requests side by side (TLS
        /// connections: one at a time); at most 64.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Memory for encoded tree blocks (see mount --cache-size).
        #[arg(long, value_name = "SIZE", default_value = "256M")]
        cache_size: String,
    },
    /// Serve the image as the read-only file MOUNTPOINT/fs.img (FUSE), in the
    /// foreground, until unmounted (fusermount3 -u MOUNTPOINT) or interrupted.
    Mount {
        /// [ROOT] MOUNTPOINT: the directory whose contents become the image root
        /// (optional with --closure-info/--files), and an empty directory to mount on.
        #[arg(required = true, num_args = 1..=2, value_name = "PATH")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        image: ImageArgs,
        /// Worker threads answering reads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Memory for encoded tree blocks, so readers that come back to the same
        /// metadata (O_DIRECT, QEMU cache=none) do not make it re-encoded.
        #[arg(long, value_name = "SIZE", default_value = "256M")]
        cache_size: String,
        /// Let every user read fs.img (non-root users need `user_allow_other` in /etc/fuse.conf).
        #[arg(long, conflicts_with = "allow_root")]
        allow_other: bool,
        /// Let root read fs.img too (non-root users need `user_allow_other` in /etc/fuse.conf).
        #[arg(long)]
        allow_root: bool,
        /// Mount options, comma separated: auto_unmount (unmount even if this
        /// process is killed; needs allow_other or allow_root), allow_other, allow_root.
        #[arg(short = 'o', value_delimiter = ',')]
        options: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    Dup,
    Single,
}

#[derive(clap::Args)]
struct ImageArgs {
    /// A Nix closureInfo directory: its store-paths go to the image at their own
    /// paths, its registration to /nix-path-registration.
    #[arg(long, value_name = "DIR")]
    closure_info: Option<PathBuf>,
    /// A file listing store paths, one per line (like closureInfo's store-paths).
    #[arg(long, value_name = "FILE")]
    store_paths: Option<PathBuf>,
    /// A `nix-store --load-db` registration file (like closureInfo's registration).
    #[arg(long, value_name = "FILE")]
    registration: Option<PathBuf>,
    /// Where the registration goes in the image.
    #[arg(long, value_name = "PATH", default_value = "/nix-path-registration")]
    registration_path: PathBuf,
    /// Read /nix/store/X from DIR/nix/store/X (chroot stores).
    #[arg(long, value_name = "DIR")]
    store_root: Option<PathBuf>,
    /// Overlay DIR's contents at the image root (repeatable); directories merge.
    #[arg(long, value_name = "DIR")]
    files: Vec<PathBuf>,
    /// Where the booted system mounts the image (e.g. /nix): ROOT and --files
    /// are the tree there; store paths, --registration-path and --subvol
    /// mountpoints are system paths placed relative to it [default: /].
    #[arg(long, value_name = "PATH")]
    mountpoint: Option<PathBuf>,
    /// Filesystem label (at most 255 bytes).
    #[arg(short = 'L', long)]
    label: Option<String>,
    /// Filesystem UUID (default: derived from the content, so reproducible).
    #[arg(short = 'U', long)]
    uuid: Option<String>,
    /// Force every inode's owner, as UID:GID.
    #[arg(long)]
    owner: Option<String>,
    /// Seconds since the epoch for times the source does not provide
    /// [default: $SOURCE_DATE_EPOCH, else 1].
    #[arg(long)]
    timestamp: Option<String>,
    /// Exact image size (e.g. 2G); an error if the content needs more.
    #[arg(long)]
    size: Option<String>,
    /// Unallocated space to add after the content (e.g. 512M).
    #[arg(long)]
    extra_space: Option<String>,
    /// Tree block size in bytes.
    #[arg(long, default_value_t = 16384)]
    nodesize: u32,
    /// Leave no free space for a first read-write mount at the exact size
    /// (smallest image; it needs --extra-space or a resize before it can be written).
    #[arg(long)]
    no_rw_slack: bool,
    /// Store file data compressed in the filesystem: no, zstd[:1..15] (default
    /// level 3), zlib[:1..9] (default 3) or lzo. File data is then read once
    /// while planning to learn the compressed sizes.
    #[arg(long, value_name = "ALGO[:LEVEL]")]
    compress: Option<String>,
    /// Regular files with identical content share one set of extents (as
    /// reflinked copies do); file data is then read while planning.
    #[arg(long)]
    dedupe: bool,
    /// Make directory PATH of the image a subvolume (repeatable; nested ones
    /// allowed). TYPE: rw (default), ro, default (mounted when no subvol= is
    /// given; at most one), default-ro. With =MOUNTPOINT, the subvolume PATH
    /// is created and holds every source entry under MOUNTPOINT, as the booted
    /// system sees the tree: `default:@=/ --subvol @nix=/nix`.
    #[arg(long = "subvol", value_name = "[TYPE:]PATH[=MOUNTPOINT]")]
    subvol: Vec<String>,
    /// Metadata profile.
    #[arg(long, value_enum, default_value = "dup")]
    metadata: Profile,
    /// Checksum algorithm of the superblock, tree blocks and data: crc32c
    /// (every kernel), xxhash, sha256 or blake2 (Linux 5.5 and later).
    #[arg(long, value_name = "ALGO", default_value = "crc32c")]
    csum: String,
    /// Filesystem features, as mkfs.btrfs -O (comma separated, repeatable;
    /// ^FEATURE turns one off): block-group-tree (block groups in a tree of
    /// their own, which the kernel reads at mount instead of searching the
    /// extent tree for them; needs Linux 6.1 or later, so off by default).
    #[arg(short = 'O', long = "features", value_name = "FEATURE[,FEATURE]")]
    features: Vec<String>,
    /// Give the inode at PATH (a path in the image; / is its root) the
    /// flags, a comma list of nodatacow (no data copy-on-write, implies
    /// nodatasum for files) and nodatasum (no data checksums), as
    /// mkfs.btrfs --inode-flags (repeatable). A directory passes them to
    /// everything below it (not into subvolumes); the kernel gives
    /// nodatacow to what is created in it later. Files with either flag
    /// are never stored compressed.
    #[arg(long = "inode-flags", value_name = "FLAGS:PATH")]
    inode_flags: Vec<String>,
    /// Also write the layout record to FILE: where each file's data lives in
    /// this image (JSON Lines, see the README); replaced if it exists.
    /// Written when the image is complete (export) or served (mount, serve).
    #[arg(long, value_name = "FILE")]
    write_layout: Option<PathBuf>,
    /// Plan this image as an update of the image whose layout record FILE
    /// is: files unchanged since then (same path, size, mtime and mode)
    /// keep their data where it was, new data fills freed space first, and
    /// its chunks stay in place, so a block-based update sends little. The
    /// record must come from the same options (node size, checksum,
    /// metadata profile, compression, dedupe).
    #[arg(long, value_name = "FILE")]
    base_layout: Option<PathBuf>,
    /// A --base-layout that is missing, corrupt or made with other options
    /// is a warning and the image gets a fresh layout (first builds).
    #[arg(long, requires = "base_layout")]
    base_layout_optional: bool,
}

/// The filesystem features `-O` may name (mkfs.btrfs's spelling).
const FEATURES: [&str; 1] = ["block-group-tree"];

/// Applies `-O` lists in order: each FEATURE turns one on, ^FEATURE off.
fn parse_features(lists: &[String], opts: &mut Options) -> Result<(), Error> {
    for list in lists {
        for item in list.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let (on, name) = match item.strip_prefix('^') {
                Some(n) => (false, n),
                None => (true, item),
            };
            match name {
                "block-group-tree" => opts.block_group_tree = on,
                _ => {
                    return Err(Error::msg(format!(
                    "invalid -O feature '{item}': known features are {} (^FEATURE turns one off)",
                    FEATURES.join(", ")
                )))
                }
            }
        }
    }
    Ok(())
}

/// The checksum algorithm named by `--csum`, spelled as mkfs.btrfs spells it.
fn parse_csum(s: &str) -> Result<btrfsimg::format::CsumType, Error> {
    use btrfsimg::format::CsumType;
    CsumType::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = CsumType::ALL.iter().map(|c| c.name()).collect();
        Error::msg(format!(
            "invalid --csum '{s}': expected one of {}",
            names.join(", ")
        ))
    })
}

/// Parses sizes like `4096`, `64K`, `300M`, `2G`, `1T` (binary units; `KiB` etc. too).
fn parse_size(what: &str, s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| {
        Error::msg(format!(
            "invalid {what} '{s}': expected a number with an optional K/M/G/T suffix"
        ))
    })?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(Error::msg(format!(
                "invalid {what} '{s}': unknown unit '{unit}' (use K, M, G or T)"
            )))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| Error::msg(format!("invalid {what} '{s}': too large")))
}

fn parse_uuid(s: &str) -> Result<[u8; 16], Error> {
    btrfsimg::plan::uuid::parse_uuid(s).ok_or_else(|| {
        Error::msg(format!(
            "invalid --uuid '{s}': expected the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
        ))
    })
}

fn parse_owner(s: &str) -> Result<(u32, u32), Error> {
    let bad = || {
        Error::msg(format!(
            "invalid --owner '{s}': expected UID:GID with numeric ids"
        ))
    };
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

fn options(a: &ImageArgs) -> Result<Options, Error> {
    if let Some(p) = &a.write_layout {
        // The record's directory must exist before anything is planned.
        export::check_output(p, true)?;
    }
    let timestamp = match &a.timestamp {
        Some(t) => t.parse::<i64>().map_err(|_| {
            Error::msg(format!(
                "invalid --timestamp '{t}': expected seconds since the epoch"
            ))
        })?,
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => v.trim().parse::<i64>().map_err(|_| {
                Error::msg(format!(
                    "invalid SOURCE_DATE_EPOCH '{v}': expected seconds since the epoch"
                ))
            })?,
            Err(_) => 1,
        },
    };
    if let Some(l) = &a.label {
        if l.len() > 255 {
            return Err(Error::msg(format!(
                "invalid --label: {} bytes long; at most 255 are allowed",
                l.len()
            )));
        }
    }
    let mut opts = Options {
        nodesize: a.nodesize,
        metadata_dup: matches!(a.metadata, Profile::Dup),
        label: a.label.clone().unwrap_or_default().into_bytes(),
        fsid: a.uuid.as_deref().map(parse_uuid).transpose()?,
        owner: a.owner.as_deref().map(parse_owner).transpose()?,
        timestamp,
        size: a
            .size
            .as_deref()
            .map(|s| parse_size("--size", s))
            .transpose()?,
        extra_space: a
            .extra_space
            .as_deref()
            .map(|s| parse_size("--extra-space", s))
            .transpose()?
            .unwrap_or(0),
        rw_slack: !a.no_rw_slack,
        compression: match &a.compress {
            Some(c) => btrfsimg::compress::Compression::parse(c)?,
            None => None,
        },
        dedupe: a.dedupe,
        subvolumes: {
            let specs = a
                .subvol
                .iter()
                .map(|s| btrfsimg::plan::subvol::SubvolSpec::parse(s))
                .collect::<Result<Vec<_>, _>>()?;
            btrfsimg::plan::subvol::validate_specs(&specs)?;
            specs
        },
        csum: parse_csum(&a.csum)?,
        ..Options::default()
    };
    parse_features(&a.features, &mut opts)?;
    opts.inode_flags = a
        .inode_flags
        .iter()
        .map(|s| btrfsimg::plan::inode_flags::InodeFlagsSpec::parse(s))
        .collect::<Result<_, _>>()?;
    if let Some(p) = &a.base_layout {
        match btrfsimg::plan::base::Base::load(p, &opts) {
            Ok(b) => opts.base = Some(Arc::new(b)),
            Err(e) if a.base_layout_optional => {
                log::warn!("{e}; planning a fresh layout")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(opts)
}

fn sources(root: Option<PathBuf>, a: &ImageArgs) -> Result<Sources, Error> {
    let mut closure: Option<Closure> = None;
    if let Some(dir) = &a.closure_info {
        closure = Some(Closure::from_closure_info(dir)?);
    }
    if let Some(file) = &a.store_paths {
        let more = Closure::from_store_paths_file(file)?;
        match &mut closure {
            Some(c) => c.store_paths.extend(more.store_paths),
            None => closure = Some(more),
        }
    }
    if let Some(reg) = &a.registration {
        if !reg.is_file() {
            return Err(Error::at(reg, "registration file does not exist"));
        }
        let c = closure.get_or_insert_with(|| Closure {
            store_paths: Vec::new(),
            registration: None,
            registration_path: PathBuf::new(),
            store_root: None,
        });
        if let Some(prev) = &c.registration {
            return Err(Error::at(
                reg,
                format!(
                    "a registration is already given by {}",
                    btrfsimg::error::shown_path(prev)
                ),
            ));
        }
        c.registration = Some(reg.clone());
    }
    if let Some(c) = &mut closure {
        c.registration_path = a.registration_path.clone();
        c.store_root = a.store_root.clone();
        if !c.registration_path.is_absolute() {
            return Err(Error::at(
                &c.registration_path,
                "--registration-path must be absolute",
            ));
        }
    } else if a.store_root.is_some() {
        return Err(Error::msg(
            "--store-root needs --closure-info or --store-paths",
        ));
    }
    if root.is_none() && closure.is_none() && a.files.is_empty() {
        return Err(Error::msg(
            "nothing to put in the image: give ROOT, --closure-info, --store-paths or --files",
        ));
    }
    Ok(Sources {
        root,
        closure,
        files: a.files.clone(),
        mountpoint: match &a.mountpoint {
            Some(m) => btrfsimg::source::check_mountpoint(m)?,
            None => None,
        },
    })
}

/// Writes the layout record of `plan` to `path`, if given (replacing what
/// is there).
fn write_layout(path: Option<&std::path::Path>, plan: &plan::Plan) -> Result<(), Error> {
    match path {
        Some(p) => export::write_whole(p, true, |w| plan::record::write(plan, w)),
        None => Ok(()),
    }
}

/// Workers per NBD connection `serve --threads` accepts.
const MAX_SERVE_THREADS: usize = 64;

/// The last termination signal an export received (0: none).
static SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// SIGINT, SIGTERM and SIGHUP during an export. While `reading` is set (the
/// inputs are read and planned; no file exists yet) they end the process at
/// once with status 128 + the signal. Afterwards they set the returned flag:
/// the export stops between chunks, removes its temporary file and exits with
/// the same status.
fn export_signals(reading: &Arc<AtomicBool>) -> Result<Arc<AtomicBool>, Error> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register_usize(sig, &SIGNAL, sig as usize)
            .and_then(|_| {
                signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, reading.clone())
            })
            .and_then(|_| signal_hook::flag::register(sig, cancel.clone()))
            .map_err(|e| Error::msg(format!("cannot install signal handler: {e}")))?;
    }
    Ok(cancel)
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Export {
            root,
            image,
            output,
            force,
            zstd,
            threads,
            bmap,
            quiet,
        } => {
            let reading = Arc::new(AtomicBool::new(true));
            let cancel = export_signals(&reading)?;
            let opts = options(&image)?;
            let srcs = sources(root, &image)?;
            if let Some(l) = zstd {
                let range = zstd::compression_level_range();
                if !range.contains(&l) {
                    return Err(Error::msg(format!(
                        "invalid --zstd level {l}: must be from {} to {}",
                        range.start(),
                        range.end()
                    )));
                }
            }
            let to_stdout = match &output {
                Some(p) => p.as_os_str() == "-",
                None => {
                    if io::stdout().is_terminal() {
                        return Err(Error::msg(
                            "refusing to write an image to a terminal: give -o FILE or -o - with a pipe",
                        ));
                    }
                    true
                }
            };
            let image_path = output.as_deref().filter(|_| !to_stdout);
            if let Some(path) = image_path {
                export::check_output(path, force)?;
            }
            if let Some(b) = &bmap {
                export::check_bmap_output(b, image_path, force)?;
            }
            let eopts = export::ExportOptions {
                zstd,
                threads: threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
                }),
                progress: !quiet && io::stderr().is_terminal(),
                cancel: Some(cancel.clone()),
                bmap: bmap.map(|path| export::BmapOutput {
                    path,
                    overwrite: force,
                }),
            };
            // A compressed image written to a file gets its data region from
            // the content pass directly: nothing is compressed twice.
            let mut spill = match &output {
                Some(path) if spill_wanted(&output, to_stdout, zstd, &opts) => {
                    Some(export::Spill::new(
                        path,
                        force,
                        opts.csum,
                        Some(reading.clone()),
                        Some(cancel.clone()),
                    )?)
                }
                _ => None,
            };
            let plan = plan_with_progress(
                &srcs,
                &opts,
                eopts.progress,
                threads.unwrap_or(0) as usize,
                spill
                    .as_mut()
                    .map(|s| s as &mut dyn btrfsimg::content::PieceSink),
            )?;
            reading.store(false, Ordering::SeqCst);
            log::info!(
                "planned {} bytes, {} tree blocks, {} data extents",
                plan.total_bytes,
                plan.blocks.len(),
                plan.extents.len()
            );
            let img = Image::new(plan);
            let written = if let Some(s) = spill {
                s.finish(&img, &eopts)
            } else if to_stdout {
                let stdout = io::stdout();
                let mut lock = stdout.lock();
                match export::write_stream(&img, &mut lock, &eopts) {
                    Ok(()) => Ok(()),
                    // The reader went away (`| head`): end quietly, as a process
                    // killed by SIGPIPE would, with status 128 + SIGPIPE.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                        std::process::exit(128 + libc::SIGPIPE)
                    }
                    Err(e) => Err(e),
                }
            } else {
                let path = output.unwrap_or_default();
                export::write_file(&img, &path, force, &eopts)
            };
            written?;
            write_layout(image.write_layout.as_deref(), img.plan())
        }
        Cmd::Plan { root, image, bytes } => {
            let opts = options(&image)?;
            let srcs = sources(root, &image)?;
            let start = std::time::Instant::now();
            let plan = plan_with_progress(&srcs, &opts, io::stderr().is_terminal(), 0, None)?;
            write_layout(image.write_layout.as_deref(), &plan)?;
            let secs = start.elapsed().as_secs_f64();
            let text = match bytes {
                true => format!("{}\n", plan.total_bytes),
                false => format!("{}planned in {secs:.3} s\n", plan.summary()),
            };
            // A reader that stops early (`| head`) is not an error.
            match io::Write::write_all(&mut io::stdout().lock(), text.as_bytes()) {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                    Err(Error::io(std::path::Path::new("stdout"), e))
                }
                _ => Ok(()),
            }
        }
        Cmd::Serve {
            root,
            image,
            socket,
            listen,
            tls_cert,
            tls_key,
            tls_client_ca,
            max_connections,
            handshake_timeout,
            threads,
            cache_size,
        } => {
            // Until serving starts, a signal ends the process at once.
            let planning = Arc::new(AtomicBool::new(true));
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, planning.clone())
                    .map_err(|e| Error::msg(format!("cannot install signal handler: {e}")))?;
            }
            let cache = parse_size("--cache-size", &cache_size)?;
            let opts = options(&image)?;
            let srcs = sources(root, &image)?;
            let listen = match (socket, listen) {
                (Some(p), _) => serve::Listen::Unix(p),
                (None, Some(l)) => serve::Listen::parse_tcp(&l)?,
                (None, None) => unreachable!("clap requires --socket or --listen"),
            };
            // Each connection starts this many threads: bounded, so that no
            // value makes thread creation fail (which would abort).
            if threads > MAX_SERVE_THREADS {
                return Err(Error::msg(format!(
                    "invalid --threads {threads}: at most {MAX_SERVE_THREADS} per connection"
                )));
            }
            if max_connections == 0 {
                return Err(Error::msg(
                    "invalid --max-connections 0: at least 1 is needed",
                ));
            }
            let tls = match (&tls_cert, &tls_key) {
                (Some(c), Some(k)) => {
                    Some(serve::tls::server_config(c, k, tls_client_ca.as_deref())?)
                }
                _ => None,
            };
            let sopts = serve::ServeOptions {
                listen,
                tls,
                max_connections,
                handshake_timeout: std::time::Duration::from_secs(handshake_timeout.max(1)),
                threads: threads.max(1),
            };
            let server = serve::Server::bind(&sopts.listen)?;
            let shutdown = serve::Shutdown::new()
                .and_then(|s| {
                    s.on_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
                        .map(|()| s)
                })
                .map_err(|e| Error::msg(format!("cannot install signal handler: {e}")))?;
            let plan = plan_with_progress(&srcs, &opts, io::stderr().is_terminal(), 0, None)?;
            write_layout(image.write_layout.as_deref(), &plan)?;
            let img = Arc::new(Image::with_block_cache(plan, cache as usize));
            planning.store(false, Ordering::SeqCst);
            server.run(img, &sopts, &shutdown, |uri| {
                use std::io::Write;
                let mut out = io::stdout().lock();
                let _ = writeln!(out, "{uri}");
                let _ = out.flush();
            })
        }
        Cmd::Mount {
            mut paths,
            image,
            threads,
            allow_other,
            allow_root,
            options: mount_opts,
            cache_size,
        } => {
            let cache = parse_size("--cache-size", &cache_size)?;
            let mountpoint = paths.pop().unwrap_or_default();
            let root = paths.pop();
            let opts = options(&image)?;
            let srcs = sources(root, &image)?;
            let mopts = mount_options(
                opts.timestamp,
                threads,
                allow_other,
                allow_root,
                &mount_opts,
            )?;
            fuse::check_mountpoint(&mountpoint)?;
            let plan = plan_with_progress(&srcs, &opts, io::stderr().is_terminal(), 0, None)?;
            write_layout(image.write_layout.as_deref(), &plan)?;
            let img = std::sync::Arc::new(Image::with_block_cache(plan, cache as usize));
            fuse::serve(img, &mountpoint, &mopts, |path| {
                use std::io::Write;
                let mut out = io::stdout().lock();
                let _ = writeln!(out, "{}", btrfsimg::error::shown_path(path));
                let _ = out.flush();
            })
        }
    }
}

/// Plans, showing the content pass (when compressing) as a progress bar
/// with a rate and ETA of file bytes read and compressed.
/// Whether an export writes its data region during the content pass.
fn spill_wanted(
    output: &Option<PathBuf>,
    to_stdout: bool,
    zstd: Option<i32>,
    opts: &Options,
) -> bool {
    output.is_some() && !to_stdout && zstd.is_none() && (opts.compression.is_some() || opts.dedupe)
}

fn plan_with_progress(
    srcs: &Sources,
    opts: &Options,
    progress: bool,
    threads: usize,
    sink: Option<&mut dyn btrfsimg::content::PieceSink>,
) -> Result<plan::Plan, Error> {
    let bar = if progress && (opts.compression.is_some() || opts.dedupe) {
        let pb =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "compressing {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ) {
            pb.set_style(style);
        }
        pb.enable_steady_tick(std::time::Duration::from_millis(500));
        Some(pb)
    } else {
        None
    };
    let report = |done: u64, total: u64| {
        if let Some(pb) = &bar {
            pb.set_length(total);
            pb.set_position(done);
        }
    };
    let pass = btrfsimg::PassOptions {
        progress: Some(&report),
        threads,
        // Pieces given to a sink are written already: keep none of them.
        keep_bytes: if sink.is_some() {
            0
        } else {
            btrfsimg::PassOptions::default().keep_bytes
        },
    };
    let plan = btrfsimg::plan_sources_with(srcs, opts, &pass, sink);
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    plan
}

fn mount_options(
    timestamp: i64,
    threads: usize,
    allow_other: bool,
    allow_root: bool,
    options: &[String],
) -> Result<fuse::MountOptions, Error> {
    let mut opts = fuse::MountOptions {
        threads: threads.max(1),
        access: if allow_other {
            fuse::Access::All
        } else if allow_root {
            fuse::Access::Root
        } else {
            fuse::Access::Owner
        },
        auto_unmount: false,
        timestamp,
    };
    for o in options.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        match o {
            "auto_unmount" => opts.auto_unmount = true,
            "allow_other" => opts.access = fuse::Access::All,
            "allow_root" if opts.access != fuse::Access::All => opts.access = fuse::Access::Root,
            "allow_root" => {}
            "ro" => {}
            _ => {
                return Err(Error::msg(format!(
                    "unknown mount option '{o}' (known: auto_unmount, allow_other, allow_root, ro)"
                )))
            }
        }
    }
    if opts.auto_unmount && opts.access == fuse::Access::Owner {
        return Err(Error::msg(
            "auto_unmount needs allow_other or allow_root (a fusermount3 requirement)",
        ));
    }
    Ok(opts)
}

fn main() -> ExitCode {
    // fuser warns when it cannot unmount at the end of a session that
    // `fusermount3 -u` (the documented way to stop serving) already ended.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,fuser::session=error,fuser::mnt=error"),
    )
    .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Never panic over a closed stderr.
            use std::io::Write;
            let _ = writeln!(io::stderr().lock(), "btrfsimg: {e}");
            if e.kind() == io::ErrorKind::Interrupted {
                // 128 + the signal, as for a process the signal had killed.
                match SIGNAL.load(Ordering::SeqCst) {
                    0 => ExitCode::from(128 + libc::SIGINT as u8),
                    sig => ExitCode::from(128 + sig as u8),
                }
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

// Keep the plan module referenced for documentation links.
#[allow(unused_imports)]
use plan as _;

//! The sequential frontend: a loop over `Image::read_at` feeding a sink (a sparse
//! file, a stream, or a multi-threaded zstd encoder). Files are written through a
//! temporary file in the target directory that is renamed into place only when
//! the whole image has been written; an interrupted or failed export leaves
//! nothing named like the output behind. With `--bmap`, a block map of the
//! image is made in the same pass (`bmap`) and committed with it.

pub mod bmap;
mod frames;

use crate::content::{Piece, PieceSink};
use crate::error::{Error, Result};
use crate::format::{CsumType, SECTOR_SIZE};
use crate::image::Image;
use crate::plan::data::{DataAllocator, DataExtent};
use crate::plan::space;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes requested from the image per read.
const CHUNK: usize = 4 << 20;
/// Granularity at which all-zero output is skipped (left as a hole).
const HOLE_GRAIN: usize = 64 << 10;

#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// zstd compression level, if compressing.
    pub zstd: Option<i32>,
    /// Workers compressing `--zstd` frames (0 counts as 1).
    pub threads: u32,
    /// Show a progress bar (bytes, rate, ETA) on stderr.
    pub progress: bool,
    /// Set when the export should stop (SIGINT/SIGTERM); checked between chunks.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Also write a bmap of the image there (`--bmap`).
    pub bmap: Option<BmapOutput>,
}

/// Where a bmap goes, and whether an existing file there may be replaced.
#[derive(Clone, Debug)]
pub struct BmapOutput {
    pub path: PathBuf,
    pub overwrite: bool,
}

fn progress_bar(image: &Image, opts: &ExportOptions) -> ProgressBar {
    if !opts.progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(image.size()), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        pb.set_style(style);
    }
    // Redraws (rate, ETA) even while a slow encoder holds the position.
    pb.enable_steady_tick(std::time::Duration::from_millis(500));
    pb
}

/// Why feeding the image stopped.
enum Stop {
    /// Producing the image failed; the message names the source file.
    Read(io::Error),
    /// The sink failed.
    Write(io::Error),
    /// SIGINT/SIGTERM (the cancel flag).
    Interrupted,
}

impl Stop {
    /// The error to report, `out` naming the sink.
    fn into_error(self, out: &Path) -> Error {
        match self {
            Stop::Read(e) => Error::named(e),
            Stop::Write(e) => Error::io(out, e),
            Stop::Interrupted => Error::interrupted(out),
        }
    }
}

fn cancelled(opts: &ExportOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Bytes handed to the sink at once: small enough that the progress bar
/// moves at least every second even behind a slow encoder (zstd -19).
const SLICE: usize = 256 << 10;

/// Feeds the whole image, in order, to `sink(offset, bytes)`. With `skip`,
/// ranges the image knows to be zero (and with `Skip::ZerosAndData` the data
/// regions) are not produced: the sink sees a gap, and the walk jumps over
/// it however large it is.
///
/// `hash`, if given, is fed every byte produced, and with
/// `Skip::ZerosAndData` the mapped bytes of the skipped data regions, read
/// back from the file the content pass wrote them to.
fn pump(
    image: &Image,
    opts: &ExportOptions,
    skip: Skip,
    mut hash: Option<&mut bmap::Hasher>,
    mut sink: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> std::result::Result<(), Stop> {
    let pb = progress_bar(image, opts);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let size = image.size();
    while off < size {
        if cancelled(opts) {
            pb.abandon();
            return Err(Stop::Interrupted);
        }
        let mut want = CHUNK.min((size - off) as usize);
        if let Skip::ZerosAndData(written) = skip {
            match image.data_region(off) {
                Some((start, end)) if start <= off => {
                    if let Some(h) = hash.as_deref_mut() {
                        read_back(written, h, off, end, &mut buf).map_err(Stop::Write)?;
                    }
                    off = end;
                    pb.set_position(off);
                    continue;
                }
                Some((start, _)) => want = want.min((start - off) as usize),
                None => {}
            }
        }
        if !matches!(skip, Skip::Nothing) && image.is_zero_range(off, want as u64) {
            // The next region starts beyond the zero range.
            off = image.seek_data(off).unwrap_or(size);
            pb.set_position(off);
            continue;
        }
        let n = image.read_at(off, &mut buf[..want]).map_err(Stop::Read)?;
        if let Some(h) = hash.as_deref_mut() {
            h.feed(off, &buf[..n]);
        }
        for (i, piece) in buf[..n].chunks(SLICE).enumerate() {
            sink(off + (i * SLICE) as u64, piece).map_err(Stop::Write)?;
            pb.set_position(off + (i * SLICE + piece.len()) as u64);
        }
        off += want as u64;
        pb.set_position(off);
    }
    pb.finish_and_clear();
    Ok(())
}

/// What `pump` may leave out.
#[derive(Clone, Copy)]
enum Skip<'a> {
    Nothing,
    /// Ranges the image knows to be zero.
    Zeros,
    /// Zeros and the data regions, already written to this file by the
    /// content pass.
    ZerosAndData(&'a File),
}

/// Feeds `hash` the mapped bytes of `[start, end)` from `file`, where the
/// content pass wrote them (`Spill`). They were written moments ago, so
/// this reads the page cache, not the sources again: each source byte is
/// still read once, and no compressed extent is made twice. Hashing the
/// pieces as the content pass writes them would save this read, but pieces
/// arrive extent by extent and a deduplicated file's are taken back, while a
/// range's hash needs its bytes exactly once and in order.
fn read_back(
    file: &File,
    hash: &mut bmap::Hasher,
    start: u64,
    end: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let wanted: Vec<(u64, u64)> = hash.wanted(start, end).collect();
    for (mut at, to) in wanted {
        while at < to {
            let n = ((to - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            hash.feed(at, &buf[..n]);
            at += n as u64;
        }
    }
    Ok(())
}

/// The digests of a whole-image hasher (one that was fed the image in order).
fn whole(hasher: Option<bmap::Hasher>) -> std::result::Result<Option<bmap::Digests>, Stop> {
    hasher
        .map(|h| {
            let mut d = bmap::Digests::default();
            d.add(h.finish()).map(|()| d)
        })
        .transpose()
        .map_err(Stop::Read)
}

/// Writes the image into a file, leaving zero runs as holes; returns the
/// digests of `layout`'s ranges, if given.
fn write_sparse(
    image: &Image,
    file: &File,
    opts: &ExportOptions,
    skip: Skip,
    layout: Option<&bmap::Layout>,
) -> std::result::Result<Option<bmap::Digests>, Stop> {
    // The full size first: a filesystem that cannot hold a file this large
    // (EFBIG) says so before anything is written.
    file.set_len(image.size()).map_err(Stop::Write)?;
    let mut hasher = layout.map(|l| l.hasher(0, l.size()));
    pump(image, opts, skip, hasher.as_mut(), |off, data| {
        for (i, piece) in data.chunks(HOLE_GRAIN).enumerate() {
            if piece.iter().all(|&b| b == 0) {
                continue;
            }
            file.write_all_at(piece, off + (i * HOLE_GRAIN) as u64)?;
        }
        Ok(())
    })?;
    whole(hasher)
}

/// Streams the image (zstd frames with `opts.zstd`); returns the digests
/// of `layout`'s ranges, if given.
fn stream(
    image: &Image,
    out: &mut dyn Write,
    opts: &ExportOptions,
    layout: Option<&bmap::Layout>,
) -> std::result::Result<Option<bmap::Digests>, Stop> {
    match opts.zstd {
        None => {
            let mut hasher = layout.map(|l| l.hasher(0, l.size()));
            pump(image, opts, Skip::Nothing, hasher.as_mut(), |_, data| {
                out.write_all(data)
            })?;
            out.flush().map_err(Stop::Write)?;
            whole(hasher)
        }
        Some(level) => {
            let pb = progress_bar(image, opts);
            let r = frames::write(image, out, level, opts, &pb, layout);
            match r {
                Ok(_) => pb.finish_and_clear(),
                Err(_) => pb.abandon(),
            }
            r
        }
    }
}

/// Streams the image (optionally zstd-compressed) to `out`, which is called
/// `stdout` in errors: a source file's error names the file, a write error
/// is `stdout: reason` (kind kept, e.g. `BrokenPipe`), a cancel is
/// `stdout: interrupted` (kind `Interrupted`).
///
/// With `opts.bmap`, the bmap file is written (through a temporary file)
/// once the whole image has been streamed and flushed.
pub fn write_stream(image: &Image, out: &mut dyn Write, opts: &ExportOptions) -> Result<()> {
    let layout = opts.bmap.as_ref().map(|_| bmap::Layout::of(image));
    let digests =
        stream(image, out, opts, layout.as_ref()).map_err(|s| s.into_error(Path::new("stdout")))?;
    let Some(bm) = prepare_bmap(opts, layout.as_ref(), digests)? else {
        return Ok(());
    };
    if cancelled(opts) {
        return Err(Error::interrupted(&bm.out.path));
    }
    bm.commit()
}

/// A bmap written to its temporary file, synced, waiting to be renamed.
struct PendingBmap {
    out: BmapOutput,
    guard: TempOutput,
}

impl PendingBmap {
    fn commit(mut self) -> Result<()> {
        commit(&self.guard.path, &self.out.path, self.out.overwrite)?;
        self.guard.committed = true;
        Ok(())
    }
}

/// Renders the bmap of `layout` and writes it to a temporary file next to
/// `opts.bmap` (nothing when no bmap is wanted).
fn prepare_bmap(
    opts: &ExportOptions,
    layout: Option<&bmap::Layout>,
    digests: Option<bmap::Digests>,
) -> Result<Option<PendingBmap>> {
    let (Some(out), Some(layout)) = (&opts.bmap, layout) else {
        return Ok(None);
    };
    let digests = digests.unwrap_or_default();
    let bytes = bmap::render(layout, digests.as_slice()).map_err(Error::named)?;
    let (guard, mut file) = temp_output(&out.path, out.overwrite)?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(&out.path, e))?;
    Ok(Some(PendingBmap {
        out: out.clone(),
        guard,
    }))
}

/// A temporary output file that is removed unless committed.
struct TempOutput {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The directory and the file name of an output path.
fn output_parts(path: &Path) -> Result<(PathBuf, &std::ffi::OsStr)> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::at(path, "not a file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Refuses, before any work, an output that cannot or must not be written: a
/// missing or non-directory parent, a directory, or (without `overwrite`) an
/// existing file.
pub fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    let (dir, _) = output_parts(path)?;
    match fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::at(
                &dir,
                "not a directory (the output file's parent)",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::at(&dir, "output directory does not exist"))
        }
        Err(e) => return Err(Error::io(&dir, e)),
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::at(path, "is a directory")),
        Ok(_) if !overwrite => Err(Error::at(path, "already exists (use --force to overwrite)")),
        _ => Ok(()),
    }
}

/// Refuses, before any work, a bmap path that cannot or must not be written
/// (as `check_output`), `-` (stdout carries the image, if anything), and
/// the image's own path `image` (`-o`), however spelled.
pub fn check_bmap_output(path: &Path, image: Option<&Path>, overwrite: bool) -> Result<()> {
    if path.as_os_str() == "-" {
        return Err(Error::msg(
            "--bmap -: the bmap goes to a file (give a file name, e.g. IMAGE.bmap)",
        ));
    }
    if image.is_some_and(|i| same_entry(i, path)) {
        return Err(Error::at(
            path,
            "is the output image too (-o): give the bmap its own name, e.g. IMAGE.bmap",
        ));
    }
    check_output(path, overwrite)
}

/// Whether two output paths are one directory entry: the same name in the
/// same (canonical) directory. Both files are renamed into place, which
/// replaces entries, never what a symlink or another hard link points at:
/// distinct entries cannot clobber each other.
fn same_entry(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| -> Option<PathBuf> {
        let (dir, name) = output_parts(p).ok()?;
        Some(fs::canonicalize(dir).ok()?.join(name))
    };
    matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
}

/// Moves the finished temporary file to `path`; without `overwrite` an
/// output created meanwhile is not replaced (RENAME_NOREPLACE).
fn commit(tmp: &Path, path: &Path, overwrite: bool) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if !overwrite {
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        if let (Ok(from), Ok(to)) = (c(tmp), c(path)) {
            // SAFETY: two valid C strings, relative to the current directory.
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::RENAME_NOREPLACE,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    return Err(Error::at(path, "already exists (use --force to overwrite)"))
                }
                // Not supported here: check and rename.
                Some(libc::EINVAL | libc::ENOSYS) => check_output(path, false)?,
                _ => return Err(Error::io(path, e)),
            }
        }
    }
    fs::rename(tmp, path).map_err(|e| Error::io(path, e))
}

/// A new temporary file next to `path`, removed unless committed.
fn temp_output(path: &Path, overwrite: bool) -> Result<(TempOutput, File)> {
    check_output(path, overwrite)?;
    let (dir, name) = output_parts(path)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".btrfsimg-{}.tmp", std::process::id()));
    let tmp_path = dir.join(tmp_name);
    // Readable too: a `Spill` export hashes for the bmap what it wrote.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp_path)
        .map_err(|e| Error::io(&tmp_path, e))?;
    Ok((
        TempOutput {
            path: tmp_path,
            committed: false,
        },
        file,
    ))
}

/// Writes a small file that goes with an image (the layout record) as the
/// image is written: through a temporary file beside it, synced, renamed
/// into place when complete; a failure leaves nothing.
pub fn write_whole(
    path: &Path,
    overwrite: bool,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    let (mut guard, file) = temp_output(path, overwrite)?;
    let mut w = io::BufWriter::new(file);
    write(&mut w)
        .and_then(|()| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))?;
    commit(&guard.path, path, overwrite)?;
    guard.committed = true;
    Ok(())
}

/// Syncs, writes the bmap (if any) to its temporary file, checks for a
/// late signal, and renames the image and then the bmap into place. If the
/// bmap cannot be renamed (another process created one meanwhile), the
/// image just committed is removed again: a failed export leaves neither,
/// and no image sits beside a bmap that is not its own.
fn finish(
    mut guard: TempOutput,
    file: File,
    path: &Path,
    overwrite: bool,
    opts: &ExportOptions,
    layout: Option<&bmap::Layout>,
    digests: Option<bmap::Digests>,
) -> Result<()> {
    file.sync_all()
        .map_err(|e| Stop::Write(e).into_error(path))?;
    drop(file);
    let pending = prepare_bmap(opts, layout, digests)?;
    // A signal that came after the last chunk still means "do not finish".
    if cancelled(opts) {
        return Err(Error::interrupted(path));
    }
    commit(&guard.path, path, overwrite)?;
    guard.committed = true;
    if let Some(bm) = pending {
        if let Err(e) = bm.commit() {
            let _ = fs::remove_file(path);
            return Err(e);
        }
    }
    Ok(())
}

/// Writes the image to `path` via a temporary file renamed on success.
pub fn write_file(image: &Image, path: &Path, overwrite: bool, opts: &ExportOptions) -> Result<()> {
    let layout = opts.bmap.as_ref().map(|_| bmap::Layout::of(image));
    let (guard, mut file) = temp_output(path, overwrite)?;
    let written = match opts.zstd {
        None => write_sparse(image, &file, opts, Skip::Zeros, layout.as_ref()),
        Some(_) => {
            let mut w = io::BufWriter::with_capacity(1 << 20, &mut file);
            stream(image, &mut w, opts, layout.as_ref())
        }
    };
    let digests = written.map_err(|s| s.into_error(path))?;
    finish(guard, file, path, overwrite, opts, layout.as_ref(), digests)
}

/// A file export whose data region is written by the content pass itself:
/// placement is incremental in tree order, so each piece can go to where
/// the plan will put it as soon as it is made, its sector checksums recorded.
/// No payload is kept in memory or made twice, and each source byte is read
/// once. `finish` then checks that the plan placed every extent where the
/// pieces went and writes the rest of the image.
pub struct Spill {
    path: PathBuf,
    overwrite: bool,
    out: Option<(TempOutput, File)>,
    /// The plan's allocator, given by `start`; its extents are the ones
    /// written, to compare with the plan's.
    alloc: Option<DataAllocator>,
    /// How data sectors are checksummed.
    csum: CsumType,
    /// Checksums of data sectors from DATA_START, as written (`csum.size()`
    /// bytes each).
    csums: Vec<u8>,
    /// The node of the file being written (placed since the allocator's
    /// checkpoint, to take it back: dedupe).
    current: Option<u32>,
    /// Cleared before the temporary file exists (signals then stop the
    /// export instead of ending the process).
    reading: Option<Arc<AtomicBool>>,
    cancel: Option<Arc<AtomicBool>>,
}

impl Spill {
    /// `csum` must be the plan's checksum type (`Options::csum`).
    pub fn new(
        path: &Path,
        overwrite: bool,
        csum: CsumType,
        reading: Option<Arc<AtomicBool>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Spill> {
        check_output(path, overwrite)?;
        Ok(Spill {
            path: path.to_path_buf(),
            overwrite,
            out: None,
            alloc: None,
            csum,
            csums: Vec::new(),
            current: None,
            reading,
            cancel,
        })
    }

    fn file(&mut self) -> Result<&mut File> {
        if self.out.is_none() {
            if let Some(r) = &self.reading {
                r.store(false, Ordering::SeqCst);
            }
            self.out = Some(temp_output(&self.path, self.overwrite)?);
        }
        Ok(&mut self.out.as_mut().expect("just created").1)
    }

    fn alloc(&mut self) -> Result<&mut DataAllocator> {
        self.alloc
            .as_mut()
            .ok_or_else(|| Error::msg("internal error: pieces before the allocator"))
    }

    /// Zeros `[start, end)` of the output (a taken-back file's data).
    fn clear(&mut self, start: u64, end: u64) -> Result<()> {
        let path = self.path.clone();
        let f = self.file()?;
        // SAFETY: fallocate on an open descriptor of ours.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&*f),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start as i64,
                (end - start) as i64,
            )
        };
        if r != 0 {
            let zeros = vec![0u8; (end - start) as usize];
            f.write_all_at(&zeros, start)
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}

impl PieceSink for Spill {
    fn start(&mut self, alloc: DataAllocator) {
        self.alloc = Some(alloc);
    }

    fn discard(&mut self, node: u32) -> Result<()> {
        let Some(n) = self.current.take() else {
            return Ok(());
        };
        debug_assert_eq!(n, node);
        for e in self.alloc()?.rollback() {
            self.clear(e.logical, e.end())?;
        }
        Ok(())
    }

    fn piece(&mut self, node: u32, piece: &Piece, bytes: &[u8]) -> Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Err(Error::interrupted(&self.path));
        }
        if self.current != Some(node) {
            self.current = Some(node);
            let alloc = self.alloc()?;
            // Releases before the checkpoint: taking this file back must
            // not take back the end of the reservations before it.
            alloc.begin(node);
            alloc.checkpoint(node);
        }
        let alloc = self.alloc()?;
        let before = alloc.extents.len();
        alloc.place_pieces(node, std::slice::from_ref(piece));
        let placed: Vec<DataExtent> = alloc.extents[before..].to_vec();
        let path = self.path.clone();
        for e in placed {
            let from = match e.algorithm {
                Some(_) => 0,
                None => (e.file_offset - piece.file_offset) as usize,
            };
            let have = bytes.len().saturating_sub(from).min(e.size() as usize);
            let mut disk = vec![0u8; e.size() as usize];
            disk[..have].copy_from_slice(&bytes[from..from + have]);
            // Data chunks map logical to physical one to one.
            self.file()?
                .write_all_at(&disk, e.logical)
                .map_err(|err| Error::io(&path, err))?;
            let size = self.csum.size();
            let first = ((e.logical - space::DATA_START) / SECTOR_SIZE) as usize * size;
            let end = first + disk.len() / SECTOR_SIZE as usize * size;
            if self.csums.len() < end {
                self.csums.resize(end, 0);
            }
            for (s, c) in disk
                .chunks(SECTOR_SIZE as usize)
                .zip(self.csums[first..end].chunks_exact_mut(size))
            {
                c.copy_from_slice(&self.csum.compute(s)[..size]);
            }
        }
        Ok(())
    }
}

impl Spill {
    /// Writes the rest of `image` (whose plan must have put every extent
    /// where the pieces went) and renames the file into place.
    pub fn finish(mut self, image: &Image, opts: &ExportOptions) -> Result<()> {
        if image.plan().csum_type != self.csum {
            return Err(Error::msg(
                "internal error: the plan checksums data otherwise than the content pass did",
            ));
        }
        let placed = self.alloc.take().map(|a| a.extents).unwrap_or_default();
        if image.plan().extents[..] != placed[..] {
            return Err(Error::msg(
                "internal error: the plan placed file data elsewhere than the content pass wrote it",
            ));
        }
        image.preload_csums(&self.csums);
        self.file()?;
        let Some((guard, file)) = self.out.take() else {
            return Err(Error::msg("internal error: no output file"));
        };
        let layout = opts.bmap.as_ref().map(|_| bmap::Layout::of(image));
        let digests = write_sparse(
            image,
            &file,
            opts,
            Skip::ZerosAndData(&file),
            layout.as_ref(),
        )
        .map_err(|s| s.into_error(&self.path))?;
        finish(
            guard,
            file,
            &self.path,
            self.overwrite,
            opts,
            layout.as_ref(),
            digests,
        )
    }
}

//! The sequential frontend: a loop over `Image::read_at` feeding a sink (a sparse
//! file, a stream, or a multi-threaded zstd encoder). Files are written through a
//! temporary file in the target directory that is renamed into place only when
//! the whole image has been written; an interrupted or failed export leaves
//! nothing named like the output behind.

use crate::error::{Error, Result};
use crate::image::Image;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
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
    /// zstd worker threads (0 = compress in the calling thread).
    pub threads: u32,
    /// Show a progress bar (bytes, rate, ETA) on stderr.
    pub progress: bool,
    /// Set when the export should stop (SIGINT/SIGTERM); checked between chunks.
    pub cancel: Option<Arc<AtomicBool>>,
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
    pb
}

/// Feeds the whole image, in order, to `sink(offset, bytes)`. With `skip_zero`,
/// ranges the image knows to be zero are not produced (the sink sees a gap).
fn pump(
    image: &Image,
    opts: &ExportOptions,
    skip_zero: bool,
    mut sink: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let pb = progress_bar(image, opts);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let size = image.size();
    while off < size {
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            pb.abandon();
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
        let want = CHUNK.min((size - off) as usize);
        if !(skip_zero && image.is_zero_range(off, want as u64)) {
            let n = image.read_at(off, &mut buf[..want])?;
            sink(off, &buf[..n])?;
        }
        off += want as u64;
        pb.set_position(off);
    }
    pb.finish_and_clear();
    Ok(())
}

/// Writes the image into a seekable file, leaving zero runs as holes.
fn write_sparse(image: &Image, file: &mut File, opts: &ExportOptions) -> io::Result<()> {
    pump(image, opts, true, |off, data| {
        for (i, piece) in data.chunks(HOLE_GRAIN).enumerate() {
            if piece.iter().all(|&b| b == 0) {
                continue;
            }
            file.seek(SeekFrom::Start(off + (i * HOLE_GRAIN) as u64))?;
            file.write_all(piece)?;
        }
        Ok(())
    })?;
    file.set_len(image.size())
}

/// Streams the image (optionally zstd-compressed) to `out`.
pub fn write_stream(image: &Image, out: &mut dyn Write, opts: &ExportOptions) -> io::Result<()> {
    match opts.zstd {
        None => {
            pump(image, opts, false, |_, data| out.write_all(data))?;
            out.flush()
        }
        Some(level) => {
            let mut enc = zstd::stream::Encoder::new(out, level)?;
            if opts.threads > 0 {
                enc.multithread(opts.threads)?;
            }
            enc.include_checksum(true)?;
            enc.set_pledged_src_size(Some(image.size()))?;
            pump(image, opts, false, |_, data| enc.write_all(data))?;
            enc.finish()?.flush()
        }
    }
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

/// Writes the image to `path` via a temporary file renamed on success.
pub fn write_file(image: &Image, path: &Path, overwrite: bool, opts: &ExportOptions) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::at(path, "not a file name"))?;
    if !dir.is_dir() {
        return Err(Error::at(&dir, "output directory does not exist"));
    }
    if !overwrite && fs::symlink_metadata(path).is_ok() {
        return Err(Error::at(path, "already exists (use --force to overwrite)"));
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".btrfsimg-{}.tmp", std::process::id()));
    let tmp_path = dir.join(tmp_name);
    let mut guard = TempOutput {
        path: tmp_path.clone(),
        committed: false,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp_path)
        .map_err(|e| Error::io(&tmp_path, e))?;
    let written = match opts.zstd {
        None => write_sparse(image, &mut file, opts),
        Some(_) => {
            let mut w = io::BufWriter::with_capacity(1 << 20, &mut file);
            write_stream(image, &mut w, opts)
        }
    };
    written
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(path, e))?;
    drop(file);
    fs::rename(&tmp_path, path).map_err(|e| Error::io(path, e))?;
    guard.committed = true;
    Ok(())
}

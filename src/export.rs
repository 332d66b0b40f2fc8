//! The sequential frontend: a loop over `Image::read_at`. Files are written
//! sparsely through a temporary file in the target directory that is renamed
//! into place only when the whole image has been written.

use crate::error::{Error, Result};
use crate::image::Image;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Bytes requested from the image per read.
const CHUNK: usize = 4 << 20;
/// Granularity at which all-zero output is skipped (left as a hole).
const HOLE_GRAIN: usize = 64 << 10;

/// Streams the image to `out` (a pipe or any writer).
pub fn write_stream(image: &Image, out: &mut dyn Write) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < image.size() {
        let n = image.read_at(off, &mut buf)?;
        out.write_all(&buf[..n])?;
        off += n as u64;
    }
    out.flush()
}

/// Writes the image into `file`, seeking over zero runs so the result is sparse.
fn write_sparse(image: &Image, file: &mut File) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let size = image.size();
    while off < size {
        let want = CHUNK.min((size - off) as usize);
        if image.is_zero_range(off, want as u64) {
            off += want as u64;
            continue;
        }
        let n = image.read_at(off, &mut buf[..want])?;
        let mut i = 0;
        while i < n {
            let j = (i + HOLE_GRAIN).min(n);
            let piece = &buf[i..j];
            if piece.iter().all(|&b| b == 0) {
                i = j;
                continue;
            }
            file.seek(SeekFrom::Start(off + i as u64))?;
            file.write_all(piece)?;
            i = j;
        }
        off += n as u64;
    }
    file.set_len(size)?;
    file.sync_all()
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
pub fn write_file(image: &Image, path: &Path, overwrite: bool) -> Result<()> {
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
    write_sparse(image, &mut file).map_err(|e| Error::io(path, e))?;
    drop(file);
    fs::rename(&tmp_path, path).map_err(|e| Error::io(path, e))?;
    guard.committed = true;
    Ok(())
}

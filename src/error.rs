//! One error type for the whole pipeline: a message that names the path and the
//! reason, printed by the CLI as a single line.

use std::fmt;
use std::io;
use std::path::Path;

/// Bytes as one line of text: control characters, backslashes and invalid
/// UTF-8 escaped (`\n`, `\x1b`), so that a message naming a hostile file name
/// stays one line.
pub fn shown(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A path as one line of text (see `shown`).
pub fn shown_path(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    shown(p.as_os_str().as_bytes())
}

#[derive(Debug)]
pub struct Error {
    msg: String,
    kind: io::ErrorKind,
}

impl Error {
    pub fn msg(msg: impl Into<String>) -> Error {
        Error {
            msg: msg.into(),
            kind: io::ErrorKind::Other,
        }
    }

    /// An I/O failure on `path`.
    pub fn io(path: &Path, err: io::Error) -> Error {
        Error {
            msg: format!("{}: {}", shown_path(path), err),
            kind: err.kind(),
        }
    }

    /// An I/O error whose message already names its path (as `Image::read_at`'s
    /// errors name the source file); keeps its kind.
    pub fn named(err: io::Error) -> Error {
        Error {
            msg: err.to_string(),
            kind: err.kind(),
        }
    }

    /// The operation on `path` was stopped by a signal (kind `Interrupted`).
    pub fn interrupted(path: &Path) -> Error {
        Error {
            msg: format!("{}: interrupted", shown_path(path)),
            kind: io::ErrorKind::Interrupted,
        }
    }

    /// Something wrong with `path` that is not an I/O error.
    pub fn at(path: &Path, reason: impl fmt::Display) -> Error {
        Error::msg(format!("{}: {}", shown_path(path), reason))
    }

    pub fn kind(&self) -> io::ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.kind, e.msg)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_stay_one_line() {
        assert_eq!(shown(b"a\nb\tc\\d\x1b\xff"), "a\\nb\\tc\\\\d\\u{1b}\\xff");
        assert_eq!(shown("caf\u{e9}".as_bytes()), "caf\u{e9}");
        let e = Error::at(Path::new("/x\ny"), "bad");
        assert_eq!(e.to_string(), "/x\\ny: bad");
    }
}

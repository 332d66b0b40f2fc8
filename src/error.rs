//! One error type for the whole pipeline: a message that names the path and the
//! reason, printed by the CLI as a single line.

use std::fmt;
use std::io;
use std::path::Path;

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
            msg: format!("{}: {}", path.display(), err),
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
            msg: format!("{}: interrupted", path.display()),
            kind: io::ErrorKind::Interrupted,
        }
    }

    /// Something wrong with `path` that is not an I/O error.
    pub fn at(path: &Path, reason: impl fmt::Display) -> Error {
        Error::msg(format!("{}: {}", path.display(), reason))
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

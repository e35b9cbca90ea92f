//! Typed errors of the CommitLog.

use std::path::PathBuf;

/// Everything the CommitLog can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An operating-system I/O error on a file.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The disk is full. Nothing was appended; the log is unchanged and usable.
    #[error("no space left on device writing {path}")]
    NoSpace { path: PathBuf },
    /// Stored data fails a check before the tail of the log: a bad CRC, a
    /// broken index sequence, a truncated segment. The log refuses to open (or
    /// to return the entry) rather than drop entries; the node must be
    /// repaired from its peers.
    #[error("corruption in {path} at offset {offset}: {reason}")]
    Corruption { path: PathBuf, offset: u64, reason: String },
    /// An fdatasync failed earlier. Page-cache state is unknown after a failed
    /// fsync, so the log refuses all further writes until it is reopened.
    #[error("log is poisoned after an earlier write or sync failure: {0}")]
    Poisoned(String),
    /// The caller broke the log's contract (non-contiguous index, decreasing
    /// term, oversized entry, ...). Nothing was written.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The requested index or position is not in the log (purged or not yet written).
    #[error("{0} is not in the log")]
    NotFound(String),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl LogError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            LogError::NoSpace { path }
        } else {
            LogError::Io { path, source }
        }
    }

    pub(crate) fn corruption(path: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        LogError::Corruption { path: path.into(), offset, reason: reason.into() }
    }

    /// Whether this error means the stored data is damaged (not a transient fault).
    pub fn is_corruption(&self) -> bool {
        matches!(self, LogError::Corruption { .. })
    }
}

impl From<LogError> for std::io::Error {
    fn from(e: LogError) -> Self {
        let kind = match &e {
            LogError::Io { source, .. } => source.kind(),
            LogError::NoSpace { .. } => std::io::ErrorKind::StorageFull,
            LogError::Corruption { .. } => std::io::ErrorKind::InvalidData,
            LogError::NotFound(_) => std::io::ErrorKind::NotFound,
            LogError::Invalid(_) | LogError::Config(_) => std::io::ErrorKind::InvalidInput,
            LogError::Poisoned(_) => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;

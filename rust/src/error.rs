//! The one error type of the core. Messages are lowercase and name the path they concern.

use std::path::{Path, PathBuf};

/// Every failure the core reports. A bad *file* inside a scan is not an `Error`: it becomes a
/// `failed` row. An `Error` is for bad arguments and for the store itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument the caller gave is unusable (missing folder, empty name, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A named dataset does not exist in the store.
    #[error("no dataset named {0:?} in {1}")]
    DatasetNotFound(String, String),
    /// `create` was asked for a name that is taken.
    #[error("a dataset named {0:?} already exists in {1}")]
    DatasetExists(String, String),
    /// The file is not a readable image (corrupt, truncated, unsupported format).
    #[error("{path}: {reason}")]
    Image { path: PathBuf, reason: String },
    /// A COCO annotations file that cannot be ingested; nothing was written.
    #[error("{path}: {reason}")]
    Coco { path: PathBuf, reason: String },
    /// The store was written by another schema version.
    #[error("{path}: schema version {found}, this fastindex reads version {expected}")]
    SchemaVersion {
        path: String,
        found: i64,
        expected: i64,
    },
    /// The file is an SQLite database of another application.
    #[error(
        "{0}: not a fastindex store (another application's SQLite database); choose another file"
    )]
    NotAStore(String),
    /// The file cannot be a store: a folder, not SQLite, damaged, read-only.
    #[error("{path}: {reason}")]
    BadStore { path: String, reason: String },
    /// A commit of phase work found that `owner` no longer holds the phase's lease (another
    /// process took it over); nothing of the batch was written.
    #[error("store {path}: another process took over the {phase} lease of dataset {dataset_id} from {owner}; nothing of this batch was written")]
    LeaseLost {
        path: String,
        dataset_id: i64,
        phase: String,
        owner: String,
    },
    /// SQLite failed.
    #[error("store {path}: {source}")]
    Store {
        path: String,
        source: rusqlite::Error,
    },
    /// An I/O error on a path the caller named.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An object store (s3://, gs://, az://) cannot be used: no bucket, credentials refused,
    /// unreachable. `uri` names the bucket (or the object).
    #[error("{uri}: {reason}")]
    ObjectStore { uri: String, reason: String },
    /// The work was cancelled through its stop flag.
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn image(path: &Path, reason: impl Into<String>) -> Self {
        Error::Image {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
    pub fn coco(path: &Path, reason: impl Into<String>) -> Self {
        Error::Coco {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Attach the store's path to a SQLite error.
pub trait StoreContext<T> {
    fn store(self, path: &str) -> Result<T>;
}

impl<T> StoreContext<T> for std::result::Result<T, rusqlite::Error> {
    fn store(self, path: &str) -> Result<T> {
        self.map_err(|source| Error::Store {
            path: path.to_string(),
            source,
        })
    }
}

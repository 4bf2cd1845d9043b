//! The crate's error type.

use std::path::PathBuf;

use crate::chunk::CorruptChunk;
use crate::config::ConfigError;
use crate::tier::TierKind;

/// Everything kvtier's engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A chunk failed validation (bad header, length or checksum).
    #[error(transparent)]
    CorruptChunk(#[from] CorruptChunk),
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`, `write`, `create directory`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A single chunk is larger than the tier's whole capacity.
    #[error("{tier} tier: a {bytes}-byte chunk cannot fit in its capacity of {capacity} bytes")]
    ChunkTooLarge {
        /// The tier.
        tier: TierKind,
        /// Size of the chunk.
        bytes: u64,
        /// The tier's capacity.
        capacity: u64,
    },
    /// The tier cannot make room: what is left is held by readers.
    #[error("{tier} tier full: {needed} bytes needed, every evictable object already evicted ({pinned} bytes held by readers)")]
    TierFull {
        /// The tier.
        tier: TierKind,
        /// Bytes that could not be made free.
        needed: u64,
        /// Bytes pinned by readers.
        pinned: u64,
    },
    /// A tier's bounded background queue is full; the chunk was not queued.
    #[error("{tier} tier: write queue full ({depth} chunks pending)")]
    QueueFull {
        /// The tier.
        tier: TierKind,
        /// The queue's bound.
        depth: usize,
    },
    /// Caller-supplied KV does not match the model's shape.
    #[error("KV shape mismatch: {0}")]
    Shape(String),
    /// The GPU tier could not be used.
    #[error("GPU tier: {0}")]
    Gpu(String),
    /// The P/D path failed (control plane, allocation, receiver).
    #[error(transparent)]
    Pd(#[from] crate::pd::PdError),
    /// A data-plane transfer failed.
    #[error("transport: {0}")]
    Transport(kvtier_transport::TransportError),
    /// A background task (blocking I/O off the async runtime) failed or panicked.
    #[error("background task failed: {0}")]
    Task(String),
    /// A feature this build or configuration does not provide.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An argument (a command-line flag, an option of the proxy or test server) is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An HTTP client or server (proxy, test server) could not be set up.
    #[error("HTTP: {0}")]
    Http(String),
    /// The remote tier failed.
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

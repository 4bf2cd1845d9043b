//! The crate's error type, and [`error_chain`] for messages.

use crate::chunk::CorruptChunk;
use crate::config::ConfigError;
use crate::tier::TierError;

/// Everything kvtier's engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A chunk failed validation (bad header, length or checksum).
    #[error(transparent)]
    CorruptChunk(#[from] CorruptChunk),
    /// A tier (GPU, CPU, disk) failed.
    #[error(transparent)]
    Tier(#[from] TierError),
    /// Caller-supplied KV does not match the model's shape.
    #[error("KV shape mismatch: {0}")]
    Shape(String),
    /// The P/D path failed (control plane, allocation, receiver).
    #[error(transparent)]
    Pd(#[from] crate::pd::PdError),
    /// A data-plane transfer failed.
    #[error("transport: {0}")]
    Transport(#[from] kvtier_transport::TransportError),
    /// A background task (blocking I/O off the async runtime) failed or panicked.
    #[error("background task ({what}) failed: {source}")]
    Task {
        /// What the task was doing.
        what: &'static str,
        /// Why it ended.
        source: tokio::task::JoinError,
    },
    /// A feature this build or configuration does not provide.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The remote tier failed.
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, `: `-joined, each once (some errors' own message omits the
/// cause: an HTTP client's "error sending request" hides the refused certificate).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s += ": ";
            s += &msg;
        }
        src = inner.source();
    }
    s
}

//! The error type of the apps (proxy, test server).

/// What the proxy and the test server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument (a command-line flag, an option of the proxy or test server) is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A listening socket could not be opened or served.
    #[error("cannot {op} {addr}: {source}")]
    Listen {
        /// What was being done (`bind proxy HTTP port`, `serve HTTP on`, ...).
        op: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// The engine (or its P/D path) failed.
    #[error(transparent)]
    Engine(#[from] kvtier::Error),
}

impl From<kvtier::config::ConfigError> for Error {
    fn from(e: kvtier::config::ConfigError) -> Self {
        Error::Engine(e.into())
    }
}

impl From<kvtier::pd::PdError> for Error {
    fn from(e: kvtier::pd::PdError) -> Self {
        Error::Engine(e.into())
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Prefill/decode disaggregation: a prefiller (sender) pushes a request's KV chunks into
//! the decoder's (receiver's) pre-allocated P/D buffer over a data-plane transport.
//!
//! 1. The receiver listens on `pd_peer_init_port` (handshake: its transport descriptor)
//!    and `pd_peer_alloc_port` (allocations); its buffer of `pd_buffer_size` bytes is a
//!    pool of chunk-sized pages registered with the transport.
//! 2. The sender asks for pages (`Alloc`); the receiver answers with page offsets,
//!    skipping chunks it already holds, waits (bounded by `pd_allocation_timeout_sec`)
//!    when the buffer is full, and fails at once when the request can never fit.
//! 3. The sender writes the chunks one-sided into those pages, then `Commit`s them: only
//!    committed chunks are visible to the receiver's retrieve.
//! 4. The sender tells the proxy (`pd_proxy_host:pd_proxy_port`) the request is done.
//! 5. The receiver frees pages after retrieve, frees uncommitted pages of a sender whose
//!    connection closed or that went silent, and (with `pd_enable_gc`) committed pages no
//!    one retrieved within `pd_ttl_sec`.
//!
//! Control messages are in [`protocol`]; the proxy side of step 4 is [`ProxyListener`].

use std::time::Duration;

mod control;
mod notify;
pub mod pages;
pub mod protocol;
mod receiver;
mod sender;

pub use notify::{ProxyListener, TransferDone};
pub use receiver::{BufferUsage, PdReceiver};
pub use sender::{
    ChunkSource, Gather, KvRange, PdSender, PlanarKv, ReceiverSpec, RegisteredKv, SendReport,
    WAVE_BYTES,
};

/// What the P/D path can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PdError {
    /// A control connection failed: could not be made, failed its handshake (refused,
    /// unproven secret, another kind of listener, not kvtier), timed out, closed, or
    /// carried a malformed frame. The error names the peer.
    #[error(transparent)]
    Control(#[from] kvtier_transport::framed::FramedError),
    /// The peer sent something malformed or out of place.
    #[error("protocol error with {peer}: {reason}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What.
        reason: String,
    },
    /// The peer reported an error.
    #[error("{peer} failed the request: {reason}")]
    Remote {
        /// The peer.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        after: Duration,
    },
    /// The request is larger than the receiver's whole buffer.
    #[error(
        "request {req_id} needs {needed_bytes} bytes of P/D buffer but the receiver's pd_buffer_size \
         is {buffer_bytes}: set pd_buffer_size to at least {needed_bytes} on the decoder"
    )]
    NeverFits {
        /// The request.
        req_id: String,
        /// Bytes it needs.
        needed_bytes: u64,
        /// Bytes the buffer has.
        buffer_bytes: u64,
    },
    /// The receiver's buffer stayed full for `pd_allocation_timeout_sec`.
    #[error("request {req_id}: receiver buffer full for {after:?} (pd_allocation_timeout_sec)")]
    BufferFull {
        /// The request.
        req_id: String,
        /// How long we waited.
        after: Duration,
    },
    /// The sender's staging buffer stayed taken by other sends for the transport timeout.
    #[error(
        "request {req_id}: other sends held all {pages} staging pages for {after:?}; \
         raise pd_buffer_size on the prefiller or send fewer requests at once"
    )]
    StagingFull {
        /// The request.
        req_id: String,
        /// Pages in the sender's staging buffer.
        pages: usize,
        /// How long we waited.
        after: Duration,
    },
    /// The producer of a progressive send's KV stopped before every chunk was ready.
    #[error(
        "request {req_id}: the KV producer stopped with {ready_tokens} of {tokens} tokens ready"
    )]
    Incomplete {
        /// The request.
        req_id: String,
        /// Tokens whose KV was ready.
        ready_tokens: usize,
        /// Tokens of the request.
        tokens: usize,
    },
    /// Sender and receiver disagree on the setup.
    #[error("P/D setup mismatch: {0}")]
    Mismatch(String),
    /// The configuration asks for something this P/D path does not do.
    #[error("unsupported P/D setup: {0}")]
    Unsupported(String),
    /// Caller-supplied KV does not match the model's shape.
    #[error("KV shape mismatch: {0}")]
    Shape(String),
    /// A listening socket could not be opened.
    #[error("cannot {op} {addr}: {source}")]
    Listen {
        /// What was being done (`bind P/D control port`, ...).
        op: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The data-plane transport failed.
    #[error("transport: {0}")]
    Transport(#[from] kvtier_transport::TransportError),
}

/// Result with [`PdError`].
pub type Result<T, E = PdError> = std::result::Result<T, E>;

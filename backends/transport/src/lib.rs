//! The data-plane contract of kvtier: one-sided transfers between registered memory.
//!
//! A [`Transport`] registers memory regions ([`Transport::register`] returns a
//! [`RegistrationHandle`] that deregisters on drop, before the memory can be freed),
//! describes its endpoint as bytes a peer can use ([`Transport::local_descriptor`]), and
//! connects to peers ([`Transport::connect`]). On a [`Connection`], [`Connection::write`]
//! puts local ranges into ranges of the peer's registered memory and completes only when
//! the bytes are at the destination; [`Connection::read`] gets them; [`Connection::notify`]
//! sends a small message the peer receives with [`Transport::recv_notification`].
//!
//! Every wait is bounded by the transport's configured timeout. Implementations: TCP
//! (`kvtier-tcp`), UCX (`kvtier-ucx`), NIXL (`kvtier-nixl`); the `conformance` module (feature `conformance`)
//! is the suite all three pass.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub mod access;
pub mod auth;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod descriptor;
pub mod framed;
pub mod handshake;
pub mod limits;
mod memory;
pub mod wire;

mod checksum;
pub use access::{AccessRefused, RemoteAccess, WriteGrants, WriteGuard, WriterId};
pub use checksum::{checksum, Checksum};
pub use descriptor::{Descriptor, RegionInfo};
pub use memory::{
    region_digest, region_slice, region_slice_mut, size_class, HostAlloc, HostBuffer, RegionMemory,
    RegionTable, BUFFER_ALIGN, HUGE_ALIGN,
};

/// A boxed, sendable future (keeps the traits object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Identifies a registered region within one transport instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u64);

/// What every transport can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The descriptor names no reachable peer, or the peer is not connected.
    #[error("unknown peer {0}")]
    UnknownPeer(String),
    /// A range outside the peer's (or our own) registered memory.
    #[error("range {offset}+{len} is outside region {region:?} ({region_len} bytes)")]
    OutOfBounds {
        /// The region named.
        region: RegionId,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the region (0 if no such region).
        region_len: u64,
    },
    /// A wait ran past the configured timeout.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        op: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The range is in bounds but the region's [`RemoteAccess`] does not let this peer
    /// (connection) do that.
    #[error("range {offset}+{len} of region {region:?}: {reason}")]
    Forbidden {
        /// The region named.
        region: RegionId,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Why.
        reason: AccessRefused,
    },
    /// The peer closed the connection, died, or failed the operation.
    #[error("peer {peer} gone: {reason}")]
    PeerGone {
        /// The peer.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// The opening exchange failed: the peer refused us, did not prove the shared secret,
    /// is not the kind of kvtier listener we wanted, or is not kvtier at all.
    #[error(transparent)]
    Handshake(#[from] handshake::HandshakeError),
    /// The native runtime this transport needs cannot be loaded.
    #[error("{transport} runtime missing: {what}")]
    RuntimeMissing {
        /// The transport.
        transport: &'static str,
        /// What is missing and how to install it.
        what: String,
    },
    /// The transport asked for is not part of this build (the message names the build
    /// option that adds it).
    #[error("{0}")]
    NotBuilt(String),
    /// A malformed descriptor or message.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local I/O or runtime failure.
    #[error("{0}")]
    Io(String),
}

/// Result with [`TransportError`].
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// Settings every transport takes.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Bound on every wait (connect, transfer, notification).
    pub timeout: Duration,
    /// Shared secret peers must prove they know (`transport_auth_token`), if any.
    pub auth_token: Option<String>,
    /// Address to listen on and to advertise in descriptors.
    pub host: String,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            timeout: Duration::from_secs(30),
            auth_token: None,
            host: "127.0.0.1".into(),
        }
    }
}

/// A registered region. Dropping it deregisters the region from the transport first and
/// only then releases the memory.
pub struct RegistrationHandle {
    id: RegionId,
    ptr: *mut u8,
    len: usize,
    deregister: Option<Box<dyn FnOnce() + Send + Sync>>,
    // Declared last: dropped after `Drop::drop` ran the deregistration.
    memory: Arc<dyn RegionMemory>,
}

// SAFETY: the raw pointer is only an address into `memory`, which is Send + Sync; access
// to the bytes goes through transports, whose contract (RegionMemory) allows it.
unsafe impl Send for RegistrationHandle {}
// SAFETY: as above; &RegistrationHandle exposes no mutable access by itself.
unsafe impl Sync for RegistrationHandle {}

impl RegistrationHandle {
    /// A handle for `memory` registered as `id`; `deregister` runs when the handle drops.
    pub fn new(
        id: RegionId,
        memory: Arc<dyn RegionMemory>,
        deregister: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        RegistrationHandle {
            id,
            ptr: memory.as_ptr(),
            len: memory.len(),
            deregister: Some(Box::new(deregister)),
            memory,
        }
    }

    /// The region's id (what peers name in [`RemoteIov`]).
    pub fn id(&self) -> RegionId {
        self.id
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The registered memory.
    pub fn memory(&self) -> &Arc<dyn RegionMemory> {
        &self.memory
    }

    /// A local range of this region, bounds-checked.
    pub fn iov(&self, offset: usize, len: usize) -> Result<LocalIov<'_>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(LocalIov {
                region: self,
                offset,
                len,
            }),
            _ => Err(TransportError::OutOfBounds {
                region: self.id,
                offset: offset as u64,
                len: len as u64,
                region_len: self.len as u64,
            }),
        }
    }
}

impl Drop for RegistrationHandle {
    fn drop(&mut self) {
        if let Some(deregister) = self.deregister.take() {
            deregister();
        }
    }
}

impl std::fmt::Debug for RegistrationHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistrationHandle({:?}, {} bytes)", self.id, self.len)
    }
}

/// A range of local registered memory.
#[derive(Clone, Copy, Debug)]
pub struct LocalIov<'a> {
    /// The region.
    pub region: &'a RegistrationHandle,
    /// Start within the region.
    pub offset: usize,
    /// Length.
    pub len: usize,
}

impl LocalIov<'_> {
    /// Start address.
    pub fn addr(&self) -> u64 {
        self.region.addr() + self.offset as u64
    }

    /// Pointer to the first byte.
    pub fn ptr(&self) -> *mut u8 {
        // The iov was bounds-checked at creation; this is address arithmetic only.
        self.region.ptr.wrapping_add(self.offset)
    }
}

/// A range of a peer's registered memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteIov {
    /// The peer's region.
    pub region: RegionId,
    /// Start within the region.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// A notification received from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// Who sent it (transport-specific name).
    pub peer: String,
    /// The message.
    pub message: Vec<u8>,
}

/// Largest notification message, in bytes.
pub const MAX_NOTIFICATION: usize = 64 * 1024;

/// Checks that `local` and `remote` pair up: same count, same lengths.
pub fn check_pairs(local: &[LocalIov<'_>], remote: &[RemoteIov]) -> Result<()> {
    if local.len() != remote.len() {
        return Err(TransportError::Protocol(format!(
            "{} local ranges for {} remote ranges",
            local.len(),
            remote.len()
        )));
    }
    for (i, (l, r)) in local.iter().zip(remote).enumerate() {
        if l.len as u64 != r.len {
            return Err(TransportError::Protocol(format!(
                "range {i}: local length {} != remote length {}",
                l.len, r.len
            )));
        }
    }
    Ok(())
}

/// A data-plane transport. Object-safe: P/D and the remote store pick one at run time.
pub trait Transport: Send + Sync {
    /// Short name: `tcp`, `ucx`, `nixl`.
    fn kind(&self) -> &'static str;

    /// Registers `memory` for local use in transfers and for remote access by peers as
    /// `access` allows.
    fn register(
        &self,
        memory: Arc<dyn RegionMemory>,
        access: RemoteAccess,
    ) -> Result<RegistrationHandle>;

    /// Whether this endpoint checks every peer's write against the [`WriteGrants`] of a
    /// [`RemoteAccess::GrantedWrites`] region (true where writes pass through its own
    /// code; one-sided RDMA-style writes never do).
    fn enforces_write_grants(&self) -> bool {
        false
    }

    /// Regions currently registered (for leak checks and metrics).
    fn registered_regions(&self) -> usize;

    /// What a peer needs to reach this endpoint and its registered regions. Regions
    /// registered later need a fresh descriptor.
    fn local_descriptor(&self) -> Result<Vec<u8>>;

    /// Connects to the peer described by `descriptor`.
    fn connect<'a>(&'a self, descriptor: &'a [u8]) -> BoxFuture<'a, Result<Box<dyn Connection>>>;

    /// The next notification from any peer, waiting at most `timeout`.
    fn recv_notification(&self, timeout: Duration) -> BoxFuture<'_, Result<Notification>>;
}

/// A connection to one peer.
pub trait Connection: Send + Sync {
    /// The peer's name.
    fn peer(&self) -> &str;

    /// The id the peer knows this connection's writes by, for its [`WriteGrants`]; `None`
    /// where the transport cannot tell connections apart at the target.
    fn writer_id(&self) -> Option<WriterId> {
        None
    }

    /// Puts each `local[i]` into `remote[i]`; completes when every byte is at the peer.
    fn write<'a>(
        &'a self,
        local: &'a [LocalIov<'a>],
        remote: &'a [RemoteIov],
    ) -> BoxFuture<'a, Result<()>>;

    /// Gets each `remote[i]` into `local[i]`; completes when every byte is here.
    fn read<'a>(
        &'a self,
        local: &'a [LocalIov<'a>],
        remote: &'a [RemoteIov],
    ) -> BoxFuture<'a, Result<()>>;

    /// Sends `message` (at most [`MAX_NOTIFICATION`] bytes) to the peer's
    /// [`Transport::recv_notification`]. Ordered after writes that completed before it.
    fn notify<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<()>>;
}

/// The queue of notifications a transport received, shared by its `recv_notification`.
pub type NotificationQueue = tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Notification>>;

/// The next notification from `queue`, waiting at most `timeout` (the usual body of
/// [`Transport::recv_notification`] for transports that queue what they receive).
pub async fn recv_queued(queue: &NotificationQueue, timeout: Duration) -> Result<Notification> {
    let mut rx = queue.lock().await;
    match tokio::time::timeout(timeout, rx.recv()).await {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(TransportError::Io("notification channel closed".into())),
        Err(_) => Err(TransportError::Timeout {
            op: "notification",
            after: timeout,
        }),
    }
}

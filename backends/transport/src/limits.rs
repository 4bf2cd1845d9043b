//! Bounds every kvtier listener applies to its peers: how many connections it serves at
//! once (a connection past the cap is closed at once, so a peer cannot exhaust tasks and
//! descriptors), how long a reply may wait for a peer that stopped reading, and how long a
//! control or data connection may sit silent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default cap on the connections one listener serves at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// How long the accepting side of a control connection waits for the next frame before it
/// closes the connection (a peer that holds connections open and silent cannot pin the
/// listener's connection slots). Clients that keep idle connections pooled reconnect when
/// a pooled one turns out closed.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a data-plane server (the TCP transport's) waits for a connection's next frame
/// before it closes the connection. Its clients open a fresh connection instead of using
/// one that sat silent for half as long, or that the server closed while idle.
pub const DATA_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Admission of one listener's connections.
#[derive(Clone)]
pub struct ConnectionLimit {
    what: Arc<str>,
    permits: Arc<Semaphore>,
    max: usize,
    refused: Arc<AtomicU64>,
}

impl ConnectionLimit {
    /// At most `max` (at least 1) connections at once for the listener `what` names.
    pub fn new(what: impl Into<String>, max: usize) -> Self {
        let max = max.max(1);
        ConnectionLimit {
            what: what.into().into(),
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A place for one more connection, held until the permit drops; `None` (and a warning
    /// on the first refusal and every 1000th after) when the listener is full.
    pub fn admit(&self, peer: &std::net::SocketAddr) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let n = self.refused.fetch_add(1, Ordering::Relaxed);
                if n % 1000 == 0 {
                    tracing::warn!(
                        "{}: {} connections open, the most it serves; closed the one from \
                         {peer} ({} refused so far)",
                        self.what,
                        self.max,
                        n + 1
                    );
                }
                None
            }
        }
    }

    /// Admits the connection `stream` from `peer`, or answers it that the listener is
    /// full (in a task of its own, at most a second) and returns `None`.
    pub fn admit_or_refuse(
        &self,
        stream: tokio::net::TcpStream,
        peer: &std::net::SocketAddr,
    ) -> Option<(tokio::net::TcpStream, OwnedSemaphorePermit)> {
        match self.admit(peer) {
            Some(permit) => Some((stream, permit)),
            None => {
                tokio::spawn(async move {
                    let mut stream = stream;
                    crate::handshake::refuse_busy(&mut stream, Duration::from_secs(1)).await;
                });
                None
            }
        }
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Runs `write` (a reply to a peer) within `timeout`: a peer that stopped reading fails
/// the write instead of holding its connection's task forever.
pub async fn reply_within<T, E>(
    timeout: Duration,
    write: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ReplyError<E>> {
    match tokio::time::timeout(timeout, write).await {
        Ok(r) => r.map_err(ReplyError::Failed),
        Err(_) => Err(ReplyError::Stalled(timeout)),
    }
}

/// Why a bounded reply failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError<E> {
    /// The write itself failed.
    #[error(transparent)]
    Failed(E),
    /// The peer read nothing for the whole timeout.
    #[error("the peer read no answer for {0:?}")]
    Stalled(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_listener_refuses_and_counts_until_a_place_frees() {
        let limit = ConnectionLimit::new("test listener", 2);
        let peer = "127.0.0.1:9".parse().unwrap();
        let a = limit.admit(&peer).unwrap();
        let _b = limit.admit(&peer).unwrap();
        assert!(limit.admit(&peer).is_none());
        assert!(limit.admit(&peer).is_none());
        assert_eq!(limit.refused(), 2);
        drop(a);
        assert!(limit.admit(&peer).is_some());
    }

    #[tokio::test]
    async fn a_stalled_reply_fails_after_the_timeout() {
        let never = std::future::pending::<Result<(), std::io::Error>>();
        let r = reply_within(Duration::from_millis(20), never).await;
        assert!(matches!(r, Err(ReplyError::Stalled(_))));
        let ok = async { Ok::<_, std::io::Error>(7) };
        assert_eq!(reply_within(Duration::from_secs(1), ok).await.unwrap(), 7);
    }
}

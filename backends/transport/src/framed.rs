//! One framed, authenticated control connection over TCP, generic over a message codec.
//!
//! Every kvtier control plane (the P/D control ports and the proxy's notification port, the
//! remote store's master and nodes) speaks through a [`FramedConn`]: the opening
//! [`handshake`] (which bounds what an unauthenticated peer can send and
//! names the peer), then frames of a `u32` LE body length followed by the body, capped at
//! [`Codec::MAX_FRAME`] on both the sending and the receiving side. What a body holds is
//! the [`Codec`]'s business; framing, caps, timeouts, peer naming and errors are here, once.

use std::marker::PhantomData;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::handshake::{self, HandshakeError, Hello, Service};
use crate::wire::{self, WireError};

/// One side of a protocol: its version (exchanged in the handshake), what it sends and
/// what it receives.
pub trait Codec {
    /// Protocol version spoken after the handshake; a peer speaking another is refused.
    const VERSION: u16;
    /// Messages this side sends.
    type Out;
    /// Messages this side receives.
    type In;
    /// Largest body, either way.
    const MAX_FRAME: usize;
    /// The body of `msg` (no length prefix).
    fn encode(msg: &Self::Out) -> Vec<u8>;
    /// Decodes one body; never panics, whatever the bytes.
    fn decode(body: &[u8]) -> Result<Self::In, Box<dyn std::error::Error + Send + Sync>>;
}

/// What a framed connection can fail with. Every variant names the peer.
#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    /// The TCP connection could not be made.
    #[error("cannot reach {addr}: {source}")]
    Connect {
        /// Address tried.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The opening exchange failed: refused, unproven secret, another kind of listener or
    /// not kvtier at all (the error names which).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        after: Duration,
    },
    /// The connection closed or failed.
    #[error("connection to {peer} closed: {source}")]
    Closed {
        /// The peer.
        peer: String,
        /// The OS error (`UnexpectedEof` when the peer hung up).
        source: std::io::Error,
    },
    /// The peer sent nothing for the idle bound; the connection was closed.
    #[error("connection to {peer} idle for {after:?}; closed")]
    Idle {
        /// The peer.
        peer: String,
        /// The idle bound.
        after: Duration,
    },
    /// A frame over the cap (sent or announced).
    #[error("frame from or to {peer}: {source}")]
    Frame {
        /// The peer.
        peer: String,
        /// Which cap.
        source: WireError,
    },
    /// A body the codec could not decode.
    #[error("malformed message from {peer}: {source}")]
    Malformed {
        /// The peer.
        peer: String,
        /// The codec's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl FramedError {
    /// Whether the connection simply ended: the peer closed or reset it, or it sat idle
    /// past the bound.
    pub fn is_closed(&self) -> bool {
        matches!(self, FramedError::Closed { .. } | FramedError::Idle { .. })
    }
}

/// A control connection past the handshake, carrying `C`'s messages.
pub struct FramedConn<C> {
    stream: TcpStream,
    peer: String,
    codec: PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for FramedConn<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramedConn")
            .field("peer", &self.peer)
            .finish()
    }
}

impl<C: Codec> FramedConn<C> {
    /// Connects to the `service` at `addr` as `name`, proving `secret` (and requiring the
    /// server to prove it), all within `timeout`.
    pub async fn connect(
        addr: &str,
        service: Service,
        name: &str,
        secret: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, FramedError> {
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| FramedError::Timeout {
                what: format!("connecting to {addr}"),
                after: timeout,
            })?
            .map_err(|source| FramedError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let hello = Hello {
            service,
            version: C::VERSION,
            name,
            secret,
        };
        let server = handshake::connect(&mut stream, addr, hello, timeout).await?;
        Ok(FramedConn {
            stream,
            peer: format!("{} ({addr})", server.name),
            codec: PhantomData,
        })
    }

    /// Runs the accepting side of the handshake on a freshly accepted `stream` as the
    /// `service` named `name`, within `timeout`; refuses clients that cannot prove
    /// `secret`.
    pub async fn accept(
        mut stream: TcpStream,
        service: Service,
        name: &str,
        secret: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, FramedError> {
        let hello = Hello {
            service,
            version: C::VERSION,
            name,
            secret,
        };
        let peer = handshake::accept_tcp(&mut stream, hello, timeout).await?;
        Ok(FramedConn {
            stream,
            peer,
            codec: PhantomData,
        })
    }

    /// The other side: the name it gave in the handshake and its address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn closed(&self, source: std::io::Error) -> FramedError {
        FramedError::Closed {
            peer: self.peer.clone(),
            source,
        }
    }

    /// Sends one message (refused before anything is written when its body is over the
    /// cap).
    pub async fn send(&mut self, msg: &C::Out) -> Result<(), FramedError> {
        let body = C::encode(msg);
        wire::check_len(body.len(), C::MAX_FRAME).map_err(|source| FramedError::Frame {
            peer: self.peer.clone(),
            source,
        })?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| self.closed(e))
    }

    /// Receives one message, waiting as long as it takes (an idle peer is fine).
    pub async fn recv(&mut self) -> Result<C::In, FramedError> {
        let mut prefix = [0u8; 4];
        self.stream
            .read_exact(&mut prefix)
            .await
            .map_err(|e| self.closed(e))?;
        let len = wire::frame_len(prefix, C::MAX_FRAME).map_err(|source| FramedError::Frame {
            peer: self.peer.clone(),
            source,
        })?;
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| self.closed(e))?;
        C::decode(&body).map_err(|source| FramedError::Malformed {
            peer: self.peer.clone(),
            source,
        })
    }

    /// Receives one message, the accepting side's way: a peer that sends nothing for
    /// `idle` gets the connection closed ([`FramedError::Idle`]).
    pub async fn recv_idle(&mut self, idle: Duration) -> Result<C::In, FramedError> {
        match tokio::time::timeout(idle, self.recv()).await {
            Ok(r) => r,
            Err(_) => Err(FramedError::Idle {
                peer: self.peer.clone(),
                after: idle,
            }),
        }
    }

    /// Receives one message within `timeout`.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<C::In, FramedError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(r) => r,
            Err(_) => Err(FramedError::Timeout {
                what: format!("answer from {}", self.peer),
                after: timeout,
            }),
        }
    }

    /// Sends `msg` and waits for the answer, both within `timeout`. After an error the
    /// connection is out of step: drop it.
    pub async fn request(&mut self, msg: &C::Out, timeout: Duration) -> Result<C::In, FramedError> {
        let peer = self.peer.clone();
        match tokio::time::timeout(timeout, async {
            self.send(msg).await?;
            self.recv().await
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(FramedError::Timeout {
                what: format!("answer from {peer}"),
                after: timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes both ways, one message per frame.
    struct Echo;

    impl Codec for Echo {
        const VERSION: u16 = 1;
        type Out = Vec<u8>;
        type In = Vec<u8>;
        const MAX_FRAME: usize = 64;

        fn encode(msg: &Vec<u8>) -> Vec<u8> {
            msg.clone()
        }

        fn decode(body: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
            Ok(body.to_vec())
        }
    }

    #[tokio::test]
    async fn frames_round_trip_caps_hold_and_silence_is_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = Duration::from_secs(5);
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut conn = FramedConn::<Echo>::accept(stream, Service::StoreNode, "s", None, t)
                .await
                .unwrap();
            let got = conn.recv_idle(t).await.unwrap();
            conn.send(&got).await.unwrap();
            conn.recv_idle(Duration::from_millis(200)).await
        });
        let mut client = FramedConn::<Echo>::connect(&addr, Service::StoreNode, "c", None, t)
            .await
            .unwrap();
        assert!(client.peer().starts_with("s ("), "{}", client.peer());
        assert_eq!(
            client.request(&b"hello".to_vec(), t).await.unwrap(),
            b"hello"
        );
        let err = client.send(&vec![0u8; 65]).await.unwrap_err();
        assert!(matches!(err, FramedError::Frame { .. }), "{err}");
        // The server hears nothing more and closes the connection.
        let idle = server.await.unwrap().unwrap_err();
        assert!(
            matches!(idle, FramedError::Idle { .. }) && idle.is_closed(),
            "{idle}"
        );
        let err = client.recv_within(t).await.unwrap_err();
        assert!(err.is_closed(), "{err}");
    }
}

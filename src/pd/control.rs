//! Framed, authenticated control connections (TCP) carrying [`Message`]s.

use std::time::Duration;

use kvtier_transport::auth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::protocol::{self, Message, VERSION};
use super::PdError;

const AUTH_CONTEXT: &[u8] = b"kvtier-pd-control-v1";
/// Largest message before `Welcome` (a `Hello` is well under 5 KiB).
const HANDSHAKE_FRAME: usize = 8 * 1024;

/// One control connection.
pub(crate) struct ControlConn {
    stream: TcpStream,
    /// Largest message accepted now: small until the handshake is done, so an
    /// unauthenticated peer cannot make us allocate much.
    max_frame: usize,
    /// The other side's name (address and, for accepted connections, its `Hello` name).
    pub peer: String,
}

impl ControlConn {
    /// Connects to `addr` and authenticates as `name`.
    pub async fn connect(
        addr: &str,
        name: &str,
        secret: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, PdError> {
        let connect_err = |reason: String| PdError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PdError::Timeout {
                what: format!("connecting to {addr}"),
                after: timeout,
            })?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut conn = ControlConn {
            stream,
            max_frame: HANDSHAKE_FRAME,
            peer: addr.to_string(),
        };
        let nonce = match conn.recv_within(timeout).await? {
            Message::Challenge { version, nonce } if version == VERSION => nonce,
            Message::Challenge { version, .. } => {
                return Err(PdError::Refused {
                    peer: addr.into(),
                    reason: format!("speaks control protocol {version}, this build {VERSION}"),
                })
            }
            other => return Err(conn.unexpected(&other)),
        };
        let mac = auth::respond(secret, AUTH_CONTEXT, &nonce);
        conn.send(&Message::Hello {
            version: VERSION,
            name: name.to_string(),
            mac,
        })
        .await?;
        match conn.recv_within(timeout).await? {
            Message::Welcome => {
                conn.max_frame = protocol::MAX_FRAME;
                Ok(conn)
            }
            Message::Reject { reason } => Err(PdError::Refused {
                peer: addr.into(),
                reason,
            }),
            other => Err(conn.unexpected(&other)),
        }
    }

    /// Runs the accepting side's handshake on `stream`; refuses peers without `secret`.
    pub async fn accept(
        stream: TcpStream,
        secret: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, PdError> {
        let _ = stream.set_nodelay(true);
        let addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let mut conn = ControlConn {
            stream,
            max_frame: HANDSHAKE_FRAME,
            peer: addr.clone(),
        };
        let nonce = auth::nonce();
        conn.send(&Message::Challenge {
            version: VERSION,
            nonce,
        })
        .await?;
        let (version, name, mac) = match conn.recv_within(timeout).await? {
            Message::Hello { version, name, mac } => (version, name, mac),
            other => return Err(conn.unexpected(&other)),
        };
        let refusal = if version != VERSION {
            Some(format!(
                "control protocol {version}; this endpoint speaks {VERSION}"
            ))
        } else if !auth::verify(secret, AUTH_CONTEXT, &nonce, &mac) {
            Some("wrong or missing transport_auth_token".to_string())
        } else {
            None
        };
        if let Some(reason) = refusal {
            let _ = conn
                .send(&Message::Reject {
                    reason: reason.clone(),
                })
                .await;
            return Err(PdError::Refused {
                peer: format!("{name} ({addr})"),
                reason,
            });
        }
        conn.send(&Message::Welcome).await?;
        conn.max_frame = protocol::MAX_FRAME;
        conn.peer = format!("{name} ({addr})");
        Ok(conn)
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), PdError> {
        self.stream
            .write_all(&protocol::encode(msg))
            .await
            .map_err(|e| PdError::Closed {
                peer: self.peer.clone(),
                reason: e.to_string(),
            })
    }

    /// Receives one message, waiting as long as it takes (an idle peer is fine).
    pub async fn recv(&mut self) -> Result<Message, PdError> {
        let closed = |peer: &str, e: std::io::Error| PdError::Closed {
            peer: peer.to_string(),
            reason: e.to_string(),
        };
        let mut prefix = [0u8; 4];
        self.stream
            .read_exact(&mut prefix)
            .await
            .map_err(|e| closed(&self.peer, e))?;
        let len = protocol::body_len(prefix).map_err(|e| PdError::Protocol {
            peer: self.peer.clone(),
            reason: e.to_string(),
        })?;
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| closed(&self.peer, e))?;
        protocol::decode(&body).map_err(|e| PdError::Protocol {
            peer: self.peer.clone(),
            reason: e.to_string(),
        })
    }

    /// Receives one message within `timeout`.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Message, PdError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(r) => r,
            Err(_) => Err(PdError::Timeout {
                what: format!("answer from {}", self.peer),
                after: timeout,
            }),
        }
    }

    /// Sends `msg` and waits at most `timeout` for the answer.
    pub async fn request(&mut self, msg: &Message, timeout: Duration) -> Result<Message, PdError> {
        self.send(msg).await?;
        self.recv_within(timeout).await
    }

    /// The error for a message that has no business here.
    pub fn unexpected(&self, msg: &Message) -> PdError {
        match msg {
            Message::Error { reason } => PdError::Remote {
                peer: self.peer.clone(),
                reason: reason.clone(),
            },
            other => PdError::Protocol {
                peer: self.peer.clone(),
                reason: format!("unexpected {other:?}"),
            },
        }
    }
}

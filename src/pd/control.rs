//! Framed, authenticated control connections (TCP) carrying [`Message`]s.

use std::time::Duration;

use kvtier_transport::handshake::{self, Hello, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::protocol::{self, Message, VERSION};
use super::PdError;

/// One control connection, past the handshake (which bounds everything an
/// unauthenticated peer can send).
pub(crate) struct ControlConn {
    stream: TcpStream,
    /// The other side: the name it gave in the handshake, and its address.
    pub peer: String,
}

impl ControlConn {
    /// Connects to the `service` listening at `addr` and authenticates as `name`.
    pub async fn connect(
        addr: &str,
        service: Service,
        name: &str,
        secret: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, PdError> {
        let connect_err = |reason: String| PdError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PdError::Timeout {
                what: format!("connecting to {addr}"),
                after: timeout,
            })?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let hello = Hello {
            service,
            version: VERSION,
            name,
            secret,
        };
        let server = handshake::connect(&mut stream, addr, hello, timeout).await?;
        Ok(ControlConn {
            stream,
            peer: format!("{} ({addr})", server.name),
        })
    }

    /// Runs the accepting side's handshake on `stream` as the `service` named `name`;
    /// refuses peers without `secret`.
    pub async fn accept(
        mut stream: TcpStream,
        service: Service,
        name: &str,
        secret: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, PdError> {
        let hello = Hello {
            service,
            version: VERSION,
            name,
            secret,
        };
        let peer = handshake::accept_tcp(&mut stream, hello, timeout).await?;
        Ok(ControlConn { stream, peer })
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

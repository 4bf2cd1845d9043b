//! The opening of every kvtier control connection: who is there, and mutual proof of the
//! shared secret.
//!
//! Every kvtier listener (TCP transport endpoint, P/D receiver, P/D proxy notification
//! port, remote-store master and node) starts its connections with this exchange, so a
//! client that reaches the wrong kind of listener — or a program that is not kvtier at all
//! (an HTTP server, Mooncake's own `mooncake_master`) — gets an error naming the mismatch
//! instead of a hang or a generic protocol error.
//!
//! 1. Client → server, at once: [`MAGIC`], handshake version, the [`Service`] it wants, its
//!    protocol version, a fresh nonce `Nc` and its name.
//! 2. Server → client: the same header for the service it *is*, its nonce `Ns`, its proof
//!    `HMAC(secret, context ‖ "server" ‖ Nc)` and its name. A server that does not
//!    recognise the magic closes without a word; one asked for another service answers
//!    (so the client can name it) and closes.
//! 3. Client: checks the service and version, and — when it has a secret — the server's
//!    proof, before revealing anything; then sends `HMAC(secret, context ‖ "client" ‖ Ns)`.
//! 4. Server → client: one status byte (accepted / refused) and, when refused, the reason.
//!
//! Without a configured secret proofs are all zeros and any proof is accepted (see
//! [`crate::auth`]). The exchange proves knowledge of the secret both ways; it does not
//! encrypt or protect what follows (a transparent relay between two holders of the secret
//! is not detected: use a private network or a tunnel for that). Every field is bounded
//! before it is read and the whole exchange runs within one deadline.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth;

/// First bytes of every kvtier control connection, in both directions.
pub const MAGIC: &[u8; 6] = b"KVTIER";
/// Version of this exchange (not of the protocol that follows it).
pub const HANDSHAKE_VERSION: u8 = 1;
/// Longest endpoint name carried in the exchange.
pub const MAX_NAME: usize = 256;
/// Longest refusal reason.
const MAX_REASON: usize = 1024;
/// The service code of a listener's answer "at my connection limit" (see [`refuse_busy`]).
const BUSY: u8 = 0xff;

/// The kinds of kvtier listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// A TCP transport endpoint (one-sided reads and writes of registered memory).
    TcpTransport,
    /// A P/D receiver's allocation port (a decoder).
    PdReceiver,
    /// A P/D proxy's transfer-done notification port (`kvtier proxy`).
    PdProxy,
    /// A remote-store master (`kvtier master`).
    StoreMaster,
    /// A remote-store node's control port (`kvtier store-node`).
    StoreNode,
}

impl Service {
    fn code(self) -> u8 {
        match self {
            Service::TcpTransport => 1,
            Service::PdReceiver => 2,
            Service::PdProxy => 3,
            Service::StoreMaster => 4,
            Service::StoreNode => 5,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Service::TcpTransport,
            2 => Service::PdReceiver,
            3 => Service::PdProxy,
            4 => Service::StoreMaster,
            5 => Service::StoreNode,
            _ => return None,
        })
    }

    /// What to run at an address that should be this service, for errors.
    pub fn hint(self) -> &'static str {
        match self {
            Service::TcpTransport => "start a kvtier process with `transport: tcp` there",
            Service::PdReceiver => {
                "start a decoder with `enable_pd: true` and `pd_role: receiver` there"
            }
            Service::PdProxy => {
                "start `kvtier proxy` there (the prefillers' `pd_proxy_port` is its \
                 notification port)"
            }
            Service::StoreMaster => {
                "start `kvtier master` there (it serves kvtier:// and mooncakestore:// URLs; \
                 Mooncake's own mooncake_master does not speak kvtier's protocol)"
            }
            Service::StoreNode => "start `kvtier store-node` there",
        }
    }

    /// What anyone who can reach this listener can do when no secret guards it.
    fn exposure(self) -> &'static str {
        match self {
            Service::TcpTransport => "read and write this process's registered memory",
            Service::PdReceiver => "fill this decoder's P/D buffer and commit KV into it",
            Service::PdProxy => "post transfer-done notices for any request",
            Service::StoreMaster => {
                "read the store's placement and every node's transport descriptors (which \
                 grant access to their memory), and put or remove objects"
            }
            Service::StoreNode => "read and rewrite this node's index",
        }
    }

    fn context(self, side: &[u8]) -> Vec<u8> {
        let mut c = b"kvtier-handshake-v1:".to_vec();
        c.push(self.code());
        c.push(b':');
        c.extend_from_slice(side);
        c
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::TcpTransport => "TCP transport endpoint",
            Service::PdReceiver => "P/D receiver",
            Service::PdProxy => "P/D proxy notification port",
            Service::StoreMaster => "store master",
            Service::StoreNode => "store node",
        })
    }
}

/// Whether a listener on `addr` is reachable from other hosts without a shared secret.
pub fn is_exposed(addr: &std::net::SocketAddr, secret: Option<&str>) -> bool {
    secret.is_none() && !addr.ip().is_loopback()
}

/// Logs one warning when the `service` listening on `addr` is reachable from other hosts
/// without a shared secret (kvtier listens on 127.0.0.1 unless configured otherwise).
pub fn warn_if_exposed(service: Service, addr: &std::net::SocketAddr, secret: Option<&str>) {
    if is_exposed(addr, secret) {
        tracing::warn!(
            "kvtier {service} listens on {addr}, beyond this host, without transport_auth_token: \
             anyone who can reach it can {}. Set the same transport_auth_token on every kvtier \
             process, or listen on 127.0.0.1",
            service.exposure()
        );
    }
}

/// Why a handshake failed. Every variant names the peer.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed.
    #[error("{peer}: {source}")]
    Io {
        /// The other side.
        peer: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The exchange did not finish within the deadline.
    #[error(
        "no kvtier answer from {peer} within {after:?}: it is not a kvtier {expected}, or it \
         is stopped; {}", expected.hint()
    )]
    Timeout {
        /// The other side.
        peer: String,
        /// What the client wanted.
        expected: Service,
        /// The deadline.
        after: Duration,
    },
    /// The other side is not kvtier (wrong magic, or it closed at once).
    #[error("{peer} is not a kvtier {expected} ({seen}); {}", expected.hint())]
    NotKvtier {
        /// The other side.
        peer: String,
        /// What the client wanted.
        expected: Service,
        /// What it saw instead.
        seen: String,
    },
    /// (Accepting side) the client is not kvtier, or did not finish in time: closed.
    #[error("{peer} {what}; closed the connection")]
    Stranger {
        /// The other side.
        peer: String,
        /// What it did.
        what: String,
    },
    /// The listener is at its connection limit.
    #[error("{peer} is at its connection limit; retry later")]
    Busy {
        /// The other side.
        peer: String,
    },
    /// A kvtier listener of another kind.
    #[error(
        "{peer} is a kvtier {found} (\"{name}\"), not a kvtier {expected}: wrong port? \
         Otherwise {}", expected.hint()
    )]
    WrongService {
        /// The other side.
        peer: String,
        /// What the client wanted.
        expected: Service,
        /// What it is.
        found: Service,
        /// Its name.
        name: String,
    },
    /// A kvtier peer of another version.
    #[error("{peer} speaks {service} protocol {theirs}; this build speaks {ours}")]
    Version {
        /// The other side.
        peer: String,
        /// The service.
        service: Service,
        /// Its version.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The server did not prove that it knows the shared secret.
    #[error(
        "{peer} did not prove it knows transport_auth_token (it has none or another one); \
         refusing to talk to it"
    )]
    Unproven {
        /// The other side.
        peer: String,
    },
    /// The other side refused us.
    #[error("{peer} refused the connection: {reason}")]
    Refused {
        /// The other side.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A malformed field.
    #[error("{peer}: malformed handshake: {reason}")]
    Malformed {
        /// The other side.
        peer: String,
        /// What was wrong.
        reason: String,
    },
}

/// What one side of a finished handshake learned about the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The name the other side gave.
    pub name: String,
    /// The other side's protocol version.
    pub version: u16,
}

/// One side's settings for the exchange.
#[derive(Clone, Copy, Debug)]
pub struct Hello<'a> {
    /// The service wanted (client) or offered (server).
    pub service: Service,
    /// The protocol version spoken after the handshake.
    pub version: u16,
    /// This side's name (cut to [`MAX_NAME`] bytes).
    pub name: &'a str,
    /// The shared secret, if one is configured.
    pub secret: Option<&'a str>,
}

struct Header {
    service: Option<Service>,
    service_code: u8,
    version: u16,
    nonce: [u8; 32],
}

fn cut(s: &str, cap: usize) -> &[u8] {
    let mut n = s.len().min(cap);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

fn header(hello: &Hello<'_>, nonce: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(80 + MAX_NAME);
    out.extend_from_slice(MAGIC);
    out.push(HANDSHAKE_VERSION);
    out.push(hello.service.code());
    out.extend_from_slice(&hello.version.to_le_bytes());
    out.extend_from_slice(nonce);
    out
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    let name = cut(name, MAX_NAME);
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
}

/// Describes bytes that are not kvtier's, for errors.
fn describe_foreign(bytes: &[u8], verb: &str) -> String {
    if bytes.starts_with(b"HTTP/") {
        return format!("it {verb} like an HTTP server");
    }
    let hex: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("it {verb} bytes that are not kvtier's: {}", hex.join(" "))
}

async fn read_exact<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    peer: &str,
) -> Result<(), HandshakeError> {
    s.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|source| HandshakeError::Io {
            peer: peer.to_string(),
            source,
        })
}

async fn write_all<S: AsyncWrite + Unpin>(
    s: &mut S,
    bytes: &[u8],
    peer: &str,
) -> Result<(), HandshakeError> {
    s.write_all(bytes)
        .await
        .map_err(|source| HandshakeError::Io {
            peer: peer.to_string(),
            source,
        })
}

/// Reads the fixed part after the magic: handshake version, service, version, nonce.
async fn read_header_rest<S: AsyncRead + Unpin>(
    s: &mut S,
    peer: &str,
) -> Result<Header, HandshakeError> {
    let mut b = [0u8; 36];
    read_exact(s, &mut b[..2], peer).await?;
    if b[1] == BUSY {
        return Err(HandshakeError::Busy { peer: peer.into() });
    }
    read_exact(s, &mut b[2..], peer).await?;
    if b[0] != HANDSHAKE_VERSION {
        return Err(HandshakeError::Malformed {
            peer: peer.into(),
            reason: format!(
                "handshake version {}; this build speaks {HANDSHAKE_VERSION}",
                b[0]
            ),
        });
    }
    let mut nonce = [0u8; 32];
    nonce.copy_from_slice(&b[4..36]);
    Ok(Header {
        service: Service::from_code(b[1]),
        service_code: b[1],
        version: u16::from_le_bytes([b[2], b[3]]),
        nonce,
    })
}

async fn read_name<S: AsyncRead + Unpin>(s: &mut S, peer: &str) -> Result<String, HandshakeError> {
    let mut len = [0u8; 2];
    read_exact(s, &mut len, peer).await?;
    let len = u16::from_le_bytes(len) as usize;
    if len > MAX_NAME {
        return Err(HandshakeError::Malformed {
            peer: peer.into(),
            reason: format!("name of {len} bytes (cap {MAX_NAME})"),
        });
    }
    let mut name = vec![0u8; len];
    read_exact(s, &mut name, peer).await?;
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// Runs the connecting side of the exchange on `stream` to `peer` (an address, for
/// errors), within `timeout`. Returns what the server said about itself.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: &str,
    hello: Hello<'_>,
    timeout: Duration,
) -> Result<Peer, HandshakeError> {
    match tokio::time::timeout(timeout, connect_inner(stream, peer, hello)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout {
            peer: peer.into(),
            expected: hello.service,
            after: timeout,
        }),
    }
}

async fn connect_inner<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    peer: &str,
    hello: Hello<'_>,
) -> Result<Peer, HandshakeError> {
    let ours = auth::nonce();
    let mut preface = header(&hello, &ours);
    push_name(&mut preface, hello.name);
    write_all(s, &preface, peer).await?;

    // The magic decides whether this is kvtier at all; read it byte by byte so a peer
    // that answers a few bytes and closes is still described.
    let mut magic = Vec::with_capacity(MAGIC.len());
    while magic.len() < MAGIC.len() {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(0) => {
                let seen = if magic.is_empty() {
                    "it closed the connection without a word".to_string()
                } else {
                    describe_foreign(&magic, "answered")
                };
                return Err(HandshakeError::NotKvtier {
                    peer: peer.into(),
                    expected: hello.service,
                    seen,
                });
            }
            Ok(_) => magic.push(b[0]),
            Err(e) if magic.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(HandshakeError::NotKvtier {
                    peer: peer.into(),
                    expected: hello.service,
                    seen: "it reset the connection without a word".into(),
                })
            }
            Err(source) => {
                return Err(HandshakeError::Io {
                    peer: peer.into(),
                    source,
                })
            }
        }
        if !MAGIC.starts_with(&magic) {
            let mut more = [0u8; 8];
            let n = tokio::time::timeout(Duration::from_millis(50), s.read(&mut more))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or(0);
            magic.extend_from_slice(&more[..n]);
            return Err(HandshakeError::NotKvtier {
                peer: peer.into(),
                expected: hello.service,
                seen: describe_foreign(&magic, "answered"),
            });
        }
    }
    let theirs = read_header_rest(s, peer).await?;
    let mut proof = [0u8; 32];
    read_exact(s, &mut proof, peer).await?;
    let name = read_name(s, peer).await?;
    match theirs.service {
        Some(found) if found == hello.service => {}
        Some(found) => {
            return Err(HandshakeError::WrongService {
                peer: peer.into(),
                expected: hello.service,
                found,
                name,
            })
        }
        None => {
            return Err(HandshakeError::Malformed {
                peer: peer.into(),
                reason: format!("unknown service {}", theirs.service_code),
            })
        }
    }
    if theirs.version != hello.version {
        return Err(HandshakeError::Version {
            peer: peer.into(),
            service: hello.service,
            theirs: theirs.version,
            ours: hello.version,
        });
    }
    if !auth::verify(
        hello.secret,
        &hello.service.context(b"server"),
        &ours,
        &proof,
    ) {
        return Err(HandshakeError::Unproven { peer: peer.into() });
    }
    let answer = auth::respond(
        hello.secret,
        &hello.service.context(b"client"),
        &theirs.nonce,
    );
    write_all(s, &answer, peer).await?;
    let mut status = [0u8; 1];
    read_exact(s, &mut status, peer).await?;
    match status[0] {
        0 => Ok(Peer {
            name,
            version: theirs.version,
        }),
        1 => {
            let mut len = [0u8; 2];
            read_exact(s, &mut len, peer).await?;
            let len = (u16::from_le_bytes(len) as usize).min(MAX_REASON);
            let mut reason = vec![0u8; len];
            read_exact(s, &mut reason, peer).await?;
            Err(HandshakeError::Refused {
                peer: peer.into(),
                reason: String::from_utf8_lossy(&reason).into_owned(),
            })
        }
        other => Err(HandshakeError::Malformed {
            peer: peer.into(),
            reason: format!("status byte {other}"),
        }),
    }
}

/// The accepting side on a freshly accepted TCP `stream` (no Nagle, peer named by its
/// address): runs [`accept`] and returns the client as `"name (address)"`, for logs.
pub async fn accept_tcp(
    stream: &mut tokio::net::TcpStream,
    hello: Hello<'_>,
    timeout: Duration,
) -> Result<String, HandshakeError> {
    let _ = stream.set_nodelay(true);
    let addr = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let client = accept(stream, &addr, hello, timeout).await?;
    Ok(format!("{} ({addr})", client.name))
}

/// Tells a client the listener is at its connection limit (the client's handshake fails
/// with [`HandshakeError::Busy`]), within `timeout`, without reading anything from it.
pub async fn refuse_busy<S: AsyncWrite + Unpin>(stream: &mut S, timeout: Duration) {
    let mut answer = MAGIC.to_vec();
    answer.extend_from_slice(&[HANDSHAKE_VERSION, BUSY]);
    let _ = tokio::time::timeout(timeout, stream.write_all(&answer)).await;
}

/// Runs the accepting side of the exchange on `stream` from `peer` (an address, for
/// errors), within `timeout`: refuses clients that want another service, speak another
/// version or cannot prove `hello.secret`. Returns what the client said about itself.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: &str,
    hello: Hello<'_>,
    timeout: Duration,
) -> Result<Peer, HandshakeError> {
    match tokio::time::timeout(timeout, accept_inner(stream, peer, hello)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Stranger {
            peer: peer.into(),
            what: format!("did not finish kvtier's handshake within {timeout:?}"),
        }),
    }
}

async fn refuse<S: AsyncWrite + Unpin>(
    s: &mut S,
    peer: &str,
    reason: String,
) -> Result<Peer, HandshakeError> {
    let reason_bytes = cut(&reason, MAX_REASON);
    let mut out = vec![1u8];
    out.extend_from_slice(&(reason_bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(reason_bytes);
    let _ = s.write_all(&out).await;
    Err(HandshakeError::Refused {
        peer: peer.into(),
        reason,
    })
}

async fn accept_inner<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    peer: &str,
    hello: Hello<'_>,
) -> Result<Peer, HandshakeError> {
    // Byte by byte: a client that is not kvtier is dropped at its first wrong byte.
    let mut magic = Vec::with_capacity(MAGIC.len());
    while magic.len() < MAGIC.len() {
        let mut b = [0u8; 1];
        read_exact(s, &mut b, peer).await?;
        magic.push(b[0]);
        if !MAGIC.starts_with(&magic) {
            return Err(HandshakeError::Stranger {
                peer: peer.into(),
                what: format!(
                    "is not a kvtier client ({})",
                    describe_foreign(&magic, "sent")
                ),
            });
        }
    }
    let theirs = read_header_rest(s, peer).await?;
    let name = read_name(s, peer).await?;
    let ours = auth::nonce();
    let mut greeting = header(&hello, &ours);
    greeting.extend_from_slice(&auth::respond(
        hello.secret,
        &hello.service.context(b"server"),
        &theirs.nonce,
    ));
    push_name(&mut greeting, hello.name);
    write_all(s, &greeting, peer).await?;
    if theirs.service != Some(hello.service) {
        // The client names the mismatch from our greeting; nothing more to say.
        return Err(HandshakeError::Refused {
            peer: format!("{name} ({peer})"),
            reason: format!(
                "it asked for service {} and this is a kvtier {}",
                theirs
                    .service
                    .map_or_else(|| theirs.service_code.to_string(), |s| s.to_string()),
                hello.service
            ),
        });
    }
    let mut proof = [0u8; 32];
    read_exact(s, &mut proof, peer).await?;
    let who = format!("{name} ({peer})");
    if theirs.version != hello.version {
        return refuse(
            s,
            &who,
            format!(
                "{} protocol {}; this endpoint speaks {}",
                hello.service, theirs.version, hello.version
            ),
        )
        .await;
    }
    if !auth::verify(
        hello.secret,
        &hello.service.context(b"client"),
        &ours,
        &proof,
    ) {
        return refuse(s, &who, "wrong or missing transport_auth_token".into()).await;
    }
    write_all(s, &[0u8], peer).await?;
    Ok(Peer {
        name,
        version: theirs.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    fn hello(service: Service, secret: Option<&str>) -> Hello<'_> {
        Hello {
            service,
            version: 3,
            name: "test",
            secret,
        }
    }

    /// Runs one exchange over loopback: (client result, server result).
    async fn exchange(
        client: Hello<'static>,
        server: Hello<'static>,
    ) -> (Result<Peer, HandshakeError>, Result<Peer, HandshakeError>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = Duration::from_secs(5);
        let srv = tokio::spawn(async move {
            let (mut s, p) = listener.accept().await.unwrap();
            accept(&mut s, &p.to_string(), server, t).await
        });
        let mut c = TcpStream::connect(&addr).await.unwrap();
        let cr = connect(&mut c, &addr, client, t).await;
        drop(c);
        (cr, srv.await.unwrap())
    }

    #[test]
    fn only_non_loopback_listeners_without_a_secret_are_exposed() {
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(!is_exposed(&at("127.0.0.1:1"), None));
        assert!(!is_exposed(&at("[::1]:1"), None));
        assert!(is_exposed(&at("0.0.0.0:1"), None));
        assert!(is_exposed(&at("10.1.2.3:1"), None));
        assert!(!is_exposed(&at("0.0.0.0:1"), Some("k")));
    }

    #[tokio::test]
    async fn both_sides_prove_the_secret() {
        let (c, s) = exchange(
            hello(Service::PdReceiver, Some("k")),
            hello(Service::PdReceiver, Some("k")),
        )
        .await;
        assert_eq!(c.unwrap().name, "test");
        assert_eq!(s.unwrap().version, 3);
        // No secret on either side: accepted.
        let (c, s) = exchange(
            hello(Service::PdReceiver, None),
            hello(Service::PdReceiver, None),
        )
        .await;
        assert!(c.is_ok() && s.is_ok());
    }

    #[tokio::test]
    async fn a_client_with_a_secret_refuses_a_server_without_it() {
        for server_secret in [None, Some("other")] {
            let (c, s) = exchange(
                hello(Service::StoreMaster, Some("k")),
                hello(Service::StoreMaster, server_secret),
            )
            .await;
            let e = c.unwrap_err();
            assert!(matches!(e, HandshakeError::Unproven { .. }), "{e}");
            assert!(e.to_string().contains("did not prove"), "{e}");
            // The client never answered, so the server saw no proof.
            assert!(s.is_err());
        }
    }

    #[tokio::test]
    async fn a_server_with_a_secret_refuses_a_client_without_it() {
        for client_secret in [None, Some("other")] {
            let (c, s) = exchange(
                hello(Service::TcpTransport, client_secret),
                hello(Service::TcpTransport, Some("k")),
            )
            .await;
            // A client without a secret cannot check the server, so it answers and is
            // refused; a client with the wrong one already refuses the server.
            match client_secret {
                None => {
                    let e = c.unwrap_err();
                    assert!(e.to_string().contains("transport_auth_token"), "{e}");
                }
                Some(_) => assert!(matches!(c, Err(HandshakeError::Unproven { .. }))),
            }
            assert!(s.is_err());
        }
    }

    #[tokio::test]
    async fn the_wrong_kind_of_listener_is_named() {
        let (c, _) = exchange(
            hello(Service::StoreMaster, None),
            hello(Service::PdReceiver, None),
        )
        .await;
        let e = c.unwrap_err().to_string();
        assert!(e.contains("is a kvtier P/D receiver"), "{e}");
        assert!(e.contains("not a kvtier store master"), "{e}");
        assert!(e.contains("`kvtier master`"), "{e}");
    }

    #[tokio::test]
    async fn another_version_is_named() {
        let mut server = hello(Service::PdProxy, None);
        server.version = 4;
        let (c, _) = exchange(hello(Service::PdProxy, None), server).await;
        let e = c.unwrap_err().to_string();
        assert!(e.contains("protocol 4; this build speaks 3"), "{e}");
    }

    #[tokio::test]
    async fn a_foreign_server_is_named_not_waited_for() {
        // An HTTP server answers the preface with an HTTP error.
        let e = master_at(
            |mut s| async move {
                let mut b = [0u8; 16];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            },
            Duration::from_secs(2),
        )
        .await;
        assert!(e.to_string().contains("HTTP server"), "{e}");
        assert!(e.to_string().contains("not a kvtier store master"), "{e}");

        // A server that reads the preface and closes.
        let e = master_at(
            |mut s| async move {
                let mut b = [0u8; 16];
                let _ = s.read(&mut b).await;
            },
            Duration::from_secs(2),
        )
        .await;
        assert!(matches!(e, HandshakeError::NotKvtier { .. }), "{e}");

        // A silent one: the deadline, and what to start there.
        let e = master_at(
            |s| async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                drop(s);
            },
            Duration::from_millis(300),
        )
        .await;
        assert!(matches!(e, HandshakeError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("`kvtier master`"), "{e}");
    }

    /// A client that wants a store master connects to a one-connection server running
    /// `server` on the accepted stream; returns the client's (expected) error.
    async fn master_at<F, Fut>(server: F, timeout: Duration) -> HandshakeError
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            server(s).await;
        });
        let mut c = TcpStream::connect(&addr).await.unwrap();
        connect(&mut c, &addr, hello(Service::StoreMaster, None), timeout)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_full_listener_says_so() {
        let e = master_at(
            |mut s| async move { refuse_busy(&mut s, Duration::from_secs(1)).await },
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(e, HandshakeError::Busy { .. }), "{e}");
        assert!(e.to_string().contains("connection limit"), "{e}");
    }

    #[tokio::test]
    async fn a_server_drops_a_foreign_client_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let srv = tokio::spawn(async move {
            let (mut s, p) = listener.accept().await.unwrap();
            accept(
                &mut s,
                &p.to_string(),
                hello(Service::PdReceiver, None),
                Duration::from_secs(30),
            )
            .await
        });
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), srv)
            .await
            .expect("the server gave up at once")
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, HandshakeError::Stranger { .. }), "{e}");
        assert!(e.to_string().contains("is not a kvtier client"), "{e}");
        // Closed without a word (a reset, since our request was left unread).
        let mut b = [0u8; 8];
        assert!(matches!(c.read(&mut b).await, Ok(0) | Err(_)));
    }
}

//! kvtier's TCP transport.
//!
//! Each endpoint listens on a TCP port. A peer's one-sided `write` becomes a stream of
//! `Write` frames each followed by its bytes; the endpoint checks every range against its
//! registrations — bounds, and the region's [`RemoteAccess`]: a granted region admits
//! only writes its grants give to this connection (named by the `Writer` frame the client
//! sends first) and no reads; a refused write's bytes are read and dropped — reads the
//! bytes straight into the registered memory and acknowledges each frame, so a write
//! completes only when its bytes are in place. Frames of a batch
//! are pipelined: all are sent before any acknowledgement is awaited. `read` is the
//! mirror image (`Read` frames answered by `Data` frames). Connections open with kvtier's
//! common handshake ([`kvtier_transport::handshake`]): protocol version and, with
//! `transport_auth_token`, proof of the secret in both directions. A malformed frame closes
//! that connection with a logged error. See [`protocol`] for the wire format.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvtier_transport::handshake;
use kvtier_transport::limits::{self, ConnectionLimit};
use kvtier_transport::{
    region_slice, region_slice_mut, BoxFuture, Connection, Descriptor, LocalIov, Notification,
    RegionMemory, RegionTable, RegistrationHandle, RemoteAccess, RemoteIov, Result, Transport,
    TransportConfig, TransportError, WriterId, MAX_NOTIFICATION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

pub mod protocol;

use protocol::{Frame, Status};

const KIND: &str = "tcp";

/// A TCP transport endpoint: a listener serving peers' transfers into this endpoint's
/// registered memory, and the client side of connections to other endpoints.
pub struct TcpTransport {
    inner: Arc<Inner>,
    shutdown: watch::Sender<bool>,
}

struct Inner {
    config: TransportConfig,
    name: String,
    /// Connections served at once.
    limit: ConnectionLimit,
    /// A connection silent this long (milliseconds) is closed.
    idle_ms: AtomicU64,
    addr: SocketAddr,
    regions: RegionTable,
    notify_tx: mpsc::Sender<Notification>,
    notify_rx: tokio::sync::Mutex<mpsc::Receiver<Notification>>,
}

fn io(context: &str, e: std::io::Error) -> TransportError {
    TransportError::Io(format!("{context}: {e}"))
}

impl Inner {
    /// This endpoint's side of the opening exchange.
    fn hello(&self) -> handshake::Hello<'_> {
        handshake::Hello {
            service: handshake::Service::TcpTransport,
            version: protocol::VERSION,
            name: &self.name,
            secret: self.config.auth_token.as_deref(),
        }
    }
}

/// Why reading a frame failed.
enum ReadError {
    /// The stream ended or failed.
    Closed(std::io::Error),
    /// The bytes were not a valid frame.
    Malformed(protocol::FrameError),
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::result::Result<Frame, ReadError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await.map_err(ReadError::Closed)?;
    let len = protocol::body_len(prefix).map_err(ReadError::Malformed)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(ReadError::Closed)?;
    protocol::decode(&body).map_err(ReadError::Malformed)
}

async fn send(w: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> std::io::Result<()> {
    w.write_all(&protocol::encode(frame)).await
}

/// Reads and drops `len` bytes (a refused write's data).
async fn discard(r: &mut (impl AsyncRead + Unpin), mut len: u64) -> std::io::Result<()> {
    let mut sink = vec![0u8; 64 << 10];
    while len > 0 {
        let n = sink.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        r.read_exact(&mut sink[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

/// Acknowledges request `req` as done.
async fn ack_ok(
    w: &mut (impl AsyncWrite + Unpin),
    req: u64,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let ack = Frame::Ack {
        req,
        status: Status::Ok,
    };
    replying(timeout, send(w, &ack)).await
}

/// A server-side write bounded by `timeout` (see [`limits::reply_within`]).
async fn replying<E: std::fmt::Display>(
    timeout: Duration,
    write: impl std::future::Future<Output = std::result::Result<(), E>>,
) -> std::result::Result<(), String> {
    limits::reply_within(timeout, write)
        .await
        .map_err(|e| e.to_string())
}

impl TcpTransport {
    /// Binds a listener on `config.host` (an ephemeral port) and starts serving. Must be
    /// called within a tokio runtime.
    pub fn bind(config: TransportConfig) -> Result<Self> {
        Self::bind_port(config, 0)
    }

    /// Like [`TcpTransport::bind`] on a given port (0 = ephemeral).
    pub fn bind_port(config: TransportConfig, port: u16) -> Result<Self> {
        let std_listener = std::net::TcpListener::bind((config.host.as_str(), port))
            .map_err(|e| io(&format!("bind {}:{port}", config.host), e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| io("listener", e))?;
        let listener = TcpListener::from_std(std_listener).map_err(|e| io("listener", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| io("listener address", e))?;
        handshake::warn_if_exposed(
            handshake::Service::TcpTransport,
            &addr,
            config.auth_token.as_deref(),
        );
        let (notify_tx, notify_rx) = mpsc::channel(1024);
        let n = kvtier_transport::auth::nonce();
        let tag = u32::from_le_bytes([n[0], n[1], n[2], n[3]]);
        let inner = Arc::new(Inner {
            name: format!("tcp://{addr}#{tag:08x}"),
            limit: ConnectionLimit::new(
                format!("tcp transport on {addr}"),
                limits::MAX_CONNECTIONS,
            ),
            idle_ms: AtomicU64::new(limits::DATA_IDLE_TIMEOUT.as_millis() as u64),
            config,
            addr,
            regions: RegionTable::default(),
            notify_tx,
            notify_rx: tokio::sync::Mutex::new(notify_rx),
        });
        let (shutdown, stop) = watch::channel(false);
        tokio::spawn(accept_loop(inner.clone(), listener, stop));
        Ok(TcpTransport { inner, shutdown })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// This endpoint's name (as peers see it).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Closes connections silent for `idle` from now on (default
    /// [`limits::DATA_IDLE_TIMEOUT`]).
    pub fn set_idle_timeout(&self, idle: Duration) {
        self.inner
            .idle_ms
            .store(idle.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some((stream, permit)) = inner.limit.admit_or_refuse(stream, &peer) else {
                        continue;
                    };
                    let inner = inner.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = serve(&inner, stream, stop).await {
                            tracing::warn!("tcp transport {}: connection from {peer} closed: {e}", inner.name);
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("tcp transport {}: accept failed: {e}", inner.name);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves one peer: handshake, then frames until the peer leaves or misbehaves.
async fn serve(
    inner: &Inner,
    mut stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) -> std::result::Result<(), String> {
    let client = handshake::accept_tcp(&mut stream, inner.hello(), inner.config.timeout)
        .await
        .map_err(|e| e.to_string())?;
    let (mut r, mut w) = stream.into_split();
    let timeout = inner.config.timeout;
    // The id this connection's writes are granted under (its first frame names it).
    let mut writer: Option<WriterId> = None;
    loop {
        let idle = Duration::from_millis(inner.idle_ms.load(Ordering::Relaxed));
        let frame = tokio::select! {
            _ = stop.changed() => return Ok(()),
            f = tokio::time::timeout(idle, read_frame(&mut r)) => match f {
                Ok(f) => f,
                Err(_) => {
                    tracing::debug!(
                        "tcp transport {}: {client} silent for {idle:?}; closing",
                        inner.name
                    );
                    return Ok(());
                }
            },
        };
        let frame = match frame {
            Ok(f) => f,
            Err(ReadError::Closed(_)) => return Ok(()),
            Err(ReadError::Malformed(e)) => {
                tracing::error!(
                    "tcp transport {}: malformed frame from {client}: {e}; closing",
                    inner.name
                );
                return Err(format!("malformed frame: {e}"));
            }
        };
        match frame {
            Frame::Write {
                req,
                region,
                offset,
                len,
            } => {
                // `landing` marks the bytes as landing (for write grants) until they have.
                let (memory, landing) = match inner.regions.peer_write(
                    kvtier_transport::RegionId(region),
                    offset,
                    len,
                    writer,
                ) {
                    Ok(m) => m,
                    Err(e @ TransportError::Forbidden { .. }) => {
                        // In bounds but not this connection's to write: the bytes that
                        // follow are read and dropped, so the stream stays in step.
                        tracing::warn!(
                            "tcp transport {}: refused a write from {client}: {e}",
                            inner.name
                        );
                        match tokio::time::timeout(timeout, discard(&mut r, len)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                return Err(format!("write data from {client} cut short: {e}"))
                            }
                            Err(_) => {
                                return Err(format!(
                                    "write data from {client} stalled past {timeout:?}"
                                ))
                            }
                        }
                        let TransportError::Forbidden { reason, .. } = e else {
                            unreachable!("matched above")
                        };
                        let refusal = Frame::Ack {
                            req,
                            status: Status::Forbidden { reason },
                        };
                        replying(timeout, send(&mut w, &refusal)).await?;
                        continue;
                    }
                    Err(e) => {
                        // The data that follows cannot be placed: refuse and drop the stream.
                        let TransportError::OutOfBounds { region_len, .. } = e else {
                            return Err(e.to_string());
                        };
                        let status = Status::OutOfBounds { region_len };
                        let refusal = Frame::Ack { req, status };
                        let _ = replying(timeout, send(&mut w, &refusal)).await;
                        return Err(format!("write refused: {e}"));
                    }
                };
                // SAFETY: the range was checked against the region; the region's owner does
                // not touch bytes a peer is writing (RegionMemory's contract), and `memory`
                // keeps them allocated until this read ends.
                let dst =
                    unsafe { region_slice_mut(memory.as_ref(), offset as usize, len as usize) }
                        .ok_or("range check failed")?;
                match tokio::time::timeout(timeout, r.read_exact(dst)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("write data from {client} cut short: {e}")),
                    Err(_) => {
                        return Err(format!("write data from {client} stalled past {timeout:?}"))
                    }
                }
                // Landed: before the acknowledgement, so a commit that follows it never
                // waits for this write.
                drop(landing);
                ack_ok(&mut w, req, timeout).await?;
            }
            Frame::Read {
                req,
                region,
                offset,
                len,
            } => {
                match inner
                    .regions
                    .peer_read(kvtier_transport::RegionId(region), offset, len)
                {
                    Ok(memory) => {
                        // SAFETY: checked range; see the write case.
                        let src =
                            unsafe { region_slice(memory.as_ref(), offset as usize, len as usize) }
                                .ok_or("range check failed")?;
                        let head = Frame::Data {
                            req,
                            status: Status::Ok,
                            len,
                        };
                        replying(timeout, async {
                            send(&mut w, &head).await?;
                            w.write_all(src).await
                        })
                        .await?;
                    }
                    Err(
                        e @ (TransportError::OutOfBounds { .. } | TransportError::Forbidden { .. }),
                    ) => {
                        let status = match e {
                            TransportError::OutOfBounds { region_len, .. } => {
                                Status::OutOfBounds { region_len }
                            }
                            TransportError::Forbidden { reason, .. } => {
                                tracing::warn!(
                                    "tcp transport {}: refused a read from {client}: {e}",
                                    inner.name
                                );
                                Status::Forbidden { reason }
                            }
                            _ => unreachable!("matched above"),
                        };
                        let refusal = Frame::Data {
                            req,
                            status,
                            len: 0,
                        };
                        replying(timeout, send(&mut w, &refusal)).await?;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            Frame::Writer { id } if writer.is_none() => writer = Some(WriterId(id)),
            Frame::Notify { req, message } => {
                if message.len() > MAX_NOTIFICATION {
                    return Err(format!(
                        "notification of {} bytes from {client}",
                        message.len()
                    ));
                }
                let n = Notification {
                    peer: client.clone(),
                    message,
                };
                if tokio::time::timeout(timeout, inner.notify_tx.send(n))
                    .await
                    .is_err()
                {
                    return Err("notification queue full past the timeout".into());
                }
                ack_ok(&mut w, req, timeout).await?;
            }
            other => {
                tracing::error!(
                    "tcp transport {}: unexpected {other:?} from {client}; closing",
                    inner.name
                );
                return Err(format!("unexpected frame {other:?}"));
            }
        }
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn register(
        &self,
        memory: Arc<dyn RegionMemory>,
        access: RemoteAccess,
    ) -> Result<RegistrationHandle> {
        let id = self.inner.regions.insert(memory.clone(), access);
        let inner = Arc::downgrade(&self.inner);
        Ok(RegistrationHandle::new(id, memory, move || {
            if let Some(inner) = inner.upgrade() {
                inner.regions.remove(id);
            }
        }))
    }

    fn enforces_write_grants(&self) -> bool {
        true
    }

    fn registered_regions(&self) -> usize {
        self.inner.regions.len()
    }

    fn local_descriptor(&self) -> Result<Vec<u8>> {
        Ok(Descriptor {
            kind: KIND.into(),
            name: self.inner.name.clone(),
            regions: self.inner.regions.infos(|_| Vec::new()),
            body: self.inner.addr.to_string().into_bytes(),
        }
        .encode())
    }

    fn connect<'a>(&'a self, descriptor: &'a [u8]) -> BoxFuture<'a, Result<Box<dyn Connection>>> {
        Box::pin(async move {
            let conn = TcpConnection::open(&self.inner, descriptor).await?;
            Ok(Box::new(conn) as Box<dyn Connection>)
        })
    }

    fn recv_notification(&self, timeout: Duration) -> BoxFuture<'_, Result<Notification>> {
        Box::pin(kvtier_transport::recv_queued(
            &self.inner.notify_rx,
            timeout,
        ))
    }
}

/// A request waiting for the peer's answer.
enum Pending {
    /// A write (naming its remote range) or a notification.
    Ack(oneshot::Sender<Result<()>>, Option<RemoteIov>),
    Read {
        remote: RemoteIov,
        memory: Arc<dyn RegionMemory>,
        offset: usize,
        len: u64,
        done: oneshot::Sender<Result<()>>,
    },
}

/// Local bytes that follow a frame on the stream.
struct Payload {
    memory: Arc<dyn RegionMemory>,
    offset: usize,
    len: usize,
}

/// A request to send: its frame, the bytes that follow it, and who waits for the answer.
struct Request {
    frame: Frame,
    payload: Option<Payload>,
    pending: Pending,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Why the connection is unusable, once it is.
    dead: Mutex<Option<Dead>>,
    /// A second handle on the socket, to shut it down when the connection is given up:
    /// the peer then stops placing bytes of an abandoned write at once.
    socket: std::net::TcpStream,
}

/// Why a connection became unusable.
struct Dead {
    reason: String,
    /// The peer closed it while no request was waiting (its idle limit, or a restart): a
    /// fresh connection may take its place.
    idle: bool,
}

impl Shared {
    /// Gives the connection up: every waiting request fails with `reason`.
    fn fail_all(&self, reason: &str, peer: &str) {
        self.die(reason, peer, false);
    }

    /// Gives the connection up; `closed_by_peer` when the peer closed the stream.
    fn die(&self, reason: &str, peer: &str, closed_by_peer: bool) {
        let pending: Vec<Pending> = {
            let mut pending = self.pending.lock().expect("lock");
            let idle = closed_by_peer && pending.is_empty();
            let mut dead = self.dead.lock().expect("lock");
            if dead.is_none() {
                *dead = Some(Dead {
                    reason: reason.to_string(),
                    idle,
                });
            }
            pending.drain().map(|(_, p)| p).collect()
        };
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        for p in pending {
            let err = TransportError::PeerGone {
                peer: peer.into(),
                reason: reason.into(),
            };
            match p {
                Pending::Ack(tx, _) | Pending::Read { done: tx, .. } => {
                    let _ = tx.send(Err(err));
                }
            }
        }
    }
}

/// A connection to a TCP peer. Replaced by a fresh stream (same writer id) when the peer
/// closed it while idle, or before a use after half the peer's idle limit of silence.
struct TcpConnection {
    /// How to open a stream to the peer.
    dialer: Dialer,
    remote: Descriptor,
    /// The current stream; held while a batch of frames is sent.
    live: tokio::sync::Mutex<Live>,
    /// When a request last went out.
    last_used: Mutex<std::time::Instant>,
    next_req: AtomicU64,
}

/// Everything needed to open a stream of a [`TcpConnection`].
struct Dialer {
    peer: String,
    /// The peer's listening address.
    addr: String,
    /// Our side of the opening: our name and secret.
    local_name: String,
    secret: Option<String>,
    /// The id the peer's write grants know the connection by (kept across streams).
    writer_id: WriterId,
    timeout: Duration,
}

/// One open stream of a [`TcpConnection`].
struct Live {
    writer: OwnedWriteHalf,
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Dialer {
    /// Opens a stream to the peer: connect, the opening exchange, our writer id.
    async fn dial(&self) -> Result<Live> {
        let (peer, addr, timeout) = (&self.peer, &self.addr, self.timeout);
        let timed_out = |op| TransportError::Timeout { op, after: timeout };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out("connect"))?
            .map_err(|e| TransportError::PeerGone {
                peer: peer.clone(),
                reason: format!("connect {addr}: {e}"),
            })?;
        let _ = stream.set_nodelay(true);
        let gone_io = |e: std::io::Error| TransportError::Io(format!("socket to {peer}: {e}"));
        let std_stream = stream.into_std().map_err(gone_io)?;
        let socket = std_stream.try_clone().map_err(gone_io)?;
        let mut stream = TcpStream::from_std(std_stream).map_err(gone_io)?;
        let hello = handshake::Hello {
            service: handshake::Service::TcpTransport,
            version: protocol::VERSION,
            name: &self.local_name,
            secret: self.secret.as_deref(),
        };
        handshake::connect(&mut stream, addr, hello, timeout).await?;
        let writer = Frame::Writer {
            id: self.writer_id.0,
        };
        tokio::time::timeout(timeout, send(&mut stream, &writer))
            .await
            .map_err(|_| timed_out("connect"))?
            .map_err(|e| TransportError::PeerGone {
                peer: peer.clone(),
                reason: format!("send writer id: {e}"),
            })?;
        let (r, w) = stream.into_split();
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            socket,
        });
        let reader = tokio::spawn(read_answers(r, shared.clone(), peer.clone()));
        Ok(Live {
            writer: w,
            shared,
            reader,
        })
    }
}

impl TcpConnection {
    async fn open(inner: &Inner, descriptor: &[u8]) -> Result<TcpConnection> {
        let remote = Descriptor::decode(descriptor, KIND)?;
        let addr = std::str::from_utf8(&remote.body)
            .map_err(|_| TransportError::Protocol("tcp descriptor address is not UTF-8".into()))?
            .to_string();
        let dialer = Dialer {
            peer: remote.name.clone(),
            addr,
            local_name: inner.name.clone(),
            secret: inner.config.auth_token.clone(),
            writer_id: WriterId::random(),
            timeout: inner.config.timeout,
        };
        let live = dialer.dial().await?;
        Ok(TcpConnection {
            dialer,
            remote,
            live: tokio::sync::Mutex::new(live),
            last_used: Mutex::new(std::time::Instant::now()),
            next_req: AtomicU64::new(1),
        })
    }

    /// Makes `live` usable for the next request: a stream the peer closed while idle, or
    /// one silent long enough that the peer may close it any moment, is replaced; one
    /// that failed stays failed.
    async fn ready(&self, live: &mut Live) -> Result<()> {
        let stale = self.last_used.lock().expect("lock").elapsed() >= limits::DATA_IDLE_TIMEOUT / 2
            && live.shared.pending.lock().expect("lock").is_empty();
        let replace = match &*live.shared.dead.lock().expect("lock") {
            Some(Dead {
                idle: false,
                reason,
            }) => {
                return Err(TransportError::PeerGone {
                    peer: self.dialer.peer.clone(),
                    reason: reason.clone(),
                })
            }
            Some(Dead { idle: true, .. }) => true,
            None => stale,
        };
        if replace {
            *live = self.dialer.dial().await?;
        }
        *self.last_used.lock().expect("lock") = std::time::Instant::now();
        Ok(())
    }

    /// A pipelined batch of `Write` frames (each followed by its bytes) or `Read` frames,
    /// after checking every range.
    async fn transfer(
        &self,
        op: &'static str,
        local: &[LocalIov<'_>],
        remote: &[RemoteIov],
    ) -> Result<()> {
        self.remote.check_transfer(local, remote)?;
        let mut requests = Vec::with_capacity(local.len());
        let mut receivers = Vec::with_capacity(local.len());
        for (l, r) in local.iter().zip(remote) {
            let (req, region, offset, len) = (
                self.next_req.fetch_add(1, Ordering::Relaxed),
                r.region.0,
                r.offset,
                r.len,
            );
            let (tx, rx) = oneshot::channel();
            let memory = l.region.memory().clone();
            requests.push(if op == "write" {
                Request {
                    frame: Frame::Write {
                        req,
                        region,
                        offset,
                        len,
                    },
                    payload: Some(Payload {
                        memory,
                        offset: l.offset,
                        len: l.len,
                    }),
                    pending: Pending::Ack(tx, Some(*r)),
                }
            } else {
                Request {
                    frame: Frame::Read {
                        req,
                        region,
                        offset,
                        len,
                    },
                    payload: None,
                    pending: Pending::Read {
                        remote: *r,
                        memory,
                        offset: l.offset,
                        len,
                        done: tx,
                    },
                }
            });
            receivers.push(rx);
        }
        self.exchange(op, requests, receivers).await
    }

    /// Sends `frames` (each with its data, if any) and waits for every answer.
    async fn exchange(
        &self,
        op: &'static str,
        requests: Vec<Request>,
        receivers: Vec<oneshot::Receiver<Result<()>>>,
    ) -> Result<()> {
        // Once every frame of a batch without reads is on the stream, a caller that stops
        // waiting for the answers harms no one: they arrive and are dropped. Until then
        // (half a frame sent), or while the peer's data for a read may still land in the
        // caller's memory, dropping the request must give the connection up.
        let reads = requests
            .iter()
            .any(|r| matches!(r.frame, Frame::Read { .. }));
        let sent_all = std::sync::atomic::AtomicBool::new(false);
        let mut live = self.live.lock().await;
        self.ready(&mut live).await?;
        let shared = live.shared.clone();
        let work = async {
            {
                // The stream is ours while the batch goes out.
                let mut live = live;
                let w = &mut live.writer;
                for Request {
                    frame,
                    payload,
                    pending,
                } in requests
                {
                    let req = match &frame {
                        Frame::Write { req, .. }
                        | Frame::Read { req, .. }
                        | Frame::Notify { req, .. } => *req,
                        _ => unreachable!("only requests are sent"),
                    };
                    shared.pending.lock().expect("lock").insert(req, pending);
                    let sent = async {
                        w.write_all(&protocol::encode(&frame)).await?;
                        if let Some(p) = &payload {
                            // SAFETY: the iov was bounds-checked when built; the caller does
                            // not write the bytes it is sending (RegionMemory's contract).
                            let src = unsafe { region_slice(p.memory.as_ref(), p.offset, p.len) }
                                .expect("checked local iov");
                            w.write_all(src).await?;
                        }
                        std::io::Result::Ok(())
                    };
                    if let Err(e) = sent.await {
                        shared.fail_all(&format!("send failed: {e}"), &self.dialer.peer);
                        return Err(TransportError::PeerGone {
                            peer: self.dialer.peer.clone(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            sent_all.store(!reads, Ordering::Release);
            for rx in receivers {
                match rx.await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(TransportError::PeerGone {
                            peer: self.dialer.peer.clone(),
                            reason: "connection closed".into(),
                        })
                    }
                }
            }
            Ok(())
        };
        // A caller that drops this future mid-request leaves half a frame on the stream
        // and a write the peer is still placing: give the connection up.
        let mut abandoned = Abandoned {
            shared: &shared,
            peer: &self.dialer.peer,
            armed: true,
            harmless: &sent_all,
        };
        let outcome = tokio::time::timeout(self.dialer.timeout, work).await;
        abandoned.armed = false;
        match outcome {
            Ok(r) => r,
            Err(_) => {
                // The stream is in an unknown state: no later request may use it.
                shared.fail_all(&format!("{op} timed out"), &self.dialer.peer);
                Err(TransportError::Timeout {
                    op,
                    after: self.dialer.timeout,
                })
            }
        }
    }
}

/// Fails the connection if dropped while armed, unless the request had reached a point
/// where abandoning it is harmless (see [`TcpConnection::exchange`]).
struct Abandoned<'a> {
    shared: &'a Shared,
    peer: &'a str,
    armed: bool,
    harmless: &'a std::sync::atomic::AtomicBool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed && !self.harmless.load(Ordering::Acquire) {
            self.shared
                .fail_all("request abandoned by its caller", self.peer);
        }
    }
}

/// Reads the peer's answers and completes the requests waiting for them.
async fn read_answers(mut r: OwnedReadHalf, shared: Arc<Shared>, peer: String) {
    // Why the stream ended, and whether the peer closed it.
    let (reason, closed) = loop {
        let frame = match read_frame(&mut r).await {
            Ok(f) => f,
            Err(ReadError::Closed(e)) => break (format!("connection closed: {e}"), true),
            Err(ReadError::Malformed(e)) => {
                tracing::error!("tcp transport: malformed answer from {peer}: {e}; closing");
                break (format!("malformed answer: {e}"), false);
            }
        };
        let (req, status, data_len) = match frame {
            Frame::Ack { req, status } => (req, status, None),
            Frame::Data { req, status, len } => (req, status, Some(len)),
            other => {
                tracing::error!("tcp transport: unexpected {other:?} from {peer}; closing");
                break (format!("unexpected frame {other:?}"), false);
            }
        };
        let Some(pending) = shared.pending.lock().expect("lock").remove(&req) else {
            break (format!("answer to unknown request {req}"), false);
        };
        // The peer's refusal of `remote`, as an error naming the range.
        let refused = |remote: Option<RemoteIov>, status| {
            let r = remote.unwrap_or(RemoteIov {
                region: kvtier_transport::RegionId(0),
                offset: 0,
                len: 0,
            });
            match status {
                Status::Forbidden { reason } => TransportError::Forbidden {
                    region: r.region,
                    offset: r.offset,
                    len: r.len,
                    reason,
                },
                Status::OutOfBounds { region_len } => TransportError::OutOfBounds {
                    region: r.region,
                    offset: r.offset,
                    len: r.len,
                    region_len,
                },
                Status::Ok => unreachable!("only refusals"),
            }
        };
        match (pending, status, data_len) {
            (Pending::Ack(tx, _), Status::Ok, None) => {
                let _ = tx.send(Ok(()));
            }
            (Pending::Ack(tx, remote), status, None) => {
                let _ = tx.send(Err(refused(remote, status)));
            }
            (
                Pending::Read {
                    memory,
                    offset,
                    len,
                    done,
                    ..
                },
                Status::Ok,
                Some(n),
            ) if n == len => {
                // SAFETY: the local iov was bounds-checked; the caller awaits this read and
                // does not touch the destination meanwhile; `memory` keeps it allocated.
                let dst = unsafe { region_slice_mut(memory.as_ref(), offset, len as usize) }
                    .expect("checked local iov");
                if let Err(e) = r.read_exact(dst).await {
                    let _ = done.send(Err(TransportError::PeerGone {
                        peer: peer.clone(),
                        reason: e.to_string(),
                    }));
                    break (format!("read data cut short: {e}"), false);
                }
                let _ = done.send(Ok(()));
            }
            (Pending::Read { done, remote, .. }, status, Some(0)) if status != Status::Ok => {
                let _ = done.send(Err(refused(Some(remote), status)));
            }
            (_, status, len) => {
                break (
                    format!("answer {status:?}/{len:?} does not match request {req}"),
                    false,
                )
            }
        }
    };
    shared.die(&reason, &peer, closed);
}

impl Connection for TcpConnection {
    fn peer(&self) -> &str {
        &self.dialer.peer
    }

    fn writer_id(&self) -> Option<WriterId> {
        Some(self.dialer.writer_id)
    }

    fn write<'a>(
        &'a self,
        local: &'a [LocalIov<'a>],
        remote: &'a [RemoteIov],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.transfer("write", local, remote))
    }

    fn read<'a>(
        &'a self,
        local: &'a [LocalIov<'a>],
        remote: &'a [RemoteIov],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.transfer("read", local, remote))
    }

    fn notify<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if message.len() > MAX_NOTIFICATION {
                return Err(TransportError::Protocol(format!(
                    "notification of {} bytes exceeds {MAX_NOTIFICATION}",
                    message.len()
                )));
            }
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            let frame = Frame::Notify {
                req,
                message: message.to_vec(),
            };
            let request = Request {
                frame,
                payload: None,
                pending: Pending::Ack(tx, None),
            };
            self.exchange("notify", vec![request], vec![rx]).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_transport::handshake::HandshakeError;
    use kvtier_transport::HostBuffer;

    fn make(config: TransportConfig) -> Result<Box<dyn Transport>> {
        Ok(Box::new(TcpTransport::bind(config)?))
    }

    kvtier_transport::conformance_tests!(make);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_secret_is_refused_right_secret_accepted() {
        let with = |token: Option<&str>| TransportConfig {
            auth_token: token.map(str::to_string),
            ..TransportConfig::default()
        };
        let server = TcpTransport::bind(with(Some("s3cret"))).unwrap();
        let d = server.local_descriptor().unwrap();
        for bad in [None, Some("guess")] {
            let client = TcpTransport::bind(with(bad)).unwrap();
            let r = client.connect(&d).await;
            assert!(
                matches!(
                    r,
                    Err(TransportError::Handshake(
                        HandshakeError::Refused { .. } | HandshakeError::Unproven { .. }
                    ))
                ),
                "{bad:?}: {:?}",
                r.err()
            );
        }
        // A client that has the secret refuses a server that does not prove it.
        let open = TcpTransport::bind(with(None)).unwrap();
        let client = TcpTransport::bind(with(Some("s3cret"))).unwrap();
        let r = client.connect(&open.local_descriptor().unwrap()).await;
        assert!(
            matches!(
                r,
                Err(TransportError::Handshake(HandshakeError::Unproven { .. }))
            ),
            "{:?}",
            r.err()
        );
        let client = TcpTransport::bind(with(Some("s3cret"))).unwrap();
        let conn = client.connect(&d).await.unwrap();
        conn.notify(b"hi").await.unwrap();
        assert_eq!(
            server
                .recv_notification(Duration::from_secs(5))
                .await
                .unwrap()
                .message,
            b"hi"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_write_gives_the_connection_up() {
        let (a, b) = (
            TcpTransport::bind(TransportConfig::default()).unwrap(),
            TcpTransport::bind(TransportConfig::default()).unwrap(),
        );
        let size = 256 << 20;
        let src = a
            .register(Arc::new(HostBuffer::new(size)), RemoteAccess::ReadWrite)
            .unwrap();
        let dst = b
            .register(Arc::new(HostBuffer::new(size)), RemoteAccess::ReadWrite)
            .unwrap();
        let conn = a.connect(&b.local_descriptor().unwrap()).await.unwrap();
        let remote = [RemoteIov {
            region: dst.id(),
            offset: 0,
            len: size as u64,
        }];
        // The data stream is connected on first use: connect it now, so the write below is
        // dropped while its frame is going out (dropped while still connecting, it would
        // leave nothing on the stream, and the connection would rightly stay usable).
        let small = [src.iov(0, 4096).unwrap()];
        let first_page = [RemoteIov {
            region: dst.id(),
            offset: 0,
            len: 4096,
        }];
        conn.write(&small, &first_page).await.unwrap();
        // The caller gives up mid-transfer: the future is dropped.
        let iov = [src.iov(0, size).unwrap()];
        let r = tokio::time::timeout(Duration::from_millis(1), conn.write(&iov, &remote)).await;
        assert!(r.is_err(), "256 MiB written in under 1 ms?");
        // Half a frame may be on the stream: the connection must refuse further use.
        let r = conn.write(&small, &first_page).await;
        assert!(matches!(r, Err(TransportError::PeerGone { .. })), "{r:?}");
        // A new connection works.
        let conn = a.connect(&b.local_descriptor().unwrap()).await.unwrap();
        conn.write(&small, &first_page).await.unwrap();
    }

    /// A hand-driven connection to `server`, past the handshake (no secret).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_connections_are_closed_and_clients_reconnect_with_their_writer_id() {
        use kvtier_transport::WriteGrants;
        use tokio::io::AsyncReadExt;
        let (a, b) = (
            TcpTransport::bind(TransportConfig::default()).unwrap(),
            TcpTransport::bind(TransportConfig::default()).unwrap(),
        );
        b.set_idle_timeout(Duration::from_millis(300));
        let src = Arc::new(HostBuffer::new(4096));
        src.fill_pattern(9);
        let src_reg = a.register(src.clone(), RemoteAccess::LocalOnly).unwrap();
        let grants = WriteGrants::new(4096, 1);
        let dst = Arc::new(HostBuffer::new(4096));
        let dst_reg = b
            .register(dst.clone(), RemoteAccess::GrantedWrites(grants.clone()))
            .unwrap();
        let conn = a.connect(&b.local_descriptor().unwrap()).await.unwrap();
        grants.grant(conn.writer_id().unwrap(), [0]);
        let remote = [RemoteIov {
            region: dst_reg.id(),
            offset: 0,
            len: 4096,
        }];
        conn.write(&[src_reg.iov(0, 4096).unwrap()], &remote)
            .await
            .unwrap();
        // The server closes the silent stream; the next write goes out on a fresh one
        // under the same writer id, so the grant still holds.
        tokio::time::sleep(Duration::from_millis(900)).await;
        src.fill_pattern(10);
        conn.write(&[src_reg.iov(0, 4096).unwrap()], &remote)
            .await
            .unwrap();
        assert_eq!(dst.digest(0, 4096), src.digest(0, 4096));
        // A raw peer that says nothing after the opening is closed within the limit.
        let mut raw = raw_client(&b).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    }

    async fn raw_client(server: &TcpTransport) -> TcpStream {
        let mut raw = TcpStream::connect(server.local_addr()).await.unwrap();
        let hello = handshake::Hello {
            service: handshake::Service::TcpTransport,
            version: protocol::VERSION,
            name: "raw",
            secret: None,
        };
        handshake::connect(&mut raw, "server", hello, Duration::from_secs(5))
            .await
            .unwrap();
        raw
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_stops_reading_answers_is_dropped() {
        let len = 64usize << 20;
        let config = TransportConfig {
            timeout: Duration::from_millis(500),
            ..TransportConfig::default()
        };
        let server = TcpTransport::bind(config).unwrap();
        let mem = Arc::new(HostBuffer::new(len));
        let reg = server
            .register(mem.clone(), RemoteAccess::ReadWrite)
            .unwrap();
        let mut raw = raw_client(&server).await;
        // Ask for the whole region, then read nothing for a while: the socket buffers fill
        // and the server's write waits for us.
        let read = Frame::Read {
            req: 1,
            region: reg.id().0,
            offset: 0,
            len: len as u64,
        };
        send(&mut raw, &read).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The server gave up on us: what it had buffered, then the end of the stream.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut got))
            .await
            .expect("the server closed the connection");
        assert!(
            got.len() < len,
            "{} of {len} bytes: the server never gave up",
            got.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_frames_close_only_that_connection() {
        let server = TcpTransport::bind(TransportConfig::default()).unwrap();
        let mem = Arc::new(HostBuffer::new(4096));
        let _reg = server
            .register(mem.clone(), RemoteAccess::ReadWrite)
            .unwrap();
        // A raw client that completes the handshake, then sends garbage.
        let mut raw = raw_client(&server).await;
        raw.write_all(&[5, 0, 0, 0, 0xee, 1, 2, 3, 4])
            .await
            .unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "server closed the connection");
        // Bytes that do not open a kvtier handshake are refused the same way.
        let mut raw2 = TcpStream::connect(server.local_addr()).await.unwrap();
        raw2.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), raw2.read_to_end(&mut rest))
            .await
            .expect("closed at once, not at the handshake timeout");
        // End of stream, or a reset (what we sent was left unread).
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        // The endpoint still serves others.
        let client = TcpTransport::bind(TransportConfig::default()).unwrap();
        let conn = client
            .connect(&server.local_descriptor().unwrap())
            .await
            .unwrap();
        conn.notify(b"still here").await.unwrap();
    }
}

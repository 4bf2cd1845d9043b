//! Transfer-done notifications from senders to the proxy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::control::{self, ControlConn};
use super::protocol::Message;
use super::PdError;
use super::Result;
use kvtier_transport::handshake::Service;
use kvtier_transport::limits::{self, reply_within, ConnectionLimit};

/// A sender's report that a request's KV reached the receiver (or did not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferDone {
    /// The request.
    pub req_id: String,
    /// Whether the transfer succeeded.
    pub ok: bool,
    /// The error when it did not.
    pub error: Option<String>,
    /// Tokens sent.
    pub tokens: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Microseconds the transfer took.
    pub elapsed_us: u64,
}

/// How long the proxy waits for a sender to complete the handshake or read an ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an unclaimed notification is kept.
const KEEP: Duration = Duration::from_secs(600);
/// Most unclaimed notifications kept (the oldest go first past it).
const MAX_UNCLAIMED: usize = 65_536;

/// Unclaimed notifications, each with when and in which order it was posted.
#[derive(Default)]
struct Board {
    done: Mutex<HashMap<String, (TransferDone, Instant, u64)>>,
    posted: Notify,
    next: std::sync::atomic::AtomicU64,
}

impl Board {
    /// Posts `done` for `req_id`: unclaimed notices older than [`KEEP`] go, and past
    /// [`MAX_UNCLAIMED`] the oldest, so senders cannot grow the board without bound.
    fn post(&self, req_id: String, done: TransferDone) {
        let mut map = self.done.lock().expect("lock");
        if map.len() >= MAX_UNCLAIMED {
            map.retain(|_, (_, at, _)| at.elapsed() < KEEP);
        }
        if map.len() >= MAX_UNCLAIMED {
            // The oldest sixteenth in one pass, so a full board costs one scan per
            // 4,096 posts, not one per post.
            let mut seqs: Vec<u64> = map.values().map(|(_, _, seq)| *seq).collect();
            let cut = MAX_UNCLAIMED / 16;
            let (_, &mut bound, _) = seqs.select_nth_unstable(cut);
            map.retain(|_, (_, _, seq)| *seq >= bound);
        }
        let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        map.insert(req_id, (done, Instant::now(), seq));
    }
}

/// The proxy's listener for senders' transfer-done notifications.
pub struct ProxyListener {
    board: Arc<Board>,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProxyListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ProxyListener {
    /// Listens on `host:port` (0 = ephemeral); senders must know `auth_token` if set.
    pub async fn bind(host: &str, port: u16, auth_token: Option<String>) -> Result<ProxyListener> {
        let listener = TcpListener::bind((host, port))
            .await
            .map_err(|e| PdError::Listen {
                op: "bind proxy notification port",
                addr: format!("{host}:{port}"),
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| PdError::Listen {
            op: "query proxy notification port",
            addr: format!("{host}:{port}"),
            source: e,
        })?;
        kvtier_transport::handshake::warn_if_exposed(
            Service::PdProxy,
            &addr,
            auth_token.as_deref(),
        );
        let board = Arc::new(Board::default());
        let task = tokio::spawn(accept_loop(listener, board.clone(), auth_token));
        Ok(ProxyListener { board, addr, task })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Waits at most `timeout` for the notification of `req_id`.
    pub async fn wait(&self, req_id: &str, timeout: Duration) -> Result<TransferDone> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let posted = self.board.posted.notified();
            tokio::pin!(posted);
            posted.as_mut().enable();
            if let Some((done, ..)) = self.board.done.lock().expect("lock").remove(req_id) {
                return Ok(done);
            }
            if tokio::time::timeout_at(deadline, posted).await.is_err() {
                return Err(PdError::Timeout {
                    what: format!(
                        "the prefiller's transfer-done notification for request {req_id}"
                    ),
                    after: timeout,
                });
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, board: Arc<Board>, secret: Option<String>) {
    let where_ = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let limit = ConnectionLimit::new(
        format!("proxy notification port {where_}"),
        limits::MAX_CONNECTIONS,
    );
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some((stream, permit)) = limit.admit_or_refuse(stream, &peer) else {
            continue;
        };
        let (board, secret) = (board.clone(), secret.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let accepted = ControlConn::accept(
                stream,
                Service::PdProxy,
                "kvtier proxy",
                secret.as_deref(),
                ACK_TIMEOUT,
            )
            .await;
            let mut conn = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("proxy notifications: {e}");
                    return;
                }
            };
            loop {
                match conn.recv_idle(limits::CONTROL_IDLE_TIMEOUT).await {
                    Ok(Message::TransferDone {
                        req_id,
                        ok,
                        error,
                        tokens,
                        bytes,
                        elapsed_us,
                    }) => {
                        let done = TransferDone {
                            req_id: req_id.clone(),
                            ok,
                            error: (!error.is_empty()).then_some(error),
                            tokens,
                            bytes,
                            elapsed_us,
                        };
                        board.post(req_id.clone(), done);
                        board.posted.notify_waiters();
                        let ack = Message::Received { req_id };
                        if let Err(e) = reply_within(ACK_TIMEOUT, conn.send(&ack)).await {
                            tracing::warn!("proxy notifications: cannot acknowledge: {e}");
                            return;
                        }
                    }
                    Ok(other) => {
                        tracing::error!(
                            "proxy notifications: unexpected {other:?} from {}; closing",
                            conn.peer()
                        );
                        return;
                    }
                    Err(e) if e.is_closed() => return,
                    Err(e) => {
                        tracing::error!("proxy notifications: {e}; closing");
                        return;
                    }
                }
            }
        });
    }
}

/// Idle connections to the proxy a sender keeps.
const MAX_IDLE: usize = 4;

/// The sender's side: connections to the proxy, opened when needed; a notification takes
/// one for its request and answer, so no lock is held while the network is waited for.
pub(crate) struct ProxyNotifier {
    addr: String,
    name: String,
    secret: Option<String>,
    timeout: Duration,
    idle: Mutex<Vec<ControlConn>>,
}

impl ProxyNotifier {
    pub fn new(addr: String, name: String, secret: Option<String>, timeout: Duration) -> Self {
        ProxyNotifier {
            addr,
            name,
            secret,
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `done` and waits for the proxy's acknowledgement, on a fresh connection if an
    /// idle one turns out broken (a write into a connection the proxy already closed can
    /// succeed locally: only the acknowledgement proves delivery).
    pub async fn send(&self, done: &TransferDone) -> Result<(), PdError> {
        let msg = Message::TransferDone {
            req_id: done.req_id.clone(),
            ok: done.ok,
            error: done.error.clone().unwrap_or_default(),
            tokens: done.tokens,
            bytes: done.bytes,
            elapsed_us: done.elapsed_us,
        };
        let idle = self.idle.lock().expect("lock").pop();
        let reused = idle.is_some();
        let mut conn = match idle {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let mut acked = self.request(&mut conn, &msg, &done.req_id).await;
        if let (Err(e), true) = (&acked, reused) {
            tracing::debug!("proxy connection broke ({e}); reconnecting");
            conn = self.connect().await?;
            acked = self.request(&mut conn, &msg, &done.req_id).await;
        }
        acked?;
        let mut idle = self.idle.lock().expect("lock");
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<ControlConn, PdError> {
        ControlConn::connect(
            &self.addr,
            Service::PdProxy,
            &self.name,
            self.secret.as_deref(),
            self.timeout,
        )
        .await
        .map_err(PdError::from)
    }

    async fn request(
        &self,
        conn: &mut ControlConn,
        msg: &Message,
        req_id: &str,
    ) -> Result<(), PdError> {
        match conn.request(msg, self.timeout).await? {
            Message::Received { req_id: r } if r == req_id => Ok(()),
            other => Err(control::unexpected(conn, &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(req_id: &str) -> TransferDone {
        TransferDone {
            req_id: req_id.into(),
            ok: true,
            error: None,
            tokens: 1,
            bytes: 1,
            elapsed_us: 1,
        }
    }

    /// Notices sent at once each take a connection of their own (no lock is held across
    /// connecting or waiting for an ack): eight concurrent sends leave the pool full,
    /// where sends serialised on one connection would leave one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_notices_do_not_wait_for_each_other() {
        let listener = ProxyListener::bind("127.0.0.1", 0, Some("s".into()))
            .await
            .unwrap();
        let notifier = ProxyNotifier::new(
            listener.local_addr().to_string(),
            "sender".into(),
            Some("s".into()),
            Duration::from_secs(10),
        );
        let sends = (0..8).map(|i| {
            let notifier = &notifier;
            async move { notifier.send(&done(&format!("r{i}"))).await }
        });
        for r in futures_util::future::join_all(sends).await {
            r.unwrap();
        }
        assert_eq!(notifier.idle.lock().unwrap().len(), MAX_IDLE);
        for i in 0..8 {
            let got = listener
                .wait(&format!("r{i}"), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(got, done(&format!("r{i}")));
        }
    }

    #[test]
    fn the_board_keeps_at_most_its_cap_dropping_the_oldest() {
        let board = Board::default();
        for i in 0..MAX_UNCLAIMED + 10 {
            board.post(format!("r{i}"), done(&format!("r{i}")));
        }
        let map = board.done.lock().unwrap();
        assert!(map.len() <= MAX_UNCLAIMED && map.len() > MAX_UNCLAIMED * 15 / 16);
        // The oldest sixteenth went; the newest are all there.
        assert!(
            !map.contains_key("r0") && !map.contains_key(&format!("r{}", MAX_UNCLAIMED / 16 - 1))
        );
        for i in MAX_UNCLAIMED / 16 + 1..MAX_UNCLAIMED + 10 {
            assert!(map.contains_key(&format!("r{i}")), "r{i}");
        }
    }
}

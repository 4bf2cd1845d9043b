//! The sender (prefiller) side: stages chunks in a registered buffer, writes them
//! one-sided into the receiver's pages, commits, and tells the proxy.
//!
//! One send, step by step:
//! 1. One `Alloc` for the whole request: the receiver grants every page at once or waits
//!    for room, so concurrent senders never each hold part of a full buffer (a full
//!    decoder delays a request that fits; it never fails it).
//! 2. Waves of at most [`WAVE_BYTES`] (and half the staging buffer): each wave's chunks are
//!    gathered into staging pages and checksummed, then written one-sided by a task of its
//!    own while the next wave is gathered, so copying hides behind the wire. KV that lives
//!    in memory registered with the sender's transport ([`PdSender::send_registered`],
//!    e.g. vLLM's KV cache, registered once) skips the staging copy: each chunk is
//!    checksummed where it lies and written straight from its ranges.
//! 3. A wave is committed (with its checksums) as soon as its write lands.
//! 4. A progressive send ([`PdSender::send_progressive`]) allocates and sends only chunks
//!    its producer has finished, so the transfer runs while prefill still computes; before
//!    it waits for the producer it commits everything in flight, so a long prefill leaves
//!    nothing uncommitted at the receiver (pages there are reclaimed when left uncommitted
//!    too long, and no write starts after [`WRITE_WINDOW`] transport timeouts).
//!
//! Sends run concurrently, to one receiver or many, each with a control connection of its
//! own (the receiver ties pages to the connection that allocated them). No lock is held
//! across a network wait; the receiver's buffer and the staging pages are the only
//! back-pressure, and a send waiting for staging pages holds none.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::{Staging, StagingPages};
use kvtier_transport::{
    Connection, Descriptor, RegionId, RegionMemory, RegistrationHandle, RemoteAccess, RemoteIov,
    Transport, TransportError,
};
use rayon::prelude::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::control::{self, ControlConn};
use super::notify::{ProxyNotifier, TransferDone};
use super::protocol::{AllocFailure, ChunkCommit, ChunkRequest, Message, Slot};
use super::PdError;
use super::Result;
use crate::config::PdSenderSettings;
use crate::keys::{ChunkHasher, ChunkSpan};
use crate::metrics::gb_per_s;
use crate::metrics::Metrics;
use crate::model::ModelSpec;
use crate::transport;
use kvtier_transport::handshake::Service;

/// Where a receiver listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReceiverSpec {
    /// Host of the receiver's control ports.
    pub host: String,
    /// Its init (handshake) port.
    pub init_port: u16,
    /// Its allocation port.
    pub alloc_port: u16,
}

/// What a send did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SendReport {
    /// Tokens whose chunks were written.
    pub tokens: usize,
    /// Tokens whose chunks the receiver already held.
    pub skipped_tokens: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Time the transfer took, from the first allocation to the last commit: waits for
    /// room at the receiver, for the producer and for staging pages, staging, one-sided
    /// writes and commits (not connecting).
    pub elapsed: Duration,
    /// Waves the chunks travelled in.
    pub waves: usize,
    /// Time in the request's allocation, waiting for room at the receiver included.
    pub alloc: Duration,
    /// Time waiting for the producer to finish chunks (progressive sends).
    pub ready_wait: Duration,
    /// Time waiting for free staging pages.
    pub staging_wait: Duration,
    /// Time gathering chunks into staging pages and checksumming them (overlaps the
    /// previous wave's write).
    pub stage: Duration,
    /// Time the one-sided writes took, wave by wave (they overlap staging).
    pub write: Duration,
    /// Time the sender waited for writes after it had nothing else to do: the part of
    /// `write` not hidden behind staging or the producer.
    pub write_wait: Duration,
    /// Time waiting for the receiver's answers to commits: a wave's commit is sent once
    /// its bytes landed and answered while the next wave is staged and written, so this is
    /// the part of the receiver's verification not hidden behind them.
    pub commit: Duration,
    /// Time telling the proxy (after `elapsed`; zero without a proxy).
    pub notify: Duration,
}

/// Idle control connections kept per receiver.
const MAX_IDLE_CONTROL: usize = 8;

/// Bytes a send stages and writes per wave at most (at least one chunk; at most half the
/// staging buffer, so one wave is gathered while the previous one is on the wire): small
/// enough that little staging is exposed before the first write and after the last
/// chunk is ready, large enough that a commit round trip per wave costs nothing.
pub const WAVE_BYTES: usize = 64 << 20;

/// Transport timeouts after its pages were granted within which a wave's write must start:
/// the receiver reclaims pages left uncommitted for its allocation timeout plus four
/// transport timeouts, and a write that started by then ends (or fails) within one more.
pub const WRITE_WINDOW: u32 = 3;

/// An open link to one receiver.
struct Link {
    data: Box<dyn Connection>,
    /// The receiver's allocation port.
    alloc_addr: String,
    /// Idle control connections; a send takes one for its whole duration.
    idle: parking_lot::Mutex<Vec<ControlConn>>,
    region: RegionId,
    /// Set when a send failed or was abandoned midway: answers may still be in flight on
    /// the control connection, so nothing may use this link again.
    poisoned: AtomicBool,
}

/// A P/D sender. Cheap to share (`Arc`); sends to any number of receivers.
pub struct PdSender {
    name: String,
    model: ModelSpec,
    hasher: ChunkHasher,
    transport: Box<dyn Transport>,
    /// Pages each send takes for one wave at a time.
    staging: Arc<Staging>,
    /// Shared with the write tasks of waves in flight.
    staging_reg: Option<Arc<RegistrationHandle>>,
    page_bytes: usize,
    links: tokio::sync::Mutex<HashMap<ReceiverSpec, Arc<Link>>>,
    proxy: Option<ProxyNotifier>,
    secret: Option<String>,
    timeout: Duration,
    metrics: Metrics,
}

impl Drop for PdSender {
    fn drop(&mut self) {
        self.staging_reg.take();
    }
}

impl PdSender {
    /// A sender with a staging buffer of `pd_buffer_size` bytes registered with the
    /// transport `transfer_channel` names; it notifies `pd_proxy_host:pd_proxy_port` if set.
    pub async fn new(
        settings: &PdSenderSettings,
        model: ModelSpec,
        metrics: Metrics,
    ) -> Result<PdSender> {
        let page_bytes = model.bytes_per_token() * settings.keys.chunk_size;
        let staging_pages = (settings.staging_bytes as usize / page_bytes).max(1);
        let transport = transport::open(
            settings.transport.channel,
            settings.transport.on_host("127.0.0.1"),
        )?;
        let staging = Arc::new(Staging::new(staging_pages, page_bytes));
        // Only our own writes read the staging pages: no peer may touch them.
        let staging_reg = transport.register(staging.buffer().clone(), RemoteAccess::LocalOnly)?;
        let timeout = settings.transport.timeout;
        let secret = settings.transport.auth_token.clone();
        let name = format!("prefiller-{}-{}", std::process::id(), model.tp_rank);
        let proxy = settings
            .proxy
            .as_ref()
            .map(|addr| ProxyNotifier::new(addr.clone(), name.clone(), secret.clone(), timeout));
        Ok(PdSender {
            name,
            hasher: ChunkHasher::new(
                &model.namespace(settings.keys.chunk_size),
                settings.keys.hash_seed,
                // P/D moves whole requests: the trailing partial chunk always travels.
                true,
            ),
            model,
            transport,
            staging,
            staging_reg: Some(Arc::new(staging_reg)),
            page_bytes,
            links: tokio::sync::Mutex::new(HashMap::new()),
            proxy,
            secret,
            timeout,
            metrics,
        })
    }

    /// The sender's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    async fn link(&self, to: &ReceiverSpec) -> Result<Arc<Link>> {
        {
            let mut links = self.links.lock().await;
            match links.get(to) {
                Some(l) if !l.poisoned.load(Ordering::Acquire) => return Ok(l.clone()),
                Some(_) => {
                    links.remove(to);
                }
                None => {}
            }
        }
        let init_addr = format!("{}:{}", to.host, to.init_port);
        let mut init = ControlConn::connect(
            &init_addr,
            Service::PdReceiver,
            &self.name,
            self.secret.as_deref(),
            self.timeout,
        )
        .await?;
        let (kind, page_bytes, descriptor) =
            match init.request(&Message::GetDescriptor, self.timeout).await? {
                Message::Descriptor {
                    transport,
                    page_bytes,
                    descriptor,
                } => (transport, page_bytes, descriptor),
                other => return Err(control::unexpected(&init, &other)),
            };
        if kind != self.transport.kind() {
            return Err(PdError::Mismatch(format!(
                "receiver {init_addr} uses transfer_channel `{kind}`, this sender `{}`",
                self.transport.kind()
            )));
        }
        if page_bytes as usize != self.page_bytes {
            return Err(PdError::Mismatch(format!(
                "receiver {init_addr} has {page_bytes}-byte pages, this sender {} (chunk_size or model differ)",
                self.page_bytes
            )));
        }
        let region = Descriptor::decode(&descriptor, self.transport.kind())?
            .regions
            .first()
            .map(|r| r.id)
            .ok_or_else(|| PdError::Mismatch(format!("receiver {init_addr} offers no buffer")))?;
        let data = self.transport.connect(&descriptor).await?;
        let alloc_addr = format!("{}:{}", to.host, to.alloc_port);
        let idle = if to.alloc_port == to.init_port {
            vec![init]
        } else {
            Vec::new()
        };
        let link = Arc::new(Link {
            data,
            alloc_addr,
            idle: parking_lot::Mutex::new(idle),
            region,
            poisoned: AtomicBool::new(false),
        });
        self.links.lock().await.insert(to.clone(), link.clone());
        Ok(link)
    }

    /// A control connection to `link`'s receiver for one send: an idle one (`true`), or a
    /// new one.
    async fn checkout(&self, link: &Link) -> Result<(ControlConn, bool)> {
        if let Some(conn) = link.idle.lock().pop() {
            return Ok((conn, true));
        }
        Ok((self.connect_control(link).await?, false))
    }

    /// A new control connection to `link`'s receiver.
    async fn connect_control(&self, link: &Link) -> Result<ControlConn> {
        ControlConn::connect(
            &link.alloc_addr,
            Service::PdReceiver,
            &self.name,
            self.secret.as_deref(),
            self.timeout,
        )
        .await
        .map_err(PdError::from)
    }

    /// Tells the receiver to free `req_id`'s uncommitted pages (best effort: a receiver
    /// that does not answer reclaims them when the connection closes). The answer read may
    /// be that of a commit still pending; no send uses the connection after an abort.
    async fn abort(&self, control: &mut ControlConn, req_id: &str) {
        let msg = Message::Abort {
            req_id: req_id.into(),
        };
        let _ = control.request(&msg, self.timeout).await;
    }

    /// Pushes the KV of `tokens` (laid out as for [`crate::Engine::store`]) into the
    /// receiver's buffer, skipping chunks it already holds, and notifies the proxy that
    /// `req_id` is done (or failed).
    pub async fn send(
        &self,
        req_id: &str,
        tokens: &[u32],
        kv: &[u8],
        to: &ReceiverSpec,
    ) -> Result<SendReport> {
        let bpt = self.model.bytes_per_token();
        let checked = if kv.len() == tokens.len() * bpt {
            Ok(())
        } else {
            Err(PdError::Shape(format!(
                "P/D send {req_id}: {} bytes for {} tokens; model needs {bpt} per token",
                kv.len(),
                tokens.len()
            )))
        };
        let fill = self.gather_from(kv, tokens.len());
        self.send_checked(req_id, tokens, checked, Payloads::Staged(&fill), None, to)
            .await
    }

    /// The [`ChunkSource`] that gathers each chunk's payload from `kv`, the KV of `tokens`
    /// tokens laid out as for [`crate::Engine::store`] (what [`PdSender::send`] uses; for
    /// [`PdSender::send_progressive`] of such a buffer while it is being computed).
    pub fn gather_from<'a>(&self, kv: &'a [u8], tokens: usize) -> Gather<'a> {
        Gather {
            kv,
            tokens,
            row: self.model.chunk_shape(1).row_bytes(),
            planes: self.model.layout.kv_factor() * self.model.layers as usize,
        }
    }

    /// Like [`PdSender::send`], with each chunk's payload written by `fill` (called in
    /// parallel with the chunk's span and its staging page of
    /// [`crate::ChunkShape::payload_len`] bytes, which it must overwrite whole; a closure
    /// `Fn(&ChunkSpan, &mut [u8])` is one): the way to send KV that lives in the caller's
    /// own layout (a paged cache's blocks) with one copy.
    pub async fn send_with<F>(
        &self,
        req_id: &str,
        tokens: &[u32],
        fill: F,
        to: &ReceiverSpec,
    ) -> Result<SendReport>
    where
        F: Fn(&ChunkSpan, &mut [u8]) + Sync,
    {
        self.send_checked(req_id, tokens, Ok(()), Payloads::Staged(&fill), None, to)
            .await
    }

    /// Like [`PdSender::send_with`] while the KV is still being computed: `ready` says how
    /// many leading tokens of `tokens` have their KV final (chunked prefill advances it),
    /// and `fill` is called for a chunk only once `ready` covers it (a [`Gather`], or a
    /// closure with typed parameters). Chunks move while
    /// later ones are computed, so little transfer is left when the last one is ready.
    /// Fails with [`PdError::Incomplete`] if `ready`'s sender is dropped short of
    /// `tokens.len()`.
    pub async fn send_progressive<F>(
        &self,
        req_id: &str,
        tokens: &[u32],
        fill: F,
        ready: watch::Receiver<usize>,
        to: &ReceiverSpec,
    ) -> Result<SendReport>
    where
        F: ChunkSource,
    {
        self.send_checked(
            req_id,
            tokens,
            Ok(()),
            Payloads::Staged(&fill),
            Some(ready),
            to,
        )
        .await
    }

    /// Registers `memory` with this sender's transport (local only: no peer may touch it)
    /// so that sends can write KV straight from it ([`PdSender::send_registered`]).
    /// Register long-lived memory once (a KV cache), not per request.
    pub fn register_kv(&self, memory: Arc<dyn RegionMemory>) -> Result<Arc<RegistrationHandle>> {
        Ok(Arc::new(
            self.transport.register(memory, RemoteAccess::LocalOnly)?,
        ))
    }

    /// The KV of `tokens` tokens laid out as for [`crate::Engine::store`], starting at
    /// byte `offset` of `registration` (from [`PdSender::register_kv`]).
    pub fn planar_kv(
        &self,
        registration: Arc<RegistrationHandle>,
        offset: usize,
        tokens: usize,
    ) -> Result<PlanarKv> {
        let bytes = tokens * self.model.bytes_per_token();
        if offset
            .checked_add(bytes)
            .is_none_or(|end| end > registration.len())
        {
            return Err(PdError::Shape(format!(
                "KV of {tokens} tokens ({bytes} bytes) at offset {offset} does not fit in a \
                 registered region of {} bytes",
                registration.len()
            )));
        }
        Ok(PlanarKv {
            registration: [registration],
            offset,
            tokens,
            row: self.model.chunk_shape(1).row_bytes(),
            planes: self.model.layout.kv_factor() * self.model.layers as usize,
        })
    }

    /// Like [`PdSender::send`] for KV in registered memory: each chunk is written straight
    /// from the ranges `kv` names (no staging copy) and checksummed where it lies. The KV
    /// must not change until the send returns.
    pub async fn send_registered(
        &self,
        req_id: &str,
        tokens: &[u32],
        kv: &dyn RegisteredKv,
        to: &ReceiverSpec,
    ) -> Result<SendReport> {
        let direct: Payloads<'_, fn(&ChunkSpan, &mut [u8])> = Payloads::Direct(kv);
        self.send_checked(req_id, tokens, Ok(()), direct, None, to)
            .await
    }

    async fn send_checked<F>(
        &self,
        req_id: &str,
        tokens: &[u32],
        checked: Result<()>,
        fill: Payloads<'_, F>,
        ready: Option<watch::Receiver<usize>>,
        to: &ReceiverSpec,
    ) -> Result<SendReport>
    where
        F: ChunkSource,
    {
        let start = Instant::now();
        let _in_flight = InFlight::start(&self.metrics);
        let mut result = match checked {
            Ok(()) => self.send_inner(req_id, tokens, fill, ready, to).await,
            Err(e) => Err(e),
        };
        let link_broken = match &result {
            // The receiver answered: the link is fine, this request did not fit, or its
            // producer gave up.
            Err(
                PdError::NeverFits { .. }
                | PdError::BufferFull { .. }
                | PdError::StagingFull { .. }
                | PdError::Incomplete { .. },
            ) => false,
            Err(_) => true,
            Ok(_) => false,
        };
        if link_broken {
            // Rebuilt on the next send (sends already using it keep their handle).
            self.links.lock().await.remove(to);
        }
        if let Some(proxy) = &self.proxy {
            let told = Instant::now();
            let done = match &result {
                Ok(r) => TransferDone {
                    req_id: req_id.into(),
                    ok: true,
                    error: None,
                    tokens: (r.tokens + r.skipped_tokens) as u64,
                    bytes: r.bytes,
                    elapsed_us: r.elapsed.as_micros() as u64,
                },
                Err(e) => TransferDone {
                    req_id: req_id.into(),
                    ok: false,
                    error: Some(e.to_string()),
                    tokens: 0,
                    bytes: 0,
                    elapsed_us: start.elapsed().as_micros() as u64,
                },
            };
            if let Err(e) = proxy.send(&done).await {
                tracing::error!("P/D sender: cannot notify the proxy of {req_id}: {e}");
            }
            if let Ok(r) = &mut result {
                r.notify = told.elapsed();
            }
        }
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics.pd_sends.with_label_values(&[outcome]).inc();
        self.metrics
            .op_seconds
            .with_label_values(&["pd_send"])
            .observe(start.elapsed().as_secs_f64());
        result
    }

    /// Asks for pages for every chunk of the request at once (see the module docs, step 1).
    async fn alloc(
        &self,
        control: &mut ControlConn,
        reused: bool,
        link: &Link,
        req_id: &str,
        spans: &[ChunkSpan],
    ) -> Result<Vec<Slot>> {
        let chunks: Vec<ChunkRequest> = spans
            .iter()
            .map(|s| ChunkRequest {
                key: s.key,
                tokens: s.tokens() as u32,
            })
            .collect();
        // The receiver waits for room itself, bounded by its pd_allocation_timeout_sec.
        let alloc = Message::Alloc {
            req_id: req_id.into(),
            chunks,
            writer: link.data.writer_id().map_or(0, |w| w.0),
        };
        let mut answer = control.request(&alloc, self.timeout * 4).await;
        if reused && matches!(&answer, Err(e) if e.is_closed()) {
            // A pooled connection the receiver closed while it sat idle: nothing was
            // allocated on it (allocations die with their connection); ask afresh.
            *control = self.connect_control(link).await?;
            answer = control.request(&alloc, self.timeout * 4).await;
        }
        match answer? {
            Message::Allocated { req_id: r, slots }
                if r == req_id && slots.len() == spans.len() =>
            {
                Ok(slots)
            }
            Message::AllocFailed {
                failure: AllocFailure::NeverFits,
                needed_bytes,
                buffer_bytes,
                ..
            } => Err(PdError::NeverFits {
                req_id: req_id.into(),
                needed_bytes,
                buffer_bytes,
            }),
            Message::AllocFailed {
                failure: AllocFailure::Timeout,
                ..
            } => Err(PdError::BufferFull {
                req_id: req_id.into(),
                after: self.timeout,
            }),
            other => Err(control::unexpected(control, &other)),
        }
    }

    /// Waits for the wave in flight to land, commits it, and waits for every commit's
    /// answer: the receiver then holds nothing uncommitted of this send.
    async fn land(
        &self,
        control: &mut ControlConn,
        req_id: &str,
        wave: Wave,
        pending: &mut Option<PendingCommit>,
        report: &mut SendReport,
    ) -> Result<()> {
        let landed = self.written(control, req_id, wave, report).await?;
        self.commit_next(control, req_id, landed, pending, report)
            .await?;
        self.settle_commits(control, req_id, pending, report).await
    }

    /// Reads the answer to the commit still pending, if any.
    async fn settle_commits(
        &self,
        control: &mut ControlConn,
        req_id: &str,
        pending: &mut Option<PendingCommit>,
        report: &mut SendReport,
    ) -> Result<()> {
        match pending.take() {
            Some(p) => self.commit_answer(control, req_id, p, report).await,
            None => Ok(()),
        }
    }

    /// Waits for the wave in flight to land and gives its staging pages back; returns
    /// what is left to commit.
    async fn written(
        &self,
        control: &mut ControlConn,
        req_id: &str,
        wave: Wave,
        report: &mut SendReport,
    ) -> Result<Landed> {
        let Wave { mut flight, landed } = wave;
        let waited = Instant::now();
        let written = (&mut flight.handle).await;
        report.write_wait += waited.elapsed();
        flight.landed = true;
        let written = match written {
            Ok((w, took)) => {
                report.write += took;
                w
            }
            Err(e) => Err(TransportError::Io(format!(
                "the write task of request {req_id} ended: {e}"
            ))),
        };
        if let Err(e) = written {
            // The data connection may be out of step: nothing may use the link again.
            flight.link.poisoned.store(true, Ordering::Release);
            self.abort(control, req_id).await;
            return Err(e.into());
        }
        Ok(landed)
    }

    /// Commits a wave whose bytes landed: the receiver verifies the checksums and makes
    /// the chunks visible. The answer to the commit before it is read first (one commit is
    /// pending at a time, answered in order on the control connection); this one's answer
    /// is left pending, so the receiver verifies while the sender goes on.
    async fn commit_next(
        &self,
        control: &mut ControlConn,
        req_id: &str,
        landed: Landed,
        pending: &mut Option<PendingCommit>,
        report: &mut SendReport,
    ) -> Result<()> {
        self.settle_commits(control, req_id, pending, report)
            .await?;
        let Landed {
            commits,
            tokens,
            bytes,
        } = landed;
        let chunks = commits.len();
        let commit = Message::Commit {
            req_id: req_id.into(),
            chunks: commits,
        };
        match tokio::time::timeout(self.timeout, control.send(&commit)).await {
            Ok(sent) => sent?,
            Err(_) => {
                return Err(PdError::Timeout {
                    what: format!("the commit of {req_id} to go out to {}", control.peer()),
                    after: self.timeout,
                })
            }
        }
        *pending = Some(PendingCommit {
            chunks,
            tokens,
            bytes,
        });
        Ok(())
    }

    /// Reads the receiver's answer to the commit `pending`.
    async fn commit_answer(
        &self,
        control: &mut ControlConn,
        req_id: &str,
        pending: PendingCommit,
        report: &mut SendReport,
    ) -> Result<()> {
        let waiting = Instant::now();
        match control.recv_within(self.timeout).await? {
            Message::Committed { req_id: r } if r == req_id => {}
            other => return Err(control::unexpected(control, &other)),
        }
        report.commit += waiting.elapsed();
        report.tokens += pending.tokens;
        report.bytes += pending.bytes;
        self.metrics.pd_chunks.inc_by(pending.chunks as u64);
        Ok(())
    }

    async fn send_inner<F>(
        &self,
        req_id: &str,
        tokens: &[u32],
        payloads: Payloads<'_, F>,
        mut ready: Option<watch::Receiver<usize>>,
        to: &ReceiverSpec,
    ) -> Result<SendReport>
    where
        F: ChunkSource,
    {
        let bpt = self.model.bytes_per_token();
        let spans = self.hasher.spans(tokens);
        let link = self.link(to).await?;
        // Ours alone until the send ends: an error or a dropped future drops it.
        let (mut control, reused) = self.checkout(&link).await?;
        // The transfer proper: from the allocation to the last commit.
        let start = Instant::now();
        let mut report = SendReport::default();
        let wave_pages = match payloads {
            Payloads::Staged(_) => (WAVE_BYTES / self.page_bytes).min(self.staging.pages() / 2),
            Payloads::Direct(_) => WAVE_BYTES / self.page_bytes,
        }
        .max(1);
        let reg = self.staging_reg.clone().expect("registered while alive");
        // Chunks not yet allocated at the receiver, and allocated ones not yet staged.
        let mut unallocated: &[ChunkSpan] = &spans;
        let mut todo: VecDeque<(&ChunkSpan, u64)> = VecDeque::new();
        // When the pages in `todo` were granted (see WRITE_WINDOW).
        let mut granted = start;
        let mut retry_closed = reused;
        let mut in_flight: Option<Wave> = None;
        // The commit sent whose answer is still to be read.
        let mut pending: Option<PendingCommit> = None;
        loop {
            if todo.is_empty() {
                if unallocated.is_empty() {
                    break;
                }
                // Allocate every chunk at once, or (progressive) every chunk now ready.
                let ready_tokens = match &mut ready {
                    None => usize::MAX,
                    Some(r) => *r.borrow_and_update(),
                };
                let k = unallocated
                    .iter()
                    .take_while(|s| s.end <= ready_tokens)
                    .count();
                if k == 0 {
                    // Nothing ready: land and commit what is in flight (the receiver then
                    // holds nothing uncommitted of ours), then wait for the producer.
                    if let Some(wave) = in_flight.take() {
                        self.land(&mut control, req_id, wave, &mut pending, &mut report)
                            .await?;
                    }
                    let waiting = Instant::now();
                    let r = ready.as_mut().expect("only progressive sends wait");
                    if r.changed().await.is_err() && *r.borrow() < unallocated[0].end {
                        self.abort(&mut control, req_id).await;
                        return Err(PdError::Incomplete {
                            req_id: req_id.into(),
                            ready_tokens: *r.borrow(),
                            tokens: tokens.len(),
                        });
                    }
                    report.ready_wait += waiting.elapsed();
                    // The receiver may have closed the connection while it was silent.
                    retry_closed = true;
                    continue;
                }
                let (asked, rest) = unallocated.split_at(k);
                unallocated = rest;
                // Answers come in order: the pending commit's before the allocation's.
                self.settle_commits(&mut control, req_id, &mut pending, &mut report)
                    .await?;
                let allocating = Instant::now();
                let slots = self
                    .alloc(&mut control, retry_closed, &link, req_id, asked)
                    .await?;
                retry_closed = false;
                granted = Instant::now();
                report.alloc += allocating.elapsed();
                for (s, slot) in asked.iter().zip(&slots) {
                    match slot {
                        Slot::Page { offset } => todo.push_back((s, *offset)),
                        Slot::Held => report.skipped_tokens += s.tokens(),
                    }
                }
                continue;
            }
            let n = todo.len().min(wave_pages);
            let wave: Vec<(&ChunkSpan, u64)> = todo.drain(..n).collect();
            let lens: Vec<usize> = wave.iter().map(|(s, _)| s.tokens() * bpt).collect();
            let staging = match payloads {
                Payloads::Staged(_) => match self.staging.try_acquire(n) {
                    Some(pages) => Some(pages),
                    None => {
                        // Wait holding nothing: land the wave in flight first (its pages
                        // may be the ones this wave needs).
                        if let Some(wave) = in_flight.take() {
                            self.land(&mut control, req_id, wave, &mut pending, &mut report)
                                .await?;
                        }
                        let waiting = Instant::now();
                        // Bounded: the receiver reclaims pages left uncommitted too long.
                        let acquired =
                            match tokio::time::timeout(self.timeout, self.staging.acquire(n)).await
                            {
                                Ok(pages) => pages,
                                Err(_) => {
                                    self.abort(&mut control, req_id).await;
                                    return Err(PdError::StagingFull {
                                        req_id: req_id.into(),
                                        pages: self.staging.pages(),
                                        after: self.timeout,
                                    });
                                }
                            };
                        report.staging_wait += waiting.elapsed();
                        Some(acquired)
                    }
                },
                Payloads::Direct(_) => None,
            };
            // Gather and checksum this wave (or, from registered KV, checksum it where it
            // lies) while the previous one is on the wire. What the receiver checks before
            // a chunk becomes visible: bytes that changed on the way are a miss there,
            // never wrong KV.
            let staging_started = Instant::now();
            let (pages, regs, local, remote, checksums) = match (payloads, staging) {
                (Payloads::Staged(fill), Some(mut pages)) => {
                    let checksums =
                        blocking(|| pages.fill(&lens, |i, page| fill.fill(wave[i].0, page)));
                    let local: Vec<KvRange> = lens
                        .iter()
                        .enumerate()
                        .map(|(i, &len)| KvRange {
                            region: 0,
                            offset: pages.offset(i),
                            len,
                        })
                        .collect();
                    let remote = wave
                        .iter()
                        .zip(&lens)
                        .map(|((_, offset), &len)| RemoteIov {
                            region: link.region,
                            offset: *offset,
                            len: len as u64,
                        })
                        .collect();
                    (Some(pages), vec![reg.clone()], local, remote, checksums)
                }
                (Payloads::Direct(kv), _) => {
                    let (local, remote, checksums) = direct_wave(kv, &wave, &lens, link.region)?;
                    (None, kv.registrations().to_vec(), local, remote, checksums)
                }
                (Payloads::Staged(_), None) => unreachable!("staged waves hold pages"),
            };
            report.stage += staging_started.elapsed();
            // The previous wave's bytes must have landed before this wave's write starts
            // (one data connection, in order); its commit then goes out without waiting
            // for the answer, so the receiver verifies it while this wave is on the wire
            // and the next one is staged.
            let to_commit = match in_flight.take() {
                Some(previous) => Some(
                    self.written(&mut control, req_id, previous, &mut report)
                        .await?,
                ),
                None => None,
            };
            // No write may start once the receiver could reclaim these pages.
            if granted.elapsed() > self.timeout * WRITE_WINDOW {
                self.abort(&mut control, req_id).await;
                return Err(PdError::Timeout {
                    what: format!(
                        "request {req_id} to be written within {WRITE_WINDOW} transport timeouts \
                         of its allocation (the receiver reclaims pages left uncommitted longer; \
                         raise transport_timeout_sec, or pd_buffer_size on the prefiller)"
                    ),
                    after: self.timeout * WRITE_WINDOW,
                });
            }
            let bytes = remote.iter().map(|r| r.len).sum();
            let flight = Flight::start(link.clone(), regs, pages, local, remote);
            report.waves += 1;
            in_flight = Some(Wave {
                flight,
                landed: Landed {
                    commits: wave
                        .iter()
                        .zip(checksums)
                        .map(|((s, _), checksum)| ChunkCommit {
                            key: s.key,
                            checksum,
                        })
                        .collect(),
                    tokens: wave.iter().map(|(s, _)| s.tokens()).sum(),
                    bytes,
                },
            });
            if let Some(landed) = to_commit {
                let committed = self
                    .commit_next(&mut control, req_id, landed, &mut pending, &mut report)
                    .await;
                if let Err(e) = committed {
                    // Let the write just started finish: cancelled half-way, it would take
                    // the data connection (shared with other sends) down with it.
                    if let Some(wave) = in_flight.take() {
                        wave.settle().await;
                    }
                    return Err(e);
                }
            }
        }
        if let Some(wave) = in_flight.take() {
            self.land(&mut control, req_id, wave, &mut pending, &mut report)
                .await?;
        }
        // No answer may stay unread on a connection that goes back to the pool.
        self.settle_commits(&mut control, req_id, &mut pending, &mut report)
            .await?;
        report.elapsed = start.elapsed();
        let mut idle = link.idle.lock();
        if idle.len() < MAX_IDLE_CONTROL {
            idle.push(control);
        }
        drop(idle);
        tracing::info!(
            "P/D sent {req_id}: {} tokens ({} already at the receiver) to {}:{} in {:.2} ms ({:.2} GB/s, {} waves, {})",
            report.tokens,
            report.skipped_tokens,
            to.host,
            to.init_port,
            report.elapsed.as_secs_f64() * 1e3,
            gb_per_s(report.bytes, report.elapsed),
            report.waves,
            match payloads {
                Payloads::Staged(_) => "staged",
                Payloads::Direct(_) => "from registered memory",
            }
        );
        Ok(report)
    }
}

/// Counts a send in `kvtier_pd_sends_in_flight` while it lives (a send dropped half-way
/// included).
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn start(metrics: &Metrics) -> InFlight {
        metrics.pd_sends_in_flight.inc();
        InFlight(metrics.pd_sends_in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Writes chunk payloads into staging pages for a send, and checksums them.
pub trait ChunkSource: Sync {
    /// Overwrites `page`, the whole payload of the chunk `span` covers, and returns its
    /// xxh3-64 (what the receiver verifies before the chunk becomes visible).
    fn fill(&self, span: &ChunkSpan, page: &mut [u8]) -> u64;
}

/// A closure fills the page; the checksum is taken right after, on the same core.
impl<F: Fn(&ChunkSpan, &mut [u8]) + Sync> ChunkSource for F {
    fn fill(&self, span: &ChunkSpan, page: &mut [u8]) -> u64 {
        self(span, page);
        kvtier_transport::checksum(page)
    }
}

/// Gathers chunks from KV laid out as for [`crate::Engine::store`] (one plane per layer and
/// K/V, tokens in order), hashing each plane's piece while it is still in cache: one pass
/// over memory for the copy and the checksum. Made by [`PdSender::gather_from`].
pub struct Gather<'a> {
    kv: &'a [u8],
    tokens: usize,
    row: usize,
    planes: usize,
}

impl ChunkSource for Gather<'_> {
    fn fill(&self, span: &ChunkSpan, page: &mut [u8]) -> u64 {
        let seg = span.tokens() * self.row;
        let mut hash = kvtier_transport::Checksum::new();
        for (plane, dst) in page.chunks_exact_mut(seg).take(self.planes).enumerate() {
            let src = (plane * self.tokens + span.start) * self.row;
            dst.copy_from_slice(&self.kv[src..src + seg]);
            hash.update(dst);
        }
        // The page is exactly the planes' pieces (payload = planes x tokens x row); should
        // it ever hold more, the checksum still covers all of it.
        if page.len() != seg * self.planes {
            return kvtier_transport::checksum(page);
        }
        hash.digest()
    }
}

/// KV in memory registered with the sender's transport ([`PdSender::register_kv`]): a
/// send writes each chunk straight from the ranges it names, without a staging copy.
pub trait RegisteredKv: Sync {
    /// The registrations (with the sending [`PdSender`]'s transport) of the memory holding
    /// the KV; [`KvRange::region`] indexes them.
    fn registrations(&self) -> &[Arc<RegistrationHandle>];

    /// Appends the ranges that make up the payload of chunk `span` (as
    /// [`crate::ChunkShape::payload_len`] lays it out), in payload order. Entries already
    /// in `out` belong to other chunks: never change them.
    fn ranges(&self, span: &ChunkSpan, out: &mut Vec<KvRange>);
}

/// `len` bytes at `offset` of the registration `region` of a [`RegisteredKv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRange {
    /// Index into [`RegisteredKv::registrations`].
    pub region: usize,
    /// Start within that registration.
    pub offset: usize,
    /// Length.
    pub len: usize,
}

/// KV laid out as for [`crate::Engine::store`] (one plane per layer and K/V, tokens in
/// order) in one registered region: a chunk is one range per plane. Made by
/// [`PdSender::planar_kv`].
pub struct PlanarKv {
    registration: [Arc<RegistrationHandle>; 1],
    offset: usize,
    tokens: usize,
    row: usize,
    planes: usize,
}

impl RegisteredKv for PlanarKv {
    fn registrations(&self) -> &[Arc<RegistrationHandle>] {
        &self.registration
    }

    fn ranges(&self, span: &ChunkSpan, out: &mut Vec<KvRange>) {
        let seg = span.tokens() * self.row;
        out.extend((0..self.planes).map(|plane| KvRange {
            region: 0,
            offset: self.offset + (plane * self.tokens + span.start) * self.row,
            len: seg,
        }));
    }
}

/// How a send gets its chunks' bytes.
enum Payloads<'a, F> {
    /// Gathered into staging pages by a [`ChunkSource`].
    Staged(&'a F),
    /// Written straight from registered memory.
    Direct(&'a dyn RegisteredKv),
}

impl<F> Clone for Payloads<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F> Copy for Payloads<'_, F> {}

/// Local and remote ranges and checksums of a wave sent from registered KV: each chunk's
/// ranges in payload order, written into consecutive bytes of its page.
type DirectWave = (Vec<KvRange>, Vec<RemoteIov>, Vec<u64>);

fn direct_wave(
    kv: &dyn RegisteredKv,
    wave: &[(&ChunkSpan, u64)],
    lens: &[usize],
    region: RegionId,
) -> Result<DirectWave> {
    let regs = kv.registrations();
    let mut local = Vec::new();
    let mut remote = Vec::new();
    let mut per_chunk = Vec::with_capacity(wave.len());
    for ((span, page), &len) in wave.iter().zip(lens) {
        let first = local.len();
        kv.ranges(span, &mut local);
        let mut at = *page;
        for r in &local[first..] {
            if r.region >= regs.len() {
                return Err(PdError::Shape(format!(
                    "registered KV names region {} of {}",
                    r.region,
                    regs.len()
                )));
            }
            remote.push(RemoteIov {
                region,
                offset: at,
                len: r.len as u64,
            });
            at += r.len as u64;
        }
        if at - page != len as u64 {
            return Err(PdError::Shape(format!(
                "registered KV names {} bytes for chunk {} of {} tokens; its payload is {len}",
                at - page,
                span.key,
                span.tokens()
            )));
        }
        per_chunk.push(first..local.len());
    }
    let checksums: Option<Vec<u64>> = blocking(|| {
        per_chunk
            .par_iter()
            .map(|chunk| {
                kvtier_transport::region_digest(
                    local[chunk.clone()]
                        .iter()
                        .map(|r| (regs[r.region].memory().as_ref(), r.offset, r.len)),
                )
            })
            .collect()
    });
    let checksums = checksums.ok_or_else(|| {
        PdError::Shape("registered KV names ranges outside its registrations".into())
    })?;
    Ok((local, remote, checksums))
}

/// A wave on its way (its staging pages travel with its write).
struct Wave {
    flight: Flight,
    landed: Landed,
}

impl Wave {
    /// Waits for the write to end, whatever its outcome, without committing (a failed
    /// write poisons the link).
    async fn settle(mut self) {
        let ok = matches!((&mut self.flight.handle).await, Ok((Ok(()), _)));
        self.flight.landed = true;
        if !ok {
            self.flight.link.poisoned.store(true, Ordering::Release);
        }
    }
}

/// A commit sent whose answer is still to be read, and what it adds to the report then.
struct PendingCommit {
    chunks: usize,
    tokens: usize,
    bytes: u64,
}

/// A wave's commit, and what it adds to the report once committed.
struct Landed {
    commits: Vec<ChunkCommit>,
    tokens: usize,
    bytes: u64,
}

/// A wave's one-sided write, running as a task of its own so the sender can stage the
/// next wave meanwhile. The task owns the wave's staging pages and gives them back when
/// the write has ended (or the task was stopped), never while it may still read them.
/// Dropped before it landed (the send failed or was abandoned), it stops the task and
/// poisons the link: the data connection may be out of step.
struct Flight {
    /// The write's outcome and how long it took.
    handle: JoinHandle<(std::result::Result<(), TransportError>, Duration)>,
    link: Arc<Link>,
    landed: bool,
}

impl Flight {
    fn start(
        link: Arc<Link>,
        regs: Vec<Arc<RegistrationHandle>>,
        pages: Option<StagingPages>,
        local: Vec<KvRange>,
        remote: Vec<RemoteIov>,
    ) -> Flight {
        let task_link = link.clone();
        let handle = tokio::spawn(async move {
            // Given back when the task ends: the write has landed, failed or been dropped.
            let _pages = pages;
            let started = Instant::now();
            let local = local
                .iter()
                .map(|r| match regs.get(r.region) {
                    Some(reg) => reg.iov(r.offset, r.len),
                    None => Err(TransportError::Protocol(format!(
                        "local range names registration {} of {}",
                        r.region,
                        regs.len()
                    ))),
                })
                .collect::<std::result::Result<Vec<_>, _>>();
            let written = match local {
                Ok(local) => task_link.data.write(&local, &remote).await,
                Err(e) => Err(e),
            };
            (written, started.elapsed())
        });
        Flight {
            handle,
            link,
            landed: false,
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if !self.landed {
            self.handle.abort();
            self.link.poisoned.store(true, Ordering::Release);
        }
    }
}

/// Runs CPU-bound `f` without stalling the runtime's other tasks (the write in flight
/// above all): on a multi-threaded runtime this worker hands its tasks to the others.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

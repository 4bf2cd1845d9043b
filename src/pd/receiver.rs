//! The receiver (decoder) side: a paged P/D buffer registered with the transport, the
//! control listeners, and retrieve.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvtier_transport::{
    HostBuffer, RegistrationHandle, RemoteAccess, Transport, WriteGrants, WriterId,
};
use rayon::prelude::*;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::control::{self, ControlConn};
use super::pages::{Committed, Grant, Page, PageTable, Placed};
use super::protocol::{AllocFailure, ChunkCommit, ChunkRequest, Message, Slot};
use super::PdError;
use super::Result;
use crate::config::{BufferDevice, PdReceiverSettings};
use crate::keys::{ChunkHasher, ChunkKey, ChunkSpan};
use crate::metrics::Metrics;
use crate::model::ModelSpec;
use crate::transport;
use kvtier_transport::handshake::Service;
use kvtier_transport::limits::{self, reply_within, ConnectionLimit, ReplyError};

/// Occupancy of the P/D buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferUsage {
    /// Pages allocated (written, committed or being written).
    pub used_pages: usize,
    /// Pages freed without being consumed (aborted, reclaimed, failed their checksum),
    /// kept out of use until writes that may still target them have landed or failed.
    pub quarantined_pages: usize,
    /// Pages in the buffer.
    pub total_pages: usize,
    /// Bytes per page.
    pub page_bytes: usize,
}

struct Inner {
    name: String,
    model: ModelSpec,
    hasher: ChunkHasher,
    transport: Box<dyn Transport>,
    buffer: Arc<HostBuffer>,
    /// Which data connection may write which page (checked by transports that see every
    /// write; see [`kvtier_transport::access`]).
    grants: Arc<WriteGrants>,
    registration: Mutex<Option<RegistrationHandle>>,
    page_bytes: usize,
    total_pages: usize,
    pages: Mutex<PageTable>,
    space: Notify,
    secret: Option<String>,
    timeout: Duration,
    alloc_timeout: Duration,
    ttl: Option<Duration>,
    /// How long a page freed before its writes were known to be done stays out of use.
    quarantine: Duration,
    /// A control connection silent this long is closed.
    control_idle: Duration,
    /// Control connections served at once (both ports).
    limit: ConnectionLimit,
    metrics: Metrics,
    next_conn: AtomicU64,
    /// Set when the receiver is dropped: connection tasks end and release `Inner`.
    closing: tokio::sync::watch::Sender<bool>,
}

/// A P/D receiver: owns the buffer and answers senders.
pub struct PdReceiver {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ports: (u16, u16),
}

impl Drop for PdReceiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.inner.closing.send(true);
        // Deregister before the buffer can go.
        self.inner.registration.lock().expect("lock").take();
    }
}

impl PdReceiver {
    /// Allocates and registers the buffer and starts listening on the init and alloc ports
    /// (`pd_peer_init_port` / `pd_peer_alloc_port` for this TP rank; one listener when
    /// they are equal; port 0 picks a free one, see [`PdReceiver::ports`]).
    pub async fn start(
        settings: &PdReceiverSettings,
        model: ModelSpec,
        metrics: Metrics,
    ) -> Result<PdReceiver> {
        if let BufferDevice::Cuda(_) = settings.buffer_device {
            return Err(PdError::Unsupported(
                "`pd_buffer_device: cuda`: the P/D buffer lives in host memory in this version; \
                 set `pd_buffer_device: cpu`"
                    .into(),
            ));
        }
        let rank = model.tp_rank as usize;
        let pick = |ports: &[u16], key: &str| -> Result<u16> {
            ports.get(rank).or(ports.first()).copied().ok_or_else(|| {
                PdError::Unsupported(format!("P/D receiver needs `{key}` (one port per TP rank)"))
            })
        };
        let init_port = pick(&settings.init_ports, "pd_peer_init_port")?;
        let alloc_port = pick(&settings.alloc_ports, "pd_peer_alloc_port")?;
        let host = settings.host.clone();
        let page_bytes = model.bytes_per_token() * settings.keys.chunk_size;
        let total_pages = (settings.buffer_bytes as usize) / page_bytes;
        if total_pages == 0 {
            return Err(PdError::Unsupported(format!(
                "pd_buffer_size {} is smaller than one chunk ({page_bytes} bytes)",
                settings.buffer_bytes
            )));
        }
        let transport = transport::open(
            settings.transport.channel,
            settings.transport.on_host(&host),
        )?;
        let buffer = Arc::new(HostBuffer::new(total_pages * page_bytes));
        // Peers write only the pages granted to their data connection, and read none.
        let grants = WriteGrants::new(page_bytes as u64, total_pages);
        let registration =
            transport.register(buffer.clone(), RemoteAccess::GrantedWrites(grants.clone()))?;
        if !transport.enforces_write_grants() {
            tracing::info!(
                "P/D receiver: the {} transport's one-sided writes bypass this process, so it \
                 cannot limit a peer to the pages allocated to it, nor (on one host, or over \
                 NIXL) keep it from reading the buffer; commit checksums keep bytes written \
                 by anyone else from becoming visible, and only peers that pass the \
                 handshake (`transport_auth_token`) learn the buffer's keys",
                transport.kind()
            );
        }
        metrics
            .pd_buffer_capacity_bytes
            .set((total_pages * page_bytes) as i64);
        let bind = |port: u16| {
            let host = host.clone();
            async move {
                TcpListener::bind((host.as_str(), port))
                    .await
                    .map_err(|e| PdError::Listen {
                        op: "bind P/D control port",
                        addr: format!("{host}:{port}"),
                        source: e,
                    })
            }
        };
        let init = bind(init_port).await?;
        if let Ok(addr) = init.local_addr() {
            // One warning covers both control ports (same host, same secret).
            kvtier_transport::handshake::warn_if_exposed(
                Service::PdReceiver,
                &addr,
                settings.transport.auth_token.as_deref(),
            );
        }
        let init_bound = init.local_addr().map(|a| a.port()).unwrap_or(init_port);
        let alloc = if alloc_port == init_port {
            None
        } else {
            Some(bind(alloc_port).await?)
        };
        let alloc_bound = alloc
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(init_bound, |a| a.port());
        let inner = Arc::new(Inner {
            name: format!("decoder@{host}:{init_bound}"),
            hasher: ChunkHasher::new(
                &model.namespace(settings.keys.chunk_size),
                settings.keys.hash_seed,
                // P/D moves whole requests: the trailing partial chunk always travels.
                true,
            ),
            model,
            transport,
            buffer,
            grants,
            registration: Mutex::new(Some(registration)),
            page_bytes,
            total_pages,
            pages: Mutex::new(PageTable::new(total_pages as u32)),
            space: Notify::new(),
            secret: settings.transport.auth_token.clone(),
            timeout: settings.transport.timeout,
            alloc_timeout: settings.allocation_timeout,
            ttl: settings.ttl,
            quarantine: settings.transport.timeout,
            control_idle: settings.control_idle,
            limit: ConnectionLimit::new(
                format!("P/D receiver decoder@{host}:{init_bound}"),
                limits::MAX_CONNECTIONS,
            ),
            metrics,
            next_conn: AtomicU64::new(1),
            closing: tokio::sync::watch::channel(false).0,
        });
        let mut tasks = vec![tokio::spawn(listen(inner.clone(), init))];
        if let Some(alloc) = alloc {
            tasks.push(tokio::spawn(listen(inner.clone(), alloc)));
        }
        tasks.push(tokio::spawn(collect_garbage(inner.clone())));
        tracing::info!(
            "P/D receiver {}: {} pages of {} MiB over {}, init port {init_bound}, alloc port {alloc_bound}",
            inner.name,
            total_pages,
            page_bytes >> 20,
            inner.transport.kind()
        );
        Ok(PdReceiver {
            inner,
            tasks,
            ports: (init_bound, alloc_bound),
        })
    }

    /// The bound (init, alloc) ports.
    pub fn ports(&self) -> (u16, u16) {
        self.ports
    }

    /// The receiver's metrics (P/D buffer usage included).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Current buffer occupancy.
    pub fn usage(&self) -> BufferUsage {
        self.inner.usage()
    }

    /// Tokens of the longest prefix of `tokens` whose chunks are committed here.
    pub fn lookup(&self, tokens: &[u32]) -> usize {
        let pages = self.inner.pages.lock().expect("lock");
        let mut hit = 0;
        self.inner.hasher.for_each_span(tokens, |span| {
            let ok = pages.is_committed(&span.key, None);
            if ok {
                hit = span.end;
            }
            ok
        });
        hit
    }

    /// Loads the committed KV of the longest prefix of `tokens` into `out` (laid out as for
    /// [`crate::Engine::store`]) and frees those pages; returns the tokens loaded.
    pub async fn retrieve(&self, req_id: &str, tokens: &[u32], out: &mut [u8]) -> Result<usize> {
        let inner = &self.inner;
        let bpt = inner.model.bytes_per_token();
        if out.len() != tokens.len() * bpt {
            return Err(PdError::Shape(format!(
                "P/D retrieve: {} bytes for {} tokens; model needs {bpt} per token",
                out.len(),
                tokens.len()
            )));
        }
        let taken: Vec<(u32, u32)> = self
            .take_prefix(tokens)
            .into_iter()
            .map(|(span, index)| (index, span.tokens() as u32))
            .collect();
        let row = inner.model.chunk_shape(1).row_bytes();
        let total = tokens.len();
        let buffer = &inner.buffer;
        let page_bytes = inner.page_bytes;
        out.par_chunks_mut((total * row).max(1))
            .enumerate()
            .for_each(|(plane, dst)| {
                let mut at = 0;
                for &(index, chunk_tokens) in &taken {
                    let seg = chunk_tokens as usize * row;
                    buffer.read_at(
                        index as usize * page_bytes + plane * seg,
                        &mut dst[at..at + seg],
                    );
                    at += seg;
                }
            });
        let loaded: usize = taken.iter().map(|&(_, t)| t as usize).sum();
        inner.release(taken.iter().map(|&(i, _)| i));
        tracing::info!("P/D retrieve {req_id}: {loaded} of {total} tokens from the P/D buffer");
        Ok(loaded)
    }

    /// Takes the committed prefix of `tokens` out of the buffer, hands each chunk to
    /// `copy_out(span, read)` — `read(offset, dst)` copies the chunk payload's bytes at
    /// `offset` into `dst` — and frees those pages; returns the tokens taken. For callers
    /// that keep KV in their own layout (a paged cache's blocks).
    pub fn retrieve_with<F>(&self, req_id: &str, tokens: &[u32], mut copy_out: F) -> usize
    where
        F: FnMut(&ChunkSpan, &dyn Fn(usize, &mut [u8])),
    {
        let inner = &self.inner;
        let taken = self.take_prefix(tokens);
        let page_bytes = inner.page_bytes;
        for (span, index) in &taken {
            let base = *index as usize * page_bytes;
            let payload = span.tokens() * inner.model.bytes_per_token();
            let read = |offset: usize, dst: &mut [u8]| {
                assert!(
                    offset + dst.len() <= payload,
                    "read past the chunk's payload"
                );
                inner.buffer.read_at(base + offset, dst);
            };
            copy_out(span, &read);
        }
        let loaded = taken.last().map_or(0, |(span, _)| span.end);
        inner.release(taken.iter().map(|&(_, i)| i));
        tracing::info!(
            "P/D retrieve {req_id}: {loaded} of {} tokens from the P/D buffer",
            tokens.len()
        );
        loaded
    }

    /// Takes the committed prefix of `tokens` out of the page map: from then on the pages
    /// are the caller's, to read and release.
    fn take_prefix(&self, tokens: &[u32]) -> Vec<(ChunkSpan, u32)> {
        let inner = &self.inner;
        let mut taken = Vec::new();
        let mut pages = inner.pages.lock().expect("lock");
        inner.hasher.for_each_span(tokens, |span| {
            // The page must hold exactly this span's tokens (a sender's `Alloc` said how
            // many; a disagreeing one is not this span's KV).
            match pages.take_committed(&span.key, span.tokens()) {
                Some(index) => {
                    taken.push((span, index));
                    true
                }
                None => false,
            }
        });
        taken
    }
}

impl Inner {
    fn usage(&self) -> BufferUsage {
        self.usage_of(&self.pages.lock().expect("lock"))
    }

    fn usage_of(&self, pages: &PageTable) -> BufferUsage {
        BufferUsage {
            used_pages: pages.held(),
            quarantined_pages: pages.quarantined(),
            total_pages: self.total_pages,
            page_bytes: self.page_bytes,
        }
    }

    /// Sets the buffer gauges from `pages`. Called with the page lock held: two tasks that
    /// changed the table one after the other set the gauges in that order too, so the last
    /// value set is never an older state's.
    fn publish(&self, pages: &PageTable) {
        let u = self.usage_of(pages);
        self.metrics
            .pd_buffer_used_bytes
            .set((u.used_pages * u.page_bytes) as i64);
        self.metrics
            .pd_buffer_quarantined_bytes
            .set((u.quarantined_pages * u.page_bytes) as i64);
    }

    /// Frees pages whose writes are done (committed and consumed): reusable at once.
    fn release(&self, indices: impl IntoIterator<Item = u32>) {
        {
            let mut pages = self.pages.lock().expect("lock");
            pages.release(indices);
            self.publish(&pages);
        }
        self.space.notify_waiters();
    }

    /// Frees pages that writes may still target — an abort, a sender gone or silent, a
    /// chunk that failed its checksum — after a quarantine of the transport timeout: a
    /// write queued or posted before the free lands or fails within it, instead of landing
    /// in the next request's page after that request's checksum was verified.
    fn quarantine(&self, indices: impl IntoIterator<Item = u32>) {
        let until = Instant::now() + self.quarantine;
        let mut pages = self.pages.lock().expect("lock");
        pages.quarantine(indices, until);
        self.publish(&pages);
    }

    /// Returns pages whose quarantine ended to the free list and wakes allocations.
    fn thaw(&self) {
        let n = {
            let mut pages = self.pages.lock().expect("lock");
            let n = pages.thaw(Instant::now());
            if n > 0 {
                self.publish(&pages);
            }
            n
        };
        if n > 0 {
            self.space.notify_waiters();
        }
    }

    /// Frees the pages `doomed` picks; returns how many. Committed pages (their writes
    /// done) are reusable at once; the others go through the quarantine. No write is
    /// admitted to any of them from then on.
    fn reclaim(&self, doomed: impl FnMut(&Page) -> bool) -> usize {
        let (done, undone) = {
            let mut pages = self.pages.lock().expect("lock");
            let (done, undone) = pages.reclaim(doomed);
            self.grants.revoke(undone.iter().copied());
            (done, undone)
        };
        let n = done.len() + undone.len();
        if n > 0 {
            self.metrics.pd_reclaimed_pages.inc_by(n as u64);
            self.release(done);
            self.quarantine(undone);
        }
        n
    }

    /// Allocates pages for `chunks` of `req_id` on control connection `conn`, granted to
    /// the data connection `writer` names (0: none, so no one can write them).
    async fn alloc(
        &self,
        conn: u64,
        req_id: &str,
        chunks: &[ChunkRequest],
        writer: u64,
    ) -> Message {
        let max_tokens = self.hasher.chunk_size() as u32;
        if let Some(bad) = chunks
            .iter()
            .find(|c| c.tokens == 0 || c.tokens > max_tokens)
        {
            return Message::Error {
                reason: format!(
                    "chunk {} has {} tokens; chunk_size is {max_tokens}",
                    bad.key, bad.tokens
                ),
            };
        }
        let asked: Vec<(ChunkKey, u32)> = chunks.iter().map(|c| (c.key, c.tokens)).collect();
        let failed = |failure, needed: usize| Message::AllocFailed {
            req_id: req_id.into(),
            failure,
            needed_bytes: (needed * self.page_bytes) as u64,
            buffer_bytes: (self.total_pages * self.page_bytes) as u64,
        };
        let deadline = tokio::time::Instant::now() + self.alloc_timeout;
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            // When the oldest quarantined page comes free: a waiter wakes then by itself
            // (a thaw by another allocation takes what it needs and may leave the rest).
            let (grant, next_thaw) = {
                let mut pages = self.pages.lock().expect("lock");
                let now = Instant::now();
                let thawed = pages.thaw(now) > 0;
                if thawed {
                    self.space.notify_waiters();
                }
                let grant = pages.alloc(conn, req_id, &asked, now);
                if let (Grant::Placed(placed), true) = (&grant, writer != 0) {
                    // Granted under the page lock: a page cannot be reclaimed in between.
                    let fresh = placed.iter().filter_map(|p| match p {
                        Placed::Page(index) => Some(*index),
                        Placed::Held => None,
                    });
                    self.grants.grant(WriterId(writer), fresh);
                }
                if thawed || matches!(grant, Grant::Placed(_)) {
                    self.publish(&pages);
                }
                (grant, pages.next_thaw())
            };
            let needed = match grant {
                Grant::Placed(placed) => {
                    let slots = placed
                        .into_iter()
                        .map(|p| match p {
                            Placed::Held => Slot::Held,
                            Placed::Page(index) => Slot::Page {
                                offset: (index as usize * self.page_bytes) as u64,
                            },
                        })
                        .collect();
                    return Message::Allocated {
                        req_id: req_id.into(),
                        slots,
                    };
                }
                Grant::NeverFits { needed } => return failed(AllocFailure::NeverFits, needed),
                Grant::Wait { needed } => needed,
            };
            let wake = match next_thaw {
                Some(t) => tokio::time::Instant::from_std(t).min(deadline),
                None => deadline,
            };
            let woken = tokio::select! {
                _ = &mut space => true,
                _ = tokio::time::sleep_until(wake) => wake < deadline,
            };
            if !woken {
                return failed(AllocFailure::Timeout, needed);
            }
        }
    }

    /// Makes the committed chunks of `req_id` visible once their bytes match the sender's
    /// checksums. Only pages this connection allocated for this request can be committed;
    /// their write grants end first, so no byte changes after it was checked. A chunk whose
    /// bytes differ (changed in flight, or written by someone else) is freed and counted in
    /// `kvtier_corrupt_chunks_total{tier="pd"}`: a miss at the decoder, never wrong KV.
    async fn commit(&self, conn: u64, req_id: &str, chunks: &[ChunkCommit]) -> Message {
        // Where each chunk landed, checked (and closed to writes) under the lock ...
        let located = {
            let pages = self.pages.lock().expect("lock");
            let located: Result<Vec<_>, _> = chunks
                .iter()
                .map(|c| {
                    pages
                        .locate(conn, req_id, c.key)
                        .map(|(index, tokens)| (*c, index, tokens))
                })
                .collect();
            match located {
                Ok(l) => {
                    self.grants.revoke(l.iter().map(|&(_, index, _)| index));
                    l
                }
                Err(refused) => {
                    return Message::Error {
                        reason: refused.to_string(),
                    }
                }
            }
        };
        // ... once writes admitted before have landed (a sender commits after its writes
        // completed, so this waits only for a peer racing its own commit) ...
        let indices: Vec<u32> = located.iter().map(|&(_, index, _)| index).collect();
        let quiet = self.grants.wait_landed(&indices, self.timeout).await;
        // ... hashed outside the lock ...
        let bpt = self.model.bytes_per_token();
        let intact: Vec<bool> = located
            .par_iter()
            .map(|(c, index, tokens)| {
                let at = *index as usize * self.page_bytes;
                quiet && self.buffer.digest(at, *tokens as usize * bpt) == c.checksum
            })
            .collect();
        // ... and made visible (or freed) under it again, if still the same page.
        let mut corrupt = Vec::new();
        let mut committed = 0u64;
        {
            let mut pages = self.pages.lock().expect("lock");
            let now = Instant::now();
            for ((c, index, _), ok) in located.iter().zip(intact) {
                match pages.finish_commit(req_id, c.key, *index, ok, now) {
                    Committed::Visible => committed += 1,
                    Committed::Corrupt(index) => corrupt.push((c.key, index)),
                    Committed::Gone => {}
                }
            }
        }
        if !corrupt.is_empty() {
            for (key, _) in &corrupt {
                tracing::error!(
                    "P/D receiver: chunk {key} of {req_id} does not match its checksum \
                     (changed in flight); dropped, the decoder computes it"
                );
            }
            self.metrics
                .corrupt_chunks
                .with_label_values(&["pd"])
                .inc_by(corrupt.len() as u64);
            self.quarantine(corrupt.iter().map(|&(_, index)| index));
        }
        self.metrics.pd_chunks.inc_by(committed);
        Message::Committed {
            req_id: req_id.into(),
        }
    }
}

async fn listen(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some((stream, permit)) = inner.limit.admit_or_refuse(stream, &peer) else {
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn_id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
            let mut closing = inner.closing.subscribe();
            let accepted = ControlConn::accept(
                stream,
                Service::PdReceiver,
                &inner.name,
                inner.secret.as_deref(),
                inner.timeout,
            )
            .await;
            match accepted {
                Ok(conn) => {
                    let peer = conn.peer().to_string();
                    let served = tokio::select! {
                        r = serve(&inner, conn, conn_id) => r,
                        _ = closing.wait_for(|c| *c) => Ok(()),
                    };
                    if let Err(e) = served {
                        if !matches!(&e, PdError::Control(c) if c.is_closed()) {
                            tracing::error!("P/D receiver {}: {peer}: {e}; closing", inner.name);
                        }
                    }
                }
                Err(e) => tracing::warn!("P/D receiver {}: {e}", inner.name),
            }
            // A sender that leaves takes its unfinished allocations with it.
            let n = inner.reclaim(|p| p.conn == conn_id && !p.committed);
            if n > 0 {
                tracing::warn!(
                    "P/D receiver {}: reclaimed {n} uncommitted pages of a closed sender",
                    inner.name
                );
            }
        });
    }
}

async fn serve(inner: &Inner, mut conn: ControlConn, conn_id: u64) -> Result<(), PdError> {
    loop {
        let answer = match conn
            .recv_idle(inner.control_idle)
            .await
            .map_err(PdError::from)?
        {
            Message::GetDescriptor => match inner.transport.local_descriptor() {
                Ok(descriptor) => Message::Descriptor {
                    transport: inner.transport.kind().into(),
                    page_bytes: inner.page_bytes as u64,
                    descriptor,
                },
                Err(e) => Message::Error {
                    reason: e.to_string(),
                },
            },
            Message::Alloc {
                req_id,
                chunks,
                writer,
            } => inner.alloc(conn_id, &req_id, &chunks, writer).await,
            Message::Commit { req_id, chunks } => inner.commit(conn_id, &req_id, &chunks).await,
            Message::Abort { req_id } => {
                inner.reclaim(|p| p.conn == conn_id && p.req_id == req_id && !p.committed);
                Message::Committed { req_id }
            }
            other => return Err(control::unexpected(&conn, &other)),
        };
        match reply_within(inner.timeout, conn.send(&answer)).await {
            Ok(()) => {}
            Err(ReplyError::Failed(e)) => return Err(e.into()),
            Err(ReplyError::Stalled(after)) => {
                return Err(PdError::Timeout {
                    what: format!("{} to read an answer", conn.peer()),
                    after,
                })
            }
        }
    }
}

/// Frees pages of senders that went silent and, with `pd_enable_gc`, committed pages no
/// one retrieved within `pd_ttl_sec`.
async fn collect_garbage(inner: Arc<Inner>) {
    // A sender stages, writes (each bounded by its transport timeout) and commits after
    // its allocation; only pages far past that are abandoned.
    let stale_uncommitted = inner.alloc_timeout + 4 * inner.timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        inner.thaw();
        if let Some(ttl) = inner.ttl {
            let n = inner.reclaim(|p| p.committed && p.since.elapsed() > ttl);
            if n > 0 {
                tracing::warn!(
                    "P/D receiver {}: freed {n} received chunks no request claimed within \
                     {ttl:?} (pd_ttl_sec)",
                    inner.name
                );
            }
        }
        let mut abandoned = Vec::new();
        let n = inner.reclaim(|p| {
            let stale = !p.committed && p.since.elapsed() > stale_uncommitted;
            if stale && !abandoned.contains(&p.req_id) {
                abandoned.push(p.req_id.clone());
            }
            stale
        });
        if n > 0 {
            tracing::warn!(
                "P/D receiver {}: reclaimed {n} pages allocated more than {stale_uncommitted:?} \
                 ago and never committed (requests {}): their sender went silent",
                inner.name,
                abandoned.join(", ")
            );
        }
    }
}

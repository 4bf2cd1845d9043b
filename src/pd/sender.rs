//! The sender (prefiller) side: stages chunks in a registered buffer, writes them
//! one-sided into the receiver's pages, commits, and tells the proxy.
//!
//! Sends run concurrently, to one receiver or many: each takes staging pages for one wave
//! at a time (after the receiver granted room for it, so a full decoder holds no staging
//! memory while it makes a sender wait) and a control connection of its own (the receiver
//! ties pages to the connection that allocated them). No lock is held across a network
//! wait; the receiver's buffer and the staging pages are the only back-pressure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::Staging;
use kvtier_transport::{
    Connection, Descriptor, RegionId, RegistrationHandle, RemoteIov, Transport,
};

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
    /// room at the receiver and for staging pages, staging, one-sided writes and commits
    /// (not connecting).
    pub elapsed: Duration,
}

/// Idle control connections kept per receiver.
const MAX_IDLE_CONTROL: usize = 8;

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

/// Poisons a link unless disarmed: a data-plane write that failed, or whose future was
/// dropped, may have left the data connection out of step. (A send's control connection is
/// its own: an error or a dropped future drops it, and the link stays usable.)
struct PoisonGuard<'a> {
    link: &'a Link,
    armed: bool,
}

impl Drop for PoisonGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.link.poisoned.store(true, Ordering::Release);
        }
    }
}

/// A P/D sender. Cheap to share (`Arc`); sends to any number of receivers.
pub struct PdSender {
    name: String,
    model: ModelSpec,
    hasher: ChunkHasher,
    transport: Box<dyn Transport>,
    /// Pages each send takes for one wave at a time.
    staging: Staging,
    staging_reg: Option<RegistrationHandle>,
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
        let staging = Staging::new(staging_pages, page_bytes);
        let staging_reg = transport.register(staging.buffer().clone())?;
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
            staging_reg: Some(staging_reg),
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
    /// that does not answer reclaims them when the connection closes).
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
        let row = self.model.chunk_shape(1).row_bytes();
        let planes = self.model.layout.kv_factor() * self.model.layers as usize;
        let total = tokens.len();
        let fill = |span: &ChunkSpan, page: &mut [u8]| {
            let seg = span.tokens() * row;
            for (plane, dst) in page.chunks_exact_mut(seg).take(planes).enumerate() {
                let src = (plane * total + span.start) * row;
                dst.copy_from_slice(&kv[src..src + seg]);
            }
        };
        self.send_checked(req_id, tokens, checked, &fill, to).await
    }

    /// Like [`PdSender::send`], with each chunk's payload written by `fill` (called in
    /// parallel with the chunk's span and its staging page of
    /// [`crate::ChunkShape::payload_len`] bytes, which it must overwrite whole): the way
    /// to send KV that lives in the caller's own layout (a paged cache's blocks) with one
    /// copy.
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
        self.send_checked(req_id, tokens, Ok(()), &fill, to).await
    }

    async fn send_checked<F>(
        &self,
        req_id: &str,
        tokens: &[u32],
        checked: Result<()>,
        fill: &F,
        to: &ReceiverSpec,
    ) -> Result<SendReport>
    where
        F: Fn(&ChunkSpan, &mut [u8]) + Sync,
    {
        let start = Instant::now();
        let result = match checked {
            Ok(()) => self.send_inner(req_id, tokens, fill, to).await,
            Err(e) => Err(e),
        };
        let link_broken = match &result {
            // The receiver answered: the link is fine, this request did not fit.
            Err(
                PdError::NeverFits { .. }
                | PdError::BufferFull { .. }
                | PdError::StagingFull { .. },
            ) => false,
            Err(_) => true,
            Ok(_) => false,
        };
        if link_broken {
            // Rebuilt on the next send (sends already using it keep their handle).
            self.links.lock().await.remove(to);
        }
        if let Some(proxy) = &self.proxy {
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
        }
        result
    }

    async fn send_inner<F>(
        &self,
        req_id: &str,
        tokens: &[u32],
        fill: &F,
        to: &ReceiverSpec,
    ) -> Result<SendReport>
    where
        F: Fn(&ChunkSpan, &mut [u8]) + Sync,
    {
        let bpt = self.model.bytes_per_token();
        let spans = self.hasher.spans(tokens);
        let link = self.link(to).await?;
        // Ours alone until the send ends: an error or a dropped future drops it.
        let (mut control, mut reused) = self.checkout(&link).await?;
        // The transfer proper: from the first allocation to the last commit.
        let start = Instant::now();
        let mut report = SendReport::default();
        for wave in spans.chunks(self.staging.pages()) {
            let chunks: Vec<ChunkRequest> = wave
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
            };
            let mut answer = control.request(&alloc, self.timeout * 4).await;
            if reused && matches!(&answer, Err(e) if e.is_closed()) {
                // A pooled connection the receiver closed while it sat idle: nothing was
                // allocated on it (allocations die with their connection); ask afresh.
                control = self.connect_control(&link).await?;
                answer = control.request(&alloc, self.timeout * 4).await;
            }
            reused = false;
            let answer = answer?;
            let slots = match answer {
                Message::Allocated { req_id: r, slots }
                    if r == req_id && slots.len() == wave.len() =>
                {
                    slots
                }
                Message::AllocFailed {
                    failure: AllocFailure::NeverFits,
                    needed_bytes,
                    buffer_bytes,
                    ..
                } => {
                    return Err(PdError::NeverFits {
                        req_id: req_id.into(),
                        needed_bytes,
                        buffer_bytes,
                    })
                }
                Message::AllocFailed {
                    failure: AllocFailure::Timeout,
                    ..
                } => {
                    return Err(PdError::BufferFull {
                        req_id: req_id.into(),
                        after: self.timeout,
                    })
                }
                other => return Err(control::unexpected(&control, &other)),
            };
            let todo: Vec<(&ChunkSpan, u64)> = wave
                .iter()
                .zip(&slots)
                .filter_map(|(s, slot)| match slot {
                    Slot::Page { offset } => Some((s, *offset)),
                    Slot::Held => None,
                })
                .collect();
            report.skipped_tokens += wave
                .iter()
                .zip(&slots)
                .filter(|(_, s)| **s == Slot::Held)
                .map(|(s, _)| s.tokens())
                .sum::<usize>();
            if todo.is_empty() {
                continue;
            }
            let lens: Vec<usize> = todo.iter().map(|(s, _)| s.tokens() * bpt).collect();
            // Bounded: the receiver reclaims pages left uncommitted too long, and a write
            // that lands after that could reach a page it gave to another request.
            let Ok(mut pages) =
                tokio::time::timeout(self.timeout, self.staging.acquire(todo.len())).await
            else {
                self.abort(&mut control, req_id).await;
                return Err(PdError::StagingFull {
                    req_id: req_id.into(),
                    pages: self.staging.pages(),
                    after: self.timeout,
                });
            };
            pages.fill(&lens, |i, page| fill(todo[i].0, page));
            // What the receiver checks before the chunk becomes visible: bytes that changed
            // on the way are a miss there, never wrong KV.
            let checksums = pages.digests(&lens);
            let reg = self.staging_reg.as_ref().expect("registered while alive");
            let local = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| reg.iov(pages.offset(i), len))
                .collect::<Result<Vec<_>, _>>()?;
            let remote: Vec<RemoteIov> = todo
                .iter()
                .map(|(s, offset)| RemoteIov {
                    region: link.region,
                    offset: *offset,
                    len: (s.tokens() * bpt) as u64,
                })
                .collect();
            let mut guard = PoisonGuard {
                link: &link,
                armed: true,
            };
            let written = link.data.write(&local, &remote).await;
            guard.armed = written.is_err();
            drop(guard);
            if let Err(e) = written {
                self.abort(&mut control, req_id).await;
                return Err(e.into());
            }
            // The bytes are at the receiver: the pages can serve another send.
            drop(pages);
            let chunks = todo
                .iter()
                .zip(checksums)
                .map(|((s, _), checksum)| ChunkCommit {
                    key: s.key,
                    checksum,
                })
                .collect();
            match control
                .request(
                    &Message::Commit {
                        req_id: req_id.into(),
                        chunks,
                    },
                    self.timeout,
                )
                .await?
            {
                Message::Committed { req_id: r } if r == req_id => {}
                other => return Err(control::unexpected(&control, &other)),
            }
            report.tokens += todo.iter().map(|(s, _)| s.tokens()).sum::<usize>();
            report.bytes += remote.iter().map(|r| r.len).sum::<u64>();
            self.metrics.pd_chunks.inc_by(todo.len() as u64);
        }
        report.elapsed = start.elapsed();
        let mut idle = link.idle.lock();
        if idle.len() < MAX_IDLE_CONTROL {
            idle.push(control);
        }
        drop(idle);
        tracing::info!(
            "P/D sent {req_id}: {} tokens ({} already at the receiver) to {}:{} in {:.2} ms ({:.2} GB/s)",
            report.tokens,
            report.skipped_tokens,
            to.host,
            to.init_port,
            report.elapsed.as_secs_f64() * 1e3,
            gb_per_s(report.bytes, report.elapsed)
        );
        Ok(report)
    }
}

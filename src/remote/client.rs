//! The engine's side of the kvtier store: batched put/get/exists/remove. Metadata goes to
//! the master (found through etcd, or at a fixed address); bytes go straight between a
//! registered staging buffer here and the nodes' segments through the transport.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use parking_lot::Mutex;
use tokio::sync::Notify;
use xxhash_rust::xxh3::Xxh3;

use super::alloc::RangeAllocator;
use super::etcd::Etcd;
use super::rpc::{
    Located, ObjectKey, ObjectMeta, PutSlot, Request, Response, RpcConn, SegmentInfo, StoreStats,
};
use super::RemoteError;
use crate::config::TransferChannel;
use crate::memory::{BufferPool, KvBuffer};
use crate::transport::{
    self, Connection, HostBuffer, RegionId, RegistrationHandle, RemoteIov, Transport,
    TransportConfig,
};

/// Bytes copied and hashed at a time (stays in L2 between the copy and the hash).
const BLOCK: usize = 256 << 10;

/// How a client reaches the store.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The master's address, used when etcd is absent or names no leader.
    pub master: Option<String>,
    /// Where the current leader is published.
    pub etcd: Option<Etcd>,
    /// Data-plane transport (must match the nodes').
    pub protocol: TransferChannel,
    /// Transport settings (timeout, auth token, local address).
    pub transport: TransportConfig,
    /// Registered staging memory (`local_buffer_size`): bounds bytes in flight.
    pub staging_bytes: u64,
    /// Copies of each object (`replica_num`).
    pub replicas: u8,
}

/// What happened to one object of a put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written and committed.
    Stored,
    /// The store had it already.
    Exists,
    /// No room in the pool.
    NoSpace,
    /// A transfer failed; the master freed the room.
    Failed,
}

struct Link {
    info: SegmentInfo,
    conn: Box<dyn Connection>,
}

/// A connection to a kvtier store. Cheap to clone.
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    staging: Arc<HostBuffer>,
    staging_alloc: Mutex<RangeAllocator>,
    staging_freed: Notify,
    master: tokio::sync::Mutex<Option<RpcConn>>,
    leader_hint: Mutex<Option<String>>,
    segments: Mutex<HashMap<u64, SegmentInfo>>,
    links: tokio::sync::Mutex<HashMap<u64, Arc<Link>>>,
    // Declared last: dropped after the links.
    registration: RegistrationHandle,
    transport: Box<dyn Transport>,
}

/// A range of the staging buffer, returned when dropped.
struct Staged<'a> {
    inner: &'a Inner,
    offset: u64,
    len: u64,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        self.inner.staging_alloc.lock().free(self.offset, self.len);
        self.inner.staging_freed.notify_waiters();
    }
}

fn cpu_bound<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl StoreClient {
    /// Opens the transport and registers the staging buffer. Does not contact the master
    /// or etcd: that happens on the first call, and again whenever they were unreachable.
    pub fn new(config: ClientConfig) -> Result<StoreClient, RemoteError> {
        let staging_len = usize::try_from(config.staging_bytes.max(1 << 20))
            .map_err(|_| RemoteError::Config("local_buffer_size too large".into()))?;
        let transport = transport::open(config.protocol, config.transport.clone())
            .map_err(|e| RemoteError::Transport(e.to_string()))?;
        let staging = Arc::new(HostBuffer::new(staging_len));
        let registration = transport
            .register(staging.clone())
            .map_err(|e| RemoteError::Transport(e.to_string()))?;
        Ok(StoreClient {
            inner: Arc::new(Inner {
                staging_alloc: Mutex::new(RangeAllocator::new(staging_len as u64)),
                staging_freed: Notify::new(),
                staging,
                master: tokio::sync::Mutex::new(None),
                leader_hint: Mutex::new(None),
                segments: Mutex::new(HashMap::new()),
                links: tokio::sync::Mutex::new(HashMap::new()),
                registration,
                transport,
                config,
            }),
        })
    }

    /// The client's settings.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    async fn master_addrs(&self) -> Vec<String> {
        let mut addrs = Vec::new();
        if let Some(hint) = self.inner.leader_hint.lock().take() {
            addrs.push(hint);
        }
        if let Some(etcd) = &self.inner.config.etcd {
            match etcd.get(&etcd.key("master")).await {
                Ok(Some(v)) => addrs.push(String::from_utf8_lossy(&v).into_owned()),
                Ok(None) => {}
                Err(e) => tracing::debug!("remote store: etcd: {e}"),
            }
        }
        if let Some(m) = &self.inner.config.master {
            addrs.push(m.clone());
        }
        addrs.dedup();
        addrs
    }

    /// Sends `req` to the leader, finding it again (etcd, redirects) if needed.
    async fn call(&self, req: &Request) -> Result<Response, RemoteError> {
        let timeout = self.inner.config.transport.timeout;
        let secret = self.inner.config.transport.auth_token.clone();
        let mut last = RemoteError::NoMaster("no master address configured or published".into());
        let mut guard = self.inner.master.lock().await;
        for _ in 0..3 {
            if guard.is_none() {
                for addr in self.master_addrs().await {
                    match RpcConn::connect(&addr, secret.as_deref(), timeout).await {
                        Ok(c) => {
                            *guard = Some(c);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
            }
            let Some(conn) = guard.as_mut() else {
                break;
            };
            match conn.call(req, timeout).await {
                Ok(Response::NotLeader { leader }) => {
                    *guard = None;
                    last =
                        RemoteError::NoMaster(format!("{} is not the leader", conn_peer(&leader)));
                    if !leader.is_empty() {
                        *self.inner.leader_hint.lock() = Some(leader);
                    } else {
                        break;
                    }
                }
                Ok(Response::Error(reason)) => {
                    return Err(RemoteError::Rpc {
                        peer: conn.peer.clone(),
                        reason,
                    })
                }
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    *guard = None;
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Stores objects (each given as the parts to concatenate). Objects the store already
    /// holds are not sent again.
    pub async fn put(
        &self,
        objects: &[(ObjectKey, Vec<&[u8]>)],
    ) -> Result<Vec<PutOutcome>, RemoteError> {
        let mut out = Vec::with_capacity(objects.len());
        let capacity = self.inner.staging_alloc.lock().capacity();
        let mut start = 0;
        while start < objects.len() {
            // A wave: as many objects as the staging buffer holds at once.
            let mut end = start;
            let mut bytes = 0u64;
            while end < objects.len() {
                let len = object_len(&objects[end].1);
                if len > capacity {
                    return Err(RemoteError::Config(format!(
                        "object of {len} bytes exceeds the {capacity}-byte staging buffer \
                         (`extra_config.local_buffer_size`)"
                    )));
                }
                if end > start && bytes + len > capacity {
                    break;
                }
                bytes += len;
                end += 1;
            }
            out.extend(self.put_wave(&objects[start..end]).await?);
            start = end;
        }
        Ok(out)
    }

    async fn put_wave(
        &self,
        objects: &[(ObjectKey, Vec<&[u8]>)],
    ) -> Result<Vec<PutOutcome>, RemoteError> {
        let lens: Vec<u64> = objects.iter().map(|(_, p)| object_len(p)).collect();
        let staged = self.stage(&lens).await;
        let staging = &self.inner.staging;
        let metas: Vec<ObjectMeta> = cpu_bound(|| {
            use rayon::prelude::*;
            objects
                .par_iter()
                .zip(&staged)
                .map(|((_, parts), s)| {
                    // Copy and hash block by block: the hash reads what the copy just
                    // brought into cache, one pass over memory instead of two.
                    let mut hasher = Xxh3::new();
                    let mut at = s.offset as usize;
                    for part in parts {
                        for block in part.chunks(BLOCK) {
                            staging.write_at(at, block);
                            hasher.update(block);
                            at += block.len();
                        }
                    }
                    ObjectMeta {
                        len: s.len,
                        checksum: hasher.digest(),
                    }
                })
                .collect()
        });
        let request = Request::PutStart {
            replicas: self.inner.config.replicas,
            objects: objects.iter().map(|(k, _)| *k).zip(metas).collect(),
        };
        let slots = match self.call(&request).await? {
            Response::PutStart(s) if s.len() == objects.len() => s,
            other => return Err(unexpected("PutStart", &other)),
        };
        let writes = slots.iter().zip(&staged).map(|(slot, s)| async move {
            match slot {
                PutSlot::Write(replicas) => {
                    let mut ok = !replicas.is_empty();
                    for r in replicas {
                        if let Err(e) = self.transfer(true, r.segment, s, r.offset).await {
                            tracing::warn!("remote store: put: {e}");
                            ok = false;
                            break;
                        }
                    }
                    if ok {
                        PutOutcome::Stored
                    } else {
                        PutOutcome::Failed
                    }
                }
                PutSlot::Exists => PutOutcome::Exists,
                PutSlot::NoSpace => PutOutcome::NoSpace,
            }
        });
        let mut outcomes = join_all(writes).await;
        drop(staged);
        for ok in [true, false] {
            let keys: Vec<ObjectKey> = objects
                .iter()
                .zip(&slots)
                .zip(&outcomes)
                .filter(|((_, slot), outcome)| {
                    matches!(slot, PutSlot::Write(_)) && (**outcome == PutOutcome::Stored) == ok
                })
                .map(|(((k, _), _), _)| *k)
                .collect();
            if keys.is_empty() {
                continue;
            }
            let committed = match self
                .call(&Request::PutEnd {
                    ok,
                    keys: keys.clone(),
                })
                .await?
            {
                Response::PutEnd(c) if c.len() == keys.len() => c,
                other => return Err(unexpected("PutEnd", &other)),
            };
            if ok {
                // A put the master reclaimed (it took too long) did not store anything.
                for (key, done) in keys.iter().zip(committed) {
                    if !done {
                        if let Some(i) = objects.iter().position(|(k, _)| k == key) {
                            outcomes[i] = PutOutcome::Failed;
                        }
                    }
                }
            }
        }
        Ok(outcomes)
    }

    /// Reserves room for one object of `len` bytes and never finishes the put: what a
    /// client that dies mid-put leaves behind (the master reclaims it after
    /// `put_timeout`). For fault tests.
    pub async fn put_start_only(&self, key: ObjectKey, len: u64) -> Result<(), RemoteError> {
        let request = Request::PutStart {
            replicas: self.inner.config.replicas,
            objects: vec![(key, ObjectMeta { len, checksum: 0 })],
        };
        match self.call(&request).await? {
            Response::PutStart(s) if matches!(s.first(), Some(PutSlot::Write(_))) => Ok(()),
            other => Err(unexpected("PutStart", &other)),
        }
    }

    /// Reads objects; each hit is split after `header` bytes into a small vector and a
    /// pooled buffer. A miss, an unreachable replica, an expired lease or a checksum
    /// mismatch all read as `None`: never wrong bytes.
    pub async fn get(
        &self,
        keys: &[ObjectKey],
        header: usize,
        pool: &BufferPool,
    ) -> Result<Vec<Option<(Vec<u8>, KvBuffer)>>, RemoteError> {
        let located = match self.call(&Request::Get(keys.to_vec())).await? {
            Response::Get(found) if found.len() == keys.len() => found,
            other => return Err(unexpected("Get", &other)),
        };
        let granted = Instant::now();
        let capacity = self.inner.staging_alloc.lock().capacity();
        let mut out = Vec::with_capacity(keys.len());
        let mut start = 0;
        while start < located.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < located.len() {
                let len = located[end].as_ref().map_or(0, |l| l.meta.len);
                if end > start && bytes + len > capacity {
                    break;
                }
                bytes += len;
                end += 1;
            }
            out.extend(
                self.get_wave(&located[start..end], granted, header, pool)
                    .await,
            );
            start = end;
        }
        Ok(out)
    }

    async fn get_wave(
        &self,
        located: &[Option<Located>],
        granted: Instant,
        header: usize,
        pool: &BufferPool,
    ) -> Vec<Option<(Vec<u8>, KvBuffer)>> {
        let capacity = self.inner.staging_alloc.lock().capacity();
        let lens: Vec<u64> = located
            .iter()
            .map(|l| l.as_ref().map_or(0, |l| l.meta.len).min(capacity))
            .collect();
        let staged = self.stage(&lens).await;
        let reads = located.iter().zip(&staged).map(|(loc, s)| async move {
            let loc = loc.as_ref()?;
            if loc.meta.len > capacity || (loc.meta.len as usize) < header {
                return None;
            }
            let lease = Duration::from_millis(loc.lease_ms as u64);
            for r in &loc.replicas {
                match self.transfer(false, r.segment, s, r.offset).await {
                    // Bytes read after the lease ended may have been reused: discard.
                    Ok(()) if granted.elapsed() < lease => return Some(()),
                    Ok(()) => tracing::warn!("remote store: read finished after its lease; miss"),
                    Err(e) => tracing::warn!("remote store: get: {e}"),
                }
            }
            None
        });
        let read = join_all(reads).await;
        let staging = &self.inner.staging;
        cpu_bound(|| {
            use rayon::prelude::*;
            located
                .par_iter()
                .zip(&staged)
                .zip(read)
                .map(|((loc, s), ok)| {
                    ok?;
                    let loc = loc.as_ref()?;
                    let (off, len) = (s.offset as usize, s.len as usize);
                    // Copy out and hash block by block (one pass over memory).
                    let mut hasher = Xxh3::new();
                    let head = staging.to_vec(off, header);
                    hasher.update(&head);
                    let mut body = pool.alloc(len - header);
                    let mut at = off + header;
                    for block in body.chunks_mut(BLOCK) {
                        staging.read_at(at, block);
                        hasher.update(block);
                        at += block.len();
                    }
                    if hasher.digest() != loc.meta.checksum {
                        tracing::warn!("remote store: checksum mismatch; treated as a miss");
                        return None;
                    }
                    Some((head, body))
                })
                .collect()
        })
    }

    /// Which objects the store holds.
    pub async fn exists(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, RemoteError> {
        match self.call(&Request::Exists(keys.to_vec())).await? {
            Response::Flags(f) if f.len() == keys.len() => Ok(f),
            other => Err(unexpected("Exists", &other)),
        }
    }

    /// Removes objects; returns which were held.
    pub async fn remove(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, RemoteError> {
        match self.call(&Request::Remove(keys.to_vec())).await? {
            Response::Flags(f) if f.len() == keys.len() => Ok(f),
            other => Err(unexpected("Remove", &other)),
        }
    }

    /// The master's counters.
    pub async fn stats(&self) -> Result<StoreStats, RemoteError> {
        match self.call(&Request::Stats).await? {
            Response::Stats(s) => Ok(s),
            other => Err(unexpected("Stats", &other)),
        }
    }

    /// Where each object's replicas are: node names (empty for a miss). Does not read.
    pub async fn locate(&self, keys: &[ObjectKey]) -> Result<Vec<Vec<String>>, RemoteError> {
        let located = match self.call(&Request::Get(keys.to_vec())).await? {
            Response::Get(found) if found.len() == keys.len() => found,
            other => return Err(unexpected("Get", &other)),
        };
        self.refresh_segments().await?;
        let segments = self.inner.segments.lock();
        Ok(located
            .into_iter()
            .map(|l| {
                l.map(|l| {
                    l.replicas
                        .iter()
                        .map(|r| {
                            segments
                                .get(&r.segment)
                                .map_or("?".into(), |s| s.name.clone())
                        })
                        .collect()
                })
                .unwrap_or_default()
            })
            .collect())
    }

    async fn refresh_segments(&self) -> Result<(), RemoteError> {
        let list = match self.call(&Request::Segments).await? {
            Response::Segments(s) => s,
            other => return Err(unexpected("Segments", &other)),
        };
        let mut segments = self.inner.segments.lock();
        segments.clear();
        segments.extend(list.into_iter().map(|s| (s.id, s)));
        Ok(())
    }

    /// Waits for staging room for every length at once (all or nothing, so concurrent
    /// batches cannot deadlock holding part of what they need).
    async fn stage(&self, lens: &[u64]) -> Vec<Staged<'_>> {
        loop {
            let notified = self.inner.staging_freed.notified();
            {
                let mut alloc = self.inner.staging_alloc.lock();
                let mut got: Vec<(u64, u64)> = Vec::with_capacity(lens.len());
                for &len in lens {
                    match alloc.alloc(len) {
                        Some(off) => got.push((off, len)),
                        None => break,
                    }
                }
                if got.len() == lens.len() {
                    return got
                        .into_iter()
                        .map(|(offset, len)| Staged {
                            inner: &self.inner,
                            offset,
                            len,
                        })
                        .collect();
                }
                for (off, len) in got {
                    alloc.free(off, len);
                }
            }
            notified.await;
        }
    }

    async fn link(&self, segment: u64) -> Result<Arc<Link>, RemoteError> {
        let mut links = self.inner.links.lock().await;
        if let Some(l) = links.get(&segment) {
            return Ok(l.clone());
        }
        let known = self.inner.segments.lock().get(&segment).cloned();
        let info = match known {
            Some(i) => i,
            None => {
                self.refresh_segments().await?;
                self.inner
                    .segments
                    .lock()
                    .get(&segment)
                    .cloned()
                    .ok_or_else(|| RemoteError::Rpc {
                        peer: "master".into(),
                        reason: format!("segment {segment:#x} is not in the pool"),
                    })?
            }
        };
        if info.protocol != self.inner.transport.kind() {
            return Err(RemoteError::Config(format!(
                "node {} serves its segment over {}, this client uses {} \
                 (`extra_config.protocol`)",
                info.name,
                info.protocol,
                self.inner.transport.kind()
            )));
        }
        let conn = self
            .inner
            .transport
            .connect(&info.descriptor)
            .await
            .map_err(|e| RemoteError::Transport(format!("node {}: {e}", info.name)))?;
        let link = Arc::new(Link { info, conn });
        links.insert(segment, link.clone());
        Ok(link)
    }

    /// Moves one staged object to (`write`) or from a node's segment.
    async fn transfer(
        &self,
        write: bool,
        segment: u64,
        s: &Staged<'_>,
        offset: u64,
    ) -> Result<(), RemoteError> {
        let link = self.link(segment).await?;
        let local = self
            .inner
            .registration
            .iov(s.offset as usize, s.len as usize)
            .map_err(|e| RemoteError::Transport(e.to_string()))?;
        let remote = RemoteIov {
            region: RegionId(link.info.region),
            offset,
            len: s.len,
        };
        let result = if write {
            link.conn.write(&[local], &[remote]).await
        } else {
            link.conn.read(&[local], &[remote]).await
        };
        if let Err(e) = result {
            // The node may be gone: connect afresh next time.
            self.inner.links.lock().await.remove(&segment);
            return Err(RemoteError::Transport(format!(
                "node {}: {e}",
                link.info.name
            )));
        }
        Ok(())
    }
}

fn conn_peer(leader: &str) -> &str {
    if leader.is_empty() {
        "the master"
    } else {
        leader
    }
}

fn object_len(parts: &[&[u8]]) -> u64 {
    parts.iter().map(|p| p.len() as u64).sum()
}

fn unexpected(what: &str, resp: &Response) -> RemoteError {
    RemoteError::Rpc {
        peer: "master".into(),
        reason: format!("unexpected answer to {what}: {resp:?}"),
    }
}

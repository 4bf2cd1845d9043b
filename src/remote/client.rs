//! The engine's side of the kvtier store: batched put/get/exists/remove. Metadata goes to
//! the master (found through etcd, or at a fixed address); bytes go straight between a
//! registered staging buffer here and the nodes' segments through the transport.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use kvtier_transport::handshake::Service;
use kvtier_transport::Checksum;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::alloc::{round_up, RangeAllocator};
use super::etcd::Etcd;
use super::rpc::{
    Located, ObjectKey, ObjectMeta, PutSlot, Request, Response, RpcConn, SegmentInfo, StoreStats,
};
use super::RemoteError;
use crate::config::TransferChannel;
use crate::memory::{BufferPool, KvBuffer};
use crate::transport::{
    self, Connection, HostBuffer, RegionId, RegistrationHandle, RemoteAccess, RemoteIov, Transport,
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

/// What reading one object gave.
enum Fetched {
    /// The bytes, checked.
    Hit((Vec<u8>, KvBuffer)),
    /// Not there or not reachable.
    Miss,
    /// Read, but the bytes do not match the checksum.
    Spoiled,
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
    links: Mutex<HashMap<u64, Arc<Link>>>,
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
        let transport = transport::open(config.protocol, config.transport.clone())?;
        let staging = Arc::new(HostBuffer::new(staging_len));
        // The source and destination of this client's own transfers: no peer may touch it.
        let registration = transport.register(staging.clone(), RemoteAccess::LocalOnly)?;
        Ok(StoreClient {
            inner: Arc::new(Inner {
                staging_alloc: Mutex::new(RangeAllocator::new(staging_len as u64)),
                staging_freed: Notify::new(),
                staging,
                master: tokio::sync::Mutex::new(None),
                leader_hint: Mutex::new(None),
                segments: Mutex::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
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

    /// Sends `req` to the leader, finding it again (etcd, redirects) if needed. The
    /// connection is out of the shared slot while a call is in flight: a call abandoned
    /// half-way (its future dropped) drops the connection with it, so a later call can
    /// never read an answer meant for an earlier one.
    async fn call(&self, req: &Request) -> Result<Response, RemoteError> {
        let timeout = self.inner.config.transport.timeout;
        let secret = self.inner.config.transport.auth_token.clone();
        let mut last = RemoteError::NoMaster("no master address configured or published".into());
        let mut guard = self.inner.master.lock().await;
        for _ in 0..3 {
            let mut conn = match guard.take() {
                Some(c) => c,
                None => {
                    let mut found = None;
                    for addr in self.master_addrs().await {
                        let conn = RpcConn::connect(
                            &addr,
                            Service::StoreMaster,
                            "engine",
                            secret.as_deref(),
                            timeout,
                        )
                        .await;
                        match conn {
                            Ok(c) => {
                                found = Some(c);
                                break;
                            }
                            Err(e) => last = e.into(),
                        }
                    }
                    match found {
                        Some(c) => c,
                        None => break,
                    }
                }
            };
            match conn.request(req, timeout).await.map_err(RemoteError::from) {
                Ok(Response::NotLeader { leader }) => {
                    last =
                        RemoteError::NoMaster(format!("{} is not the leader", conn_peer(&leader)));
                    if leader.is_empty() {
                        break;
                    }
                    *self.inner.leader_hint.lock() = Some(leader);
                }
                Ok(Response::Error(reason)) => {
                    let peer = conn.peer().to_string();
                    *guard = Some(conn);
                    return Err(RemoteError::Rpc { peer, reason });
                }
                Ok(resp) => {
                    *guard = Some(conn);
                    return Ok(resp);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Splits `lens` into runs whose staging footprint fits `capacity`.
    fn waves(lens: &[u64], capacity: u64) -> Vec<std::ops::Range<usize>> {
        let mut waves = Vec::new();
        let mut start = 0;
        while start < lens.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < lens.len() {
                let need = if lens[end] == 0 {
                    0
                } else {
                    round_up(lens[end])
                };
                if end > start && bytes.saturating_add(need) > capacity {
                    break;
                }
                bytes = bytes.saturating_add(need);
                end += 1;
            }
            waves.push(start..end);
            start = end;
        }
        waves
    }

    /// Stores objects (each given as the parts to concatenate). Objects the store already
    /// holds are not sent again.
    pub async fn put(
        &self,
        objects: &[(ObjectKey, Vec<&[u8]>)],
    ) -> Result<Vec<PutOutcome>, RemoteError> {
        let capacity = self.inner.staging_alloc.lock().capacity();
        let lens: Vec<u64> = objects.iter().map(|(_, p)| object_len(p)).collect();
        if let Some(i) = lens.iter().position(|&l| l == 0) {
            return Err(RemoteError::Config(format!(
                "object {:#x} is empty; the store keeps objects of at least one byte",
                objects[i].0
            )));
        }
        if let Some(len) = lens.iter().find(|&&l| round_up(l) > capacity) {
            return Err(RemoteError::Config(format!(
                "object of {len} bytes exceeds the {capacity}-byte staging buffer \
                 (`extra_config.local_buffer_size`)"
            )));
        }
        let mut out = Vec::with_capacity(objects.len());
        for wave in Self::waves(&lens, capacity) {
            out.extend(self.put_wave(&objects[wave]).await?);
        }
        Ok(out)
    }

    async fn put_wave(
        &self,
        objects: &[(ObjectKey, Vec<&[u8]>)],
    ) -> Result<Vec<PutOutcome>, RemoteError> {
        let lens: Vec<u64> = objects.iter().map(|(_, p)| object_len(p)).collect();
        // Every length is non-zero (checked by `put`), so every object gets a range.
        let staged: Vec<Staged<'_>> = self.stage(&lens).await.into_iter().flatten().collect();
        let staging = &self.inner.staging;
        let metas: Vec<ObjectMeta> = cpu_bound(|| {
            use rayon::prelude::*;
            objects
                .par_iter()
                .zip(&staged)
                .map(|((_, parts), s)| {
                    // Copy and hash block by block: the hash reads what the copy just
                    // brought into cache, one pass over memory instead of two.
                    let mut hasher = Checksum::new();
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
                PutSlot::Write { replicas, .. } => {
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
            let ended: Vec<(usize, (ObjectKey, u64))> = slots
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| match slot {
                    PutSlot::Write { put, .. } if (outcomes[i] == PutOutcome::Stored) == ok => {
                        Some((i, (objects[i].0, *put)))
                    }
                    _ => None,
                })
                .collect();
            if ended.is_empty() {
                continue;
            }
            let puts: Vec<(ObjectKey, u64)> = ended.iter().map(|(_, p)| *p).collect();
            let committed = match self.call(&Request::PutEnd { ok, puts }).await? {
                Response::PutEnd(c) if c.len() == ended.len() => c,
                other => return Err(unexpected("PutEnd", &other)),
            };
            if ok {
                // A put the master reclaimed (it took too long) did not store anything.
                for ((i, _), done) in ended.iter().zip(committed) {
                    if !done {
                        outcomes[*i] = PutOutcome::Failed;
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
            Response::PutStart(s) if matches!(s.first(), Some(PutSlot::Write { .. })) => Ok(()),
            other => Err(unexpected("PutStart", &other)),
        }
    }

    /// Reads objects; each hit is split after `header` bytes into a small vector and a
    /// pooled buffer. A miss, an unreachable replica, an expired lease or a checksum
    /// mismatch all read as `None`: never wrong bytes. Objects that fail their checksum
    /// are removed from the store.
    pub async fn get(
        &self,
        keys: &[ObjectKey],
        header: usize,
        pool: &BufferPool,
    ) -> Result<Vec<Option<(Vec<u8>, KvBuffer)>>, RemoteError> {
        // The lease runs from before the request: the master granted it no earlier.
        let asked = Instant::now();
        let located = match self.call(&Request::Get(keys.to_vec())).await? {
            Response::Get(found) if found.len() == keys.len() => found,
            other => return Err(unexpected("Get", &other)),
        };
        let capacity = self.inner.staging_alloc.lock().capacity();
        // Misses, and objects that cannot be what was asked for, take no staging.
        let located: Vec<Option<Located>> = located
            .into_iter()
            .map(|l| {
                l.filter(|l| round_up(l.meta.len) <= capacity && l.meta.len as usize >= header)
            })
            .collect();
        let lens: Vec<u64> = located
            .iter()
            .map(|l| l.as_ref().map_or(0, |l| l.meta.len))
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        let mut spoiled = Vec::new();
        for wave in Self::waves(&lens, capacity) {
            let got = self
                .get_wave(
                    &located[wave.clone()],
                    &lens[wave.clone()],
                    asked,
                    header,
                    pool,
                )
                .await;
            for (i, g) in wave.zip(got) {
                match g {
                    Fetched::Hit(h) => out.push(Some(h)),
                    Fetched::Miss => out.push(None),
                    Fetched::Spoiled => {
                        spoiled.push(keys[i]);
                        out.push(None);
                    }
                }
            }
        }
        if !spoiled.is_empty() {
            tracing::warn!(
                "remote store: {} objects failed their checksum; removing them",
                spoiled.len()
            );
            let _ = self.remove(&spoiled).await;
        }
        Ok(out)
    }

    async fn get_wave(
        &self,
        located: &[Option<Located>],
        lens: &[u64],
        asked: Instant,
        header: usize,
        pool: &BufferPool,
    ) -> Vec<Fetched> {
        let staged = self.stage(lens).await;
        let reads = located.iter().zip(&staged).map(|(loc, s)| async move {
            let (loc, s) = (loc.as_ref()?, s.as_ref()?);
            let lease = Duration::from_millis(loc.lease_ms as u64);
            for r in &loc.replicas {
                match self.transfer(false, r.segment, s, r.offset).await {
                    // Bytes read after the lease ended may have been reused: discard.
                    Ok(()) if asked.elapsed() < lease => return Some(()),
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
                    let (Some(loc), Some(s), Some(())) = (loc, s, ok) else {
                        return Fetched::Miss;
                    };
                    let (off, len) = (s.offset as usize, s.len as usize);
                    // Copy out and hash what was copied, block by block (one pass over
                    // memory; a late write into staging cannot slip past the check).
                    let mut hasher = Checksum::new();
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
                        return Fetched::Spoiled;
                    }
                    Fetched::Hit((head, body))
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

    /// Waits for staging room for every non-zero length at once (all or nothing, so
    /// concurrent batches cannot deadlock holding part of what they need). Zero lengths
    /// (misses) get no range.
    async fn stage(&self, lens: &[u64]) -> Vec<Option<Staged<'_>>> {
        loop {
            let notified = self.inner.staging_freed.notified();
            {
                let mut alloc = self.inner.staging_alloc.lock();
                let mut got: Vec<Option<(u64, u64)>> = Vec::with_capacity(lens.len());
                for &len in lens {
                    if len == 0 {
                        got.push(None);
                        continue;
                    }
                    match alloc.alloc(len) {
                        Some(off) => got.push(Some((off, len))),
                        None => break,
                    }
                }
                if got.len() == lens.len() {
                    return got
                        .into_iter()
                        .map(|g| {
                            g.map(|(offset, len)| Staged {
                                inner: &self.inner,
                                offset,
                                len,
                            })
                        })
                        .collect();
                }
                for (off, len) in got.into_iter().flatten() {
                    alloc.free(off, len);
                }
            }
            notified.await;
        }
    }

    async fn link(&self, segment: u64) -> Result<Arc<Link>, RemoteError> {
        if let Some(l) = self.inner.links.lock().get(&segment) {
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
        // Connected without holding the table: a dead node stalls only its own readers.
        let conn = self
            .inner
            .transport
            .connect(&info.descriptor)
            .await
            .map_err(|source| RemoteError::NodeUnreachable {
                node: info.name.clone(),
                source,
            })?;
        let link = Arc::new(Link { info, conn });
        Ok(self
            .inner
            .links
            .lock()
            .entry(segment)
            .or_insert(link)
            .clone())
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
            .iov(s.offset as usize, s.len as usize)?;
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
            // The node may be gone: connect afresh next time (unless another task did).
            let mut links = self.inner.links.lock();
            if links.get(&segment).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                links.remove(&segment);
            }
            drop(links);
            return Err(RemoteError::NodeUnreachable {
                node: link.info.name.clone(),
                source: e,
            });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_count_aligned_footprints_and_give_misses_no_room() {
        // 33-byte objects take 64 bytes each: 4 per 256-byte buffer, not 7.
        let waves = StoreClient::waves(&[33; 9], 256);
        assert_eq!(waves, vec![0..4, 4..8, 8..9]);
        // Misses (0) cost nothing; an object as large as the buffer goes alone.
        assert_eq!(
            StoreClient::waves(&[0, 0, 256, 0, 64], 256),
            vec![0..4, 4..5]
        );
        assert!(StoreClient::waves(&[], 256).is_empty());
    }
}

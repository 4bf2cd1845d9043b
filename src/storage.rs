//! The storage manager: stacks the tiers into one store.
//!
//! - **put** is write-through: a chunk lands in every in-memory tier at once (GPU, then
//!   CPU) and is offloaded to the disk tier through its bounded background queue. A full
//!   queue or a tier with no evictable room skips that tier (counted in
//!   `kvtier_offload_skipped_total`), never blocks and never grows memory.
//! - **get** takes each chunk from the first tier that holds it, top-down, reads the
//!   lower tiers in parallel, and promotes what it read into the CPU tier.
//! - **lookup** counts the longest prefix of keys held across all tiers.
//! - The **remote tier** (`remote_url`) sits below the local ones and is the one tier
//!   shared with other engines: chunks stored locally are queued for its background
//!   writer (written through, awaited, when it is the only tier); lookups and reads
//!   continue into it where the local prefix ends; what it returns is verified against
//!   its header and key before anyone sees it, and a tier that just failed is skipped for
//!   a moment (see `remote::offload`). Its calls are async; the local tiers' are not.
//!
//! The manager is the one owner of moves between tiers: the engine asks it, never a tier.

use std::sync::Arc;

use rayon::prelude::*;

use crate::chunk::{ChunkHeader, HEADER_LEN};
use crate::keys::ChunkKey;
use crate::memory::BufferPool;
use crate::metrics::Metrics;
use crate::remote::client::StoreClient;
use crate::remote::offload::RemoteLink;
use crate::remote::RemoteError;
use crate::tier::cpu::CpuTier;
use crate::tier::disk::DiskTier;
#[cfg(feature = "cuda")]
use crate::tier::gpu::GpuTier;
use crate::tier::{Chunk, ChunkRef, Tier, TierKind, TierUsage};
use crate::tier::{Result, TierError};

enum Step {
    /// Already referenced from the CPU tier.
    Ready(ChunkRef),
    /// To be read from a lower tier.
    Read(ChunkKey, TierKind),
}

/// Where each chunk of a prefix comes from; see [`StorageManager::plan_prefix`].
pub struct PrefixPlan {
    steps: Vec<Step>,
}

impl PrefixPlan {
    /// Chunks in the prefix.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the prefix is empty.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Chunks that must be read from a tier below the CPU tier (may block on I/O).
    pub fn reads(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Read(..)))
            .count()
    }
}

/// The tiers of one engine, top (fastest) to bottom.
pub struct StorageManager {
    #[cfg(feature = "cuda")]
    gpu: Option<GpuTier>,
    cpu: Option<CpuTier>,
    disk: Option<DiskTier>,
    remote: Option<RemoteLink>,
    metrics: Metrics,
    /// Held while the tier gauges are read and set: of two tasks publishing after their
    /// changes, the later sets the later state (see [`StorageManager::publish_usage`]).
    publishing: std::sync::Mutex<()>,
}

impl StorageManager {
    /// A manager over the given tiers, reporting into `metrics`.
    pub fn new(cpu: Option<CpuTier>, disk: Option<DiskTier>, metrics: Metrics) -> Self {
        let manager = StorageManager {
            #[cfg(feature = "cuda")]
            gpu: None,
            cpu,
            disk,
            remote: None,
            metrics,
            publishing: std::sync::Mutex::new(()),
        };
        manager.publish_usage();
        manager
    }

    /// Adds a GPU tier on top.
    #[cfg(feature = "cuda")]
    pub fn with_gpu(mut self, gpu: GpuTier) -> Self {
        self.gpu = Some(gpu);
        self.publish_usage();
        self
    }

    /// Adds the remote tier at the bottom.
    pub(crate) fn with_remote(mut self, remote: RemoteLink) -> Self {
        self.remote = Some(remote);
        self
    }

    /// The local tiers, top to bottom.
    pub fn tiers(&self) -> Vec<&dyn Tier> {
        let mut tiers: Vec<&dyn Tier> = Vec::with_capacity(3);
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            tiers.push(gpu);
        }
        if let Some(cpu) = &self.cpu {
            tiers.push(cpu);
        }
        if let Some(disk) = &self.disk {
            tiers.push(disk);
        }
        tiers
    }

    /// Whether no local tier is configured.
    pub fn is_empty(&self) -> bool {
        self.tiers().is_empty()
    }

    /// Whether a remote tier is configured.
    pub fn has_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The kvtier store behind the remote tier, when `remote_url` names one.
    pub fn remote_store(&self) -> Option<&StoreClient> {
        self.remote.as_ref()?.tier().store_client()
    }

    /// The disk tier, if configured.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref()
    }

    /// Stores `chunks` write-through. Fails only if some chunk was taken by no tier;
    /// the error is the top tier's.
    pub fn put_batch(&self, chunks: &[ChunkRef]) -> Result<()> {
        let tiers = self.tiers();
        let mut first_error = None;
        for chunk in chunks {
            let mut stored = false;
            let mut top_error = None;
            for tier in &tiers {
                match tier.put(chunk.clone()) {
                    Ok(()) => stored = true,
                    Err(e) => {
                        self.metrics
                            .offload_skipped
                            .with_label_values(&[tier.kind().name()])
                            .inc();
                        tracing::debug!(
                            "chunk {} not stored in {} tier: {e}",
                            chunk.key,
                            tier.kind()
                        );
                        top_error.get_or_insert(e);
                    }
                }
            }
            if !stored {
                if let Some(e) = top_error {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.publish_usage();
        first_error.map_or(Ok(()), Err)
    }

    /// Marks which keys any tier holds.
    pub fn mark_present(&self, keys: &[ChunkKey]) -> Vec<bool> {
        let mut present = vec![false; keys.len()];
        for tier in self.tiers() {
            tier.mark_present(keys, &mut present);
        }
        present
    }

    /// How many leading `keys` are held (each by any tier).
    pub fn contains_prefix(&self, keys: &[ChunkKey]) -> usize {
        self.mark_present(keys).iter().take_while(|&&p| p).count()
    }

    /// Decides, without I/O, where each of the leading held `keys` comes from: chunks in
    /// the CPU tier are taken (referenced) now, the rest are marked for a read from the
    /// first lower tier that holds them. Stops at the first key no tier holds.
    pub fn plan_prefix(&self, keys: &[ChunkKey]) -> PrefixPlan {
        let mut steps = Vec::with_capacity(keys.len());
        for &key in keys {
            if let Some(chunk) = self.cpu.as_ref().and_then(|c| c.get(key).ok().flatten()) {
                steps.push(Step::Ready(chunk));
                continue;
            }
            match self.tiers().into_iter().find(|t| t.contains(key)) {
                Some(tier) => steps.push(Step::Read(key, tier.kind())),
                None => break,
            }
        }
        PrefixPlan { steps }
    }

    /// Carries out `plan`: reads what lives below the CPU tier (in parallel), promotes it
    /// into the CPU tier, and returns the chunks up to the first one that could not be
    /// read (corrupt or I/O error: counted, logged and treated as a miss).
    pub fn fetch(&self, plan: PrefixPlan) -> Vec<ChunkRef> {
        let resolve = |step: Step| match step {
            Step::Ready(chunk) => Some((chunk, TierKind::Cpu)),
            Step::Read(key, kind) => self.read(kind, key).map(|c| (c, kind)),
        };
        let fetched: Vec<Option<(ChunkRef, TierKind)>> = if plan.reads() > 1 {
            plan.steps.into_par_iter().map(resolve).collect()
        } else {
            plan.steps.into_iter().map(resolve).collect()
        };
        let mut out = Vec::with_capacity(fetched.len());
        let mut promoted = false;
        for item in fetched {
            let Some((chunk, kind)) = item else { break };
            self.metrics
                .tier_hits
                .with_label_values(&[kind.name()])
                .inc();
            if kind != TierKind::Cpu {
                if let Some(cpu) = &self.cpu {
                    promoted = true;
                    if let Err(e) = cpu.put(chunk.clone()) {
                        tracing::debug!("chunk {} not promoted to cpu tier: {e}", chunk.key);
                    }
                }
            }
            out.push(chunk);
        }
        if promoted {
            self.publish_usage();
        }
        out
    }

    /// The chunks for the leading `keys` that some tier holds, stopping at the first miss:
    /// [`StorageManager::fetch`] of [`StorageManager::plan_prefix`]. May block on I/O.
    pub fn get_prefix(&self, keys: &[ChunkKey]) -> Vec<ChunkRef> {
        self.fetch(self.plan_prefix(keys))
    }

    fn read(&self, kind: TierKind, key: ChunkKey) -> Option<ChunkRef> {
        let tier = self.tiers().into_iter().find(|t| t.kind() == kind)?;
        match tier.get(key) {
            Ok(found) => found,
            Err(e) => {
                if matches!(e, TierError::CorruptChunk(_)) {
                    self.metrics
                        .corrupt_chunks
                        .with_label_values(&[kind.name()])
                        .inc();
                }
                tracing::error!("{kind} tier: chunk {key} unreadable, treated as a miss: {e}");
                None
            }
        }
    }

    /// Puts chunks read from a tier below (the remote tier) into the CPU tier.
    pub fn promote(&self, chunks: &[ChunkRef]) {
        let Some(cpu) = &self.cpu else { return };
        for chunk in chunks {
            if let Err(e) = cpu.put(chunk.clone()) {
                tracing::debug!("chunk {} not promoted to cpu tier: {e}", chunk.key);
            }
        }
        if !chunks.is_empty() {
            self.publish_usage();
        }
    }

    /// Removes `keys` from every tier; returns how many keys some tier held.
    pub fn remove(&self, keys: &[ChunkKey]) -> usize {
        let tiers = self.tiers();
        let removed = keys
            .iter()
            .filter(|&&k| tiers.iter().fold(false, |any, t| t.remove(k) | any))
            .count();
        self.publish_usage();
        removed
    }

    /// Empties every tier.
    pub fn clear(&self) {
        for tier in self.tiers() {
            tier.clear();
        }
        self.publish_usage();
    }

    /// Blocks until queued offloads are written.
    pub fn flush(&self) {
        if let Some(disk) = &self.disk {
            disk.flush();
        }
        self.publish_usage();
    }

    /// Hands `chunks`, just stored in the local tiers, to the remote tier: written
    /// through and awaited when it is the only tier, else queued for its background
    /// writer (a full queue skips them, counted). Nothing without a remote tier.
    pub async fn put_remote(&self, chunks: &[ChunkRef]) -> Result<(), RemoteError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        if self.is_empty() {
            remote.write_through(chunks).await?;
        } else {
            remote.offload(chunks);
        }
        Ok(())
    }

    /// How many of `keys`, from the first, the remote tier holds (0 without one, or while
    /// it is unavailable).
    pub async fn remote_prefix(&self, keys: &[ChunkKey]) -> usize {
        let Some(remote) = self.remote.as_ref().filter(|_| !keys.is_empty()) else {
            return 0;
        };
        let ids: Vec<u128> = keys.iter().map(|k| k.0).collect();
        remote
            .call("lookup", remote.tier().exists(&ids))
            .await
            .map_or(0, |found| found.iter().take_while(|&&f| f).count())
    }

    /// The leading `keys` the remote tier holds, read into buffers of `pool`, each
    /// verified against its header, checksum and key (a damaged or foreign object ends
    /// the prefix like a miss, counted in `kvtier_corrupt_chunks_total{tier="remote"}`).
    /// The caller checks their shape before it [`promote`](Self::promote)s them.
    pub async fn read_remote(&self, keys: &[ChunkKey], pool: &BufferPool) -> Vec<ChunkRef> {
        let Some(remote) = self.remote.as_ref().filter(|_| !keys.is_empty()) else {
            return Vec::new();
        };
        let ids: Vec<u128> = keys.iter().map(|k| k.0).collect();
        let Some(found) = remote
            .call("retrieve", remote.tier().get(&ids, HEADER_LEN, pool))
            .await
        else {
            return Vec::new();
        };
        let checks_reads = remote.tier().checks_reads();
        let mut out = Vec::new();
        for (key, item) in keys.iter().zip(found) {
            let Some((head, body)) = item else { break };
            // The kvtier store already compared what was copied out with the checksum
            // of what was written (header and payload): hashing the payload again here
            // would cost a second pass for nothing.
            let checked = ChunkHeader::decode(&head).and_then(|h| {
                if checks_reads {
                    h.verify_payload_len(&body)?;
                } else {
                    h.verify_payload(&body)?;
                }
                Ok(h)
            });
            match checked {
                Ok(h) if h.key == *key => {
                    self.metrics.tier_hits.with_label_values(&["remote"]).inc();
                    out.push(Arc::new(Chunk {
                        key: h.key,
                        shape: h.shape,
                        data: body,
                    }));
                }
                other => {
                    self.metrics
                        .corrupt_chunks
                        .with_label_values(&["remote"])
                        .inc();
                    tracing::error!(
                        "remote tier: chunk {key} unusable ({other:?}); treated as a miss"
                    );
                    break;
                }
            }
        }
        out
    }

    /// Removes `keys` from the remote tier; returns how many it held (0 without one, or
    /// while it is unavailable).
    pub async fn remove_remote(&self, keys: &[ChunkKey]) -> usize {
        let Some(remote) = &self.remote else {
            return 0;
        };
        let ids: Vec<u128> = keys.iter().map(|k| k.0).collect();
        remote
            .call("remove", remote.tier().remove(&ids))
            .await
            .map_or(0, |flags| flags.iter().filter(|&&f| f).count())
    }

    /// Waits until every chunk queued for the remote tier is written or given up on.
    pub async fn flush_remote(&self) {
        if let Some(remote) = &self.remote {
            remote.flush().await;
        }
    }

    /// Occupancy of every tier, top to bottom.
    pub fn usage(&self) -> Vec<(TierKind, TierUsage)> {
        self.tiers().iter().map(|t| (t.kind(), t.usage())).collect()
    }

    /// Sets the tier gauges. Reading and setting them under one lock keeps a publisher that
    /// read an older state from setting it after a newer one was set.
    fn publish_usage(&self) {
        let _publishing = self
            .publishing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kind, usage) in self.usage() {
            self.metrics.record_usage(kind, usage);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BufferPool;
    use crate::model::{ChunkShape, DType, KvLayout};
    use crate::tier::Chunk;

    fn chunk(pool: &BufferPool, key: u128) -> ChunkRef {
        let shape = ChunkShape {
            layout: KvLayout::Mla1Ltd,
            dtype: DType::U8,
            layers: 1,
            tokens: 1,
            hidden: 4096 - crate::chunk::HEADER_LEN as u32,
        };
        let mut data = pool.alloc(shape.payload_len());
        data.fill(key as u8);
        Chunk::new(ChunkKey(key), shape, data).unwrap()
    }

    fn manager(dir: &std::path::Path, cpu_pages: u64) -> StorageManager {
        let pool = BufferPool::new(1 << 20);
        let (disk, _) = DiskTier::open(dir, 1 << 20, 16, pool).unwrap();
        StorageManager::new(
            Some(CpuTier::new(cpu_pages * 4096)),
            Some(disk),
            Metrics::new(),
        )
    }

    #[test]
    fn write_through_then_promote_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let sm = manager(dir.path(), 2);
        let pool = BufferPool::new(0);
        let chunks: Vec<_> = (1..=4).map(|k| chunk(&pool, k)).collect();
        sm.put_batch(&chunks).unwrap();
        sm.flush();
        let keys: Vec<_> = chunks.iter().map(|c| c.key).collect();
        // CPU holds only the last two; disk holds all four.
        let usage = sm.usage();
        assert_eq!(usage[0].1.objects, 2);
        assert_eq!(usage[1].1.objects, 4);
        assert_eq!(sm.contains_prefix(&keys), 4);
        let got = sm.get_prefix(&keys);
        assert_eq!(got.len(), 4);
        for (g, c) in got.iter().zip(&chunks) {
            assert_eq!(g.payload(), c.payload());
        }
        assert!(sm.metrics.tier_hits.with_label_values(&["disk"]).get() >= 2);
    }

    #[test]
    fn prefix_stops_at_first_miss_and_remove_works() {
        let dir = tempfile::tempdir().unwrap();
        let sm = manager(dir.path(), 8);
        let pool = BufferPool::new(0);
        let chunks: Vec<_> = [1, 2, 4].iter().map(|&k| chunk(&pool, k)).collect();
        sm.put_batch(&chunks).unwrap();
        let keys: Vec<_> = (1..=4).map(ChunkKey).collect();
        assert_eq!(sm.contains_prefix(&keys), 2);
        assert_eq!(sm.get_prefix(&keys).len(), 2);
        assert_eq!(sm.remove(&keys), 3);
        assert_eq!(sm.contains_prefix(&keys), 0);
    }

    #[test]
    fn corrupt_disk_chunk_is_a_miss_not_wrong_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let sm = manager(dir.path(), 0);
        let pool = BufferPool::new(0);
        let c = chunk(&pool, 0xab);
        // No CPU room: only the disk holds it.
        sm.put_batch(std::slice::from_ref(&c)).unwrap();
        sm.flush();
        let name = c.key.to_string();
        let path = dir.path().join(&name[..2]).join(format!("{name}.kvc"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(sm.get_prefix(&[c.key]).is_empty());
        assert_eq!(
            sm.metrics.corrupt_chunks.with_label_values(&["disk"]).get(),
            1
        );
    }
}

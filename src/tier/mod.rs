//! Storage tiers: the [`Tier`] contract and the chunk objects tiers hold.
//!
//! Tiers, top to bottom: GPU buffer ([`gpu`], feature `cuda`), local CPU ([`cpu`]), local
//! disk ([`disk`]). Each is usable alone; the storage manager (`storage`) stacks them. Tier
//! operations fail with a [`TierError`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::chunk::CorruptChunk;
use crate::keys::ChunkKey;
use crate::memory::KvBuffer;
use crate::model::ChunkShape;

pub mod cpu;
pub mod disk;
#[cfg(feature = "cuda")]
pub mod gpu;

/// What a tier operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// A single chunk is larger than the tier's whole capacity.
    #[error("{tier} tier: a {bytes}-byte chunk cannot fit in its capacity of {capacity} bytes")]
    ChunkTooLarge {
        /// The tier.
        tier: TierKind,
        /// Size of the chunk.
        bytes: u64,
        /// The tier's capacity.
        capacity: u64,
    },
    /// The tier cannot make room: what is left is held by readers.
    #[error("{tier} tier full: {needed} bytes needed, every evictable object already evicted ({pinned} bytes held by readers)")]
    Full {
        /// The tier.
        tier: TierKind,
        /// Bytes that could not be made free.
        needed: u64,
        /// Bytes pinned by readers.
        pinned: u64,
    },
    /// A tier's bounded background queue is full; the chunk was not queued.
    #[error("{tier} tier: write queue full ({depth} chunks pending)")]
    QueueFull {
        /// The tier.
        tier: TierKind,
        /// The queue's bound.
        depth: usize,
    },
    /// A stored chunk failed validation (bad header, length or checksum); it was dropped.
    #[error(transparent)]
    CorruptChunk(#[from] CorruptChunk),
    /// A file operation of the disk tier failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`, `write`, `create directory`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A buffer's length does not match the chunk shape it is given with.
    #[error("chunk {key}: {given} bytes given, shape {shape:?} needs {needed}")]
    WrongLength {
        /// The chunk.
        key: ChunkKey,
        /// Its shape.
        shape: ChunkShape,
        /// Bytes given.
        given: usize,
        /// Bytes the shape needs.
        needed: usize,
    },
    /// The GPU tier's device failed.
    #[cfg(feature = "cuda")]
    #[error("GPU tier: {0}")]
    Gpu(#[from] kvtier_cuda::CudaError),
}

/// Result with [`TierError`].
pub type Result<T, E = TierError> = std::result::Result<T, E>;

/// One chunk of KV in host memory: its key, shape and payload.
#[derive(Debug)]
pub struct Chunk {
    /// Content address.
    pub key: ChunkKey,
    /// Payload shape.
    pub shape: ChunkShape,
    /// Payload bytes (`shape.payload_len()` of them).
    pub data: KvBuffer,
}

impl Chunk {
    /// Wraps `data` as chunk `key`; `data` must hold exactly `shape.payload_len()` bytes.
    pub fn new(key: ChunkKey, shape: ChunkShape, data: KvBuffer) -> Result<ChunkRef> {
        if data.len() != shape.payload_len() {
            return Err(TierError::WrongLength {
                key,
                shape,
                given: data.len(),
                needed: shape.payload_len(),
            });
        }
        Ok(Arc::new(Chunk { key, shape, data }))
    }

    /// Payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.data
    }
}

/// A shared, read-only reference to a chunk. While a reader holds one, no tier evicts
/// (frees) the chunk's memory.
pub type ChunkRef = Arc<Chunk>;

/// Which tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TierKind {
    /// GPU memory.
    Gpu,
    /// Host memory.
    Cpu,
    /// Local disk.
    Disk,
}

impl TierKind {
    /// Lower-case name, used in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            TierKind::Gpu => "gpu",
            TierKind::Cpu => "cpu",
            TierKind::Disk => "disk",
        }
    }
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tier's occupancy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierUsage {
    /// Bytes of chunk memory held.
    pub used_bytes: u64,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Chunks held.
    pub objects: u64,
    /// Chunks evicted since the tier was created.
    pub evictions: u64,
}

/// What every tier provides. Calls may block on I/O (the disk tier reads files) but never
/// hold a lock across a copy or an I/O call.
pub trait Tier: Send + Sync {
    /// Which tier this is.
    fn kind(&self) -> TierKind;
    /// Stores `chunk`, evicting least-recently-used chunks that no reader holds if needed.
    /// Storing a key the tier already holds only refreshes its recency.
    fn put(&self, chunk: ChunkRef) -> Result<()>;
    /// The chunk stored under `key`, refreshing its recency.
    fn get(&self, key: ChunkKey) -> Result<Option<ChunkRef>>;
    /// Sets `present[i]` to true for every `keys[i]` this tier holds (others untouched).
    fn mark_present(&self, keys: &[ChunkKey], present: &mut [bool]);
    /// Whether `key` is held.
    fn contains(&self, key: ChunkKey) -> bool {
        let mut present = [false];
        self.mark_present(&[key], &mut present);
        present[0]
    }
    /// Removes `key`; returns whether it was held.
    fn remove(&self, key: ChunkKey) -> bool;
    /// Removes everything.
    fn clear(&self);
    /// Occupancy.
    fn usage(&self) -> TierUsage;
}

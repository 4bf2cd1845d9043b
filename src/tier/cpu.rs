//! Local CPU tier: a byte-bounded LRU of chunks in host memory.
//!
//! Reads are zero-copy: [`Tier::get`] hands out a [`ChunkRef`] (a reference count). An
//! object a reader holds is never evicted; eviction skips it and takes the next least
//! recently used one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hashlink::LinkedHashMap;
use parking_lot::Mutex;

use super::{ChunkRef, Result, Tier, TierError, TierKind, TierUsage};
use crate::keys::ChunkKey;

/// Byte-bounded LRU of host-memory chunks.
pub struct CpuTier {
    capacity: u64,
    state: Mutex<LruState>,
    evictions: AtomicU64,
}

#[derive(Default)]
struct LruState {
    /// Front = least recently used.
    map: LinkedHashMap<ChunkKey, ChunkRef>,
    used: u64,
}

fn footprint(chunk: &ChunkRef) -> u64 {
    chunk.data.footprint() as u64
}

/// Whether anyone besides the tier holds the chunk.
fn is_pinned(chunk: &ChunkRef) -> bool {
    Arc::strong_count(chunk) > 1
}

impl CpuTier {
    /// An empty tier holding at most `capacity` bytes (page-rounded chunk sizes).
    pub fn new(capacity: u64) -> Self {
        CpuTier {
            capacity,
            state: Mutex::new(LruState::default()),
            evictions: AtomicU64::new(0),
        }
    }

    /// The chunks for `keys`, in order, up to the first one not held (one lock for the batch).
    pub fn get_prefix(&self, keys: &[ChunkKey]) -> Vec<ChunkRef> {
        let mut state = self.state.lock();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            match state.map.to_back(key) {
                Some(chunk) => out.push(chunk.clone()),
                None => break,
            }
        }
        out
    }
}

impl Tier for CpuTier {
    fn kind(&self) -> TierKind {
        TierKind::Cpu
    }

    fn put(&self, chunk: ChunkRef) -> Result<()> {
        let size = footprint(&chunk);
        if size > self.capacity {
            return Err(TierError::ChunkTooLarge {
                tier: TierKind::Cpu,
                bytes: size,
                capacity: self.capacity,
            });
        }
        // Victims are dropped after the lock is released: freeing returns buffers to the pool.
        let mut victims = Vec::new();
        let result = {
            let mut state = self.state.lock();
            if state.map.to_back(&chunk.key).is_some() {
                return Ok(());
            }
            let mut pinned = 0;
            if state.used + size > self.capacity {
                let mut need = state.used + size - self.capacity;
                let mut chosen = Vec::new();
                for (key, held) in state.map.iter() {
                    if need == 0 {
                        break;
                    }
                    if is_pinned(held) {
                        pinned += footprint(held);
                        continue;
                    }
                    need = need.saturating_sub(footprint(held));
                    chosen.push(*key);
                }
                if need > 0 {
                    Err(TierError::Full {
                        tier: TierKind::Cpu,
                        needed: need,
                        pinned,
                    })
                } else {
                    for key in chosen {
                        if let Some(v) = state.map.remove(&key) {
                            state.used -= footprint(&v);
                            victims.push(v);
                        }
                    }
                    Ok(())
                }
            } else {
                Ok(())
            }
            .map(|()| {
                state.used += size;
                state.map.insert(chunk.key, chunk);
            })
        };
        self.evictions
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        drop(victims);
        result
    }

    fn get(&self, key: ChunkKey) -> Result<Option<ChunkRef>> {
        Ok(self.state.lock().map.to_back(&key).cloned())
    }

    fn mark_present(&self, keys: &[ChunkKey], present: &mut [bool]) {
        let state = self.state.lock();
        for (key, p) in keys.iter().zip(present.iter_mut()) {
            *p |= state.map.contains_key(key);
        }
    }

    fn remove(&self, key: ChunkKey) -> bool {
        let removed = {
            let mut state = self.state.lock();
            let removed = state.map.remove(&key);
            if let Some(r) = &removed {
                state.used -= footprint(r);
            }
            removed
        };
        removed.is_some()
    }

    fn clear(&self) {
        let old = {
            let mut state = self.state.lock();
            state.used = 0;
            std::mem::take(&mut state.map)
        };
        drop(old);
    }

    fn usage(&self) -> TierUsage {
        let state = self.state.lock();
        TierUsage {
            used_bytes: state.used,
            capacity_bytes: self.capacity,
            objects: state.map.len() as u64,
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BufferPool;
    use crate::model::{ChunkShape, DType, KvLayout};
    use crate::tier::Chunk;

    const PAGE: u64 = 4096;

    fn chunk(pool: &BufferPool, key: u128) -> ChunkRef {
        let shape = ChunkShape {
            layout: KvLayout::Mla1Ltd,
            dtype: DType::U8,
            layers: 1,
            tokens: 1,
            hidden: 4096,
        };
        let mut data = pool.alloc(4096);
        data.fill(key as u8);
        Chunk::new(ChunkKey(key), shape, data).unwrap()
    }

    #[test]
    fn evicts_least_recently_used() {
        let pool = BufferPool::new(0);
        let tier = CpuTier::new(3 * PAGE);
        for k in 1..=3 {
            tier.put(chunk(&pool, k)).unwrap();
        }
        assert!(tier.get(ChunkKey(1)).unwrap().is_some()); // 1 is now most recent
        tier.put(chunk(&pool, 4)).unwrap();
        assert!(!tier.contains(ChunkKey(2)));
        assert!(tier.contains(ChunkKey(1)));
        let usage = tier.usage();
        assert_eq!(
            (usage.objects, usage.used_bytes, usage.evictions),
            (3, 3 * PAGE, 1)
        );
    }

    #[test]
    fn never_evicts_what_a_reader_holds() {
        let pool = BufferPool::new(0);
        let tier = CpuTier::new(2 * PAGE);
        tier.put(chunk(&pool, 1)).unwrap();
        tier.put(chunk(&pool, 2)).unwrap();
        let held = tier.get(ChunkKey(1)).unwrap().unwrap();
        tier.get(ChunkKey(2)).unwrap(); // 1 is LRU again
        tier.put(chunk(&pool, 3)).unwrap();
        // 1 was least recently used but pinned: 2 went instead.
        assert!(tier.contains(ChunkKey(1)));
        assert!(!tier.contains(ChunkKey(2)));
        assert!(held.payload().iter().all(|&b| b == 1));
        // Everything pinned: the put fails instead of freeing a reader's memory.
        let held3 = tier.get(ChunkKey(3)).unwrap().unwrap();
        let err = tier.put(chunk(&pool, 4)).unwrap_err();
        assert!(matches!(err, TierError::Full { pinned, .. } if pinned == 2 * PAGE));
        drop((held, held3));
        tier.put(chunk(&pool, 4)).unwrap();
    }

    #[test]
    fn too_large_and_remove_and_clear() {
        let pool = BufferPool::new(0);
        let tier = CpuTier::new(PAGE / 2);
        assert!(matches!(
            tier.put(chunk(&pool, 1)),
            Err(TierError::ChunkTooLarge { .. })
        ));
        let tier = CpuTier::new(4 * PAGE);
        tier.put(chunk(&pool, 1)).unwrap();
        tier.put(chunk(&pool, 2)).unwrap();
        let mut present = [false; 3];
        tier.mark_present(&[ChunkKey(2), ChunkKey(9), ChunkKey(1)], &mut present);
        assert_eq!(present, [true, false, true]);
        assert!(tier.remove(ChunkKey(1)));
        assert!(!tier.remove(ChunkKey(1)));
        assert_eq!(tier.usage().used_bytes, PAGE);
        tier.clear();
        assert_eq!(
            tier.usage(),
            TierUsage {
                capacity_bytes: 4 * PAGE,
                ..Default::default()
            }
        );
    }

    #[test]
    fn get_prefix_stops_at_first_miss() {
        let pool = BufferPool::new(0);
        let tier = CpuTier::new(8 * PAGE);
        for k in [1, 2, 4] {
            tier.put(chunk(&pool, k)).unwrap();
        }
        let keys: Vec<_> = (1..=4).map(ChunkKey).collect();
        assert_eq!(tier.get_prefix(&keys).len(), 2);
    }
}

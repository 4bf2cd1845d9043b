//! First-fit range allocator over one segment (a store node's memory, or a client's
//! staging buffer), with coalescing frees and exact reservations for rebuilding.

use std::collections::BTreeMap;

/// Every range starts on this boundary (cache line: no false sharing between objects).
pub const ALIGN: u64 = 64;

/// Free ranges of a `capacity`-byte space.
#[derive(Debug, Clone)]
pub struct RangeAllocator {
    capacity: u64,
    /// Free ranges: start → length. Never adjacent (coalesced), never empty.
    free: BTreeMap<u64, u64>,
    used: u64,
}

/// Bytes a range of `len` bytes takes (rounded up to [`ALIGN`], at least one unit).
pub fn round_up(len: u64) -> u64 {
    len.max(1).div_ceil(ALIGN).saturating_mul(ALIGN)
}

impl RangeAllocator {
    /// An empty space of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity / ALIGN * ALIGN;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        RangeAllocator {
            capacity,
            free,
            used: 0,
        }
    }

    /// Usable bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes handed out (aligned sizes).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes not handed out.
    pub fn free_bytes(&self) -> u64 {
        self.capacity - self.used
    }

    /// The largest range [`RangeAllocator::alloc`] could hand out now.
    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Start of a fresh range of `len` bytes, or `None` if no free range is large enough.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let need = round_up(len);
        let (&start, &size) = self.free.iter().find(|(_, &size)| size >= need)?;
        self.free.remove(&start);
        if size > need {
            self.free.insert(start + need, size - need);
        }
        self.used += need;
        Some(start)
    }

    /// Returns the range `[start, start + len)` handed out earlier. Freeing a range that is
    /// (partly) free already or out of bounds is refused and changes nothing.
    pub fn free(&mut self, start: u64, len: u64) -> bool {
        let need = round_up(len);
        let Some(end) = start.checked_add(need) else {
            return false;
        };
        if start % ALIGN != 0 || end > self.capacity || self.overlaps_free(start, end) {
            return false;
        }
        let mut start = start;
        let mut size = need;
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back() {
            if prev + prev_len == start {
                self.free.remove(&prev);
                start = prev;
                size += prev_len;
            }
        }
        if let Some(next_len) = self.free.remove(&(start + size)) {
            size += next_len;
        }
        self.free.insert(start, size);
        self.used -= need;
        true
    }

    /// Marks `[start, start + len)` used, as when rebuilding from a node's index. Fails
    /// (changing nothing) unless the whole range is free.
    pub fn reserve(&mut self, start: u64, len: u64) -> bool {
        let need = round_up(len);
        let Some(end) = start.checked_add(need) else {
            return false;
        };
        if start % ALIGN != 0 || end > self.capacity {
            return false;
        }
        let Some((&block, &block_len)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if block + block_len < end {
            return false;
        }
        self.free.remove(&block);
        if block < start {
            self.free.insert(block, start - block);
        }
        if end < block + block_len {
            self.free.insert(end, block + block_len - end);
        }
        self.used += need;
        true
    }

    fn overlaps_free(&self, start: u64, end: u64) -> bool {
        if let Some((&s, &l)) = self.free.range(..end).next_back() {
            if s + l > start {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesce_reserve() {
        let mut a = RangeAllocator::new(1000);
        assert_eq!(a.capacity(), 960);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(100).unwrap();
        let z = a.alloc(100).unwrap();
        assert_eq!((x, y, z), (0, 128, 256));
        assert_eq!(a.used(), 384);
        assert!(a.free(y, 100));
        assert!(!a.free(y, 100), "double free refused");
        assert!(!a.free(5000, 10), "out of bounds refused");
        assert_eq!(a.alloc(64), Some(128), "first fit reuses the hole");
        assert!(a.free(128, 64));
        assert!(a.free(x, 100));
        assert!(a.free(z, 100));
        assert_eq!(a.used(), 0);
        assert_eq!(a.largest_free(), 960, "everything coalesced");
        assert!(a.reserve(320, 64));
        assert!(!a.reserve(300, 64), "unaligned refused");
        assert!(!a.reserve(320, 10), "overlap refused");
        assert_eq!(a.alloc(400), Some(384));
        assert_eq!(a.alloc(320), Some(0));
        assert_eq!(a.alloc(200), None, "full");
        assert_eq!(a.free_bytes(), 960 - 64 - 448 - 320);
    }
}

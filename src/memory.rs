//! Host memory for KV chunks: page-aligned buffers from a recycling pool.
//!
//! Copying into freshly mapped memory costs page faults (about 3× a copy into touched
//! memory), so buffers go back to a [`BufferPool`] when dropped, to be handed out again
//! already faulted in; [`BufferPool::prefault`] faults buffers in ahead of time, off the
//! hot path. The pool keeps at most `max_idle_bytes` of idle buffers; beyond that they
//! are freed.
//!
//! The memory itself comes from the one host allocator of kvtier,
//! [`kvtier_transport::HostAlloc`] (page-aligned; from 2 MiB up, mapped from the kernel and
//! advised as transparent huge pages), which registered transport buffers use too.
//!
//! This module and the backend crates are the only places with `unsafe`.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kvtier_transport::HostAlloc;
use parking_lot::Mutex;

pub use kvtier_transport::{BUFFER_ALIGN, HUGE_ALIGN};

struct PoolInner {
    idle: Mutex<HashMap<usize, Vec<HostAlloc>>>,
    idle_bytes: AtomicUsize,
    max_idle_bytes: usize,
    allocated_bytes: AtomicUsize,
}

/// A recycling pool of page-aligned, pre-faulted buffers. Cheap to clone (shared).
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("idle_bytes", &self.idle_bytes())
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

impl BufferPool {
    /// A pool that keeps at most `max_idle_bytes` of returned buffers for reuse.
    pub fn new(max_idle_bytes: usize) -> Self {
        BufferPool {
            inner: Arc::new(PoolInner {
                idle: Mutex::new(HashMap::new()),
                idle_bytes: AtomicUsize::new(0),
                max_idle_bytes,
                allocated_bytes: AtomicUsize::new(0),
            }),
        }
    }

    /// A buffer of `len` bytes. Its contents are unspecified (zeros or a previous user's
    /// bytes), never uninitialised. Reuses an idle (already faulted-in) buffer of the same
    /// size class when there is one.
    pub fn alloc(&self, len: usize) -> KvBuffer {
        let cap = kvtier_transport::size_class(len);
        let recycled = {
            let mut idle = self.inner.idle.lock();
            idle.get_mut(&cap).and_then(Vec::pop)
        };
        let raw = match recycled {
            Some(raw) => {
                self.inner.idle_bytes.fetch_sub(cap, Ordering::Relaxed);
                raw
            }
            None => {
                self.inner.allocated_bytes.fetch_add(cap, Ordering::Relaxed);
                HostAlloc::new(cap)
            }
        };
        KvBuffer {
            raw: Some(raw),
            len,
            pool: Some(self.inner.clone()),
        }
    }

    /// Allocates, faults in and returns to the pool `count` buffers of `len` bytes, so
    /// that the next `count` allocations of that size copy into touched memory. Call it
    /// off the hot path (at start-up, or from a background thread).
    pub fn prefault(&self, len: usize, count: usize) {
        let mut bufs: Vec<KvBuffer> = (0..count).map(|_| self.alloc(len)).collect();
        for b in &mut bufs {
            if let Some(raw) = &mut b.raw {
                raw.touch();
            }
        }
        drop(bufs);
    }

    /// Bytes held idle for reuse.
    pub fn idle_bytes(&self) -> usize {
        self.inner.idle_bytes.load(Ordering::Relaxed)
    }

    /// Bytes currently allocated by this pool, idle or in use.
    pub fn allocated_bytes(&self) -> usize {
        self.inner.allocated_bytes.load(Ordering::Relaxed)
    }
}

impl PoolInner {
    fn give_back(&self, raw: HostAlloc) {
        let cap = raw.capacity();
        if self.idle_bytes.load(Ordering::Relaxed) + cap <= self.max_idle_bytes {
            self.idle_bytes.fetch_add(cap, Ordering::Relaxed);
            self.idle.lock().entry(cap).or_default().push(raw);
        } else {
            self.allocated_bytes.fetch_sub(cap, Ordering::Relaxed);
            drop(raw);
        }
    }
}

/// An owned, page-aligned byte buffer, returned to its pool on drop.
pub struct KvBuffer {
    raw: Option<HostAlloc>,
    len: usize,
    pool: Option<Arc<PoolInner>>,
}

impl KvBuffer {
    /// A buffer outside any pool (freed on drop), filled with a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> KvBuffer {
        let raw = HostAlloc::new(bytes.len());
        let mut buf = KvBuffer {
            raw: Some(raw),
            len: bytes.len(),
            pool: None,
        };
        buf.copy_from_slice(bytes);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the buffer occupies (its page-rounded capacity).
    pub fn footprint(&self) -> usize {
        self.raw.as_ref().map_or(0, HostAlloc::capacity)
    }
}

impl Deref for KvBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let raw = self.raw.as_ref().expect("live buffer");
        // SAFETY: raw owns cap >= len initialised bytes; the shared borrow of self keeps
        // them alive and unaliased by &mut.
        unsafe { std::slice::from_raw_parts(raw.as_ptr(), self.len) }
    }
}

impl DerefMut for KvBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        let raw = self.raw.as_ref().expect("live buffer");
        // SAFETY: as in deref, and the exclusive borrow of self makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(raw.as_ptr(), self.len) }
    }
}

impl Drop for KvBuffer {
    fn drop(&mut self) {
        if let (Some(raw), Some(pool)) = (self.raw.take(), self.pool.take()) {
            pool.give_back(raw);
        }
    }
}

impl std::fmt::Debug for KvBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvBuffer({} bytes)", self.len)
    }
}

/// Copies `src` into `dst` (same length) for bulk KV moves. On x86-64, copies of 64 KiB
/// and more use non-temporal stores: they skip the read-for-ownership of destination
/// lines that ordinary stores pay, which is what a large `memcpy` does internally but a
/// loop of medium-sized copies (one per chunk segment) would not get.
pub fn copy_bulk(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_bulk: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if src.len() >= 64 * 1024 {
        // SAFETY: dst and src are valid for len bytes, and do not overlap (&mut vs &).
        unsafe { copy_nontemporal_x86(dst.as_mut_ptr(), src.as_ptr(), src.len()) };
        return;
    }
    dst.copy_from_slice(src);
}

/// # Safety
/// `dst` and `src` must be valid for `len` bytes and must not overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn copy_nontemporal_x86(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    // Ordinary copy up to 16-byte alignment of the destination.
    let head = dst.align_offset(16).min(len);
    // SAFETY: head <= len; both ranges are in bounds and disjoint (caller's contract).
    unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
    let mut i = head;
    while i + 64 <= len {
        // SAFETY: i + 64 <= len keeps every access in bounds; dst + i is 16-byte aligned
        // (head aligned it and i advances by 64); SSE2 is part of the x86-64 baseline.
        unsafe {
            let s = src.add(i) as *const __m128i;
            let d = dst.add(i) as *mut __m128i;
            let a = _mm_loadu_si128(s);
            let b = _mm_loadu_si128(s.add(1));
            let c = _mm_loadu_si128(s.add(2));
            let e = _mm_loadu_si128(s.add(3));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: the tail [i, len) is in bounds; the fence orders the streaming stores
    // before any later store, as ordinary stores would be.
    unsafe {
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        _mm_sfence();
    }
}

/// A host buffer of equal pages registered with a transport, from which concurrent senders
/// each take the pages they fill (the P/D sender's staging buffer). A page has one writer:
/// the [`StagingPages`] holding it.
pub struct Staging {
    buffer: Arc<kvtier_transport::HostBuffer>,
    page_bytes: usize,
    pages: usize,
    free: Mutex<Vec<usize>>,
    permits: Arc<tokio::sync::Semaphore>,
}

/// Pages of a [`Staging`] buffer held exclusively until dropped. It owns a handle to the
/// buffer, so it can travel with the transfer that reads its pages and be given back only
/// when that transfer has ended.
pub struct StagingPages {
    staging: Arc<Staging>,
    held: Vec<usize>,
    // Released after `Drop::drop` put the pages back on the free list.
    _permits: tokio::sync::OwnedSemaphorePermit,
}

impl Staging {
    /// A zeroed staging buffer of `pages` pages of `page_bytes` bytes (at least one page).
    pub fn new(pages: usize, page_bytes: usize) -> Staging {
        let pages = pages.max(1);
        Staging {
            buffer: Arc::new(kvtier_transport::HostBuffer::new(pages * page_bytes)),
            page_bytes,
            pages,
            free: Mutex::new((0..pages).rev().collect()),
            permits: Arc::new(tokio::sync::Semaphore::new(pages)),
        }
    }

    /// The buffer, for registering it with a transport (which reads a page only during
    /// the transfers its holder issues).
    pub fn buffer(&self) -> &Arc<kvtier_transport::HostBuffer> {
        &self.buffer
    }

    /// Pages in the buffer.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Pages no sender holds now.
    pub fn free_pages(&self) -> usize {
        self.permits.available_permits()
    }

    /// Waits until `n` pages are free and takes them (`n` is clamped to `1..=pages()`;
    /// waiters are served in order, and a request takes all its pages at once, so
    /// concurrent senders never deadlock on the buffer).
    pub async fn acquire(self: &Arc<Self>, n: usize) -> StagingPages {
        let n = n.clamp(1, self.pages);
        let permits = self
            .permits
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .expect("the staging semaphore is never closed");
        let mut free = self.free.lock();
        let at = free.len() - n;
        let held = free.split_off(at);
        StagingPages {
            staging: self.clone(),
            held,
            _permits: permits,
        }
    }

    /// Takes `n` pages (clamped to `1..=pages()`) if they are free now, without waiting.
    pub fn try_acquire(self: &Arc<Self>, n: usize) -> Option<StagingPages> {
        let n = n.clamp(1, self.pages);
        let permits = self.permits.clone().try_acquire_many_owned(n as u32).ok()?;
        let mut free = self.free.lock();
        let at = free.len() - n;
        let held = free.split_off(at);
        Some(StagingPages {
            staging: self.clone(),
            held,
            _permits: permits,
        })
    }
}

impl Drop for StagingPages {
    fn drop(&mut self) {
        self.staging.free.lock().append(&mut self.held);
    }
}

impl StagingPages {
    /// Pages held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no page is held (never: at least one is).
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Byte offset in the buffer of the `i`-th page held.
    pub fn offset(&self, i: usize) -> usize {
        self.held[i] * self.staging.page_bytes
    }

    /// Runs `fill(i, page)` on all cores for each held page `i < lens.len()`, with `page`
    /// its first `lens[i]` bytes, and returns what each call returned (the P/D sender
    /// returns the page's checksum, computed while the bytes are still in cache). Panics
    /// if there are more lengths than pages or a length exceeds the page size.
    pub fn fill<F, R>(&mut self, lens: &[usize], fill: F) -> Vec<R>
    where
        F: Fn(usize, &mut [u8]) -> R + Sync,
        R: Send,
    {
        use rayon::prelude::*;
        assert!(
            lens.len() <= self.held.len(),
            "more lengths than pages held"
        );
        let page_bytes = self.staging.page_bytes;
        assert!(
            lens.iter().all(|&l| l <= page_bytes),
            "length past the page"
        );
        let buffer: &kvtier_transport::HostBuffer = &self.staging.buffer;
        let held = &self.held;
        lens.par_iter()
            .enumerate()
            .map(|(i, &len)| {
                // SAFETY: this guard holds page `held[i]` exclusively (pages come off the
                // free list one holder at a time, indices are distinct, and `&mut self`
                // makes this the only writer through the guard); the transport reads the
                // page only during transfers the holder issues after this call; `len <=
                // page_bytes` keeps the slice inside the page, and `region_slice_mut`
                // checks the buffer's bounds.
                let page = unsafe {
                    kvtier_transport::region_slice_mut(buffer, held[i] * page_bytes, len)
                }
                .expect("staging page out of bounds");
                fill(i, page)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_recycled() {
        let pool = BufferPool::new(1 << 20);
        let mut a = pool.alloc(10_000);
        assert_eq!(a.as_ptr() as usize % BUFFER_ALIGN, 0);
        assert_eq!(a.len(), 10_000);
        a[9_999] = 7;
        let addr = a.as_ptr() as usize;
        drop(a);
        assert_eq!(pool.idle_bytes(), 12_288);
        let b = pool.alloc(9_000); // same page-rounded class
        assert_eq!(b.as_ptr() as usize, addr);
        assert_eq!(pool.idle_bytes(), 0);
        assert_eq!(pool.allocated_bytes(), 12_288);
    }

    #[test]
    fn idle_memory_is_bounded() {
        let pool = BufferPool::new(8192);
        let bufs: Vec<_> = (0..4).map(|_| pool.alloc(4096)).collect();
        drop(bufs);
        assert_eq!(pool.idle_bytes(), 8192);
        assert_eq!(pool.allocated_bytes(), 8192);
    }

    #[test]
    fn copy_bulk_copies_every_byte_at_any_alignment() {
        let src: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for offset in [0usize, 1, 7, 15, 16, 33] {
            for len in [0usize, 1, 63, 65_535, 65_536, 200_001] {
                let mut dst = vec![0u8; len + offset + 64];
                copy_bulk(&mut dst[offset..offset + len], &src[..len]);
                assert_eq!(
                    &dst[offset..offset + len],
                    &src[..len],
                    "off {offset} len {len}"
                );
                assert!(dst[..offset].iter().all(|&b| b == 0));
                assert!(dst[offset + len..].iter().all(|&b| b == 0));
            }
        }
    }

    #[tokio::test]
    async fn staging_pages_are_exclusive_and_come_back() {
        let staging = Arc::new(Staging::new(4, 64));
        let mut a = staging.acquire(3).await;
        assert_eq!((a.len(), staging.free_pages()), (3, 1));
        let offsets: Vec<usize> = (0..3).map(|i| a.offset(i)).collect();
        let digests = a.fill(&[64, 64, 10], |i, page| {
            page.fill(i as u8 + 1);
            kvtier_transport::checksum(page)
        });
        let b = staging.acquire(1).await;
        assert!(
            !offsets.contains(&b.offset(0)),
            "a free page, not one of a's"
        );
        // A waiter for more pages than are free waits until they come back (and, waiters
        // being served in order, holds up later ones meanwhile).
        let waiter = staging.acquire(2);
        tokio::pin!(waiter);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiter);
        assert!(pending.await.is_err(), "2 pages asked, none free: it waits");
        drop(b);
        drop(a);
        let c = waiter.await;
        assert_eq!((c.len(), staging.free_pages()), (2, 2));
        drop(c);
        assert_eq!(staging.acquire(99).await.len(), 4, "clamped to what exists");
        assert_ne!(digests[0], digests[1]);
        assert_eq!(staging.free_pages(), 4);
    }

    #[test]
    fn zero_length_buffer() {
        let pool = BufferPool::new(0);
        let b = pool.alloc(0);
        assert!(b.is_empty());
        assert_eq!(&b[..], &[] as &[u8]);
    }
}

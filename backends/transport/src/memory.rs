//! Memory that transports may access behind Rust's back.

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::access::{RemoteAccess, WriteGuard, WriterId};
use crate::{RegionId, RegionInfo, Result, TransportError};

/// Memory a transport may read and write through raw pointers while it is registered.
///
/// # Safety
/// Implementors guarantee that `as_ptr()..as_ptr() + len()` stays valid for reads and
/// writes, and does not move, for as long as the value lives, and that no Rust reference
/// to those bytes is held across a transfer into them (peers write concurrently, like
/// DMA). [`HostBuffer`] is such memory; its accessors copy through raw pointers.
pub unsafe trait RegionMemory: Send + Sync + 'static {
    /// First byte.
    fn as_ptr(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Minimum alignment of every buffer (a page: good for DMA, pinning and `O_DIRECT`).
pub const BUFFER_ALIGN: usize = 4096;
/// Alignment and size granularity of large buffers (a huge page).
pub const HUGE_ALIGN: usize = 2 << 20;

/// The host allocator of kvtier: a page-aligned, zeroed allocation that owns its memory.
/// From [`HUGE_ALIGN`] up it is, on Linux, mapped straight from the kernel (zero pages, no
/// memset pass: the first copy into it is the only pass), 2 MiB-aligned and advised as
/// transparent huge pages (first-touch faults then cost about 1/7 of what 4 KiB pages
/// cost); smaller ones come from the global allocator, zeroed. The engine's buffer pool
/// and [`HostBuffer`] both allocate here.
pub struct HostAlloc {
    ptr: NonNull<u8>,
    cap: usize,
    /// From `mmap` (freed with `munmap`) rather than the allocator.
    mapped: bool,
}

// SAFETY: HostAlloc uniquely owns its allocation; moving it between threads moves ownership.
unsafe impl Send for HostAlloc {}
// SAFETY: &HostAlloc gives only a raw pointer to the bytes (reading or writing through
// it is the owner's unsafe business); its safe methods that write take &mut self.
unsafe impl Sync for HostAlloc {}

impl HostAlloc {
    /// At least `len` zeroed bytes: [`size_class`]`(len)` of them.
    pub fn new(len: usize) -> HostAlloc {
        let cap = size_class(len);
        #[cfg(target_os = "linux")]
        if cap >= HUGE_ALIGN {
            return Self::mapped(cap);
        }
        let layout = layout_of(cap);
        // SAFETY: layout has non-zero size (size_class never returns 0).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        HostAlloc {
            ptr,
            cap,
            mapped: false,
        }
    }

    /// `cap` bytes of fresh anonymous memory, 2 MiB-aligned, advised as huge pages.
    #[cfg(target_os = "linux")]
    fn mapped(cap: usize) -> HostAlloc {
        let len = cap + HUGE_ALIGN;
        // SAFETY: an anonymous private mapping of `len` bytes; no file, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            alloc::handle_alloc_error(layout_of(cap));
        }
        let start = p as usize;
        let aligned = start.div_ceil(HUGE_ALIGN) * HUGE_ALIGN;
        let head = aligned - start;
        let tail = len - head - cap;
        // SAFETY: the head and tail trimmed off lie inside the mapping just made, outside
        // [aligned, aligned + cap); MADV_HUGEPAGE is advice on our own range (failure, e.g.
        // THP disabled, is harmless).
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((aligned + cap) as *mut libc::c_void, tail);
            }
            libc::madvise(aligned as *mut libc::c_void, cap, libc::MADV_HUGEPAGE);
        }
        HostAlloc {
            ptr: NonNull::new(aligned as *mut u8).expect("mmap never returns null"),
            cap,
            mapped: true,
        }
    }

    /// Bytes allocated (`size_class` of the length asked for).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// First byte. Valid for [`HostAlloc::capacity`] bytes until the value is dropped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Faults every page in for writing (each page's first byte is read and written back,
    /// so the contents stay as they are).
    pub fn touch(&mut self) {
        let mut at = 0;
        while at < self.cap {
            // SAFETY: at < cap, inside the initialised allocation, and `&mut self` excludes
            // every other access. Volatile so the store of the value already there is not
            // elided.
            unsafe {
                let p = self.ptr.as_ptr().add(at);
                p.write_volatile(p.read_volatile());
            }
            at += BUFFER_ALIGN;
        }
    }
}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        if self.mapped {
            #[cfg(target_os = "linux")]
            // SAFETY: exactly the range mapped (and trimmed to) in `mapped`.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.cap);
            }
            return;
        }
        let layout = layout_of(self.cap);
        // SAFETY: ptr was allocated by alloc::alloc_zeroed with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// Capacity actually allocated for `len` bytes: whole huge pages from 2 MiB up, whole
/// pages below.
pub fn size_class(len: usize) -> usize {
    let unit = if len >= HUGE_ALIGN {
        HUGE_ALIGN
    } else {
        BUFFER_ALIGN
    };
    len.max(1).div_ceil(unit) * unit
}

fn layout_of(cap: usize) -> Layout {
    let align = if cap >= HUGE_ALIGN {
        HUGE_ALIGN
    } else {
        BUFFER_ALIGN
    };
    Layout::from_size_align(cap, align).expect("buffer layout")
}

/// A page-aligned host allocation for registration, accessed by copying in and out.
pub struct HostBuffer {
    alloc: HostAlloc,
    len: usize,
}

impl HostBuffer {
    /// `len` zeroed bytes, touched so transfers do not pay page faults. From 2 MiB up the
    /// buffer is 2 MiB-aligned and, on Linux, advised as transparent huge pages: faults,
    /// TLB misses and the kernel's page walks for cross-process copies all shrink.
    pub fn new(len: usize) -> Self {
        let mut alloc = HostAlloc::new(len);
        alloc.touch();
        HostBuffer { alloc, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "HostBuffer range {offset}+{len} outside {} bytes",
            self.len
        );
    }

    /// Copies `src` into the buffer at `offset`. Panics if out of bounds.
    pub fn write_at(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: bounds checked; src is a distinct Rust allocation (it cannot alias a
        // buffer we only touch through raw pointers).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.alloc.as_ptr().add(offset), src.len())
        };
    }

    /// Copies bytes at `offset` into `dst`. Panics if out of bounds.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: bounds checked; dst is a distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.alloc.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
    }

    /// A copy of `len` bytes at `offset`.
    pub fn to_vec(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read_at(offset, &mut v);
        v
    }

    /// Fills the buffer with test bytes derived from `seed`: a 64 KiB pattern repeated,
    /// each 4 KiB page stamped with its offset, so misplaced pages are detected. Cheap
    /// enough for gigabytes in unoptimised test builds.
    pub fn fill_pattern(&self, seed: u64) {
        let mut block = vec![0u8; 64 * 1024];
        pattern(seed, 0, &mut block);
        let mut offset = 0;
        while offset < self.len {
            let n = block.len().min(self.len - offset);
            self.write_at(offset, &block[..n]);
            offset += n;
        }
        let mut page = 0;
        while page + 8 <= self.len {
            self.write_at(page, &(page as u64 ^ seed).to_le_bytes());
            page += 4096;
        }
    }

    /// xxh3-64 of `len` bytes at `offset`.
    pub fn digest(&self, offset: usize, len: usize) -> u64 {
        self.check(offset, len);
        // SAFETY: bounds checked; the slice lives only for this hash, and the caller of a
        // digest has quiesced transfers into the range (RegionMemory's contract).
        let bytes = unsafe { std::slice::from_raw_parts(self.alloc.as_ptr().add(offset), len) };
        crate::checksum(bytes)
    }
}

/// xxh3-64 of `ranges` — (memory, offset, length) — in order, as one stream; `None` if a
/// range is out of its memory's bounds. Nothing may write those bytes meanwhile
/// (RegionMemory's contract: the owner does not race transfers that read them).
pub fn region_digest<'a>(
    ranges: impl IntoIterator<Item = (&'a dyn RegionMemory, usize, usize)>,
) -> Option<u64> {
    let mut hash = crate::Checksum::new();
    for (memory, offset, len) in ranges {
        // SAFETY: `region_slice` checks the bounds; the slice lives only for this update,
        // and nothing writes the range meanwhile (the contract above).
        hash.update(unsafe { region_slice(memory, offset, len) }?);
    }
    Some(hash.digest())
}

/// Deterministic test bytes: `out[i]` depends on `seed` and `start + i`.
pub fn pattern(seed: u64, start: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let x = (start + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        *b = (x >> 29) as u8;
    }
}

// SAFETY: the allocation lives until drop and never moves; HostBuffer itself never hands
// out references to the bytes.
unsafe impl RegionMemory for HostBuffer {
    fn as_ptr(&self) -> *mut u8 {
        self.alloc.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// The regions one transport instance has registered: ids, memory, access, bounds checks.
#[derive(Default)]
pub struct RegionTable {
    next: AtomicU64,
    regions: RwLock<HashMap<RegionId, Region>>,
}

/// One registered region: its memory and who may access it from the network.
type Region = (Arc<dyn RegionMemory>, RemoteAccess);

impl RegionTable {
    /// Adds `memory`, accessible to peers as `access` says, under a fresh id.
    pub fn insert(&self, memory: Arc<dyn RegionMemory>, access: RemoteAccess) -> RegionId {
        let id = RegionId(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        self.regions
            .write()
            .expect("region table lock")
            .insert(id, (memory, access));
        id
    }

    /// Removes `id`; returns its memory.
    pub fn remove(&self, id: RegionId) -> Option<Arc<dyn RegionMemory>> {
        self.regions
            .write()
            .expect("region table lock")
            .remove(&id)
            .map(|(m, _)| m)
    }

    /// Regions held.
    pub fn len(&self) -> usize {
        self.regions.read().expect("region table lock").len()
    }

    /// Whether no region is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How peers may access `id`, if it is registered.
    pub fn access(&self, id: RegionId) -> Option<RemoteAccess> {
        let map = self.regions.read().expect("region table lock");
        map.get(&id).map(|(_, a)| a.clone())
    }

    /// The memory and access of `id` if `offset..offset+len` lies inside it. The returned
    /// `Arc` keeps the memory alive through a transfer even if the region is deregistered
    /// meanwhile.
    fn checked(
        &self,
        id: RegionId,
        offset: u64,
        len: u64,
    ) -> Result<(Arc<dyn RegionMemory>, RemoteAccess)> {
        let map = self.regions.read().expect("region table lock");
        let entry = map.get(&id);
        let region_len = entry.map_or(0, |(m, _)| m.len() as u64);
        match (entry, offset.checked_add(len)) {
            (Some((m, a)), Some(end)) if end <= region_len => Ok((m.clone(), a.clone())),
            _ => Err(TransportError::OutOfBounds {
                region: id,
                offset,
                len,
                region_len,
            }),
        }
    }

    /// The memory of `id` for a peer's read of `offset..offset+len`: in bounds, and the
    /// region admits remote reads.
    pub fn peer_read(&self, id: RegionId, offset: u64, len: u64) -> Result<Arc<dyn RegionMemory>> {
        let (memory, access) = self.checked(id, offset, len)?;
        access
            .check_read()
            .map_err(|reason| TransportError::Forbidden {
                region: id,
                offset,
                len,
                reason,
            })?;
        Ok(memory)
    }

    /// The memory of `id` for a write of `offset..offset+len` by the peer whose connection
    /// is `writer`: in bounds and allowed by the region's access. Keep the guard until the
    /// bytes have landed.
    pub fn peer_write(
        &self,
        id: RegionId,
        offset: u64,
        len: u64,
        writer: Option<WriterId>,
    ) -> Result<(Arc<dyn RegionMemory>, Option<WriteGuard>)> {
        let (memory, access) = self.checked(id, offset, len)?;
        let guard = access.check_write(writer, offset, len).map_err(|reason| {
            TransportError::Forbidden {
                region: id,
                offset,
                len,
                reason,
            }
        })?;
        Ok((memory, guard))
    }

    /// Every region peers may access, as they see it (`key` filled by `key_of`); local-only
    /// regions are not listed.
    pub fn infos(&self, mut key_of: impl FnMut(RegionId) -> Vec<u8>) -> Vec<RegionInfo> {
        let map = self.regions.read().expect("region table lock");
        let mut infos: Vec<RegionInfo> = map
            .iter()
            .filter(|(_, (_, a))| a.allows_remote_write())
            .map(|(id, (m, _))| RegionInfo {
                id: *id,
                addr: m.as_ptr() as u64,
                len: m.len() as u64,
                key: key_of(*id),
            })
            .collect();
        infos.sort_by_key(|r| r.id);
        infos
    }
}

/// `len` bytes of `memory` at `offset` as a slice, or `None` if out of bounds.
///
/// # Safety
/// The caller must ensure that, for the slice's lifetime, nothing writes those bytes
/// (RegionMemory's DMA contract: the region's owner does not race its own transfers).
pub unsafe fn region_slice(memory: &dyn RegionMemory, offset: usize, len: usize) -> Option<&[u8]> {
    let end = offset.checked_add(len)?;
    if end > memory.len() {
        return None;
    }
    // SAFETY: in bounds of memory valid for the borrow of `memory` (RegionMemory's
    // guarantee); no concurrent writers (the caller's contract).
    Some(unsafe { std::slice::from_raw_parts(memory.as_ptr().add(offset), len) })
}

/// `len` bytes of `memory` at `offset` as a mutable slice, or `None` if out of bounds.
///
/// # Safety
/// The caller must ensure that, for the slice's lifetime, nothing else reads or writes
/// those bytes.
#[allow(clippy::mut_from_ref)]
pub unsafe fn region_slice_mut(
    memory: &dyn RegionMemory,
    offset: usize,
    len: usize,
) -> Option<&mut [u8]> {
    let end = offset.checked_add(len)?;
    if end > memory.len() {
        return None;
    }
    // SAFETY: in bounds; exclusive access is the caller's contract.
    Some(unsafe { std::slice::from_raw_parts_mut(memory.as_ptr().add(offset), len) })
}

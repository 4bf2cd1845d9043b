//! Local disk tier: one self-describing file per chunk.
//!
//! Each chunk is stored as `DIR/<k0k1>/<key>.kvc` in the [chunk format](crate::chunk)
//! (header + payload), written to a temporary name and renamed into place, so a file is
//! either whole or absent. The in-memory index (an LRU bounded by `capacity` bytes) is
//! rebuilt on open by reading and validating every file's header. Writes go through a
//! bounded queue to one background writer thread; a queued chunk is served from memory
//! until its file is in place. Reads verify the payload checksum: a damaged file is
//! deleted and reported as [`TierError::CorruptChunk`], never returned as KV.
//!
//! Files are not fsync'ed: after a crash, recent chunks may be missing, never wrong.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use hashlink::LinkedHashMap;
use parking_lot::Mutex;

use super::{Chunk, ChunkRef, Result, Tier, TierError, TierKind, TierUsage};
use crate::chunk::{ChunkHeader, CorruptChunk, CorruptReason, HEADER_LEN};
use crate::keys::ChunkKey;
use crate::memory::BufferPool;

const EXT: &str = "kvc";
const TMP_EXT: &str = "kvc.tmp";

enum Entry {
    /// Queued for writing; served from memory.
    Pending(ChunkRef),
    /// On disk.
    Stored,
}

struct DiskState {
    /// Front = least recently used; the value's size is `file_len(entry)`.
    index: LinkedHashMap<ChunkKey, (Entry, u64)>,
    used: u64,
}

struct DiskInner {
    dir: PathBuf,
    capacity: u64,
    pool: BufferPool,
    state: Mutex<DiskState>,
    evictions: AtomicU64,
    write_errors: AtomicU64,
}

enum Job {
    Write(ChunkRef),
    Flush(mpsc::Sender<()>),
}

/// Byte-bounded LRU of chunk files in one directory.
pub struct DiskTier {
    inner: Arc<DiskInner>,
    queue: Option<SyncSender<Job>>,
    queue_depth: usize,
    writer: Option<JoinHandle<()>>,
}

/// What [`DiskTier::open`] found in the directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Valid chunk files indexed.
    pub chunks: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Damaged, misnamed or half-written files deleted.
    pub discarded: u64,
    /// Valid files evicted because they exceeded the capacity.
    pub evicted: u64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TierError + 'a {
    move |source| TierError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl DiskInner {
    fn path_of(&self, key: ChunkKey) -> PathBuf {
        let name = key.to_string();
        self.dir.join(&name[..2]).join(format!("{name}.{EXT}"))
    }

    fn delete(&self, key: ChunkKey) {
        let path = self.path_of(key);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), "disk tier: cannot delete chunk file: {e}");
            }
        }
    }

    fn forget(&self, key: ChunkKey) {
        let mut state = self.state.lock();
        if let Some((_, size)) = state.index.remove(&key) {
            state.used -= size;
        }
    }

    fn write_file(&self, chunk: &Chunk) -> Result<()> {
        let path = self.path_of(chunk.key);
        let parent = path.parent().expect("chunk path has a parent");
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        let tmp = path.with_extension(TMP_EXT);
        let header = ChunkHeader::for_payload(chunk.key, chunk.shape, chunk.payload()).encode();
        let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(&header)
            .and_then(|()| file.write_all(chunk.payload()))
            .map_err(io_err("write", &tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))
    }

    fn writer_loop(self: Arc<Self>, jobs: Receiver<Job>) {
        for job in jobs {
            match job {
                Job::Flush(done) => {
                    let _ = done.send(());
                }
                Job::Write(chunk) => {
                    let key = chunk.key;
                    match self.write_file(&chunk) {
                        Ok(()) => {
                            let mut state = self.state.lock();
                            match state.index.get_mut(&key) {
                                Some((entry @ Entry::Pending(_), _)) => *entry = Entry::Stored,
                                Some((Entry::Stored, _)) => {}
                                // Removed while queued: the file must not outlive its entry.
                                None => {
                                    drop(state);
                                    self.delete(key);
                                }
                            }
                        }
                        Err(e) => {
                            self.write_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::error!("disk tier: chunk {key} not written: {e}");
                            self.forget(key);
                            let _ = fs::remove_file(self.path_of(key).with_extension(TMP_EXT));
                        }
                    }
                }
            }
        }
    }

    fn read_file(&self, key: ChunkKey) -> Result<Option<ChunkRef>> {
        let path = self.path_of(key);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            // Evicted or removed between the index check and the open.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let (header, file_len) = read_header(&mut file, &path)?;
        check_header(&header, key, file_len)?;
        let mut data = self.pool.alloc(header.shape.payload_len());
        file.read_exact(&mut data).map_err(io_err("read", &path))?;
        header.verify_payload(&data)?;
        Ok(Some(Arc::new(Chunk {
            key,
            shape: header.shape,
            data,
        })))
    }
}

fn read_header(file: &mut File, path: &Path) -> Result<(ChunkHeader, u64)> {
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    let mut head = [0u8; HEADER_LEN];
    let n = file
        .read(&mut head)
        .and_then(|n| {
            if n < HEADER_LEN {
                // A short first read is legal; finish it.
                file.read_exact(&mut head[n..])
                    .map(|()| HEADER_LEN)
                    .or(Ok(n))
            } else {
                Ok(n)
            }
        })
        .map_err(io_err("read", path))?;
    Ok((ChunkHeader::decode(&head[..n])?, file_len))
}

fn check_header(header: &ChunkHeader, key: ChunkKey, file_len: u64) -> Result<(), CorruptChunk> {
    if header.key != key {
        return Err(CorruptChunk {
            key: Some(key),
            reason: CorruptReason::KeyMismatch {
                expected: key,
                found: header.key,
            },
        });
    }
    let expected = HEADER_LEN as u64 + header.payload_len;
    match file_len.cmp(&expected) {
        std::cmp::Ordering::Less => Err(CorruptChunk {
            key: Some(key),
            reason: CorruptReason::Truncated {
                expected: header.payload_len,
                actual: file_len.saturating_sub(HEADER_LEN as u64),
            },
        }),
        std::cmp::Ordering::Greater => Err(CorruptChunk {
            key: Some(key),
            reason: CorruptReason::TrailingBytes(file_len - expected),
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

impl DiskTier {
    /// Opens (creating if needed) the tier in `dir`, indexing the chunk files already
    /// there. Damaged or half-written files are deleted; if the valid ones exceed
    /// `capacity`, the oldest are evicted. `queue_depth` bounds the chunks waiting to be
    /// written; `pool` provides read buffers.
    pub fn open(
        dir: impl Into<PathBuf>,
        capacity: u64,
        queue_depth: usize,
        pool: BufferPool,
    ) -> Result<(DiskTier, RecoveryReport)> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let inner = Arc::new(DiskInner {
            dir,
            capacity,
            pool,
            state: Mutex::new(DiskState {
                index: LinkedHashMap::new(),
                used: 0,
            }),
            evictions: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
        });
        let report = recover(&inner)?;
        let (tx, rx) = mpsc::sync_channel(queue_depth.max(1));
        let writer_inner = inner.clone();
        let writer = std::thread::Builder::new()
            .name("kvtier-disk-writer".into())
            .spawn(move || writer_inner.writer_loop(rx))
            .map_err(io_err("spawn writer thread for", &inner.dir))?;
        Ok((
            DiskTier {
                inner,
                queue: Some(tx),
                queue_depth: queue_depth.max(1),
                writer: Some(writer),
            },
            report,
        ))
    }

    /// The tier's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Blocks until every chunk queued before this call is on disk.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if let Some(queue) = &self.queue {
            if queue.send(Job::Flush(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
    }

    /// Chunks that failed to write since open.
    pub fn write_errors(&self) -> u64 {
        self.inner.write_errors.load(Ordering::Relaxed)
    }
}

/// Indexes the valid chunk files in the tier's directory, oldest first.
fn recover(inner: &DiskInner) -> Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    let mut found: Vec<(SystemTime, ChunkKey, u64)> = Vec::new();
    let top = fs::read_dir(&inner.dir).map_err(io_err("list", &inner.dir))?;
    for shard in top.flatten() {
        let shard_path = shard.path();
        if !shard_path.is_dir() {
            continue;
        }
        let files = fs::read_dir(&shard_path).map_err(io_err("list", &shard_path))?;
        for file in files.flatten() {
            // Only regular files are ours: a directory or symbolic link under a chunk's
            // name is left alone (never followed, never deleted).
            if !file.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = file.path();
            let name = file.file_name();
            let name = name.to_string_lossy();
            let Some(stem) = name.strip_suffix(&format!(".{EXT}")) else {
                if name.ends_with(TMP_EXT) {
                    report.discarded += 1;
                    let _ = fs::remove_file(&path);
                }
                continue;
            };
            let verdict = stem
                .parse::<ChunkKey>()
                .map_err(|e| e.to_string())
                .and_then(|key| {
                    // Each key has one place (`path_of`): a copy elsewhere would be
                    // indexed twice and never read.
                    if path != inner.path_of(key) {
                        return Err(format!("not where chunk {key} belongs"));
                    }
                    let mut f = File::open(&path).map_err(|e| e.to_string())?;
                    let mtime = f
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    let (header, len) = read_header(&mut f, &path).map_err(|e| e.to_string())?;
                    check_header(&header, key, len).map_err(|e| e.to_string())?;
                    Ok((mtime, key, len))
                });
            match verdict {
                Ok(entry) => found.push(entry),
                Err(why) => {
                    tracing::warn!(path = %path.display(), "disk tier: discarding file: {why}");
                    report.discarded += 1;
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
    found.sort();
    let mut state = inner.state.lock();
    for (_, key, size) in found {
        state.index.insert(key, (Entry::Stored, size));
        state.used += size;
        report.chunks += 1;
        report.bytes += size;
    }
    while state.used > inner.capacity {
        let Some((key, (_, size))) = state.index.pop_front() else {
            break;
        };
        state.used -= size;
        report.evicted += 1;
        inner.delete(key);
    }
    Ok(report)
}

impl Tier for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    fn put(&self, chunk: ChunkRef) -> Result<()> {
        let size = (HEADER_LEN + chunk.payload().len()) as u64;
        let capacity = self.inner.capacity;
        if size > capacity {
            return Err(TierError::ChunkTooLarge {
                tier: TierKind::Disk,
                bytes: size,
                capacity,
            });
        }
        let mut victims = Vec::new();
        {
            let mut state = self.inner.state.lock();
            if state.index.to_back(&chunk.key).is_some() {
                return Ok(());
            }
            if state.used + size > capacity {
                let mut need = state.used + size - capacity;
                let mut pending = 0;
                for (key, (entry, len)) in state.index.iter() {
                    if need == 0 {
                        break;
                    }
                    match entry {
                        Entry::Pending(_) => pending += len,
                        Entry::Stored => {
                            need = need.saturating_sub(*len);
                            victims.push(*key);
                        }
                    }
                }
                if need > 0 {
                    return Err(TierError::Full {
                        tier: TierKind::Disk,
                        needed: need,
                        pinned: pending,
                    });
                }
                for key in &victims {
                    if let Some((_, len)) = state.index.remove(key) {
                        state.used -= len;
                    }
                }
            }
            state.used += size;
            state
                .index
                .insert(chunk.key, (Entry::Pending(chunk.clone()), size));
        }
        self.inner
            .evictions
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        for key in victims {
            self.inner.delete(key);
        }
        let key = chunk.key;
        let queue = self.queue.as_ref().expect("queue lives until drop");
        match queue.try_send(Job::Write(chunk)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.inner.forget(key);
                Err(TierError::QueueFull {
                    tier: TierKind::Disk,
                    depth: self.queue_depth,
                })
            }
        }
    }

    fn get(&self, key: ChunkKey) -> Result<Option<ChunkRef>> {
        {
            let mut state = self.inner.state.lock();
            match state.index.to_back(&key) {
                None => return Ok(None),
                Some((Entry::Pending(chunk), _)) => return Ok(Some(chunk.clone())),
                Some((Entry::Stored, _)) => {}
            }
        }
        match self.inner.read_file(key) {
            Ok(Some(chunk)) => Ok(Some(chunk)),
            Ok(None) => {
                self.inner.forget(key);
                Ok(None)
            }
            Err(e) => {
                self.inner.forget(key);
                self.inner.delete(key);
                Err(e)
            }
        }
    }

    fn mark_present(&self, keys: &[ChunkKey], present: &mut [bool]) {
        let state = self.inner.state.lock();
        for (key, p) in keys.iter().zip(present.iter_mut()) {
            *p |= state.index.contains_key(key);
        }
    }

    fn remove(&self, key: ChunkKey) -> bool {
        let removed = {
            let mut state = self.inner.state.lock();
            let removed = state.index.remove(&key);
            if let Some((_, size)) = &removed {
                state.used -= size;
            }
            removed
        };
        match removed {
            Some((Entry::Stored, _)) => {
                self.inner.delete(key);
                true
            }
            // The writer deletes the file when it finds the entry gone.
            Some((Entry::Pending(_), _)) => true,
            None => false,
        }
    }

    fn clear(&self) {
        let old = {
            let mut state = self.inner.state.lock();
            state.used = 0;
            std::mem::take(&mut state.index)
        };
        for (key, (entry, _)) in old {
            if matches!(entry, Entry::Stored) {
                self.inner.delete(key);
            }
        }
    }

    fn usage(&self) -> TierUsage {
        let state = self.inner.state.lock();
        TierUsage {
            used_bytes: state.used,
            capacity_bytes: self.inner.capacity,
            objects: state.index.len() as u64,
            evictions: self.inner.evictions.load(Ordering::Relaxed),
        }
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued, then exit.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChunkShape, DType, KvLayout};

    fn shape(tokens: u32) -> ChunkShape {
        ChunkShape {
            layout: KvLayout::Kv2Ltd,
            dtype: DType::Bf16,
            layers: 2,
            tokens,
            hidden: 64,
        }
    }

    fn chunk(pool: &BufferPool, key: u128) -> ChunkRef {
        let s = shape(4);
        let mut data = pool.alloc(s.payload_len());
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u128 ^ key) as u8;
        }
        Chunk::new(ChunkKey(key), s, data).unwrap()
    }

    fn file_size() -> u64 {
        (HEADER_LEN + shape(4).payload_len()) as u64
    }

    #[test]
    fn put_get_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(1 << 20);
        let originals: Vec<_> = (1..=5).map(|k| chunk(&pool, k)).collect();
        {
            let (tier, report) = DiskTier::open(dir.path(), 1 << 20, 8, pool.clone()).unwrap();
            assert_eq!(report, RecoveryReport::default());
            for c in &originals {
                tier.put(c.clone()).unwrap();
            }
            tier.flush();
            assert_eq!(tier.usage().objects, 5);
        }
        let (tier, report) = DiskTier::open(dir.path(), 1 << 20, 8, pool.clone()).unwrap();
        assert_eq!(report.chunks, 5);
        assert_eq!(report.bytes, 5 * file_size());
        for c in &originals {
            let got = tier.get(c.key).unwrap().expect("chunk survives restart");
            assert_eq!(got.shape, c.shape);
            assert_eq!(got.payload(), c.payload());
        }
    }

    #[test]
    fn corrupt_file_is_an_error_then_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(0);
        let (tier, _) = DiskTier::open(dir.path(), 1 << 20, 8, pool.clone()).unwrap();
        let c = chunk(&pool, 7);
        tier.put(c.clone()).unwrap();
        tier.flush();
        let path = tier.inner.path_of(c.key);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        let err = tier.get(c.key).unwrap_err();
        assert!(
            matches!(err, TierError::CorruptChunk(CorruptChunk { reason: CorruptReason::PayloadChecksum, key: Some(k) }) if k == c.key)
        );
        assert!(!path.exists());
        assert!(tier.get(c.key).unwrap().is_none());
    }

    #[test]
    fn recovery_discards_damaged_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(0);
        let (a, b) = (chunk(&pool, 1), chunk(&pool, 2));
        {
            let (tier, _) = DiskTier::open(dir.path(), 1 << 20, 8, pool.clone()).unwrap();
            tier.put(a.clone()).unwrap();
            tier.put(b.clone()).unwrap();
            tier.flush();
            // Truncate b, rename a copy of a under another key, leave a stray temp file.
            let pb = tier.inner.path_of(b.key);
            let len = fs::metadata(&pb).unwrap().len();
            File::options()
                .write(true)
                .open(&pb)
                .unwrap()
                .set_len(len - 10)
                .unwrap();
            let wrong = tier.inner.path_of(ChunkKey(3));
            fs::create_dir_all(wrong.parent().unwrap()).unwrap();
            fs::copy(tier.inner.path_of(a.key), &wrong).unwrap();
            fs::write(wrong.with_extension(TMP_EXT), b"half").unwrap();
        }
        let (tier, report) = DiskTier::open(dir.path(), 1 << 20, 8, pool).unwrap();
        assert_eq!((report.chunks, report.discarded), (1, 3));
        assert!(tier.contains(a.key));
        assert!(!tier.contains(b.key));
    }

    #[test]
    fn recovery_indexes_each_key_once_and_leaves_directories_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(0);
        let a = chunk(&pool, 1);
        let (copy, folder) = {
            let (tier, _) = DiskTier::open(dir.path(), 1 << 20, 8, pool.clone()).unwrap();
            tier.put(a.clone()).unwrap();
            tier.flush();
            // A copy of a's file in another shard's directory, and a directory under the
            // name chunk 2's file would have.
            let own = tier.inner.path_of(a.key);
            let copy = dir.path().join("ff").join(own.file_name().unwrap());
            fs::create_dir_all(copy.parent().unwrap()).unwrap();
            fs::copy(&own, &copy).unwrap();
            let folder = tier.inner.path_of(ChunkKey(2));
            fs::create_dir_all(&folder).unwrap();
            (copy, folder)
        };
        let (tier, report) = DiskTier::open(dir.path(), 1 << 20, 8, pool).unwrap();
        // Before: the copy was indexed too (two chunks, its bytes counted twice and never
        // freed) and the directory counted as a discarded file on every start.
        assert_eq!((report.chunks, report.discarded), (1, 1));
        assert_eq!(tier.usage().used_bytes, file_size());
        assert!(!copy.exists());
        assert!(folder.is_dir());
    }

    #[test]
    fn evicts_lru_files_at_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(0);
        let (tier, _) = DiskTier::open(dir.path(), 2 * file_size(), 8, pool.clone()).unwrap();
        for k in 1..=3 {
            tier.put(chunk(&pool, k)).unwrap();
            tier.flush();
        }
        assert!(!tier.contains(ChunkKey(1)));
        assert!(!tier.inner.path_of(ChunkKey(1)).exists());
        assert_eq!(tier.usage().evictions, 1);
        assert_eq!(tier.usage().used_bytes, 2 * file_size());
        // Reopening with a smaller capacity evicts the oldest file.
        drop(tier);
        let (tier, report) = DiskTier::open(dir.path(), file_size(), 8, pool).unwrap();
        assert_eq!((report.chunks, report.evicted), (2, 1));
        assert!(tier.contains(ChunkKey(3)));
    }

    #[test]
    fn remove_while_queued_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(0);
        let (tier, _) = DiskTier::open(dir.path(), 1 << 20, 64, pool.clone()).unwrap();
        for k in 1..=20 {
            tier.put(chunk(&pool, k)).unwrap();
        }
        tier.clear();
        tier.flush();
        assert_eq!(tier.usage().objects, 0);
        for k in 1..=20 {
            assert!(
                !tier.inner.path_of(ChunkKey(k)).exists(),
                "file {k} left behind"
            );
        }
    }
}

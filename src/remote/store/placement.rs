//! The master's object placement: which objects live where, pending puts, read leases,
//! eviction and reclamation. Pure state with no I/O; the master server drives it and
//! forwards the [`NodeUpdate`]s it returns to the nodes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::remote::alloc::{round_up, RangeAllocator};
use crate::remote::rpc::{
    IndexEntry, Located, ObjectKey, ObjectMeta, PutSlot, Replica, SegmentInfo, StoreStats,
    MAX_REPLICAS,
};

/// Placement policy.
#[derive(Clone, Copy, Debug)]
pub struct PlacementConfig {
    /// Above this fraction of pool capacity in use, eviction runs.
    pub high_watermark: f64,
    /// Eviction frees down to this fraction.
    pub low_watermark: f64,
    /// A put not ended within this is reclaimed.
    pub put_timeout: Duration,
    /// How long a `Get` keeps the object's ranges in place.
    pub read_lease: Duration,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            high_watermark: 0.95,
            low_watermark: 0.85,
            put_timeout: Duration::from_secs(30),
            read_lease: Duration::from_secs(5),
        }
    }
}

/// A change a node must mirror in its own index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeUpdate {
    /// The object is committed at this range of the segment.
    Commit(u64, IndexEntry),
    /// The object at this offset of the segment is gone.
    Drop(u64, ObjectKey, u64),
}

#[derive(Debug)]
enum State {
    Pending,
    Complete,
}

#[derive(Debug)]
struct Object {
    meta: ObjectMeta,
    replicas: Vec<Replica>,
    state: State,
    /// Logical clock of the last put or get (for LRU).
    touched: u64,
    /// Ranges stay in place until then.
    leased_until: Option<Instant>,
}

struct Segment {
    info: SegmentInfo,
    alloc: RangeAllocator,
}

/// Object placement across the pool's segments.
pub struct Placement {
    config: PlacementConfig,
    segments: HashMap<u64, Segment>,
    objects: HashMap<ObjectKey, Object>,
    /// Deadline and put id of each pending put (so sweeping does not scan every object).
    pending: HashMap<ObjectKey, (Instant, u64)>,
    /// Next put id (starts at a random value: ids of a previous leader do not collide).
    next_put: u64,
    /// Ranges of removed objects still under a read lease: freed once it ends.
    deferred: Vec<(Instant, ObjectKey, Vec<Replica>, u64)>,
    clock: u64,
    stats: StoreStats,
}

impl Placement {
    /// Empty placement.
    pub fn new(config: PlacementConfig) -> Self {
        Placement {
            config,
            segments: HashMap::new(),
            objects: HashMap::new(),
            pending: HashMap::new(),
            next_put: u64::from_le_bytes(
                kvtier_transport::auth::nonce()[..8]
                    .try_into()
                    .expect("8 bytes"),
            ),
            deferred: Vec::new(),
            clock: 0,
            stats: StoreStats::default(),
        }
    }

    /// The policy.
    pub fn config(&self) -> &PlacementConfig {
        &self.config
    }

    /// Adds a segment, with the objects its node reports (`index`, rebuilt placement);
    /// returns how many copies it restored. Entries that overlap one another or lie
    /// outside the segment are skipped. A segment already in the pool is left as it is
    /// (its ranges are known; adding it again would forget them).
    pub fn add_segment(&mut self, info: SegmentInfo, index: &[IndexEntry], now: Instant) -> usize {
        let id = info.id;
        if self.segments.contains_key(&id) {
            return 0;
        }
        let mut seg = Segment {
            alloc: RangeAllocator::new(info.size),
            info,
        };
        let mut restored = 0;
        for e in index {
            if !seg.alloc.reserve(e.offset, e.meta.len) {
                continue;
            }
            let replica = Replica {
                segment: id,
                offset: e.offset,
            };
            // Readers of the previous term may still hold leases we cannot know: treat
            // every restored object as read-leased for one lease period.
            let lease = Some(now + self.config.read_lease);
            let obj = self.objects.entry(e.key).or_insert_with(|| Object {
                meta: e.meta,
                replicas: Vec::new(),
                state: State::Complete,
                touched: 0,
                leased_until: lease,
            });
            if obj.meta != e.meta || !matches!(obj.state, State::Complete) {
                seg.alloc.free(e.offset, e.meta.len);
                continue;
            }
            obj.replicas.push(replica);
            restored += 1;
        }
        self.segments.insert(id, seg);
        restored
    }

    /// Drops a segment whose node left: its replicas are gone; objects with no replica
    /// left are removed (they become misses). Returns how many objects were lost.
    pub fn remove_segment(&mut self, id: u64) -> usize {
        if self.segments.remove(&id).is_none() {
            return 0;
        }
        let mut lost = Vec::new();
        for (key, obj) in self.objects.iter_mut() {
            obj.replicas.retain(|r| r.segment != id);
            if obj.replicas.is_empty() {
                lost.push(*key);
            }
        }
        for key in &lost {
            self.objects.remove(key);
            self.pending.remove(key);
        }
        for (_, _, replicas, _) in &mut self.deferred {
            replicas.retain(|r| r.segment != id);
        }
        self.stats.lost += lost.len() as u64;
        lost.len()
    }

    /// The segments, in no particular order.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.segments.values().map(|s| s.info.clone()).collect()
    }

    /// Whether segment `id` is in the pool.
    pub fn has_segment(&self, id: u64) -> bool {
        self.segments.contains_key(&id)
    }

    /// Reserves room for `objects`, `replicas` copies each on distinct segments (fewer if
    /// the pool has fewer segments), evicting least-recently-used unleased objects first
    /// when the pool is above its high watermark or an object does not fit.
    pub fn put_start(
        &mut self,
        objects: &[(ObjectKey, ObjectMeta)],
        replicas: u8,
        now: Instant,
        updates: &mut Vec<NodeUpdate>,
    ) -> Vec<PutSlot> {
        let copies = (replicas.max(1) as usize)
            .min(MAX_REPLICAS)
            .min(self.segments.len()) as u64;
        let incoming: u64 = objects
            .iter()
            .filter(|(k, _)| !self.objects.contains_key(k))
            .map(|(_, m)| round_up(m.len).saturating_mul(copies))
            .fold(0, u64::saturating_add);
        self.evict_for(incoming, now, updates);
        objects
            .iter()
            .map(|&(key, meta)| self.put_one(key, meta, replicas, now, updates))
            .collect()
    }

    fn put_one(
        &mut self,
        key: ObjectKey,
        meta: ObjectMeta,
        replicas: u8,
        now: Instant,
        updates: &mut Vec<NodeUpdate>,
    ) -> PutSlot {
        if self.objects.contains_key(&key) {
            return PutSlot::Exists;
        }
        let want = (replicas.max(1) as usize)
            .min(MAX_REPLICAS)
            .min(self.segments.len());
        // An object larger than `want` segments could ever hold: refuse without evicting.
        let mut sizes: Vec<u64> = self.segments.values().map(|s| s.alloc.capacity()).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        if want == 0 || sizes.get(want - 1).is_none_or(|&c| c < round_up(meta.len)) {
            return PutSlot::NoSpace;
        }
        let mut placed = self.place(meta.len, want);
        if placed.is_none() {
            // Make room: evict enough for one more copy on `want` segments, then retry.
            self.evict_bytes(round_up(meta.len).saturating_mul(want as u64), now, updates);
            placed = self.place(meta.len, want);
        }
        let Some(replicas) = placed else {
            return PutSlot::NoSpace;
        };
        self.clock += 1;
        let put = self.next_put;
        self.next_put = self.next_put.wrapping_add(1);
        self.pending
            .insert(key, (now + self.config.put_timeout, put));
        self.objects.insert(
            key,
            Object {
                meta,
                replicas: replicas.clone(),
                state: State::Pending,
                touched: self.clock,
                leased_until: None,
            },
        );
        PutSlot::Write { put, replicas }
    }

    /// Allocates one range on each of `want` distinct segments, preferring the emptiest.
    fn place(&mut self, len: u64, want: usize) -> Option<Vec<Replica>> {
        let mut order: Vec<(u64, u64)> = self
            .segments
            .iter()
            .filter(|(_, s)| s.alloc.largest_free() >= round_up(len))
            .map(|(&id, s)| (id, s.alloc.free_bytes()))
            .collect();
        if order.len() < want {
            return None;
        }
        order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = Vec::with_capacity(want);
        for &(id, _) in order.iter().take(want) {
            let seg = self.segments.get_mut(&id).expect("listed segment");
            let offset = seg.alloc.alloc(len).expect("largest_free checked");
            out.push(Replica {
                segment: id,
                offset,
            });
        }
        Some(out)
    }

    /// Ends puts: with `ok` each pending object becomes readable; otherwise its room is
    /// freed. A put id that is not the pending one (a put reclaimed and started again) is
    /// refused. Returns, per put, whether the object is now stored.
    pub fn put_end(
        &mut self,
        puts: &[(ObjectKey, u64)],
        ok: bool,
        updates: &mut Vec<NodeUpdate>,
    ) -> Vec<bool> {
        puts.iter()
            .map(|(key, put)| {
                if self.pending.get(key).map(|p| p.1) != Some(*put) {
                    return false;
                }
                self.pending.remove(key);
                if !ok {
                    let obj = self.objects.remove(key).expect("pending object");
                    self.free_replicas(&obj.replicas, obj.meta.len);
                    return false;
                }
                let obj = self.objects.get_mut(key).expect("pending object");
                obj.state = State::Complete;
                for r in &obj.replicas {
                    updates.push(NodeUpdate::Commit(
                        r.segment,
                        IndexEntry {
                            key: *key,
                            offset: r.offset,
                            meta: obj.meta,
                        },
                    ));
                }
                true
            })
            .collect()
    }

    /// Where each key is (complete objects only), granting each a read lease.
    pub fn get(&mut self, keys: &[ObjectKey], now: Instant) -> Vec<Option<Located>> {
        let lease = self.config.read_lease;
        keys.iter()
            .map(|key| {
                let obj = self.objects.get_mut(key)?;
                if !matches!(obj.state, State::Complete) {
                    return None;
                }
                self.clock += 1;
                obj.touched = self.clock;
                obj.leased_until = Some(now + lease);
                Some(Located {
                    meta: obj.meta,
                    lease_ms: lease.as_millis().min(u32::MAX as u128) as u32,
                    replicas: obj.replicas.clone(),
                })
            })
            .collect()
    }

    /// Whether each key is stored (complete).
    pub fn exists(&self, keys: &[ObjectKey]) -> Vec<bool> {
        keys.iter()
            .map(|k| {
                self.objects
                    .get(k)
                    .is_some_and(|o| matches!(o.state, State::Complete))
            })
            .collect()
    }

    /// Removes objects; ranges under a read lease are freed when the lease ends.
    pub fn remove(
        &mut self,
        keys: &[ObjectKey],
        now: Instant,
        updates: &mut Vec<NodeUpdate>,
    ) -> Vec<bool> {
        keys.iter()
            .map(|key| match self.objects.get(key) {
                Some(o) if matches!(o.state, State::Complete) => {
                    let obj = self.objects.remove(key).expect("present");
                    self.retire(*key, obj, now, updates);
                    true
                }
                _ => false,
            })
            .collect()
    }

    fn retire(&mut self, key: ObjectKey, obj: Object, now: Instant, updates: &mut Vec<NodeUpdate>) {
        for r in &obj.replicas {
            updates.push(NodeUpdate::Drop(r.segment, key, r.offset));
        }
        match obj.leased_until {
            Some(until) if until > now => {
                self.deferred.push((until, key, obj.replicas, obj.meta.len));
            }
            _ => self.free_replicas(&obj.replicas, obj.meta.len),
        }
    }

    fn free_replicas(&mut self, replicas: &[Replica], len: u64) {
        for r in replicas {
            if let Some(seg) = self.segments.get_mut(&r.segment) {
                seg.alloc.free(r.offset, len);
            }
        }
    }

    /// Reclaims puts past their deadline and frees removed objects whose leases ended.
    /// Returns how many puts were reclaimed.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let expired: Vec<ObjectKey> = self
            .pending
            .iter()
            .filter(|(_, &(deadline, _))| deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in &expired {
            self.pending.remove(key);
            if let Some(obj) = self.objects.remove(key) {
                self.free_replicas(&obj.replicas, obj.meta.len);
            }
        }
        self.stats.reclaimed += expired.len() as u64;
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|(until, ..)| *until <= now);
        self.deferred = keep;
        for (_, _, replicas, len) in due {
            self.free_replicas(&replicas, len);
        }
        expired.len()
    }

    fn capacity(&self) -> u64 {
        self.segments.values().map(|s| s.alloc.capacity()).sum()
    }

    fn used(&self) -> u64 {
        self.segments.values().map(|s| s.alloc.used()).sum()
    }

    /// Evicts when `incoming` more bytes would take the pool above its high watermark.
    fn evict_for(&mut self, incoming: u64, now: Instant, updates: &mut Vec<NodeUpdate>) {
        let capacity = self.capacity() as f64;
        let used = self.used() as f64;
        if used + incoming as f64 > capacity * self.config.high_watermark {
            let target = capacity * self.config.low_watermark - incoming as f64;
            let excess = (used - target.max(0.0)).max(0.0) as u64;
            self.evict_bytes(excess, now, updates);
        }
    }

    /// Evicts least-recently-used complete objects that no reader holds a lease on until
    /// `bytes` (counting every replica) are freed or nothing evictable is left. Objects are
    /// ranked in one pass (a batch LRU), so eviction costs one sort per batch of puts, not
    /// one per object.
    fn evict_bytes(&mut self, bytes: u64, now: Instant, updates: &mut Vec<NodeUpdate>) {
        if bytes == 0 {
            return;
        }
        let mut candidates: Vec<(u64, ObjectKey, u64)> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                matches!(o.state, State::Complete) && o.leased_until.is_none_or(|t| t <= now)
            })
            .map(|(k, o)| (o.touched, *k, o.meta.len * o.replicas.len() as u64))
            .collect();
        candidates.sort_unstable();
        let mut freed = 0u64;
        for (_, key, size) in candidates {
            if freed >= bytes {
                break;
            }
            let obj = self.objects.remove(&key).expect("candidate");
            self.retire(key, obj, now, updates);
            freed += size;
            self.stats.evicted += 1;
        }
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        let pending = self.pending.len() as u64;
        StoreStats {
            segments: self.segments.len() as u64,
            capacity: self.capacity(),
            used: self.used(),
            objects: self.objects.len() as u64 - pending,
            pending,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(id: u64, size: u64) -> SegmentInfo {
        SegmentInfo {
            id,
            name: format!("n{id}"),
            control: String::new(),
            protocol: "tcp".into(),
            descriptor: vec![],
            region: 0,
            size,
        }
    }

    fn meta(len: u64) -> ObjectMeta {
        ObjectMeta { len, checksum: len }
    }

    fn put(p: &mut Placement, key: ObjectKey, len: u64, replicas: u8, now: Instant) -> PutSlot {
        let mut u = Vec::new();
        let slot = p.put_start(&[(key, meta(len))], replicas, now, &mut u)[0].clone();
        if let PutSlot::Write { put, .. } = slot {
            assert_eq!(p.put_end(&[(key, put + 1)], true, &mut u), vec![false]);
            assert_eq!(p.put_end(&[(key, put)], true, &mut u), vec![true]);
        }
        slot
    }

    #[test]
    fn replicas_land_on_distinct_segments() {
        let mut p = Placement::new(PlacementConfig::default());
        for id in 1..=3 {
            p.add_segment(seg(id, 1 << 20), &[], Instant::now());
        }
        let now = Instant::now();
        for key in 0..20 {
            let PutSlot::Write { replicas: reps, .. } = put(&mut p, key, 1000, 2, now) else {
                panic!("no room")
            };
            assert_eq!(reps.len(), 2);
            assert_ne!(reps[0].segment, reps[1].segment);
        }
        // More replicas than segments: one per segment.
        let PutSlot::Write { replicas: reps, .. } = put(&mut p, 99, 10, 5, now) else {
            panic!()
        };
        let mut segs: Vec<_> = reps.iter().map(|r| r.segment).collect();
        segs.sort();
        assert_eq!(segs, vec![1, 2, 3]);
        assert_eq!(put(&mut p, 99, 10, 1, now), PutSlot::Exists);
    }

    #[test]
    fn pending_objects_are_invisible_and_reclaimed_after_the_timeout() {
        let mut p = Placement::new(PlacementConfig {
            put_timeout: Duration::from_secs(2),
            ..PlacementConfig::default()
        });
        p.add_segment(seg(1, 10_000), &[], Instant::now());
        let now = Instant::now();
        let mut u = Vec::new();
        let PutSlot::Write { put, .. } = p.put_start(&[(7, meta(4000))], 1, now, &mut u)[0].clone()
        else {
            panic!("no room")
        };
        assert_eq!(p.exists(&[7]), vec![false]);
        assert_eq!(p.get(&[7], now), vec![None]);
        assert_eq!(p.stats().pending, 1);
        assert_eq!(p.sweep(now + Duration::from_secs(1)), 0);
        assert_eq!(p.sweep(now + Duration::from_secs(3)), 1);
        assert_eq!(p.stats().used, 0, "room of the unfinished put is back");
        assert_eq!(
            p.put_end(&[(7, put)], true, &mut u),
            vec![false],
            "too late"
        );
        assert!(u.is_empty(), "nothing was committed on the node");
    }

    #[test]
    fn eviction_is_lru_and_never_takes_a_leased_object() {
        let mut p = Placement::new(PlacementConfig::default());
        p.add_segment(seg(1, 64 * 100), &[], Instant::now());
        let t0 = Instant::now();
        for key in 0..9 {
            assert!(matches!(
                put(&mut p, key, 640, 1, t0),
                PutSlot::Write { .. }
            ));
        }
        // Key 0 is the oldest, but a reader holds it; key 1 is read (recent) after it.
        assert!(p.get(&[0], t0)[0].is_some());
        let later = t0 + Duration::from_secs(1);
        assert!(p.get(&[1], later)[0].is_some());
        // Room for one more 640-byte object needs evictions (6400 capacity, 95% mark).
        assert!(matches!(
            put(&mut p, 100, 640, 1, later),
            PutSlot::Write { .. }
        ));
        let stats = p.stats();
        assert!(stats.evicted >= 1);
        assert_eq!(p.exists(&[0]), vec![true], "leased object kept");
        assert_eq!(p.exists(&[2]), vec![false], "least recently used evicted");
        assert_eq!(p.exists(&[100]), vec![true]);
        // Once the lease ends, key 0 is the LRU victim.
        let much_later = t0 + Duration::from_secs(60);
        for key in 200..210 {
            put(&mut p, key, 640, 1, much_later);
        }
        assert_eq!(p.exists(&[0]), vec![false]);
    }

    #[test]
    fn removed_leased_ranges_are_reused_only_after_the_lease() {
        let mut p = Placement::new(PlacementConfig::default());
        p.add_segment(seg(1, 1024), &[], Instant::now());
        let t0 = Instant::now();
        put(&mut p, 1, 1024, 1, t0);
        assert!(p.get(&[1], t0)[0].is_some());
        let mut u = Vec::new();
        assert_eq!(p.remove(&[1], t0, &mut u), vec![true]);
        assert_eq!(u, vec![NodeUpdate::Drop(1, 1, 0)]);
        assert_eq!(put(&mut p, 2, 1024, 1, t0), PutSlot::NoSpace);
        p.sweep(t0 + Duration::from_secs(10));
        assert!(matches!(put(&mut p, 2, 1024, 1, t0), PutSlot::Write { .. }));
    }

    #[test]
    fn lost_segment_loses_only_its_sole_copies_and_rebuild_restores() {
        let mut p = Placement::new(PlacementConfig::default());
        p.add_segment(seg(1, 1 << 20), &[], Instant::now());
        p.add_segment(seg(2, 1 << 20), &[], Instant::now());
        let now = Instant::now();
        put(&mut p, 1, 100, 2, now);
        put(&mut p, 2, 100, 1, now);
        let PutSlot::Write { replicas: r3, .. } = put(&mut p, 3, 100, 1, now) else {
            panic!()
        };
        let doomed = r3[0].segment;
        let lost = p.remove_segment(doomed);
        assert!(lost >= 1);
        assert_eq!(p.exists(&[1]), vec![true], "second replica survives");
        assert_eq!(p.exists(&[3]), vec![false]);
        assert_eq!(p.get(&[1], now)[0].as_ref().unwrap().replicas.len(), 1);
        // A new master rebuilds from node indexes; bad entries are skipped.
        let mut q = Placement::new(PlacementConfig::default());
        let index = [
            IndexEntry {
                key: 5,
                offset: 0,
                meta: meta(100),
            },
            IndexEntry {
                key: 6,
                offset: 64,
                meta: meta(100),
            },
            IndexEntry {
                key: 7,
                offset: 1 << 30,
                meta: meta(100),
            },
        ];
        assert_eq!(q.add_segment(seg(9, 1 << 20), &index, Instant::now()), 1);
        assert_eq!(q.exists(&[5, 6, 7]), vec![true, false, false]);
        assert_eq!(q.stats().used, 128);
    }

    #[test]
    fn a_segment_added_again_keeps_its_ranges() {
        let mut p = Placement::new(PlacementConfig::default());
        let now = Instant::now();
        p.add_segment(seg(1, 64 * 4), &[], now);
        let meta = ObjectMeta {
            len: 64 * 3,
            checksum: 1,
        };
        let mut updates = Vec::new();
        let PutSlot::Write { put, .. } = p.put_start(&[(1, meta)], 1, now, &mut updates)[0].clone()
        else {
            panic!("no room")
        };
        assert_eq!(p.put_end(&[(1, put)], true, &mut updates), vec![true]);
        // The node's membership is seen again (a re-registration): nothing changes, and
        // the object's range is not handed out a second time.
        assert_eq!(p.add_segment(seg(1, 64 * 4), &[], now), 0);
        assert_eq!(p.stats().used, 64 * 3);
        let second = ObjectMeta {
            len: 64 * 3,
            checksum: 2,
        };
        match p.put_start(&[(2, second)], 1, now, &mut updates)[0].clone() {
            // Only by evicting object 1 first (its Drop is in the updates).
            PutSlot::Write { .. } => {
                assert!(updates.contains(&NodeUpdate::Drop(1, 1, 0)));
                assert!(p.get(&[1], now)[0].is_none());
            }
            PutSlot::NoSpace => assert!(p.get(&[1], now)[0].is_some()),
            PutSlot::Exists => panic!("object 2 was never stored"),
        }
    }
}

#[cfg(test)]
mod reuse_tests {
    use super::*;

    #[test]
    fn room_of_removed_objects_returns_after_their_leases() {
        let mut p = Placement::new(PlacementConfig::default());
        p.add_segment(
            SegmentInfo {
                id: 1,
                name: "n".into(),
                control: String::new(),
                protocol: "tcp".into(),
                descriptor: vec![],
                region: 0,
                size: 40 * 1024,
            },
            &[],
            Instant::now(),
        );
        let t0 = Instant::now();
        let objs: Vec<_> = (0..30u128)
            .map(|k| {
                (
                    k,
                    ObjectMeta {
                        len: 1024,
                        checksum: 0,
                    },
                )
            })
            .collect();
        let keys: Vec<_> = objs.iter().map(|o| o.0).collect();
        let mut u = Vec::new();
        for round in 0..3u32 {
            let now = t0 + Duration::from_secs(10 * round as u64);
            let slots = p.put_start(&objs, 1, now, &mut u);
            let puts: Vec<(u128, u64)> = keys
                .iter()
                .zip(&slots)
                .map(|(k, s)| match s {
                    PutSlot::Write { put, .. } => (*k, *put),
                    other => panic!("round {round}: {other:?}"),
                })
                .collect();
            p.put_end(&puts, true, &mut u);
            p.get(&keys, now);
            p.remove(&keys, now, &mut u);
            p.sweep(now + Duration::from_secs(6));
            assert_eq!(p.stats().used, 0, "round {round}");
        }
    }
}

//! The remote store's bookkeeping under any sequence of operations, checked against models.
//!
//! First byte even: the master's placement — segments joining (with an index of any
//! content) and leaving, puts started and ended (with right and wrong put ids), gets,
//! removes, sweeps and clock ticks. The model follows every range placement handed out or
//! restored, and when it may be reused (pending: never; stored: never; dropped: once its
//! read lease ends and a sweep ran). Checked after each step: no range handed out while
//! another may still be read or written, in bounds, on distinct segments; a get returns
//! exactly the stored copies; eviction never drops a leased object; `used` is the sum of
//! the model's ranges.
//!
//! First byte odd: the range allocator alone, against a bitmap of 64-byte units: first
//! fit, frees and reservations accepted exactly when the bitmap says so, `used` and
//! `largest_free` exact.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kvtier::remote::alloc::{round_up, RangeAllocator, ALIGN};
use kvtier::remote::rpc::{IndexEntry, ObjectKey, ObjectMeta, PutSlot, Replica, SegmentInfo};
use kvtier::remote::store::placement::{NodeUpdate, Placement, PlacementConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, ops)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        placement(ops);
    } else {
        allocator(mode, ops);
    }
});

// ---------------------------------------------------------------------------------------
// Placement.

const LEASE: Duration = Duration::from_millis(50);
const PUT_TIMEOUT: Duration = Duration::from_millis(200);

/// A range the model knows is allocated.
#[derive(Clone, Debug)]
struct Range {
    segment: u64,
    offset: u64,
    len: u64,
    key: ObjectKey,
    /// `None` while its object is pending or stored; when dropped, until when it may
    /// still be read (freed by the first sweep at or after that).
    dropped_until: Option<Instant>,
}

#[derive(Default)]
struct Model {
    /// Segment id → capacity.
    segments: BTreeMap<u64, u64>,
    ranges: Vec<Range>,
    /// Key → (put id, deadline, meta).
    pending: HashMap<ObjectKey, (u64, Instant, ObjectMeta)>,
    /// Key → (meta, read lease end).
    stored: HashMap<ObjectKey, (ObjectMeta, Option<Instant>)>,
}

impl Model {
    fn live(&self, key: ObjectKey) -> impl Iterator<Item = &Range> {
        self.ranges
            .iter()
            .filter(move |r| r.key == key && r.dropped_until.is_none())
    }

    /// Applies the node updates of one step.
    fn apply(&mut self, updates: &[NodeUpdate], now: Instant, evicting: bool) {
        let mut dropped = HashMap::new();
        for u in updates {
            match *u {
                NodeUpdate::Commit(segment, e) => {
                    assert!(
                        self.ranges.iter().any(|r| r.segment == segment
                            && r.offset == e.offset
                            && r.key == e.key
                            && r.dropped_until.is_none()),
                        "commit of a range never handed out: {u:?}"
                    );
                }
                NodeUpdate::Drop(segment, key, offset) => {
                    // Every copy of the object is dropped in the same step.
                    let lease = match self.stored.remove(&key) {
                        Some((_, lease)) => {
                            dropped.insert(key, lease);
                            Some(lease)
                        }
                        None => dropped.get(&key).copied(),
                    };
                    if evicting {
                        let leased = lease.flatten().is_some_and(|t| t > now);
                        assert!(!leased, "evicted {key} under a read lease");
                    }
                    let at = self
                        .ranges
                        .iter()
                        .position(|r| {
                            r.segment == segment
                                && r.offset == offset
                                && r.key == key
                                && r.dropped_until.is_none()
                        })
                        .unwrap_or_else(|| panic!("drop of an unknown range: {u:?}"));
                    // Freed at once unless a reader holds a lease on it.
                    match lease.flatten().filter(|t| *t > now) {
                        Some(until) => self.ranges[at].dropped_until = Some(until),
                        None => {
                            self.ranges.remove(at);
                        }
                    }
                }
            }
        }
    }

    fn used(&self) -> u64 {
        self.ranges.iter().map(|r| round_up(r.len)).sum()
    }
}

fn meta(len: u64, key: ObjectKey) -> ObjectMeta {
    ObjectMeta {
        len,
        checksum: key as u64 ^ len,
    }
}

fn info(id: u64, size: u64) -> SegmentInfo {
    SegmentInfo {
        id,
        name: format!("node{id}"),
        control: String::new(),
        protocol: "tcp".into(),
        descriptor: Vec::new(),
        region: 0,
        size,
    }
}

fn placement(ops: &[u8]) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut p = Placement::new(PlacementConfig {
        high_watermark: 0.9,
        low_watermark: 0.6,
        put_timeout: PUT_TIMEOUT,
        read_lease: LEASE,
    });
    let mut m = Model::default();
    let key = |b: u8| (b % 8) as ObjectKey;
    for op in ops.chunks(4) {
        let &[kind, a, b, c] = op else { break };
        let mut updates = Vec::new();
        match kind % 8 {
            // A segment joins, with an index of up to three entries.
            0 => {
                let id = (a % 3) as u64 + 1;
                let size = (b as u64 % 16 + 1) * 100;
                let index: Vec<IndexEntry> = (0..c % 4)
                    .map(|i| {
                        let k = key(c.wrapping_add(i));
                        let len = (b.wrapping_mul(i + 1) as u64 % 200) + 1;
                        IndexEntry {
                            key: k,
                            offset: (a.wrapping_add(i * 37) as u64 % 8) * ALIGN,
                            meta: meta(len, k),
                        }
                    })
                    .collect();
                let known = m.segments.contains_key(&id);
                let restored = p.add_segment(info(id, size), &index, now);
                if known {
                    assert_eq!(restored, 0, "segment {id} added twice");
                    continue;
                }
                let capacity = size / ALIGN * ALIGN;
                m.segments.insert(id, capacity);
                // The model's own acceptance: in bounds, aligned, free in this segment,
                // and the object unknown or stored with the same meta.
                let mut n = 0;
                for e in &index {
                    let end = e.offset + round_up(e.meta.len);
                    let overlaps = m.ranges.iter().any(|r| {
                        r.segment == id && r.offset < end && e.offset < r.offset + round_up(r.len)
                    });
                    let fits = e.offset % ALIGN == 0 && end <= capacity && !overlaps;
                    let compatible = !m.pending.contains_key(&e.key)
                        && m.stored.get(&e.key).is_none_or(|(mt, _)| *mt == e.meta);
                    if fits && compatible {
                        m.ranges.push(Range {
                            segment: id,
                            offset: e.offset,
                            len: e.meta.len,
                            key: e.key,
                            dropped_until: None,
                        });
                        let lease = Some(now + LEASE);
                        m.stored.entry(e.key).or_insert((e.meta, lease));
                        n += 1;
                    }
                }
                assert_eq!(restored, n, "restored copies");
            }
            // A segment leaves.
            1 => {
                let id = (a % 3) as u64 + 1;
                let lost = p.remove_segment(id);
                if m.segments.remove(&id).is_none() {
                    assert_eq!(lost, 0);
                    continue;
                }
                m.ranges.retain(|r| r.segment != id);
                let gone: Vec<ObjectKey> = m
                    .pending
                    .keys()
                    .chain(m.stored.keys())
                    .copied()
                    .filter(|&k| m.live(k).next().is_none())
                    .collect();
                for k in &gone {
                    m.pending.remove(k);
                    m.stored.remove(k);
                }
                assert_eq!(lost, gone.len(), "objects lost with segment {id}");
            }
            // Put one or two objects, one to three copies.
            2 => {
                let objects: Vec<(ObjectKey, ObjectMeta)> = (0..(c % 2) + 1)
                    .map(|i| {
                        let k = key(a.wrapping_add(i));
                        (k, meta((b as u64 * (i as u64 + 1)) % 500 + 1, k))
                    })
                    .collect();
                let copies = (c >> 1) % 3 + 1;
                let known_before: Vec<bool> = objects
                    .iter()
                    .map(|(k, _)| m.pending.contains_key(k) || m.stored.contains_key(k))
                    .collect();
                let slots = p.put_start(&objects, copies, now, &mut updates);
                m.apply(&updates, now, true);
                for (((k, mt), slot), before) in objects.iter().zip(&slots).zip(known_before) {
                    let known = m.pending.contains_key(k) || m.stored.contains_key(k);
                    match slot {
                        // (An object stored before may be evicted to make room for a later
                        // one of the same batch: a miss later, as after any eviction.)
                        PutSlot::Exists => assert!(before || known, "{k} exists only in placement"),
                        PutSlot::NoSpace => {}
                        PutSlot::Write { put, replicas } => {
                            assert!(!known, "{k} written twice");
                            let want = (copies as usize).min(m.segments.len());
                            assert_eq!(replicas.len(), want, "copies of {k}");
                            check_fresh(&m, replicas, mt.len);
                            for r in replicas {
                                m.ranges.push(Range {
                                    segment: r.segment,
                                    offset: r.offset,
                                    len: mt.len,
                                    key: *k,
                                    dropped_until: None,
                                });
                            }
                            m.pending.insert(*k, (*put, now + PUT_TIMEOUT, *mt));
                        }
                    }
                }
            }
            // End a put: with its id or a wrong one, succeeded or failed.
            3 => {
                let k = key(a);
                let Some(&(put, _, mt)) = m.pending.get(&k) else {
                    assert_eq!(p.put_end(&[(k, b as u64)], true, &mut updates), vec![false]);
                    continue;
                };
                let id = if b & 1 == 0 { put } else { put.wrapping_add(1) };
                let ok = c & 1 == 0;
                let done = p.put_end(&[(k, id)], ok, &mut updates);
                m.apply(&updates, now, false);
                assert_eq!(done, vec![id == put && ok]);
                if id == put {
                    m.pending.remove(&k);
                    if ok {
                        m.stored.insert(k, (mt, None));
                        let commits = updates
                            .iter()
                            .filter(|u| matches!(u, NodeUpdate::Commit(_, e) if e.key == k))
                            .count();
                        assert_eq!(commits, m.live(k).count(), "one commit per copy");
                    } else {
                        m.ranges.retain(|r| r.key != k || r.dropped_until.is_some());
                    }
                }
            }
            // Get.
            4 => {
                let k = key(a);
                let got = p.get(&[k], now).pop().expect("one answer");
                match (got, m.stored.get_mut(&k)) {
                    (None, None) => {}
                    (Some(loc), Some((mt, lease))) => {
                        assert_eq!(loc.meta, *mt);
                        *lease = Some(now + LEASE);
                        let mut want: Vec<Replica> = m
                            .live(k)
                            .map(|r| Replica {
                                segment: r.segment,
                                offset: r.offset,
                            })
                            .collect();
                        let mut have = loc.replicas.clone();
                        want.sort_by_key(|r| (r.segment, r.offset));
                        have.sort_by_key(|r| (r.segment, r.offset));
                        assert_eq!(have, want, "copies of {k}");
                    }
                    (got, want) => panic!("get {k}: {got:?}, model {want:?}"),
                }
            }
            // Remove.
            5 => {
                let k = key(a);
                let removed = p.remove(&[k], now, &mut updates);
                assert_eq!(removed, vec![m.stored.contains_key(&k)]);
                m.apply(&updates, now, false);
            }
            // Sweep.
            6 => {
                let reclaimed = p.sweep(now);
                let expired: Vec<ObjectKey> = m
                    .pending
                    .iter()
                    .filter(|(_, (_, deadline, _))| *deadline <= now)
                    .map(|(k, _)| *k)
                    .collect();
                for k in &expired {
                    m.pending.remove(k);
                    m.ranges
                        .retain(|r| r.key != *k || r.dropped_until.is_some());
                }
                m.ranges.retain(|r| r.dropped_until.is_none_or(|t| t > now));
                assert_eq!(reclaimed, expired.len(), "puts reclaimed");
            }
            // Time passes.
            _ => now += Duration::from_millis(a as u64),
        }
        let stats = p.stats();
        assert_eq!(stats.used, m.used(), "used bytes");
        assert_eq!(stats.pending as usize, m.pending.len(), "pending puts");
        assert_eq!(stats.objects as usize, m.stored.len(), "stored objects");
        assert!(stats.used <= stats.capacity);
    }
}

/// Copies of a new put: on distinct known segments, in bounds, overlapping nothing the
/// model still holds.
fn check_fresh(m: &Model, replicas: &[Replica], len: u64) {
    for (i, r) in replicas.iter().enumerate() {
        assert!(
            replicas[..i].iter().all(|o| o.segment != r.segment),
            "two copies on segment {}",
            r.segment
        );
        let capacity = *m.segments.get(&r.segment).expect("a known segment");
        let end = r.offset + round_up(len);
        assert!(
            r.offset % ALIGN == 0 && end <= capacity,
            "{r:?} out of bounds"
        );
        if let Some(o) = m.ranges.iter().find(|o| {
            o.segment == r.segment && o.offset < end && r.offset < o.offset + round_up(o.len)
        }) {
            panic!("{r:?} ({len} bytes) overlaps {o:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Range allocator.

fn allocator(mode: u8, ops: &[u8]) {
    let units = (mode >> 1) as usize % 48 + 1;
    let mut a = RangeAllocator::new(units as u64 * ALIGN + (mode as u64 % ALIGN));
    assert_eq!(a.capacity(), units as u64 * ALIGN);
    let mut used = vec![false; units];
    let free_run_from = |used: &[bool], at: usize| used[at..].iter().take_while(|u| !**u).count();
    for op in ops.chunks(3) {
        let &[kind, x, y] = op else { break };
        let len = (y as u64) * 8 + (x as u64 & 7);
        let need = (round_up(len) / ALIGN) as usize;
        match kind % 3 {
            0 => {
                // First fit: the first maximal free run long enough, at its start.
                let mut want = None;
                let mut i = 0;
                while i < units {
                    let run = free_run_from(&used, i);
                    if run == 0 {
                        i += 1;
                    } else if run >= need {
                        want = Some(i);
                        break;
                    } else {
                        i += run;
                    }
                }
                let got = a.alloc(len);
                assert_eq!(got, want.map(|u| u as u64 * ALIGN), "alloc {len}");
                if let Some(u) = want {
                    used[u..u + need].iter_mut().for_each(|b| *b = true);
                }
            }
            1 | 2 => {
                let start = if x & 0x80 == 0 {
                    (x as u64 % 64) * ALIGN
                } else {
                    x as u64 * 7 // unaligned, or out of bounds
                };
                let unit = (start / ALIGN) as usize;
                let aligned = start % ALIGN == 0 && unit + need <= units;
                let freeing = kind % 3 == 1;
                let accepted = aligned && used[unit..unit + need].iter().all(|&u| u == freeing);
                let got = if freeing {
                    a.free(start, len)
                } else {
                    a.reserve(start, len)
                };
                assert_eq!(
                    got,
                    accepted,
                    "{} {start}+{len}",
                    if freeing { "free" } else { "reserve" }
                );
                if accepted {
                    used[unit..unit + need]
                        .iter_mut()
                        .for_each(|b| *b = !freeing);
                }
            }
            _ => unreachable!(),
        }
        let in_use = used.iter().filter(|u| **u).count() as u64 * ALIGN;
        assert_eq!(a.used(), in_use);
        assert_eq!(a.free_bytes(), a.capacity() - in_use);
        let mut largest = 0;
        let mut i = 0;
        while i < units {
            let run = free_run_from(&used, i);
            largest = largest.max(run);
            i += run.max(1);
        }
        assert_eq!(a.largest_free(), largest as u64 * ALIGN);
    }
}

//! Any sequence of P/D allocations, commits, aborts, retrieves, sender disconnects,
//! garbage collection and clock ticks against the receiver's page table, checked step by
//! step against a model: a page is in exactly one place (free, quarantined, held, or
//! taken by a reader); only the connection and request that allocated a page commit it;
//! a freed uncommitted page is not handed out before its quarantine ends; a reader takes
//! only committed chunks of the right size.
#![no_main]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kvtier::pd::pages::{CommitRefused, Committed, Grant, PageTable, Placed};
use kvtier::ChunkKey;
use libfuzzer_sys::fuzz_target;

const QUARANTINE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq)]
enum Where {
    Free,
    Quarantined(Instant),
    Held {
        key: ChunkKey,
        tokens: u32,
        req: String,
        conn: u64,
        committed: bool,
    },
    Taken,
}

struct Model {
    pages: Vec<Where>,
}

impl Model {
    fn held(&self, key: ChunkKey) -> Option<(usize, &Where)> {
        self.pages
            .iter()
            .enumerate()
            .find(|(_, w)| matches!(w, Where::Held { key: k, .. } if *k == key))
    }
    fn count(&self, f: impl Fn(&Where) -> bool) -> usize {
        self.pages.iter().filter(|w| f(w)).count()
    }
    fn check(&self, t: &PageTable) {
        assert_eq!(t.free(), self.count(|w| *w == Where::Free), "free pages");
        assert_eq!(
            t.quarantined(),
            self.count(|w| matches!(w, Where::Quarantined(_))),
            "quarantined pages"
        );
        assert_eq!(
            t.held(),
            self.count(|w| matches!(w, Where::Held { .. })),
            "held pages"
        );
        for (i, w) in self.pages.iter().enumerate() {
            if let Where::Held {
                key,
                tokens,
                req,
                conn,
                committed,
            } = w
            {
                let p = t.page(key).expect("a held key is in the table");
                assert_eq!(
                    (p.index as usize, p.tokens, &p.req_id, p.conn, p.committed),
                    (i, *tokens, req, *conn, *committed)
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&total, ops)) = data.split_first() else {
        return;
    };
    let total = (total % 8) as u32 + 1;
    let t0 = Instant::now();
    let mut now = t0;
    let mut table = PageTable::new(total);
    let mut model = Model {
        pages: vec![Where::Free; total as usize],
    };
    let key = |b: u8| ChunkKey((b % 6) as u128);
    let req = |b: u8| format!("r{}", b % 3);
    let conn = |b: u8| (b % 2) as u64;
    for op in ops.chunks(4) {
        let &[kind, a, b, c] = op else { break };
        match kind % 8 {
            // Alloc one to three chunks.
            0 => {
                let n = (c % 3) as usize + 1;
                let chunks: Vec<(ChunkKey, u32)> = (0..n)
                    .map(|i| (key(a.wrapping_add(i as u8 * 3)), (b % 4) as u32 + 1))
                    .collect();
                let mut fresh = BTreeSet::new();
                let needed = chunks
                    .iter()
                    .filter(|(k, _)| model.held(*k).is_none() && fresh.insert(k.0))
                    .count();
                let free = model.count(|w| *w == Where::Free);
                match table.alloc(conn(c), &req(b), &chunks, now) {
                    Grant::NeverFits { needed: n } => {
                        assert_eq!(n, needed);
                        assert!(needed > total as usize);
                    }
                    Grant::Wait { needed: n } => {
                        assert_eq!(n, needed);
                        assert!(needed > free && needed <= total as usize);
                    }
                    Grant::Placed(placed) => {
                        assert!(needed <= free);
                        assert_eq!(placed.len(), chunks.len());
                        for (p, &(k, tokens)) in placed.iter().zip(&chunks) {
                            match *p {
                                Placed::Held => assert!(model.held(k).is_some()),
                                Placed::Page(i) => {
                                    assert!(model.held(k).is_none(), "a held key got a page");
                                    let w = &mut model.pages[i as usize];
                                    assert_eq!(*w, Where::Free, "page {i} handed out twice");
                                    *w = Where::Held {
                                        key: k,
                                        tokens,
                                        req: req(b),
                                        conn: conn(c),
                                        committed: false,
                                    };
                                }
                            }
                        }
                    }
                }
            }
            // Commit one chunk, intact or not.
            1 => {
                let (k, r, cn, intact) = (key(a), req(b), conn(c), c & 4 == 0);
                let located = table.locate(cn, &r, k);
                let expect = model.held(k).map(|(i, w)| (i, w.clone()));
                match (&located, expect) {
                    (Err(CommitRefused::NotAllocated { .. }), None) => {}
                    (
                        Ok((index, _)),
                        Some((
                            i,
                            Where::Held {
                                req: mr, conn: mc, ..
                            },
                        )),
                    ) => {
                        assert_eq!((*index as usize, &mr, mc), (i, &r, cn));
                    }
                    (
                        Err(CommitRefused::NotYours { .. }),
                        Some((
                            _,
                            Where::Held {
                                req: mr, conn: mc, ..
                            },
                        )),
                    ) => {
                        assert!(mr != r || mc != cn);
                    }
                    (got, want) => panic!("locate {k}: {got:?}, model {want:?}"),
                }
                if let Ok((index, _)) = located {
                    let done = table.finish_commit(&r, k, index, intact, now);
                    let w = &mut model.pages[index as usize];
                    let Where::Held { committed, .. } = w else {
                        unreachable!()
                    };
                    match done {
                        Committed::Gone => assert!(*committed),
                        Committed::Visible => {
                            assert!(intact && !*committed);
                            *committed = true;
                        }
                        Committed::Corrupt(i) => {
                            assert!(!intact && !*committed && i == index);
                            table.quarantine([i], now + QUARANTINE);
                            *w = Where::Quarantined(now + QUARANTINE);
                        }
                    }
                }
            }
            // Abort a request on a connection, or a connection closes: its uncommitted pages.
            2 | 3 => {
                let (r, cn, by_req) = (req(b), conn(c), kind % 8 == 2);
                let (done, undone) =
                    table.reclaim(|p| p.conn == cn && !p.committed && (!by_req || p.req_id == r));
                assert!(done.is_empty());
                let mut want = Vec::new();
                for (i, w) in model.pages.iter_mut().enumerate() {
                    if let Where::Held {
                        req: mr,
                        conn: mc,
                        committed: false,
                        ..
                    } = w
                    {
                        if *mc == cn && (!by_req || *mr == r) {
                            want.push(i as u32);
                            *w = Where::Quarantined(now + QUARANTINE);
                        }
                    }
                }
                let mut got = undone.clone();
                got.sort();
                assert_eq!(got, want);
                table.quarantine(undone, now + QUARANTINE);
            }
            // Garbage collection: everything older than `a` ms.
            4 => {
                let age = Duration::from_millis(a as u64);
                let before = model.pages.clone();
                let (done, undone) = table.reclaim(|p| now.duration_since(p.since) > age);
                for &i in &done {
                    assert!(matches!(
                        before[i as usize],
                        Where::Held {
                            committed: true,
                            ..
                        }
                    ));
                    model.pages[i as usize] = Where::Free;
                }
                for &i in &undone {
                    assert!(matches!(
                        before[i as usize],
                        Where::Held {
                            committed: false,
                            ..
                        }
                    ));
                    model.pages[i as usize] = Where::Quarantined(now + QUARANTINE);
                }
                table.release(done);
                table.quarantine(undone, now + QUARANTINE);
            }
            // A reader takes a chunk of `b` tokens.
            5 => {
                let (k, tokens) = (key(a), (b % 4) as usize + 1);
                let want = model.held(k).and_then(|(i, w)| match w {
                    Where::Held {
                        tokens: t,
                        committed: true,
                        ..
                    } if *t as usize == tokens => Some(i as u32),
                    _ => None,
                });
                let got = table.take_committed(&k, tokens);
                assert_eq!(got, want);
                if let Some(i) = got {
                    model.pages[i as usize] = Where::Taken;
                }
            }
            // The reader gives back what it took.
            6 => {
                let taken: Vec<u32> = (0..total)
                    .filter(|&i| model.pages[i as usize] == Where::Taken)
                    .collect();
                for &i in &taken {
                    model.pages[i as usize] = Where::Free;
                }
                table.release(taken);
            }
            // Time passes; quarantined pages come back.
            _ => {
                now += Duration::from_millis(a as u64);
                let n = table.thaw(now);
                let mut want = 0;
                for w in model.pages.iter_mut() {
                    if matches!(w, Where::Quarantined(until) if *until <= now) {
                        *w = Where::Free;
                        want += 1;
                    }
                }
                assert_eq!(n, want);
            }
        }
        model.check(&table);
    }
});

//! The P/D buffer's page table: which page holds which chunk for which request and
//! sender connection, the free list and the quarantine.
//!
//! Pure state — no I/O, locks or clocks of its own (callers pass `now`) — so every rule
//! about who may write, commit and reuse a page lives here and is checked against a model
//! by the `pd_pages` fuzz target. [`super::PdReceiver`] wraps it in a mutex and adds the
//! waiting, checksums and metrics.
//!
//! Every page index is in exactly one place at a time: the free list, the quarantine,
//! the held map (allocated to a chunk, committed or not), or the hands of a reader that
//! took it with [`PageTable::take_committed`] and gives it back with
//! [`PageTable::release`].

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::keys::ChunkKey;

/// A page allocated to a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Page index in the buffer.
    pub index: u32,
    /// Tokens the sender said the chunk holds.
    pub tokens: u32,
    /// The request it was allocated for.
    pub req_id: String,
    /// The control connection that allocated it (its uncommitted pages die with it).
    pub conn: u64,
    /// Whether its bytes were verified and made visible.
    pub committed: bool,
    /// When it was allocated, or committed.
    pub since: Instant,
}

/// Where one requested chunk goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The table already holds this chunk: the sender skips it.
    Held,
    /// Write the chunk into this page.
    Page(u32),
}

/// The answer to [`PageTable::alloc`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// One place per chunk, in the order asked.
    Placed(Vec<Placed>),
    /// Not enough free pages now: `needed` more than are free.
    Wait {
        /// Pages the request needs.
        needed: usize,
    },
    /// More pages than the whole buffer has.
    NeverFits {
        /// Pages the request needs.
        needed: usize,
    },
}

/// Why a chunk cannot be committed by this sender.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitRefused {
    /// No page is allocated to the chunk (never allocated, or reclaimed).
    #[error("commit of chunk {key} for {req_id}: no page allocated (reclaimed?)")]
    NotAllocated {
        /// The chunk.
        key: ChunkKey,
        /// The committing request.
        req_id: String,
    },
    /// The chunk's page belongs to another request or another connection.
    #[error("commit of chunk {key} for {req_id}: its page belongs to {owner}")]
    NotYours {
        /// The chunk.
        key: ChunkKey,
        /// The committing request.
        req_id: String,
        /// The request that owns the page.
        owner: String,
    },
}

/// What [`PageTable::finish_commit`] did with one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Verified and visible.
    Visible,
    /// Its bytes did not match: removed; the page must go through the quarantine.
    Corrupt(u32),
    /// Reclaimed while it was being verified: nothing to do.
    Gone,
}

/// The page table of one P/D buffer.
#[derive(Debug)]
pub struct PageTable {
    total: usize,
    /// Allocation takes from the front. Pages consumed after a commit go back to the front
    /// (reused while still warm); pages out of quarantine to the back (reused last).
    free: VecDeque<u32>,
    /// Pages freed before their writes were known to be done, with when they may be
    /// reused, in that order.
    quarantine: VecDeque<(u32, Instant)>,
    held: HashMap<ChunkKey, Page>,
}

impl PageTable {
    /// A table of `total` free pages.
    pub fn new(total: u32) -> Self {
        PageTable {
            total: total as usize,
            free: (0..total).collect(),
            quarantine: VecDeque::new(),
            held: HashMap::new(),
        }
    }

    /// Pages in the buffer.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Pages allocated to chunks (committed or not).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Pages in quarantine.
    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    /// Pages free for allocation now.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// The page allocated to `key`, if any.
    pub fn page(&self, key: &ChunkKey) -> Option<&Page> {
        self.held.get(key)
    }

    /// When the oldest quarantined page comes free.
    pub fn next_thaw(&self) -> Option<Instant> {
        self.quarantine.front().map(|&(_, until)| until)
    }

    /// Moves pages whose quarantine has ended by `now` to the free list; returns how many.
    pub fn thaw(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(&(index, until)) = self.quarantine.front() {
            if until > now {
                break;
            }
            self.quarantine.pop_front();
            self.free.push_back(index);
            n += 1;
        }
        n
    }

    /// Allocates a page to each `(key, tokens)` not held already, for `req_id` on
    /// connection `conn` — all of them or none.
    pub fn alloc(
        &mut self,
        conn: u64,
        req_id: &str,
        chunks: &[(ChunkKey, u32)],
        now: Instant,
    ) -> Grant {
        // A key asked twice in one request gets one page (the second is `Held`).
        let mut fresh = std::collections::HashSet::new();
        let needed = chunks
            .iter()
            .filter(|(k, _)| !self.held.contains_key(k) && fresh.insert(*k))
            .count();
        if needed > self.total {
            return Grant::NeverFits { needed };
        }
        if needed > self.free.len() {
            return Grant::Wait { needed };
        }
        let placed = chunks
            .iter()
            .map(|&(key, tokens)| {
                if self.held.contains_key(&key) {
                    return Placed::Held;
                }
                let index = self.free.pop_front().expect("counted above");
                self.held.insert(
                    key,
                    Page {
                        index,
                        tokens,
                        req_id: req_id.into(),
                        conn,
                        committed: false,
                        since: now,
                    },
                );
                Placed::Page(index)
            })
            .collect();
        Grant::Placed(placed)
    }

    /// The page (index, tokens) `key` may be committed into by `req_id` on `conn`: only
    /// one that connection allocated for that request.
    pub fn locate(
        &self,
        conn: u64,
        req_id: &str,
        key: ChunkKey,
    ) -> Result<(u32, u32), CommitRefused> {
        match self.held.get(&key) {
            Some(p) if p.req_id == req_id && p.conn == conn => Ok((p.index, p.tokens)),
            Some(p) => Err(CommitRefused::NotYours {
                key,
                req_id: req_id.into(),
                owner: p.req_id.clone(),
            }),
            None => Err(CommitRefused::NotAllocated {
                key,
                req_id: req_id.into(),
            }),
        }
    }

    /// Ends the commit of `key` located at `index` for `req_id`: visible when `intact`,
    /// removed when not — unless the page was reclaimed (and maybe re-allocated) meanwhile.
    pub fn finish_commit(
        &mut self,
        req_id: &str,
        key: ChunkKey,
        index: u32,
        intact: bool,
        now: Instant,
    ) -> Committed {
        let same = self
            .held
            .get(&key)
            .is_some_and(|p| p.index == index && p.req_id == req_id && !p.committed);
        if !same {
            return Committed::Gone;
        }
        if intact {
            let p = self.held.get_mut(&key).expect("checked above");
            p.committed = true;
            p.since = now;
            Committed::Visible
        } else {
            self.held.remove(&key);
            Committed::Corrupt(index)
        }
    }

    /// Whether `key` is committed (with `tokens` tokens, when given).
    pub fn is_committed(&self, key: &ChunkKey, tokens: Option<usize>) -> bool {
        self.held
            .get(key)
            .is_some_and(|p| p.committed && tokens.is_none_or(|t| p.tokens as usize == t))
    }

    /// Takes the committed page of `key` holding exactly `tokens` tokens out of the table:
    /// from then on it is the caller's, to read and [`release`](Self::release).
    pub fn take_committed(&mut self, key: &ChunkKey, tokens: usize) -> Option<u32> {
        if !self.is_committed(key, Some(tokens)) {
            return None;
        }
        self.held.remove(key).map(|p| p.index)
    }

    /// Returns pages whose writes are done (committed, then consumed): reusable at once.
    pub fn release(&mut self, indices: impl IntoIterator<Item = u32>) {
        for index in indices {
            self.free.push_front(index);
        }
    }

    /// Puts pages that writes may still target into quarantine until `until`.
    pub fn quarantine(&mut self, indices: impl IntoIterator<Item = u32>, until: Instant) {
        self.quarantine
            .extend(indices.into_iter().map(|i| (i, until)));
    }

    /// Removes the pages `doomed` picks; returns them as (done, undone): committed pages
    /// (their writes done, reusable at once) and the others (which need the quarantine).
    /// The caller hands them to [`release`](Self::release) and
    /// [`quarantine`](Self::quarantine).
    pub fn reclaim(&mut self, mut doomed: impl FnMut(&Page) -> bool) -> (Vec<u32>, Vec<u32>) {
        let keys: Vec<ChunkKey> = self
            .held
            .iter()
            .filter(|(_, p)| doomed(p))
            .map(|(k, _)| *k)
            .collect();
        let (mut done, mut undone) = (Vec::new(), Vec::new());
        for p in keys.iter().filter_map(|k| self.held.remove(k)) {
            if p.committed {
                done.push(p.index);
            } else {
                undone.push(p.index);
            }
        }
        (done, undone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(n: u128) -> ChunkKey {
        ChunkKey(n)
    }

    #[test]
    fn a_page_is_committed_only_by_the_connection_and_request_that_allocated_it() {
        let now = Instant::now();
        let mut t = PageTable::new(2);
        assert_eq!(
            t.alloc(1, "a", &[(key(1), 16)], now),
            Grant::Placed(vec![Placed::Page(0)])
        );
        assert!(matches!(
            t.locate(2, "a", key(1)),
            Err(CommitRefused::NotYours { .. })
        ));
        assert!(matches!(
            t.locate(1, "b", key(1)),
            Err(CommitRefused::NotYours { .. })
        ));
        assert!(matches!(
            t.locate(1, "a", key(2)),
            Err(CommitRefused::NotAllocated { .. })
        ));
        assert_eq!(t.locate(1, "a", key(1)), Ok((0, 16)));
        assert_eq!(
            t.finish_commit("a", key(1), 0, true, now),
            Committed::Visible
        );
        // Committed once: a second commit of the same page changes nothing.
        assert_eq!(t.finish_commit("a", key(1), 0, true, now), Committed::Gone);
        assert!(t.is_committed(&key(1), Some(16)));
        assert_eq!(t.take_committed(&key(1), 15), None);
        assert_eq!(t.take_committed(&key(1), 16), Some(0));
    }

    #[test]
    fn aborted_pages_come_back_only_after_their_quarantine() {
        let now = Instant::now();
        let mut t = PageTable::new(1);
        t.alloc(1, "a", &[(key(1), 16)], now);
        let (done, undone) = t.reclaim(|p| p.req_id == "a");
        assert_eq!((done, undone.clone()), (vec![], vec![0]));
        let until = now + Duration::from_secs(1);
        t.quarantine(undone, until);
        assert_eq!(
            t.alloc(1, "b", &[(key(2), 16)], now),
            Grant::Wait { needed: 1 }
        );
        assert_eq!(t.thaw(now), 0);
        assert_eq!(t.thaw(until), 1);
        assert_eq!(
            t.alloc(1, "b", &[(key(2), 16)], until),
            Grant::Placed(vec![Placed::Page(0)])
        );
    }

    #[test]
    fn a_key_asked_twice_in_one_request_gets_one_page() {
        let mut t = PageTable::new(1);
        assert_eq!(
            t.alloc(1, "a", &[(key(1), 16), (key(1), 16)], Instant::now()),
            Grant::Placed(vec![Placed::Page(0), Placed::Held])
        );
    }
}

//! Who may touch a registered region from the network, and how.
//!
//! Every registration names its [`RemoteAccess`]: open to every connected peer (a
//! remote-store segment), local only (a staging buffer: the source or destination of our
//! own transfers), or [`RemoteAccess::GrantedWrites`] — peers may write only the units of
//! the region a [`WriteGrants`] table grants to their connection, and read none of it (a
//! P/D receiver's buffer, whose pages belong to one request each).
//!
//! A connection is named at the target by a [`WriterId`]: a random number the initiator
//! draws per connection and sends over that connection only, so no other peer can learn
//! it (see [`crate::Connection::writer_id`]). A receiver grants a unit to the writer id the
//! allocating peer reported for its data connection, and revokes it before it verifies the
//! unit's bytes and waits until no write admitted before is still landing
//! ([`WriteGrants::wait_landed`]), so nothing changes the bytes after they were checked.
//!
//! Whether the target can enforce this depends on the transport: a target that receives
//! every write through its own code (TCP) checks each one; one-sided RDMA-style writes
//! (UCX, NIXL) never pass through the target's CPU. [`crate::Transport::enforces_write_grants`]
//! says which; where it is false, the region is still withheld from remote reads where the
//! fabric's memory keys can express it, and the receiver's checksums are what keep wrong
//! bytes from becoming visible.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How peers may access a registered region.
#[derive(Clone, Debug, Default)]
pub enum RemoteAccess {
    /// Any connected peer may read and write the whole region.
    #[default]
    ReadWrite,
    /// Peers may write only the units `WriteGrants` grants to their connection, and never
    /// read.
    GrantedWrites(Arc<WriteGrants>),
    /// No peer may touch the region: it is a local source or destination of transfers.
    LocalOnly,
}

impl RemoteAccess {
    /// Whether peers may read the region.
    pub fn allows_remote_read(&self) -> bool {
        matches!(self, RemoteAccess::ReadWrite)
    }

    /// Checks a peer's read of the region.
    pub fn check_read(&self) -> Result<(), AccessRefused> {
        match self {
            RemoteAccess::ReadWrite => Ok(()),
            RemoteAccess::GrantedWrites(_) => Err(AccessRefused::NoRemoteRead),
            RemoteAccess::LocalOnly => Err(AccessRefused::LocalOnly),
        }
    }

    /// Checks a peer's write of `offset..offset+len` on connection `writer`; the guard
    /// (for granted writes) must live until the bytes have landed.
    pub fn check_write(
        &self,
        writer: Option<WriterId>,
        offset: u64,
        len: u64,
    ) -> Result<Option<WriteGuard>, AccessRefused> {
        match self {
            RemoteAccess::ReadWrite => Ok(None),
            RemoteAccess::GrantedWrites(g) => g.admit(writer, offset, len).map(Some),
            RemoteAccess::LocalOnly => Err(AccessRefused::LocalOnly),
        }
    }

    /// Whether peers may write to the region at all (some of it, for granted writes).
    pub fn allows_remote_write(&self) -> bool {
        !matches!(self, RemoteAccess::LocalOnly)
    }
}

/// The name of one data connection at its target (never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WriterId(pub u64);

impl WriterId {
    /// A fresh random id.
    pub fn random() -> WriterId {
        let n = crate::auth::nonce();
        let mut b = [0u8; 8];
        b.copy_from_slice(&n[..8]);
        WriterId(u64::from_le_bytes(b).max(1))
    }
}

/// Why a peer's access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessRefused {
    /// The region admits no remote reads.
    #[error("the region admits no remote reads")]
    NoRemoteRead,
    /// The region admits no remote access.
    #[error("the region is local only")]
    LocalOnly,
    /// The range is not (wholly) granted to this connection.
    #[error("not granted to this connection")]
    NotGranted,
}

#[derive(Clone, Copy, Debug, Default)]
struct Unit {
    /// The connection allowed to write, 0 for none.
    writer: u64,
    /// Admitted writes still landing.
    landing: u32,
}

/// Which connection may write which unit (fixed-size part) of one region.
#[derive(Debug)]
pub struct WriteGrants {
    unit_bytes: u64,
    units: Mutex<Vec<Unit>>,
}

impl WriteGrants {
    /// A table of `units` units of `unit_bytes` bytes each, none granted.
    pub fn new(unit_bytes: u64, units: usize) -> Arc<WriteGrants> {
        assert!(unit_bytes > 0, "grant units must have a size");
        Arc::new(WriteGrants {
            unit_bytes,
            units: Mutex::new(vec![Unit::default(); units]),
        })
    }

    /// Bytes per unit.
    pub fn unit_bytes(&self) -> u64 {
        self.unit_bytes
    }

    /// Lets `writer` write the units `indices` (replacing any previous grant).
    pub fn grant(&self, writer: WriterId, indices: impl IntoIterator<Item = u32>) {
        let mut units = self.units.lock().expect("grant table lock");
        for i in indices {
            if let Some(u) = units.get_mut(i as usize) {
                u.writer = writer.0;
            }
        }
    }

    /// Withdraws every grant on `indices`: no write is admitted to them from now on.
    /// Writes admitted before may still be landing: see [`WriteGrants::wait_landed`].
    pub fn revoke(&self, indices: impl IntoIterator<Item = u32>) {
        let mut units = self.units.lock().expect("grant table lock");
        for i in indices {
            if let Some(u) = units.get_mut(i as usize) {
                u.writer = 0;
            }
        }
    }

    /// Waits (at most `timeout`) until no admitted write is landing in `indices`; returns
    /// whether they are all quiet.
    pub async fn wait_landed(&self, indices: &[u32], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.landing(indices) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Whether an admitted write is still landing in any of `indices`.
    pub fn landing(&self, indices: &[u32]) -> bool {
        let units = self.units.lock().expect("grant table lock");
        indices
            .iter()
            .any(|&i| units.get(i as usize).is_some_and(|u| u.landing > 0))
    }

    /// Admits a write of `len` bytes at `offset` by `writer` if every unit it touches is
    /// granted to `writer`; the write is counted as landing until the guard drops.
    pub fn admit(
        self: &Arc<Self>,
        writer: Option<WriterId>,
        offset: u64,
        len: u64,
    ) -> Result<WriteGuard, AccessRefused> {
        let Some(writer) = writer else {
            return Err(AccessRefused::NotGranted);
        };
        if len == 0 {
            return Ok(WriteGuard {
                grants: self.clone(),
                first: 0,
                end: 0,
            });
        }
        let first = offset / self.unit_bytes;
        let end = offset
            .checked_add(len - 1)
            .ok_or(AccessRefused::NotGranted)?
            / self.unit_bytes
            + 1;
        let mut units = self.units.lock().expect("grant table lock");
        let range = usize::try_from(first).unwrap_or(usize::MAX)
            ..usize::try_from(end).unwrap_or(usize::MAX);
        let Some(touched) = units.get_mut(range) else {
            return Err(AccessRefused::NotGranted);
        };
        if touched.iter().any(|u| u.writer != writer.0) {
            return Err(AccessRefused::NotGranted);
        }
        for u in touched.iter_mut() {
            u.landing += 1;
        }
        Ok(WriteGuard {
            grants: self.clone(),
            first: first as usize,
            end: end as usize,
        })
    }
}

/// An admitted write: counted as landing in its units until dropped.
#[derive(Debug)]
pub struct WriteGuard {
    grants: Arc<WriteGrants>,
    first: usize,
    end: usize,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut units = self.grants.units.lock().expect("grant table lock");
        if let Some(touched) = units.get_mut(self.first..self.end) {
            for u in touched {
                u.landing = u.landing.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_admitted_only_to_units_granted_to_their_connection() {
        let g = WriteGrants::new(100, 4);
        let (a, b) = (WriterId(7), WriterId(9));
        assert_eq!(
            g.admit(Some(a), 0, 10).unwrap_err(),
            AccessRefused::NotGranted
        );
        g.grant(a, [1, 2]);
        g.grant(b, [3]);
        assert!(g.admit(Some(a), 100, 200).is_ok());
        assert!(g.admit(Some(a), 150, 100).is_ok());
        // One byte into a unit not granted to `a`, or past the table.
        assert!(g.admit(Some(a), 100, 201).is_err());
        assert!(g.admit(Some(a), 99, 2).is_err());
        assert!(g.admit(Some(b), 100, 1).is_err());
        assert!(g.admit(None, 100, 1).is_err());
        assert!(g.admit(Some(b), 300, 100).is_ok());
        assert!(g.admit(Some(b), 300, 101).is_err());
        assert!(g.admit(Some(b), u64::MAX, 2).is_err());
    }

    #[tokio::test]
    async fn a_revoked_unit_refuses_new_writes_and_waits_for_admitted_ones() {
        let g = WriteGrants::new(100, 2);
        let a = WriterId(5);
        g.grant(a, [0]);
        let guard = g.admit(Some(a), 0, 100).unwrap();
        g.revoke([0]);
        assert!(g.admit(Some(a), 0, 1).is_err());
        // A write admitted before is still landing: the wait reports it after the timeout ...
        assert!(!g.wait_landed(&[0], Duration::from_millis(20)).await);
        drop(guard);
        // ... and returns at once when it has ended.
        assert!(g.wait_landed(&[0], Duration::from_millis(20)).await);
        assert!(!g.landing(&[0, 1]));
    }

    #[test]
    fn access_kinds() {
        let g = WriteGrants::new(10, 1);
        assert!(RemoteAccess::ReadWrite.check_read().is_ok());
        assert!(RemoteAccess::ReadWrite.check_write(None, 0, 5).is_ok());
        let granted = RemoteAccess::GrantedWrites(g.clone());
        assert_eq!(granted.check_read(), Err(AccessRefused::NoRemoteRead));
        assert!(granted.check_write(Some(WriterId(1)), 0, 5).is_err());
        g.grant(WriterId(1), [0]);
        assert!(granted.check_write(Some(WriterId(1)), 0, 5).is_ok());
        assert_eq!(
            RemoteAccess::LocalOnly.check_write(None, 0, 1).unwrap_err(),
            AccessRefused::LocalOnly
        );
    }
}

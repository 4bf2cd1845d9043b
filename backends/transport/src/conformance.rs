//! The conformance suite: the behaviour every [`Transport`] must show, run by each
//! backend's tests against real instances of itself (two endpoints in one process here;
//! the cross-process cases, peer death included, live in kvtier's `tests/transport.rs`).
//!
//! Each case takes a factory that builds a transport from a [`TransportConfig`]; call
//! it inside a multi-threaded tokio runtime. [`conformance_tests!`](crate::conformance_tests)
//! expands to one `#[tokio::test]` per case.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    HostBuffer, RegionId, RemoteAccess, RemoteIov, Result, Transport, TransportConfig,
    TransportError,
};

/// Builds a transport (called within a tokio runtime).
pub type Factory = dyn Fn(TransportConfig) -> Result<Box<dyn Transport>> + Send + Sync;

fn config() -> TransportConfig {
    TransportConfig {
        timeout: Duration::from_secs(20),
        ..TransportConfig::default()
    }
}

fn fail(what: String) -> TransportError {
    TransportError::Io(format!("conformance: {what}"))
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(fail(what()))
    }
}

/// Writes and reads back single ranges from 1 byte to 1 GiB.
pub async fn sizes(make: &Factory) -> Result<()> {
    const MAX: usize = 1 << 30;
    let (a, b) = (make(config())?, make(config())?);
    let src = Arc::new(HostBuffer::new(MAX));
    src.fill_pattern(1);
    let dst = Arc::new(HostBuffer::new(MAX));
    let back = Arc::new(HostBuffer::new(MAX));
    let src_reg = a.register(src.clone(), RemoteAccess::ReadWrite)?;
    let back_reg = a.register(back.clone(), RemoteAccess::ReadWrite)?;
    let dst_reg = b.register(dst.clone(), RemoteAccess::ReadWrite)?;
    let conn = a.connect(&b.local_descriptor()?).await?;
    for &size in &[1usize, 7, 4096, 65_537, 1 << 20, (32 << 20) + 3, MAX] {
        // An odd offset on both sides, except for the full-size case.
        let off = if size == MAX { 0 } else { 4093 };
        let remote = [RemoteIov {
            region: dst_reg.id(),
            offset: off as u64,
            len: size as u64,
        }];
        conn.write(&[src_reg.iov(off, size)?], &remote).await?;
        ensure(dst.digest(off, size) == src.digest(off, size), || {
            format!("write of {size} bytes: destination differs")
        })?;
        conn.read(&[back_reg.iov(off, size)?], &remote).await?;
        ensure(back.digest(off, size) == src.digest(off, size), || {
            format!("read of {size} bytes: differs")
        })?;
    }
    Ok(())
}

/// Scatters 30 chunks of 32 MiB into reversed remote slots, and gathers them back.
pub async fn scatter_gather(make: &Factory) -> Result<()> {
    const CHUNK: usize = 32 << 20;
    const N: usize = 30;
    let (a, b) = (make(config())?, make(config())?);
    let src = Arc::new(HostBuffer::new(N * CHUNK));
    src.fill_pattern(2);
    let dst = Arc::new(HostBuffer::new(N * CHUNK));
    let back = Arc::new(HostBuffer::new(N * CHUNK));
    let (src_reg, back_reg) = (
        a.register(src.clone(), RemoteAccess::ReadWrite)?,
        a.register(back.clone(), RemoteAccess::ReadWrite)?,
    );
    let dst_reg = b.register(dst.clone(), RemoteAccess::ReadWrite)?;
    let conn = a.connect(&b.local_descriptor()?).await?;
    let local = (0..N)
        .map(|i| src_reg.iov(i * CHUNK, CHUNK))
        .collect::<Result<Vec<_>>>()?;
    let remote: Vec<RemoteIov> = (0..N)
        .map(|i| RemoteIov {
            region: dst_reg.id(),
            offset: ((N - 1 - i) * CHUNK) as u64,
            len: CHUNK as u64,
        })
        .collect();
    conn.write(&local, &remote).await?;
    for i in 0..N {
        ensure(
            dst.digest((N - 1 - i) * CHUNK, CHUNK) == src.digest(i * CHUNK, CHUNK),
            || format!("chunk {i} landed wrong"),
        )?;
    }
    let gather = (0..N)
        .map(|i| back_reg.iov(i * CHUNK, CHUNK))
        .collect::<Result<Vec<_>>>()?;
    conn.read(&gather, &remote).await?;
    ensure(
        back.digest(0, N * CHUNK) == src.digest(0, N * CHUNK),
        || "gathered chunks differ".into(),
    )
}

/// 16 connections to one peer, writing and notifying concurrently.
pub async fn concurrent_connections(make: &Factory) -> Result<()> {
    const CONNS: usize = 16;
    const SLICE: usize = 4 << 20;
    let b = make(config())?;
    let dst = Arc::new(HostBuffer::new(CONNS * SLICE));
    let dst_reg = b.register(dst.clone(), RemoteAccess::ReadWrite)?;
    let descriptor = b.local_descriptor()?;
    let region = dst_reg.id();
    let mut tasks = Vec::new();
    for i in 0..CONNS {
        let a: Arc<dyn Transport> = Arc::from(make(config())?);
        let descriptor = descriptor.clone();
        tasks.push(tokio::spawn(async move {
            let src = Arc::new(HostBuffer::new(SLICE));
            src.fill_pattern(100 + i as u64);
            let reg = a.register(src.clone(), RemoteAccess::ReadWrite)?;
            let conn = a.connect(&descriptor).await?;
            let remote = [RemoteIov {
                region,
                offset: (i * SLICE) as u64,
                len: SLICE as u64,
            }];
            conn.write(&[reg.iov(0, SLICE)?], &remote).await?;
            conn.notify(format!("done {i}").as_bytes()).await?;
            Ok::<u64, TransportError>(src.digest(0, SLICE))
        }));
    }
    let mut digests = Vec::new();
    for t in tasks {
        digests.push(t.await.map_err(|e| fail(format!("task: {e}")))??);
    }
    let mut seen = Vec::new();
    for _ in 0..CONNS {
        let n = b.recv_notification(Duration::from_secs(20)).await?;
        seen.push(String::from_utf8_lossy(&n.message).into_owned());
    }
    seen.sort();
    let mut want: Vec<String> = (0..CONNS).map(|i| format!("done {i}")).collect();
    want.sort();
    ensure(seen == want, || format!("notifications {seen:?}"))?;
    for (i, d) in digests.iter().enumerate() {
        ensure(dst.digest(i * SLICE, SLICE) == *d, || {
            format!("slice {i} differs")
        })?;
    }
    Ok(())
}

/// Ranges outside the peer's registrations, and unknown regions, are rejected, and the
/// connection still works afterwards.
pub async fn out_of_bounds(make: &Factory) -> Result<()> {
    let (a, b) = (make(config())?, make(config())?);
    let src = Arc::new(HostBuffer::new(1 << 20));
    let dst = Arc::new(HostBuffer::new(1 << 16));
    let src_reg = a.register(src.clone(), RemoteAccess::ReadWrite)?;
    let dst_reg = b.register(dst.clone(), RemoteAccess::ReadWrite)?;
    let conn = a.connect(&b.local_descriptor()?).await?;
    let bad = [
        RemoteIov {
            region: dst_reg.id(),
            offset: (1 << 16) - 10,
            len: 11,
        },
        RemoteIov {
            region: dst_reg.id(),
            offset: u64::MAX - 4,
            len: 8,
        },
        RemoteIov {
            region: RegionId(dst_reg.id().0 + 999),
            offset: 0,
            len: 1,
        },
    ];
    for remote in bad {
        let r = conn
            .write(&[src_reg.iov(0, remote.len as usize)?], &[remote])
            .await;
        ensure(matches!(r, Err(TransportError::OutOfBounds { .. })), || {
            format!("write to {remote:?} gave {r:?}")
        })?;
        let r = conn
            .read(&[src_reg.iov(0, remote.len as usize)?], &[remote])
            .await;
        ensure(matches!(r, Err(TransportError::OutOfBounds { .. })), || {
            format!("read of {remote:?} gave {r:?}")
        })?;
    }
    ensure(src_reg.iov((1 << 20) - 1, 2).is_err(), || {
        "local iov past the end accepted".into()
    })?;
    // LocalIov's fields are public: a hand-built one past its region is refused too.
    let forged = crate::LocalIov {
        region: &src_reg,
        offset: (1 << 20) - 1,
        len: 2,
    };
    let remote = RemoteIov {
        region: dst_reg.id(),
        offset: 0,
        len: 2,
    };
    for r in [
        conn.write(&[forged], &[remote]).await,
        conn.read(&[forged], &[remote]).await,
    ] {
        ensure(matches!(r, Err(TransportError::OutOfBounds { .. })), || {
            format!("forged local range gave {r:?}")
        })?;
    }
    // Still usable.
    src.fill_pattern(3);
    let ok = [RemoteIov {
        region: dst_reg.id(),
        offset: 0,
        len: 1 << 16,
    }];
    conn.write(&[src_reg.iov(0, 1 << 16)?], &ok).await?;
    ensure(dst.digest(0, 1 << 16) == src.digest(0, 1 << 16), || {
        "write after errors".into()
    })
}

/// Notifications arrive after the writes before them, name the sender, and a wait with
/// nothing to receive times out.
pub async fn notifications(make: &Factory) -> Result<()> {
    let (a, b) = (make(config())?, make(config())?);
    let src = Arc::new(HostBuffer::new(8 << 20));
    src.fill_pattern(4);
    let dst = Arc::new(HostBuffer::new(8 << 20));
    let src_reg = a.register(src.clone(), RemoteAccess::ReadWrite)?;
    let dst_reg = b.register(dst.clone(), RemoteAccess::ReadWrite)?;
    let conn = a.connect(&b.local_descriptor()?).await?;
    let t = Instant::now();
    let r = b.recv_notification(Duration::from_millis(200)).await;
    ensure(matches!(r, Err(TransportError::Timeout { .. })), || {
        format!("idle wait gave {r:?}")
    })?;
    ensure(t.elapsed() < Duration::from_secs(5), || {
        "timeout not honoured".into()
    })?;
    let remote = [RemoteIov {
        region: dst_reg.id(),
        offset: 0,
        len: 8 << 20,
    }];
    conn.write(&[src_reg.iov(0, 8 << 20)?], &remote).await?;
    conn.notify(b"request 7 complete").await?;
    let n = b.recv_notification(Duration::from_secs(20)).await?;
    ensure(n.message == b"request 7 complete", || format!("got {n:?}"))?;
    ensure(!n.peer.is_empty(), || "notification names no peer".into())?;
    ensure(dst.digest(0, 8 << 20) == src.digest(0, 8 << 20), || {
        "bytes before notify".into()
    })?;
    let big = vec![0u8; crate::MAX_NOTIFICATION + 1];
    ensure(conn.notify(&big).await.is_err(), || {
        "oversized notification accepted".into()
    })
}

/// Dropping a handle deregisters it; a descriptor taken afterwards no longer offers it.
pub async fn registrations(make: &Factory) -> Result<()> {
    let (a, b) = (make(config())?, make(config())?);
    let src = Arc::new(HostBuffer::new(1 << 20));
    let src_reg = a.register(src.clone(), RemoteAccess::ReadWrite)?;
    let before = b.registered_regions();
    let dst = Arc::new(HostBuffer::new(1 << 20));
    let dst_reg = b.register(dst.clone(), RemoteAccess::ReadWrite)?;
    let id = dst_reg.id();
    ensure(b.registered_regions() == before + 1, || {
        "registration not counted".into()
    })?;
    drop(dst_reg);
    ensure(b.registered_regions() == before, || {
        "drop did not deregister".into()
    })?;
    ensure(Arc::strong_count(&dst) == 1, || {
        "transport still holds the memory".into()
    })?;
    let conn = a.connect(&b.local_descriptor()?).await?;
    let r = conn
        .write(
            &[src_reg.iov(0, 16)?],
            &[RemoteIov {
                region: id,
                offset: 0,
                len: 16,
            }],
        )
        .await;
    ensure(matches!(r, Err(TransportError::OutOfBounds { .. })), || {
        format!("write to a deregistered region gave {r:?}")
    })
}

/// Local-only regions are not offered to peers; where the transport enforces write grants
/// ([`Transport::enforces_write_grants`]), a granted region admits a peer's writes only
/// to units granted to that connection, while granted, and no reads.
pub async fn remote_access(make: &Factory) -> Result<()> {
    const UNIT: usize = 4096;
    let (a, b) = (make(config())?, make(config())?);
    let src = Arc::new(HostBuffer::new(4 * UNIT));
    src.fill_pattern(6);
    let src_reg = a.register(src.clone(), RemoteAccess::LocalOnly)?;
    let local = Arc::new(HostBuffer::new(UNIT));
    let local_reg = b.register(local.clone(), RemoteAccess::LocalOnly)?;
    let grants = crate::WriteGrants::new(UNIT as u64, 4);
    let granted = Arc::new(HostBuffer::new(4 * UNIT));
    let granted_reg = b.register(granted.clone(), RemoteAccess::GrantedWrites(grants.clone()))?;
    let descriptor = b.local_descriptor()?;
    let offered = crate::Descriptor::decode(&descriptor, b.kind())?.regions;
    ensure(
        offered.iter().all(|r| r.id != local_reg.id())
            && offered.iter().any(|r| r.id == granted_reg.id()),
        || format!("descriptor offers {offered:?}"),
    )?;
    let unit = |i: usize, n: usize| RemoteIov {
        region: granted_reg.id(),
        offset: (i * UNIT) as u64,
        len: (n * UNIT) as u64,
    };
    let conn = a.connect(&descriptor).await?;
    let r = conn
        .write(
            &[src_reg.iov(0, 16)?],
            &[RemoteIov {
                region: local_reg.id(),
                offset: 0,
                len: 16,
            }],
        )
        .await;
    ensure(r.is_err(), || {
        "a write into a local-only region passed".into()
    })?;
    if !b.enforces_write_grants() {
        return Ok(());
    }
    let forbidden = |r: &Result<()>| matches!(r, Err(TransportError::Forbidden { .. }));
    // Not granted to anyone yet.
    let conn = a.connect(&descriptor).await?;
    let r = conn.write(&[src_reg.iov(UNIT, UNIT)?], &[unit(1, 1)]).await;
    ensure(forbidden(&r), || format!("ungranted write gave {r:?}"))?;
    // Granted to one connection: it may write that unit, not the next; others may not.
    let owner = a.connect(&descriptor).await?;
    let id = owner
        .writer_id()
        .ok_or_else(|| fail("a connection to a granting peer has no writer id".into()))?;
    grants.grant(id, [1]);
    owner
        .write(&[src_reg.iov(UNIT, UNIT)?], &[unit(1, 1)])
        .await?;
    ensure(granted.digest(UNIT, UNIT) == src.digest(UNIT, UNIT), || {
        "granted write did not land".into()
    })?;
    let other = a.connect(&descriptor).await?;
    let r = other
        .write(&[src_reg.iov(UNIT, UNIT)?], &[unit(1, 1)])
        .await;
    ensure(forbidden(&r), || {
        format!("another connection's write gave {r:?}")
    })?;
    let reader = a.connect(&descriptor).await?;
    let r = reader.read(&[src_reg.iov(0, UNIT)?], &[unit(1, 1)]).await;
    ensure(forbidden(&r), || {
        format!("read of a granted region gave {r:?}")
    })?;
    let r = owner
        .write(&[src_reg.iov(UNIT, 2 * UNIT)?], &[unit(1, 2)])
        .await;
    ensure(forbidden(&r), || format!("write past the grant gave {r:?}"))?;
    // Revoked: refused even to its owner.
    let owner = a.connect(&descriptor).await?;
    let id = owner.writer_id().expect("checked above");
    grants.grant(id, [2]);
    owner.write(&[src_reg.iov(0, UNIT)?], &[unit(2, 1)]).await?;
    grants.revoke([2]);
    let r = owner.write(&[src_reg.iov(0, UNIT)?], &[unit(2, 1)]).await;
    ensure(forbidden(&r), || format!("write after revoke gave {r:?}"))
}

/// Connecting to a descriptor nobody serves fails within the timeout.
pub async fn unreachable_peer(make: &Factory) -> Result<()> {
    let b = make(config())?;
    let descriptor = b.local_descriptor()?;
    drop(b);
    let cfg = TransportConfig {
        timeout: Duration::from_secs(3),
        ..config()
    };
    let a = make(cfg)?;
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(15), a.connect(&descriptor)).await;
    match r {
        Err(_) => Err(fail("connect to a dead peer hung past the timeout".into())),
        Ok(Ok(conn)) => {
            // Some transports connect lazily: the first transfer must fail instead.
            let buf = Arc::new(HostBuffer::new(4096));
            let reg = a.register(buf, RemoteAccess::ReadWrite)?;
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                conn.write(
                    &[reg.iov(0, 4096)?],
                    &[RemoteIov {
                        region: RegionId(1),
                        offset: 0,
                        len: 4096,
                    }],
                ),
            )
            .await;
            ensure(matches!(r, Ok(Err(_))), || {
                format!("write to a dead peer gave {r:?}")
            })?;
            ensure(t.elapsed() < Duration::from_secs(12), || {
                "dead peer not detected in time".into()
            })
        }
        Ok(Err(_)) => Ok(()),
    }
}

/// Expands to one `#[tokio::test]` per conformance case, for the factory `$make`
/// (a `fn(TransportConfig) -> Result<Box<dyn Transport>>`).
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@case $make, sizes, scatter_gather, concurrent_connections,
            out_of_bounds, notifications, registrations, remote_access, unreachable_peer);
    };
    (@case $make:path, $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case(&$make).await.expect(stringify!($case));
            }
        )*
    };
}

//! kvtier's UCX transport.
//!
//! Each endpoint owns one UCP context and one worker, driven by a dedicated progress
//! thread (see `worker.rs`) that holds every UCX handle; the async API sends it commands
//! and awaits the replies. There is no listener: the descriptor lists, per registered
//! region, its address, length and packed rkey, and its body is the worker's address
//! followed by a checksum over address and regions; [`Transport::connect`] checks the
//! sum, creates an endpoint to that address and unpacks the rkeys.
//!
//! `write` issues one `ucp_put_nbx` per range (up to 16 in flight), then flushes the
//! endpoint, so it completes only when every byte is at the peer; `read` issues
//! `ucp_get_nbx` per range. Ranges are checked against the peer's descriptor before
//! anything is sent. `notify` sends an eager active message carrying the sender's name,
//! then flushes; the receiving worker's handler queues it for
//! [`Transport::recv_notification`]. Every operation is bounded by the configured timeout:
//! past it the endpoint is force-closed and the connection fails from then on, as it does
//! after any UCX error on it.
//!
//! UCX picks its transports at run time (shared memory and cross-memory attach between
//! processes of one host, TCP otherwise) and reads the user's `UCX_*` environment
//! variables; the crate changes one default, the log level (`error`, unless `UCX_LOG_LEVEL`
//! is set; UCX logs to stdout). The UCX libraries are built from source and linked
//! statically (`ucx-rs`).
//!
//! Trust: the descriptor is the capability. Whoever holds it can write and read the
//! registered regions one-sidedly, without a handshake this endpoint could refuse. A
//! `transport_auth_token` is therefore enforced where descriptors are handed out: kvtier's
//! control plane (P/D init port, remote-store master) gives a descriptor only to peers
//! that pass its token handshake. UCX parses worker addresses and rkeys
//! without bounds checks; the checksum catches corruption, not a malicious peer.
//! Deregistering a region does not revoke it over cross-memory attach (which has no
//! keys): a peer holding an older descriptor can still write the old range, so memory
//! must not be reused while peers may hold descriptors naming it.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kvtier_transport::{
    BoxFuture, Connection, Descriptor, LocalIov, Notification, RegionId, RegionMemory, RegionTable,
    RegistrationHandle, RemoteAccess, RemoteIov, Result, Transport, TransportConfig,
    TransportError, MAX_NOTIFICATION,
};
use tokio::sync::oneshot;
// Links the static UCX libraries and their constructors into every binary using this
// crate (the worker module names `ucx_rs::sys` too; this keeps the reference explicit).
use ucx_rs as _;

pub mod wire;
mod worker;

use worker::{Command, Direction, Handle, Range};

const KIND: &str = "ucx";

/// Extra time a caller waits for the progress thread's answer beyond the timeout the
/// thread itself enforces.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// A UCX transport endpoint: a UCP worker serving peers' one-sided transfers into this
/// endpoint's registered memory, and the initiator side of connections to other
/// endpoints.
pub struct UcxTransport {
    inner: Arc<Inner>,
}

struct Inner {
    // Declared first: dropping it stops the progress thread (endpoints closed, every
    // region unmapped) before `regions` releases its references to the memory.
    handle: Handle,
    config: TransportConfig,
    name: String,
    /// The worker's address, the descriptor body.
    address: Vec<u8>,
    regions: RegionTable,
    /// Per region: the progress thread's memory-handle token and the packed rkey. Locked
    /// before `regions` wherever both are used, so a descriptor never lists a region
    /// without its key.
    keys: Mutex<HashMap<RegionId, (u64, Vec<u8>)>>,
    notify_rx: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Notification>>,
}

fn random_tag() -> u32 {
    RandomState::new().build_hasher().finish() as u32
}

impl UcxTransport {
    /// Starts an endpoint: creates the UCP context and worker on a new progress thread.
    /// Fails if UCX cannot initialise. `config.auth_token` is not checked here: see the
    /// crate docs (trust) for where it is enforced.
    pub fn new(config: TransportConfig) -> Result<Self> {
        let name = format!(
            "ucx://{}/{}#{:08x}",
            config.host,
            std::process::id(),
            random_tag()
        );
        let started = worker::spawn(name.clone(), config.timeout)?;
        Ok(UcxTransport {
            inner: Arc::new(Inner {
                handle: started.handle,
                config,
                name,
                address: started.address,
                regions: RegionTable::default(),
                keys: Mutex::new(HashMap::new()),
                notify_rx: tokio::sync::Mutex::new(started.notifications),
            }),
        })
    }

    /// This endpoint's name (as peers see it).
    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

fn lock_poisoned() -> TransportError {
    TransportError::Io("ucx transport: lock poisoned".into())
}

impl Inner {
    /// Sends a command built around a reply channel and waits for the answer (bounded).
    async fn call<T>(
        &self,
        op: &'static str,
        command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.handle.send(command(tx))?;
        match tokio::time::timeout(self.config.timeout + REPLY_GRACE, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(worker::stopped()),
            Err(_) => Err(TransportError::Timeout {
                op,
                after: self.config.timeout,
            }),
        }
    }

    /// Unmaps region `id` (waiting for the progress thread) and forgets it.
    fn deregister(&self, id: RegionId) {
        let (token, memory) = match self.keys.lock() {
            Ok(mut keys) => {
                let token = keys.remove(&id).map_or(0, |(token, _)| token);
                (token, self.regions.remove(id))
            }
            Err(_) => {
                tracing::error!(
                    "ucx transport {}: lock poisoned deregistering {id:?}",
                    self.name
                );
                return;
            }
        };
        if token == 0 {
            return;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        if self
            .handle
            .send(Command::Deregister { token, reply: tx })
            .is_err()
        {
            return; // the thread is gone and unmapped everything
        }
        match rx.recv_timeout(self.config.timeout) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::error!(
                    "ucx transport {}: {id:?} not unmapped within {:?}; leaking its memory \
                     (peers may still write it)",
                    self.name,
                    self.config.timeout
                );
                // Still mapped and reachable by peers: freeing it would let a late put
                // land in reused memory. Leak it instead.
                std::mem::forget(memory);
            }
        }
    }
}

impl Transport for UcxTransport {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn register(
        &self,
        memory: Arc<dyn RegionMemory>,
        access: RemoteAccess,
    ) -> Result<RegistrationHandle> {
        let inner = &self.inner;
        let (tx, rx) = mpsc::sync_channel(1);
        inner.handle.send(Command::Register {
            addr: memory.as_ptr() as usize,
            len: memory.len(),
            remote_read: access.allows_remote_read(),
            remote_write: access.allows_remote_write(),
            reply: tx,
        })?;
        let registered = match rx.recv_timeout(inner.config.timeout) {
            Ok(r) => r?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(TransportError::Timeout {
                    op: "register",
                    after: inner.config.timeout,
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(worker::stopped()),
        };
        let id = {
            let mut keys = inner.keys.lock().map_err(|_| lock_poisoned())?;
            let id = inner.regions.insert(memory.clone(), access);
            keys.insert(id, (registered.token, registered.rkey));
            id
        };
        let weak: Weak<Inner> = Arc::downgrade(inner);
        Ok(RegistrationHandle::new(id, memory, move || {
            if let Some(inner) = weak.upgrade() {
                inner.deregister(id);
            }
        }))
    }

    fn registered_regions(&self) -> usize {
        self.inner.regions.len()
    }

    fn local_descriptor(&self) -> Result<Vec<u8>> {
        let keys = self.inner.keys.lock().map_err(|_| lock_poisoned())?;
        let regions = self.inner.regions.infos(|id| {
            keys.get(&id)
                .map(|(_, key)| key.clone())
                .unwrap_or_default()
        });
        Ok(Descriptor {
            kind: KIND.into(),
            name: self.inner.name.clone(),
            body: wire::seal(&self.inner.address, &regions),
            regions,
        }
        .encode())
    }

    fn connect<'a>(&'a self, descriptor: &'a [u8]) -> BoxFuture<'a, Result<Box<dyn Connection>>> {
        Box::pin(async move {
            let remote = Descriptor::decode(descriptor, KIND)?;
            let address = wire::unseal(&remote)?.to_vec();
            let peer = remote.name.clone();
            let keys = remote
                .regions
                .iter()
                .map(|r| (r.id, r.key.clone()))
                .collect();
            let id = self
                .inner
                .call("connect", |reply| Command::Connect {
                    peer: peer.clone(),
                    address,
                    keys,
                    reply,
                })
                .await?;
            Ok(Box::new(UcxConnection {
                inner: self.inner.clone(),
                id,
                peer,
                remote,
            }) as Box<dyn Connection>)
        })
    }

    fn recv_notification(&self, timeout: Duration) -> BoxFuture<'_, Result<Notification>> {
        Box::pin(kvtier_transport::recv_queued(
            &self.inner.notify_rx,
            timeout,
        ))
    }
}

/// A connection to a UCX peer: an endpoint and the peer's unpacked rkeys, owned by the
/// progress thread; this handle names them.
struct UcxConnection {
    inner: Arc<Inner>,
    id: u64,
    peer: String,
    remote: Descriptor,
}

impl Drop for UcxConnection {
    fn drop(&mut self) {
        let _ = self
            .inner
            .handle
            .send(Command::Disconnect { conn: self.id });
    }
}

impl UcxConnection {
    /// Checks the pairs against local registrations and the peer's descriptor, then runs
    /// the transfer on the progress thread.
    async fn transfer(
        &self,
        op: &'static str,
        direction: Direction,
        local: &[LocalIov<'_>],
        remote: &[RemoteIov],
    ) -> Result<()> {
        let infos = self.remote.check_transfer(local, remote)?;
        let mut ranges = Vec::with_capacity(local.len());
        let mut keep: Vec<Arc<dyn RegionMemory>> = Vec::new();
        for ((l, r), info) in local.iter().zip(remote).zip(infos) {
            if r.len == 0 {
                continue;
            }
            let Some(remote_addr) = info.addr.checked_add(r.offset) else {
                return Err(TransportError::Protocol(format!(
                    "region {} at {:#x} + {} overflows",
                    r.region.0, info.addr, r.offset
                )));
            };
            let memory = l.region.memory();
            if !keep.iter().any(|m| Arc::ptr_eq(m, memory)) {
                keep.push(memory.clone());
            }
            ranges.push(Range {
                local: l.ptr() as usize,
                len: l.len,
                remote: remote_addr,
                region: r.region,
            });
        }
        if ranges.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.inner.config.timeout;
        self.inner
            .call(op, |reply| Command::Transfer {
                conn: self.id,
                direction,
                ranges,
                keep,
                deadline,
                reply,
            })
            .await
    }
}

impl Connection for UcxConnection {
    fn peer(&self) -> &str {
        &self.peer
    }

    fn write<'a>(
        &'a self,
        local: &'a [LocalIov<'a>],
        remote: &'a [RemoteIov],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.transfer("write", Direction::Put, local, remote))
    }

    fn read<'a>(
        &'a self,
        local: &'a [LocalIov<'a>],
        remote: &'a [RemoteIov],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.transfer("read", Direction::Get, local, remote))
    }

    fn notify<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if message.len() > MAX_NOTIFICATION {
                return Err(TransportError::Protocol(format!(
                    "notification of {} bytes exceeds {MAX_NOTIFICATION}",
                    message.len()
                )));
            }
            let payload = wire::encode_notification(&self.inner.name, message);
            let deadline = Instant::now() + self.inner.config.timeout;
            self.inner
                .call("notify", |reply| Command::Notify {
                    conn: self.id,
                    payload,
                    deadline,
                    reply,
                })
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_transport::HostBuffer;

    fn make(config: TransportConfig) -> Result<Box<dyn Transport>> {
        Ok(Box::new(UcxTransport::new(config)?))
    }

    kvtier_transport::conformance_tests!(make);

    fn config(timeout: Duration) -> TransportConfig {
        TransportConfig {
            timeout,
            ..TransportConfig::default()
        }
    }

    #[test]
    fn notification_encoding_round_trips_and_rejects_garbage() {
        let bytes = wire::encode_notification("ucx://a/1#2", b"hello");
        let n = wire::decode_notification(&bytes).unwrap();
        assert_eq!(
            (n.peer.as_str(), n.message.as_slice()),
            ("ucx://a/1#2", &b"hello"[..])
        );
        for cut in 0..13 {
            assert!(
                wire::decode_notification(&bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
        assert!(wire::decode_notification(&[1, 0, 0xff]).is_err());
    }

    /// Corrupt descriptors are refused before UCX parses them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_descriptors_are_refused() {
        let a = UcxTransport::new(TransportConfig::default()).unwrap();
        let b = UcxTransport::new(TransportConfig::default()).unwrap();
        let _reg = b
            .register(Arc::new(HostBuffer::new(4096)), RemoteAccess::ReadWrite)
            .unwrap();
        let good = Descriptor::decode(&b.local_descriptor().unwrap(), KIND).unwrap();
        let mut bad = Vec::new();
        for i in (0..good.body.len()).step_by(3) {
            let mut d = good.clone();
            d.body[i] ^= 0x5a;
            bad.push(d);
        }
        for cut in [0, 8, good.body.len() / 2, good.body.len() - 1] {
            let mut d = good.clone();
            d.body.truncate(cut);
            bad.push(d);
        }
        let mut d = good.clone();
        let half = d.regions[0].key.len() / 2;
        d.regions[0].key.truncate(half);
        bad.push(d);
        let mut d = good.clone();
        d.regions[0].addr += 4096;
        bad.push(d);
        for d in bad {
            let r = a.connect(&d.encode()).await;
            assert!(
                matches!(r, Err(TransportError::Protocol(_))),
                "{:?}",
                r.err()
            );
        }
        a.connect(&good.encode()).await.unwrap();
    }

    /// A peer whose transport was dropped: a write to its (still allocated) region
    /// fails, or the connect does, within the timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_to_a_dropped_peer_fails_in_time() {
        let timeout = Duration::from_secs(3);
        let b = UcxTransport::new(config(timeout)).unwrap();
        let dst = Arc::new(HostBuffer::new(1 << 20));
        let reg = b.register(dst.clone(), RemoteAccess::ReadWrite).unwrap();
        let descriptor = b.local_descriptor().unwrap();
        let region = reg.id();
        drop(reg);
        drop(b);
        let a = UcxTransport::new(config(timeout)).unwrap();
        let src = Arc::new(HostBuffer::new(1 << 20));
        let src_reg = a.register(src, RemoteAccess::ReadWrite).unwrap();
        let t = Instant::now();
        match a.connect(&descriptor).await {
            Err(e) => eprintln!("connect failed: {e}"),
            Ok(conn) => {
                let remote = [RemoteIov {
                    region,
                    offset: 0,
                    len: 1 << 20,
                }];
                let r = conn
                    .write(&[src_reg.iov(0, 1 << 20).unwrap()], &remote)
                    .await;
                assert!(r.is_err(), "write to a dropped peer succeeded");
                eprintln!("write failed: {:?}", r.err());
            }
        }
        assert!(
            t.elapsed() < timeout + Duration::from_secs(3),
            "took {:?}",
            t.elapsed()
        );
    }

    /// Connections, registrations and the transport drop in any order without hanging,
    /// and a connection outliving its transport still works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_orders() {
        let a = UcxTransport::new(config(Duration::from_secs(5))).unwrap();
        let b = UcxTransport::new(config(Duration::from_secs(5))).unwrap();
        let src = Arc::new(HostBuffer::new(1 << 16));
        src.fill_pattern(9);
        let dst = Arc::new(HostBuffer::new(1 << 16));
        let src_reg = a.register(src.clone(), RemoteAccess::ReadWrite).unwrap();
        let dst_reg = b.register(dst.clone(), RemoteAccess::ReadWrite).unwrap();
        let conn = a.connect(&b.local_descriptor().unwrap()).await.unwrap();
        drop(a);
        let remote = [RemoteIov {
            region: dst_reg.id(),
            offset: 0,
            len: 1 << 16,
        }];
        conn.write(&[src_reg.iov(0, 1 << 16).unwrap()], &remote)
            .await
            .unwrap();
        assert_eq!(dst.digest(0, 1 << 16), src.digest(0, 1 << 16));
        conn.notify(b"after drop").await.unwrap();
        let n = b.recv_notification(Duration::from_secs(5)).await.unwrap();
        assert_eq!(n.message, b"after drop");
        assert!(n.peer.starts_with("ucx://"));
        drop(conn);
        drop(src_reg);
        assert_eq!(Arc::strong_count(&src), 1);
        drop(b);
        drop(dst_reg);
        assert_eq!(Arc::strong_count(&dst), 1);
    }

    /// Which helper role a re-executed test binary plays (`peer`, `driver`).
    const ROLE_ENV: &str = "KVTIER_UCX_TEST_ROLE";
    const PEER_LEN: usize = 64 << 20;

    fn role_is(role: &str) -> bool {
        std::env::var(ROLE_ENV).is_ok_and(|r| r == role)
    }

    /// Runs this test binary's ignored test `test` as a child process playing `role`.
    fn spawn_role(test: &str, role: &str) -> std::process::Child {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                test,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_ENV, role)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The rest of the first line of `out` containing `prefix`.
    fn line_with(out: &mut impl std::io::BufRead, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "child output ended before {prefix}"
            );
            // The test harness may print the test's name on the same line.
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim_end().to_string();
            }
        }
    }

    /// Starts the `peer_process` helper; returns it, its stdout and its descriptor.
    fn spawn_peer() -> (
        std::process::Child,
        std::io::BufReader<std::process::ChildStdout>,
        Vec<u8>,
    ) {
        let mut child = spawn_role("tests::peer_process", "peer");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let hex = line_with(&mut out, "DESCRIPTOR ");
        let descriptor = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        (child, out, descriptor)
    }

    /// The other process of `cross_process` (runs only when started by it): registers a
    /// buffer, prints its descriptor, waits for a notification, prints the buffer's
    /// digest and exits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "helper process of cross_process"]
    async fn peer_process() {
        if !role_is("peer") {
            return;
        }
        let b = UcxTransport::new(config(Duration::from_secs(20))).unwrap();
        let dst = Arc::new(HostBuffer::new(PEER_LEN));
        let _reg = b.register(dst.clone(), RemoteAccess::ReadWrite).unwrap();
        let hex: String = b
            .local_descriptor()
            .unwrap()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        println!("DESCRIPTOR {hex}");
        let n = b.recv_notification(Duration::from_secs(20)).await.unwrap();
        println!(
            "DIGEST {:016x} {}",
            dst.digest(0, PEER_LEN),
            String::from_utf8_lossy(&n.message)
        );
    }

    /// Two processes: a write and a notification reach the peer process; once it has
    /// exited, a write to it fails within the timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cross_process() {
        let (mut child, mut out, descriptor) = spawn_peer();
        let timeout = Duration::from_secs(3);
        let a = UcxTransport::new(config(timeout)).unwrap();
        let src = Arc::new(HostBuffer::new(PEER_LEN));
        src.fill_pattern(11);
        let reg = a.register(src.clone(), RemoteAccess::ReadWrite).unwrap();
        let conn = a.connect(&descriptor).await.unwrap();
        let region = Descriptor::decode(&descriptor, KIND).unwrap().regions[0].id;
        let remote = [RemoteIov {
            region,
            offset: 0,
            len: PEER_LEN as u64,
        }];
        let local = [reg.iov(0, PEER_LEN).unwrap()];
        conn.write(&local, &remote).await.unwrap();
        conn.notify(b"from the other process").await.unwrap();
        let digest = line_with(&mut out, "DIGEST ");
        assert_eq!(
            digest,
            format!("{:016x} from the other process", src.digest(0, PEER_LEN))
        );
        assert!(child.wait().unwrap().success());
        let t = Instant::now();
        let r = conn.write(&local, &remote).await;
        eprintln!("write to the exited peer: {r:?} after {:?}", t.elapsed());
        assert!(r.is_err());
        assert!(t.elapsed() < timeout + Duration::from_secs(3));
        let r = conn.notify(b"anyone?").await;
        assert!(r.is_err(), "notify to the exited peer: {r:?}");
    }

    /// The process of `stalled_peer_times_out` (TCP only, so transfers need the peer's
    /// progress): stops its peer process, then a write must time out and the connection
    /// fail from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "helper process of stalled_peer_times_out"]
    async fn stall_driver() {
        if !role_is("driver") {
            return;
        }
        let (mut child, _out, descriptor) = spawn_peer();
        let timeout = Duration::from_secs(2);
        let a = UcxTransport::new(config(timeout)).unwrap();
        let src = Arc::new(HostBuffer::new(4 << 20));
        let reg = a.register(src.clone(), RemoteAccess::ReadWrite).unwrap();
        let conn = a.connect(&descriptor).await.unwrap();
        let region = Descriptor::decode(&descriptor, KIND).unwrap().regions[0].id;
        let remote = [RemoteIov {
            region,
            offset: 0,
            len: 4 << 20,
        }];
        let local = [reg.iov(0, 4 << 20).unwrap()];
        conn.write(&local, &remote).await.unwrap();
        // SAFETY: signals our own child process, by id.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) }, 0);
        // The signal is asynchronous: wait until every thread of the peer has stopped.
        let stopped = |pid: u32| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .all(|task| {
                    let stat = std::fs::read_to_string(task.unwrap().path().join("stat"))
                        .unwrap_or_default();
                    // The state follows the parenthesised command name.
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('T'))
                })
        };
        let t = Instant::now();
        while !stopped(child.id()) {
            assert!(t.elapsed() < Duration::from_secs(5), "peer did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = Instant::now();
        let r = conn.write(&local, &remote).await;
        let took = t.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        println!("write to the stopped peer: {r:?} after {took:?}");
        assert!(matches!(r, Err(TransportError::Timeout { .. })), "{r:?}");
        assert!(took < timeout + Duration::from_secs(2), "{took:?}");
        let r = conn.notify(b"still there?").await;
        assert!(matches!(r, Err(TransportError::PeerGone { .. })), "{r:?}");
        drop(conn);
        drop(reg);
        drop(a);
        println!("STALL OK");
    }

    /// A write to a peer that stopped making progress fails with a timeout (runs
    /// `stall_driver` in a child process restricted to TCP with `UCX_TLS`).
    #[test]
    fn stalled_peer_times_out() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::stall_driver",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_ENV, "driver")
            .env("UCX_TLS", "tcp,self")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let t = Instant::now();
        let ok = line_with(&mut out, "STALL OK");
        assert!(ok.is_empty());
        assert!(child.wait().unwrap().success());
        assert!(t.elapsed() < Duration::from_secs(30));
    }
}

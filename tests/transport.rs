//! The transports across two processes: a `kvtier transfer-peer` process registers a
//! region; this process writes into it and reads from it through the real transport,
//! kills it mid-transfer, and checks errors, timeouts and registrations.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::config::TransferChannel;
use kvtier::transport::{
    self, HostBuffer, RemoteAccess, RemoteIov, Transport, TransportConfig, TransportError,
};
use kvtier_transport::handshake::HandshakeError;

const CHUNK: usize = 32 << 20;

struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    descriptor: Vec<u8>,
}

impl Peer {
    fn spawn(kind: TransferChannel, size: usize, token: Option<&str>) -> Peer {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvtier"));
        cmd.args([
            "transfer-peer",
            "--transport",
            &kind.to_string(),
            "--size",
            &size.to_string(),
        ])
        .args(["--timeout-sec", "10"])
        .env("KVTIER_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        if let Some(t) = token {
            cmd.args(["--auth-token", t]);
        }
        let mut child = cmd.spawn().expect("spawn transfer-peer");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let hex = line
            .trim()
            .strip_prefix("descriptor ")
            .unwrap_or_else(|| panic!("peer said {line:?}"));
        let descriptor = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        Peer {
            child,
            stdin,
            stdout,
            descriptor,
        }
    }

    fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(timeout: Duration, token: Option<&str>) -> TransportConfig {
    TransportConfig {
        timeout,
        auth_token: token.map(str::to_string),
        host: "127.0.0.1".into(),
    }
}

fn region_of(local: &dyn Transport, descriptor: &[u8]) -> kvtier::transport::RegionId {
    kvtier_transport::Descriptor::decode(descriptor, local.kind())
        .unwrap()
        .regions[0]
        .id
}

/// 1 GiB in 32 chunks of 32 MiB, scattered in reverse, verified by the peer's own digests;
/// then read back; then a notification.
async fn scatter_gather_1gib(kind: TransferChannel) {
    const N: usize = 32;
    let mut peer = Peer::spawn(kind, N * CHUNK, None);
    let local = transport::open(kind, config(Duration::from_secs(30), None)).unwrap();
    let src = Arc::new(HostBuffer::new(N * CHUNK));
    src.fill_pattern(42);
    let back = Arc::new(HostBuffer::new(N * CHUNK));
    let (src_reg, back_reg) = (
        local
            .register(src.clone(), RemoteAccess::ReadWrite)
            .unwrap(),
        local
            .register(back.clone(), RemoteAccess::ReadWrite)
            .unwrap(),
    );
    let conn = local.connect(&peer.descriptor).await.unwrap();
    let region = region_of(local.as_ref(), &peer.descriptor);
    let remote: Vec<RemoteIov> = (0..N)
        .map(|i| RemoteIov {
            region,
            offset: ((N - 1 - i) * CHUNK) as u64,
            len: CHUNK as u64,
        })
        .collect();
    let out: Vec<_> = (0..N)
        .map(|i| src_reg.iov(i * CHUNK, CHUNK).unwrap())
        .collect();
    conn.write(&out, &remote).await.unwrap();
    for i in 0..N {
        let theirs = peer.ask(&format!("digest {} {CHUNK}", (N - 1 - i) * CHUNK));
        assert_eq!(
            theirs,
            format!("digest {:016x}", src.digest(i * CHUNK, CHUNK)),
            "chunk {i}"
        );
    }
    let inn: Vec<_> = (0..N)
        .map(|i| back_reg.iov(i * CHUNK, CHUNK).unwrap())
        .collect();
    conn.read(&inn, &remote).await.unwrap();
    assert_eq!(back.digest(0, N * CHUNK), src.digest(0, N * CHUNK));
    conn.notify(b"request 1 done").await.unwrap();
    assert_eq!(peer.ask("notify 1"), "notify request 1 done");
    drop((src_reg, back_reg));
    assert_eq!(local.registered_regions(), 0);
}

/// The peer is killed while 1 GiB is in flight: the write fails within the timeout, and
/// our registrations are released.
async fn peer_killed_mid_transfer(kind: TransferChannel) {
    let size = 1usize << 30;
    let mut peer = Peer::spawn(kind, size, None);
    let timeout = Duration::from_secs(5);
    let local: Arc<dyn Transport> =
        Arc::from(transport::open(kind, config(timeout, None)).unwrap());
    let src = Arc::new(HostBuffer::new(size));
    let reg = Arc::new(
        local
            .register(src.clone(), RemoteAccess::ReadWrite)
            .unwrap(),
    );
    let conn: Arc<dyn kvtier::transport::Connection> =
        Arc::from(local.connect(&peer.descriptor).await.unwrap());
    let region = region_of(local.as_ref(), &peer.descriptor);
    let start = Instant::now();
    let writer = {
        let (conn, reg) = (conn.clone(), reg.clone());
        tokio::spawn(async move {
            // Keep writing until the peer dies: the kill lands inside some transfer.
            for _ in 0..1000 {
                let iov = [reg.iov(0, size).unwrap()];
                conn.write(
                    &iov,
                    &[RemoteIov {
                        region,
                        offset: 0,
                        len: size as u64,
                    }],
                )
                .await?;
            }
            Ok::<(), TransportError>(())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    peer.child.kill().unwrap();
    let killed = Instant::now();
    let result = tokio::time::timeout(timeout * 3, writer)
        .await
        .expect("write hung past 3x the timeout");
    let err = result
        .unwrap()
        .expect_err("writes to a killed peer must fail");
    assert!(
        matches!(
            err,
            TransportError::PeerGone { .. } | TransportError::Timeout { .. }
        ),
        "unexpected error {err:?}"
    );
    assert!(
        killed.elapsed() <= timeout + Duration::from_secs(2),
        "error after {:?}",
        killed.elapsed()
    );
    assert!(start.elapsed() > Duration::from_millis(300));
    // Nothing leaks: the connection is unusable, the registration goes away on drop.
    let iov = [reg.iov(0, 4096).unwrap()];
    assert!(conn
        .write(
            &iov,
            &[RemoteIov {
                region,
                offset: 0,
                len: 4096
            }]
        )
        .await
        .is_err());
    drop(conn);
    drop(Arc::try_unwrap(reg).expect("only holder"));
    assert_eq!(local.registered_regions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_scatter_gather_1gib_across_processes() {
    scatter_gather_1gib(TransferChannel::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_peer_killed_mid_transfer() {
    peer_killed_mid_transfer(TransferChannel::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_wrong_secret_refused_across_processes() {
    let peer = Peer::spawn(TransferChannel::Tcp, 4096, Some("right"));
    for token in [None, Some("wrong")] {
        let local =
            transport::open(TransferChannel::Tcp, config(Duration::from_secs(5), token)).unwrap();
        let r = local.connect(&peer.descriptor).await;
        assert!(
            matches!(
                r,
                Err(TransportError::Handshake(
                    HandshakeError::Refused { .. } | HandshakeError::Unproven { .. }
                ))
            ),
            "{token:?}: {:?}",
            r.err()
        );
    }
    let local = transport::open(
        TransferChannel::Tcp,
        config(Duration::from_secs(5), Some("right")),
    )
    .unwrap();
    local.connect(&peer.descriptor).await.unwrap();
}

#[cfg(feature = "ucx")]
mod ucx {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ucx_scatter_gather_1gib_across_processes() {
        scatter_gather_1gib(TransferChannel::Ucx).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ucx_peer_killed_mid_transfer() {
        peer_killed_mid_transfer(TransferChannel::Ucx).await;
    }
}

#[cfg(feature = "nixl")]
mod nixl {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nixl_scatter_gather_1gib_across_processes() {
        scatter_gather_1gib(TransferChannel::Nixl).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nixl_peer_killed_mid_transfer() {
        peer_killed_mid_transfer(TransferChannel::Nixl).await;
    }
}

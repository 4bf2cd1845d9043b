//! Transfer benchmarks: 30 × 32 MiB written and read through each transport built in
//! (tcp always; ucx and nixl with their features), between two endpoints in this process,
//! beside a memcpy and a raw loopback TCP stream of the same bytes timed in the same run.
//! Cross-process figures: `kvtier bench transfer --transport tcp|ucx|nixl`.

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kvtier::config::TransferChannel;
use kvtier::transport::{self, HostBuffer, RemoteAccess, RemoteIov, TransportConfig};

const CHUNK: usize = 32 << 20;
const N: usize = 30;
const SIZE: usize = N * CHUNK;

fn channels() -> Vec<TransferChannel> {
    let mut v = vec![TransferChannel::Tcp];
    if cfg!(feature = "ucx") {
        v.push(TransferChannel::Ucx);
    }
    if cfg!(feature = "nixl") {
        v.push(TransferChannel::Nixl);
    }
    v
}

fn bench_baselines(c: &mut Criterion) {
    let mut g = c.benchmark_group("transfer");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(SIZE as u64));
    let src = vec![1u8; SIZE];
    let mut dst = vec![2u8; SIZE];
    g.bench_function("memcpy_1t", |b| {
        b.iter(|| {
            black_box(dst.as_mut_slice()).copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
    // Raw loopback stream into a touched buffer, read by a second thread.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut sink = vec![0u8; SIZE];
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let mut total = 0usize;
            loop {
                let at = total % SIZE;
                match s.read(&mut sink[at..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            let _ = s.write_all(&(total as u64).to_le_bytes());
        }
    });
    g.bench_function("raw_socket", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                for piece in src.chunks(CHUNK) {
                    s.write_all(piece).unwrap();
                }
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut ack = [0u8; 8];
                s.read_exact(&mut ack).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn bench_transports(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("transfer");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(SIZE as u64));
    for channel in channels() {
        let cfg = TransportConfig {
            timeout: Duration::from_secs(60),
            ..TransportConfig::default()
        };
        let (a, b) = match (
            transport::open(channel, cfg.clone()),
            transport::open(channel, cfg),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("skipping {channel}: {e}");
                continue;
            }
        };
        let src = Arc::new(HostBuffer::new(SIZE));
        src.fill_pattern(1);
        let dst = Arc::new(HostBuffer::new(SIZE));
        let src_reg = a.register(src.clone(), RemoteAccess::ReadWrite).unwrap();
        let dst_reg = b.register(dst.clone(), RemoteAccess::ReadWrite).unwrap();
        let conn = rt
            .block_on(a.connect(&b.local_descriptor().unwrap()))
            .unwrap();
        let local: Vec<_> = (0..N)
            .map(|i| src_reg.iov(i * CHUNK, CHUNK).unwrap())
            .collect();
        let remote: Vec<RemoteIov> = (0..N)
            .map(|i| RemoteIov {
                region: dst_reg.id(),
                offset: ((N - 1 - i) * CHUNK) as u64,
                len: CHUNK as u64,
            })
            .collect();
        g.bench_function(format!("{channel}_write"), |bch| {
            bch.iter(|| rt.block_on(conn.write(&local, &remote)).unwrap())
        });
        g.bench_function(format!("{channel}_read"), |bch| {
            bch.iter(|| rt.block_on(conn.read(&local, &remote)).unwrap())
        });
        assert_eq!(dst.digest(0, CHUNK), src.digest((N - 1) * CHUNK, CHUNK));
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_baselines(&mut c);
    bench_transports(&mut c);
    c.final_summary();
}

//! Engine benchmarks: key hashing, chunk codec, CPU tier, disk tier, lookup.
//!
//! Every group also times a plain memcpy of the same bytes in the same run; the summary
//! printed at the end gives each benchmark's throughput and its ratio to that memcpy
//! (one thread, and two threads for the CPU tier, whose copies use every core).
//! Run: `cargo bench -p kvtier --bench engine` (add a filter such as `cpu_tier` to run one group).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kvtier::chunk::{decode_chunk, encode_chunk, ChunkHeader};
use kvtier::memory::BufferPool;
use kvtier::tier::disk::DiskTier;
use kvtier::tier::{Chunk, Tier};
use kvtier::{ChunkHasher, Config, Engine, ModelSpec};
use rayon::prelude::*;

const CHUNKS: usize = 30;
const CHUNK_TOKENS: usize = 256;
const TOKENS: usize = CHUNKS * CHUNK_TOKENS;

fn model() -> ModelSpec {
    ModelSpec::llama_3_1_8b()
}

fn tokens() -> Vec<u32> {
    (0..TOKENS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 128_256)
        .collect()
}

fn touched(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate().step_by(4096) {
        *b = i as u8;
    }
    v
}

/// Both ends opaque to the optimiser: the copy cannot be elided as dead.
fn memcpy_1t(dst: &mut [u8], src: &[u8]) {
    black_box(&mut *dst).copy_from_slice(black_box(src));
    black_box(dst);
}

fn memcpy_2t(dst: &mut [u8], src: &[u8]) {
    let piece = src.len().div_ceil(rayon::current_num_threads()).max(1);
    dst.par_chunks_mut(piece)
        .zip(src.par_chunks(piece))
        .for_each(|(d, s)| black_box(d).copy_from_slice(s));
    black_box(dst);
}

fn quick<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g
}

fn bench_hash(c: &mut Criterion) {
    let toks = tokens();
    let hasher = ChunkHasher::new(&model().namespace(CHUNK_TOKENS), 0, true);
    let bytes = (TOKENS * 4) as u64;
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("keys_30_chunks", |b| {
        b.iter(|| hasher.keys(black_box(&toks)))
    });
    let src = touched(bytes as usize);
    let mut dst = touched(bytes as usize);
    g.bench_function("memcpy_1t", |b| {
        b.iter(|| memcpy_1t(&mut dst, black_box(&src)))
    });
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    let m = model();
    let shape = m.chunk_shape(CHUNK_TOKENS);
    let payload = touched(shape.payload_len());
    let key = kvtier::ChunkKey(42);
    let encoded = encode_chunk(key, shape, &payload);
    let mut g = quick(c, "codec");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("encode_header", |b| {
        b.iter(|| ChunkHeader::for_payload(key, shape, black_box(&payload)).encode())
    });
    g.bench_function("decode_verify", |b| {
        b.iter(|| decode_chunk(black_box(&encoded)).map(|(h, _)| h.key))
    });
    let mut dst = touched(payload.len());
    g.bench_function("memcpy_1t", |b| {
        b.iter(|| memcpy_1t(&mut dst, black_box(&payload)))
    });
    g.finish();
}

fn engine(rt: &tokio::runtime::Runtime, disk: Option<&Path>) -> Engine {
    let config = Config {
        max_local_cpu_size: 4 << 30,
        local_disk: disk.map(Path::to_path_buf),
        max_local_disk_size: 4 << 30,
        ..Config::default()
    };
    rt.block_on(Engine::from_config(config, model()))
        .expect("engine")
}

fn bench_cpu_tier(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let eng = engine(&rt, None);
    let toks = tokens();
    let bytes = TOKENS * model().bytes_per_token();
    let kv = touched(bytes);
    let mut out = touched(bytes);
    // Warm the pool so stores copy into touched memory, as in steady state.
    rt.block_on(eng.store(&toks, &kv)).unwrap();
    rt.block_on(eng.clear()).unwrap();

    let mut g = quick(c, "cpu_tier");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("store_copy", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(eng.clear()).unwrap();
                let t = Instant::now();
                rt.block_on(eng.store(&toks, &kv)).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("retrieve_copy", |b| {
        b.iter(|| rt.block_on(eng.retrieve(&toks, &mut out)).unwrap().tokens)
    });
    let spans = eng.chunk_spans(&toks);
    let shape_len = model().chunk_shape(CHUNK_TOKENS).payload_len();
    g.bench_function("store_zero_copy", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(eng.clear()).unwrap();
                let buffers: Vec<_> = spans.iter().map(|_| eng.alloc(shape_len)).collect();
                let t = Instant::now();
                rt.block_on(eng.store_chunks(&toks, buffers)).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("retrieve_zero_copy", |b| {
        b.iter(|| rt.block_on(eng.retrieve_chunks(&toks)).unwrap().len())
    });
    g.bench_function("memcpy_1t", |b| {
        b.iter(|| memcpy_1t(&mut out, black_box(&kv)))
    });
    g.bench_function("memcpy_2t", |b| {
        b.iter(|| memcpy_2t(&mut out, black_box(&kv)))
    });
    g.finish();
}

fn bench_disk_tier(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let pool = BufferPool::new(2 << 30);
    let (tier, _) = DiskTier::open(dir.path(), 4 << 30, 64, pool.clone()).unwrap();
    let m = model();
    let shape = m.chunk_shape(CHUNK_TOKENS);
    let chunks: Vec<_> = (0..CHUNKS)
        .map(|i| {
            let mut data = pool.alloc(shape.payload_len());
            data.fill(i as u8);
            Chunk::new(kvtier::ChunkKey(i as u128 + 1), shape, data).unwrap()
        })
        .collect();
    let bytes = (CHUNKS * shape.payload_len()) as u64;
    let mut g = quick(c, "disk_tier");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("put_flush", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                tier.clear();
                let t = Instant::now();
                for ch in &chunks {
                    tier.put(ch.clone()).unwrap();
                }
                tier.flush();
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("get", |b| {
        b.iter(|| {
            for ch in &chunks {
                black_box(tier.get(ch.key).unwrap().expect("on disk"));
            }
        })
    });
    let src = touched(bytes as usize);
    let mut dst = touched(bytes as usize);
    g.bench_function("memcpy_1t", |b| {
        b.iter(|| memcpy_1t(&mut dst, black_box(&src)))
    });
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let eng = engine(&rt, None);
    let toks = tokens();
    let shape_len = model().chunk_shape(CHUNK_TOKENS).payload_len();
    let buffers: Vec<_> = (0..CHUNKS).map(|_| eng.alloc(shape_len)).collect();
    rt.block_on(eng.store_chunks(&toks, buffers)).unwrap();
    let mut g = c.benchmark_group("lookup");
    g.bench_function("lookup_30_chunks", |b| {
        b.iter(|| rt.block_on(eng.lookup(black_box(&toks))).unwrap())
    });
    g.finish();
}

/// The master's cost per batch: PutStart + PutEnd + Get of 30 objects on 3 segments
/// holding 100,000 objects (placement only; no bytes move).
fn bench_placement(c: &mut Criterion) {
    use kvtier::remote::rpc::{ObjectMeta, SegmentInfo};
    use kvtier::remote::store::placement::{NodeUpdate, Placement, PlacementConfig};
    use std::time::Instant;
    let mut p = Placement::new(PlacementConfig::default());
    for id in 1..=3 {
        p.add_segment(
            SegmentInfo {
                id,
                name: format!("n{id}"),
                control: String::new(),
                protocol: "tcp".into(),
                descriptor: vec![],
                region: 0,
                size: 1 << 44,
            },
            &[],
            Instant::now(),
        );
    }
    let meta = ObjectMeta {
        len: 32 << 20,
        checksum: 0,
    };
    let now = Instant::now();
    let mut updates: Vec<NodeUpdate> = Vec::new();
    let fill: Vec<_> = (0..100_000u128).map(|k| (k, meta)).collect();
    let slots = p.put_start(&fill, 1, now, &mut updates);
    p.put_end(&puts_of(&fill, &slots), true, &mut updates);
    assert_eq!(p.stats().objects, 100_000, "placement bench: fill failed");
    let mut next = 1u128 << 64;
    let mut g = c.benchmark_group("placement");
    g.bench_function("put_get_remove_30_objects", |b| {
        b.iter(|| {
            let objects: Vec<_> = (0..30).map(|i| (next + i, meta)).collect();
            let keys: Vec<u128> = objects.iter().map(|o| o.0).collect();
            next += 30;
            updates.clear();
            let slots = p.put_start(&objects, 2, now, &mut updates);
            black_box(p.put_end(&puts_of(&objects, &slots), true, &mut updates));
            black_box(p.get(&keys, now));
            // After the read lease: the ranges are freed at once.
            let later = now + std::time::Duration::from_secs(10);
            black_box(p.remove(&keys, later, &mut updates));
        })
    });
    g.finish();
}

/// The (key, put id) pairs of the puts `slots` granted.
fn puts_of(
    objects: &[(u128, kvtier::remote::rpc::ObjectMeta)],
    slots: &[kvtier::remote::rpc::PutSlot],
) -> Vec<(u128, u64)> {
    objects
        .iter()
        .zip(slots)
        .filter_map(|((k, _), s)| match s {
            kvtier::remote::rpc::PutSlot::Write { put, .. } => Some((*k, *put)),
            _ => None,
        })
        .collect()
}

/// Mean time of a finished benchmark, from criterion's saved estimates.
fn mean_ns(group: &str, bench: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = Path::new(&dir)
        .join("criterion")
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn summary() {
    let gib = |bytes: f64, ns: f64| bytes / ns * 1e9 / (1u64 << 30) as f64;
    let chunk = model().chunk_shape(CHUNK_TOKENS).payload_len() as f64;
    let big = CHUNKS as f64 * chunk;
    let rows: [(&str, &str, f64, &str); 11] = [
        ("hash", "keys_30_chunks", (TOKENS * 4) as f64, "memcpy_1t"),
        ("codec", "encode_header", chunk, "memcpy_1t"),
        ("codec", "decode_verify", chunk, "memcpy_1t"),
        ("cpu_tier", "store_copy", big, "memcpy_2t"),
        ("cpu_tier", "retrieve_copy", big, "memcpy_2t"),
        ("cpu_tier", "store_copy", big, "memcpy_1t"),
        ("cpu_tier", "retrieve_copy", big, "memcpy_1t"),
        ("disk_tier", "put_flush", big, "memcpy_1t"),
        ("disk_tier", "get", big, "memcpy_1t"),
        ("cpu_tier", "store_zero_copy", big, "memcpy_2t"),
        ("cpu_tier", "retrieve_zero_copy", big, "memcpy_2t"),
    ];
    println!("\nkvtier bench summary (GiB/s = 2^30 bytes/s; ratio = bench / same-run memcpy)");
    println!(
        "{:<30} {:>12} {:>10} {:>18} {:>8}",
        "benchmark", "mean", "GiB/s", "baseline GiB/s", "ratio"
    );
    for (group, bench, bytes, base) in rows {
        let (Some(t), Some(tb)) = (mean_ns(group, bench), mean_ns(group, base)) else {
            continue;
        };
        println!(
            "{:<30} {:>9.3} ms {:>10.2} {:>9.2} ({base}) {:>7.1}%",
            format!("{group}/{bench}"),
            t / 1e6,
            gib(bytes, t),
            gib(bytes, tb),
            100.0 * tb / t
        );
    }
    if let Some(t) = mean_ns("hash", "keys_30_chunks") {
        println!(
            "hash: {:.0} M tokens/s, {:.2} µs per 30 chunks",
            TOKENS as f64 / t * 1e3,
            t / 1e3
        );
    }
    for (group, bench, what) in [
        (
            "cpu_tier",
            "store_zero_copy",
            "bookkeeping per 30-chunk store (zero-copy store)",
        ),
        (
            "cpu_tier",
            "retrieve_zero_copy",
            "bookkeeping per 30-chunk retrieve (zero-copy)",
        ),
        (
            "lookup",
            "lookup_30_chunks",
            "30-chunk lookup (hashing included)",
        ),
        (
            "placement",
            "put_get_remove_30_objects",
            "remote-store master: PutStart+PutEnd+Get+Remove of 30 objects, 100k stored",
        ),
    ] {
        if let Some(t) = mean_ns(group, bench) {
            println!("{what}: {:.2} µs", t / 1e3);
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_hash(&mut c);
    bench_codec(&mut c);
    bench_cpu_tier(&mut c);
    bench_disk_tier(&mut c);
    bench_lookup(&mut c);
    bench_placement(&mut c);
    c.final_summary();
    summary();
}

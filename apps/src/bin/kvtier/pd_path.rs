//! `kvtier bench pd`: the P/D path alone, measured against the raw transfer of the same
//! bytes over the same transport in the same run.
//!
//! A receiver (decoder side) and a sender (prefiller side) run in this process, each with
//! its own transport endpoint and control connections over 127.0.0.1, with a proxy
//! notification listener. The KV is SYNTHETIC and generated once before any timing (every
//! request sends the same bytes under its own token ids, so every chunk is new to the
//! receiver): the bench measures kvtier, not a stand-in engine making KV.
//!
//! 1. Baselines: memcpy of the request's bytes, then the transport's own write of the same
//!    bytes in the same chunk-sized ranges between two endpoints (no P/D protocol), alone
//!    and beside the two checksum passes of a verified transfer (the sender's over the
//!    source, the receiver's over the destination).
//! 2. One level per `--concurrency N`: N workers send requests back to back; after each
//!    send a worker takes the KV out of the receiver's buffer as a decoder would (the first
//!    request of a level is copied out and compared byte for byte; the rest are freed
//!    without a copy). The receiver's buffer is the only back-pressure.
//! 3. Overlap: requests whose KV a stand-in prefill finishes chunk by chunk at
//!    `--prefill-tokens-per-sec` (it sleeps; a GPU's prefill leaves the CPU alone), sent
//!    with [`PdSender::send_progressive`]; the transfer left after prefill ends is the
//!    exposed transfer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kvtier::config::{Config, PdRole, TransferChannel};
use kvtier::metrics::{gb_per_s, Metrics};
use kvtier::model::ModelSpec;
use kvtier::pd::{PdReceiver, PdSender, PlanarKv, ProxyListener, ReceiverSpec, SendReport};
use kvtier::transport::{self, HostBuffer, RemoteAccess, RemoteIov, TransportConfig};
use kvtier_cli::synthetic;

use crate::pd_cluster::stats;
use crate::transfer::{memcpy_times, parse_channel, parse_size};

/// Arguments of `kvtier bench pd`.
#[derive(Args, Clone)]
pub struct PdPathArgs {
    /// Transport between prefiller and decoder: tcp, ucx or nixl.
    #[arg(long, value_parser = parse_channel, default_value = "tcp")]
    transport: TransferChannel,
    /// Concurrent requests: one level per value, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    concurrency: Vec<usize>,
    /// Requests per level (raised to the level's concurrency).
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 7500)]
    input_len: usize,
    /// Transformer layers of the synthetic model (32 = Llama-3.1-8B, 128 KiB per token).
    #[arg(long, default_value_t = 32)]
    layers: u32,
    /// The decoder's P/D buffer (`pd_buffer_size` of the receiver).
    #[arg(long, value_parser = parse_size, default_value = "4GiB")]
    decoder_buffer: u64,
    /// The prefiller's staging buffer (`pd_buffer_size` of the sender).
    #[arg(long, value_parser = parse_size, default_value = "512MiB")]
    prefiller_buffer: u64,
    /// Speed of the stand-in prefill for the overlap run, in tokens per second (0 skips
    /// the run; 15,000 is an 8B model's long-prompt prefill on one current GPU).
    #[arg(long, default_value_t = 15_000.0)]
    prefill_tokens_per_sec: f64,
    /// Requests of the overlap run.
    #[arg(long, default_value_t = 5)]
    overlap_requests: usize,
    /// Timed iterations of each baseline.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Where the concurrency levels send from: `registered` (the KV lies in memory
    /// registered with the sender's transport, written without a copy:
    /// `PdSender::send_registered`) or `staging` (gathered into the prefiller's staging
    /// buffer: `PdSender::send`).
    #[arg(long, value_parser = ["registered", "staging"], default_value = "registered")]
    kv_source: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &[f64]) -> f64 {
    stats(v).1
}

/// Median of `f` over `reports`, in ms.
fn phase(reports: &[SendReport], f: impl Fn(&SendReport) -> Duration) -> f64 {
    median(&reports.iter().map(|r| ms(f(r))).collect::<Vec<_>>())
}

fn model(layers: u32) -> ModelSpec {
    ModelSpec {
        layers,
        ..ModelSpec::llama_3_1_8b()
    }
}

/// Receiver and sender of one run, with the proxy listener the sender notifies.
struct Pair {
    receiver: PdReceiver,
    sender: PdSender,
    proxy: ProxyListener,
    to: ReceiverSpec,
}

async fn pair(args: &PdPathArgs, model: &ModelSpec) -> anyhow::Result<Pair> {
    let proxy = ProxyListener::bind("127.0.0.1", 0, None).await?;
    let receiver_cfg = Config {
        enable_pd: true,
        pd_role: Some(PdRole::Receiver),
        transfer_channel: args.transport,
        pd_peer_host: Some("127.0.0.1".into()),
        pd_peer_init_port: vec![0],
        pd_peer_alloc_port: vec![0],
        pd_buffer_size: args.decoder_buffer,
        // A full buffer delays a request that fits; it must not fail it.
        pd_allocation_timeout_sec: 600.0,
        transport_timeout_sec: 60.0,
        ..Config::default()
    };
    let sender_cfg = Config {
        enable_pd: true,
        pd_role: Some(PdRole::Sender),
        transfer_channel: args.transport,
        pd_proxy_host: Some("127.0.0.1".into()),
        pd_proxy_port: Some(proxy.local_addr().port()),
        pd_buffer_size: args.prefiller_buffer,
        transport_timeout_sec: 60.0,
        ..Config::default()
    };
    let receiver = PdReceiver::start(
        &receiver_cfg.pd_receiver_settings(),
        model.clone(),
        Metrics::new(),
    )
    .await
    .context("starting the receiver")?;
    let sender = PdSender::new(
        &sender_cfg.pd_sender_settings(),
        model.clone(),
        Metrics::new(),
    )
    .await
    .context("starting the sender")?;
    let (init_port, alloc_port) = receiver.ports();
    Ok(Pair {
        receiver,
        sender,
        proxy,
        to: ReceiverSpec {
            host: "127.0.0.1".into(),
            init_port,
            alloc_port,
        },
    })
}

/// Median time of a memcpy of `bytes` bytes that the optimiser cannot elide.
fn memcpy_median(bytes: usize, iterations: usize) -> Duration {
    let mut times = memcpy_times(bytes, iterations);
    times.sort();
    times[times.len() / 2]
}

/// Times of the transport's own write of `bytes` bytes in `piece`-sized ranges (scattered,
/// as chunks land in a P/D buffer) between two endpoints of this process, checked once:
/// `(alone, beside checksums)`, the two kinds interleaved so that both meet the same
/// machine. Beside checksums, the write runs beside the two xxh3 passes a verified
/// transfer makes (one over the source, one over as many bytes standing in for the
/// destination, which is being written meanwhile; piece by piece, on threads of their
/// own), and its time lasts until all three have ended: the floor of any design that
/// hashes the bytes in memory on both sides, as the P/D path does.
async fn raw_transfer(
    channel: TransferChannel,
    bytes: usize,
    piece: usize,
    iterations: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let config = || TransportConfig {
        timeout: Duration::from_secs(60),
        auth_token: None,
        host: "127.0.0.1".into(),
    };
    let receiver = transport::open(channel, config())?;
    let dst = Arc::new(HostBuffer::new(bytes));
    let _dst_reg = receiver.register(dst.clone(), RemoteAccess::ReadWrite)?;
    let descriptor = receiver.local_descriptor()?;
    let sender = transport::open(channel, config())?;
    let src = Arc::new(HostBuffer::new(bytes));
    src.fill_pattern(0x6b76);
    // The destination pass reads these: the same number of bytes, none of them in flight.
    let stand_in = Arc::new(HostBuffer::new(bytes));
    stand_in.fill_pattern(0x7464);
    let src_reg = sender.register(src.clone(), RemoteAccess::LocalOnly)?;
    let conn = sender.connect(&descriptor).await?;
    let region = kvtier_transport::Descriptor::decode(&descriptor, sender.kind())?
        .regions
        .first()
        .context("the raw receiver offers no region")?
        .id;
    let n = bytes.div_ceil(piece);
    let len = move |i: usize| piece.min(bytes - i * piece);
    let local = (0..n)
        .map(|i| src_reg.iov(i * piece, len(i)))
        .collect::<Result<Vec<_>, _>>()?;
    // Whole piece i at the mirrored slot among the whole pieces; a short last piece stays
    // last to keep it in bounds.
    let whole = bytes / piece;
    let remote: Vec<RemoteIov> = (0..n)
        .map(|i| {
            let slot = if i < whole { whole - 1 - i } else { i };
            RemoteIov {
                region,
                offset: (slot * piece) as u64,
                len: len(i) as u64,
            }
        })
        .collect();
    // Untimed: the data stream connects on first use.
    conn.write(&local, &remote).await?;
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    for round in 0..2 * iterations.max(1) {
        let checksums = round % 2 == 1;
        let t = Instant::now();
        let passes: Vec<_> = if checksums {
            [src.clone(), stand_in.clone()]
                .into_iter()
                .map(|buffer| {
                    tokio::task::spawn_blocking(move || {
                        (0..n)
                            .map(|i| buffer.digest(i * piece, len(i)))
                            .fold(0u64, |acc, d| acc ^ d)
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        conn.write(&local, &remote).await?;
        for pass in passes {
            std::hint::black_box(pass.await.context("checksum pass")?);
        }
        if checksums { &mut beside } else { &mut alone }.push(t.elapsed());
    }
    for (i, r) in remote.iter().enumerate() {
        if dst.digest(r.offset as usize, r.len as usize) != src.digest(i * piece, len(i)) {
            bail!("raw {channel} transfer: piece {i} arrived damaged");
        }
    }
    Ok((alone, beside))
}

/// Token ids of request `i` of a run (distinct per request, so no chunk is shared).
fn request_tokens(run: u64, i: usize, n: usize) -> Vec<u32> {
    synthetic::token_ids(run.wrapping_mul(1_000_003).wrapping_add(i as u64), n)
}

/// What one level measured.
struct Level {
    concurrency: usize,
    reports: Vec<SendReport>,
    wall: Duration,
    bytes: u64,
}

/// Takes request `req`'s KV out of the receiver as a decoder would: copied out and checked
/// against `kv` when `check`, else freed without a copy.
async fn consume(
    pair: &Pair,
    req: &str,
    tokens: &[u32],
    kv: &[u8],
    check: bool,
) -> anyhow::Result<()> {
    if check {
        let mut out = vec![0u8; kv.len()];
        let n = pair.receiver.retrieve(req, tokens, &mut out).await?;
        if n != tokens.len() || out != kv {
            bail!(
                "request {req}: the receiver holds {n} of {} tokens, or different bytes",
                tokens.len()
            );
        }
    } else {
        let n = pair.receiver.retrieve_with(req, tokens, |_, _| {});
        if n != tokens.len() {
            bail!(
                "request {req}: the receiver holds {n} of {} tokens",
                tokens.len()
            );
        }
    }
    Ok(())
}

async fn run_level(
    pair: &Arc<Pair>,
    kv: &Arc<Vec<u8>>,
    registered: &Option<Arc<PlanarKv>>,
    args: &PdPathArgs,
    run: u64,
    concurrency: usize,
) -> anyhow::Result<Level> {
    let requests = args.requests.max(concurrency);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (pair, kv, next) = (pair.clone(), kv.clone(), next.clone());
        let registered = registered.clone();
        let input_len = args.input_len;
        workers.push(tokio::spawn(async move {
            let mut reports = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return anyhow::Ok(reports);
                }
                let req = format!("bench-{run}-{i}");
                let tokens = request_tokens(run, i, input_len);
                let report = match &registered {
                    Some(r) => {
                        pair.sender
                            .send_registered(&req, &tokens, r.as_ref(), &pair.to)
                            .await?
                    }
                    None => pair.sender.send(&req, &tokens, &kv, &pair.to).await?,
                };
                pair.proxy.wait(&req, Duration::from_secs(60)).await?;
                consume(&pair, &req, &tokens, &kv, i == 0).await?;
                reports.push(report);
            }
        }));
    }
    let mut reports = Vec::new();
    for w in workers {
        reports.extend(w.await.context("bench worker")??);
    }
    let wall = start.elapsed();
    let bytes = reports.iter().map(|r| r.bytes).sum();
    Ok(Level {
        concurrency,
        reports,
        wall,
        bytes,
    })
}

/// One request whose KV the stand-in prefill finishes chunk by chunk: (report, exposed
/// transfer after prefill ended).
async fn overlapped(
    pair: &Pair,
    kv: &[u8],
    tokens: &[u32],
    req: &str,
    tokens_per_sec: f64,
    chunk: usize,
) -> anyhow::Result<(SendReport, Duration)> {
    let total = tokens.len();
    let (ready, watch) = tokio::sync::watch::channel(0usize);
    let prefill = tokio::spawn(async move {
        let start = Instant::now();
        let mut done = 0;
        while done < total {
            done = (done + chunk).min(total);
            let due = start + Duration::from_secs_f64(done as f64 / tokens_per_sec);
            tokio::time::sleep_until(due.into()).await;
            let _ = ready.send(done);
        }
        Instant::now()
    });
    let fill = pair.sender.gather_from(kv, total);
    let report = pair
        .sender
        .send_progressive(req, tokens, fill, watch, &pair.to)
        .await?;
    let sent = Instant::now();
    let prefill_end = prefill.await.context("stand-in prefill")?;
    pair.proxy.wait(req, Duration::from_secs(60)).await?;
    consume(pair, req, tokens, kv, false).await?;
    Ok((report, sent.saturating_duration_since(prefill_end)))
}

pub fn run_bench(args: PdPathArgs) -> anyhow::Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency takes positive counts, e.g. 1,8,64");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(bench(args))
}

async fn bench(args: PdPathArgs) -> anyhow::Result<()> {
    let model = model(args.layers);
    let chunk_tokens = Config::default().chunk_size;
    let bytes = model.bytes_per_token() * args.input_len;
    let page = model.bytes_per_token() * chunk_tokens;
    println!(
        "kvtier bench pd: the P/D path over {} in one process, {} tokens per request ({:.2} GB of KV, {} chunks of {} MiB); KV is SYNTHETIC, generated once before timing",
        args.transport,
        args.input_len,
        bytes as f64 / 1e9,
        args.input_len.div_ceil(chunk_tokens),
        page >> 20
    );
    let kv = Arc::new(synthetic::kv_for_tokens(
        &model,
        &request_tokens(0, 0, args.input_len),
    ));

    // 1. Baselines.
    let memcpy = memcpy_median(bytes, args.iterations);
    let (raw_times, verified_times) =
        raw_transfer(args.transport, bytes, page, args.iterations).await?;
    let raw_ms: Vec<f64> = raw_times.iter().map(|&d| ms(d)).collect();
    let (_, raw_med, raw_p99) = stats(&raw_ms);
    let verified_ms: Vec<f64> = verified_times.iter().map(|&d| ms(d)).collect();
    let (_, verified_med, _) = stats(&verified_ms);
    let memcpy_gbs = gb_per_s(bytes as u64, memcpy);
    let raw_gbs = bytes as f64 / (raw_med * 1e-3) / 1e9;
    println!("\nbaselines (same bytes, this run)");
    println!(
        "  memcpy, 1 thread                 {:>8.1} ms  {memcpy_gbs:>6.2} GB/s",
        ms(memcpy)
    );
    println!(
        "  raw {} write, same ranges       {raw_med:>8.1} ms  {raw_gbs:>6.2} GB/s  (p99 {raw_p99:.1} ms)",
        args.transport
    );
    println!(
        "  raw {} write beside two checksum  {verified_med:>6.1} ms  (xxh3 over the source and over as many bytes for the destination, as the P/D path verifies)",
        args.transport
    );
    // One thread copies a few to some tens of GB/s; a transport between two endpoints of
    // one host moves at most a few times a memcpy. Outside that, a baseline was mis-measured.
    let plausible =
        (0.5..=200.0).contains(&memcpy_gbs) && raw_gbs > 0.01 && raw_gbs < 8.0 * memcpy_gbs;
    if !plausible {
        println!("  (a baseline is implausible: no ratios printed)");
    }
    // The floor holds the same write, measured in turn with it, so beyond noise it cannot
    // take less than the write alone. Its excess over the write is what the checksums
    // cost: no bound on that.
    let floor_plausible = verified_med >= 0.5 * raw_med;
    if plausible && !floor_plausible {
        println!(
            "  (the write beside the checksums is implausible next to the raw write: no ratio to it printed)"
        );
    }

    // 2. Concurrency levels.
    let pair = Arc::new(pair(&args, &model).await?);
    // The KV once more, in memory registered with the sender's transport.
    let registered = if args.kv_source == "registered" {
        let memory = Arc::new(HostBuffer::new(bytes));
        memory.write_at(0, &kv);
        let registration = pair.sender.register_kv(memory)?;
        Some(Arc::new(pair.sender.planar_kv(
            registration,
            0,
            args.input_len,
        )?))
    } else {
        None
    };
    println!(
        "\nP/D path, sending from {}",
        if registered.is_some() {
            "registered memory (PdSender::send_registered: no staging copy)"
        } else {
            "the staging buffer (PdSender::send: gather into staging)"
        }
    );
    // Warm-up: connections, registrations, first faults.
    let warm = request_tokens(1 << 40, 0, args.input_len);
    pair.sender.send("warm-up", &warm, &kv, &pair.to).await?;
    pair.proxy.wait("warm-up", Duration::from_secs(60)).await?;
    consume(&pair, "warm-up", &warm, &kv, true).await?;
    let mut levels = Vec::new();
    for (run, &n) in args.concurrency.iter().enumerate() {
        let level = run_level(&pair, &kv, &registered, &args, run as u64 + 1, n).await?;
        let t: Vec<f64> = level.reports.iter().map(|r| ms(r.elapsed)).collect();
        let (_, med, p99) = stats(&t);
        println!(
            "  concurrency {n:>3}: {} requests in {:.2} s, {:.2} GB/s aggregate; per request median {med:.1} ms, p99 {p99:.1} ms",
            level.reports.len(),
            level.wall.as_secs_f64(),
            gb_per_s(level.bytes, level.wall)
        );
        levels.push(level);
    }

    println!(
        "\nwhere a request's time goes (medians, ms; staging overlaps the previous wave's write; \
         w.wait: waiting for writes, c.wait: for commit answers)"
    );
    println!(
        "  {:>5} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6}",
        "conc",
        "transfer",
        "alloc",
        "staging",
        "stage",
        "write",
        "w.wait",
        "c.wait",
        "notify",
        "waves"
    );
    for l in &levels {
        let r = &l.reports;
        println!(
            "  {:>5} {:>9.1} {:>7.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>6.0}",
            l.concurrency,
            phase(r, |r| r.elapsed),
            phase(r, |r| r.alloc),
            phase(r, |r| r.staging_wait),
            phase(r, |r| r.stage),
            phase(r, |r| r.write),
            phase(r, |r| r.write_wait),
            phase(r, |r| r.commit),
            phase(r, |r| r.notify),
            median(&r.iter().map(|r| r.waves as f64).collect::<Vec<_>>()),
        );
    }

    // 3. Overlap with a stand-in prefill.
    let mut exposed_line = None;
    if args.prefill_tokens_per_sec > 0.0 {
        let mut exposed = Vec::new();
        for i in 0..args.overlap_requests.max(1) {
            let tokens = request_tokens(999, i, args.input_len);
            let req = format!("overlap-{i}");
            let (_, e) = overlapped(
                &pair,
                &kv,
                &tokens,
                &req,
                args.prefill_tokens_per_sec,
                chunk_tokens,
            )
            .await?;
            exposed.push(ms(e));
        }
        let (_, med, p99) = stats(&exposed);
        exposed_line = Some((med, p99));
        println!(
            "\noverlap: stand-in prefill at {:.0} tokens/s ({:.0} ms per request); transfer left after prefill ended: median {med:.1} ms, p99 {p99:.1} ms",
            args.prefill_tokens_per_sec,
            args.input_len as f64 / args.prefill_tokens_per_sec * 1e3
        );
    }

    println!("\nsummary (P/D path over {})", args.transport);
    let first = &levels[0];
    let t1: Vec<f64> = first.reports.iter().map(|r| ms(r.elapsed)).collect();
    let (_, med1, p991) = stats(&t1);
    if plausible {
        if first.concurrency == 1 {
            println!(
                "  transfer at concurrency 1: median {med1:.1} ms = {:.2}x the raw transfer (target <= 1.10); p99/median {:.2} (target <= 1.5)",
                med1 / raw_med,
                p991 / med1
            );
            if floor_plausible {
                println!(
                    "  the same median = {:.2}x the raw write beside both checksum passes (what the protocol adds to a verified transfer)",
                    med1 / verified_med
                );
            }
        }
        let base = first.wall.as_secs_f64() / first.bytes.max(1) as f64;
        for l in &levels[1..] {
            let cost = l.wall.as_secs_f64() / l.bytes.max(1) as f64;
            println!(
                "  cost per byte at concurrency {} = {:.2}x concurrency {} (target <= 1.25)",
                l.concurrency,
                cost / base,
                first.concurrency
            );
        }
        if let Some((med, p99)) = exposed_line {
            println!(
                "  exposed transfer: median {med:.1} ms = {:.1}% of the transfer at concurrency {} (target <= 10%); p99 {p99:.1} ms",
                100.0 * med / med1,
                first.concurrency
            );
        }
    }
    Ok(())
}

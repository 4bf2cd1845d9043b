//! `kvtier demo`: the engine end to end on local tiers, with synthetic KV.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kvtier::metrics::gb_per_s;
use kvtier::{Config, Engine, ModelSpec};
use kvtier_cli::synthetic::{kv_for_tokens, token_ids};

/// Arguments of `kvtier demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Configuration (the demo's disk directory replaces its `local_disk`).
    #[arg(long, default_value = "configs/demo.yaml")]
    config: PathBuf,
    /// Directory for the disk tier (default: a fresh temporary directory, removed at the end).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Prompts that share the prefix.
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Tokens of the shared prefix.
    #[arg(long, default_value_t = 2048)]
    prefix_tokens: usize,
    /// Tokens after the prefix, per prompt.
    #[arg(long, default_value_t = 1124)]
    suffix_tokens: usize,
}

/// Totals of one kind of operation.
#[derive(Default)]
struct Totals {
    calls: usize,
    tokens: usize,
    hit_tokens: usize,
    bytes: u64,
    time: Duration,
}

impl Totals {
    fn add(&mut self, tokens: usize, hit_tokens: usize, bytes: u64, time: Duration) {
        self.calls += 1;
        self.tokens += tokens;
        self.hit_tokens += hit_tokens;
        self.bytes += bytes;
        self.time += time;
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: DemoArgs) -> anyhow::Result<()> {
    let mut config = Config::from_yaml_file(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    config.apply_env(std::env::vars())?;
    let tmp;
    let disk_dir = match &args.disk {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.0.clone()
        }
    };
    config.local_disk = Some(disk_dir.clone());
    if config.max_local_disk_size == 0 {
        config.max_local_disk_size = 4 << 30;
    }
    let model = ModelSpec::llama_3_1_8b();
    let chunk = config.chunk_size;

    println!("kvtier demo");
    println!(
        "  model shape : {} ({} layers x {} KV heads x {} head dim, {}, {} KiB/token)",
        model.name,
        model.layers,
        model.kv_heads,
        model.head_dim,
        model.dtype,
        model.bytes_per_token() / 1024
    );
    println!("  KV bytes    : SYNTHETIC (pseudo-random, derived from token ids; no model ran)");
    println!(
        "  tiers       : cpu {:.2} GiB LRU -> disk {} ({:.1} GiB); chunk {chunk} tokens ({} MiB)",
        gib(config.max_local_cpu_size),
        disk_dir.display(),
        gib(config.max_local_disk_size),
        (model.bytes_per_token() * chunk) >> 20
    );

    let prefix = token_ids(1, args.prefix_tokens);
    let prompts: Vec<Vec<u32>> = (0..args.prompts)
        .map(|i| {
            let mut p = prefix.clone();
            p.extend(token_ids(100 + i as u64, args.suffix_tokens));
            p
        })
        .collect();
    let t = Instant::now();
    let kvs: Vec<Vec<u8>> = prompts.iter().map(|p| kv_for_tokens(&model, p)).collect();
    println!(
        "  workload    : {} prompts of {} tokens sharing a {}-token prefix; {:.2} GiB of KV generated in {:.2} s",
        prompts.len(),
        args.prefix_tokens + args.suffix_tokens,
        args.prefix_tokens,
        gib(kvs.iter().map(|k| k.len() as u64).sum()),
        t.elapsed().as_secs_f64()
    );

    let engine = Engine::from_config(config.clone(), model.clone()).await?;
    let (mut store, mut lookup, mut retrieve, mut lookup2, mut retrieve2) = Default::default();

    println!("\n[1] store");
    for (i, (p, kv)) in prompts.iter().zip(&kvs).enumerate() {
        let r = engine.store(p, kv).await?;
        println!(
            "  prompt {i}: {} new tokens, {} already cached, {:.1} ms, {:.2} GB/s",
            r.stored_tokens,
            r.cached_tokens,
            ms(r.elapsed),
            gb_per_s(r.bytes, r.elapsed)
        );
        Totals::add(&mut store, p.len(), r.stored_tokens, r.bytes, r.elapsed);
    }
    engine.flush().await?;

    println!("\n[2] lookup");
    for (i, p) in prompts.iter().enumerate() {
        let t = Instant::now();
        let hit = engine.lookup(p).await?;
        Totals::add(&mut lookup, p.len(), hit, 0, t.elapsed());
        println!("  prompt {i}: {hit} of {} tokens cached", p.len());
        expect_hit(&engine, p, hit)?;
    }
    let mut novel = prefix.clone();
    novel.extend(token_ids(999, 700));
    let hit = engine.lookup(&novel).await?;
    println!(
        "  a new prompt with the same prefix: {hit} of {} tokens cached (the shared prefix, whole chunks)",
        novel.len()
    );
    if hit != args.prefix_tokens / chunk * chunk {
        bail!("expected the prefix's whole chunks to hit, got {hit} tokens");
    }

    println!("\n[3] retrieve and verify every byte");
    verify_all(&engine, &prompts, &kvs, &mut retrieve).await?;
    print_tiers(&engine);

    println!("\n[4] restart from the disk tier");
    drop(engine);
    let t = Instant::now();
    let engine = Engine::from_config(config, model.clone()).await?;
    let rec = engine.recovered().unwrap_or_default();
    println!(
        "  reopened in {:.1} ms: {} chunks ({:.2} GiB) recovered, {} discarded",
        ms(t.elapsed()),
        rec.chunks,
        gib(rec.bytes),
        rec.discarded
    );
    for (i, p) in prompts.iter().enumerate() {
        let t = Instant::now();
        let hit = engine.lookup(p).await?;
        Totals::add(&mut lookup2, p.len(), hit, 0, t.elapsed());
        println!(
            "  prompt {i}: {hit} of {} tokens cached after restart",
            p.len()
        );
        expect_hit(&engine, p, hit)?;
    }
    verify_all(&engine, &prompts, &kvs, &mut retrieve2).await?;
    print_tiers(&engine);

    println!("\nsummary (GB = 10^9 bytes)");
    println!(
        "  {:<22} {:>5} {:>8} {:>10} {:>9} {:>10} {:>9}",
        "operation", "calls", "tokens", "hit tokens", "GB", "time ms", "GB/s"
    );
    for (name, t) in [
        ("store", &store),
        ("lookup", &lookup),
        ("retrieve", &retrieve),
        ("lookup after restart", &lookup2),
        ("retrieve after restart", &retrieve2),
    ] {
        let rate = if t.bytes > 0 {
            format!("{:.2}", gb_per_s(t.bytes, t.time))
        } else {
            "-".into()
        };
        println!(
            "  {:<22} {:>5} {:>8} {:>10} {:>9.3} {:>10.2} {:>9}",
            name,
            t.calls,
            t.tokens,
            t.hit_tokens,
            t.bytes as f64 / 1e9,
            ms(t.time),
            rate
        );
    }
    println!("all retrieved KV verified byte for byte (synthetic KV).");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn expect_hit(engine: &Engine, tokens: &[u32], hit: usize) -> anyhow::Result<()> {
    let chunk = engine.settings().keys.chunk_size;
    let expected = if engine.settings().keys.save_unfull_chunk {
        tokens.len()
    } else {
        tokens.len() / chunk * chunk
    };
    if hit != expected {
        bail!("lookup found {hit} cached tokens, expected {expected}");
    }
    Ok(())
}

async fn verify_all(
    engine: &Engine,
    prompts: &[Vec<u32>],
    kvs: &[Vec<u8>],
    totals: &mut Totals,
) -> anyhow::Result<()> {
    let hits = |e: &Engine, tier: &str| e.metrics().tier_hits.with_label_values(&[tier]).get();
    // The destination stands in for a server's KV buffer: allocated and touched once, as
    // a real one is, so the timings below are the engine's and not page faults.
    let mut buffer = vec![0xffu8; kvs.iter().map(Vec::len).max().unwrap_or(0)];
    for (i, (p, kv)) in prompts.iter().zip(kvs).enumerate() {
        let (cpu0, disk0) = (hits(engine, "cpu"), hits(engine, "disk"));
        let out = &mut buffer[..kv.len()];
        let r = engine.retrieve(p, out).await?;
        let loaded = r.tokens * engine.model().bytes_per_token();
        if out[..loaded] != kv[..loaded] {
            bail!("prompt {i}: retrieved KV differs from what was stored");
        }
        expect_hit(engine, p, r.tokens)?;
        println!(
            "  prompt {i}: {} tokens, {:.1} ms, {:.2} GB/s, chunks from cpu {} / disk {} - verified",
            r.tokens,
            ms(r.elapsed),
            gb_per_s(r.bytes, r.elapsed),
            hits(engine, "cpu") - cpu0,
            hits(engine, "disk") - disk0
        );
        totals.add(p.len(), r.tokens, r.bytes, r.elapsed);
    }
    Ok(())
}

fn print_tiers(engine: &Engine) {
    for (kind, u) in engine.usage() {
        println!(
            "  {kind} tier: {} chunks, {:.2} of {:.2} GiB, {} evictions",
            u.objects,
            gib(u.used_bytes),
            gib(u.capacity_bytes),
            u.evictions
        );
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
    let dir = std::env::temp_dir().join(format!("kvtier-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(TempDir(dir))
}

//! `kvtier master`, `kvtier store-node`, `kvtier bench remote`, and the engine process the
//! remote-store tests drive (`kvtier remote-probe`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kvtier::config::TransferChannel;
use kvtier::memory::BufferPool;
use kvtier::remote::etcd::Etcd;
use kvtier::remote::store::master::{MasterConfig, MasterServer};
use kvtier::remote::store::node::{NodeConfig, StoreNode};
use kvtier::remote::store::placement::PlacementConfig;
use kvtier::remote::RemoteTier;
use kvtier::transport::TransportConfig;
use kvtier::{Config, Engine, ModelSpec};
use kvtier_cli::synthetic;

use crate::transfer::{parse_channel, parse_size};

/// Arguments of `kvtier master`.
#[derive(Args)]
pub struct MasterArgs {
    /// Address to listen on (loopback by default: other hosts need `--listen 0.0.0.0:50051`
    /// or an interface address, and should share a `--auth-token`).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Address clients should use (published in etcd); default: the listen address.
    #[arg(long)]
    advertise: Option<String>,
    /// etcd for leader election and membership (`etcd://[user[:password]@]host:port[/cluster]`;
    /// over TLS `etcds://…?cacert=ca.pem&cert=client.pem&key=client-key.pem`). Without
    /// it the master runs alone and needs `--segment-size` (embedded mode).
    #[arg(long, alias = "metadata-server")]
    etcd: Option<String>,
    /// Leader lease TTL in seconds: a dead leader is replaced within about this long.
    #[arg(long, default_value_t = 5)]
    lease_ttl: u64,
    /// Memory segment this process contributes itself (embedded mode, no etcd).
    #[arg(long, value_parser = parse_size)]
    segment_size: Option<u64>,
    /// Transport of the embedded segment.
    #[arg(long, value_parser = parse_channel, default_value = "tcp")]
    protocol: TransferChannel,
    /// Pool usage fraction that starts eviction.
    #[arg(long, default_value_t = 0.95)]
    high_watermark: f64,
    /// Pool usage fraction eviction frees down to.
    #[arg(long, default_value_t = 0.85)]
    low_watermark: f64,
    /// Seconds after which an unfinished put is reclaimed.
    #[arg(long, default_value_t = 30.0)]
    put_timeout: f64,
    /// Seconds a read keeps an object in place.
    #[arg(long, default_value_t = 5.0)]
    read_lease: f64,
    /// Shared secret clients and nodes must prove (`transport_auth_token`).
    #[arg(long, env = "KVTIER_TRANSPORT_AUTH_TOKEN")]
    auth_token: Option<String>,
    /// Bound on each call to a node, seconds.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

/// Arguments of `kvtier store-node`.
#[derive(Args)]
pub struct StoreNodeArgs {
    /// Take defaults from a kvtier/LMCache YAML file's `extra_config` (Mooncake keys:
    /// `metadata_server`, `global_segment_size`, `protocol`, `local_hostname`, and
    /// `transport_auth_token`); flags override it.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// etcd to register in (`metadata_server`; `etcd://…` or `etcds://…`, as for `master`).
    #[arg(long, alias = "metadata-server")]
    etcd: Option<String>,
    /// Bytes contributed (`global_segment_size`; default 4GiB).
    #[arg(long, value_parser = parse_size)]
    segment_size: Option<u64>,
    /// Name in the cluster; default: `local_hostname`, else host name and pid.
    #[arg(long)]
    name: Option<String>,
    /// Transport clients use to reach the segment (`protocol`; default tcp).
    #[arg(long, value_parser = parse_channel)]
    protocol: Option<TransferChannel>,
    /// Address to listen on and advertise (`local_hostname`; default 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// Control port (0: any).
    #[arg(long, default_value_t = 0)]
    control_port: u16,
    /// Membership lease TTL in seconds.
    #[arg(long, default_value_t = 5)]
    lease_ttl: u64,
    /// Shared secret (`transport_auth_token`).
    #[arg(long, env = "KVTIER_TRANSPORT_AUTH_TOKEN")]
    auth_token: Option<String>,
    /// Transfer timeout in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

async fn until_stopped() {
    let _ = tokio::signal::ctrl_c().await;
}

pub fn run_master(args: MasterArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let timeout = secs(args.timeout);
        let etcd = args
            .etcd
            .as_deref()
            .map(|u| Etcd::new(u, timeout))
            .transpose()?;
        let host = args
            .listen
            .rsplit_once(':')
            .map(|(h, _)| h)
            .filter(|h| *h != "0.0.0.0")
            .unwrap_or("127.0.0.1")
            .to_string();
        let node = match (args.segment_size, &etcd) {
            (Some(size), None) => Some(
                StoreNode::start(NodeConfig {
                    name: "master-segment".into(),
                    segment_size: size,
                    protocol: args.protocol,
                    transport: TransportConfig {
                        timeout,
                        auth_token: args.auth_token.clone(),
                        host: host.clone(),
                    },
                    control_port: 0,
                    etcd: None,
                    lease_ttl: Duration::from_secs(args.lease_ttl),
                })
                .await?,
            ),
            (Some(_), Some(_)) => bail!(
                "--segment-size is for a master without etcd; with etcd, run `kvtier store-node`"
            ),
            (None, None) => bail!(
                "a master without --etcd runs alone and needs --segment-size (embedded mode)"
            ),
            (None, Some(_)) => None,
        };
        if !(0.0 < args.low_watermark && args.low_watermark <= args.high_watermark && args.high_watermark <= 1.0) {
            bail!("need 0 < --low-watermark <= --high-watermark <= 1");
        }
        let advertise = args.advertise.clone();
        let master = MasterServer::start(MasterConfig {
            listen: args.listen.clone(),
            advertise,
            etcd,
            lease_ttl: Duration::from_secs(args.lease_ttl.max(1)),
            placement: PlacementConfig {
                high_watermark: args.high_watermark,
                low_watermark: args.low_watermark,
                put_timeout: secs(args.put_timeout),
                read_lease: secs(args.read_lease),
            },
            auth_token: args.auth_token.clone(),
            timeout,
            segments: node.iter().map(|n| n.info().clone()).collect(),
        })
        .await?;
        println!("ready {}", master.addr());
        std::io::stdout().flush()?;
        let mut last = None;
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = until_stopped() => break,
                _ = tick.tick() => {
                    let s = master.stats();
                    if master.is_leader() && last != Some(s) {
                        tracing::info!(
                            "master: {} segments, {:.2}/{:.2} GB used, {} objects ({} pending), {} evicted, {} reclaimed, {} lost",
                            s.segments, s.used as f64 / 1e9, s.capacity as f64 / 1e9, s.objects,
                            s.pending, s.evicted, s.reclaimed, s.lost
                        );
                        last = Some(s);
                    }
                }
            }
        }
        tracing::info!("master: stopping");
        master.shutdown().await;
        drop(node);
        Ok(())
    })
}

pub fn run_store_node(args: StoreNodeArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => {
            let mut c = Config::from_yaml_file(path)?;
            c.apply_env(std::env::vars())?;
            c
        }
        None => Config::default(),
    };
    let extra = &config.extra_config;
    let etcd_url = args
        .etcd
        .clone()
        .or_else(|| extra.metadata_server.clone())
        .context("a store node needs --etcd (or `extra_config.metadata_server` in --config)")?;
    let protocol = match args.protocol {
        Some(p) => p,
        None => kvtier::config::store_channel(extra.protocol.as_deref()).with_context(|| {
            format!(
                "`extra_config.protocol: {}`: expected tcp, ucx (Mooncake's rdma) or nixl",
                extra.protocol.as_deref().unwrap_or_default()
            )
        })?,
    };
    let host = args
        .host
        .clone()
        .or_else(|| extra.local_hostname.clone())
        .unwrap_or_else(|| "127.0.0.1".into());
    let segment_size = args
        .segment_size
        .or(extra.global_segment_size)
        .unwrap_or(4 << 30);
    let name = args
        .name
        .clone()
        .or_else(|| extra.local_hostname.clone())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "node".into());
            format!("{host}-{}", std::process::id())
        });
    let auth_token = args
        .auth_token
        .clone()
        .or_else(|| config.transport_auth_token.clone());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let timeout = secs(args.timeout);
        let etcd = Etcd::new(&etcd_url, secs(5.0))?;
        let node = StoreNode::start(NodeConfig {
            name: name.clone(),
            segment_size,
            protocol,
            transport: TransportConfig {
                timeout,
                auth_token,
                host,
            },
            control_port: args.control_port,
            etcd: Some(etcd),
            lease_ttl: Duration::from_secs(args.lease_ttl.max(1)),
        })
        .await?;
        println!("ready {name} {}", node.info().control);
        std::io::stdout().flush()?;
        until_stopped().await;
        tracing::info!(
            "store node {name}: stopping with {} objects",
            node.objects()
        );
        node.shutdown().await;
        Ok(())
    })
}

/// Arguments of `kvtier remote-probe`: an engine process driven through stdin.
#[derive(Args)]
pub struct ProbeArgs {
    /// Engine configuration (YAML).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Model layers (synthetic Llama-3.1-8B shape with fewer layers keeps tests small).
    #[arg(long, default_value_t = 32)]
    layers: u32,
}

/// Runs an engine and answers one line per command on stdin:
/// `store|lookup|retrieve|remove|locate SEED TOKENS`, `flush`, `clear`, `stats`.
pub fn run_probe(args: ProbeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut config = Config::from_yaml_file(&args.config)?;
        config.apply_env(std::env::vars())?;
        let mut model = ModelSpec::llama_3_1_8b();
        model.layers = args.layers;
        let engine = Engine::from_config(config, model.clone()).await?;
        println!("ready");
        std::io::stdout().flush()?;
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let line = line?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let answer = probe_command(&engine, &model, &words).await;
            match answer {
                Ok(a) => println!("ok {a}"),
                Err(e) => println!("err {e:#}"),
            }
            std::io::stdout().flush()?;
        }
        Ok(())
    })
}

async fn probe_command(
    engine: &Engine,
    model: &ModelSpec,
    words: &[&str],
) -> anyhow::Result<String> {
    let prompt = || -> anyhow::Result<Vec<u32>> {
        let seed: u64 = words.get(1).context("SEED")?.parse()?;
        let n: usize = words.get(2).context("TOKENS")?.parse()?;
        Ok(synthetic::token_ids(seed, n))
    };
    match words.first().copied() {
        Some("store") => {
            let tokens = prompt()?;
            let kv = synthetic::kv_for_tokens(model, &tokens);
            let r = engine.store(&tokens, &kv).await?;
            Ok(format!("stored={}", r.stored_tokens))
        }
        Some("lookup") => Ok(format!("hit={}", engine.lookup(&prompt()?).await?)),
        Some("retrieve") => {
            let tokens = prompt()?;
            let mut out = vec![0u8; tokens.len() * model.bytes_per_token()];
            let r = engine.retrieve(&tokens, &mut out).await?;
            let verified = synthetic::matches_kv_prefix(model, &tokens, &out, r.tokens);
            Ok(format!("tokens={} verified={verified}", r.tokens))
        }
        Some("remove") => Ok(format!("removed={}", engine.remove(&prompt()?).await?)),
        Some("locate") => {
            let keys: Vec<u128> = engine.chunk_keys(&prompt()?).iter().map(|k| k.0).collect();
            let client = engine
                .remote_store()
                .context("no kvtier store configured")?;
            let places = client.locate(&keys).await?;
            Ok(places
                .iter()
                .map(|p| p.join(","))
                .collect::<Vec<_>>()
                .join(" "))
        }
        Some("stats") => {
            let client = engine
                .remote_store()
                .context("no kvtier store configured")?;
            let s = client.stats().await?;
            Ok(format!(
                "segments={} objects={} pending={} used={} capacity={} evicted={} reclaimed={} lost={}",
                s.segments, s.objects, s.pending, s.used, s.capacity, s.evicted, s.reclaimed, s.lost
            ))
        }
        Some("put-start-only") => {
            // A client that dies between PutStart and PutEnd (for the reclaim test).
            let client = engine
                .remote_store()
                .context("no kvtier store configured")?;
            let n: u64 = words.get(1).context("BYTES")?.parse()?;
            client.put_start_only(0xdead_0000 + n as u128, n).await?;
            Ok("started".into())
        }
        Some("flush") => {
            engine.flush().await?;
            Ok(String::new())
        }
        Some("clear") => {
            engine.clear().await?;
            Ok(String::new())
        }
        other => bail!("unknown command {other:?}"),
    }
}

/// Arguments of `kvtier bench remote`.
#[derive(Args)]
pub struct BenchArgs {
    /// Transports to measure, comma-separated (tcp, ucx, nixl).
    #[arg(long, default_value = "tcp")]
    transports: String,
    /// Objects per batch.
    #[arg(long, default_value_t = 30)]
    objects: usize,
    /// Bytes per object.
    #[arg(long, value_parser = parse_size, default_value = "32MiB")]
    size: u64,
    /// Timed put+get rounds per backend.
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    /// Redis/Valkey to measure too: a URL, `auto` (start `redis-server` if installed) or
    /// `none`.
    #[arg(long, default_value = "auto")]
    redis: String,
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / (1u64 << 30) as f64
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let total = args.size * args.objects as u64;
    let iters = args.iterations.max(1);
    println!(
        "kvtier bench remote: put and get {} x {} MiB = {:.2} GiB per round across processes, {iters} rounds",
        args.objects,
        args.size >> 20,
        total as f64 / (1u64 << 30) as f64
    );
    let raw = crate::transfer::raw_socket_gib_s(total as usize, args.size as usize, iters)?;
    println!("  raw loopback socket (same run): {raw:.2} GiB/s");
    let objects: Vec<Vec<u8>> = (0..args.objects)
        .map(|i| {
            // Distinct bytes per object and position, so misplaced data is caught.
            (0..args.size as usize)
                .map(|j| {
                    ((j as u64 >> 3) ^ (i as u64) << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15) as u8
                })
                .collect()
        })
        .collect();
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for t in args.transports.split(',').filter(|t| !t.is_empty()) {
        let channel = parse_channel(t).map_err(anyhow::Error::msg)?;
        let exe = std::env::current_exe()?;
        let mut child = ChildGuard(
            Command::new(exe)
                .args([
                    "master",
                    "--listen",
                    "127.0.0.1:0",
                    "--segment-size",
                    &(total + total / 4).to_string(),
                    "--protocol",
                    t,
                    // Removed objects' room comes back when their read leases end:
                    // short leases let the rounds reuse one segment.
                    "--read-lease",
                    "2",
                ])
                .stdout(Stdio::piped())
                .spawn()?,
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().context("master stdout")?).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("ready ")
            .context("master greeting")?
            .to_string();
        let name = format!("kvtier store ({channel})");
        let config = bench_config(&format!("kvtier://{addr}"), t, total + (64 << 20))?;
        let (put, get) = rt.block_on(async {
            let settings = config.remote_settings().context("remote tier")?;
            let tier = RemoteTier::open(&settings).await?;
            // Removed objects' room comes back when their read leases (2 s) end.
            bench_tier(&name, &tier, &objects, iters, Duration::from_millis(2300)).await
        })?;
        rows.push((format!("kvtier store ({t})"), put, get));
    }
    let redis = match args.redis.as_str() {
        "none" => None,
        "auto" => start_redis()?,
        url => Some((url.to_string(), None)),
    };
    if let Some((url, _guard)) = &redis {
        let config = bench_config(url, "tcp", 0)?;
        let (put, get) = rt.block_on(async {
            let settings = config.remote_settings().context("remote tier")?;
            let tier = RemoteTier::open(&settings).await?;
            bench_tier("redis", &tier, &objects, iters, Duration::ZERO).await
        })?;
        rows.push(("redis".into(), put, get));
    } else if args.redis == "auto" {
        println!("  redis: redis-server not installed; skipped");
    }
    println!(
        "\n  {:<22} {:>10} {:>10} {:>14}",
        "backend", "put GiB/s", "get GiB/s", "get / raw sock"
    );
    for (name, put, get) in rows {
        println!(
            "  {name:<22} {put:>10.2} {get:>10.2} {:>13.0}%",
            get / raw * 100.0
        );
    }
    Ok(())
}

fn start_redis() -> anyhow::Result<Option<(String, Option<ChildGuard>)>> {
    let port = free_port()?;
    let child = match Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => ChildGuard(c),
        Err(_) => return Ok(None),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not start on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some((format!("redis://127.0.0.1:{port}"), Some(child))))
}

fn report(name: &str, round: usize, put: Duration, get: Duration, bytes: u64) {
    let round = if round == 1 {
        "warm-up".to_string()
    } else {
        format!("round {}", round - 1)
    };
    println!(
        "  {name} {round}: put {:.2} GiB/s, get {:.2} GiB/s",
        gib_s(bytes, put),
        gib_s(bytes, get)
    );
}

/// An engine configuration whose remote tier is `url` (and nothing else), for the bench.
fn bench_config(url: &str, protocol: &str, staging: u64) -> anyhow::Result<Config> {
    let yaml = format!(
        "local_cpu: false\nremote_url: \"{url}\"\nextra_config:\n  protocol: {protocol}\n  \
         local_buffer_size: {staging}\n  transfer_timeout: 60\n"
    );
    Ok(Config::from_yaml_str(&yaml, "bench")?)
}

/// Rounds of put, get (every byte compared) and remove through `tier`; round 0 warms up
/// and is not counted. Returns the best put and get GiB/s. `settle` is waited after each
/// remove (for the store: until the removed objects' read leases end).
async fn bench_tier(
    name: &str,
    tier: &RemoteTier,
    objects: &[Vec<u8>],
    iters: usize,
    settle: Duration,
) -> anyhow::Result<(f64, f64)> {
    let bytes: u64 = objects.iter().map(|o| o.len() as u64).sum();
    let pool = BufferPool::new(bytes as usize * 2);
    let (mut best_put, mut best_get) = (Duration::MAX, Duration::MAX);
    for round in 0..=iters {
        let keys: Vec<u128> = (0..objects.len())
            .map(|i| ((round as u128) << 64) | i as u128)
            .collect();
        let batch: Vec<(u128, Vec<&[u8]>)> = keys
            .iter()
            .zip(objects)
            .map(|(k, o)| (*k, vec![&o[..]]))
            .collect();
        let t = Instant::now();
        let stored = tier.put(&batch).await?;
        let put = t.elapsed();
        if stored != objects.len() {
            bail!("{name}: {stored} of {} objects stored", objects.len());
        }
        let t = Instant::now();
        let got = tier.get(&keys, 0, &pool).await?;
        let get = t.elapsed();
        for (i, (g, o)) in got.iter().zip(objects).enumerate() {
            match g {
                Some((_, body)) if body[..] == o[..] => {}
                _ => bail!("{name}: object {i} missing or wrong"),
            }
        }
        drop(got);
        tier.remove(&keys).await?;
        report(name, round + 1, put, get, bytes);
        tokio::time::sleep(settle).await;
        if round > 0 {
            best_put = best_put.min(put);
            best_get = best_get.min(get);
        }
    }
    Ok((gib_s(bytes, best_put), gib_s(bytes, best_get)))
}

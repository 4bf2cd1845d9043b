//! `kvtier demo pd` and `kvtier bench pd-proxy`: LMCache's 1p1d example and its benchmark shape
//! on one machine — proxy, prefiller and decoder as separate processes on 127.0.0.1,
//! requests through the proxy, KV verified at the decoder.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kvtier::config::TransferChannel;

use crate::pd_cluster::{
    complete, http_client, last_ttft_block, prompt, stats, Cluster, ClusterSpec, Outcome, Ports,
};
use crate::transfer::parse_channel;

/// Arguments of `kvtier demo pd`.
#[derive(Args, Clone)]
pub struct PdDemoArgs {
    /// Transport between prefiller and decoder: tcp, ucx or nixl.
    #[arg(long, value_parser = parse_channel, default_value = "tcp")]
    transport: TransferChannel,
    /// Requests to send.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 2000)]
    input_len: usize,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 32)]
    output_len: usize,
    /// Transformer layers of the synthetic model (32 = Llama-3.1-8B, 128 KiB of KV per token).
    #[arg(long, default_value_t = 32)]
    layers: u32,
    /// Use free ports instead of the reference layout (7100/7200/7300/7400/7500/9100).
    #[arg(long)]
    free_ports: bool,
    /// Directory for configs and logs (default: a fresh temporary directory, kept).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// What serves the requests: kvtier's synthetic test servers, or real vLLM (its CPU
    /// build) with the `kvtier.vllm` connector, run by `python -m kvtier.demo pd` in the
    /// Python that `KVTIER_PYTHON` names (default `python3`).
    #[arg(long, value_enum, default_value = "synthetic")]
    engine: DemoEngine,
    /// Model folder for `--engine vllm` (default: a generated small Llama).
    #[arg(long)]
    model: Option<PathBuf>,
}

/// What serves the demo's requests.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoEngine {
    /// kvtier's synthetic test servers (KV derived from token ids; no model runs).
    Synthetic,
    /// vLLM's CPU build with the kvtier connector.
    Vllm,
}

/// Arguments of `kvtier bench pd-proxy`.
#[derive(Args, Clone)]
pub struct PdBenchArgs {
    /// Transport between prefiller and decoder: tcp, ucx or nixl.
    #[arg(long, value_parser = parse_channel, default_value = "tcp")]
    transport: TransferChannel,
    /// Requests to send.
    #[arg(long, default_value_t = 30)]
    requests: usize,
    /// Requests per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 7500)]
    input_len: usize,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 200)]
    output_len: usize,
    /// Transformer layers of the synthetic model (32 = Llama-3.1-8B).
    #[arg(long, default_value_t = 32)]
    layers: u32,
    /// Directory for configs and logs (default: a fresh temporary directory, kept).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn run_dir(dir: Option<PathBuf>, what: &str) -> PathBuf {
    dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("kvtier-{what}-{}", std::process::id()))
    })
}

fn kv_gbs(o: &Outcome) -> f64 {
    o.kv_bytes as f64 / (o.kv_transfer_us.max(1) as f64 * 1e-6) / 1e9
}

/// Runs `work` against a started cluster; stops every process at the end or on Ctrl+C.
async fn with_cluster<F, Fut>(spec: ClusterSpec, work: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Cluster>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    println!(
        "  starting decoder, prefiller and proxy ({} transport); logs in {}",
        spec.transport,
        spec.dir.display()
    );
    let t = Instant::now();
    let cluster = Arc::new(Cluster::start(&spec).await?);
    println!(
        "  all three answering /health after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let outcome = tokio::select! {
        r = work(cluster.clone()) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\n  Ctrl+C: stopping");
            Ok(())
        }
    };
    let mut cluster =
        Arc::try_unwrap(cluster).map_err(|_| anyhow::anyhow!("cluster still in use"))?;
    for (name, how) in cluster.stop() {
        println!("  {name}: {how}");
    }
    outcome
}

/// `kvtier demo pd --engine vllm`: hands over to the Python package's demo, with this
/// binary as the proxy.
fn run_vllm_demo(args: &PdDemoArgs) -> anyhow::Result<()> {
    let python = std::env::var("KVTIER_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import kvtier.demo"])
        .stderr(std::process::Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        anyhow::bail!(
            "kvtier demo pd --engine vllm: `{python}` cannot import the kvtier Python package. \
             Install vLLM's CPU build and the package, then point KVTIER_PYTHON at that Python:\n\n    \
             ./scripts/install-vllm.sh\n    target/vllm/bin/pip install ./python\n    \
             KVTIER_PYTHON=target/vllm/bin/python kvtier demo pd --engine vllm"
        );
    }
    let mut cmd = std::process::Command::new(&python);
    cmd.args(["-m", "kvtier.demo", "pd"])
        .arg("--transport")
        .arg(args.transport.to_string())
        .arg("--requests")
        .arg(args.requests.to_string())
        .arg("--input-len")
        .arg(args.input_len.to_string())
        .arg("--output-len")
        .arg(args.output_len.to_string())
        .env("KVTIER_BIN", std::env::current_exe()?);
    if args.free_ports {
        cmd.arg("--free-ports");
    }
    if let Some(dir) = &args.dir {
        cmd.arg("--dir").arg(dir);
    }
    if let Some(model) = &args.model {
        cmd.arg("--model").arg(model);
    }
    let status = match cmd.status() {
        Ok(status) => status,
        Err(e) => anyhow::bail!(
            "kvtier demo pd --engine vllm: cannot run `{python}` ({e}); set KVTIER_PYTHON to the \
             Python of an environment with vLLM and the kvtier package (README: Inside vLLM)"
        ),
    };
    match status.code() {
        Some(0) => Ok(()),
        // The demo printed how to install what is missing.
        Some(2) => anyhow::bail!("vLLM or the kvtier Python package is missing (see above)"),
        _ => anyhow::bail!("the vLLM demo failed ({status})"),
    }
}

pub fn run_demo(args: PdDemoArgs) -> anyhow::Result<()> {
    if args.engine == DemoEngine::Vllm {
        return run_vllm_demo(&args);
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let ports = if args.free_ports { Ports::free()? } else { Ports::reference() };
        let bpt = 2 * args.layers as u64 * 1024 * 2;
        println!("kvtier demo pd: LMCache's 1p1d example on one machine (KV is SYNTHETIC: the test server derives it from token ids; no model ran)");
        println!(
            "  proxy :{}  prefiller :{}  decoder :{} (P/D init :{} alloc :{})  notifications :{}",
            ports.proxy, ports.prefiller, ports.decoder, ports.init, ports.alloc, ports.notify
        );
        println!("  {} requests of {} tokens ({:.0} MiB of KV each), {} output tokens",
            args.requests, args.input_len, (bpt * args.input_len as u64) as f64 / (1u64 << 20) as f64, args.output_len);
        let spec = ClusterSpec {
            transport: args.transport,
            ports,
            layers: args.layers,
            decoder_buffer: (bpt * args.input_len as u64 * 2).max(64 << 20),
            prefiller_buffer: (bpt * args.input_len as u64 + (64 << 20)).max(64 << 20),
            dir: run_dir(args.dir.clone(), "demo-pd"),
        };
        with_cluster(spec, |cluster| async move {
            let client = http_client()?;
            let mut outcomes = Vec::new();
            for i in 0..args.requests {
                let o = complete(&client, &cluster.proxy_url, prompt(i as u64 + 1, args.input_len), args.output_len).await?;
                println!(
                    "  request {i}: TTFT {:.1} ms, {} tokens streamed, KV {} tokens {:.1} MiB in {:.1} ms ({:.2} GB/s), decoder verified: {}",
                    o.ttft.as_secs_f64() * 1e3, o.text_tokens, o.kv_tokens, o.kv_bytes as f64 / (1u64 << 20) as f64,
                    o.kv_transfer_us as f64 / 1e3, kv_gbs(&o), o.verified
                );
                if !o.verified || o.kv_tokens != args.input_len as u64 {
                    bail!("request {i}: the decoder did not get byte-identical KV for the whole prompt");
                }
                outcomes.push(o);
            }
            // The proxy prints its TTFT report every 5 s.
            let until = Instant::now() + Duration::from_secs(7);
            let mut block = None;
            while Instant::now() < until && block.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                block = last_ttft_block(&cluster.log("proxy"));
            }
            println!("\n  the proxy's TTFT report:");
            for line in block.unwrap_or_else(|| "  (none printed)".into()).lines() {
                println!("    {line}");
            }
            let bytes: u64 = outcomes.iter().map(|o| o.kv_bytes).sum();
            let us: u64 = outcomes.iter().map(|o| o.kv_transfer_us).sum();
            println!(
                "\n  KV transfer: {:.2} GB in {:.1} ms over {}: {:.2} GB/s (prefiller-measured, allocation to commit)",
                bytes as f64 / 1e9, us as f64 / 1e3, args.transport, bytes as f64 / (us.max(1) as f64 * 1e-6) / 1e9
            );
            Ok(())
        })
        .await
    })
}

pub fn run_bench(args: PdBenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let bpt = 2 * args.layers as u64 * 1024 * 2;
        println!(
            "kvtier bench pd-proxy: {} requests at {}/s, {} input tokens ({:.0} MiB of KV each), {} output tokens, {} transport (synthetic engine)",
            args.requests, args.rate, args.input_len, (bpt * args.input_len as u64) as f64 / (1u64 << 20) as f64,
            args.output_len, args.transport
        );
        let spec = ClusterSpec {
            transport: args.transport,
            ports: Ports::free()?,
            layers: args.layers,
            decoder_buffer: (bpt * args.input_len as u64 * 3).max(64 << 20),
            prefiller_buffer: (bpt * args.input_len as u64 + (64 << 20)).max(64 << 20),
            dir: run_dir(args.dir.clone(), "bench-pd"),
        };
        with_cluster(spec, |cluster| async move {
            let client = http_client()?;
            let start = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..args.requests {
                let at = start + Duration::from_secs_f64(i as f64 / args.rate.max(1e-3));
                let (client, url) = (client.clone(), cluster.proxy_url.clone());
                let (input, output) = (args.input_len, args.output_len);
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    complete(&client, &url, prompt(1000 + i as u64, input), output).await
                }));
            }
            let mut outcomes = Vec::new();
            for (i, t) in tasks.into_iter().enumerate() {
                let o = t.await.context("request task")??;
                if !o.verified {
                    bail!("request {i}: the decoder's KV was not byte-identical");
                }
                println!(
                    "  [{:>2}/{}] TTFT {:>7.1} ms, KV {:.2} GB in {:>6.1} ms ({:.2} GB/s), {} tokens streamed",
                    i + 1, args.requests, o.ttft.as_secs_f64() * 1e3, o.kv_bytes as f64 / 1e9,
                    o.kv_transfer_us as f64 / 1e3, kv_gbs(&o), o.text_tokens
                );
                outcomes.push(o);
            }
            let wall = start.elapsed();
            let ms = |f: &dyn Fn(&Outcome) -> f64| stats(&outcomes.iter().map(f).collect::<Vec<_>>());
            let (ta, tm, tp) = ms(&|o| o.kv_transfer_us as f64 / 1e3);
            let (ga, gm, gp) = ms(&|o| kv_gbs(o));
            let (fa, fm, fp) = ms(&|o| o.ttft.as_secs_f64() * 1e3);
            println!("\nsummary ({} requests in {:.1} s, all KV verified at the decoder)", outcomes.len(), wall.as_secs_f64());
            println!("  KV transfer time (ms)  avg {ta:.1}  median {tm:.1}  p99 {tp:.1}");
            println!("  KV transfer GB/s       avg {ga:.2}  median {gm:.2}  p99 {gp:.2}");
            println!("  client TTFT (ms)       avg {fa:.1}  median {fm:.1}  p99 {fp:.1}");
            let until = Instant::now() + Duration::from_secs(7);
            let mut block = None;
            while Instant::now() < until {
                block = last_ttft_block(&cluster.log("proxy"));
                if block.as_deref().is_some_and(|b| b.contains(&format!("Num requests: {}", outcomes.len()))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            println!("  the proxy's TTFT report:");
            for line in block.unwrap_or_else(|| "(none printed)".into()).lines() {
                println!("    {line}");
            }
            Ok(())
        })
        .await
    })
}

//! The `kvtier` command: run the demo, check configuration files, print chunk keys, run
//! the P/D proxy and the synthetic test server.

mod demo;
mod gpu;
mod keys;
mod pd_cluster;
mod pd_path;
mod pd_run;
mod proxy;
mod remote;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kvtier::Config;

#[derive(Parser)]
#[command(
    name = "kvtier",
    version,
    about = "Embedded KV-cache storage engine for LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// `kvtier demo`: store, look up, retrieve and verify synthetic Llama-3.1-8B KV on local
    /// tiers, evict, restart from disk, print throughput. `kvtier demo pd`: LMCache's 1p1d
    /// example (proxy, prefiller, decoder) on this machine.
    Demo {
        #[command(subcommand)]
        mode: Option<DemoMode>,
        #[command(flatten)]
        args: demo::DemoArgs,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the chunk keys of a token file (to compare keys across machines).
    Keys(keys::KeysArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// OpenAI-compatible P/D proxy: prefill on a prefiller, wait for its KV transfer,
    /// stream the decoder's answer; TTFT stats every 5 s and at /metrics (the flags of
    /// LMCache's disagg_proxy_server.py).
    Proxy(proxy::ProxyArgs),
    /// Synthetic inference engine for tests and demos: derives KV from token ids; no model.
    /// Plays a prefiller (P/D sender) or decoder (P/D receiver, verifies the KV it gets).
    TestServer(proxy::TestServerArgs),
    /// Remote-store master: object placement, leader election and membership in etcd
    /// (Mooncake's `mooncake_master`). Without etcd it runs alone with its own segment.
    Master(remote::MasterArgs),
    /// Remote-store node: contributes a memory segment to the pool, registered in etcd.
    StoreNode(remote::StoreNodeArgs),
    /// An engine driven through stdin, for the remote-store tests.
    #[command(hide = true)]
    RemoteProbe(remote::ProbeArgs),
    /// Receiver process for `bench transfer` and the transport tests.
    #[command(hide = true)]
    TransferPeer(transfer::PeerArgs),
}

#[derive(Subcommand)]
enum DemoMode {
    /// Proxy, prefiller and decoder as processes on 127.0.0.1 (the reference 1p1d layout),
    /// a few requests through the proxy, TTFT and KV transfer GB/s, then a clean stop.
    Pd(pd_run::PdDemoArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Move data between two processes through a transport; compare with memcpy and a raw
    /// loopback socket measured in the same run.
    Transfer(transfer::BenchArgs),
    /// The P/D path alone (sender and receiver in this process, KV generated once) at
    /// each `--concurrency`, against the raw transfer of the same bytes in the same run:
    /// where the time goes, and the transfer left after a stand-in prefill.
    Pd(pd_path::PdPathArgs),
    /// The reference P/D benchmark shape through proxy, prefiller and decoder processes:
    /// per-request KV transfer time, GB/s and client TTFT.
    PdProxy(pd_run::PdBenchArgs),
    /// Put and get batches of objects through the kvtier store (per transport, master and
    /// segment in another process) and through Redis; compare with a raw loopback socket.
    Remote(remote::BenchArgs),
    /// The GPU paths on a real device (build with `--features cuda`): cudaMemcpy
    /// baselines (pageable, pinned, device-to-device) and the GPU tier, every byte checked.
    Gpu(gpu::GpuBenchArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load FILE (plus KVTIER_*/LMCACHE_* overrides) and print the effective
    /// configuration, or the error.
    Check {
        /// YAML file in kvtier or LMCache syntax.
        file: PathBuf,
    },
}

/// Logs to stderr, filtered by `KVTIER_LOG`, else by `default`.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVTIER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    kvtier::transport::prepare_process();
    let cli = Cli::parse();
    // Benchmarks print their own progress; per-request logs would drown it.
    init_logging(if matches!(cli.command, Command::Bench { .. }) {
        "warn"
    } else {
        "warn,kvtier=info"
    });
    let result = match cli.command {
        Command::Demo { mode: None, args } => demo::run(args),
        Command::Demo {
            mode: Some(DemoMode::Pd(args)),
            ..
        } => pd_run::run_demo(args),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(&file),
        Command::Keys(args) => keys::run(args),
        Command::Bench {
            command: BenchCommand::Transfer(args),
        } => transfer::run_bench(args),
        Command::Bench {
            command: BenchCommand::Pd(args),
        } => pd_path::run_bench(args),
        Command::Bench {
            command: BenchCommand::PdProxy(args),
        } => pd_run::run_bench(args),
        Command::Bench {
            command: BenchCommand::Remote(args),
        } => remote::run_bench(args),
        Command::Bench {
            command: BenchCommand::Gpu(args),
        } => gpu::run(args),
        Command::Master(args) => remote::run_master(args),
        Command::StoreNode(args) => remote::run_store_node(args),
        Command::RemoteProbe(args) => remote::run_probe(args),
        Command::TransferPeer(args) => transfer::run_peer(args),
        Command::Proxy(args) => proxy::run_proxy(args),
        Command::TestServer(args) => proxy::run_test_server(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn config_check(file: &std::path::Path) -> anyhow::Result<()> {
    let mut config = Config::from_yaml_file(file)?;
    config.apply_env(std::env::vars())?;
    config.validate()?;
    for w in config.warnings() {
        eprintln!("warning: {w}");
    }
    print!("{}", config.render());
    Ok(())
}

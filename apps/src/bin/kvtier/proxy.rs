//! `kvtier proxy` and `kvtier test-server`: command-line glue over [`kvtier_cli::proxy`] and
//! [`kvtier_cli::testserver`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kvtier::{Config, ModelSpec};
use kvtier_cli::http::shutdown_signal;
use kvtier_cli::proxy::{Proxy, ProxyConfig};
use kvtier_cli::testserver::{Role, TestServer, TestServerOptions};

/// A comma-separated list of ports (`7300` or `7300,7301`).
#[derive(Clone, Debug)]
pub struct PortList(Vec<u16>);

fn port_list(s: &str) -> Result<PortList, String> {
    let ports = s
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u16>()
                .map_err(|e| format!("`{p}` is not a port: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PortList(ports))
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|e| format!("`{s}`: {e}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}`: must be a number of seconds > 0"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Arguments of `kvtier proxy` (the flags of LMCache's `disagg_proxy_server.py`, plus
/// time bounds).
#[derive(Args)]
pub struct ProxyArgs {
    /// Address of the OpenAI-compatible front end.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Port of the OpenAI-compatible front end.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Host of the prefillers.
    #[arg(long, default_value = "localhost")]
    prefiller_host: String,
    /// HTTP port of prefiller 0 (prefiller k listens on PORT + k), or a comma-separated
    /// list with one port per prefiller.
    #[arg(long, default_value = "8100", value_parser = port_list)]
    prefiller_port: PortList,
    /// Number of prefillers.
    #[arg(long, default_value_t = 1)]
    num_prefillers: usize,
    /// Host of the decoders (their HTTP servers and P/D receivers).
    #[arg(long, default_value = "localhost")]
    decoder_host: String,
    /// HTTP port of decoder 0 (decoder k listens on PORT + k).
    #[arg(long, default_value_t = 8200)]
    decoder_port: u16,
    /// P/D handshake port(s) of decoder 0, comma-separated, one per TP rank (its
    /// `pd_peer_init_port`); decoder k uses each + k.
    #[arg(long, default_value = "8300", value_parser = port_list)]
    decoder_init_port: PortList,
    /// P/D allocation port(s) of decoder 0, comma-separated, one per TP rank (its
    /// `pd_peer_alloc_port`); decoder k uses each + k.
    #[arg(long, default_value = "8400", value_parser = port_list)]
    decoder_alloc_port: PortList,
    /// Number of decoders.
    #[arg(long, default_value_t = 1)]
    num_decoders: usize,
    /// Address of the listener for the prefillers' transfer-done notifications (the
    /// prefillers' `pd_proxy_host`).
    #[arg(long, default_value = "localhost")]
    proxy_host: String,
    /// Port of that listener (the prefillers' `pd_proxy_port`).
    #[arg(long, default_value_t = 8500)]
    proxy_port: u16,
    /// Bound in seconds on prefill + KV transfer per request (HTTP 504 past it).
    #[arg(long, default_value = "30", value_parser = seconds)]
    timeout_sec: Duration,
    /// Bound in seconds on the wait for the decoder's answer and on any silence in its
    /// stream.
    #[arg(long, default_value = "600", value_parser = seconds)]
    decode_timeout_sec: Duration,
    /// After Ctrl+C or SIGTERM, seconds in-flight responses may take to finish.
    #[arg(long, default_value = "30", value_parser = seconds)]
    shutdown_grace_sec: Duration,
    /// Most requests in flight; past it the proxy answers 503 with Retry-After.
    #[arg(long, default_value_t = kvtier_cli::proxy::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Secret the prefillers present when notifying (their `transport_auth_token`).
    #[arg(long, env = "KVTIER_TRANSPORT_AUTH_TOKEN", hide_env_values = true)]
    transport_auth_token: Option<String>,
    /// Seconds between TTFT reports.
    #[arg(long, default_value = "5", value_parser = seconds, hide = true)]
    stats_interval_sec: Duration,
    /// Do not wait for transfer-done notifications (P/D-free smoke tests only).
    #[arg(long, hide = true)]
    no_kv_wait: bool,
}

/// Runs `kvtier proxy` until Ctrl+C / SIGTERM.
pub fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let config = ProxyConfig {
        host: args.host,
        port: args.port,
        prefiller_host: args.prefiller_host,
        prefiller_ports: args.prefiller_port.0,
        num_prefillers: args.num_prefillers,
        decoder_host: args.decoder_host,
        decoder_port: args.decoder_port,
        decoder_init_ports: args.decoder_init_port.0,
        decoder_alloc_ports: args.decoder_alloc_port.0,
        num_decoders: args.num_decoders,
        notify_host: args.proxy_host,
        notify_port: args.proxy_port,
        notify_auth_token: args.transport_auth_token,
        wait_for_kv: !args.no_kv_wait,
        timeout: args.timeout_sec,
        decode_timeout: args.decode_timeout_sec,
        stats_interval: args.stats_interval_sec,
        shutdown_grace: args.shutdown_grace_sec,
        max_in_flight: args.max_in_flight,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let proxy = Proxy::bind(config).await?;
        proxy.run(shutdown_signal()).await?;
        Ok(())
    })
}

/// `--role` values.
#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Prefiller,
    Decoder,
}

/// Arguments of `kvtier test-server`.
#[derive(Args)]
pub struct TestServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// HTTP port.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Role; with a P/D configuration it must match `pd_role` (sender = prefiller,
    /// receiver = decoder), and defaults to it.
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
    /// kvtier/LMCache YAML (e.g. configs/lmcache-1p1d-pd-decoder.yaml); P/D is on when it
    /// sets `enable_pd`. Default: KVTIER_CONFIG_FILE or LMCACHE_CONFIG_FILE if set, else
    /// no P/D.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model name (part of the chunk-key namespace; prefiller and decoder must agree).
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    model: String,
    /// Shape of the synthetic KV.
    #[command(flatten)]
    shape: crate::keys::ShapeArgs,
    /// Milliseconds to wait before each generated token.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// After Ctrl+C or SIGTERM, seconds in-flight responses may take to finish.
    #[arg(long, default_value = "10", value_parser = seconds)]
    shutdown_grace_sec: Duration,
}

fn load_config(file: Option<&PathBuf>) -> anyhow::Result<Option<Config>> {
    let config = match file {
        Some(file) => {
            let mut config = Config::from_yaml_file(file)
                .with_context(|| format!("loading {}", file.display()))?;
            config.apply_env(std::env::vars())?;
            config.validate()?;
            config
        }
        None => {
            let named = |v: &str| std::env::var_os(v).is_some_and(|s| !s.is_empty());
            if !named("KVTIER_CONFIG_FILE") && !named("LMCACHE_CONFIG_FILE") {
                return Ok(None);
            }
            Config::from_env()?
        }
    };
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    Ok(Some(config))
}

/// Runs `kvtier test-server` until Ctrl+C / SIGTERM.
pub fn run_test_server(args: TestServerArgs) -> anyhow::Result<()> {
    let shape = &args.shape;
    if shape.layers == 0 || shape.kv_heads == 0 || shape.head_dim == 0 {
        bail!("--layers, --kv-heads and --head-dim must be > 0");
    }
    let config = load_config(args.config.as_ref())?;
    let model = ModelSpec {
        name: args.model,
        layers: shape.layers,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        ..ModelSpec::llama_3_1_8b()
    };
    let options = TestServerOptions {
        host: args.host,
        port: args.port,
        role: args.role.map(|r| match r {
            RoleArg::Prefiller => Role::Prefiller,
            RoleArg::Decoder => Role::Decoder,
        }),
        config,
        model,
        token_delay: Duration::from_millis(args.token_delay_ms),
        shutdown_grace: args.shutdown_grace_sec,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let server = TestServer::bind(options).await?;
        server.run(shutdown_signal()).await?;
        Ok(())
    })
}

//! A one-machine P/D cluster of child processes — decoder and prefiller (`kvtier
//! test-server`, the synthetic inference engine) and `kvtier proxy` — for `kvtier demo pd`
//! and `kvtier bench pd-proxy`, and the client that drives it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kvtier::config::TransferChannel;
use serde_json::{json, Value};

/// Ports of the cluster (the reference 1p1d layout by default).
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub prefiller: u16,
    pub decoder: u16,
    pub proxy: u16,
    pub init: u16,
    pub alloc: u16,
    pub notify: u16,
}

impl Ports {
    /// LMCache's 1p1d example: prefiller 7100, decoder 7200, init 7300, alloc 7400,
    /// proxy notifications 7500, proxy 9100.
    pub fn reference() -> Self {
        Ports {
            prefiller: 7100,
            decoder: 7200,
            proxy: 9100,
            init: 7300,
            alloc: 7400,
            notify: 7500,
        }
    }

    /// Six free ports on 127.0.0.1.
    pub fn free() -> anyhow::Result<Self> {
        let ls: Vec<std::net::TcpListener> = (0..6)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let p: Vec<u16> = ls
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        Ok(Ports {
            prefiller: p[0],
            decoder: p[1],
            proxy: p[2],
            init: p[3],
            alloc: p[4],
            notify: p[5],
        })
    }
}

/// What to start.
pub struct ClusterSpec {
    pub transport: TransferChannel,
    pub ports: Ports,
    pub layers: u32,
    pub decoder_buffer: u64,
    pub prefiller_buffer: u64,
    /// Where configs and logs go.
    pub dir: PathBuf,
}

/// The running processes; stopped (SIGTERM, then SIGKILL after 10 s) on drop.
pub struct Cluster {
    children: Vec<(&'static str, Child)>,
    pub proxy_url: String,
    pub dir: PathBuf,
}

fn terminate(child: &mut Child) {
    #[cfg(unix)]
    {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped (we still own
        // the Child), so the pid cannot have been reused.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    #[cfg(not(unix))]
    let _ = child.kill();
}

impl Cluster {
    /// Writes the configs, starts decoder, prefiller and proxy, and waits until all answer
    /// `/health`.
    pub async fn start(spec: &ClusterSpec) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("creating {}", spec.dir.display()))?;
        let p = spec.ports;
        let decoder_cfg = spec.dir.join("decoder.yaml");
        let prefiller_cfg = spec.dir.join("prefiller.yaml");
        std::fs::write(
            &decoder_cfg,
            format!(
                "# written by kvtier for this run\nlocal_cpu: false\nmax_local_cpu_size: 0\nenable_pd: true\n\
                 transfer_channel: {}\npd_role: receiver\npd_peer_host: 127.0.0.1\npd_peer_init_port: {}\n\
                 pd_peer_alloc_port: {}\npd_buffer_size: {}\npd_buffer_device: cpu\npd_ttl_sec: 60\n",
                spec.transport, p.init, p.alloc, spec.decoder_buffer
            ),
        )?;
        std::fs::write(
            &prefiller_cfg,
            format!(
                "# written by kvtier for this run\nlocal_cpu: false\nmax_local_cpu_size: 0\nenable_pd: true\n\
                 transfer_channel: {}\npd_role: sender\npd_proxy_host: 127.0.0.1\npd_proxy_port: {}\n\
                 pd_buffer_size: {}\npd_buffer_device: cpu\n",
                spec.transport, p.notify, spec.prefiller_buffer
            ),
        )?;
        let exe = std::env::current_exe()?;
        let layers = spec.layers.to_string();
        let mut cluster = Cluster {
            children: Vec::new(),
            proxy_url: format!("http://127.0.0.1:{}", p.proxy),
            dir: spec.dir.clone(),
        };
        let spawn =
            |name: &'static str, args: Vec<String>| -> anyhow::Result<(&'static str, Child)> {
                let log = File::create(spec.dir.join(format!("{name}.log")))?;
                let child = Command::new(&exe)
                    .args(&args)
                    .env(
                        "KVTIER_LOG",
                        std::env::var("KVTIER_LOG").unwrap_or_else(|_| "info".into()),
                    )
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("starting the {name}"))?;
                Ok((name, child))
            };
        let server = |port: u16, role: &str, cfg: &Path| -> Vec<String> {
            [
                "test-server",
                "--port",
                &port.to_string(),
                "--role",
                role,
                "--layers",
                &layers,
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(["--config".to_string(), cfg.display().to_string()])
            .collect()
        };
        cluster.children.push(spawn(
            "decoder",
            server(p.decoder, "decoder", &decoder_cfg),
        )?);
        cluster.children.push(spawn(
            "prefiller",
            server(p.prefiller, "prefiller", &prefiller_cfg),
        )?);
        let proxy_args: Vec<String> = [
            "proxy",
            "--host",
            "127.0.0.1",
            "--port",
            &p.proxy.to_string(),
            "--prefiller-host",
            "127.0.0.1",
            "--prefiller-port",
            &p.prefiller.to_string(),
            "--num-prefillers",
            "1",
            "--decoder-host",
            "127.0.0.1",
            "--decoder-port",
            &p.decoder.to_string(),
            "--decoder-init-port",
            &p.init.to_string(),
            "--decoder-alloc-port",
            &p.alloc.to_string(),
            "--num-decoders",
            "1",
            "--proxy-host",
            "127.0.0.1",
            "--proxy-port",
            &p.notify.to_string(),
            "--timeout-sec",
            "60",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        cluster.children.push(spawn("proxy", proxy_args)?);
        let client = http_client()?;
        for (name, port) in [
            ("decoder", p.decoder),
            ("prefiller", p.prefiller),
            ("proxy", p.proxy),
        ] {
            let url = format!("http://127.0.0.1:{port}/health");
            let until = Instant::now() + Duration::from_secs(120);
            loop {
                if let Ok(r) = client.get(&url).send().await {
                    if r.status().is_success() {
                        break;
                    }
                }
                if let Some((_, child)) = cluster.children.iter_mut().find(|(n, _)| *n == name) {
                    if let Ok(Some(status)) = child.try_wait() {
                        bail!(
                            "the {name} exited ({status}); see {}",
                            spec.dir.join(format!("{name}.log")).display()
                        );
                    }
                }
                if Instant::now() > until {
                    bail!("the {name} did not answer {url} within 120 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(cluster)
    }

    /// The log of `name` (decoder, prefiller, proxy).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Stops every process: SIGTERM, then SIGKILL for any still running after 10 s.
    pub fn stop(&mut self) -> Vec<(&'static str, String)> {
        for (_, c) in &mut self.children {
            terminate(c);
        }
        let until = Instant::now() + Duration::from_secs(10);
        let mut how = Vec::new();
        for (name, c) in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        how.push((*name, format!("stopped ({status})")));
                        break;
                    }
                    Ok(None) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        how.push((*name, "killed after 10 s".to_string()));
                        break;
                    }
                }
            }
        }
        self.children.clear();
        how
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().build()?)
}

/// One request's outcome, as the client saw it.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub ttft: Duration,
    pub total: Duration,
    pub kv_tokens: u64,
    pub kv_bytes: u64,
    pub kv_transfer_us: u64,
    pub verified: bool,
    pub text_tokens: usize,
}

/// `n` words drawn from `seed`: one token each for the synthetic engine.
pub fn prompt(seed: u64, words: usize) -> String {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = String::with_capacity(words * 7);
    for _ in 0..words {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.push_str(&format!("w{} ", s % 100_000));
    }
    out
}

/// Sends one streamed completion through the proxy.
pub async fn complete(
    client: &reqwest::Client,
    proxy: &str,
    prompt: String,
    max_tokens: usize,
) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let mut resp = client
        .post(format!("{proxy}/v1/completions"))
        .json(&json!({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": prompt, "max_tokens": max_tokens,
                      "stream": true, "ignore_eos": true}))
        .send()
        .await?;
    let status = resp.status();
    let header = |name: &str| -> u64 {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut out = Outcome {
        kv_tokens: header("x-kvtier-kv-tokens"),
        kv_bytes: header("x-kvtier-kv-bytes"),
        kv_transfer_us: header("x-kvtier-kv-transfer-us"),
        ..Outcome::default()
    };
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("proxy answered {status}: {body}");
    }
    let mut body = String::new();
    let mut first = true;
    while let Some(chunk) = resp.chunk().await? {
        if first {
            out.ttft = start.elapsed();
            first = false;
        }
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    out.total = start.elapsed();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        out.text_tokens += 1;
        if let Some(k) = v.get("kvtier") {
            out.verified = k["kv_verified"].as_bool().unwrap_or(false);
        }
    }
    Ok(out)
}

/// Mean, median and p99 (numpy's linear interpolation) of `v`.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        let x = p / 100.0 * (s.len() - 1) as f64;
        let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
        s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
    };
    (s.iter().sum::<f64>() / s.len() as f64, pct(50.0), pct(99.0))
}

/// The proxy's last TTFT report block, if it printed one.
pub fn last_ttft_block(proxy_log: &str) -> Option<String> {
    let start = proxy_log.rfind("Num requests:")?;
    let before = proxy_log[..start].rfind("===============================")?;
    let rest = &proxy_log[start..];
    let end = rest
        .find("===============================")
        .map_or(rest.len(), |e| e + 31);
    Some(proxy_log[before..start + end].to_string())
}

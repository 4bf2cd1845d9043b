//! The proxy's settings: where it listens, the prefillers and decoders it routes to (the
//! reference script's flags and port scheme) and its time bounds.

use std::time::Duration;

use crate::error::{Error, Result};

/// Default of [`ProxyConfig::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Where and how the proxy runs. [`ProxyConfig::new`] gives the reference script's
/// defaults; [`ProxyConfig::prefiller_urls`] and [`ProxyConfig::decoders`] expand the
/// instance lists the way the reference does (instance `k` listens on base port + `k`).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Address the HTTP front end listens on (`--host`).
    pub host: String,
    /// Port of the HTTP front end (`--port`; 0 = ephemeral).
    pub port: u16,
    /// Host of the prefillers (`--prefiller-host`).
    pub prefiller_host: String,
    /// HTTP port(s) of the prefillers (`--prefiller-port`): one base port (prefiller `k`
    /// on base + `k`), or one port per prefiller.
    pub prefiller_ports: Vec<u16>,
    /// Number of prefillers (`--num-prefillers`).
    pub num_prefillers: usize,
    /// Host of the decoders, HTTP and P/D (`--decoder-host`).
    pub decoder_host: String,
    /// HTTP base port of the decoders (`--decoder-port`): decoder `k` on base + `k`.
    pub decoder_port: u16,
    /// P/D handshake ports of decoder 0, one per TP rank (`--decoder-init-port`); decoder
    /// `k` uses each + `k`.
    pub decoder_init_ports: Vec<u16>,
    /// P/D allocation ports of decoder 0, one per TP rank (`--decoder-alloc-port`);
    /// decoder `k` uses each + `k`.
    pub decoder_alloc_ports: Vec<u16>,
    /// Number of decoders (`--num-decoders`).
    pub num_decoders: usize,
    /// Address of the transfer-done notification listener (`--proxy-host`).
    pub notify_host: String,
    /// Port of the transfer-done notification listener (`--proxy-port`; 0 = ephemeral).
    pub notify_port: u16,
    /// Secret senders must present to the notification listener (`transport_auth_token`).
    pub notify_auth_token: Option<String>,
    /// Wait for the transfer-done notification (false only for P/D-free smoke tests).
    pub wait_for_kv: bool,
    /// Bound on prefill + KV transfer per request (`--timeout-sec`).
    pub timeout: Duration,
    /// Bound on the wait for the decoder's response headers and on any silence between
    /// chunks of its body (`--decode-timeout-sec`).
    pub decode_timeout: Duration,
    /// Period of the TTFT report on stdout.
    pub stats_interval: Duration,
    /// After a shutdown signal, how long in-flight responses may take to finish.
    pub shutdown_grace: Duration,
    /// Most requests in flight at once (`--max-in-flight`); past it the proxy answers 503
    /// with `Retry-After` instead of queueing without bound.
    pub max_in_flight: usize,
}

impl ProxyConfig {
    /// The reference script's defaults: front end on localhost:8000, prefiller on 8100,
    /// decoder on 8200 with P/D ports 8300/8400, notifications on 8500, one of each;
    /// prefill bound 30 s, decode bound 600 s, report every 5 s, 30 s shutdown grace.
    pub fn new() -> Self {
        ProxyConfig {
            host: "localhost".into(),
            port: 8000,
            prefiller_host: "localhost".into(),
            prefiller_ports: vec![8100],
            num_prefillers: 1,
            decoder_host: "localhost".into(),
            decoder_port: 8200,
            decoder_init_ports: vec![8300],
            decoder_alloc_ports: vec![8400],
            num_decoders: 1,
            notify_host: "localhost".into(),
            notify_port: 8500,
            notify_auth_token: None,
            wait_for_kv: true,
            timeout: Duration::from_secs(30),
            decode_timeout: Duration::from_secs(600),
            stats_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// Base URLs of the prefillers, in round-robin order.
    pub fn prefiller_urls(&self) -> Result<Vec<String>> {
        let ports = match self.prefiller_ports.as_slice() {
            [] => return Err(invalid("--prefiller-port: no port given")),
            [base] => {
                if self.num_prefillers == 0 {
                    return Err(invalid("--num-prefillers must be at least 1"));
                }
                offset_ports(*base, self.num_prefillers, "--prefiller-port")?
            }
            list => {
                if self.num_prefillers != 1 && self.num_prefillers != list.len() {
                    return Err(invalid(format!(
                        "--prefiller-port lists {} ports but --num-prefillers is {}",
                        list.len(),
                        self.num_prefillers
                    )));
                }
                list.to_vec()
            }
        };
        Ok(ports
            .into_iter()
            .map(|p| http_url(&self.prefiller_host, p))
            .collect())
    }

    /// The decoders, in round-robin order: decoder `k` serves HTTP on
    /// `decoder_port + k` and P/D on each of `decoder_init_ports` / `decoder_alloc_ports`
    /// + `k`.
    pub fn decoders(&self) -> Result<Vec<DecoderTarget>> {
        if self.num_decoders == 0 {
            return Err(invalid("--num-decoders must be at least 1"));
        }
        if self.decoder_init_ports.is_empty() || self.decoder_alloc_ports.is_empty() {
            return Err(invalid(
                "--decoder-init-port and --decoder-alloc-port need at least one port each",
            ));
        }
        if self.decoder_init_ports.len() != self.decoder_alloc_ports.len() {
            return Err(invalid(format!(
                "--decoder-init-port lists {} ports and --decoder-alloc-port {}: give one \
                 of each per TP rank",
                self.decoder_init_ports.len(),
                self.decoder_alloc_ports.len()
            )));
        }
        let http = offset_ports(self.decoder_port, self.num_decoders, "--decoder-port")?;
        let mut out = Vec::with_capacity(self.num_decoders);
        for (k, port) in http.into_iter().enumerate() {
            let shift = |ports: &[u16], flag: &str| -> Result<Vec<u16>> {
                ports
                    .iter()
                    .map(|&p| {
                        offset_ports(p, k + 1, flag).map(|v| v[k]) // p + k, checked
                    })
                    .collect()
            };
            out.push(DecoderTarget {
                url: http_url(&self.decoder_host, port),
                kv_host: self.decoder_host.clone(),
                init_ports: shift(&self.decoder_init_ports, "--decoder-init-port")?,
                alloc_ports: shift(&self.decoder_alloc_ports, "--decoder-alloc-port")?,
            });
        }
        Ok(out)
    }

    pub(super) fn validate(&self) -> Result<()> {
        for (name, d) in [
            ("--timeout-sec", self.timeout),
            ("--decode-timeout-sec", self.decode_timeout),
            ("stats interval", self.stats_interval),
        ] {
            if d.is_zero() {
                return Err(invalid(format!("{name} must be > 0")));
            }
        }
        Ok(())
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// One decoder as the proxy routes to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecoderTarget {
    /// Base URL of its OpenAI server.
    pub url: String,
    /// Host its P/D receiver listens on (`receiver_host`).
    pub kv_host: String,
    /// Its P/D handshake ports, one per TP rank (`receiver_init_port`).
    pub init_ports: Vec<u16>,
    /// Its P/D allocation ports, one per TP rank (`receiver_alloc_port`).
    pub alloc_ports: Vec<u16>,
}

pub(super) fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// `base`, `base + 1`, ..., `base + n - 1`, or an error when that passes port 65535.
pub(super) fn offset_ports(base: u16, n: usize, flag: &str) -> Result<Vec<u16>> {
    (0..n)
        .map(|k| {
            u16::try_from(base as usize + k).map_err(|_| {
                invalid(format!(
                    "{flag} {base} + instance {k} is past the last port (65535)"
                ))
            })
        })
        .collect()
}

pub(super) fn http_url(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_follow_the_reference_port_scheme() {
        let mut c = ProxyConfig::new();
        c.num_prefillers = 2;
        c.num_decoders = 2;
        c.decoder_init_ports = vec![7300, 7301];
        c.decoder_alloc_ports = vec![7400, 7401];
        assert_eq!(
            c.prefiller_urls().unwrap(),
            ["http://localhost:8100", "http://localhost:8101"]
        );
        let d = c.decoders().unwrap();
        assert_eq!(d[1].url, "http://localhost:8201");
        assert_eq!(d[1].init_ports, [7301, 7302]);
        assert_eq!(d[1].alloc_ports, [7401, 7402]);
        c.prefiller_ports = vec![9001, 9005];
        c.num_prefillers = 1;
        assert_eq!(
            c.prefiller_urls().unwrap(),
            ["http://localhost:9001", "http://localhost:9005"]
        );
        c.decoder_port = 65535;
        assert!(c.decoders().is_err());
        c.decoder_port = 8200;
        c.decoder_alloc_ports = vec![7400];
        assert!(c.decoders().is_err());
    }
}

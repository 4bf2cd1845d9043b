//! Any request body on the HTTP front ends: `kvtier test-server` (its request parsing,
//! `kv_transfer_params` included) and `kvtier proxy` in front of it (its rewriting of the
//! request, the relay of the answer). Each answers — 2xx or a 4xx/5xx naming the
//! problem — within a bound; never a panic, never a hang.
//!
//! One test server and one proxy run for the whole fuzzing process (binding a server
//! per input would dominate), on ephemeral ports of 127.0.0.1; the proxy does not wait
//! for P/D notifications (the test server has no P/D here).
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::OnceLock;
use std::time::Duration;

use kvtier_cli::proxy::{Proxy, ProxyConfig};
use kvtier_cli::testserver::{TestServer, TestServerOptions};
use libfuzzer_sys::fuzz_target;

struct Setup {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    server: String,
    proxy: String,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (server, proxy) = rt.block_on(async {
            let mut options = TestServerOptions::new(0);
            options.model = common::small_model();
            let ts = TestServer::bind(options).await.unwrap();
            let port = ts.local_addr().port();
            tokio::spawn(ts.run(std::future::pending()));
            let mut config = ProxyConfig::new();
            config.host = "127.0.0.1".into();
            config.port = 0;
            config.prefiller_host = "127.0.0.1".into();
            config.prefiller_ports = vec![port];
            config.decoder_host = "127.0.0.1".into();
            config.decoder_port = port;
            config.wait_for_kv = false;
            config.timeout = Duration::from_secs(5);
            config.decode_timeout = Duration::from_secs(5);
            config.stats_interval = Duration::from_secs(3600);
            let proxy = Proxy::bind(config).await.unwrap();
            let proxy_port = proxy.local_addr().port();
            tokio::spawn(proxy.run(std::future::pending()));
            (
                format!("http://127.0.0.1:{port}"),
                format!("http://127.0.0.1:{proxy_port}"),
            )
        });
        Setup {
            rt,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            server,
            proxy,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let s = setup();
    let base = if pick & 1 == 0 { &s.server } else { &s.proxy };
    let path = if pick & 2 == 0 {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    let url = format!("{base}{path}");
    s.rt.block_on(async {
        let sent = s
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => panic!("{url}: no answer: {e}"),
        };
        let status = resp.status();
        match resp.bytes().await {
            Ok(_) => {}
            // A stream may end with an error after a 200 (the answer says so in its
            // events); anything else is a front end that died or hung mid-answer.
            Err(e) if e.is_timeout() => panic!("{url}: {status}: answer stalled: {e}"),
            Err(_) => {}
        }
        assert!(
            status.is_success() || status.is_client_error() || status.is_server_error(),
            "{url}: {status}"
        );
    });
});

//! `kvtier proxy` and `kvtier test-server` as separate processes on 127.0.0.1: routing,
//! streaming and non-streaming answers, chat, the exact prefill/decode requests, failure
//! stages with their time bounds, the TTFT report, `/metrics`, and shutdown on Ctrl+C.
//!
//! The first tests run without P/D (`--no-kv-wait`, or a proxy whose prefiller never
//! notifies); the `pd_*` tests run the whole P/D path end to end, over each transport
//! built in, and its faults: prefiller killed mid-transfer, decoder killed and restarted,
//! proxy restarted, P/D buffer too small. Each fault ends in a clear error or a recovery,
//! and the decoder's P/D buffer usage returns to zero.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::free_ports;

/// The repository root: this test is built by the `kvtier-cli` package (apps/).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// A child process, killed on drop, whose stdout and stderr are collected.
struct Proc {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(args: &[String]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvtier"))
            .args(args)
            .current_dir(REPO)
            .env_remove("KVTIER_CONFIG_FILE")
            .env_remove("LMCACHE_CONFIG_FILE")
            .env("KVTIER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kvtier");
        let collect = |from: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let sink = buf.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(from).lines() {
                    let Ok(line) = line else { break };
                    let mut b = sink.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
            buf
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Waits until `GET base/health` answers 200.
async fn wait_healthy(base: &str, procs: &[&Proc]) {
    let c = client();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = c.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        if Instant::now() > until {
            let logs: Vec<String> = procs.iter().map(|p| p.stderr()).collect();
            panic!("{base} not healthy after 60 s; logs: {logs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn test_server(port: u16, extra: &[&str]) -> Proc {
    let mut a = args(&["test-server", "--port", &port.to_string(), "--layers", "2"]);
    a.extend(args(extra));
    Proc::spawn(&a)
}

/// The proxy's flags for one prefiller and one decoder on 127.0.0.1.
fn proxy_args(port: u16, prefiller: u16, decoder: u16, notify: u16, extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "proxy",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        &prefiller.to_string(),
        "--num-prefillers",
        "1",
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &decoder.to_string(),
        "--decoder-init-port",
        "7300",
        "--decoder-alloc-port",
        "7400",
        "--num-decoders",
        "1",
        "--proxy-host",
        "127.0.0.1",
        "--proxy-port",
        &notify.to_string(),
    ]);
    a.extend(args(extra));
    a
}

/// The data lines of an SSE body, `[DONE]` included.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

async fn post(url: &str, body: Value) -> reqwest::Response {
    client().post(url).json(&body).send().await.unwrap()
}

/// Two plain test servers behind a proxy that does not wait for KV.
struct PlainSetup {
    proxy: Proc,
    _prefiller: Proc,
    _decoder: Proc,
    /// The proxy.
    base: String,
    prefiller_base: String,
    decoder_base: String,
}

async fn plain_setup(extra_proxy: &[&str], decoder_extra: &[&str]) -> PlainSetup {
    let p = free_ports(4);
    let prefiller = test_server(p[0], &["--role", "prefiller"]);
    let mut d = vec!["--role", "decoder"];
    d.extend_from_slice(decoder_extra);
    let decoder = test_server(p[1], &d);
    let mut extra = vec!["--no-kv-wait", "--stats-interval-sec", "1"];
    extra.extend_from_slice(extra_proxy);
    let proxy = Proc::spawn(&proxy_args(p[2], p[0], p[1], p[3], &extra));
    let base = format!("http://127.0.0.1:{}", p[2]);
    wait_healthy(&format!("http://127.0.0.1:{}", p[0]), &[&prefiller]).await;
    wait_healthy(&format!("http://127.0.0.1:{}", p[1]), &[&decoder]).await;
    wait_healthy(&base, &[&proxy]).await;
    PlainSetup {
        proxy,
        _prefiller: prefiller,
        _decoder: decoder,
        base,
        prefiller_base: format!("http://127.0.0.1:{}", p[0]),
        decoder_base: format!("http://127.0.0.1:{}", p[1]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_json_and_stream_agree() {
    let s = plain_setup(&[], &[]).await;
    let url = format!("{}/v1/completions", s.base);
    let prompt = "The future of AI is";

    let r = post(
        &url,
        json!({"model": "m", "prompt": prompt, "max_tokens": 5, "stream": false}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let req_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(text.split_whitespace().count(), 5, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["kvtier"]["prompt_tokens"], 5);
    assert_eq!(v["kvtier"]["kv_tokens"], 0);
    assert_eq!(v["kvtier"]["kv_verified"], false);
    // The decoder saw the proxy's request id.
    assert_eq!(v["id"], format!("cmpl-{req_id}"));
    assert_eq!(v["kv_transfer_params"]["req_id"], req_id.as_str());

    let r = post(
        &url,
        json!({"model": "m", "prompt": prompt, "max_tokens": 5, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = r.text().await.unwrap();
    let events = sse_events(&body);
    assert_eq!(events.len(), 6, "{body}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..5]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text, "same prompt, same deterministic answer");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[4]["kvtier"]["prompt_tokens"], 5);
    assert!(chunks[0].get("kvtier").is_none());

    // Token-id prompts pass through too.
    let r = post(&url, json!({"prompt": [1, 2, 3], "max_tokens": 1})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["kvtier"]["prompt_tokens"], 3, "{v}");

    // Every request was prefilled on the prefiller.
    let m = client()
        .get(format!("{}/metrics", s.prefiller_base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("kvtier_testserver_requests_total{endpoint=\"completions\"} 3"),
        "{m}"
    );
}

/// Waits until `p`'s stdout holds `needle`.
async fn wait_stdout(p: &Proc, needle: &str, within: Duration) -> String {
    let until = Instant::now() + within;
    loop {
        let out = p.stdout();
        if out.contains(needle) {
            return out;
        }
        if Instant::now() > until {
            panic!(
                "`{needle}` not on stdout after {within:?}; stdout:\n{out}\nstderr:\n{}",
                p.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_ttft_report_metrics_and_health() {
    let s = plain_setup(&[], &[]).await;
    let url = format!("{}/v1/chat/completions", s.base);
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]);
    let r = post(
        &url,
        json!({"model": "m", "messages": messages, "max_completion_tokens": 4}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 4, "{v}");
    // "system be brief user hello there"
    assert_eq!(v["kvtier"]["prompt_tokens"], 6);

    let r = post(
        &url,
        json!({"model": "m", "messages": messages, "max_completion_tokens": 4, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.len(), 5);
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, content);
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 4);

    // The reference block, printed within the report period (1 s here, 5 s by default).
    let out = wait_stdout(&s.proxy, "Num requests: 2\n", Duration::from_secs(10)).await;
    let start = out.find("Num requests: 2\n").unwrap();
    let block: Vec<&str> = out[..start]
        .lines()
        .rev()
        .take(1)
        .chain(out[start..].lines().take(10))
        .collect();
    assert_eq!(block[0], "===============================", "{out}");
    assert_eq!(block[2], "Prefill node TTFT stats:");
    assert!(block[3].starts_with(" - Average (ms): "), "{out}");
    assert!(block[4].starts_with(" - Median (ms): "));
    assert!(block[5].starts_with(" - 99th Percentile (ms): "));
    assert_eq!(block[6], "End-to-end TTFT stats:");
    assert!(block[7].starts_with(" - Average (ms): "));
    assert!(block[9].starts_with(" - 99th Percentile (ms): "));
    assert_eq!(block[10], "===============================");
    for line in &block[3..10] {
        if let Some((_, v)) = line.rsplit_once(": ") {
            if line.starts_with(" - ") {
                let ms: f64 = v.parse().unwrap();
                assert!(ms > 0.0 && ms < 60_000.0, "{line}");
            }
        }
    }
    // No new samples, no new block (a block may have been printed between a prefill and
    // its decoder's first byte, hence the count taken now rather than assumed).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let printed = s.proxy.stdout().matches("Num requests:").count();
    assert!((1..=2).contains(&printed), "{printed} blocks");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.proxy.stdout().matches("Num requests:").count(), printed);

    let c = client();
    let m = c
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "kvtier_proxy_requests_total{endpoint=\"chat_completions\"} 2",
        "kvtier_proxy_prefill_ttft_seconds_count 2",
        "kvtier_proxy_ttft_seconds_count 2",
        "kvtier_proxy_prefill_ttft_ms{stat=\"median\"}",
        "kvtier_proxy_ttft_ms{stat=\"p99\"}",
        "kvtier_proxy_in_flight 0",
    ] {
        assert!(m.contains(needle), "{needle} missing:\n{m}");
    }
    let h = c.get(format!("{}/health", s.base)).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let h: Value = h.json().await.unwrap();
    assert_eq!(h["decoders"][0], s.decoder_base.as_str());
}

/// What a fake upstream saw.
#[derive(Clone, Debug)]
struct Seen {
    server: usize,
    path: String,
    auth: Option<String>,
    body: Value,
}

/// An in-process OpenAI server that records requests; answers SSE when `stream` is true.
async fn fake_upstream(
    listener: tokio::net::TcpListener,
    server: usize,
    log: Arc<Mutex<Vec<Seen>>>,
) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Uri};
    let handler = move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let log = log.clone();
        async move {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let stream = body["stream"] == true;
            log.lock().unwrap().push(Seen {
                server,
                path: uri.path().to_string(),
                auth: headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or_default().to_string()),
                body,
            });
            if stream {
                (
                    [("content-type", "text/event-stream")],
                    format!(
                        "data: {}\n\ndata: [DONE]\n\n",
                        json!({"choices": [{"text": format!(" from{server}")}]})
                    ),
                )
            } else {
                (
                    [("content-type", "application/json")],
                    json!({"choices": [{"text": format!(" from{server}")}]}).to_string(),
                )
            }
        }
    };
    let app = axum::Router::new()
        .route("/v1/completions", axum::routing::post(handler.clone()))
        .route("/v1/chat/completions", axum::routing::post(handler));
    axum::serve(listener, app).await.unwrap();
}

/// Two listeners on consecutive ports.
async fn consecutive_listeners() -> (tokio::net::TcpListener, tokio::net::TcpListener) {
    for _ in 0..100 {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if port == u16::MAX {
            continue;
        }
        if let Ok(b) = tokio::net::TcpListener::bind(("127.0.0.1", port + 1)).await {
            return (a, b);
        }
    }
    panic!("no two consecutive free ports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_and_decode_requests_and_round_robin() {
    let log = Arc::new(Mutex::new(Vec::new()));
    // Prefillers 0 and 1 (a port list), decoders 10 and 11 (base port + k).
    let p0 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (d0, d1) = consecutive_listeners().await;
    let pre_ports = format!(
        "{},{}",
        p0.local_addr().unwrap().port(),
        p1.local_addr().unwrap().port()
    );
    let dec_port = d0.local_addr().unwrap().port();
    for (l, id) in [(p0, 0), (p1, 1), (d0, 10), (d1, 11)] {
        tokio::spawn(fake_upstream(l, id, log.clone()));
    }
    let ports = free_ports(2);
    let proxy = Proc::spawn(&args(&[
        "proxy",
        "--host",
        "127.0.0.1",
        "--port",
        &ports[0].to_string(),
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        &pre_ports,
        "--num-prefillers",
        "2",
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &dec_port.to_string(),
        "--decoder-init-port",
        "7300,7310",
        "--decoder-alloc-port",
        "7400,7410",
        "--num-decoders",
        "2",
        "--proxy-host",
        "127.0.0.1",
        "--proxy-port",
        &ports[1].to_string(),
        "--no-kv-wait",
    ]));
    let base = format!("http://127.0.0.1:{}", ports[0]);
    wait_healthy(&base, &[&proxy]).await;

    let original = json!({
        "model": "m", "prompt": "a b c", "max_tokens": 7, "temperature": 0.5,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = client()
            .post(format!("{base}/v1/completions"))
            .header("authorization", "Bearer secret")
            .json(&original)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
        let body = r.text().await.unwrap();
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    }
    assert_ne!(ids[0], ids[1]);
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:#?}");
    for (k, id) in ids.iter().enumerate() {
        let pre = seen
            .iter()
            .find(|s| s.server < 10 && s.body["kv_transfer_params"]["req_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no prefill for {id}: {seen:#?}"));
        let dec = seen
            .iter()
            .find(|s| s.server >= 10 && s.body["kv_transfer_params"]["req_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no decode for {id}: {seen:#?}"));
        // Round robin: request k on prefiller k, decoder k.
        assert_eq!(pre.server, k);
        assert_eq!(dec.server, 10 + k);
        assert_eq!(pre.path, "/v1/completions");
        assert_eq!(pre.auth.as_deref(), Some("Bearer secret"));
        assert_eq!(dec.auth.as_deref(), Some("Bearer secret"));

        let mut want_pre = original.clone();
        let m = want_pre.as_object_mut().unwrap();
        m.insert("max_tokens".into(), json!(1));
        m.insert("stream".into(), json!(false));
        m.remove("stream_options");
        m.insert(
            "kv_transfer_params".into(),
            json!({
                "req_id": id,
                "receiver_host": "127.0.0.1",
                "receiver_init_port": [7300 + k as u16, 7310 + k as u16],
                "receiver_alloc_port": [7400 + k as u16, 7410 + k as u16],
            }),
        );
        assert_eq!(pre.body, want_pre);

        let mut want_dec = original.clone();
        want_dec
            .as_object_mut()
            .unwrap()
            .insert("kv_transfer_params".into(), json!({ "req_id": id }));
        assert_eq!(dec.body, want_dec);
    }
}

/// A port that accepts connections and never answers (a hung server); returns the port.
fn silent_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_bounded_and_name_request_and_stage() {
    let p = free_ports(12);
    // A prefiller that accepts connections and never answers.
    let hang_port = silent_listener();
    // A live prefiller that never sends a transfer-done notification (no P/D).
    let prefiller = test_server(p[0], &[]);
    let timeout = ["--timeout-sec", "2"];
    // Prefiller down (nothing listens on p[1]).
    let down = Proc::spawn(&proxy_args(p[2], p[1], p[1], p[3], &timeout));
    // Prefiller hangs.
    let hung = Proc::spawn(&proxy_args(p[4], hang_port, p[1], p[5], &timeout));
    // Prefill answers, notification never comes.
    let silent = Proc::spawn(&proxy_args(p[6], p[0], p[1], p[7], &timeout));
    // Prefill fine (not waiting for KV), decoder down.
    let mut t = timeout.to_vec();
    t.push("--no-kv-wait");
    let no_decoder = Proc::spawn(&proxy_args(p[8], p[0], p[1], p[9], &t));
    wait_healthy(&format!("http://127.0.0.1:{}", p[0]), &[&prefiller]).await;
    for (port, proc) in [
        (p[2], &down),
        (p[4], &hung),
        (p[6], &silent),
        (p[8], &no_decoder),
    ] {
        wait_healthy(&format!("http://127.0.0.1:{port}"), &[proc]).await;
    }

    let request = json!({"prompt": "hello world", "max_tokens": 3, "stream": true});
    let check = |port: u16, status: u16, stage: &'static str, min: f64, max: f64| {
        let request = request.clone();
        async move {
            let t = Instant::now();
            let r = post(&format!("http://127.0.0.1:{port}/v1/completions"), request).await;
            let took = t.elapsed().as_secs_f64();
            assert_eq!(r.status(), status, "{stage}");
            let req_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["stage"], stage, "{v}");
            assert_eq!(v["error"]["req_id"], req_id.as_str(), "{v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains(&req_id),
                "{v}"
            );
            assert!(
                (min..max).contains(&took),
                "{stage}: answered after {took:.2} s, expected {min}..{max} s"
            );
            v
        }
    };
    let (a, b, c, d) = tokio::join!(
        check(p[2], 502, "prefill", 0.0, 2.0),
        check(p[4], 504, "prefill", 1.9, 5.0),
        check(p[6], 504, "kv_transfer", 1.9, 5.0),
        check(p[8], 502, "decode", 0.0, 2.0),
    );
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{}", p[1])),
        "{a}"
    );
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--timeout-sec"));
    assert!(c["error"]["message"]
        .as_str()
        .unwrap()
        .contains("notification"));
    assert!(d["error"]["message"].as_str().unwrap().contains("decoder"));

    // Not JSON: 400 at the request stage.
    let r = client()
        .post(format!("http://127.0.0.1:{}/v1/completions", p[8]))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["stage"], "request");

    let m = client()
        .get(format!("http://127.0.0.1:{}/metrics", p[6]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("kvtier_proxy_errors_total{stage=\"kv_transfer\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_over_the_limit_is_refused_before_any_upstream_call() {
    let p = free_ports(3);
    // A prefiller that accepts connections and never answers: a request that got through
    // would hang there instead of being answered at once.
    let hang_port = silent_listener();
    let proxy = Proc::spawn(&proxy_args(
        p[0],
        hang_port,
        p[1],
        p[2],
        &["--timeout-sec", "60"],
    ));
    let base = format!("http://127.0.0.1:{}", p[0]);
    wait_healthy(&base, &[&proxy]).await;
    // 64 MiB of prompt plus the JSON around it.
    let prompt = "a".repeat(64 << 20);
    let sent = tokio::time::timeout(
        Duration::from_secs(30),
        client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": prompt, "max_tokens": 1}))
            .send(),
    )
    .await
    .expect("an oversized request was not answered at once");
    match sent {
        Ok(r) => {
            assert_eq!(r.status(), 413);
            let text = r.text().await.unwrap();
            assert!(text.contains("length limit"), "{text}");
        }
        // The proxy answers and closes while the body is still coming: the client may see
        // the connection reset before it reads the 413. Either way nothing went upstream
        // (that would have hung at the silent prefiller).
        Err(e) => assert!(
            e.is_request() || e.is_body(),
            "the oversized request failed otherwise: {e:?}"
        ),
    }
    // The proxy serves on.
    assert_eq!(
        client()
            .get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_proxy_answers_503_instead_of_queueing() {
    let p = free_ports(3);
    // A prefiller that accepts connections and never answers: requests stay in flight.
    let hang_port = silent_listener();
    let proxy = Proc::spawn(&proxy_args(
        p[0],
        hang_port,
        p[1],
        p[2],
        &["--timeout-sec", "60", "--max-in-flight", "2"],
    ));
    let base = format!("http://127.0.0.1:{}", p[0]);
    wait_healthy(&base, &[&proxy]).await;
    let url = format!("{base}/v1/completions");
    let request = json!({"prompt": "hello", "max_tokens": 1});
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (url, request) = (url.clone(), request.clone());
            tokio::spawn(async move { post(&url, request).await })
        })
        .collect();
    // Both are admitted (the in-flight gauge says so) and hang at the prefiller.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metrics_text(&base)
        .await
        .contains("kvtier_proxy_in_flight 2")
    {
        assert!(
            Instant::now() < deadline,
            "two requests never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post(&url, request.clone()).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["stage"], "admission", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-in-flight"),
        "{v}"
    );
    // Once the held requests go away, new ones are admitted again.
    for h in held {
        h.abort();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metrics_text(&base)
        .await
        .contains("kvtier_proxy_in_flight 0")
    {
        assert!(
            Instant::now() < deadline,
            "aborted requests stayed in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admitted = tokio::time::timeout(Duration::from_secs(1), post(&url, request)).await;
    assert!(
        admitted.is_err(),
        "admitted: it waits at the prefiller like the first two"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_lets_in_flight_streams_finish() {
    use futures_util::StreamExt;
    // The decoder takes 100 ms per token: a 15-token answer streams for 1.5 s.
    let s = plain_setup(&[], &["--token-delay-ms", "100"]).await;
    let r = post(
        &format!("{}/v1/completions", s.base),
        json!({"prompt": "slow stream", "max_tokens": 15, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    let first = body.next().await.unwrap().unwrap();
    text.push_str(std::str::from_utf8(&first).unwrap());
    // Ctrl+C while the answer is streaming.
    // SAFETY: kill(2) on the proxy child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(s.proxy.pid(), libc::SIGINT) }, 0);
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events = sse_events(&text);
    assert_eq!(events.len(), 16, "{text}");
    assert_eq!(events.last().unwrap(), "[DONE]");

    // Then the proxy exits cleanly, and no longer accepts connections.
    let mut proxy = s.proxy;
    let until = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < until,
            "proxy still running 10 s after Ctrl+C"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}: {}", proxy.stderr());
    assert!(client()
        .get(format!("{}/health", s.base))
        .send()
        .await
        .is_err());
    // The final report covers the request.
    assert!(
        proxy.stdout().contains("Num requests: 1"),
        "{}",
        proxy.stdout()
    );
}

#[test]
fn test_server_help_says_what_it_is() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["test-server", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        help.contains("synthetic inference engine for tests and demos"),
        "{help}"
    );
    assert!(help.contains("no model"));
}

/// A prefiller and a decoder with P/D over TCP behind a proxy that waits for KV.
struct PdSetup {
    proxy: Proc,
    _prefiller: Proc,
    _decoder: Proc,
    base: String,
    prefiller_base: String,
    decoder_base: String,
    _dir: tempfile::TempDir,
}

async fn pd_setup(init_port_for_proxy: Option<u16>) -> PdSetup {
    pd_setup_with(PdOptions {
        init_port_for_proxy,
        ..PdOptions::default()
    })
    .await
}

/// Knobs of a P/D setup.
struct PdOptions {
    transport: &'static str,
    init_port_for_proxy: Option<u16>,
    decoder_buffer: u64,
    /// Extra YAML lines for the decoder.
    decoder_extra: &'static str,
}

impl Default for PdOptions {
    fn default() -> Self {
        PdOptions {
            transport: "tcp",
            init_port_for_proxy: None,
            decoder_buffer: 32 << 20,
            decoder_extra: "",
        }
    }
}

/// What the processes of a P/D setup are started with (to restart one).
struct PdArgs {
    decoder: Vec<String>,
    proxy: Vec<String>,
}

async fn pd_setup_with(o: PdOptions) -> PdSetup {
    pd_setup_full(o).await.0
}

async fn pd_setup_full(o: PdOptions) -> (PdSetup, PdArgs) {
    let p = free_ports(6);
    let (http_pre, http_dec, init, alloc, proxy_port, notify) =
        (p[0], p[1], p[2], p[3], p[4], p[5]);
    let dir = tempfile::tempdir().unwrap();
    let pre_cfg = dir.path().join("prefiller.yaml");
    let dec_cfg = dir.path().join("decoder.yaml");
    let transport = o.transport;
    std::fs::write(
        &pre_cfg,
        format!(
            "enable_pd: True\ntransfer_channel: {transport}\npd_role: sender\npd_proxy_host: 127.0.0.1\n\
             pd_proxy_port: {notify}\npd_buffer_size: 16777216\npd_buffer_device: cpu\n\
             transport_timeout_sec: 3\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &dec_cfg,
        format!(
            "local_cpu: False\nmax_local_cpu_size: 0\nenable_pd: True\ntransfer_channel: {transport}\n\
             pd_role: receiver\npd_peer_host: 127.0.0.1\npd_peer_init_port: {init}\n\
             pd_peer_alloc_port: {alloc}\npd_buffer_size: {}\npd_buffer_device: cpu\n{}",
            o.decoder_buffer, o.decoder_extra
        ),
    )
    .unwrap();
    let server_args = |port: u16, cfg: &std::path::Path| {
        let mut a = args(&["test-server", "--port", &port.to_string(), "--layers", "2"]);
        a.extend(args(&["--config", cfg.to_str().unwrap()]));
        a
    };
    let pre_args = server_args(http_pre, &pre_cfg);
    let dec_args = server_args(http_dec, &dec_cfg);
    let prefiller = Proc::spawn(&pre_args);
    let decoder = Proc::spawn(&dec_args);
    let mut a = proxy_args(
        proxy_port,
        http_pre,
        http_dec,
        notify,
        &["--timeout-sec", "5"],
    );
    let init_for_proxy = o.init_port_for_proxy.unwrap_or(init);
    for (flag, value) in [
        ("--decoder-init-port", init_for_proxy),
        ("--decoder-alloc-port", alloc),
    ] {
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = value.to_string();
    }
    let proxy = Proc::spawn(&a);
    let s = PdSetup {
        base: format!("http://127.0.0.1:{proxy_port}"),
        prefiller_base: format!("http://127.0.0.1:{http_pre}"),
        decoder_base: format!("http://127.0.0.1:{http_dec}"),
        proxy,
        _prefiller: prefiller,
        _decoder: decoder,
        _dir: dir,
    };
    wait_healthy(&s.prefiller_base, &[&s._prefiller]).await;
    wait_healthy(&s.decoder_base, &[&s._decoder]).await;
    wait_healthy(&s.base, &[&s.proxy]).await;
    (
        s,
        PdArgs {
            decoder: dec_args,
            proxy: a,
        },
    )
}

async fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The P/D end-to-end and fault tests for one transport.
macro_rules! pd_tests {
    ($module:ident, $transport:literal) => {
        mod $module {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn end_to_end_kv_arrives_verified() {
                super::pd_end_to_end($transport).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn prefiller_killed_mid_transfer_fails_the_request_and_leaks_no_pages() {
                super::pd_prefiller_killed_mid_transfer_fails_the_request_and_leaks_no_pages(
                    $transport,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn decoder_killed_then_restarted_recovers() {
                super::pd_decoder_killed_then_restarted_recovers($transport).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn proxy_restarted_serves_again() {
                super::pd_proxy_restarted_serves_again($transport).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn buffer_too_small_says_how_big_it_must_be() {
                super::pd_buffer_too_small_says_how_big_it_must_be($transport).await;
            }
        }
    };
}

pd_tests!(pd_tcp, "tcp");
#[cfg(feature = "ucx")]
pd_tests!(pd_ucx, "ucx");
#[cfg(feature = "nixl")]
pd_tests!(pd_nixl, "nixl");

/// Completions, streamed completions and chat through the proxy; the decoder's KV for
/// every chunk is byte-identical to the prefiller's, and no page stays allocated.
async fn pd_end_to_end(transport: &'static str) {
    let s = pd_setup_with(PdOptions {
        transport,
        ..PdOptions::default()
    })
    .await;
    // 600 words: two full 256-token chunks and a partial one.
    let prompt: String = (0..600).map(|i| format!("w{i} ")).collect();

    let r = post(
        &format!("{}/v1/completions", s.base),
        json!({"prompt": prompt, "max_tokens": 4}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["kvtier"]["prompt_tokens"], 600, "{v}");
    assert_eq!(v["kvtier"]["kv_tokens"], 600, "{v}");
    assert_eq!(v["kvtier"]["kv_verified"], true, "{v}");

    let r = post(
        &format!("{}/v1/completions", s.base),
        json!({"prompt": format!("{prompt} more"), "max_tokens": 3, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.len(), 4);
    let last: Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(last["kvtier"]["kv_tokens"], 601, "{last}");
    assert_eq!(last["kvtier"]["kv_verified"], true, "{last}");

    let r = post(
        &format!("{}/v1/chat/completions", s.base),
        json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["kvtier"]["kv_tokens"], 3, "{v}");
    assert_eq!(v["kvtier"]["kv_verified"], true, "{v}");

    let m = metrics_text(&s.decoder_base).await;
    assert!(
        m.contains("kvtier_testserver_kv_checks_total{result=\"verified\"} 3"),
        "{m}"
    );
    let m = metrics_text(&s.base).await;
    assert!(m.contains("kvtier_proxy_kv_tokens_total 1204"), "{m}");
    assert!(
        m.contains("kvtier_proxy_prefill_ttft_seconds_count 3"),
        "{m}"
    );
    let m = metrics_text(&s.prefiller_base).await;
    assert!(
        m.contains("kvtier_testserver_kv_sent_tokens_total 1204"),
        "{m}"
    );
    wait_buffer_empty(&s.decoder_base).await;
}

/// Waits until the decoder's P/D buffer holds nothing (at most 15 s).
async fn wait_buffer_empty(decoder_base: &str) {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let m = metrics_text(decoder_base).await;
        if m.contains("kvtier_pd_buffer_used_bytes 0") {
            return;
        }
        assert!(Instant::now() < until, "P/D pages leaked: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pd_used_bytes(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("kvtier_pd_buffer_used_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn pd_prefiller_killed_mid_transfer_fails_the_request_and_leaks_no_pages(
    transport: &'static str,
) {
    let (mut s, _) = pd_setup_full(PdOptions {
        transport,
        decoder_buffer: 512 << 20,
        decoder_extra: "pd_ttl_sec: 2\n",
        ..PdOptions::default()
    })
    .await;
    // 40 000 tokens: 320 MiB of KV with 2 layers, long enough to land a kill in.
    let prompt: String = (0..40_000).map(|i| format!("k{i} ")).collect();
    let url = format!("{}/v1/completions", s.base);
    let request =
        tokio::spawn(async move { post(&url, json!({"prompt": prompt, "max_tokens": 2})).await });
    // Kill the prefiller as soon as the decoder has pages allocated for it.
    let until = Instant::now() + Duration::from_secs(60);
    while pd_used_bytes(&metrics_text(&s.decoder_base).await) == 0 {
        assert!(Instant::now() < until, "the transfer never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s._prefiller.child.kill().unwrap();
    let killed = Instant::now();
    let r = request.await.unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    let stage = v["error"]["stage"].as_str().unwrap_or_default().to_string();
    assert!(stage == "prefill" || stage == "kv_transfer", "{v}");
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "error after {:?}",
        killed.elapsed()
    );
    wait_buffer_empty(&s.decoder_base).await;
}

async fn pd_decoder_killed_then_restarted_recovers(transport: &'static str) {
    let (mut s, a) = pd_setup_full(PdOptions {
        transport,
        ..PdOptions::default()
    })
    .await;
    let url = format!("{}/v1/completions", s.base);
    let ok = post(&url, json!({"prompt": "one two three", "max_tokens": 2})).await;
    assert_eq!(ok.status(), 200);
    s._decoder.child.kill().unwrap();
    let _ = s._decoder.child.wait();
    let t = Instant::now();
    let r = post(&url, json!({"prompt": "four five six", "max_tokens": 2})).await;
    assert!(r.status().is_server_error(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().is_some(), "{v}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    // A new decoder on the same ports: the prefiller reconnects, requests succeed again.
    s._decoder = Proc::spawn(&a.decoder);
    wait_healthy(&s.decoder_base, &[&s._decoder]).await;
    let r = post(
        &url,
        json!({"prompt": "seven eight nine ten", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["kvtier"]["kv_verified"], true, "{v}");
    wait_buffer_empty(&s.decoder_base).await;
}

async fn pd_proxy_restarted_serves_again(transport: &'static str) {
    let (mut s, a) = pd_setup_full(PdOptions {
        transport,
        ..PdOptions::default()
    })
    .await;
    let url = format!("{}/v1/completions", s.base);
    assert_eq!(
        post(&url, json!({"prompt": "a b", "max_tokens": 1}))
            .await
            .status(),
        200
    );
    s.proxy.child.kill().unwrap();
    let _ = s.proxy.child.wait();
    s.proxy = Proc::spawn(&a.proxy);
    wait_healthy(&s.base, &[&s.proxy]).await;
    // The prefiller's notification connection went with the old proxy: it reconnects.
    let r = post(&url, json!({"prompt": "c d e", "max_tokens": 1})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["kvtier"]["kv_verified"], true, "{v}");
    wait_buffer_empty(&s.decoder_base).await;
}

async fn pd_buffer_too_small_says_how_big_it_must_be(transport: &'static str) {
    // Two pages of 256 tokens (4 MiB with 2 layers); the prompt needs four.
    let s = pd_setup_with(PdOptions {
        transport,
        decoder_buffer: 4 << 20,
        ..PdOptions::default()
    })
    .await;
    let prompt: String = (0..1000).map(|i| format!("b{i} ")).collect();
    let t = Instant::now();
    let r = post(
        &format!("{}/v1/completions", s.base),
        json!({"prompt": prompt, "max_tokens": 1}),
    )
    .await;
    assert!(r.status().is_server_error(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("pd_buffer_size") && msg.contains("8388608"),
        "{v}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    wait_buffer_empty(&s.decoder_base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_transfer_to_a_dead_receiver_fails_within_the_timeout() {
    // The proxy names a handshake port nobody listens on.
    let dead = free_ports(1)[0];
    let s = pd_setup(Some(dead)).await;
    let t = Instant::now();
    let r = post(
        &format!("{}/v1/completions", s.base),
        json!({"prompt": "a b c", "max_tokens": 2}),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(r.status(), 502);
    let req_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    let stage = v["error"]["stage"].as_str().unwrap();
    assert!(stage == "prefill" || stage == "kv_transfer", "{v}");
    assert_eq!(v["error"]["req_id"], req_id.as_str());
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&dead.to_string()),
        "{v}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

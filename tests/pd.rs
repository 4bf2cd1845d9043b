//! The P/D backend in one process over real sockets: a receiver and senders on
//! 127.0.0.1, KV verified byte for byte, buffer accounting, faults.

use std::time::Duration;

use kvtier::config::{PdRole, TransferChannel};
use kvtier::pd::{PdError, PdReceiver, PdSender, ProxyListener, ReceiverSpec};
use kvtier::{Config, Metrics, ModelSpec};
use kvtier_transport::framed::FramedError;
use kvtier_transport::handshake::HandshakeError;

/// A small model: 16 KiB per token (synthetic KV: test bytes, not a model's).
fn model() -> ModelSpec {
    let mut m = ModelSpec::llama_3_1_8b();
    m.layers = 4;
    m.kv_heads = 2;
    m
}

fn kv_for(m: &ModelSpec, tokens: &[u32]) -> Vec<u8> {
    let row = m.chunk_shape(1).row_bytes();
    let mut kv = vec![0u8; m.bytes_per_token() * tokens.len()];
    for (plane, p) in kv.chunks_mut(row * tokens.len().max(1)).enumerate() {
        for (i, b) in p.iter_mut().enumerate() {
            *b = (tokens[i / row] as usize * 13 + plane * 5 + i % 251) as u8;
        }
    }
    kv
}

fn receiver_config(channel: TransferChannel, pages: u64, token: Option<&str>) -> Config {
    let m = model();
    Config {
        enable_pd: true,
        pd_role: Some(PdRole::Receiver),
        transfer_channel: channel,
        pd_peer_host: Some("127.0.0.1".into()),
        pd_peer_init_port: vec![0],
        pd_peer_alloc_port: vec![0],
        pd_buffer_size: pages * (m.bytes_per_token() * 256) as u64,
        pd_allocation_timeout_sec: 1.0,
        transport_auth_token: token.map(str::to_string),
        transport_timeout_sec: 5.0,
        ..Config::default()
    }
}

fn sender_config(channel: TransferChannel, proxy_port: Option<u16>, token: Option<&str>) -> Config {
    Config {
        enable_pd: true,
        pd_role: Some(PdRole::Sender),
        transfer_channel: channel,
        pd_proxy_host: proxy_port.map(|_| "127.0.0.1".into()),
        pd_proxy_port: proxy_port,
        pd_buffer_size: 64 << 20,
        transport_auth_token: token.map(str::to_string),
        transport_timeout_sec: 5.0,
        ..Config::default()
    }
}

/// A TCP receiver with `pages` chunk pages and no secret.
async fn tcp_receiver(pages: u64) -> PdReceiver {
    PdReceiver::start(
        &receiver_config(TransferChannel::Tcp, pages, None).pd_receiver_settings(),
        model(),
        Metrics::new(),
    )
    .await
    .unwrap()
}

/// A TCP sender with no proxy and no secret.
async fn tcp_sender() -> PdSender {
    PdSender::new(
        &sender_config(TransferChannel::Tcp, None, None).pd_sender_settings(),
        model(),
        Metrics::new(),
    )
    .await
    .unwrap()
}

/// A hand-driven control connection to `receiver`'s allocation port, past the handshake
/// (no secret): for tests that play a sender misbehaving at the protocol level.
async fn raw_sender(receiver: &PdReceiver) -> tokio::net::TcpStream {
    use kvtier_transport::handshake::{self, Hello, Service};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", receiver.ports().1))
        .await
        .unwrap();
    let hello = Hello {
        service: Service::PdReceiver,
        version: kvtier::pd::protocol::VERSION,
        name: "raw",
        secret: None,
    };
    handshake::connect(&mut s, "receiver", hello, Duration::from_secs(5))
        .await
        .unwrap();
    s
}

/// Allocates pages for `n` chunks of 256 tokens (keys 1..=n) on a raw connection.
async fn raw_alloc(s: &mut tokio::net::TcpStream, req_id: &str, n: u128) {
    raw_alloc_keys(s, req_id, 1, n).await;
}

/// Allocates pages for `n` chunks of 256 tokens with keys `first..first + n` on a raw
/// connection; returns the pages' offsets.
async fn raw_alloc_keys(
    s: &mut tokio::net::TcpStream,
    req_id: &str,
    first: u128,
    n: u128,
) -> Vec<u64> {
    use kvtier::pd::protocol::{ChunkRequest, Message, Slot};
    use tokio::io::AsyncWriteExt;
    let chunks = (0..n)
        .map(|i| ChunkRequest {
            key: kvtier::ChunkKey(first + i),
            tokens: 256,
        })
        .collect();
    s.write_all(&frame(&Message::Alloc {
        req_id: req_id.into(),
        chunks,
        writer: 0,
    }))
    .await
    .unwrap();
    match read_msg(s).await {
        Message::Allocated { slots, .. } => slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Page { offset } => offset,
                Slot::Held => panic!("a fresh key is held"),
            })
            .collect(),
        other => panic!("allocation failed: {other:?}"),
    }
}

/// `msg` as one frame on the wire: `u32` LE body length, then the body.
fn frame(msg: &kvtier::pd::protocol::Message) -> Vec<u8> {
    let body = kvtier::pd::protocol::encode(msg);
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// The next control message on a raw connection.
async fn read_msg(s: &mut tokio::net::TcpStream) -> kvtier::pd::protocol::Message {
    use tokio::io::AsyncReadExt;
    let mut p = [0u8; 4];
    s.read_exact(&mut p).await.unwrap();
    let mut b = vec![0u8; u32::from_le_bytes(p) as usize];
    s.read_exact(&mut b).await.unwrap();
    kvtier::pd::protocol::decode(&b).unwrap()
}

fn spec(r: &PdReceiver) -> ReceiverSpec {
    let (init_port, alloc_port) = r.ports();
    ReceiverSpec {
        host: "127.0.0.1".into(),
        init_port,
        alloc_port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_commit_retrieve_frees_pages_and_notifies_proxy() {
    let m = model();
    let proxy = ProxyListener::bind("127.0.0.1", 0, None).await.unwrap();
    let receiver = tcp_receiver(16).await;
    let sender = PdSender::new(
        &sender_config(TransferChannel::Tcp, Some(proxy.local_addr().port()), None)
            .pd_sender_settings(),
        m.clone(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let tokens: Vec<u32> = (0..1000).collect();
    let kv = kv_for(&m, &tokens);
    let r = sender
        .send("req-1", &tokens, &kv, &spec(&receiver))
        .await
        .unwrap();
    assert_eq!((r.tokens, r.skipped_tokens), (1000, 0));
    assert_eq!(r.bytes, kv.len() as u64);
    let done = proxy.wait("req-1", Duration::from_secs(5)).await.unwrap();
    assert!(
        done.ok && done.tokens == 1000 && done.bytes == kv.len() as u64,
        "{done:?}"
    );
    assert_eq!(receiver.usage().used_pages, 4);
    assert_eq!(receiver.lookup(&tokens), 1000);
    // Sending the same prefix again skips what the receiver holds.
    let r = sender
        .send(
            "req-2",
            &tokens[..800],
            &kv_for(&m, &tokens[..800]),
            &spec(&receiver),
        )
        .await
        .unwrap();
    assert_eq!((r.tokens, r.skipped_tokens), (32, 768));
    let mut out = vec![0u8; kv.len()];
    assert_eq!(
        receiver.retrieve("req-1", &tokens, &mut out).await.unwrap(),
        1000
    );
    assert_eq!(out, kv, "decoder KV differs from the prefiller's");
    // Pages are freed after retrieve (the 800-token request's last chunk is still held).
    assert_eq!(receiver.usage().used_pages, 1);
    let text = receiver.metrics().encode_text();
    assert!(text.contains("kvtier_pd_buffer_used_bytes"), "{text}");
    // The sender counts its sends by outcome and times them; none is left in flight.
    let sent = sender.metrics();
    assert_eq!(sent.pd_sends.with_label_values(&["ok"]).get(), 2);
    assert_eq!(sent.pd_sends.with_label_values(&["failed"]).get(), 0);
    assert_eq!(sent.pd_sends_in_flight.get(), 0);
    let text = sent.encode_text();
    assert!(
        text.contains("kvtier_op_seconds_count{op=\"pd_send\"} 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_can_never_fit_fails_at_once_naming_the_size() {
    let m = model();
    let receiver = tcp_receiver(2).await;
    let sender = tcp_sender().await;
    let tokens: Vec<u32> = (0..1000).collect();
    let t = std::time::Instant::now();
    let err = sender
        .send("big", &tokens, &kv_for(&m, &tokens), &spec(&receiver))
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "did not fail fast"
    );
    assert!(matches!(err, PdError::NeverFits { .. }), "{err}");
    assert_eq!(
        sender
            .metrics()
            .pd_sends
            .with_label_values(&["failed"])
            .get(),
        1
    );
    assert_eq!(sender.metrics().pd_sends_in_flight.get(), 0);
    let msg = err.to_string();
    assert!(
        msg.contains("pd_buffer_size")
            && msg.contains(&(4 * 256 * m.bytes_per_token()).to_string()),
        "{msg}"
    );
    assert_eq!(receiver.usage().used_pages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_makes_the_sender_wait_then_proceed_or_time_out() {
    let m = model();
    let receiver = tcp_receiver(2).await;
    let sender = tcp_sender().await;
    let a: Vec<u32> = (0..512).collect();
    let b: Vec<u32> = (10_000..10_512).collect();
    sender
        .send("a", &a, &kv_for(&m, &a), &spec(&receiver))
        .await
        .unwrap();
    assert_eq!(receiver.usage().used_pages, 2);
    // Full: b waits; nobody frees within pd_allocation_timeout_sec (1 s) → error.
    let err = sender
        .send("b", &b, &kv_for(&m, &b), &spec(&receiver))
        .await
        .unwrap_err();
    assert!(matches!(err, PdError::BufferFull { .. }), "{err}");
    // Retrieving a while b waits lets b through.
    let waiting = {
        let (b, kv, to) = (b.clone(), kv_for(&m, &b), spec(&receiver));
        let sender = std::sync::Arc::new(sender);
        let s = sender.clone();
        tokio::spawn(async move { s.send("b2", &b, &kv, &to).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut out = vec![0u8; a.len() * m.bytes_per_token()];
    assert_eq!(receiver.retrieve("a", &a, &mut out).await.unwrap(), 512);
    waiting.await.unwrap().unwrap();
    assert_eq!(receiver.lookup(&b), 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_one_receiver_and_one_sender_two_receivers() {
    let m = model();
    let r1 = tcp_receiver(16).await;
    let r2 = tcp_receiver(16).await;
    let s1 = tcp_sender().await;
    let s2 = tcp_sender().await;
    let x: Vec<u32> = (0..600).collect();
    let y: Vec<u32> = (5000..5600).collect();
    let (kx, ky) = (kv_for(&m, &x), kv_for(&m, &y));
    let to1 = spec(&r1);
    let (a, b) = tokio::join!(s1.send("x", &x, &kx, &to1), s2.send("y", &y, &ky, &to1));
    a.unwrap();
    b.unwrap();
    s1.send("y2", &y, &ky, &spec(&r2)).await.unwrap();
    for (r, t, k) in [(&r1, &x, &kx), (&r1, &y, &ky), (&r2, &y, &ky)] {
        let mut out = vec![0u8; k.len()];
        assert_eq!(r.retrieve("check", t, &mut out).await.unwrap(), t.len());
        assert_eq!(&out, k);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_ports_refuse_a_sender_without_the_secret() {
    let m = model();
    let receiver = PdReceiver::start(
        &receiver_config(TransferChannel::Tcp, 4, Some("k")).pd_receiver_settings(),
        m.clone(),
        Metrics::new(),
    )
    .await
    .unwrap();
    for token in [None, Some("nope")] {
        let sender = PdSender::new(
            &sender_config(TransferChannel::Tcp, None, token).pd_sender_settings(),
            m.clone(),
            Metrics::new(),
        )
        .await
        .unwrap();
        let tokens: Vec<u32> = (0..10).collect();
        let err = sender
            .send("r", &tokens, &kv_for(&m, &tokens), &spec(&receiver))
            .await
            .unwrap_err();
        // Without a secret the receiver refuses us; with another one we refuse the
        // receiver, which cannot prove ours.
        assert!(
            matches!(
                err,
                PdError::Control(FramedError::Handshake(
                    HandshakeError::Refused { .. } | HandshakeError::Unproven { .. }
                ))
            ),
            "{token:?}: {err}"
        );
    }
    let sender = PdSender::new(
        &sender_config(TransferChannel::Tcp, None, Some("k")).pd_sender_settings(),
        m.clone(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let tokens: Vec<u32> = (0..10).collect();
    sender
        .send("r", &tokens, &kv_for(&m, &tokens), &spec(&receiver))
        .await
        .unwrap();

    // Mutual: a sender that has the secret refuses a receiver that cannot prove it (a
    // rogue decoder named in kv_transfer_params), before any KV leaves.
    let rogue = tcp_receiver(4).await;
    let err = sender
        .send("r2", &tokens, &kv_for(&m, &tokens), &spec(&rogue))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PdError::Control(FramedError::Handshake(HandshakeError::Unproven { .. }))
        ),
        "{err}"
    );
    assert_eq!(rogue.usage().used_pages, 0);
    assert_eq!(rogue.lookup(&tokens), 0);

    // The proxy's notification port proves the secret too, and refuses notifiers without it.
    let open_proxy = ProxyListener::bind("127.0.0.1", 0, None).await.unwrap();
    let with_proxy = |port, token: Option<&'static str>| {
        let config = sender_config(TransferChannel::Tcp, Some(port), token);
        let m = m.clone();
        async move { PdSender::new(&config.pd_sender_settings(), m, Metrics::new()).await }
    };
    // (A failed notification is logged, not returned: the KV still reaches the decoder.)
    let notifier = with_proxy(open_proxy.local_addr().port(), Some("k"))
        .await
        .unwrap();
    notifier
        .send("r3", &tokens, &kv_for(&m, &tokens), &spec(&receiver))
        .await
        .unwrap();
    let told = open_proxy.wait("r3", Duration::from_millis(500)).await;
    assert!(told.is_err(), "a notifier told an unproven proxy: {told:?}");
    let guarded_proxy = ProxyListener::bind("127.0.0.1", 0, Some("k".into()))
        .await
        .unwrap();
    let stranger = with_proxy(guarded_proxy.local_addr().port(), None)
        .await
        .unwrap();
    let open_receiver = tcp_receiver(4).await;
    stranger
        .send("r4", &tokens, &kv_for(&m, &tokens), &spec(&open_receiver))
        .await
        .unwrap();
    let waited = guarded_proxy.wait("r4", Duration::from_millis(500)).await;
    assert!(waited.is_err(), "the proxy took a stranger's notification");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_pointed_at_the_wrong_port_is_told_what_is_there() {
    let m = model();
    let proxy = ProxyListener::bind("127.0.0.1", 0, None).await.unwrap();
    let sender = PdSender::new(
        &sender_config(TransferChannel::Tcp, None, None).pd_sender_settings(),
        m.clone(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let tokens: Vec<u32> = (0..10).collect();
    let port = proxy.local_addr().port();
    let wrong = ReceiverSpec {
        host: "127.0.0.1".into(),
        init_port: port,
        alloc_port: port,
    };
    let err = sender
        .send("r", &tokens, &kv_for(&m, &tokens), &wrong)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is a kvtier P/D proxy notification port"),
        "{err}"
    );
    assert!(err.contains("not a kvtier P/D receiver"), "{err}");

    // A port where something other than kvtier listens (here: an HTTP server that answers
    // every connection with a 400).
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = http.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = http.accept().await {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b).await;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let err = sender
        .send(
            "r",
            &tokens,
            &kv_for(&m, &tokens),
            &ReceiverSpec {
                host: "127.0.0.1".into(),
                init_port: port,
                alloc_port: port,
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP server"), "{err}");
    assert!(err.contains("pd_role: receiver"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_sender_s_allocations_are_reclaimed() {
    let receiver = tcp_receiver(4).await;
    // A raw sender: handshake, allocate two pages, then disappear without committing.
    let mut s = raw_sender(&receiver).await;
    raw_alloc(&mut s, "ghost", 2).await;
    assert_eq!(receiver.usage().used_pages, 2);
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while receiver.usage().used_pages != 0 {
        assert!(std::time::Instant::now() < deadline, "pages leaked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(receiver.metrics().pd_reclaimed_pages.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_whose_bytes_changed_in_flight_never_becomes_visible() {
    use kvtier::pd::protocol::{ChunkCommit, Message};
    use tokio::io::AsyncWriteExt;
    let receiver = tcp_receiver(4).await;
    // A raw sender: allocate two pages, write nothing, then commit one with the checksum
    // of what is there (zeros) and one with the checksum of bytes that never arrived.
    let mut s = raw_sender(&receiver).await;
    raw_alloc(&mut s, "r", 2).await;
    let zeros = vec![0u8; 256 * model().bytes_per_token()];
    let intended: Vec<u8> = (0..zeros.len()).map(|i| i as u8).collect();
    s.write_all(&frame(&Message::Commit {
        req_id: "r".into(),
        chunks: vec![
            ChunkCommit {
                key: kvtier::ChunkKey(1),
                checksum: xxhash_rust::xxh3::xxh3_64(&zeros),
            },
            ChunkCommit {
                key: kvtier::ChunkKey(2),
                checksum: xxhash_rust::xxh3::xxh3_64(&intended),
            },
        ],
    }))
    .await
    .unwrap();
    assert_eq!(
        read_msg(&mut s).await,
        Message::Committed { req_id: "r".into() }
    );
    // The intact chunk stays (committed), the other was dropped and counted.
    assert_eq!(receiver.usage().used_pages, 1);
    let corrupt = receiver
        .metrics()
        .corrupt_chunks
        .with_label_values(&["pd"])
        .get();
    assert_eq!(corrupt, 1);
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_decoder_stalls_no_other_send_and_sends_to_one_decoder_run_together() {
    let m = model();
    // A decoder whose every page is taken by a sender that never commits, and which lets
    // new senders wait for room for a long time.
    let mut full_config = receiver_config(TransferChannel::Tcp, 2, None);
    full_config.pd_allocation_timeout_sec = 60.0;
    let full = PdReceiver::start(
        &full_config.pd_receiver_settings(),
        m.clone(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let mut hog = raw_sender(&full).await;
    raw_alloc(&mut hog, "hog", 2).await;
    let sender = std::sync::Arc::new(tcp_sender().await);
    let stuck = {
        let (sender, spec) = (sender.clone(), spec(&full));
        let tokens: Vec<u32> = (0..512).collect();
        let kv = kv_for(&m, &tokens);
        tokio::spawn(async move { sender.send("stuck", &tokens, &kv, &spec).await })
    };
    // Give it time to reach the full decoder's allocation wait (if it has not, the rest
    // still checks that concurrent sends complete).
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Meanwhile eight requests to another decoder, all at once, all complete.
    let other = tcp_receiver(64).await;
    let sends: Vec<_> = (0..8u32)
        .map(|i| {
            let (sender, spec) = (sender.clone(), spec(&other));
            let tokens: Vec<u32> = (i * 10_000..i * 10_000 + 700).collect();
            let kv = kv_for(&m, &tokens);
            tokio::spawn(async move {
                let req = format!("r{i}");
                let sent = sender.send(&req, &tokens, &kv, &spec);
                let sent = tokio::time::timeout(Duration::from_secs(30), sent).await;
                (tokens, sent)
            })
        })
        .collect();
    for send in sends {
        let (tokens, sent) = send.await.unwrap();
        let report = sent.expect("not held up by the full decoder").unwrap();
        assert_eq!(report.tokens, 700);
        assert_eq!(other.lookup(&tokens), 700);
    }
    assert!(
        !stuck.is_finished(),
        "still waiting for room at the full decoder"
    );

    // The hog goes away: its pages are reclaimed and the waiting send goes through.
    drop(hog);
    let report = tokio::time::timeout(Duration::from_secs(30), stuck)
        .await
        .expect("the waiting send completes once there is room")
        .unwrap()
        .unwrap();
    assert_eq!(report.tokens, 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_freed_while_writes_may_land_are_reused_only_after_a_quarantine() {
    use kvtier::pd::protocol::Message;
    use tokio::io::AsyncWriteExt;
    let mut config = receiver_config(TransferChannel::Tcp, 4, None);
    config.transport_timeout_sec = 2.0; // the quarantine
    config.pd_allocation_timeout_sec = 30.0;
    let receiver = PdReceiver::start(&config.pd_receiver_settings(), model(), Metrics::new())
        .await
        .unwrap();
    // A sender takes two pages, then aborts (as one whose write failed does): its writes
    // may still be in flight, so the pages must not go to the next request yet.
    let mut first = raw_sender(&receiver).await;
    let mut aborted = raw_alloc_keys(&mut first, "aborted", 1, 2).await;
    first
        .write_all(&frame(&Message::Abort {
            req_id: "aborted".into(),
        }))
        .await
        .unwrap();
    assert!(matches!(
        read_msg(&mut first).await,
        Message::Committed { .. }
    ));
    let usage = receiver.usage();
    assert_eq!((usage.used_pages, usage.quarantined_pages), (0, 2));
    let quarantined = receiver.metrics().pd_buffer_quarantined_bytes.get();
    assert_eq!(quarantined as usize, 2 * usage.page_bytes);

    // The next request gets the two pages never used, not the aborted ones.
    let mut second = raw_sender(&receiver).await;
    let next = raw_alloc_keys(&mut second, "next", 10, 2).await;
    assert!(
        next.iter().all(|o| !aborted.contains(o)),
        "{next:?} vs {aborted:?}"
    );
    // One more waits for the quarantine to end, then gets the aborted pages.
    let mut third = raw_sender(&receiver).await;
    let mut later = raw_alloc_keys(&mut third, "later", 20, 2).await;
    later.sort_unstable();
    aborted.sort_unstable();
    assert_eq!(later, aborted);
    assert_eq!(receiver.usage().quarantined_pages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_control_connections_are_closed_and_senders_reconnect() {
    use tokio::io::AsyncReadExt;
    let m = model();
    let mut settings = receiver_config(TransferChannel::Tcp, 8, None).pd_receiver_settings();
    settings.control_idle = Duration::from_millis(300);
    let receiver = PdReceiver::start(&settings, m.clone(), Metrics::new())
        .await
        .unwrap();
    // A peer that authenticates, then says nothing, loses its connection (and its slot).
    let mut raw = raw_sender(&receiver).await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut byte))
        .await
        .expect("a silent connection is closed within the idle bound");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // A sender's pooled connection that the receiver closed that way is replaced, and the
    // send goes through.
    let sender = tcp_sender().await;
    for (i, req_id) in ["first", "after-idle"].into_iter().enumerate() {
        let tokens: Vec<u32> = (0..300).map(|t| t + 1000 * i as u32).collect();
        sender
            .send(req_id, &tokens, &kv_for(&m, &tokens), &spec(&receiver))
            .await
            .unwrap();
        assert_eq!(receiver.lookup(&tokens), 300);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// A full decoder delays a request that fits and never fails it: a request takes all its
/// pages at once, so senders whose requests span several staging waves never each hold part
/// of the buffer while waiting for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_the_staging_buffer_share_a_small_decoder_without_deadlock() {
    use std::sync::Arc;
    let m = model();
    // Four pages: one request of three chunks at a time.
    let receiver = Arc::new(tcp_receiver(4).await);
    let mut cfg = sender_config(TransferChannel::Tcp, None, None);
    // Two staging pages: each request travels in several waves.
    cfg.pd_buffer_size = 2 * (m.bytes_per_token() * 256) as u64;
    let sender = Arc::new(
        PdSender::new(&cfg.pd_sender_settings(), m.clone(), Metrics::new())
            .await
            .unwrap(),
    );
    let tasks: Vec<_> = (0..4u32)
        .map(|i| {
            let (sender, receiver, m) = (sender.clone(), receiver.clone(), m.clone());
            tokio::spawn(async move {
                let tokens: Vec<u32> = (i * 10_000..i * 10_000 + 768).collect();
                let kv = kv_for(&m, &tokens);
                let req = format!("r{i}");
                let report = sender
                    .send(&req, &tokens, &kv, &spec(&receiver))
                    .await
                    .unwrap_or_else(|e| panic!("{req}: {e}"));
                assert!(report.waves >= 2, "{req} went in {} wave(s)", report.waves);
                let mut out = vec![0u8; kv.len()];
                assert_eq!(
                    receiver.retrieve(&req, &tokens, &mut out).await.unwrap(),
                    768
                );
                assert!(out == kv, "{req}: decoder KV differs");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(receiver.usage().used_pages, 0);
}

/// A progressive send writes a chunk only once its producer says it is ready, commits it
/// while later chunks are still being computed, and ends byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progressive_send_moves_each_chunk_once_it_is_ready() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let m = model();
    let receiver = tcp_receiver(16).await;
    let sender = Arc::new(tcp_sender().await);
    let tokens: Vec<u32> = (0..1000).collect();
    let kv = Arc::new(kv_for(&m, &tokens));
    let ready = Arc::new(AtomicUsize::new(0));
    let early = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let send = {
        let (sender, kv, tokens, ready, early, to) = (
            sender.clone(),
            kv.clone(),
            tokens.clone(),
            ready.clone(),
            early.clone(),
            spec(&receiver),
        );
        tokio::spawn(async move {
            use kvtier::pd::ChunkSource;
            let gather = sender.gather_from(&kv, tokens.len());
            let fill = |span: &kvtier::keys::ChunkSpan, page: &mut [u8]| {
                if span.end > ready.load(Ordering::SeqCst) {
                    early.fetch_add(1, Ordering::SeqCst);
                }
                gather.fill(span, page);
            };
            sender
                .send_progressive("prog", &tokens, fill, rx, &to)
                .await
        })
    };
    // 300 tokens ready: the first chunk (256) travels and is committed, nothing else.
    for (step, visible) in [(300, 256), (600, 512)] {
        ready.store(step, Ordering::SeqCst);
        tx.send(step).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while receiver.lookup(&tokens) < visible && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(receiver.lookup(&tokens), visible, "{step} tokens ready");
    }
    ready.store(1000, Ordering::SeqCst);
    tx.send(1000).unwrap();
    let report = send.await.unwrap().unwrap();
    assert_eq!(report.tokens, 1000);
    assert_eq!(
        early.load(Ordering::SeqCst),
        0,
        "a chunk was gathered before it was ready"
    );
    let mut out = vec![0u8; kv.len()];
    assert_eq!(
        receiver.retrieve("prog", &tokens, &mut out).await.unwrap(),
        1000
    );
    assert!(out == *kv, "decoder KV differs from the prefiller's");
}

/// A producer that keeps ahead of the sender: each chunk's gathering makes the next one
/// ready, so the sender asks for more pages while the commit of the wave before is still
/// unanswered. The answers must be read in order: the commit's, then the allocation's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progressive_send_allocates_again_while_a_commit_is_unanswered() {
    use kvtier::pd::ChunkSource;
    let m = model();
    let receiver = tcp_receiver(16).await;
    let sender = tcp_sender().await;
    let tokens: Vec<u32> = (0..1024).collect();
    let kv = kv_for(&m, &tokens);
    let chunk = 256;
    let (tx, rx) = tokio::sync::watch::channel(chunk);
    let gather = sender.gather_from(&kv, tokens.len());
    let fill = |span: &kvtier::keys::ChunkSpan, page: &mut [u8]| {
        gather.fill(span, page);
        tx.send_replace((span.end + chunk).min(tokens.len()));
    };
    let report = sender
        .send_progressive("ahead", &tokens, fill, rx, &spec(&receiver))
        .await
        .unwrap();
    assert_eq!((report.tokens, report.waves), (1024, 4), "{report:?}");
    let mut out = vec![0u8; kv.len()];
    assert_eq!(
        receiver.retrieve("ahead", &tokens, &mut out).await.unwrap(),
        1024
    );
    assert!(out == kv, "decoder KV differs from the prefiller's");
}

/// A producer that stops short fails its progressive send with a clear error; the chunks
/// it finished stay committed, the pages granted for the rest are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progressive_send_whose_producer_stops_fails_and_returns_its_pages() {
    let m = model();
    let receiver = tcp_receiver(16).await;
    let sender = tcp_sender().await;
    let tokens: Vec<u32> = (0..1000).collect();
    let kv = kv_for(&m, &tokens);
    let (tx, rx) = tokio::sync::watch::channel(300usize);
    drop(tx);
    let err = sender
        .send_progressive(
            "stopped",
            &tokens,
            sender.gather_from(&kv, tokens.len()),
            rx,
            &spec(&receiver),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PdError::Incomplete {
                ready_tokens: 300,
                tokens: 1000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("300 of 1000 tokens"), "{err}");
    assert_eq!(receiver.lookup(&tokens), 256);
    assert_eq!(receiver.usage().used_pages, 1, "{:?}", receiver.usage());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_writes_only_pages_allocated_to_its_data_connection_and_reads_none() {
    use kvtier::pd::protocol::{ChunkCommit, ChunkRequest, Message, Slot};
    use kvtier::transport::{self, HostBuffer, RemoteAccess, RemoteIov, TransportConfig};
    use kvtier_transport::TransportError;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let m = model();
    let receiver = tcp_receiver(8).await;
    let sender = tcp_sender().await;
    let tokens: Vec<u32> = (0..512).collect();
    let kv = kv_for(&m, &tokens);
    sender
        .send("victim", &tokens, &kv, &spec(&receiver))
        .await
        .unwrap();
    // Any peer that passes the handshake (no secret configured: anyone) gets the
    // receiver's descriptor and can connect to its data plane ...
    let mut control = raw_sender(&receiver).await;
    control
        .write_all(&frame(&Message::GetDescriptor))
        .await
        .unwrap();
    let Message::Descriptor {
        descriptor,
        page_bytes,
        ..
    } = read_msg(&mut control).await
    else {
        panic!("no descriptor")
    };
    let region = kvtier_transport::Descriptor::decode(&descriptor, "tcp")
        .unwrap()
        .regions[0]
        .id;
    let rogue = transport::open(TransferChannel::Tcp, TransportConfig::default()).unwrap();
    let junk = Arc::new(HostBuffer::new(page_bytes as usize));
    junk.fill_pattern(0xbad);
    let junk_reg = rogue
        .register(junk.clone(), RemoteAccess::LocalOnly)
        .unwrap();
    let all = || [junk_reg.iov(0, page_bytes as usize).unwrap()];
    let page = |offset: u64| RemoteIov {
        region,
        offset,
        len: page_bytes,
    };
    let forbidden =
        |r: &Result<(), TransportError>| matches!(r, Err(TransportError::Forbidden { .. }));
    // ... but can overwrite no page (the victim's committed two among them) ...
    for i in 0..8 {
        let conn = rogue.connect(&descriptor).await.unwrap();
        let r = conn.write(&all(), &[page(i * page_bytes)]).await;
        assert!(forbidden(&r), "write into page {i}: {r:?}");
    }
    // ... nor read one.
    let reader = rogue.connect(&descriptor).await.unwrap();
    for i in 0..8 {
        let r = reader.read(&all(), &[page(i * page_bytes)]).await;
        assert!(forbidden(&r), "read of page {i}: {r:?}");
    }
    // A page allocated to its own request is writable through the data connection it
    // named, not through another, and not at all once committed.
    let own = rogue.connect(&descriptor).await.unwrap();
    control
        .write_all(&frame(&Message::Alloc {
            req_id: "rogue".into(),
            chunks: vec![ChunkRequest {
                key: kvtier::ChunkKey(77),
                tokens: 256,
            }],
            writer: own.writer_id().unwrap().0,
        }))
        .await
        .unwrap();
    let Message::Allocated { slots, .. } = read_msg(&mut control).await else {
        panic!("no pages")
    };
    let Slot::Page { offset } = slots[0] else {
        panic!("a fresh key is held")
    };
    let other = rogue.connect(&descriptor).await.unwrap();
    let r = other.write(&all(), &[page(offset)]).await;
    assert!(forbidden(&r), "write through another connection: {r:?}");
    own.write(&all(), &[page(offset)]).await.unwrap();
    control
        .write_all(&frame(&Message::Commit {
            req_id: "rogue".into(),
            chunks: vec![ChunkCommit {
                key: kvtier::ChunkKey(77),
                checksum: junk.digest(0, page_bytes as usize),
            }],
        }))
        .await
        .unwrap();
    assert!(matches!(
        read_msg(&mut control).await,
        Message::Committed { .. }
    ));
    let r = own.write(&all(), &[page(offset)]).await;
    assert!(forbidden(&r), "write after commit: {r:?}");
    // The victim's KV is intact.
    let mut out = vec![0u8; kv.len()];
    assert_eq!(
        receiver
            .retrieve("victim", &tokens, &mut out)
            .await
            .unwrap(),
        512
    );
    assert_eq!(out, kv, "the victim's KV was changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_from_registered_kv_arrives_verified_without_staging() {
    use kvtier::transport::HostBuffer;
    use std::sync::Arc;
    let m = model();
    let receiver = tcp_receiver(16).await;
    let sender = tcp_sender().await;
    let tokens: Vec<u32> = (0..700).collect();
    let kv = kv_for(&m, &tokens);
    // The KV at an offset inside a larger registered buffer (as in a KV cache).
    let offset = 4096;
    let memory = Arc::new(HostBuffer::new(offset + kv.len() + 4096));
    memory.write_at(offset, &kv);
    let registration = sender.register_kv(memory.clone()).unwrap();
    let planar = sender
        .planar_kv(registration.clone(), offset, tokens.len())
        .unwrap();
    let r = sender
        .send_registered("direct", &tokens, &planar, &spec(&receiver))
        .await
        .unwrap();
    assert_eq!((r.tokens, r.bytes), (700, kv.len() as u64));
    let mut out = vec![0u8; kv.len()];
    assert_eq!(
        receiver
            .retrieve("direct", &tokens, &mut out)
            .await
            .unwrap(),
        700
    );
    assert_eq!(out, kv, "decoder KV differs from the registered KV");
    // KV that does not fit its registration is refused before anything is sent.
    let err = sender
        .planar_kv(registration, offset + 8192, tokens.len())
        .err()
        .expect("past the end");
    assert!(matches!(err, PdError::Shape(_)), "{err}");
}

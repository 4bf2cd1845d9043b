//! The engine through its public API: store, lookup, retrieve, tiers, restart, metrics.

use kvtier::{ChunkShape, Config, Engine, Error, ModelSpec};

/// A small model so tests move little data (synthetic KV: test bytes, not a model's).
fn model() -> ModelSpec {
    let mut m = ModelSpec::llama_3_1_8b();
    m.layers = 2;
    m.kv_heads = 2;
    m
}

fn kv_for(model: &ModelSpec, tokens: &[u32]) -> Vec<u8> {
    let row = model.chunk_shape(1).row_bytes();
    let mut kv = vec![0u8; model.bytes_per_token() * tokens.len()];
    for (plane, p) in kv.chunks_mut(row * tokens.len().max(1)).enumerate() {
        for (i, b) in p.iter_mut().enumerate() {
            let t = tokens[i / row];
            *b = (t as usize * 31 + plane * 7 + i % row) as u8;
        }
    }
    kv
}

fn config(cpu_bytes: u64, disk: Option<&std::path::Path>) -> Config {
    Config {
        max_local_cpu_size: cpu_bytes,
        local_disk: disk.map(|d| d.to_path_buf()),
        max_local_disk_size: 1 << 30,
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_hits_and_bytes_round_trip() {
    let m = model();
    let engine = Engine::from_config(config(64 << 20, None), m.clone())
        .await
        .unwrap();
    let a: Vec<u32> = (0..700).collect();
    let mut b: Vec<u32> = (0..512).collect();
    b.extend(5000..5300);
    let r = engine.store(&a, &kv_for(&m, &a)).await.unwrap();
    assert_eq!((r.stored_tokens, r.cached_tokens), (700, 0));
    assert_eq!(engine.lookup(&b).await.unwrap(), 512);
    let r = engine.store(&b, &kv_for(&m, &b)).await.unwrap();
    assert_eq!((r.stored_tokens, r.cached_tokens), (300, 512));
    for tokens in [&a, &b] {
        let expected = kv_for(&m, tokens);
        let mut out = vec![0u8; expected.len()];
        let r = engine.retrieve(tokens, &mut out).await.unwrap();
        assert_eq!(r.tokens, tokens.len());
        assert_eq!(out, expected);
    }
    // A prompt diverging inside the first chunk hits nothing.
    let mut c = a.clone();
    c[3] = 99_999;
    assert_eq!(engine.lookup(&c).await.unwrap(), 0);
    let text = engine.metrics().encode_text();
    assert!(
        text.contains("kvtier_lookup_hit_tokens_total 512"),
        "{text}"
    );
    assert!(text.contains("kvtier_store_tokens_total 1000"), "{text}");
    assert!(
        text.contains("kvtier_tier_used_bytes{tier=\"cpu\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_retrieve_leaves_the_rest_untouched() {
    let m = model();
    let engine = Engine::from_config(config(64 << 20, None), m.clone())
        .await
        .unwrap();
    let short: Vec<u32> = (0..512).collect();
    engine.store(&short, &kv_for(&m, &short)).await.unwrap();
    let long: Vec<u32> = (0..800).collect();
    let expected = kv_for(&m, &long);
    let mut out = vec![0xEEu8; expected.len()];
    let r = engine.retrieve(&long, &mut out).await.unwrap();
    assert_eq!(r.tokens, 512);
    let row = m.chunk_shape(1).row_bytes();
    for plane in 0..(2 * m.layers as usize) {
        let base = plane * 800 * row;
        assert_eq!(
            out[base..base + 512 * row],
            expected[base..base + 512 * row]
        );
        assert!(out[base + 512 * row..base + 800 * row]
            .iter()
            .all(|&x| x == 0xEE));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_to_disk_and_restart() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let chunk_bytes = (m.bytes_per_token() * 256) as u64;
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|p| (p * 10_000..p * 10_000 + 768).collect())
        .collect();
    {
        // Room for 4 chunks in CPU; 12 chunks are stored.
        let engine = Engine::from_config(config(4 * chunk_bytes, Some(dir.path())), m.clone())
            .await
            .unwrap();
        for p in &prompts {
            engine.store(p, &kv_for(&m, p)).await.unwrap();
        }
        engine.flush().await.unwrap();
        let usage = engine.usage();
        assert_eq!(usage[0].1.objects, 4, "cpu holds its budget");
        assert!(usage[0].1.evictions >= 8);
        assert_eq!(usage[1].1.objects, 12, "disk holds everything");
        for p in &prompts {
            let mut out = vec![0u8; p.len() * m.bytes_per_token()];
            assert_eq!(engine.retrieve(p, &mut out).await.unwrap().tokens, 768);
            assert_eq!(out, kv_for(&m, p));
        }
        assert!(
            engine
                .metrics()
                .tier_hits
                .with_label_values(&["disk"])
                .get()
                >= 8
        );
    }
    let engine = Engine::from_config(config(4 * chunk_bytes, Some(dir.path())), m.clone())
        .await
        .unwrap();
    assert_eq!(engine.recovered().unwrap().chunks, 12);
    for p in &prompts {
        assert_eq!(engine.lookup(p).await.unwrap(), 768);
        let mut out = vec![0u8; p.len() * m.bytes_per_token()];
        engine.retrieve(p, &mut out).await.unwrap();
        assert_eq!(out, kv_for(&m, p));
    }
    // Different hash seed = different namespace of keys: nothing hits.
    let mut other = config(4 * chunk_bytes, Some(dir.path()));
    other.hash_seed = 1;
    let engine2 = Engine::from_config(other, m.clone()).await.unwrap();
    drop(engine);
    assert_eq!(engine2.lookup(&prompts[0]).await.unwrap(), 0);
}

/// Replaces chunk `key`'s file in the disk tier at `dir` with a well-formed chunk (valid
/// header and checksum) of `shape` whose payload is all `fill`.
fn plant_disk_chunk(dir: &std::path::Path, key: kvtier::ChunkKey, shape: ChunkShape, fill: u8) {
    let name = key.to_string();
    let path = dir.join(&name[..2]).join(format!("{name}.kvc"));
    assert!(path.is_file(), "{} was stored", path.display());
    let payload = vec![fill; shape.payload_len()];
    std::fs::write(&path, kvtier::chunk::encode_chunk(key, shape, &payload)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_chunk_of_another_shape_is_a_miss_never_a_panic_or_wrong_kv() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let a: Vec<u32> = (0..768).collect();
    let b: Vec<u32> = (5_000..5_768).collect();
    let (keys_a, keys_b) = {
        let engine = Engine::from_config(config(64 << 20, Some(dir.path())), m.clone())
            .await
            .unwrap();
        engine.store(&a, &kv_for(&m, &a)).await.unwrap();
        engine.store(&b, &kv_for(&m, &b)).await.unwrap();
        engine.flush().await.unwrap();
        (engine.chunk_keys(&a), engine.chunk_keys(&b))
    };
    let shape = m.chunk_shape(256);
    // Under a's second key: the same byte count laid out for another model (twice the
    // layers, half the width) — slicing by byte count alone would hand out its bytes.
    let same_bytes = ChunkShape {
        layers: shape.layers * 2,
        hidden: shape.hidden / 2,
        ..shape
    };
    assert_eq!(same_bytes.payload_len(), shape.payload_len());
    plant_disk_chunk(dir.path(), keys_a[1], same_bytes, 0xab);
    // Under b's second key: a chunk claiming more tokens than a chunk has (slicing by its
    // header would run past the caller's buffer).
    let longer = ChunkShape {
        tokens: 512,
        ..shape
    };
    plant_disk_chunk(dir.path(), keys_b[1], longer, 0xcd);

    let engine = Engine::from_config(config(64 << 20, Some(dir.path())), m.clone())
        .await
        .unwrap();
    for (tokens, what) in [(&a, "same byte count"), (&b, "longer")] {
        let mut out = vec![0u8; tokens.len() * m.bytes_per_token()];
        let report = engine.retrieve(tokens, &mut out).await.unwrap();
        assert_eq!(
            report.tokens, 256,
            "{what}: only the first chunk is the model's"
        );
        // The first chunk's rows in every plane are right; nothing else was written.
        let want = kv_for(&m, tokens);
        let row = m.chunk_shape(1).row_bytes();
        let plane = tokens.len() * row;
        for (p, (got, exp)) in out.chunks(plane).zip(want.chunks(plane)).enumerate() {
            assert_eq!(got[..256 * row], exp[..256 * row], "{what}: plane {p}");
            assert!(
                got[256 * row..].iter().all(|&x| x == 0),
                "{what}: plane {p}"
            );
        }
        let chunks = engine.retrieve_chunks(tokens).await.unwrap();
        assert_eq!(chunks.len(), 1, "{what}");
    }
    assert!(
        engine
            .metrics()
            .corrupt_chunks
            .with_label_values(&["shape"])
            .get()
            >= 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_store_and_retrieve() {
    let m = model();
    let engine = Engine::from_config(config(64 << 20, None), m.clone())
        .await
        .unwrap();
    let tokens: Vec<u32> = (0..300).collect();
    let spans = engine.chunk_spans(&tokens);
    let buffers: Vec<_> = spans
        .iter()
        .map(|s| {
            let mut b = engine.alloc(m.chunk_shape(s.tokens()).payload_len());
            b.fill(s.start as u8 + 1);
            b
        })
        .collect();
    let addrs: Vec<usize> = buffers.iter().map(|b| b.as_ptr() as usize).collect();
    engine.store_chunks(&tokens, buffers).await.unwrap();
    let chunks = engine.retrieve_chunks(&tokens).await.unwrap();
    assert_eq!(chunks.len(), 2);
    // The very buffers handed over are what the tier holds: no copy was made.
    let held: Vec<usize> = chunks
        .iter()
        .map(|c| c.payload().as_ptr() as usize)
        .collect();
    assert_eq!(held, addrs);
    assert!(chunks[1].payload().iter().all(|&b| b == 257u32 as u8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shape_errors_name_the_sizes() {
    let m = model();
    let engine = Engine::from_config(config(64 << 20, None), m.clone())
        .await
        .unwrap();
    let tokens: Vec<u32> = (0..10).collect();
    let err = engine.store(&tokens, &[0u8; 5]).await.unwrap_err();
    assert!(matches!(err, Error::Shape(_)));
    assert!(err.to_string().contains("5 bytes for 10 tokens"), "{err}");
    let err = engine.store_chunks(&tokens, vec![]).await.unwrap_err();
    assert!(err.to_string().contains("0 buffers for 1 chunks"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_partial_chunks_when_configured() {
    let m = model();
    let mut c = config(64 << 20, None);
    c.save_unfull_chunk = false;
    let engine = Engine::from_config(c, m.clone()).await.unwrap();
    let tokens: Vec<u32> = (0..700).collect();
    let r = engine.store(&tokens, &kv_for(&m, &tokens)).await.unwrap();
    assert_eq!(r.stored_tokens, 512);
    assert_eq!(engine.lookup(&tokens).await.unwrap(), 512);
}

#[tokio::test]
async fn reference_decoder_config_asks_for_a_host_buffer() {
    // The LMCache reference puts the P/D buffer on the GPU; this version keeps it in host
    // memory and says so.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/lmcache-1p1d-pd-decoder.yaml"
    );
    let config = Config::from_yaml_file(path).unwrap();
    let err = Engine::from_config(config, model()).await.unwrap_err();
    assert!(err.to_string().contains("pd_buffer_device"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_roles_from_yaml_move_kv_through_the_engine() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut decoder = Config::from_yaml_file(dir.join("pd-decoder.yaml")).unwrap();
    decoder.pd_peer_init_port = vec![0];
    decoder.pd_peer_alloc_port = vec![0];
    decoder.pd_buffer_size = 64 << 20;
    let mut prefiller = Config::from_yaml_file(dir.join("pd-prefiller.yaml")).unwrap();
    prefiller.pd_proxy_host = None;
    prefiller.pd_proxy_port = None;
    prefiller.pd_peer_host = Some("127.0.0.1".into());
    prefiller.pd_peer_init_port = vec![1];
    prefiller.pd_buffer_size = 16 << 20;
    let m = model();
    let decoder = Engine::from_config(decoder, m.clone()).await.unwrap();
    let prefiller = Engine::from_config(prefiller, m.clone()).await.unwrap();
    let (init_port, alloc_port) = decoder.pd_receiver().unwrap().ports();
    let to = kvtier::pd::ReceiverSpec {
        host: "127.0.0.1".into(),
        init_port,
        alloc_port,
    };
    let tokens: Vec<u32> = (0..700).collect();
    let kv = kv_for(&m, &tokens);
    assert!(prefiller
        .store(&tokens, &kv)
        .await
        .unwrap_err()
        .to_string()
        .contains("pd_sender"));
    prefiller
        .pd_sender()
        .unwrap()
        .send("r", &tokens, &kv, &to)
        .await
        .unwrap();
    assert_eq!(decoder.lookup(&tokens).await.unwrap(), 700);
    let mut out = vec![0u8; kv.len()];
    assert_eq!(
        decoder.retrieve(&tokens, &mut out).await.unwrap().tokens,
        700
    );
    assert_eq!(out, kv);
    assert_eq!(decoder.pd_receiver().unwrap().usage().used_pages, 0);
}

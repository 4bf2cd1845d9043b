//! Any bytes from a Redis server acting as the remote tier, read back through the engine:
//! the stored KV or a miss, never a panic or wrong KV.
//!
//! A minimal in-memory Redis (this target's own, on 127.0.0.1: `SET`, `GET`, `EXISTS`,
//! `DEL`, and `+OK` to anything else) holds what an engine stored. Then the input either
//! damages the stored values (flips, truncations, values swapped between keys, values
//! replaced by the input's bytes) or replaces the server's whole answer to the reads with
//! the input's raw bytes (any RESP, or none), and a fresh engine with no local tier
//! retrieves the prompt.
#![no_main]

#[path = "common/loopback.rs"]
mod loopback;

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvtier::{Config, Engine};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CHUNK: usize = 16;

#[derive(Default)]
struct Server {
    values: HashMap<Vec<u8>, Vec<u8>>,
    /// Answer the next `GET` pipeline with these bytes, then close.
    raw: Option<Vec<u8>>,
}

/// One RESP command (an array of bulk strings), or `None` at the end of the stream.
async fn read_command<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Option<Vec<Vec<u8>>> {
    let mut line = String::new();
    r.read_line(&mut line).await.ok()?;
    let n: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line).await.ok()?;
        let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
        let mut arg = vec![0; len + 2];
        r.read_exact(&mut arg).await.ok()?;
        arg.truncate(len);
        args.push(arg);
    }
    Some(args)
}

async fn serve(listener: TcpListener, server: Arc<Mutex<Server>>) {
    loopback::serve_each(listener, move |mut r, mut w| {
        let server = server.clone();
        async move {
            while let Some(args) = read_command(&mut r).await {
                let Some(cmd) = args.first() else { break };
                let (reply, last) = {
                    let mut s = server.lock().unwrap();
                    let raw = match cmd.to_ascii_uppercase().as_slice() {
                        b"GET" => s.raw.take(),
                        _ => None,
                    };
                    // The connection ends after a raw answer.
                    let last = raw.is_some();
                    let reply = raw.unwrap_or_else(|| match cmd.to_ascii_uppercase().as_slice() {
                        b"GET" => match args.get(1).and_then(|k| s.values.get(k)) {
                            Some(v) => {
                                let mut out = format!("${}\r\n", v.len()).into_bytes();
                                out.extend_from_slice(v);
                                out.extend_from_slice(b"\r\n");
                                out
                            }
                            None => b"$-1\r\n".to_vec(),
                        },
                        b"SET" if args.len() >= 3 => {
                            s.values.insert(args[1].clone(), args[2].clone());
                            b"+OK\r\n".to_vec()
                        }
                        b"EXISTS" => {
                            let n = args[1..]
                                .iter()
                                .filter(|k| s.values.contains_key(*k))
                                .count();
                            format!(":{n}\r\n").into_bytes()
                        }
                        b"DEL" => {
                            let n = args[1..]
                                .iter()
                                .filter(|k| s.values.remove(*k).is_some())
                                .count();
                            format!(":{n}\r\n").into_bytes()
                        }
                        b"PING" => b"+PONG\r\n".to_vec(),
                        _ => b"+OK\r\n".to_vec(),
                    });
                    (reply, last)
                };
                if w.write_all(&reply).await.is_err() || last {
                    break;
                }
            }
        }
    })
    .await
}

fuzz_target!(|data: &[u8]| {
    let Some((&[mode, a, b, c], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = Arc::new(Mutex::new(Server::default()));
        tokio::spawn(serve(listener, server.clone()));
        let m = common::small_model();
        let config = Config {
            local_cpu: false,
            chunk_size: CHUNK,
            remote_url: Some(format!("redis://127.0.0.1:{port}/")),
            transport_timeout_sec: 2.0,
            ..Config::default()
        };
        let tokens: Vec<u32> = (0..2 * CHUNK as u32).collect();
        let kv: Vec<u8> = (0..m.bytes_per_token() * tokens.len())
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        let engine = Engine::from_config(config.clone(), m.clone())
            .await
            .unwrap();
        engine.store(&tokens, &kv).await.unwrap();
        engine.flush().await.unwrap();
        drop(engine);

        {
            let mut s = server.lock().unwrap();
            if mode & 1 == 1 {
                s.raw = Some(rest.to_vec());
            } else {
                let mut keys: Vec<Vec<u8>> = s.values.keys().cloned().collect();
                keys.sort();
                if keys.len() == 2 && mode & 2 != 0 {
                    let (x, y) = (s.values[&keys[0]].clone(), s.values[&keys[1]].clone());
                    s.values.insert(keys[0].clone(), y);
                    s.values.insert(keys[1].clone(), x);
                }
                for (i, k) in keys.iter().enumerate() {
                    let v = s.values.get_mut(k).unwrap();
                    match (mode >> (2 + 2 * i)) & 3 {
                        0 => {}
                        1 if !v.is_empty() => {
                            let at = (a as usize * 131 + b as usize) % v.len();
                            v[at] ^= c | 1;
                        }
                        2 => v.truncate((a as usize * 64 + b as usize) % (v.len() + 1)),
                        _ => *v = rest.to_vec(),
                    }
                }
            }
        }

        let engine = Engine::from_config(config, m.clone()).await.unwrap();
        let mut out = vec![0u8; kv.len()];
        if let Ok(report) = engine.retrieve(&tokens, &mut out).await {
            assert!(report.tokens % CHUNK == 0 && report.tokens <= tokens.len());
            // What was loaded is the stored KV: each (K or V, layer) plane's first rows.
            let row = m.chunk_shape(1).row_bytes();
            let plane = tokens.len() * row;
            for (i, (got, want)) in out.chunks(plane).zip(kv.chunks(plane)).enumerate() {
                let n = report.tokens * row;
                assert_eq!(got[..n], want[..n], "wrong KV in plane {i}");
            }
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
});

//! A chunk file of any content in the disk tier, read back through the engine: the model's
//! KV or a miss, never a panic, whatever the header claims (shape, key, lengths) and
//! whether or not its checksum holds.
//!
//! The input picks header fields and payload bytes; the target writes a well-formed file
//! (valid checksum) from them — so shapes other than the model's get past the checksum —
//! and then, if the input asks, flips bytes anywhere in the file.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;

use kvtier::chunk::encode_chunk;
use kvtier::{ChunkShape, Config, DType, Engine, KvLayout};
use libfuzzer_sys::fuzz_target;

const CHUNK: usize = 16;

/// A runtime per input: dropped at the end of it, so no thread outlives the run (a
/// runtime kept in a static leaves its blocking threads to the leak checker at exit).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn dir() -> PathBuf {
    std::env::temp_dir().join(format!("kvtier-fuzz-disk-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&[pick, layers, tokens, hidden, dtype, layout, flips], rest)) =
        data.split_first_chunk::<7>()
    else {
        return;
    };
    let m = common::small_model();
    let tokens_in: Vec<u32> = (0..CHUNK as u32).collect();
    let dir = dir();
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config {
        local_cpu: false,
        local_disk: Some(dir.clone()),
        max_local_disk_size: 1 << 20,
        chunk_size: CHUNK,
        ..Config::default()
    };
    runtime().block_on(async {
        // Learn where the chunk's file goes: store the real chunk once, then overwrite it.
        let engine = Engine::from_config(config.clone(), m.clone())
            .await
            .unwrap();
        let key = engine.chunk_keys(&tokens_in)[0];
        let real = vec![7u8; m.bytes_per_token() * CHUNK];
        engine.store(&tokens_in, &real).await.unwrap();
        engine.flush().await.unwrap();
        drop(engine);
        let name = key.to_string();
        let path = dir.join(&name[..2]).join(format!("{name}.kvc"));
        let own = m.chunk_shape(CHUNK);
        let shape = if pick & 1 == 0 {
            own
        } else {
            ChunkShape {
                layers: layers as u32 % 5,
                tokens: tokens as u32 % 40,
                hidden: hidden as u32 % 20,
                dtype: DType::from_code(dtype % 8).unwrap_or(own.dtype),
                layout: KvLayout::from_code(layout % 5).unwrap_or(own.layout),
            }
        };
        let payload: Vec<u8> = rest
            .iter()
            .copied()
            .cycle()
            .take(shape.payload_len().min(1 << 16))
            .collect();
        let file_key = if pick & 2 == 0 {
            key
        } else {
            kvtier::ChunkKey(key.0 ^ 1)
        };
        let mut file = encode_chunk(file_key, shape, &payload);
        for i in 0..(flips % 4) as usize {
            if let Some(&at) = rest.get(i) {
                let at = at as usize % file.len().max(1);
                if let Some(b) = file.get_mut(at) {
                    *b ^= 0x5a;
                }
            }
        }
        std::fs::write(&path, &file).unwrap();

        let engine = Engine::from_config(config, m.clone()).await.unwrap();
        let mut out = vec![0u8; m.bytes_per_token() * CHUNK];
        if let Ok(report) = engine.retrieve(&tokens_in, &mut out).await {
            assert!(report.tokens == 0 || report.tokens == CHUNK);
            if report.tokens == CHUNK {
                // Only the model's own shape under the right key is ever loaded.
                assert_eq!((shape, file_key), (own, key));
            }
        }
    });
});

//! The disk tier's recovery scan over a directory of any content: chunk files well-formed
//! or not, under their own key's name or another's, in the right shard or not, half-written
//! temporaries, foreign files and directories. Never a panic; afterwards every indexed
//! chunk reads back under its own key with a valid checksum, the tier holds no more than
//! its capacity, and what the report counts adds up.
#![no_main]

use std::path::{Path, PathBuf};

use kvtier::chunk::{decode_chunk, encode_chunk};
use kvtier::memory::BufferPool;
use kvtier::tier::disk::DiskTier;
use kvtier::tier::Tier;
use kvtier::{ChunkKey, ChunkShape, DType, KvLayout};
use libfuzzer_sys::fuzz_target;

fn dir() -> PathBuf {
    std::env::temp_dir().join(format!("kvtier-fuzz-recovery-{}", std::process::id()))
}

fn shape(tokens: u32) -> ChunkShape {
    ChunkShape {
        layers: 1,
        tokens,
        hidden: 4,
        dtype: DType::F16,
        layout: KvLayout::Kv2Ltd,
    }
}

fn key(n: u8) -> ChunkKey {
    // Spread over a few shards (the first two hex digits of the name).
    ChunkKey(((n as u128 % 4) << 124) | (n as u128 % 7))
}

fn chunk_path(dir: &Path, name: &str, ext: &str) -> PathBuf {
    dir.join(&name[..2.min(name.len())])
        .join(format!("{name}.{ext}"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&capacity, mut rest)) = data.split_first() else {
        return;
    };
    let dir = dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut written = 0u64;
    // Each file: [what, key, tokens, flip, n] then n payload bytes.
    while let Some((&[what, k, tokens, flip, n], tail)) = rest.split_first_chunk::<5>() {
        let n = (n as usize).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
        let name = key(k).to_string();
        let tokens = tokens as u32 % 6;
        let payload: Vec<u8> = bytes
            .iter()
            .copied()
            .cycle()
            .take(shape(tokens).payload_len())
            .collect();
        let file_key = if what & 0x10 == 0 {
            key(k)
        } else {
            key(k.wrapping_add(1))
        };
        let mut content = match what & 0x20 {
            0 => encode_chunk(file_key, shape(tokens), &payload),
            _ => bytes.to_vec(),
        };
        if flip & 0x80 != 0 && !content.is_empty() {
            let at = flip as usize % content.len();
            content[at] ^= 0x41;
        }
        if flip & 0x40 != 0 {
            content.truncate(content.len().saturating_sub(1 + (flip as usize & 0x3f)));
        }
        let path = match what % 8 {
            0..=2 => chunk_path(&dir, &name, "kvc"),
            3 => chunk_path(&dir, &name, "kvc.tmp"),
            // In another shard's directory.
            4 => dir.join("ff").join(format!("{name}.kvc")),
            // A name that is no key.
            5 => dir
                .join(&name[..2])
                .join(format!("{}.kvc", &name[..(k as usize % 32)])),
            // A directory where a chunk file would be.
            6 => {
                let p = chunk_path(&dir, &name, "kvc");
                let _ = std::fs::create_dir_all(&p);
                continue;
            }
            // A file at the top, where shard directories live.
            _ => dir.join(&name[..2]),
        };
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if std::fs::write(&path, &content).is_ok() {
            written += 1;
        }
    }
    let capacity = capacity as u64 * 64;
    let Ok((tier, report)) = DiskTier::open(&dir, capacity, 4, BufferPool::new(0)) else {
        return;
    };
    assert!(report.chunks + report.discarded <= written && report.evicted <= report.chunks);
    let usage = tier.usage();
    assert!(usage.used_bytes <= capacity, "{usage:?} over {capacity}");
    assert_eq!(usage.objects, report.chunks - report.evicted);
    for k in 0..=255u8 {
        let key = key(k);
        if !tier.contains(key) {
            continue;
        }
        // Recovery checks names and headers; the payload's checksum is checked on read:
        // the chunk under its own key, or an error and the file gone.
        match tier.get(key) {
            Ok(Some(chunk)) => {
                assert_eq!(chunk.key, key);
                let file = encode_chunk(key, chunk.shape, chunk.payload());
                assert!(decode_chunk(&file).is_ok());
            }
            Ok(None) | Err(_) => assert!(!tier.contains(key), "{key} unreadable yet indexed"),
        }
    }
    drop(tier);
    let _ = std::fs::remove_dir_all(&dir);
});

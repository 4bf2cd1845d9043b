//! Content-addressed chunk keys.
//!
//! A token sequence is cut into chunks of `chunk_size` tokens. Chunk `i`'s key is
//! `h_i = xxh3_128(seed, h_{i-1} ‖ tokens_i)`, with `h_{-1} = xxh3_128(seed, namespace)`:
//! each key commits to every token before it and to the model namespace, and the hash is
//! seeded explicitly, so every process on every machine computes the same keys for the same
//! tokens (no per-process hash seed can make caches disagree).
//!
//! Byte encoding (stable, part of the on-disk and wire contract, pinned by
//! `tests/golden/keys.txt`): a key is hashed as its 16 bytes little-endian; tokens as
//! `u32` little-endian; the namespace as described in [`ModelNamespace::canonical_bytes`].

use std::fmt;
use std::str::FromStr;

use xxhash_rust::xxh3::Xxh3;

use crate::model::ModelNamespace;

/// 128-bit content address of one chunk of tokens (and of all tokens before it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub u128);

impl ChunkKey {
    /// The key's 16 bytes, little-endian (the form hashed into the next key and stored in chunk headers).
    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// Inverse of [`ChunkKey::to_le_bytes`].
    pub fn from_le_bytes(bytes: [u8; 16]) -> Self {
        ChunkKey(u128::from_le_bytes(bytes))
    }
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkKey({self})")
    }
}

/// Error for a string that is not 32 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a chunk key (32 hex digits)")]
pub struct ParseKeyError(String);

impl FromStr for ChunkKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            return Err(ParseKeyError(s.to_string()));
        }
        u128::from_str_radix(s, 16)
            .map(ChunkKey)
            .map_err(|_| ParseKeyError(s.to_string()))
    }
}

/// Cuts token sequences into chunks and computes their keys. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ChunkHasher {
    seed: u64,
    chunk_size: usize,
    root: u128,
    keep_partial: bool,
}

/// One chunk of a token sequence: its key and the token range it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    /// The chunk's content address.
    pub key: ChunkKey,
    /// First token (inclusive).
    pub start: usize,
    /// Last token (exclusive).
    pub end: usize,
}

impl ChunkSpan {
    /// Number of tokens in the chunk.
    pub fn tokens(&self) -> usize {
        self.end - self.start
    }
}

impl ChunkHasher {
    /// A hasher for `namespace` with `seed`; `keep_partial` keeps the last, partial chunk
    /// (`save_unfull_chunk`).
    pub fn new(namespace: &ModelNamespace, seed: u64, keep_partial: bool) -> Self {
        assert!(namespace.chunk_size > 0, "chunk_size must be > 0");
        let root = xxhash_rust::xxh3::xxh3_128_with_seed(&namespace.canonical_bytes(), seed);
        ChunkHasher {
            seed,
            chunk_size: namespace.chunk_size as usize,
            root,
            keep_partial,
        }
    }

    /// Tokens per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Whether the last, partial chunk gets a key.
    pub fn keeps_partial(&self) -> bool {
        self.keep_partial
    }

    /// `h_{-1}`: the key every chain starts from.
    pub fn root(&self) -> ChunkKey {
        ChunkKey(self.root)
    }

    /// The key of the chunk `tokens` following the chunk keyed `prev`.
    pub fn next_key(&self, prev: ChunkKey, tokens: &[u32]) -> ChunkKey {
        let mut h = Xxh3::with_seed(self.seed);
        h.update(&prev.to_le_bytes());
        hash_tokens(&mut h, tokens);
        ChunkKey(h.digest128())
    }

    /// Keys and token ranges of every chunk of `tokens`.
    pub fn spans(&self, tokens: &[u32]) -> Vec<ChunkSpan> {
        let mut out = Vec::with_capacity(tokens.len() / self.chunk_size + 1);
        self.for_each_span(tokens, |span| {
            out.push(span);
            true
        });
        out
    }

    /// Keys of every chunk of `tokens`.
    pub fn keys(&self, tokens: &[u32]) -> Vec<ChunkKey> {
        let mut out = Vec::with_capacity(tokens.len() / self.chunk_size + 1);
        self.for_each_span(tokens, |span| {
            out.push(span.key);
            true
        });
        out
    }

    /// Calls `f` with each chunk in order until it returns `false`; chunks after a stop are
    /// not hashed (a prefix lookup hashes only as far as it hits).
    pub fn for_each_span(&self, tokens: &[u32], mut f: impl FnMut(ChunkSpan) -> bool) {
        let mut prev = self.root();
        let mut start = 0;
        while start < tokens.len() {
            let end = (start + self.chunk_size).min(tokens.len());
            if end - start < self.chunk_size && !self.keep_partial {
                return;
            }
            let key = self.next_key(prev, &tokens[start..end]);
            if !f(ChunkSpan { key, start, end }) {
                return;
            }
            prev = key;
            start = end;
        }
    }
}

#[cfg(target_endian = "little")]
fn hash_tokens(h: &mut Xxh3, tokens: &[u32]) {
    h.update(bytemuck::cast_slice(tokens));
}

#[cfg(not(target_endian = "little"))]
fn hash_tokens(h: &mut Xxh3, tokens: &[u32]) {
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DType, KvLayout};

    fn ns(chunk: u32) -> ModelNamespace {
        ModelNamespace {
            model: "meta-llama/Llama-3.1-8B-Instruct".into(),
            dtype: DType::Bf16,
            layout: KvLayout::Kv2Ltd,
            layers: 32,
            hidden: 1024,
            tp_size: 1,
            tp_rank: 0,
            chunk_size: chunk,
        }
    }

    #[test]
    fn keys_chain_over_prefix() {
        let h = ChunkHasher::new(&ns(4), 0, true);
        let a: Vec<u32> = (0..10).collect();
        let mut b = a.clone();
        b[9] = 99;
        let ka = h.keys(&a);
        let kb = h.keys(&b);
        assert_eq!(ka.len(), 3);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
        // Changing an early token changes every later key.
        b[0] = 7;
        let kc = h.keys(&b);
        assert!(ka.iter().zip(&kc).all(|(x, y)| x != y));
    }

    #[test]
    fn partial_chunk_dropped_unless_kept() {
        let tokens: Vec<u32> = (0..10).collect();
        assert_eq!(ChunkHasher::new(&ns(4), 0, false).keys(&tokens).len(), 2);
        let spans = ChunkHasher::new(&ns(4), 0, true).spans(&tokens);
        assert_eq!(spans.last().map(|s| (s.start, s.end)), Some((8, 10)));
    }

    #[test]
    fn seed_and_namespace_separate_keys() {
        let tokens: Vec<u32> = (0..8).collect();
        let base = ChunkHasher::new(&ns(4), 0, true).keys(&tokens);
        assert_ne!(base, ChunkHasher::new(&ns(4), 1, true).keys(&tokens));
        let mut other = ns(4);
        other.tp_rank = 1;
        assert_ne!(base, ChunkHasher::new(&other, 0, true).keys(&tokens));
    }

    #[test]
    fn key_text_round_trip() {
        let k = ChunkKey(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(k.to_string().parse::<ChunkKey>().unwrap(), k);
        assert!("xyz".parse::<ChunkKey>().is_err());
    }
}

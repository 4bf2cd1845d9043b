//! Synthetic data for tests, demos and the stand-in inference engine (`kvtier test-server`):
//! a deterministic word tokenizer, reproducible token ids, KV derived from token ids, and
//! deterministic "generated" tokens. No model is involved anywhere in this module.
//!
//! The KV generator is a pure function of the model shape and the token sequence, so two
//! processes (a prefiller and a decoder, say) that see the same tokens compute the same
//! bytes and can verify a transfer byte for byte.

use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use kvtier::model::ModelSpec;

/// Size of the synthetic vocabulary (Llama-3's): every token id this module produces is
/// below it.
pub const VOCAB_SIZE: u32 = 128_256;

/// Synthetic KV for `tokens` in the model's `[kv_factor, layers, tokens, hidden]` layout
/// (the layout [`kvtier::Engine::store`] takes): each token's rows are pseudo-random bytes
/// seeded by a hash chained over all tokens up to it, so prompts that share a prefix share
/// that prefix's KV, as a real model's would. Returns
/// `model.bytes_per_token() * tokens.len()` bytes. Uses every core (rayon).
pub fn kv_for_tokens(model: &ModelSpec, tokens: &[u32]) -> Vec<u8> {
    let mut kv = vec![0u8; model.bytes_per_token() * tokens.len()];
    fill_kv(model, tokens, &mut kv);
    kv
}

/// [`kv_for_tokens`] into a caller-provided buffer of exactly
/// `model.bytes_per_token() * tokens.len()` bytes; a buffer of another length is filled
/// only as far as whole rows reach (nothing is written past its end).
pub fn fill_kv(model: &ModelSpec, tokens: &[u32], out: &mut [u8]) {
    if tokens.is_empty() {
        return;
    }
    let seeds = chained_seeds(tokens);
    let row = model.chunk_shape(1).row_bytes();
    if row == 0 {
        return;
    }
    out.par_chunks_mut(row * tokens.len())
        .enumerate()
        .for_each(|(plane, dst)| {
            for (seed, out) in seeds.iter().zip(dst.chunks_exact_mut(row)) {
                fill_row(*seed, plane, out);
            }
        });
}

/// One token's row of one (kv, layer) plane: splitmix64 output seeded by the token's
/// chained hash and the plane.
fn fill_row(seed: u64, plane: usize, out: &mut [u8]) {
    let mut s = seed ^ (plane as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for word in out.chunks_mut(8) {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let bytes = (z ^ (z >> 31)).to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

fn chained_seeds(tokens: &[u32]) -> Vec<u64> {
    let mut h = 0x6b76_7469_6572u64;
    tokens
        .iter()
        .map(|&t| {
            h = xxh3_64_with_seed(&t.to_le_bytes(), h);
            h
        })
        .collect()
}

/// Whether the first `loaded` tokens of `kv` — KV laid out for all of `tokens`, as
/// [`kv_for_tokens`] lays it out — equal the synthetic KV of those tokens, byte for byte.
/// False when `kv` has the wrong length or `loaded` exceeds `tokens.len()`.
pub fn matches_kv_prefix(model: &ModelSpec, tokens: &[u32], kv: &[u8], loaded: usize) -> bool {
    let row = model.chunk_shape(1).row_bytes();
    let plane = row * tokens.len();
    if loaded > tokens.len() || kv.len() != model.bytes_per_token() * tokens.len() {
        return false;
    }
    if loaded == 0 || plane == 0 {
        return true;
    }
    // Row by row into a small scratch buffer: no gigabyte-sized expected copy.
    let seeds = chained_seeds(&tokens[..loaded]);
    kv.par_chunks(plane).enumerate().all(|(p, got)| {
        let mut scratch = vec![0u8; row];
        seeds
            .iter()
            .zip(got.chunks_exact(row))
            .all(|(seed, got_row)| {
                fill_row(*seed, p, &mut scratch);
                scratch == got_row
            })
    })
}

/// `n` reproducible pseudo-random token ids (below [`VOCAB_SIZE`]) for `seed`.
pub fn token_ids(seed: u64, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (xxh3_64_with_seed(&i.to_le_bytes(), seed) % VOCAB_SIZE as u64) as u32)
        .collect()
}

/// The synthetic tokenizer: splits `text` on whitespace and hashes each word (xxh3-64) to
/// a token id below [`VOCAB_SIZE`]. Deterministic in every process; not a real tokenizer.
pub fn tokenize(text: &str) -> Vec<u32> {
    text.split_whitespace().map(word_token).collect()
}

/// The token id of one word (see [`tokenize`]).
pub fn word_token(word: &str) -> u32 {
    (xxh3_64(word.as_bytes()) % VOCAB_SIZE as u64) as u32
}

/// Words the synthetic generator emits.
const WORDS: &[&str] = &[
    "the",
    "cache",
    "holds",
    "every",
    "token",
    "and",
    "layer",
    "of",
    "a",
    "prompt",
    "so",
    "decode",
    "starts",
    "at",
    "once",
    "while",
    "prefill",
    "runs",
    "elsewhere",
    "keys",
    "are",
    "chained",
    "over",
    "chunks",
    "that",
    "share",
    "their",
    "prefix",
    "in",
    "memory",
    "on",
    "disk",
];

/// Deterministic "generated" text for a prompt: token `index` (0-based) of the answer to
/// `prompt`, as a word with a leading space. The same prompt always yields the same answer,
/// so a prefiller's first token equals the decoder's first token.
pub fn generated_word(prompt: &[u32], index: usize) -> String {
    let seed = xxh3_64(bytemuck::cast_slice(prompt));
    let pick = xxh3_64_with_seed(&(index as u64).to_le_bytes(), seed) % WORDS.len() as u64;
    format!(" {}", WORDS[pick as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ModelSpec {
        let mut m = ModelSpec::llama_3_1_8b();
        m.layers = 2;
        m.kv_heads = 2;
        m.head_dim = 4;
        m
    }

    #[test]
    fn kv_is_deterministic_and_prefix_stable() {
        let m = small();
        let a = token_ids(1, 40);
        let kv = kv_for_tokens(&m, &a);
        assert_eq!(kv.len(), m.bytes_per_token() * a.len());
        assert_eq!(kv, kv_for_tokens(&m, &a));
        // The KV of a prefix is the prefix's rows of each plane.
        let p = &a[..10];
        let kvp = kv_for_tokens(&m, p);
        let row = m.chunk_shape(1).row_bytes();
        for plane in 0..kv.len() / (row * a.len()) {
            let full = &kv[plane * row * a.len()..][..row * p.len()];
            assert_eq!(full, &kvp[plane * row * p.len()..][..row * p.len()]);
        }
        assert_ne!(kv_for_tokens(&m, &token_ids(2, 40)), kv);
    }

    #[test]
    fn prefix_check_catches_one_flipped_byte() {
        let m = small();
        let t = token_ids(3, 30);
        let mut kv = kv_for_tokens(&m, &t);
        assert!(matches_kv_prefix(&m, &t, &kv, 30));
        // Only the first 12 tokens "loaded": the rest of each plane is ignored.
        let row = m.chunk_shape(1).row_bytes();
        kv[row * 20] ^= 1;
        assert!(!matches_kv_prefix(&m, &t, &kv, 30));
        assert!(matches_kv_prefix(&m, &t, &kv, 12));
        // A byte of token 5 in the second plane.
        kv[row * 30 + row * 5 + 3] ^= 0x80;
        assert!(!matches_kv_prefix(&m, &t, &kv, 12));
        assert!(!matches_kv_prefix(&m, &t, &kv[1..], 1));
        assert!(!matches_kv_prefix(&m, &t, &kv, 31));
    }

    #[test]
    fn tokenizer_is_whitespace_words() {
        let t = tokenize("  The future\tof AI\nis ");
        assert_eq!(t.len(), 5);
        assert!(t.iter().all(|&x| x < VOCAB_SIZE));
        assert_eq!(t, tokenize("The future of AI is"));
        assert_eq!(t[0], word_token("The"));
        assert!(tokenize("").is_empty());
    }

    #[test]
    fn generation_is_deterministic() {
        let p = tokenize("hello world");
        assert_eq!(generated_word(&p, 3), generated_word(&p, 3));
        assert!(generated_word(&p, 0).starts_with(' '));
    }
}

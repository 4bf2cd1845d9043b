//! Payload checksums: the XXH3-64 (seed 0) of bulk bytes — chunk payloads and headers,
//! P/D pages, remote-store values, descriptor bodies — that one kvtier process computes
//! and another (or a later read) verifies.
//!
//! The implementation picks the widest SIMD the CPU offers at run time (AVX2, else SSE2,
//! on x86-64; NEON on aarch64), so a portable build hashes at the speed of one built for
//! the machine. Every value equals the reference XXH3-64, so chunk files and commits made
//! by any earlier kvtier build verify unchanged. Chunk *keys* are not checksums: the
//! engine derives them from token ids (its `keys` module).

use std::hash::Hasher as _;

/// The XXH3-64 of `bytes`, with the widest SIMD the CPU offers (chosen at run time); the
/// value every kvtier build computes for payloads and verifies.
pub fn checksum(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

/// The XXH3-64 of bytes fed in pieces: [`Checksum::digest`] equals [`checksum`] of the
/// pieces' concatenation, however they were split.
#[derive(Clone, Default)]
pub struct Checksum(twox_hash::XxHash3_64);

impl Checksum {
    /// A checksum of no bytes yet.
    pub fn new() -> Checksum {
        Checksum::default()
    }

    /// Feeds the next `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    /// The checksum of every byte fed so far.
    pub fn digest(&self) -> u64 {
        self.0.finish()
    }
}

impl std::fmt::Debug for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checksum")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal to the reference implementation across XXH3's length classes (0, 1–3, 4–8,
    /// 9–16, 17–128, 129–240, long inputs around its 1,024-byte blocks, and a chunk-sized
    /// input), one-shot and streamed in uneven pieces.
    #[test]
    fn equals_the_reference_xxh3_one_shot_and_streamed() {
        let mut data = vec![0u8; (33 << 20) + 77];
        crate::memory::pattern(0x6b76, 0, &mut data);
        let lens = [
            0usize,
            1,
            3,
            4,
            8,
            9,
            16,
            17,
            128,
            129,
            240,
            241,
            1023,
            1024,
            1025,
            64 * 1024 + 13,
            1 << 20,
            data.len(),
        ];
        for len in lens {
            let input = &data[..len];
            let reference = xxhash_rust::xxh3::xxh3_64(input);
            assert_eq!(checksum(input), reference, "one-shot, {len} bytes");
            for step in [1usize, 7, 64, 255, 4096, 512 << 10] {
                let mut streamed = Checksum::new();
                for piece in input.chunks(step) {
                    streamed.update(piece);
                }
                assert_eq!(
                    streamed.digest(),
                    reference,
                    "{len} bytes in {step}-byte pieces"
                );
            }
        }
    }
}

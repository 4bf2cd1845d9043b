//! The chunk format: how one chunk of KV travels on disk and over the wire.
//!
//! A chunk is a 64-byte header followed by the payload:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4  | magic `KVTC` |
//! | 4  | 2  | format version (`u16` LE, currently 1) |
//! | 6  | 1  | KV layout code ([`KvLayout`]) |
//! | 7  | 1  | dtype code ([`DType`]) |
//! | 8  | 4  | layers (`u32` LE) |
//! | 12 | 4  | tokens (`u32` LE) |
//! | 16 | 4  | hidden: elements per token per layer (`u32` LE) |
//! | 20 | 4  | reserved, zero |
//! | 24 | 16 | chunk key (`u128` LE) |
//! | 40 | 8  | payload length in bytes (`u64` LE) |
//! | 48 | 8  | payload checksum, xxh3-64 (`u64` LE) |
//! | 56 | 8  | header checksum: xxh3-64 of bytes 0..56 (`u64` LE) |
//!
//! Decoding validates every field and bound before it touches the payload; a bad chunk is
//! a [`CorruptChunk`] error, never wrong KV and never a panic.

use std::fmt;
use std::str::FromStr;

use xxhash_rust::xxh3::xxh3_64;

use crate::keys::ChunkKey;

/// Size of the encoded header.
pub const HEADER_LEN: usize = 64;
/// First four bytes of every chunk.
pub const MAGIC: [u8; 4] = *b"KVTC";
/// Format version written by this build.
pub const FORMAT_VERSION: u16 = 1;

/// Element type of the KV tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16 (2 bytes).
    Bf16,
    /// IEEE half (2 bytes).
    F16,
    /// IEEE single (4 bytes).
    F32,
    /// FP8 E4M3 (1 byte).
    Fp8E4m3,
    /// FP8 E5M2 (1 byte).
    Fp8E5m2,
    /// Raw bytes (1 byte).
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::Fp8E4m3 | DType::Fp8E5m2 | DType::U8 => 1,
        }
    }

    /// Code stored in chunk headers and hashed into the namespace.
    pub fn code(self) -> u8 {
        match self {
            DType::Bf16 => 1,
            DType::F16 => 2,
            DType::F32 => 3,
            DType::Fp8E4m3 => 4,
            DType::Fp8E5m2 => 5,
            DType::U8 => 6,
        }
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => DType::Bf16,
            2 => DType::F16,
            3 => DType::F32,
            4 => DType::Fp8E4m3,
            5 => DType::Fp8E5m2,
            6 => DType::U8,
            _ => return None,
        })
    }

    /// Canonical name (`bfloat16`, `float16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::Fp8E4m3 => "fp8_e4m3",
            DType::Fp8E5m2 => "fp8_e5m2",
            DType::U8 => "uint8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for an unknown dtype or layout name.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} `{value}`; expected one of: {expected}")]
pub struct ParseNameError {
    what: &'static str,
    value: String,
    expected: &'static str,
}

impl FromStr for DType {
    type Err = ParseNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().trim_start_matches("torch.").to_ascii_lowercase();
        Ok(match s.as_str() {
            "bfloat16" | "bf16" => DType::Bf16,
            "float16" | "fp16" | "half" => DType::F16,
            "float32" | "fp32" | "float" => DType::F32,
            "fp8_e4m3" | "float8_e4m3fn" | "fp8" => DType::Fp8E4m3,
            "fp8_e5m2" | "float8_e5m2" => DType::Fp8E5m2,
            "uint8" | "u8" => DType::U8,
            _ => {
                return Err(ParseNameError {
                    what: "dtype",
                    value: s,
                    expected: "bfloat16, float16, float32, fp8_e4m3, fp8_e5m2, uint8",
                })
            }
        })
    }
}

/// How a chunk's payload is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// `[2 (K,V), layers, tokens, hidden]`, LMCache's `KV_2LTD`.
    Kv2Ltd,
    /// `[1, layers, tokens, hidden]`: multi-head latent attention (one latent per token).
    Mla1Ltd,
    /// Whole blocks of a serving engine's paged KV cache, `[layers, blocks, block]`, each
    /// block opaque bytes in the attention backend's own layout (vLLM's CPU backend stores
    /// K transposed inside a block). Same byte count as `KV_2LTD`; the block layout and
    /// size belong in the model name of the key namespace, so different layouts never
    /// share keys.
    Paged,
}

impl KvLayout {
    /// Leading dimension: 2 for K and V, 1 for MLA.
    pub fn kv_factor(self) -> usize {
        match self {
            KvLayout::Kv2Ltd | KvLayout::Paged => 2,
            KvLayout::Mla1Ltd => 1,
        }
    }

    /// Code stored in chunk headers and hashed into the namespace.
    pub fn code(self) -> u8 {
        match self {
            KvLayout::Kv2Ltd => 1,
            KvLayout::Mla1Ltd => 2,
            KvLayout::Paged => 3,
        }
    }

    /// Inverse of [`KvLayout::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(KvLayout::Kv2Ltd),
            2 => Some(KvLayout::Mla1Ltd),
            3 => Some(KvLayout::Paged),
            _ => None,
        }
    }

    /// Canonical name (`KV_2LTD`, `MLA_1LTD`, `PAGED`).
    pub fn name(self) -> &'static str {
        match self {
            KvLayout::Kv2Ltd => "KV_2LTD",
            KvLayout::Mla1Ltd => "MLA_1LTD",
            KvLayout::Paged => "PAGED",
        }
    }
}

impl fmt::Display for KvLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvLayout {
    type Err = ParseNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "KV_2LTD" | "2LTD" => Ok(KvLayout::Kv2Ltd),
            "MLA_1LTD" | "MLA" | "1LTD" => Ok(KvLayout::Mla1Ltd),
            "PAGED" => Ok(KvLayout::Paged),
            _ => Err(ParseNameError {
                what: "KV layout",
                value: s.to_string(),
                expected: "KV_2LTD, MLA_1LTD, PAGED",
            }),
        }
    }
}

/// Shape of one chunk's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkShape {
    /// Payload layout.
    pub layout: KvLayout,
    /// Element type.
    pub dtype: DType,
    /// Transformer layers.
    pub layers: u32,
    /// Tokens in this chunk.
    pub tokens: u32,
    /// Elements per token per layer (KV heads × head dim).
    pub hidden: u32,
}

impl ChunkShape {
    /// Payload bytes, or `None` if the shape overflows `u64`.
    pub fn checked_payload_len(&self) -> Option<u64> {
        (self.layout.kv_factor() as u64)
            .checked_mul(self.layers as u64)?
            .checked_mul(self.tokens as u64)?
            .checked_mul(self.hidden as u64)?
            .checked_mul(self.dtype.size() as u64)
    }

    /// Payload bytes. Shapes built from a [`crate::ModelSpec`] never overflow.
    pub fn payload_len(&self) -> usize {
        self.checked_payload_len()
            .and_then(|n| usize::try_from(n).ok())
            .expect("chunk shape overflows usize")
    }

    /// Bytes of one token's row in one (kv, layer) plane.
    pub fn row_bytes(&self) -> usize {
        self.hidden as usize * self.dtype.size()
    }
}

/// Why a chunk failed to decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CorruptReason {
    /// Fewer bytes than a header.
    #[error("{0} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    /// The magic is not `KVTC`.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A format version this build cannot read.
    #[error("unsupported format version {0} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    /// The header checksum does not match.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// Unknown layout code.
    #[error("unknown layout code {0}")]
    UnknownLayout(u8),
    /// Unknown dtype code.
    #[error("unknown dtype code {0}")]
    UnknownDType(u8),
    /// The reserved field is not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// The payload length disagrees with the shape.
    #[error("payload length {header} does not match shape ({shape:?} bytes)")]
    LengthMismatch {
        /// Length in the header.
        header: u64,
        /// Length implied by the shape, `None` on overflow.
        shape: Option<u64>,
    },
    /// Fewer payload bytes than the header promises.
    #[error("truncated: payload needs {expected} bytes, {actual} present")]
    Truncated {
        /// Bytes the header promises.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// Bytes after the payload.
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(u64),
    /// The payload checksum does not match.
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    /// The chunk holds a different key than the one asked for.
    #[error("holds key {found}, expected {expected}")]
    KeyMismatch {
        /// Key asked for.
        expected: ChunkKey,
        /// Key in the header.
        found: ChunkKey,
    },
}

/// A chunk that failed validation; `key` is set when the header was trustworthy enough to name it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("corrupt chunk {}: {reason}", key.map(|k| k.to_string()).unwrap_or_else(|| "(unknown key)".into()))]
pub struct CorruptChunk {
    /// Key of the chunk, when known.
    pub key: Option<ChunkKey>,
    /// What was wrong.
    pub reason: CorruptReason,
}

/// A decoded, validated chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// The chunk's key.
    pub key: ChunkKey,
    /// Payload shape.
    pub shape: ChunkShape,
    /// Payload bytes.
    pub payload_len: u64,
    /// xxh3-64 of the payload.
    pub payload_checksum: u64,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl ChunkHeader {
    /// Header for `payload`, computing its checksum.
    pub fn for_payload(key: ChunkKey, shape: ChunkShape, payload: &[u8]) -> Self {
        ChunkHeader {
            key,
            shape,
            payload_len: payload.len() as u64,
            payload_checksum: xxh3_64(payload),
        }
    }

    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[6] = self.shape.layout.code();
        h[7] = self.shape.dtype.code();
        h[8..12].copy_from_slice(&self.shape.layers.to_le_bytes());
        h[12..16].copy_from_slice(&self.shape.tokens.to_le_bytes());
        h[16..20].copy_from_slice(&self.shape.hidden.to_le_bytes());
        h[24..40].copy_from_slice(&self.key.to_le_bytes());
        h[40..48].copy_from_slice(&self.payload_len.to_le_bytes());
        h[48..56].copy_from_slice(&self.payload_checksum.to_le_bytes());
        let sum = xxh3_64(&h[..56]);
        h[56..64].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Decodes and validates the header at the start of `bytes` (only the first
    /// [`HEADER_LEN`] bytes are read).
    pub fn decode(bytes: &[u8]) -> Result<Self, CorruptChunk> {
        let corrupt = |key, reason| CorruptChunk { key, reason };
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(None, CorruptReason::TooShort(bytes.len())));
        }
        let h = &bytes[..HEADER_LEN];
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(corrupt(None, CorruptReason::BadMagic(magic)));
        }
        let version = le_u16(h, 4);
        if version != FORMAT_VERSION {
            return Err(corrupt(None, CorruptReason::UnsupportedVersion(version)));
        }
        if xxh3_64(&h[..56]) != le_u64(h, 56) {
            return Err(corrupt(None, CorruptReason::HeaderChecksum));
        }
        let mut key_bytes = [0u8; 16];
        key_bytes.copy_from_slice(&h[24..40]);
        let key = Some(ChunkKey::from_le_bytes(key_bytes));
        let layout =
            KvLayout::from_code(h[6]).ok_or(corrupt(key, CorruptReason::UnknownLayout(h[6])))?;
        let dtype =
            DType::from_code(h[7]).ok_or(corrupt(key, CorruptReason::UnknownDType(h[7])))?;
        if le_u32(h, 20) != 0 {
            return Err(corrupt(key, CorruptReason::Reserved));
        }
        let shape = ChunkShape {
            layout,
            dtype,
            layers: le_u32(h, 8),
            tokens: le_u32(h, 12),
            hidden: le_u32(h, 16),
        };
        let payload_len = le_u64(h, 40);
        let implied = shape.checked_payload_len();
        if implied != Some(payload_len) || usize::try_from(payload_len).is_err() {
            return Err(corrupt(
                key,
                CorruptReason::LengthMismatch {
                    header: payload_len,
                    shape: implied,
                },
            ));
        }
        Ok(ChunkHeader {
            key: ChunkKey::from_le_bytes(key_bytes),
            shape,
            payload_len,
            payload_checksum: le_u64(h, 48),
        })
    }

    /// Checks `payload` against the header's length and checksum.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), CorruptChunk> {
        self.verify_payload_len(payload)?;
        if xxh3_64(payload) != self.payload_checksum {
            return Err(CorruptChunk {
                key: Some(self.key),
                reason: CorruptReason::PayloadChecksum,
            });
        }
        Ok(())
    }

    /// Checks `payload` against the header's length only (for bytes whose integrity a
    /// transport or store already checked end to end).
    pub fn verify_payload_len(&self, payload: &[u8]) -> Result<(), CorruptChunk> {
        if payload.len() as u64 != self.payload_len {
            return Err(CorruptChunk {
                key: Some(self.key),
                reason: CorruptReason::Truncated {
                    expected: self.payload_len,
                    actual: payload.len() as u64,
                },
            });
        }
        Ok(())
    }
}

/// Encodes a whole chunk (header + payload) into a new vector.
pub fn encode_chunk(key: ChunkKey, shape: ChunkShape, payload: &[u8]) -> Vec<u8> {
    let header = ChunkHeader::for_payload(key, shape, payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

/// Decodes a whole chunk, validating header, length and both checksums; returns the header
/// and the payload (borrowed, not copied).
pub fn decode_chunk(bytes: &[u8]) -> Result<(ChunkHeader, &[u8]), CorruptChunk> {
    let header = ChunkHeader::decode(bytes)?;
    let body = &bytes[HEADER_LEN..];
    let expected = header.payload_len;
    let actual = body.len() as u64;
    if actual < expected {
        return Err(CorruptChunk {
            key: Some(header.key),
            reason: CorruptReason::Truncated { expected, actual },
        });
    }
    if actual > expected {
        return Err(CorruptChunk {
            key: Some(header.key),
            reason: CorruptReason::TrailingBytes(actual - expected),
        });
    }
    header.verify_payload(body)?;
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(tokens: u32) -> ChunkShape {
        ChunkShape {
            layout: KvLayout::Kv2Ltd,
            dtype: DType::Bf16,
            layers: 2,
            tokens,
            hidden: 8,
        }
    }

    fn sample() -> (ChunkKey, ChunkShape, Vec<u8>) {
        let s = shape(3);
        let payload: Vec<u8> = (0..s.payload_len()).map(|i| (i * 7) as u8).collect();
        (ChunkKey(0xfeed), s, payload)
    }

    #[test]
    fn round_trip() {
        let (key, s, payload) = sample();
        let bytes = encode_chunk(key, s, &payload);
        let (h, p) = decode_chunk(&bytes).unwrap();
        assert_eq!(h.key, key);
        assert_eq!(h.shape, s);
        assert_eq!(p, &payload[..]);
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let (key, s, payload) = sample();
        let bytes = encode_chunk(key, s, &payload);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode_chunk(&bad).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_errors() {
        let (key, s, payload) = sample();
        let bytes = encode_chunk(key, s, &payload);
        for cut in 0..bytes.len() {
            assert!(
                decode_chunk(&bytes[..cut]).is_err(),
                "cut at {cut} accepted"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        let err = decode_chunk(&long).unwrap_err();
        assert_eq!(err.reason, CorruptReason::TrailingBytes(1));
        assert_eq!(err.key, Some(key));
    }

    #[test]
    fn overflowing_shape_is_rejected_not_allocated() {
        let s = ChunkShape {
            layout: KvLayout::Kv2Ltd,
            dtype: DType::F32,
            layers: u32::MAX,
            tokens: u32::MAX,
            hidden: u32::MAX,
        };
        let header = ChunkHeader {
            key: ChunkKey(1),
            shape: s,
            payload_len: 16,
            payload_checksum: 0,
        };
        let err = ChunkHeader::decode(&header.encode()).unwrap_err();
        assert!(matches!(
            err.reason,
            CorruptReason::LengthMismatch { shape: None, .. }
        ));
    }

    #[test]
    fn names_parse() {
        assert_eq!("torch.bfloat16".parse::<DType>().unwrap(), DType::Bf16);
        assert_eq!("kv_2ltd".parse::<KvLayout>().unwrap(), KvLayout::Kv2Ltd);
        assert!("int4".parse::<DType>().is_err());
    }
}

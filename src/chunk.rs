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

use kvtier_transport::checksum;

use crate::keys::ChunkKey;
use crate::model::{ChunkShape, DType, KvLayout};

/// Size of the encoded header.
pub const HEADER_LEN: usize = 64;
/// First four bytes of every chunk.
pub const MAGIC: [u8; 4] = *b"KVTC";
/// Format version written by this build.
pub const FORMAT_VERSION: u16 = 1;

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
            payload_checksum: checksum(payload),
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
        let sum = checksum(&h[..56]);
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
        if checksum(&h[..56]) != le_u64(h, 56) {
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
        if checksum(payload) != self.payload_checksum {
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

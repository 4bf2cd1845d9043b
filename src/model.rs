//! The model a KV cache belongs to, at the ground floor of the crate: element type
//! ([`DType`]), payload layout ([`KvLayout`]), the shape of one chunk ([`ChunkShape`]), the
//! model a serving engine runs ([`ModelSpec`]) and the key namespace it implies
//! ([`ModelNamespace`]). Everything above (keys, the chunk format, tiers, P/D, the engine)
//! takes its shapes from here; this module imports nothing of the crate.

use std::fmt;
use std::str::FromStr;

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

    /// Payload bytes. Shapes built from a [`ModelSpec`] never overflow.
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

/// The model whose KV the engine stores: decides chunk shapes and the key namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Model name, e.g. `meta-llama/Llama-3.1-8B-Instruct`.
    pub name: String,
    /// Transformer layers.
    pub layers: u32,
    /// KV heads held by this tensor-parallel shard.
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Element type.
    pub dtype: DType,
    /// Layout.
    pub layout: KvLayout,
    /// Tensor-parallel world size.
    pub tp_size: u32,
    /// Tensor-parallel rank of this shard.
    pub tp_rank: u32,
}

impl ModelSpec {
    /// Llama-3.1-8B: 32 layers, 8 KV heads of 128, bf16, `KV_2LTD`: 128 KiB per token.
    pub fn llama_3_1_8b() -> Self {
        ModelSpec {
            name: "meta-llama/Llama-3.1-8B-Instruct".into(),
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype: DType::Bf16,
            layout: KvLayout::Kv2Ltd,
            tp_size: 1,
            tp_rank: 0,
        }
    }

    /// Elements per token per layer.
    pub fn hidden(&self) -> u32 {
        self.kv_heads * self.head_dim
    }

    /// KV bytes per token.
    pub fn bytes_per_token(&self) -> usize {
        self.layout.kv_factor() * self.layers as usize * self.hidden() as usize * self.dtype.size()
    }

    /// Shape of a chunk of `tokens` tokens.
    pub fn chunk_shape(&self, tokens: usize) -> ChunkShape {
        ChunkShape {
            layout: self.layout,
            dtype: self.dtype,
            layers: self.layers,
            tokens: tokens as u32,
            hidden: self.hidden(),
        }
    }

    /// Key namespace for chunks of `chunk_size` tokens.
    pub fn namespace(&self, chunk_size: usize) -> ModelNamespace {
        ModelNamespace {
            model: self.name.clone(),
            dtype: self.dtype,
            layout: self.layout,
            layers: self.layers,
            hidden: self.hidden(),
            tp_size: self.tp_size,
            tp_rank: self.tp_rank,
            chunk_size: chunk_size as u32,
        }
    }
}

/// Everything besides the tokens that decides whether two KV caches are interchangeable:
/// the model, its KV dtype, layout and shape, the tensor-parallel shard and the chunk size.
/// Two models served under one name but with different layer counts or KV widths never
/// share keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelNamespace {
    /// Model name as the serving engine knows it, e.g. `meta-llama/Llama-3.1-8B-Instruct`.
    pub model: String,
    /// Element type of the KV tensors.
    pub dtype: DType,
    /// KV layout (`KV_2LTD`, MLA or paged blocks).
    pub layout: KvLayout,
    /// Layers whose KV a chunk holds.
    pub layers: u32,
    /// Elements per token per layer (KV heads × head size of this shard).
    pub hidden: u32,
    /// Tensor-parallel world size.
    pub tp_size: u32,
    /// This shard's tensor-parallel rank.
    pub tp_rank: u32,
    /// Tokens per chunk.
    pub chunk_size: u32,
}

impl ModelNamespace {
    /// Stable encoding hashed into `h_{-1}`: `b"kvtier-ns-v2\0"`, then the model name as
    /// `u32` LE length + UTF-8 bytes, then `dtype` and `layout` codes (one byte each), then
    /// `layers`, `hidden`, `tp_size`, `tp_rank`, `chunk_size` as `u32` LE.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.model.len());
        out.extend_from_slice(b"kvtier-ns-v2\0");
        out.extend_from_slice(&(self.model.len() as u32).to_le_bytes());
        out.extend_from_slice(self.model.as_bytes());
        out.push(self.dtype.code());
        out.push(self.layout.code());
        out.extend_from_slice(&self.layers.to_le_bytes());
        out.extend_from_slice(&self.hidden.to_le_bytes());
        out.extend_from_slice(&self.tp_size.to_le_bytes());
        out.extend_from_slice(&self.tp_rank.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out
    }
}

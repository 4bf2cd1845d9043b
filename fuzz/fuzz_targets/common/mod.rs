//! What several targets share.

use kvtier::{DType, KvLayout, ModelSpec};

/// A model small enough that a chunk is a few hundred bytes (2 layers, one 8-wide head).
pub fn small_model() -> ModelSpec {
    ModelSpec {
        name: "fuzz".into(),
        layers: 2,
        kv_heads: 1,
        head_dim: 8,
        dtype: DType::F16,
        layout: KvLayout::Kv2Ltd,
        tp_size: 1,
        tp_rank: 0,
    }
}

//! kvtier: an embedded KV-cache storage engine for LLM inference.
//!
//! Token sequences are cut into chunks with content-addressed keys ([`keys`]); the KV of
//! each chunk lives in a stack of tiers ([`tier`]: GPU, CPU, disk) managed by the
//! [`storage::StorageManager`]; the [`Engine`] is the API an inference server embeds;
//! chunks travel on disk and on the wire in the [`chunk`] format; everything is
//! configured by LMCache-compatible YAML ([`config`]).

#![warn(missing_docs)]

pub mod chunk;
pub mod config;
pub mod engine;
pub mod error;
pub mod keys;
pub mod memory;
pub mod metrics;
pub mod pd;
pub mod proxy;
pub mod remote;
pub mod storage;
pub mod synthetic;
pub mod testserver;
pub mod tier;
pub mod transport;

pub use chunk::{ChunkShape, DType, KvLayout};
pub use config::Config;
pub use engine::{Engine, ModelSpec, RetrieveReport, StoreReport};
pub use error::{Error, Result};
pub use keys::{ChunkHasher, ChunkKey, ModelNamespace};
pub use metrics::Metrics;

//! kvtier: an embedded KV-cache storage engine for LLM inference.
//!
//! Token sequences are cut into chunks with content-addressed keys ([`keys`]) in the
//! namespace of a model ([`model`]); the KV of each chunk lives in a stack of tiers
//! ([`tier`]: GPU, CPU, disk) managed by the [`storage::StorageManager`], with a remote
//! store behind them ([`remote`]); the [`Engine`] is the API an inference server embeds;
//! chunks travel on disk and on the wire in the [`chunk`] format; a prefiller pushes a
//! request's KV into a decoder's buffer over a transport ([`pd`], [`transport`]);
//! everything is configured by LMCache-compatible YAML ([`config`]).
//!
//! Modules import downwards only: `model` at the ground floor; `keys`, `chunk`, `memory`,
//! `config` and `metrics` above it; then `tier` and `storage`, `transport`, `pd` and
//! `remote`, each with its own error type; `error` gathers those; `engine` on top. The
//! command line, the P/D proxy and the synthetic test server are the `kvtier-cli` crate.

pub mod chunk;
pub mod config;
pub mod engine;
pub mod error;
pub mod keys;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod pd;
pub mod remote;
pub mod storage;
pub mod tier;
pub mod transport;

pub use config::Config;
pub use engine::{Engine, EngineBuilder, RetrieveReport, StoreReport};
pub use error::{Error, Result};
pub use keys::{ChunkHasher, ChunkKey};
pub use metrics::Metrics;
pub use model::{ChunkShape, DType, KvLayout, ModelNamespace, ModelSpec};

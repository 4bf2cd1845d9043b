//! The applications built on the kvtier engine, apart from it so that an embedder of the
//! engine depends on neither an HTTP server nor a command-line parser:
//!
//! * [`proxy`]: the P/D proxy (`kvtier proxy`), an OpenAI-compatible front end that runs
//!   each request's prefill on a prefiller and its decode on a decoder;
//! * [`testserver`]: a synthetic stand-in for a vLLM server (`kvtier test-server`) that
//!   produces and consumes KV through the engine, for tests and benchmarks where no model
//!   runs;
//! * [`synthetic`]: the synthetic tokenizer and KV that test server uses;
//! * the `kvtier` command line (`src/bin/kvtier`).

pub mod error;
pub mod http;
pub mod proxy;
pub mod synthetic;
pub mod testserver;

pub use error::{Error, Result};

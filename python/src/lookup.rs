//! The lookup channel between vLLM's scheduler and its workers.
//!
//! vLLM runs its scheduler (engine core) apart from the workers that own the paged cache
//! and the kvtier engine. The scheduler must know how many prompt tokens kvtier can load
//! before it allocates blocks: a worker serves [`serve`] on a Unix socket, the scheduler
//! asks through a [`LookupClient`]. One request: `u32` LE token count, then the tokens as
//! `u32` LE; one answer: the hit length as `u64` LE. Requests are capped at
//! [`MAX_TOKENS`]; every call on the client side has a deadline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{py_err, runtime};

/// Longest prompt one lookup may carry (tokens).
pub const MAX_TOKENS: usize = 1 << 24;

/// Starts serving lookups for `engine` on the Unix socket `path` (replacing a stale socket
/// file); returns once the socket listens.
pub(crate) fn serve(engine: kvtier::Engine, path: &str) -> std::io::Result<()> {
    let path = Path::new(path);
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let _guard = runtime().enter();
    let listener = tokio::net::UnixListener::bind(path)?;
    runtime().spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let engine = engine.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(engine, stream).await {
                    tracing::debug!("lookup channel: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn answer(engine: kvtier::Engine, mut stream: tokio::net::UnixStream) -> std::io::Result<()> {
    loop {
        let n = match stream.read_u32_le().await {
            Ok(n) => n as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if n > MAX_TOKENS {
            return Err(std::io::Error::other(format!(
                "lookup of {n} tokens is over the {MAX_TOKENS}-token cap"
            )));
        }
        let mut raw = vec![0u8; n * 4];
        stream.read_exact(&mut raw).await?;
        let tokens: Vec<u32> = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let hit = match engine.lookup(&tokens).await {
            Ok(hit) => hit as u64,
            Err(e) => {
                tracing::warn!("lookup failed, answering a miss: {e}");
                0
            }
        };
        stream.write_all(&hit.to_le_bytes()).await?;
    }
}

/// The scheduler's end of the lookup channel: asks a worker's engine how many leading
/// tokens of a prompt kvtier holds.
#[pyclass(module = "kvtier._kvtier", frozen)]
pub struct LookupClient {
    path: String,
    timeout: Duration,
    stream: Mutex<Option<UnixStream>>,
}

#[pymethods]
impl LookupClient {
    /// A client of the worker serving on `path`; each lookup waits at most `timeout`
    /// seconds (connect included).
    #[new]
    #[pyo3(signature = (path, timeout=5.0))]
    fn new(path: String, timeout: f64) -> PyResult<Self> {
        if !(timeout > 0.0 && timeout.is_finite()) {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "timeout must be a positive number of seconds",
            ));
        }
        Ok(LookupClient {
            path,
            timeout: Duration::from_secs_f64(timeout),
            stream: Mutex::new(None),
        })
    }

    /// Leading tokens of `tokens` held by the worker's engine. Raises `KvtierError` when
    /// the worker does not answer in time (the caller then treats it as a miss).
    fn lookup(&self, py: Python<'_>, tokens: Vec<u32>) -> PyResult<usize> {
        if tokens.len() > MAX_TOKENS {
            return Err(py_err(format!(
                "lookup of {} tokens is over the {MAX_TOKENS}-token cap",
                tokens.len()
            )));
        }
        py.detach(|| {
            let mut slot = self.stream.lock().unwrap_or_else(|p| p.into_inner());
            let result = self.ask(&mut slot, &tokens);
            if result.is_err() {
                // A half-finished exchange leaves the stream unusable: start afresh.
                *slot = None;
            }
            result
        })
        .map_err(|e| py_err(format!("lookup channel {}: {e}", self.path)))
    }
}

impl LookupClient {
    fn ask(&self, slot: &mut Option<UnixStream>, tokens: &[u32]) -> std::io::Result<usize> {
        if slot.is_none() {
            let stream = UnixStream::connect(&self.path)?;
            stream.set_read_timeout(Some(self.timeout))?;
            stream.set_write_timeout(Some(self.timeout))?;
            *slot = Some(stream);
        }
        let stream = slot.as_mut().expect("connected above");
        let mut frame = Vec::with_capacity(4 + tokens.len() * 4);
        frame.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
        for t in tokens {
            frame.extend_from_slice(&t.to_le_bytes());
        }
        stream.write_all(&frame)?;
        let mut hit = [0u8; 8];
        stream.read_exact(&mut hit)?;
        Ok(u64::from_le_bytes(hit) as usize)
    }
}

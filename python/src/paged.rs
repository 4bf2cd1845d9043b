//! vLLM's paged KV cache seen as whole blocks of opaque bytes.
//!
//! vLLM hands its connector one tensor per attention layer, `[num_blocks, ...]`; the byte
//! layout inside a block belongs to the attention backend (the CPU backend stores K
//! transposed), so kvtier never looks inside a block. A chunk of `chunk_size` tokens is
//! `chunk_size / block_size` blocks, and its payload (layout `PAGED`) is those blocks for
//! every layer in turn: `[layers, blocks, block bytes]`. Only whole blocks move.

use std::collections::HashSet;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use std::sync::Arc;

use kvtier::keys::ChunkSpan;
use kvtier::pd::{KvRange, PdSender, ReceiverSpec, RegisteredKv, SendReport};
use kvtier::transport::RegistrationHandle;
use kvtier::{Engine, Error, KvLayout};

use crate::memory::{tensor_region, Region, TensorMemory};

/// Bytes of one layer's block of `block_size` tokens for `engine`'s model.
fn block_bytes(engine: &Engine, block_size: usize) -> usize {
    let model = engine.model();
    model.bytes_per_token() / (model.layers.max(1) as usize) * block_size
}

/// The blocks of vLLM's paged KV cache, one region per layer.
#[pyclass(module = "kvtier._kvtier", frozen)]
pub struct PagedCache {
    layers: Vec<Region>,
    /// Each layer tensor registered with the P/D sender's transport (an engine that is a
    /// P/D sender): sends write blocks straight from vLLM's cache. Empty otherwise.
    registered: Vec<Arc<RegistrationHandle>>,
    /// The sender they are registered with (its address, to recognise it).
    registered_with: usize,
    /// Keeps the layer tensors (and so the regions) alive.
    _tensors: Vec<Py<PyAny>>,
    /// Blocks per layer.
    #[pyo3(get)]
    num_blocks: usize,
    /// Tokens per block.
    #[pyo3(get)]
    block_size: usize,
    /// Bytes per block of one layer.
    #[pyo3(get)]
    block_bytes: usize,
}

#[pymethods]
impl PagedCache {
    fn __repr__(&self) -> String {
        format!(
            "PagedCache(layers={}, num_blocks={}, block_size={}, block_bytes={})",
            self.layers.len(),
            self.num_blocks,
            self.block_size,
            self.block_bytes
        )
    }
}

impl PagedCache {
    /// Checks `tensors` against `engine`'s model (see `Engine.paged_cache`).
    pub(crate) fn new(
        engine: &Engine,
        tensors: Vec<Bound<'_, PyAny>>,
        block_size: usize,
    ) -> PyResult<PagedCache> {
        let model = engine.model();
        if model.layout != KvLayout::Paged {
            return Err(PyValueError::new_err(format!(
                "a paged cache needs an engine opened with layout=\"PAGED\" (this one: {})",
                model.layout
            )));
        }
        if tensors.len() != model.layers as usize {
            return Err(PyValueError::new_err(format!(
                "{} layer tensors for model {} with {} layers",
                tensors.len(),
                model.name,
                model.layers
            )));
        }
        let chunk_size = engine.settings().keys.chunk_size;
        if block_size == 0 || chunk_size % block_size != 0 {
            return Err(PyValueError::new_err(format!(
                "chunk_size {chunk_size} is not a whole number of vLLM blocks of {block_size} \
                 tokens: set chunk_size to a multiple of the block size"
            )));
        }
        let block_bytes = block_bytes(engine, block_size);
        let mut layers = Vec::with_capacity(tensors.len());
        let mut num_blocks = None;
        for (i, t) in tensors.iter().enumerate() {
            let region = tensor_region(t)?;
            let blocks: usize = t.getattr("shape")?.get_item(0)?.extract()?;
            if blocks == 0 || region.len != blocks * block_bytes {
                return Err(PyValueError::new_err(format!(
                    "layer {i}: {} bytes in {blocks} blocks; model {} with blocks of \
                     {block_size} tokens needs {block_bytes} bytes per block",
                    region.len, model.name
                )));
            }
            if *num_blocks.get_or_insert(blocks) != blocks {
                return Err(PyValueError::new_err(format!(
                    "layer {i} has {blocks} blocks, layer 0 has {}",
                    num_blocks.unwrap_or_default()
                )));
            }
            layers.push(region);
        }
        // A P/D sender writes straight from the cache: register each layer once.
        let (registered, registered_with) = match engine.pd_sender() {
            Some(sender) => {
                let mut registered = Vec::with_capacity(tensors.len());
                for t in &tensors {
                    let memory = Arc::new(TensorMemory::new(t)?);
                    registered.push(
                        sender
                            .register_kv(memory)
                            .map_err(|e| PyValueError::new_err(e.to_string()))?,
                    );
                }
                (registered, sender as *const PdSender as usize)
            }
            None => (Vec::new(), 0),
        };
        Ok(PagedCache {
            layers,
            registered,
            registered_with,
            _tensors: tensors.into_iter().map(Bound::unbind).collect(),
            num_blocks: num_blocks.unwrap_or_default(),
            block_size,
            block_bytes,
        })
    }

    /// Refuses an engine whose model does not match the one the cache was checked against.
    pub(crate) fn check_engine(&self, engine: &Engine) -> PyResult<()> {
        let model = engine.model();
        if model.layout != KvLayout::Paged
            || model.layers as usize != self.layers.len()
            || block_bytes(engine, self.block_size) != self.block_bytes
        {
            return Err(PyValueError::new_err(format!(
                "this paged cache was made for another model than {}",
                model.name
            )));
        }
        Ok(())
    }

    /// Whole blocks of `tokens` that `block_ids` covers, after checking those ids.
    fn whole_blocks(&self, tokens: usize, block_ids: &[u32]) -> kvtier::Result<usize> {
        let blocks = (tokens / self.block_size).min(block_ids.len());
        let mut seen = HashSet::with_capacity(blocks);
        for &id in &block_ids[..blocks] {
            if id as usize >= self.num_blocks {
                return Err(Error::Shape(format!(
                    "block id {id} is outside the paged cache's {} blocks",
                    self.num_blocks
                )));
            }
            if !seen.insert(id) {
                return Err(Error::Shape(format!(
                    "block id {id} appears twice in one block table"
                )));
            }
        }
        Ok(blocks)
    }

    /// One layer's block `id`.
    ///
    /// # Safety
    /// `id < num_blocks` and the layer tensors are alive (they are: `self` holds them).
    unsafe fn block(&self, layer: usize, id: u32) -> Region {
        Region {
            addr: self.layers[layer].addr + id as usize * self.block_bytes,
            len: self.block_bytes,
        }
    }

    /// Copies the blocks of `span` (from `block_ids`) into a chunk payload.
    fn gather(&self, block_ids: &[u32], span: &ChunkSpan, data: &mut [u8]) {
        let (bs, bb) = (self.block_size, self.block_bytes);
        let (first, n) = (span.start / bs, span.tokens() / bs);
        for layer in 0..self.layers.len() {
            for j in 0..n {
                // SAFETY: ids were checked against `num_blocks`; the worker does not write
                // these blocks while a save runs (vLLM saves after the forward pass).
                let src = unsafe { self.block(layer, block_ids[first + j]).as_slice() };
                data[(layer * n + j) * bb..][..bb].copy_from_slice(src);
            }
        }
    }

    /// Copies a chunk payload of `span` into the blocks `block_ids`, skipping blocks before
    /// block `skip`; `read(offset, dst)` copies the payload's bytes at `offset` into `dst`.
    fn scatter(
        &self,
        block_ids: &[u32],
        span: &ChunkSpan,
        skip: usize,
        read: &dyn Fn(usize, &mut [u8]),
    ) {
        let (bs, bb) = (self.block_size, self.block_bytes);
        let (first, n) = (span.start / bs, span.tokens() / bs);
        for layer in 0..self.layers.len() {
            for j in (0..n).filter(|j| first + j >= skip) {
                // SAFETY: ids were checked and are distinct; the blocks belong to the
                // request being loaded, which vLLM does not run until the load ends.
                let dst = unsafe { self.block(layer, block_ids[first + j]).as_mut_slice() };
                read((layer * n + j) * bb, dst);
            }
        }
    }

    /// Stores `tokens`' whole blocks from `block_ids` (see `Engine.store_blocks`).
    pub(crate) async fn store(
        &self,
        engine: &Engine,
        tokens: &[u32],
        block_ids: &[u32],
    ) -> kvtier::Result<kvtier::StoreReport> {
        let blocks = self.whole_blocks(tokens.len(), block_ids)?;
        engine
            .store_with(&tokens[..blocks * self.block_size], |span, data| {
                self.gather(block_ids, span, data)
            })
            .await
    }

    /// Pushes `tokens`' whole blocks to a P/D receiver (see `Engine.start_send_blocks`).
    pub(crate) async fn send(
        &self,
        sender: &PdSender,
        req_id: &str,
        tokens: &[u32],
        block_ids: &[u32],
        to: &ReceiverSpec,
    ) -> kvtier::Result<SendReport> {
        let blocks = self.whole_blocks(tokens.len(), block_ids)?;
        let tokens = &tokens[..blocks * self.block_size];
        let sent = if self.registered_with == sender as *const PdSender as usize {
            // Straight from vLLM's blocks: no staging copy.
            let kv = PagedSend {
                cache: self,
                block_ids,
            };
            sender.send_registered(req_id, tokens, &kv, to).await
        } else {
            sender
                .send_with(
                    req_id,
                    tokens,
                    |span, page| self.gather(block_ids, span, page),
                    to,
                )
                .await
        };
        sent.map_err(Into::into)
    }

    /// Loads the cached prefix of `tokens` into `block_ids` (see `Engine.load_blocks`):
    /// from the P/D buffer when the engine is a P/D receiver holding it, else from the
    /// tiers.
    pub(crate) async fn load(
        &self,
        engine: &Engine,
        tokens: &[u32],
        block_ids: &[u32],
        skip_tokens: usize,
    ) -> kvtier::Result<usize> {
        let blocks = self.whole_blocks(tokens.len(), block_ids)?;
        let tokens = &tokens[..blocks * self.block_size];
        let skip = skip_tokens / self.block_size;
        if let Some(receiver) = engine.pd_receiver() {
            let loaded = receiver.retrieve_with("vllm", tokens, |span, read| {
                self.scatter(block_ids, span, skip, read)
            });
            if loaded > 0 {
                return Ok(loaded);
            }
        }
        let chunks = engine.retrieve_prefix(tokens).await?;
        let mut loaded = 0;
        for (span, chunk) in &chunks {
            // `retrieve_prefix` checked the shape: the payload is `layers × n` blocks.
            let payload = chunk.payload();
            self.scatter(block_ids, span, skip, &|offset, dst: &mut [u8]| {
                dst.copy_from_slice(&payload[offset..offset + dst.len()])
            });
            loaded = span.end;
        }
        Ok(loaded)
    }
}

/// One request's blocks of a [`PagedCache`] registered with a P/D sender's transport: a
/// chunk's payload is, layer by layer, its blocks (adjacent block ids as one range).
struct PagedSend<'a> {
    cache: &'a PagedCache,
    /// Checked by `whole_blocks` against the cache's blocks.
    block_ids: &'a [u32],
}

impl RegisteredKv for PagedSend<'_> {
    fn registrations(&self) -> &[Arc<RegistrationHandle>] {
        &self.cache.registered
    }

    fn ranges(&self, span: &ChunkSpan, out: &mut Vec<KvRange>) {
        let (bs, bb) = (self.cache.block_size, self.cache.block_bytes);
        let (first, n) = (span.start / bs, span.tokens() / bs);
        // Appends only: ranges before `start` belong to other chunks.
        let start = out.len();
        for layer in 0..self.cache.layers.len() {
            for &id in &self.block_ids[first..first + n] {
                let offset = id as usize * bb;
                let ours = out.len() > start;
                match out.last_mut() {
                    Some(last)
                        if ours && last.region == layer && last.offset + last.len == offset =>
                    {
                        last.len += bb
                    }
                    _ => out.push(KvRange {
                        region: layer,
                        offset,
                        len: bb,
                    }),
                }
            }
        }
    }
}

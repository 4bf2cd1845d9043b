//! `kvtier keys`: the chunk keys of a token file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kvtier::{ChunkHasher, Config, DType, KvLayout, ModelNamespace};

/// A model's KV shape on the command line (part of the key namespace; defaults:
/// Llama-3.1-8B's).
#[derive(Args)]
pub struct ShapeArgs {
    /// Transformer layers.
    #[arg(long, default_value_t = 32)]
    pub layers: u32,
    /// KV heads (of this tensor-parallel shard).
    #[arg(long, default_value_t = 8)]
    pub kv_heads: u32,
    /// Elements per head.
    #[arg(long, default_value_t = 128)]
    pub head_dim: u32,
}

/// Arguments of `kvtier keys`.
#[derive(Args)]
pub struct KeysArgs {
    /// Model name (part of the key namespace).
    #[arg(long)]
    model: String,
    /// File of token ids: integers separated by whitespace or commas (a JSON array works).
    #[arg(long)]
    tokens: PathBuf,
    /// Configuration file for chunk_size, hash_seed and save_unfull_chunk (default: from
    /// KVTIER_CONFIG_FILE / LMCACHE_CONFIG_FILE, else built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Tokens per chunk (overrides the configuration).
    #[arg(long)]
    chunk_size: Option<u32>,
    /// Hash seed (overrides the configuration).
    #[arg(long)]
    seed: Option<u64>,
    /// KV dtype.
    #[arg(long, default_value = "bfloat16")]
    dtype: DType,
    /// KV layout.
    #[arg(long, default_value = "KV_2LTD")]
    layout: KvLayout,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Tensor-parallel world size.
    #[arg(long, default_value_t = 1)]
    tp_size: u32,
    /// Tensor-parallel rank.
    #[arg(long, default_value_t = 0)]
    tp_rank: u32,
}

/// Parses token ids separated by whitespace, commas or brackets.
pub fn parse_tokens(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']'))
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u32>()
                .with_context(|| format!("token {i}: `{s}` is not a token id (0..=4294967295)"))
        })
        .collect()
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => {
            let mut c = Config::from_yaml_file(path)?;
            c.apply_env(std::env::vars())?;
            c
        }
        None => Config::from_env()?,
    };
    let text = std::fs::read_to_string(&args.tokens)
        .with_context(|| format!("reading {}", args.tokens.display()))?;
    let tokens = parse_tokens(&text).with_context(|| format!("in {}", args.tokens.display()))?;
    let chunk_size = args.chunk_size.unwrap_or(config.chunk_size as u32);
    anyhow::ensure!(chunk_size > 0, "--chunk-size must be > 0");
    let namespace = ModelNamespace {
        model: args.model,
        dtype: args.dtype,
        layout: args.layout,
        layers: args.shape.layers,
        hidden: args.shape.kv_heads * args.shape.head_dim,
        tp_size: args.tp_size,
        tp_rank: args.tp_rank,
        chunk_size,
    };
    let seed = args.seed.unwrap_or(config.hash_seed);
    let hasher = ChunkHasher::new(&namespace, seed, config.save_unfull_chunk);
    println!(
        "# model={} dtype={} layout={} layers={} hidden={} tp={}/{} chunk_size={} seed={} tokens={}",
        namespace.model,
        namespace.dtype,
        namespace.layout,
        namespace.layers,
        namespace.hidden,
        namespace.tp_rank,
        namespace.tp_size,
        chunk_size,
        seed,
        tokens.len()
    );
    println!("# chunk start end key");
    for (i, span) in hasher.spans(&tokens).iter().enumerate() {
        println!("{i} {} {} {}", span.start, span.end, span.key);
    }
    Ok(())
}

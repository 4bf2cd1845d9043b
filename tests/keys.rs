//! Chunk keys are a stable contract: golden vectors pin them, and separate processes
//! must compute identical keys.

use std::path::Path;
use std::process::Command;

use kvtier::{ChunkHasher, DType, KvLayout, ModelNamespace};

/// The repository root: this test is built by the `kvtier-cli` package (apps/).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

const GOLDEN: &str = "tests/golden/keys.txt";

/// One golden case: a namespace, a seed and a token sequence.
struct Case {
    name: &'static str,
    ns: ModelNamespace,
    seed: u64,
    keep_partial: bool,
    tokens: Vec<u32>,
}

fn lcg(seed: u64, n: usize) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 33) % 128_256) as u32
        })
        .collect()
}

/// Llama-3.1-8B's KV shape (32 layers × 8 KV heads × 128) and DeepSeek-V3's MLA latent
/// (61 layers × 576).
const LLAMA_SHAPE: (u32, u32) = (32, 1024);
const DEEPSEEK_SHAPE: (u32, u32) = (61, 576);

fn ns(
    model: &str,
    dtype: DType,
    layout: KvLayout,
    shape: (u32, u32),
    tp: (u32, u32),
    chunk: u32,
) -> ModelNamespace {
    ModelNamespace {
        model: model.into(),
        dtype,
        layout,
        layers: shape.0,
        hidden: shape.1,
        tp_size: tp.0,
        tp_rank: tp.1,
        chunk_size: chunk,
    }
}

fn cases() -> Vec<Case> {
    let llama = "meta-llama/Llama-3.1-8B-Instruct";
    vec![
        Case {
            name: "llama-600-ascending",
            ns: ns(
                llama,
                DType::Bf16,
                KvLayout::Kv2Ltd,
                LLAMA_SHAPE,
                (1, 0),
                256,
            ),
            seed: 0,
            keep_partial: true,
            tokens: (0..600).collect(),
        },
        Case {
            name: "llama-600-ascending-drop-partial",
            ns: ns(
                llama,
                DType::Bf16,
                KvLayout::Kv2Ltd,
                LLAMA_SHAPE,
                (1, 0),
                256,
            ),
            seed: 0,
            keep_partial: false,
            tokens: (0..600).collect(),
        },
        Case {
            name: "llama-seed-42",
            ns: ns(
                llama,
                DType::Bf16,
                KvLayout::Kv2Ltd,
                LLAMA_SHAPE,
                (1, 0),
                256,
            ),
            seed: 42,
            keep_partial: true,
            tokens: (0..600).collect(),
        },
        Case {
            name: "llama-tp2-rank1-random-7500",
            ns: ns(
                llama,
                DType::Bf16,
                KvLayout::Kv2Ltd,
                LLAMA_SHAPE,
                (2, 1),
                256,
            ),
            seed: 0,
            keep_partial: true,
            tokens: lcg(7, 7500),
        },
        Case {
            name: "deepseek-mla-fp8-chunk64",
            ns: ns(
                "deepseek-ai/DeepSeek-V3",
                DType::Fp8E4m3,
                KvLayout::Mla1Ltd,
                DEEPSEEK_SHAPE,
                (8, 3),
                64,
            ),
            seed: u64::MAX,
            keep_partial: true,
            tokens: lcg(11, 200),
        },
        Case {
            name: "empty",
            ns: ns(
                llama,
                DType::Bf16,
                KvLayout::Kv2Ltd,
                LLAMA_SHAPE,
                (1, 0),
                256,
            ),
            seed: 0,
            keep_partial: true,
            tokens: vec![],
        },
    ]
}

fn render(cases: &[Case]) -> String {
    let mut out = String::from(
        "# kvtier chunk-key golden vectors. Regenerate only for a deliberate format change\n\
         # (KVTIER_BLESS=1 cargo test --test keys): every cached chunk becomes a miss.\n",
    );
    for c in cases {
        out.push_str(&format!(
            "case {} model={} dtype={} layout={} layers={} hidden={} tp={}/{} chunk={} seed={} \
             partial={} tokens={}\n",
            c.name,
            c.ns.model,
            c.ns.dtype,
            c.ns.layout,
            c.ns.layers,
            c.ns.hidden,
            c.ns.tp_rank,
            c.ns.tp_size,
            c.ns.chunk_size,
            c.seed,
            c.keep_partial,
            c.tokens.len()
        ));
        let hasher = ChunkHasher::new(&c.ns, c.seed, c.keep_partial);
        for (i, span) in hasher.spans(&c.tokens).iter().enumerate() {
            out.push_str(&format!("  {i} {} {} {}\n", span.start, span.end, span.key));
        }
    }
    out
}

#[test]
fn keys_match_golden_vectors() {
    let path = Path::new(REPO).join(GOLDEN);
    let now = render(&cases());
    if std::env::var_os("KVTIER_BLESS").is_some() {
        std::fs::write(&path, &now).unwrap();
    }
    let golden = std::fs::read_to_string(&path).expect("golden vectors are committed");
    assert_eq!(
        now, golden,
        "chunk keys changed: this breaks every existing cache. If deliberate, bless with KVTIER_BLESS=1"
    );
}

#[test]
fn root_key_follows_the_documented_encoding() {
    // h_{-1} = xxh3_128(seed, canonical namespace bytes), spelled out byte by byte.
    let n = ns("m", DType::Bf16, KvLayout::Kv2Ltd, (4, 512), (2, 1), 256);
    let mut bytes = b"kvtier-ns-v2\0".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.push(b'm');
    bytes.extend_from_slice(&[1, 1]);
    for v in [4u32, 512, 2, 1, 256] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(n.canonical_bytes(), bytes);
    let hasher = ChunkHasher::new(&n, 5, true);
    assert_eq!(
        hasher.root().0,
        xxhash_rust::xxh3::xxh3_128_with_seed(&bytes, 5)
    );
    // h_0 = xxh3_128(seed, h_{-1} LE ‖ tokens as u32 LE).
    let mut first = hasher.root().to_le_bytes().to_vec();
    for t in [10u32, 20] {
        first.extend_from_slice(&t.to_le_bytes());
    }
    assert_eq!(
        hasher.keys(&[10, 20])[0].0,
        xxhash_rust::xxh3::xxh3_128_with_seed(&first, 5)
    );
}

#[test]
fn models_of_another_shape_under_one_name_never_share_keys() {
    let llama = "meta-llama/Llama-3.1-8B-Instruct";
    let tokens: Vec<u32> = (0..512).collect();
    let keys = |shape| {
        ChunkHasher::new(
            &ns(llama, DType::Bf16, KvLayout::Kv2Ltd, shape, (1, 0), 256),
            0,
            true,
        )
        .keys(&tokens)
    };
    let base = keys(LLAMA_SHAPE);
    // A pruned model (fewer layers) and a model with wider KV heads, served as "llama".
    for other in [(16, 1024), (32, 2048)] {
        let k = keys(other);
        assert!(base.iter().all(|b| !k.contains(b)), "{other:?}");
    }
}

fn keys_in_subprocess(tokens_file: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args([
            "keys",
            "--model",
            "meta-llama/Llama-3.1-8B-Instruct",
            "--tokens",
        ])
        .arg(tokens_file)
        .args(["--tp-size", "2", "--tp-rank", "1"])
        .env_remove("KVTIER_CONFIG_FILE")
        .env_remove("LMCACHE_CONFIG_FILE")
        .output()
        .expect("run kvtier keys");
    assert!(
        out.status.success(),
        "kvtier keys failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn two_processes_compute_identical_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.txt");
    let tokens = lcg(7, 7500);
    let text: Vec<String> = tokens.iter().map(u32::to_string).collect();
    std::fs::write(&file, text.join(" ")).unwrap();
    let a = keys_in_subprocess(&file);
    let b = keys_in_subprocess(&file);
    assert_eq!(a, b);
    // ... and the same keys as the golden case computed in this process.
    let case = cases()
        .into_iter()
        .find(|c| c.name == "llama-tp2-rank1-random-7500")
        .unwrap();
    let hasher = ChunkHasher::new(&case.ns, case.seed, case.keep_partial);
    let expected: Vec<String> = hasher
        .keys(&case.tokens)
        .iter()
        .map(|k| k.to_string())
        .collect();
    let printed: Vec<&str> = a
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(printed, expected);
    assert_eq!(printed.len(), 30);
}

#[test]
fn keys_command_rejects_a_bad_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.txt");
    std::fs::write(&file, "1 2 three 4").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["keys", "--model", "m", "--tokens"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token 2: `three`"), "{err}");
}

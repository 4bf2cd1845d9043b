//! Tests for the configuration loader: the shipped reference files, every error kind,
//! environment overrides, rendering, and adversarial input.

use std::path::{Path, PathBuf};

use super::keys::{self, KEYS};
use super::*;

const GIB: u64 = 1 << 30;
const ORIGIN: &str = "configs/x.yaml";

fn load(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_yaml_str(yaml, ORIGIN)
}

fn load_ok(yaml: &str) -> Config {
    match load(yaml) {
        Ok(cfg) => cfg,
        Err(e) => panic!("expected {yaml:?} to load, got: {e}"),
    }
}

fn load_err(yaml: &str) -> ConfigError {
    match load(yaml) {
        Ok(cfg) => panic!("expected {yaml:?} to fail, got:\n{}", cfg.render()),
        Err(e) => e,
    }
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn config_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

fn shipped(name: &str) -> Config {
    let path = config_path(name);
    match Config::from_yaml_file(&path) {
        Ok(cfg) => {
            assert_eq!(cfg.source.as_deref(), Some(path.as_path()));
            cfg
        }
        Err(e) => panic!("{name}: {e}"),
    }
}

fn warned_keys(cfg: &Config) -> Vec<&str> {
    cfg.warnings().iter().map(|w| w.key.as_str()).collect()
}

/// The `key: value  # source` line for `key` in `render()`.
fn rendered_line(cfg: &Config, key: &str) -> String {
    let prefix = format!("{key}: ");
    cfg.render()
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{key}` line in render()"))
        .to_owned()
}

// ---------------------------------------------------------------- shipped files

#[test]
fn every_shipped_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("configs/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    for expected in [
        "demo.yaml",
        "lmcache-1p1d-nixl-decoder.yaml",
        "lmcache-1p1d-nixl-prefiller.yaml",
        "lmcache-1p1d-pd-decoder.yaml",
        "lmcache-1p1d-pd-prefiller.yaml",
        "lmcache-mooncake.yaml",
        "lmcache-pd-decoder.yaml",
        "lmcache-pd-prefiller.yaml",
        "lmcache-ray-nixl-decoder.yaml",
        "lmcache-ray-nixl-prefiller.yaml",
    ] {
        assert!(names.iter().any(|n| n == expected), "missing {expected}");
    }
    for name in &names {
        let cfg = shipped(name);
        // Every file's first line is a comment naming it.
        let text = std::fs::read_to_string(config_path(name)).expect("readable");
        assert!(text.starts_with("# "), "{name} lacks its leading comment");
        // Rendering loads back to the same values.
        let again = Config::from_yaml_str(&cfg.render(), "render").expect("render reloads");
        assert_eq!(strip_sources(&again.render()), strip_sources(&cfg.render()));
    }
}

fn strip_sources(render: &str) -> Vec<String> {
    render
        .lines()
        .map(|l| l.split("  # ").next().unwrap_or(l).to_owned())
        .collect()
}

#[test]
fn seed_000_nixl_prefiller_maps_to_pd_keys() {
    let cfg = shipped("lmcache-1p1d-nixl-prefiller.yaml");
    assert!(!cfg.local_cpu);
    assert_eq!(cfg.max_local_cpu_size, 0);
    assert_eq!(cfg.max_local_disk_size, 0);
    assert!(cfg.enable_pd);
    assert_eq!(cfg.pd_role, Some(PdRole::Sender));
    assert_eq!(cfg.pd_peer_host.as_deref(), Some("localhost"));
    assert_eq!(cfg.pd_peer_init_port, vec![55555]);
    assert_eq!(cfg.pd_peer_alloc_port, vec![55555]);
    assert_eq!(cfg.pd_buffer_size, GIB);
    assert_eq!(cfg.pd_buffer_device, BufferDevice::Cuda(0));
    assert!(cfg.pd_enable_gc);
    // `enable_nixl: True` without transfer_channel means NIXL, attributed to its line.
    assert_eq!(cfg.transfer_channel, TransferChannel::Nixl);
    assert!(rendered_line(&cfg, "transfer_channel").ends_with("lmcache-1p1d-nixl-prefiller.yaml:6"));
    assert_eq!(warned_keys(&cfg), vec!["remote_serde"]);
    assert_eq!(cfg.warnings()[0].line, Some(5));
}

#[test]
fn seed_000_nixl_decoder_is_a_single_port_receiver() {
    let cfg = shipped("lmcache-1p1d-nixl-decoder.yaml");
    assert_eq!(cfg.pd_role, Some(PdRole::Receiver));
    assert_eq!(cfg.pd_peer_host.as_deref(), Some("localhost"));
    // The legacy single port serves both the handshake and allocations.
    assert_eq!(cfg.pd_peer_init_port, vec![55555]);
    assert_eq!(cfg.pd_peer_alloc_port, vec![55555]);
    assert!(rendered_line(&cfg, "pd_peer_alloc_port").ends_with("lmcache-1p1d-nixl-decoder.yaml:9"));
    assert_eq!(cfg.pd_buffer_size, GIB);
    assert_eq!(cfg.pd_buffer_device, BufferDevice::Cuda(0));
    assert_eq!(cfg.transfer_channel, TransferChannel::Nixl);
    // An override of the single port moves both.
    let mut cfg = cfg;
    cfg.apply_env(vars(&[("LMCACHE_NIXL_RECEIVER_PORT", "6000")]))
        .expect("applies");
    assert_eq!(cfg.pd_peer_alloc_port, vec![6000]);
    // An explicit alloc port is kept.
    let cfg = load_ok("enable_nixl: true\nnixl_role: receiver\nnixl_peer_port: 5000\nnixl_peer_alloc_port: 5001\n");
    assert_eq!(
        (cfg.pd_peer_init_port[0], cfg.pd_peer_alloc_port[0]),
        (5000, 5001)
    );
}

#[test]
fn seed_001_pd_prefiller() {
    let cfg = shipped("lmcache-1p1d-pd-prefiller.yaml");
    assert!(cfg.local_cpu);
    assert_eq!(cfg.max_local_cpu_size, 5 * GIB);
    assert!(cfg.enable_pd);
    assert_eq!(cfg.transfer_channel, TransferChannel::Nixl);
    assert_eq!(cfg.pd_role, Some(PdRole::Sender));
    assert_eq!(cfg.pd_proxy_host.as_deref(), Some("localhost"));
    assert_eq!(cfg.pd_proxy_port, Some(7500));
    assert_eq!(cfg.pd_buffer_size, 1_073_741_824);
    assert_eq!(cfg.pd_buffer_device, BufferDevice::Cuda(0));
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
}

#[test]
fn seed_001_pd_decoder() {
    let cfg = shipped("lmcache-1p1d-pd-decoder.yaml");
    assert!(!cfg.local_cpu);
    assert_eq!(cfg.max_local_cpu_size, 0);
    assert!(cfg.enable_pd);
    assert_eq!(cfg.transfer_channel, TransferChannel::Nixl);
    assert_eq!(cfg.pd_role, Some(PdRole::Receiver));
    assert_eq!(cfg.pd_peer_host.as_deref(), Some("localhost"));
    assert_eq!(cfg.pd_peer_init_port, vec![7300]);
    assert_eq!(cfg.pd_peer_alloc_port, vec![7400]);
    assert_eq!(cfg.pd_buffer_size, 2_147_483_648);
    assert_eq!(cfg.pd_buffer_device, BufferDevice::Cuda(0));
    assert_eq!(cfg.nixl_backends, vec!["UCX".to_owned()]);
}

#[test]
fn seed_003_pd_pair_with_comments() {
    let p = shipped("lmcache-pd-prefiller.yaml");
    assert!(!p.local_cpu);
    assert_eq!(p.pd_role, Some(PdRole::Sender));
    assert_eq!(p.transfer_channel, TransferChannel::Nixl);
    assert_eq!(
        (p.pd_proxy_host.as_deref(), p.pd_proxy_port),
        (Some("localhost"), Some(7500))
    );
    assert_eq!(p.pd_buffer_size, GIB);
    // Comments do not leak into values; lines survive the restored layout.
    assert!(rendered_line(&p, "pd_proxy_port").ends_with("lmcache-pd-prefiller.yaml:9"));

    let d = shipped("lmcache-pd-decoder.yaml");
    assert_eq!(d.pd_role, Some(PdRole::Receiver));
    assert_eq!(d.pd_peer_host.as_deref(), Some("localhost"));
    assert_eq!(d.pd_peer_init_port, vec![7300]);
    assert_eq!(d.pd_peer_alloc_port, vec![7400]);
    assert_eq!(d.pd_buffer_size, GIB);
    assert_eq!(d.pd_buffer_device, BufferDevice::Cuda(0));
    assert_eq!(d.nixl_backends, vec!["UCX".to_owned()]);
}

#[test]
fn seed_004_ray_nixl_receiver_keys_map_to_pd_keys() {
    for (name, role) in [
        ("lmcache-ray-nixl-prefiller.yaml", PdRole::Sender),
        ("lmcache-ray-nixl-decoder.yaml", PdRole::Receiver),
    ] {
        let cfg = shipped(name);
        assert!(cfg.enable_pd, "{name}");
        assert_eq!(cfg.pd_role, Some(role), "{name}");
        assert_eq!(cfg.pd_peer_host.as_deref(), Some("localhost"), "{name}");
        assert_eq!(cfg.pd_peer_init_port, vec![55555], "{name}");
        assert_eq!(cfg.pd_peer_alloc_port, vec![55555], "{name}");
        assert_eq!(cfg.pd_buffer_size, GIB, "{name}");
        assert_eq!(cfg.pd_buffer_device, BufferDevice::Cuda(0), "{name}");
        assert!(cfg.pd_enable_gc, "{name}");
        assert_eq!(warned_keys(&cfg), vec!["remote_serde"], "{name}");
    }
}

#[test]
fn seed_004_mooncake() {
    let cfg = shipped("lmcache-mooncake.yaml");
    assert_eq!(cfg.chunk_size, 256);
    assert_eq!(
        cfg.remote_url.as_deref(),
        Some("mooncakestore://storage-server:49999/")
    );
    assert!(!cfg.local_cpu);
    assert_eq!(cfg.max_local_cpu_size, 5 * GIB);
    let extra = &cfg.extra_config;
    assert_eq!(extra.local_hostname.as_deref(), Some("compute-node-001"));
    assert_eq!(
        extra.metadata_server.as_deref(),
        Some("etcd://metadata-server:2379")
    );
    assert_eq!(extra.protocol.as_deref(), Some("rdma"));
    assert_eq!(extra.device_name.as_deref(), Some("rdma0"));
    assert_eq!(
        extra.master_server_address.as_deref(),
        Some("storage-server:49999")
    );
    assert_eq!(extra.global_segment_size, Some(3_355_443_200));
    assert_eq!(extra.local_buffer_size, Some(1_073_741_824));
    assert_eq!(extra.transfer_timeout, Some(1.0));
    let warned = warned_keys(&cfg);
    for key in ["remote_serde", "local_device", "pipelined_backend"] {
        assert!(warned.contains(&key), "no warning for {key}: {warned:?}");
    }
    let pipelined = cfg
        .warnings()
        .iter()
        .find(|w| w.key == "pipelined_backend")
        .expect("warned");
    assert_eq!(pipelined.line, Some(7));
    assert!(pipelined.message.contains("kvtier always pipelines"));
    assert!(pipelined.to_string().contains("lmcache-mooncake.yaml:7: "));
}

#[test]
fn demo_config() {
    let cfg = shipped("demo.yaml");
    assert!(cfg.local_cpu);
    assert_eq!(cfg.max_local_cpu_size, GIB / 4);
    assert_eq!(
        cfg.local_disk.as_deref(),
        Some(Path::new("./kvtier-demo-disk"))
    );
    assert_eq!(cfg.max_local_disk_size, 2 * GIB);
    assert_eq!(cfg.chunk_size, 256);
    assert_eq!(cfg.hash_seed, 0);
    assert!(cfg.warnings().is_empty());
}

// ---------------------------------------------------------------- defaults and table

#[test]
fn table_defaults_parse_and_match_the_documented_values() {
    for spec in KEYS {
        let mut cfg = Config::default();
        let node = yaml::load(spec.default)
            .unwrap_or_else(|e| panic!("{}: {e:?}", spec.name))
            .unwrap_or_else(|| Node::null(1));
        let ctx = Ctx {
            origin: "default",
            line: None,
            key: spec.name,
            from_env: false,
        };
        if let Err(e) = spec.slot.apply(&mut cfg, &node, &ctx, "", &mut Vec::new()) {
            panic!("default of {}: {e}", spec.name);
        }
    }
    let d = Config::default();
    assert_eq!(d.chunk_size, 256);
    assert_eq!(d.hash_seed, 0);
    assert!(d.save_unfull_chunk);
    assert!(d.local_cpu);
    assert_eq!(d.max_local_cpu_size, 5 * GIB);
    assert_eq!(d.local_disk, None);
    assert_eq!(d.max_local_disk_size, 0);
    assert_eq!(d.max_local_gpu_size, 0);
    assert_eq!(d.local_disk_write_queue, 64);
    assert_eq!(d.remote_url, None);
    assert_eq!(d.extra_config, ExtraConfig::default());
    assert!(!d.enable_pd);
    assert_eq!(d.pd_role, None);
    assert_eq!(d.transfer_channel, TransferChannel::Tcp);
    assert_eq!(d.pd_buffer_size, GIB);
    assert_eq!(d.pd_buffer_device, BufferDevice::Cpu);
    assert!(d.pd_peer_init_port.is_empty() && d.pd_peer_alloc_port.is_empty());
    assert!(d.pd_enable_gc);
    assert_eq!(d.pd_allocation_timeout_sec, 30.0);
    assert_eq!(d.pd_ttl_sec, 300.0);
    assert_eq!(d.nixl_backends, vec!["UCX".to_owned()]);
    assert_eq!(d.transport_auth_token, None);
    assert_eq!(d.transport_timeout_sec, 30.0);
    assert_eq!(d.source, None);
    assert!(d.validate().is_ok());
    assert!(d.render().lines().all(|l| l.ends_with("  # default")));
}

#[test]
fn empty_documents_give_defaults() {
    for text in ["", "# only a comment\n", "---\n", "---\n...\n", "~\n"] {
        let cfg = load_ok(text);
        assert_eq!(cfg.chunk_size, 256, "{text:?}");
    }
}

#[test]
fn table_names_are_unique_and_consistent() {
    let mut seen = std::collections::HashSet::new();
    for name in keys::all_names() {
        assert!(seen.insert(name), "`{name}` listed twice");
        assert_eq!(name, name.to_ascii_lowercase(), "keys are lower case");
    }
    for spec in KEYS {
        assert_eq!(
            keys::lookup(spec.name),
            keys::index_of(spec.name).map(|i| (i, None))
        );
        for alias in spec.aliases {
            assert_eq!(keys::lookup(alias).map(|(_, a)| a), Some(Some(*alias)));
        }
    }
}

#[test]
fn reference_table_lists_every_key() {
    let md = reference_table_markdown();
    for spec in KEYS {
        assert!(
            md.contains(&format!("| `{}` |", spec.name)),
            "{}",
            spec.name
        );
        for alias in spec.aliases {
            assert!(md.contains(&format!("`{alias}`")), "{alias}");
        }
    }
    for (key, _) in keys::IGNORED_KEYS {
        assert!(md.contains(&format!("| `{key}` |")), "{key}");
    }
    for extra in keys::EXTRA_KEYS {
        assert!(
            md.contains(&format!("| `{}` |", extra.name)),
            "{}",
            extra.name
        );
    }
    assert!(md.contains("| `max_local_cpu_size` |  | a number (GB) | `5` |"));
    assert!(md.contains("one of tcp\\|ucx\\|nixl"), "pipes are escaped");
    // Every row of the main table has five cells.
    for line in md
        .lines()
        .filter(|l| l.starts_with("| `") && l.contains("` | "))
    {
        let cells = line.replace("\\|", "").matches('|').count();
        assert!(cells == 6 || cells == 4 || cells == 3, "{line}");
    }
}

// ---------------------------------------------------------------- errors

#[test]
fn unknown_key_names_file_line_key_and_suggestion() {
    let e = load_err("chunk_size: 256\nmax_local_cpu_sise: 5\n");
    assert_eq!(
        e.to_string(),
        "configs/x.yaml:2: unknown key `max_local_cpu_sise`; did you mean `max_local_cpu_size`?"
    );
    assert!(matches!(
        e,
        ConfigError::UnknownKey { line: Some(2), ref suggestion, .. }
            if suggestion.as_deref() == Some("max_local_cpu_size")
    ));
    // Aliases and ignored LMCache keys are suggested too; case is ignored.
    let e = load_err("nixl_rol: sender\n");
    assert!(e.to_string().ends_with("did you mean `nixl_role`?"), "{e}");
    let e = load_err("Chunk_Size: 5\n");
    assert!(e.to_string().ends_with("did you mean `chunk_size`?"), "{e}");
    let e = load_err("remote_serd: naive\n");
    assert!(
        e.to_string().ends_with("did you mean `remote_serde`?"),
        "{e}"
    );
    // Nothing close: no suggestion.
    let e = load_err("totally_unrelated_setting: 1\n");
    assert_eq!(
        e.to_string(),
        "configs/x.yaml:1: unknown key `totally_unrelated_setting`"
    );
}

#[test]
fn wrong_type_names_key_expected_type_and_line() {
    let cases = [
        (
            "local_cpu: true\nchunk_size: abc\n",
            "configs/x.yaml:2: `chunk_size` expects an integer, found a string (\"abc\")",
        ),
        (
            "chunk_size: \"256\"\n",
            "configs/x.yaml:1: `chunk_size` expects an integer, found a string (\"256\"); \
             quoted values are strings: remove the quotes",
        ),
        (
            "local_cpu: 5\n",
            "configs/x.yaml:1: `local_cpu` expects a boolean, found an integer (5)",
        ),
        (
            "max_local_cpu_size: lots\n",
            "configs/x.yaml:1: `max_local_cpu_size` expects a number (GB), found a string (\"lots\")",
        ),
        (
            "transfer_channel: 3\n",
            "configs/x.yaml:1: `transfer_channel` expects one of tcp|ucx|nixl, found an integer (3)",
        ),
        (
            "pd_peer_init_port: {a: 1}\n",
            "configs/x.yaml:1: `pd_peer_init_port` expects a port or a list of ports, found a mapping",
        ),
        (
            "nixl_backends: [UCX, 5]\n",
            "configs/x.yaml:1: `nixl_backends` expects a list of strings, found an integer (5)",
        ),
        (
            "extra_config: [1]\n",
            "configs/x.yaml:1: `extra_config` expects a mapping, found a list",
        ),
        (
            "remote_url: true\n",
            "configs/x.yaml:1: `remote_url` expects a string, found a boolean (true)",
        ),
        (
            "pd_buffer_size: 1.5\n",
            "configs/x.yaml:1: `pd_buffer_size` expects an integer (bytes), found a number (1.5)",
        ),
        (
            "nixl_role: [sender]\n",
            "configs/x.yaml:1: `nixl_role` expects one of sender|receiver, found a list",
        ),
        (
            "extra_config:\n  protocol: rdma\n  global_segment_size: big\n",
            "configs/x.yaml:3: `extra_config.global_segment_size` expects an integer (bytes), \
             found a string (\"big\")",
        ),
        (
            "chunk_size: !!str 256\n",
            "configs/x.yaml:1: `chunk_size` expects an integer, found a string (\"256\"); \
             quoted values are strings: remove the quotes",
        ),
    ];
    for (yaml, message) in cases {
        let e = load_err(yaml);
        assert!(
            matches!(e, ConfigError::WrongType { .. }),
            "{yaml:?}: {e:?}"
        );
        assert_eq!(e.to_string(), message, "{yaml:?}");
    }
}

#[test]
fn invalid_values_are_rejected_with_reasons() {
    let cases = [
        (
            "pd_peer_init_port: 0\n",
            "pd_peer_init_port",
            "between 1 and 65535",
        ),
        (
            "pd_peer_init_port: 70000\n",
            "pd_peer_init_port",
            "between 1 and 65535",
        ),
        (
            "pd_proxy_port: -1\n",
            "pd_proxy_port",
            "between 1 and 65535",
        ),
        (
            "max_local_cpu_size: -1\n",
            "max_local_cpu_size",
            "must not be negative",
        ),
        (
            "max_local_disk_size: -0.5\n",
            "max_local_disk_size",
            "must not be negative",
        ),
        ("max_local_cpu_size: .inf\n", "max_local_cpu_size", "finite"),
        (
            "max_local_cpu_size: 99999999999999999999\n",
            "max_local_cpu_size",
            "too large",
        ),
        ("chunk_size: 0\n", "chunk_size", "at least 1"),
        ("chunk_size: -4\n", "chunk_size", "at least 1"),
        (
            "local_disk_write_queue: 0\n",
            "local_disk_write_queue",
            "at least 1",
        ),
        ("pd_buffer_size: 0\n", "pd_buffer_size", "at least 1"),
        ("hash_seed: -1\n", "hash_seed", "between 0 and 2^64-1"),
        (
            "hash_seed: 18446744073709551616\n",
            "hash_seed",
            "between 0 and 2^64-1",
        ),
        (
            "chunk_size: 123456789012345678901234567890123456789012345678901234567890\n",
            "chunk_size",
            "out of range",
        ),
        (
            "transfer_channel: rdma\n",
            "transfer_channel",
            "tcp|ucx|nixl",
        ),
        ("pd_role: both\n", "pd_role", "sender|receiver"),
        (
            "pd_buffer_device: gpu\n",
            "pd_buffer_device",
            "cpu|cuda|cuda:N",
        ),
        (
            "pd_buffer_device: \"cuda:x\"\n",
            "pd_buffer_device",
            "cpu|cuda|cuda:N",
        ),
        ("pd_ttl_sec: 0\n", "pd_ttl_sec", "> 0"),
        (
            "transport_timeout_sec: -.inf\n",
            "transport_timeout_sec",
            "> 0",
        ),
        ("nixl_backends: [\"\"]\n", "nixl_backends", "non-empty"),
    ];
    for (yaml, key, reason) in cases {
        let e = load_err(yaml);
        let text = e.to_string();
        assert!(
            matches!(e, ConfigError::InvalidValue { .. }),
            "{yaml:?}: {e:?}"
        );
        assert!(text.starts_with("configs/x.yaml:1: "), "{text}");
        assert!(text.contains(&format!("`{key}`")), "{text}");
        assert!(text.contains(reason), "{yaml:?}: {text}");
    }
    // A bad list entry is reported on its own line.
    let e = load_err("pd_peer_init_port:\n  - 7300\n  - 0\n");
    assert!(e.to_string().starts_with("configs/x.yaml:3: "), "{e}");
}

#[test]
fn known_unimplemented_keys_warn_and_load() {
    let cfg = load_ok(
        "chunk_size: 128\nuse_layerwise: true\npy_enable_gc: false\nblend_special_str: \" # \"\n",
    );
    assert_eq!(cfg.chunk_size, 128);
    let w = cfg.warnings();
    assert_eq!(w.len(), 3);
    assert_eq!((w[0].key.as_str(), w[0].line), ("use_layerwise", Some(2)));
    assert_eq!(w[0].origin, ORIGIN);
    assert_eq!(
        w[1].to_string(),
        "configs/x.yaml:3: `py_enable_gc` is an LMCache key kvtier does not use: kvtier has no \
         Python garbage collector; ignored"
    );
    assert!(w[2].message.contains("CacheBlend"));
    let cfg = load_ok("remote_serde: naive\n");
    assert_eq!(
        cfg.warnings()[0].message,
        "`remote_serde` is an LMCache key kvtier does not use: chunks use kvtier's own format; \
         ignored"
    );
}

#[test]
fn unknown_extra_config_keys_warn_with_qualified_names() {
    let cfg = load_ok("extra_config:\n  protocol: tcp\n  save_chunk_meta: false\n  protocl: x\n");
    assert_eq!(cfg.extra_config.protocol.as_deref(), Some("tcp"));
    let w = cfg.warnings();
    assert_eq!(w.len(), 2);
    assert_eq!(
        (w[0].key.as_str(), w[0].line),
        ("extra_config.save_chunk_meta", Some(3))
    );
    assert!(
        w[1].message.contains("did you mean `protocol`?"),
        "{}",
        w[1]
    );
}

#[test]
fn alias_and_canonical_key_with_different_values_conflict() {
    let e = load_err("pd_peer_host: a\nchunk_size: 256\nnixl_peer_host: b\n");
    assert_eq!(
        e.to_string(),
        "configs/x.yaml:3: `nixl_peer_host` = \"b\" conflicts with `pd_peer_host` = \"a\" at \
         configs/x.yaml:1; both set `pd_peer_host`"
    );
    match e {
        ConfigError::Conflict { key, first, second } => {
            assert_eq!(key, "pd_peer_host");
            assert_eq!((first.key.as_str(), first.line), ("pd_peer_host", Some(1)));
            assert_eq!(
                (second.key.as_str(), second.line),
                ("nixl_peer_host", Some(3))
            );
        }
        other => panic!("{other:?}"),
    }
    // Two aliases of one key.
    let e = load_err("nixl_peer_port: 5000\nnixl_receiver_port: 5001\n");
    let text = e.to_string();
    assert!(
        text.starts_with("configs/x.yaml:2: `nixl_receiver_port` = [5001] conflicts"),
        "{text}"
    );
    assert!(
        text.contains("`nixl_peer_port` = [5000] at configs/x.yaml:1"),
        "{text}"
    );
    // Same value under two names is fine (int vs one-element list included).
    let cfg = load_ok(
        "enable_pd: false\nenable_nixl: False\nnixl_peer_port: 5000\npd_peer_init_port: [5000]\n",
    );
    assert_eq!(cfg.pd_peer_init_port, vec![5000]);
}

#[test]
fn duplicate_keys_name_both_lines() {
    let e = load_err("chunk_size: 128\nlocal_cpu: true\nchunk_size: 256\n");
    assert_eq!(
        e.to_string(),
        "configs/x.yaml:3: duplicate key `chunk_size` (first set at line 1)"
    );
    let e = load_err("extra_config:\n  protocol: a\n  protocol: b\n");
    assert!(matches!(
        e,
        ConfigError::DuplicateKey { ref key, first_line: 2, second_line: 3, .. }
            if key == "extra_config.protocol"
    ));
}

#[test]
fn ports_take_an_int_or_a_list() {
    let cfg = load_ok(
        "enable_pd: true\npd_role: receiver\npd_peer_init_port: 7300\npd_peer_alloc_port: [7400]\n",
    );
    assert_eq!(cfg.pd_peer_init_port, vec![7300]);
    assert_eq!(cfg.pd_peer_alloc_port, vec![7400]);
    let cfg = load_ok(
        "enable_pd: true\npd_role: receiver\npd_peer_init_port: [7300, 7301]\n\
         pd_peer_alloc_port:\n  - 7400\n  - 7401\n",
    );
    assert_eq!(cfg.pd_peer_init_port, vec![7300, 7301]);
    assert_eq!(cfg.pd_peer_alloc_port, vec![7400, 7401]);
    assert!(
        rendered_line(&cfg, "pd_peer_init_port").starts_with("pd_peer_init_port: [7300, 7301]  # ")
    );
    let cfg = load_ok("pd_peer_init_port: null\n");
    assert!(cfg.pd_peer_init_port.is_empty());
}

#[test]
fn scalar_forms() {
    let cfg = load_ok(
        "local_cpu: yes\nsave_unfull_chunk: Off\nmax_local_cpu_size: 0.5\nmax_local_gpu_size: 1\n\
         local_disk: \"file:///var/cache/kvtier/\"\nmax_local_disk_size: 1e1\nnixl_role: kv_consumer\n\
         pd_buffer_device: CUDA:3\ntransfer_channel: UCX\nnixl_backends: GDS\nhash_seed: 18446744073709551615\n\
         chunk_size: &c 512\n",
    );
    assert!(cfg.local_cpu);
    assert!(!cfg.save_unfull_chunk);
    assert_eq!(cfg.max_local_cpu_size, GIB / 2);
    assert_eq!(cfg.max_local_gpu_size, GIB);
    assert_eq!(
        cfg.local_disk.as_deref(),
        Some(Path::new("/var/cache/kvtier/"))
    );
    assert_eq!(cfg.max_local_disk_size, 10 * GIB);
    assert_eq!(cfg.pd_role, Some(PdRole::Receiver));
    assert_eq!(cfg.pd_buffer_device, BufferDevice::Cuda(3));
    assert_eq!(cfg.transfer_channel, TransferChannel::Ucx);
    assert_eq!(cfg.nixl_backends, vec!["GDS".to_owned()]);
    assert_eq!(cfg.hash_seed, u64::MAX);
    assert_eq!(cfg.chunk_size, 512);
    // Null restores the default of a non-optional key and unsets an optional one.
    let cfg = load_ok("chunk_size: ~\nlocal_cpu:\nlocal_disk: NULL\nremote_url: \"\"\n");
    assert_eq!(cfg.chunk_size, 256);
    assert!(cfg.local_cpu);
    assert_eq!(cfg.local_disk, None);
    assert_eq!(cfg.remote_url, None);
    for role in ["producer", "kv_producer", "Sender"] {
        let cfg = load_ok(&format!("pd_role: {role}\n"));
        assert_eq!(cfg.pd_role, Some(PdRole::Sender), "{role}");
    }
}

#[test]
fn enable_nixl_implies_nixl_only_without_an_explicit_channel() {
    let base = "enable_nixl: true\nnixl_role: sender\nnixl_proxy_host: h\nnixl_proxy_port: 7500\n";
    assert_eq!(load_ok(base).transfer_channel, TransferChannel::Nixl);
    let cfg = load_ok(&format!("{base}transfer_channel: tcp\n"));
    assert_eq!(cfg.transfer_channel, TransferChannel::Tcp);
    let cfg = load_ok("enable_pd: true\npd_role: sender\npd_proxy_host: h\npd_proxy_port: 1\n");
    assert_eq!(cfg.transfer_channel, TransferChannel::Tcp);
}

// ---------------------------------------------------------------- validation

#[test]
fn cross_field_checks_name_the_keys() {
    let cases: [(&str, &[&str]); 9] = [
        ("local_disk: /tmp/kv\n", &["local_disk", "max_local_disk_size"]),
        ("enable_pd: true\n", &["enable_pd", "pd_role"]),
        ("enable_pd: true\npd_role: receiver\n", &["pd_role", "pd_peer_init_port"]),
        (
            "enable_pd: true\npd_role: receiver\npd_peer_init_port: 7300\n",
            &["pd_role", "pd_peer_alloc_port"],
        ),
        (
            "enable_pd: true\npd_role: receiver\npd_peer_init_port: [1, 2]\npd_peer_alloc_port: 3\n",
            &["pd_peer_init_port", "pd_peer_alloc_port"],
        ),
        ("enable_pd: true\npd_role: sender\n", &["pd_role", "pd_proxy_host", "pd_proxy_port"]),
        ("pd_proxy_host: localhost\n", &["pd_proxy_host", "pd_proxy_port"]),
        ("transfer_channel: nixl\nnixl_backends: []\n", &["transfer_channel", "nixl_backends"]),
        ("enable_nixl: true\nnixl_role: receiver\n", &["pd_role", "pd_peer_init_port"]),
    ];
    for (yaml, keys) in cases {
        let e = load_err(yaml);
        let text = e.to_string();
        match &e {
            ConfigError::Invalid {
                keys: named,
                origin,
                ..
            } => {
                assert_eq!(origin, ORIGIN);
                for key in keys {
                    assert!(named.iter().any(|n| n == key), "{yaml:?}: {named:?}");
                    assert!(text.contains(&format!("`{key}`")), "{yaml:?}: {text}");
                }
            }
            other => panic!("{yaml:?}: expected Invalid, got {other}"),
        }
    }
    let e = load_err("max_local_disk_size: 0\nlocal_disk: /tmp/kv\n");
    assert_eq!(
        e.to_string(),
        "configs/x.yaml: `local_disk` = \"/tmp/kv\" (configs/x.yaml:2) is set but \
         `max_local_disk_size` = 0 (configs/x.yaml:1) is 0; give the disk tier a capacity in GB \
         or remove `local_disk`"
    );
    // Programmatic changes are validated too.
    let cfg = Config {
        chunk_size: 0,
        ..Config::default()
    };
    let e = cfg.validate().expect_err("chunk_size 0");
    assert_eq!(
        e.to_string(),
        "configuration: `chunk_size` = 0 (set by caller) must be > 0"
    );
    let cfg = Config {
        pd_proxy_port: Some(0),
        pd_proxy_host: Some("h".into()),
        ..Config::default()
    };
    assert!(cfg.validate().is_err());
}

// ---------------------------------------------------------------- environment

#[test]
fn env_precedence_kvtier_over_lmcache_over_file() {
    let file = "chunk_size: 128\nlocal_cpu: false\n";
    let mut cfg = load_ok(file);
    cfg.apply_env(vars(&[
        ("KVTIER_CHUNK_SIZE", "1024"),
        ("LMCACHE_CHUNK_SIZE", "512"),
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", "2"),
        ("PATH", "/usr/bin"),
    ]))
    .expect("applies");
    assert_eq!(cfg.chunk_size, 1024);
    assert_eq!(cfg.max_local_cpu_size, 2 * GIB);
    assert!(!cfg.local_cpu);
    assert_eq!(
        rendered_line(&cfg, "chunk_size"),
        "chunk_size: 1024  # KVTIER_CHUNK_SIZE"
    );
    assert_eq!(
        rendered_line(&cfg, "max_local_cpu_size"),
        "max_local_cpu_size: 2  # LMCACHE_MAX_LOCAL_CPU_SIZE"
    );
    assert_eq!(
        rendered_line(&cfg, "local_cpu"),
        "local_cpu: false  # configs/x.yaml:2"
    );

    // Order of the variables does not matter; an alias under KVTIER_ beats LMCACHE_.
    let mut cfg = load_ok(file);
    cfg.apply_env(vars(&[
        ("LMCACHE_CHUNK_SIZE", "512"),
        ("KVTIER_chunk_size", "64"),
        ("LMCACHE_PD_ROLE", "sender"),
        ("KVTIER_NIXL_ROLE", "receiver"),
    ]))
    .expect("applies");
    assert_eq!(cfg.chunk_size, 64);
    assert_eq!(cfg.pd_role, Some(PdRole::Receiver));

    let mut cfg = load_ok(file);
    cfg.apply_env(vars(&[("LMCACHE_CHUNK_SIZE", "512")]))
        .expect("applies");
    assert_eq!(cfg.chunk_size, 512);
}

#[test]
fn env_values_are_yaml() {
    let mut cfg = Config::default();
    cfg.apply_env(vars(&[
        ("KVTIER_PD_PEER_INIT_PORT", "[7300, 7301]"),
        ("KVTIER_PD_PEER_ALLOC_PORT", "7400,7401"),
        ("LMCACHE_ENABLE_PD", "1"),
        ("LMCACHE_LOCAL_DISK", "file:///data/kv/"),
        ("LMCACHE_PD_PEER_HOST", "10.0.0.7"),
        ("KVTIER_TRANSPORT_AUTH_TOKEN", "@s3cret: x"),
        ("KVTIER_REMOTE_URL", "\"mooncakestore://m:1/\""),
        ("KVTIER_NIXL_BACKENDS", "UCX,GDS"),
        (
            "KVTIER_EXTRA_CONFIG",
            "{\"protocol\": \"tcp\", \"transfer_timeout\": 2.5}",
        ),
        ("LMCACHE_PROXY", "ignored: not a key prefix match"),
    ]))
    .expect("applies");
    assert_eq!(cfg.pd_peer_init_port, vec![7300, 7301]);
    assert_eq!(cfg.pd_peer_alloc_port, vec![7400, 7401]);
    assert!(cfg.enable_pd);
    assert_eq!(cfg.local_disk.as_deref(), Some(Path::new("/data/kv/")));
    assert_eq!(cfg.pd_peer_host.as_deref(), Some("10.0.0.7"));
    assert_eq!(cfg.transport_auth_token.as_deref(), Some("@s3cret: x"));
    assert_eq!(cfg.remote_url.as_deref(), Some("mooncakestore://m:1/"));
    assert_eq!(cfg.nixl_backends, vec!["UCX".to_owned(), "GDS".to_owned()]);
    assert_eq!(cfg.extra_config.protocol.as_deref(), Some("tcp"));
    assert_eq!(cfg.extra_config.transfer_timeout, Some(2.5));
    // extra_config from the environment merges into the file's.
    let mut cfg = shipped("lmcache-mooncake.yaml");
    cfg.apply_env(vars(&[("KVTIER_EXTRA_CONFIG", "{protocol: tcp}")]))
        .expect("applies");
    assert_eq!(cfg.extra_config.protocol.as_deref(), Some("tcp"));
    assert_eq!(cfg.extra_config.global_segment_size, Some(3_355_443_200));
}

#[test]
fn env_errors_name_the_variable() {
    let mut cfg = Config::default();
    let e = cfg
        .apply_env(vars(&[("KVTIER_CHUNK_SIZE", "abc")]))
        .expect_err("wrong type");
    assert_eq!(
        e.to_string(),
        "KVTIER_CHUNK_SIZE: `chunk_size` expects an integer, found a string (\"abc\")"
    );
    let e = cfg
        .apply_env(vars(&[("LMCACHE_PD_PEER_INIT_PORT", "[7300, 0]")]))
        .expect_err("invalid");
    assert!(
        e.to_string()
            .starts_with("LMCACHE_PD_PEER_INIT_PORT: invalid value"),
        "{e}"
    );
    let e = cfg
        .apply_env(vars(&[("KVTIER_PD_PEER_INIT_PORT", "[7300")]))
        .expect_err("syntax");
    assert!(
        matches!(e, ConfigError::Syntax { ref origin, .. } if origin == "KVTIER_PD_PEER_INIT_PORT")
    );
    // Two LMCACHE_ names of one key disagreeing.
    let e = cfg
        .apply_env(vars(&[
            ("LMCACHE_PD_ROLE", "sender"),
            ("LMCACHE_NIXL_ROLE", "receiver"),
        ]))
        .expect_err("conflict");
    let text = e.to_string();
    assert!(
        text.contains("LMCACHE_NIXL_ROLE") && text.contains("LMCACHE_PD_ROLE"),
        "{text}"
    );
    assert!(text.contains("both set `pd_role`"), "{text}");
}

#[test]
fn env_typos_are_errors_and_non_keys_are_ignored() {
    let mut cfg = Config::default();
    let e = cfg
        .apply_env(vars(&[("KVTIER_CHUNK_SIZ", "512")]))
        .expect_err("typo");
    assert_eq!(
        e.to_string(),
        "KVTIER_CHUNK_SIZ: unknown key `chunk_siz`; did you mean `chunk_size`?"
    );
    let e = cfg
        .apply_env(vars(&[("LMCACHE_MAX_LOCAL_CPU_SIZ", "5")]))
        .expect_err("typo");
    assert!(matches!(e, ConfigError::UnknownKey { line: None, .. }));
    cfg.apply_env(vars(&[
        ("KVTIER_CONFIG_FILE", "/nonexistent.yaml"),
        ("KVTIER_LOG", "debug"),
        ("LMCACHE_USE_EXPERIMENTAL", "True"),
        ("LMCACHE_LOG_LEVEL", "INFO"),
        ("LMCACHE_EC_CHUNK_SIZE", "16"),
        ("KVTIER_SOMETHING_ELSE_ENTIRELY", "1"),
        ("HOME", "/root"),
    ]))
    .expect("ignored");
    assert_eq!(cfg.chunk_size, 256);
    assert!(cfg.warnings().is_empty());
    // An LMCache key kvtier ignores warns, naming the variable.
    cfg.apply_env(vars(&[("LMCACHE_REMOTE_SERDE", "naive")]))
        .expect("warns");
    assert_eq!(cfg.warnings().len(), 1);
    assert_eq!(cfg.warnings()[0].origin, "LMCACHE_REMOTE_SERDE");
    assert_eq!(cfg.warnings()[0].line, None);
}

#[test]
fn from_env_vars_reads_the_named_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kv = dir.path().join("kvtier.yaml");
    let lm = dir.path().join("lmcache.yaml");
    std::fs::write(&kv, "chunk_size: 64\n").expect("write");
    std::fs::write(&lm, "chunk_size: 32\nmax_local_cpu_size: 1\n").expect("write");
    let kv_s = kv.to_string_lossy().into_owned();
    let lm_s = lm.to_string_lossy().into_owned();

    let cfg = Config::from_env_vars(vars(&[("LMCACHE_CONFIG_FILE", &lm_s)])).expect("loads");
    assert_eq!((cfg.chunk_size, cfg.max_local_cpu_size), (32, GIB));
    assert_eq!(cfg.source.as_deref(), Some(lm.as_path()));

    let cfg = Config::from_env_vars(vars(&[
        ("LMCACHE_CONFIG_FILE", &lm_s),
        ("KVTIER_CONFIG_FILE", &kv_s),
        ("LMCACHE_HASH_SEED", "9"),
    ]))
    .expect("loads");
    assert_eq!((cfg.chunk_size, cfg.hash_seed), (64, 9));
    assert_eq!(
        rendered_line(&cfg, "chunk_size"),
        format!("chunk_size: 64  # {}:1", kv.display())
    );

    let cfg = Config::from_env_vars(Vec::new()).expect("defaults");
    assert_eq!(cfg.chunk_size, 256);
    assert_eq!(cfg.source, None);

    let missing = dir.path().join("missing.yaml");
    let e = Config::from_env_vars(vars(&[("KVTIER_CONFIG_FILE", &missing.to_string_lossy())]))
        .expect_err("missing file");
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("missing.yaml"), "{e}");

    // Validation runs after the environment is applied.
    std::fs::write(&kv, "enable_pd: true\n").expect("write");
    let e = Config::from_env_vars(vars(&[("KVTIER_CONFIG_FILE", &kv_s)])).expect_err("no role");
    assert!(e.to_string().contains("`pd_role`"), "{e}");
    let cfg = Config::from_env_vars(vars(&[
        ("KVTIER_CONFIG_FILE", &kv_s),
        ("KVTIER_PD_ROLE", "sender"),
        ("KVTIER_PD_PROXY_HOST", "proxy"),
        ("KVTIER_PD_PROXY_PORT", "7500"),
    ]))
    .expect("complete");
    assert_eq!(cfg.pd_role, Some(PdRole::Sender));

    std::fs::write(&kv, [0xff, 0xfe, b'\n']).expect("write");
    let e = Config::from_yaml_file(&kv).expect_err("not utf-8");
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
}

// ---------------------------------------------------------------- render

#[test]
fn render_shows_values_and_sources() {
    let mut cfg =
        load_ok("chunk_size: 128\n\nnixl_peer_host: \"peer\\\"x\"\nmax_local_cpu_size: 0.25\n");
    cfg.apply_env(vars(&[
        ("KVTIER_HASH_SEED", "7"),
        ("KVTIER_TRANSPORT_AUTH_TOKEN", "secret-token"),
    ]))
    .expect("applies");
    cfg.max_local_gpu_size = 3 * GIB;
    let out = cfg.render();
    assert_eq!(out.lines().count(), KEYS.len());
    assert!(
        out.contains("chunk_size: 128  # configs/x.yaml:1\n"),
        "{out}"
    );
    assert!(
        out.contains("pd_peer_host: \"peer\\\"x\"  # configs/x.yaml:3\n"),
        "{out}"
    );
    assert!(
        out.contains("max_local_cpu_size: 0.25  # configs/x.yaml:4\n"),
        "{out}"
    );
    assert!(out.contains("hash_seed: 7  # KVTIER_HASH_SEED\n"), "{out}");
    assert!(out.contains("local_cpu: true  # default\n"), "{out}");
    assert!(
        out.contains("max_local_gpu_size: 3  # set by caller\n"),
        "{out}"
    );
    assert!(
        out.contains("nixl_backends: [\"UCX\"]  # default\n"),
        "{out}"
    );
    assert!(out.contains("pd_role: null  # default\n"), "{out}");
    assert!(out.contains("extra_config: {}  # default\n"), "{out}");
    assert!(
        out.contains("transport_auth_token: \"<redacted>\"  # KVTIER_TRANSPORT_AUTH_TOKEN\n"),
        "{out}"
    );
    assert!(!out.contains("secret-token"));
    // Keys appear in table order, one per line.
    for (line, spec) in out.lines().zip(KEYS) {
        assert!(line.starts_with(&format!("{}: ", spec.name)), "{line}");
    }
    // The output is YAML that loads back to the same values (the token aside).
    let again = Config::from_yaml_str(&out, "render").expect("reloads");
    assert_eq!(again.chunk_size, 128);
    assert_eq!(again.pd_peer_host.as_deref(), Some("peer\"x"));
    assert_eq!(again.max_local_cpu_size, GIB / 4);
    assert_eq!(again.max_local_gpu_size, 3 * GIB);
    assert_eq!(again.hash_seed, 7);
}

// ---------------------------------------------------------------- adversarial input

#[test]
fn adversarial_inputs_return_errors() {
    let deep_flow = "[".repeat(10_000);
    let deep_flow_closed = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_map = "{a: ".repeat(10_000);
    let deep_block: String = (0..200)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    let garbage: String = (0u8..=255).map(char::from).collect();
    let cases: Vec<(&str, String)> = vec![
        ("deep flow", deep_flow),
        ("deep flow closed", deep_flow_closed),
        ("deep map", deep_map),
        ("deep block", deep_block),
        ("alias", "a: &x 1\nchunk_size: *x\n".to_owned()),
        (
            "alias of mapping",
            "extra_config: &e {protocol: tcp}\nx: *e\n".to_owned(),
        ),
        (
            "tab indentation",
            "extra_config:\n\tprotocol: tcp\n".to_owned(),
        ),
        ("garbage", garbage),
        ("nul", "chunk_size: 1\0\n".to_owned()),
        (
            "two documents",
            "chunk_size: 1\n---\nchunk_size: 2\n".to_owned(),
        ),
        ("top-level list", "- chunk_size\n".to_owned()),
        ("top-level scalar", "chunk_size\n".to_owned()),
        ("complex key", "? [a]\n: 1\n".to_owned()),
        ("unknown tag", "chunk_size: !big 1\n".to_owned()),
        ("mismatched tag", "chunk_size: !!int x\n".to_owned()),
        ("huge key", format!("{}: 1\n", "k".repeat(100_000))),
        ("unterminated quote", "remote_url: \"abc\n".to_owned()),
        (
            "bad indent",
            "chunk_size: 1\n  local_cpu: true\n".to_owned(),
        ),
    ];
    for (name, text) in cases {
        let result = std::panic::catch_unwind(|| Config::from_yaml_str(&text, "fuzz"));
        match result {
            Ok(Ok(cfg)) => panic!("{name}: expected an error, loaded:\n{}", cfg.render()),
            Ok(Err(e)) => assert!(e.to_string().starts_with("fuzz"), "{name}: {e}"),
            Err(_) => panic!("{name}: panicked"),
        }
    }
    // An anchor that is never aliased is harmless; so are a BOM and CRLF line ends.
    assert_eq!(load_ok("chunk_size: &a 512\n").chunk_size, 512);
    assert_eq!(
        load_ok("\u{feff}chunk_size: 512\r\nlocal_cpu: false\r\n").chunk_size,
        512
    );
    // Non-UTF-8 bytes never reach the parser as &str; the lossy form is just text.
    let bytes: Vec<u8> = (0u8..=255).rev().collect();
    assert!(Config::from_yaml_str(&String::from_utf8_lossy(&bytes), "fuzz").is_err());
}

/// A deterministic xorshift generator for the pseudo-fuzz test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        // The modulo keeps the index in range.
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn random_yaml_like_input_never_panics_and_round_trips() {
    let names: Vec<&str> = keys::all_names()
        .chain(["extra_config", "protocol", "zz"])
        .collect();
    let tokens = [
        ": ", ":", " ", "\n", "\n  ", "\n- ", "[", "]", "{", "}", ", ", "-", "\"", "'", "&a ",
        "*a", "!!str ", "! ", "#", "\t", "0", "1", "7300", "-1", "0.5", "1e3", ".inf", "true",
        "False", "null", "~", "cuda:1", "sender", "nixl", "file://", "?", "|", ">", "%", "@", "`",
        "é", "\u{feff}", "---", "...", "\\", "\r\n",
    ];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut loaded = 0usize;
    for _ in 0..5_000 {
        let mut text = String::new();
        let len = rng.next() % 24;
        for _ in 0..len {
            if rng.next() % 3 == 0 {
                text.push_str(rng.pick(&names));
            } else {
                text.push_str(rng.pick(&tokens));
            }
        }
        let result = std::panic::catch_unwind(|| Config::from_yaml_str(&text, "fuzz"));
        let Ok(result) = result else {
            panic!("panicked on {text:?}");
        };
        if let Ok(cfg) = result {
            loaded += 1;
            let rendered = cfg.render();
            let again = Config::from_yaml_str(&rendered, "render")
                .unwrap_or_else(|e| panic!("render of {text:?} does not reload: {e}\n{rendered}"));
            assert_eq!(
                strip_sources(&again.render()),
                strip_sources(&rendered),
                "{text:?}"
            );
        }
    }
    assert!(loaded > 50, "generator too weak: {loaded} loads");
}

#[test]
fn passwords_in_urls_are_redacted() {
    assert_eq!(
        redact_passwords("metadata_server: \"etcd://kv:s3cret@h:2379/prod\""),
        "metadata_server: \"etcd://kv:<redacted>@h:2379/prod\""
    );
    assert_eq!(
        redact_passwords("{a: etcd://u@h:1, b: redis://:pw@r:6379/0}"),
        "{a: etcd://u@h:1, b: redis://:<redacted>@r:6379/0}"
    );
    assert_eq!(redact_passwords("no urls here"), "no urls here");
    assert_eq!(redact_passwords("x://"), "x://");
}

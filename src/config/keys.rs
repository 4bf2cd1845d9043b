//! The configuration key table: the one place that lists every key kvtier reads, its LMCache
//! aliases, its type, its default and its documentation, plus the LMCache keys kvtier knows
//! and ignores. Parsing, environment overrides, typo suggestions, `Config::render` and the
//! Markdown reference are all driven from [`KEYS`], [`EXTRA_KEYS`] and [`IGNORED_KEYS`].

use std::collections::HashMap;
use std::path::PathBuf;

use super::yaml::{self, Node, NodeKind, Scalar};
use super::{
    BufferDevice, Config, ConfigError, ConfigWarning, ExtraConfig, PdRole, TransferChannel,
};

/// Accessors for one field of `O` of type `T`.
pub(crate) struct Field<O: 'static, T: 'static> {
    /// Shared access (rendering).
    pub get: fn(&O) -> &T,
    /// Mutable access (parsing).
    pub set: fn(&mut O) -> &mut T,
}

macro_rules! field {
    ($name:ident) => {
        Field {
            get: |c| &c.$name,
            set: |c| &mut c.$name,
        }
    };
}

/// How a key's value is parsed, stored and rendered.
pub(crate) enum Slot {
    /// `true`/`false` (also PyYAML's `yes`/`no`/`on`/`off`).
    Bool(Field<Config, bool>),
    /// An integer >= 1.
    Count(Field<Config, usize>),
    /// Any integer in `0..=u64::MAX`.
    Seed(Field<Config, u64>),
    /// A size in GB (int or float), stored in bytes (1 GB = 2^30 bytes).
    Gigabytes(Field<Config, u64>),
    /// A size in bytes (integer >= 1).
    Bytes(Field<Config, u64>),
    /// A duration in seconds (int or float > 0).
    Seconds(Field<Config, f64>),
    /// A filesystem path (leading `file://` stripped); null or empty disables.
    Path(Field<Config, Option<PathBuf>>),
    /// A string; null or empty unsets.
    Text(Field<Config, Option<String>>),
    /// A P/D role.
    Role(Field<Config, Option<PdRole>>),
    /// A transfer channel.
    Channel(Field<Config, TransferChannel>),
    /// A buffer device.
    Device(Field<Config, BufferDevice>),
    /// One port or a list of ports.
    Ports(Field<Config, Vec<u16>>),
    /// One optional port.
    Port(Field<Config, Option<u16>>),
    /// A list of strings (a single string is a one-element list).
    Strings(Field<Config, Vec<String>>),
    /// The `extra_config` mapping.
    Extra(Field<Config, ExtraConfig>),
}

/// Where a key comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// A key LMCache defines, read with LMCache's meaning.
    Lmcache,
    /// A key only kvtier defines.
    Kvtier,
}

/// One configuration key.
pub(crate) struct KeySpec {
    /// Canonical name (the field name in [`Config`]).
    pub name: &'static str,
    /// LMCache names accepted for the same key.
    pub aliases: &'static [&'static str],
    /// Parsing and storage.
    pub slot: Slot,
    /// Default, as YAML text parsed by the same code as file values.
    pub default: &'static str,
    /// LMCache or kvtier key.
    pub family: Family,
    /// Whether `render()` hides the value.
    pub secret: bool,
    /// One-paragraph documentation (Markdown).
    pub doc: &'static str,
}

const fn key(
    name: &'static str,
    aliases: &'static [&'static str],
    slot: Slot,
    default: &'static str,
    family: Family,
    doc: &'static str,
) -> KeySpec {
    KeySpec {
        name,
        aliases,
        slot,
        default,
        family,
        secret: false,
        doc,
    }
}

use Family::{Kvtier, Lmcache};

/// Every key kvtier reads, in rendering order.
pub(crate) static KEYS: &[KeySpec] = &[
    key(
        "chunk_size",
        &[],
        Slot::Count(field!(chunk_size)),
        "256",
        Lmcache,
        "Tokens per KV chunk: the unit of hashing, storage and transfer. Every instance sharing \
         a cache (or a P/D pair) must use the same value.",
    ),
    key(
        "hash_seed",
        &[],
        Slot::Seed(field!(hash_seed)),
        "0",
        Kvtier,
        "Seed mixed into chunk hashes (LMCache relies on `PYTHONHASHSEED` instead). Every \
         instance sharing a cache must use the same seed.",
    ),
    key(
        "save_unfull_chunk",
        &[],
        Slot::Bool(field!(save_unfull_chunk)),
        "true",
        Lmcache,
        "Also store the trailing partial chunk of a sequence, not only full chunks.",
    ),
    key(
        "local_cpu",
        &[],
        Slot::Bool(field!(local_cpu)),
        "true",
        Lmcache,
        "Keep chunks in the host-memory tier.",
    ),
    key(
        "max_local_cpu_size",
        &[],
        Slot::Gigabytes(field!(max_local_cpu_size)),
        "5",
        Lmcache,
        "Capacity of the host-memory tier in GB (1 GB = 2^30 bytes; fractions allowed).",
    ),
    key(
        "local_disk",
        &[],
        Slot::Path(field!(local_disk)),
        "null",
        Lmcache,
        "Directory of the local disk tier. A leading `file://` is stripped; `null` or an empty \
         string disables the tier.",
    ),
    key(
        "max_local_disk_size",
        &[],
        Slot::Gigabytes(field!(max_local_disk_size)),
        "0",
        Lmcache,
        "Capacity of the disk tier in GB (1 GB = 2^30 bytes); must be > 0 when `local_disk` is \
         set.",
    ),
    key(
        "local_disk_write_queue",
        &[],
        Slot::Count(field!(local_disk_write_queue)),
        "64",
        Kvtier,
        "Bound, in chunks, of the disk tier's background write queue; while it is full, new \
         chunks skip the disk tier instead of waiting.",
    ),
    key(
        "max_local_gpu_size",
        &[],
        Slot::Gigabytes(field!(max_local_gpu_size)),
        "0",
        Kvtier,
        "Capacity of the GPU tier in GB (1 GB = 2^30 bytes); 0 disables the tier.",
    ),
    key(
        "remote_url",
        &[],
        Slot::Text(field!(remote_url)),
        "null",
        Lmcache,
        "URL of the remote tier: `kvtier://MASTER_HOST:PORT` or `mooncakestore://host:port/` \
         (the kvtier store), `kvtier://local` (master and segment in this process), \
         `redis://host:port[/db]` (Redis/Valkey); `null` disables it.",
    ),
    key(
        "extra_config",
        &[],
        Slot::Extra(field!(extra_config)),
        "null",
        Lmcache,
        "Remote-backend settings (the Mooncake keys listed under *extra_config keys*). Unknown \
         keys inside it are warnings.",
    ),
    key(
        "enable_pd",
        &["enable_nixl", "enable_xpyd"],
        Slot::Bool(field!(enable_pd)),
        "false",
        Lmcache,
        "Enable prefill/decode disaggregation: KV chunks are sent from a prefiller (sender) to \
         a decoder (receiver). `enable_nixl: true` without `transfer_channel` also selects the \
         `nixl` channel.",
    ),
    key(
        "pd_role",
        &["nixl_role"],
        Slot::Role(field!(pd_role)),
        "null",
        Lmcache,
        "Role of this instance in P/D: `sender` (prefiller) or `receiver` (decoder); \
         `producer`/`consumer` and `kv_producer`/`kv_consumer` are accepted. Required when \
         `enable_pd` is true.",
    ),
    key(
        "transfer_channel",
        &[],
        Slot::Channel(field!(transfer_channel)),
        "tcp",
        Lmcache,
        "Transport for P/D transfers: `tcp`, `ucx` or `nixl`.",
    ),
    key(
        "pd_buffer_size",
        &["nixl_buffer_size"],
        Slot::Bytes(field!(pd_buffer_size)),
        "1073741824",
        Lmcache,
        "Size in bytes of the P/D transfer buffer.",
    ),
    key(
        "pd_buffer_device",
        &["nixl_buffer_device"],
        Slot::Device(field!(pd_buffer_device)),
        "cpu",
        Lmcache,
        "Where the P/D transfer buffer lives: `cpu`, `cuda` (device 0) or `cuda:N`.",
    ),
    key(
        "pd_peer_host",
        &["nixl_peer_host", "nixl_receiver_host"],
        Slot::Text(field!(pd_peer_host)),
        "null",
        Lmcache,
        "Host of the receiver (decoder): the address a receiver listens on and, in the legacy \
         NIXL setup, the address a sender connects to.",
    ),
    key(
        "pd_peer_init_port",
        &[
            "nixl_peer_port",
            "nixl_receiver_port",
            "nixl_peer_init_port",
        ],
        Slot::Ports(field!(pd_peer_init_port)),
        "[]",
        Lmcache,
        "Receiver's handshake port, or a list with one port per tensor-parallel rank. Required \
         for a receiver.",
    ),
    key(
        "pd_peer_alloc_port",
        &["nixl_peer_alloc_port"],
        Slot::Ports(field!(pd_peer_alloc_port)),
        "[]",
        Lmcache,
        "Receiver's buffer-allocation port, or one per tensor-parallel rank. Required for a \
         receiver. Legacy single-port NIXL configs (`nixl_peer_port` / `nixl_receiver_port` \
         without an alloc port) get the init port(s) here: one listener serves both.",
    ),
    key(
        "pd_proxy_host",
        &["nixl_proxy_host"],
        Slot::Text(field!(pd_proxy_host)),
        "null",
        Lmcache,
        "Host of the P/D proxy a sender reports completed transfers to.",
    ),
    key(
        "pd_proxy_port",
        &["nixl_proxy_port"],
        Slot::Port(field!(pd_proxy_port)),
        "null",
        Lmcache,
        "Port of the P/D proxy; set together with `pd_proxy_host`.",
    ),
    key(
        "pd_enable_gc",
        &["nixl_enable_gc"],
        Slot::Bool(field!(pd_enable_gc)),
        "true",
        Lmcache,
        "Free received chunks that no request claims within `pd_ttl_sec`.",
    ),
    key(
        "pd_allocation_timeout_sec",
        &[],
        Slot::Seconds(field!(pd_allocation_timeout_sec)),
        "30",
        Lmcache,
        "Seconds a sender waits for the receiver to allocate buffer space before failing the \
         transfer.",
    ),
    key(
        "pd_ttl_sec",
        &[],
        Slot::Seconds(field!(pd_ttl_sec)),
        "300",
        Kvtier,
        "Seconds a received chunk is kept for its request before `pd_enable_gc` frees it.",
    ),
    key(
        "nixl_backends",
        &[],
        Slot::Strings(field!(nixl_backends)),
        "[UCX]",
        Lmcache,
        "NIXL backends to load when `transfer_channel` is `nixl`.",
    ),
    KeySpec {
        secret: true,
        ..key(
            "transport_auth_token",
            &[],
            Slot::Text(field!(transport_auth_token)),
            "null",
            Kvtier,
            "Shared secret that peers of the P/D and remote transports must present; `null` \
             disables authentication. `render()` shows it as `<redacted>`.",
        )
    },
    key(
        "transport_timeout_sec",
        &[],
        Slot::Seconds(field!(transport_timeout_sec)),
        "30",
        Kvtier,
        "Timeout in seconds for connecting to and for each request on the P/D and remote \
         transports.",
    ),
];

/// How an `extra_config` value is parsed.
pub(crate) enum ExtraSlot {
    /// A string.
    Text(Field<ExtraConfig, Option<String>>),
    /// A size in bytes (integer >= 0).
    Bytes(Field<ExtraConfig, Option<u64>>),
    /// Seconds (int or float > 0).
    Seconds(Field<ExtraConfig, Option<f64>>),
    /// A count (integer >= 1).
    Count(Field<ExtraConfig, Option<u64>>),
}

/// One key inside `extra_config`.
pub(crate) struct ExtraKey {
    /// Name inside the mapping.
    pub name: &'static str,
    /// Parsing and storage.
    pub slot: ExtraSlot,
    /// Documentation.
    pub doc: &'static str,
}

/// The `extra_config` keys kvtier reads (Mooncake store settings).
pub(crate) static EXTRA_KEYS: &[ExtraKey] = &[
    ExtraKey {
        name: "local_hostname",
        slot: ExtraSlot::Text(field!(local_hostname)),
        doc: "Host name this node registers with the Mooncake store.",
    },
    ExtraKey {
        name: "metadata_server",
        slot: ExtraSlot::Text(field!(metadata_server)),
        doc: "Mooncake metadata server, e.g. `etcd://host:2379`.",
    },
    ExtraKey {
        name: "protocol",
        slot: ExtraSlot::Text(field!(protocol)),
        doc: "Mooncake transfer protocol, e.g. `rdma` or `tcp`.",
    },
    ExtraKey {
        name: "device_name",
        slot: ExtraSlot::Text(field!(device_name)),
        doc: "RDMA device(s) Mooncake uses, e.g. `mlx5_0`.",
    },
    ExtraKey {
        name: "master_server_address",
        slot: ExtraSlot::Text(field!(master_server_address)),
        doc: "Address (`host:port`) of the Mooncake master.",
    },
    ExtraKey {
        name: "global_segment_size",
        slot: ExtraSlot::Bytes(field!(global_segment_size)),
        doc: "Bytes this node contributes to the Mooncake global pool.",
    },
    ExtraKey {
        name: "local_buffer_size",
        slot: ExtraSlot::Bytes(field!(local_buffer_size)),
        doc: "Bytes of the local Mooncake transfer buffer.",
    },
    ExtraKey {
        name: "transfer_timeout",
        slot: ExtraSlot::Seconds(field!(transfer_timeout)),
        doc: "Mooncake transfer timeout in seconds.",
    },
    ExtraKey {
        name: "replica_num",
        slot: ExtraSlot::Count(field!(replica_num)),
        doc: "Copies of each object in the remote store, on distinct nodes (default 1).",
    },
];

const NOT_IMPLEMENTED: &str = "kvtier does not implement this LMCache feature";
const CONTROLLER: &str = "the LMCache controller is not supported";
const BLENDING: &str = "CacheBlend is not implemented";
const P2P: &str = "peer-to-peer cache sharing between instances is not implemented; use the \
                   remote tier or P/D";
const GDS: &str = "GPUDirect Storage backends are not implemented; use `local_disk`";
const PLUGINS: &str = "kvtier cannot load Python plugins or storage backends";
const API_SERVER: &str = "the LMCache internal API server is not implemented";
const LAZY_ALLOC: &str = "kvtier allocates host buffers on demand from its own recycling pool";
const EVICTION: &str = "kvtier's tiers always evict the least recently used chunk";
const PINS: &str = "readers hold chunks by reference count; there are no pins to time out";
const CONNECTOR: &str = "this is a vLLM connector setting (`kv_connector_extra_config`), not \
                         a cache setting";
const PD_TUNING: &str = "kvtier's P/D implementation has no such knob";
const STATS: &str = "kvtier exports its statistics as Prometheus metrics";
const HIDDEN: &str = "hidden-state caching is not implemented";

/// LMCache keys kvtier accepts and ignores, with the reason given in the warning.
pub(crate) static IGNORED_KEYS: &[(&str, &str)] = &[
    ("remote_serde", "chunks use kvtier's own format"),
    (
        "local_device",
        "the host tier always lives in CPU memory; use `max_local_gpu_size` for a GPU tier",
    ),
    ("pipelined_backend", "kvtier always pipelines"),
    (
        "use_layerwise",
        "kvtier moves whole chunks, not layer by layer",
    ),
    ("save_decode_cache", NOT_IMPLEMENTED),
    ("enable_blending", BLENDING),
    ("blend_recompute_ratio", BLENDING),
    ("blend_recompute_ratios", BLENDING),
    ("blend_min_tokens", BLENDING),
    ("blend_special_str", BLENDING),
    ("blend_check_layers", BLENDING),
    ("blend_thresholds", BLENDING),
    ("enable_p2p", P2P),
    ("p2p_host", P2P),
    ("p2p_init_ports", P2P),
    ("p2p_lookup_ports", P2P),
    ("lookup_url", P2P),
    ("distributed_url", P2P),
    ("error_handling", NOT_IMPLEMENTED),
    ("enable_controller", CONTROLLER),
    ("lmcache_instance_id", CONTROLLER),
    ("controller_url", CONTROLLER),
    ("controller_pull_url", CONTROLLER),
    ("controller_reply_url", CONTROLLER),
    ("lmcache_worker_port", CONTROLLER),
    ("lmcache_worker_ports", CONTROLLER),
    ("lmcache_worker_ids", CONTROLLER),
    ("lmcache_worker_heartbeat_delay_time", CONTROLLER),
    ("lmcache_worker_heartbeat_time", CONTROLLER),
    ("weka_path", GDS),
    ("gds_path", GDS),
    ("gds_path_sharding", GDS),
    ("gds_buffer_size", GDS),
    ("gds_backend", GDS),
    ("use_gds", GDS),
    ("cufile_buffer_size", GDS),
    ("maru_path", "the Maru CXL backend is not implemented"),
    ("maru_pool_size", "the Maru CXL backend is not implemented"),
    (
        "audit_actual_remote_url",
        "the audit backend is not implemented",
    ),
    ("blocking_timeout_secs", "use `transport_timeout_sec`"),
    ("external_lookup_client", NOT_IMPLEMENTED),
    ("py_enable_gc", "kvtier has no Python garbage collector"),
    ("cache_policy", EVICTION),
    ("cost_aware_half_life_seconds", EVICTION),
    ("cost_aware_ewma_alpha", EVICTION),
    ("numa_mode", "NUMA placement is not configurable"),
    ("priority_limit", "request priorities are not implemented"),
    ("enable_async_loading", NOT_IMPLEMENTED),
    ("min_retrieve_tokens", NOT_IMPLEMENTED),
    ("hit_miss_ratio", NOT_IMPLEMENTED),
    ("plugin_locations", PLUGINS),
    ("runtime_plugin_locations", PLUGINS),
    ("external_backends", PLUGINS),
    ("storage_plugins", PLUGINS),
    ("remote_storage_plugins", PLUGINS),
    ("script_allowed_imports", PLUGINS),
    ("internal_api_server_enabled", API_SERVER),
    ("internal_api_server_host", API_SERVER),
    ("internal_api_server_port_start", API_SERVER),
    ("internal_api_server_include_index_list", API_SERVER),
    ("internal_api_server_socket_path_prefix", API_SERVER),
    ("enable_scheduler", NOT_IMPLEMENTED),
    ("enable_scheduler_bypass_lookup", NOT_IMPLEMENTED),
    ("lookup_timeout_ms", NOT_IMPLEMENTED),
    ("lookup_server_worker_ids", NOT_IMPLEMENTED),
    ("lmcache_rpc_port", CONNECTOR),
    ("discard_partial_chunks", CONNECTOR),
    ("skip_last_n_tokens", CONNECTOR),
    (
        "local_cpu_use_hugepages",
        "large host buffers use transparent huge pages automatically",
    ),
    ("reserve_local_cpu_size", LAZY_ALLOC),
    ("enable_lazy_memory_allocator", LAZY_ALLOC),
    ("lazy_memory_initial_ratio", LAZY_ALLOC),
    ("lazy_memory_expand_trigger_ratio", LAZY_ALLOC),
    ("lazy_memory_step_ratio", LAZY_ALLOC),
    ("lazy_memory_safe_size", LAZY_ALLOC),
    (
        "local_disk_path_sharding",
        "the disk tier shards its directory by chunk key",
    ),
    (
        "pre_caching_hash_algorithm",
        "chunk hashes use kvtier's hash and `hash_seed`",
    ),
    (
        "retrieve_locations",
        "kvtier reads its tiers top-down (GPU, CPU, disk)",
    ),
    (
        "store_location",
        "kvtier writes through to every configured tier",
    ),
    (
        "mp_host",
        "the LMCache multi-process server is not implemented",
    ),
    (
        "mp_port",
        "the LMCache multi-process server is not implemented",
    ),
    ("pd_peer_query_port", PD_TUNING),
    ("pd_shutdown_timeout_sec", PD_TUNING),
    ("pd_condition_poll_interval_sec", PD_TUNING),
    ("pd_max_prefill_len", PD_TUNING),
    ("pd_backend_mode", PD_TUNING),
    ("pd_skip_proxy_notification", PD_TUNING),
    ("pd_bidirectional", PD_TUNING),
    ("enable_chunk_statistics", STATS),
    ("chunk_statistics_auto_start_statistics", STATS),
    ("chunk_statistics_auto_exit_timeout_hours", STATS),
    ("chunk_statistics_auto_exit_target_unique_chunks", STATS),
    ("chunk_statistics_strategy", STATS),
    ("enable_kv_events", NOT_IMPLEMENTED),
    (
        "use_gpu_connector_v3",
        "LMCache's vLLM GPU connectors do not apply to kvtier",
    ),
    ("pin_timeout_sec", PINS),
    ("pin_check_interval_sec", PINS),
    (
        "remote_config_url",
        "configuration comes from the file and environment only",
    ),
    (
        "app_id",
        "configuration comes from the file and environment only",
    ),
    ("enable_hidden_state_cache", HIDDEN),
    ("max_hidden_state_cpu_size", HIDDEN),
    ("hidden_state_layers", HIDDEN),
    ("hidden_states_retrieve_mode", HIDDEN),
];

/// Environment-variable suffixes (after `KVTIER_`/`LMCACHE_`) that are not configuration keys
/// and must never be reported as typos.
pub(crate) static ENV_NON_KEYS: &[&str] = &[
    "config_file",
    "log",
    "log_level",
    "log_format",
    "use_experimental",
    "track_usage",
];

/// The key a (file or lower-cased env) name refers to: its index in [`KEYS`], and the alias
/// used if the name is not canonical.
pub(crate) fn lookup(name: &str) -> Option<(usize, Option<&'static str>)> {
    KEYS.iter().enumerate().find_map(|(i, k)| {
        if k.name == name {
            Some((i, None))
        } else {
            k.aliases
                .iter()
                .find(|a| **a == name)
                .map(|a| (i, Some(*a)))
        }
    })
}

/// Index of the canonical key `name` in [`KEYS`].
pub(crate) fn index_of(name: &str) -> Option<usize> {
    KEYS.iter().position(|k| k.name == name)
}

/// Why kvtier ignores the LMCache key `name`, if it is one.
pub(crate) fn ignored_reason(name: &str) -> Option<&'static str> {
    IGNORED_KEYS
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, reason)| *reason)
}

/// Every name a top-level key may have: canonical keys, aliases and ignored LMCache keys.
pub(crate) fn all_names() -> impl Iterator<Item = &'static str> {
    KEYS.iter()
        .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()))
        .chain(IGNORED_KEYS.iter().map(|(k, _)| *k))
}

/// The candidate closest to `word` (compared lower-case), if it is close enough to be a
/// plausible typo: Levenshtein distance <= `max_distance` (and less than the word's length),
/// or, when `allow_similar`, Jaro-Winkler similarity >= 0.93.
pub(crate) fn suggest(
    word: &str,
    candidates: impl Iterator<Item = &'static str>,
    max_distance: usize,
    allow_similar: bool,
) -> Option<&'static str> {
    let word = word.to_ascii_lowercase();
    // Inputs much longer than any key are not typos of one; skip the quadratic comparison.
    if word.is_empty() || word.len() > 64 {
        return None;
    }
    let word_len = word.chars().count();
    let mut best: Option<(usize, f64, &'static str)> = None;
    for cand in candidates {
        // Cheap bounds first: Levenshtein distance is at least the length difference, and
        // Jaro-Winkler stays below 0.93 when one string is over twice as long as the other.
        let cand_len = cand.chars().count();
        let distance_possible = word_len.abs_diff(cand_len) <= max_distance;
        let similar_possible =
            allow_similar && cand_len * 2 >= word_len && word_len * 2 >= cand_len;
        if !distance_possible && !similar_possible {
            continue;
        }
        let distance = if distance_possible {
            strsim::levenshtein(&word, cand)
        } else {
            usize::MAX
        };
        let similarity = if similar_possible || distance <= max_distance {
            strsim::jaro_winkler(&word, cand)
        } else {
            0.0
        };
        let close = (distance <= max_distance && distance < word_len)
            || (similar_possible && similarity >= 0.93);
        if !close {
            continue;
        }
        let better = match best {
            None => true,
            Some((d, s, _)) => distance < d || (distance == d && similarity > s),
        };
        if better {
            best = Some((distance, similarity, cand));
        }
    }
    best.map(|(_, _, c)| c)
}

/// Where a value is being read from, for error messages.
pub(crate) struct Ctx<'a> {
    /// File name or environment variable.
    pub origin: &'a str,
    /// Line of the key, for file values.
    pub line: Option<usize>,
    /// The key as written (alias or canonical; `extra_config.KEY` inside extra_config).
    pub key: &'a str,
    /// Whether the value comes from an environment variable (comma lists, `1`/`0` booleans).
    pub from_env: bool,
}

impl Ctx<'_> {
    /// The line to report for `node`: its own line for file values, none for env values.
    fn line_of(&self, node: &Node) -> Option<usize> {
        if self.from_env {
            None
        } else {
            Some(node.line)
        }
    }

    fn wrong_type(&self, expected: &'static str, node: &Node) -> ConfigError {
        let hint = match &node.kind {
            NodeKind::Scalar { text, plain: false }
                if !matches!(yaml::resolve(text), Scalar::Str(_) | Scalar::Null) =>
            {
                "; quoted values are strings: remove the quotes"
            }
            _ => "",
        };
        ConfigError::WrongType {
            origin: self.origin.to_owned(),
            line: self.line_of(node).or(self.line),
            key: self.key.to_owned(),
            expected,
            found: describe(node) + hint,
        }
    }

    fn invalid(&self, node: &Node, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            origin: self.origin.to_owned(),
            line: self.line_of(node).or(self.line),
            key: self.key.to_owned(),
            value: value_text(node),
            reason: reason.into(),
        }
    }
}

/// "a string (\"abc\")", "an integer (5)", … for wrong-type messages.
pub(crate) fn describe(node: &Node) -> String {
    match (&node.kind, node.scalar()) {
        (NodeKind::Seq(_), _) => "a list".to_owned(),
        (NodeKind::Map(_), _) => "a mapping".to_owned(),
        (_, Some(Scalar::Null)) => "null".to_owned(),
        (_, Some(Scalar::Bool(b))) => format!("a boolean ({b})"),
        (_, Some(Scalar::Int(_) | Scalar::BigInt)) => format!("an integer ({})", value_text(node)),
        (_, Some(Scalar::Float(_))) => format!("a number ({})", value_text(node)),
        (_, Some(Scalar::Str(s))) => format!("a string ({:?})", yaml::truncate(s, 60)),
        (NodeKind::Scalar { .. }, None) => "a value".to_owned(),
    }
}

/// The node's text, shortened, for messages.
fn value_text(node: &Node) -> String {
    match &node.kind {
        NodeKind::Scalar { text, .. } => yaml::truncate(text, 60),
        NodeKind::Seq(_) => "[…]".to_owned(),
        NodeKind::Map(_) => "{…}".to_owned(),
    }
}

fn integer(node: &Node, ctx: &Ctx<'_>, expected: &'static str) -> Result<i128, ConfigError> {
    match node.scalar() {
        Some(Scalar::Int(n)) => Ok(n),
        Some(Scalar::BigInt) => Err(ctx.invalid(node, "integer out of range")),
        _ => Err(ctx.wrong_type(expected, node)),
    }
}

fn number(node: &Node, ctx: &Ctx<'_>, expected: &'static str) -> Result<f64, ConfigError> {
    match node.scalar() {
        // i128 -> f64 is lossy only beyond 2^53, far above any meaningful size.
        Some(Scalar::Int(n)) => Ok(n as f64),
        Some(Scalar::Float(f)) => Ok(f),
        Some(Scalar::BigInt) => Err(ctx.invalid(node, "number out of range")),
        _ => Err(ctx.wrong_type(expected, node)),
    }
}

/// `Ok(None)` for null, the text for strings, wrong type for anything else.
fn text<'n>(
    node: &'n Node,
    ctx: &Ctx<'_>,
    expected: &'static str,
) -> Result<Option<&'n str>, ConfigError> {
    match node.scalar() {
        Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) => Ok(Some(s)),
        _ => Err(ctx.wrong_type(expected, node)),
    }
}

fn boolean(node: &Node, ctx: &Ctx<'_>) -> Result<bool, ConfigError> {
    match node.scalar() {
        Some(Scalar::Bool(b)) => Ok(b),
        Some(Scalar::Str(s)) if matches!(&node.kind, NodeKind::Scalar { plain: true, .. }) => {
            match s {
                "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Ok(true),
                "no" | "No" | "NO" | "off" | "Off" | "OFF" => Ok(false),
                _ => Err(ctx.wrong_type("a boolean", node)),
            }
        }
        Some(Scalar::Int(1)) if ctx.from_env => Ok(true),
        Some(Scalar::Int(0)) if ctx.from_env => Ok(false),
        _ => Err(ctx.wrong_type("a boolean", node)),
    }
}

fn port(node: &Node, ctx: &Ctx<'_>, expected: &'static str) -> Result<u16, ConfigError> {
    let n = integer(node, ctx, expected)?;
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(ctx.invalid(node, "a port must be between 1 and 65535")),
    }
}

const GIB: u64 = 1 << 30;

fn gigabytes(node: &Node, ctx: &Ctx<'_>) -> Result<u64, ConfigError> {
    const EXPECTED: &str = "a number (GB)";
    match node.scalar() {
        Some(Scalar::Int(n)) => {
            if n < 0 {
                return Err(ctx.invalid(node, "a size must not be negative"));
            }
            u64::try_from(n)
                .ok()
                .and_then(|n| n.checked_mul(GIB))
                .ok_or_else(|| ctx.invalid(node, "size too large"))
        }
        _ => {
            let gb = number(node, ctx, EXPECTED)?;
            if !gb.is_finite() {
                return Err(ctx.invalid(node, "a size must be a finite number"));
            }
            if gb < 0.0 {
                return Err(ctx.invalid(node, "a size must not be negative"));
            }
            let bytes = (gb * GIB as f64).round();
            if bytes >= u64::MAX as f64 {
                return Err(ctx.invalid(node, "size too large"));
            }
            // In range and non-negative: the conversion is exact up to f64 rounding.
            Ok(bytes as u64)
        }
    }
}

fn seconds(node: &Node, ctx: &Ctx<'_>) -> Result<f64, ConfigError> {
    let s = number(node, ctx, "a number (seconds)")?;
    if s.is_finite() && s > 0.0 {
        Ok(s)
    } else {
        Err(ctx.invalid(node, "a duration must be a finite number of seconds > 0"))
    }
}

/// `KVTIER_X=a,b` style lists: a plain string holding commas, from the environment.
fn env_comma_list<'n>(node: &'n Node, ctx: &Ctx<'_>) -> Option<Vec<&'n str>> {
    match (&node.kind, ctx.from_env) {
        (NodeKind::Scalar { text, .. }, true) if text.contains(',') => Some(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        _ => None,
    }
}

fn ports(node: &Node, ctx: &Ctx<'_>) -> Result<Vec<u16>, ConfigError> {
    const EXPECTED: &str = "a port or a list of ports";
    if let Some(parts) = env_comma_list(node, ctx) {
        return parts
            .into_iter()
            .map(|p| port(&Node::plain(p, node.line), ctx, EXPECTED))
            .collect();
    }
    match &node.kind {
        NodeKind::Seq(items) => items.iter().map(|i| port(i, ctx, EXPECTED)).collect(),
        NodeKind::Map(_) => Err(ctx.wrong_type(EXPECTED, node)),
        NodeKind::Scalar { .. } => port(node, ctx, EXPECTED).map(|p| vec![p]),
    }
}

fn strings(node: &Node, ctx: &Ctx<'_>) -> Result<Vec<String>, ConfigError> {
    const EXPECTED: &str = "a list of strings";
    if let Some(parts) = env_comma_list(node, ctx) {
        return Ok(parts.into_iter().map(str::to_owned).collect());
    }
    let one = |n: &Node| match text(n, ctx, EXPECTED)? {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(ctx.invalid(n, "list entries must be non-empty strings")),
    };
    match &node.kind {
        NodeKind::Seq(items) => items.iter().map(one).collect(),
        NodeKind::Map(_) => Err(ctx.wrong_type(EXPECTED, node)),
        NodeKind::Scalar { .. } => one(node).map(|s| vec![s]),
    }
}

fn role(node: &Node, ctx: &Ctx<'_>) -> Result<Option<PdRole>, ConfigError> {
    const EXPECTED: &str = "one of sender|receiver";
    let Some(s) = text(node, ctx, EXPECTED)? else {
        return Ok(None);
    };
    match s.to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "sender" | "producer" | "kv_producer" => Ok(Some(PdRole::Sender)),
        "receiver" | "consumer" | "kv_consumer" => Ok(Some(PdRole::Receiver)),
        _ => Err(ctx.invalid(
            node,
            "expected one of sender|receiver (also producer|consumer|kv_producer|kv_consumer)",
        )),
    }
}

fn channel(node: &Node, ctx: &Ctx<'_>) -> Result<Option<TransferChannel>, ConfigError> {
    const EXPECTED: &str = "one of tcp|ucx|nixl";
    let Some(s) = text(node, ctx, EXPECTED)? else {
        return Ok(None);
    };
    match s.to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "tcp" => Ok(Some(TransferChannel::Tcp)),
        "ucx" => Ok(Some(TransferChannel::Ucx)),
        "nixl" => Ok(Some(TransferChannel::Nixl)),
        _ => Err(ctx.invalid(node, "expected one of tcp|ucx|nixl")),
    }
}

fn device(node: &Node, ctx: &Ctx<'_>) -> Result<Option<BufferDevice>, ConfigError> {
    const EXPECTED: &str = "one of cpu|cuda|cuda:N";
    let Some(s) = text(node, ctx, EXPECTED)? else {
        return Ok(None);
    };
    let lower = s.to_ascii_lowercase();
    match lower.as_str() {
        "" => Ok(None),
        "cpu" => Ok(Some(BufferDevice::Cpu)),
        "cuda" => Ok(Some(BufferDevice::Cuda(0))),
        other => match other.strip_prefix("cuda:").map(str::parse::<u32>) {
            Some(Ok(index)) => Ok(Some(BufferDevice::Cuda(index))),
            _ => Err(ctx.invalid(node, "expected one of cpu|cuda|cuda:N (N a device index)")),
        },
    }
}

impl Slot {
    /// The expected type in words, for messages and the reference table.
    pub(crate) fn expected(&self) -> &'static str {
        match self {
            Slot::Bool(_) => "a boolean",
            Slot::Count(_) | Slot::Seed(_) => "an integer",
            Slot::Gigabytes(_) => "a number (GB)",
            Slot::Bytes(_) => "an integer (bytes)",
            Slot::Seconds(_) => "a number (seconds)",
            Slot::Path(_) => "a string (path)",
            Slot::Text(_) => "a string",
            Slot::Role(_) => "one of sender|receiver",
            Slot::Channel(_) => "one of tcp|ucx|nixl",
            Slot::Device(_) => "one of cpu|cuda|cuda:N",
            Slot::Ports(_) => "a port or a list of ports",
            Slot::Port(_) => "a port",
            Slot::Strings(_) => "a list of strings",
            Slot::Extra(_) => "a mapping",
        }
    }

    /// Whether an environment value for this slot is taken as text even when it is not valid
    /// YAML or looks like a number (paths, URLs, hosts, tokens).
    pub(crate) fn is_text(&self) -> bool {
        matches!(self, Slot::Path(_) | Slot::Text(_))
    }

    /// Parses `node` into `cfg`. A null value restores the key's default (`default`), except
    /// for optional keys, where it unsets the value. Unknown `extra_config` keys are reported
    /// in `warnings`.
    pub(crate) fn apply(
        &self,
        cfg: &mut Config,
        node: &Node,
        ctx: &Ctx<'_>,
        default: &str,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Result<(), ConfigError> {
        let null = node.is_null();
        let optional = matches!(
            self,
            Slot::Path(_) | Slot::Text(_) | Slot::Role(_) | Slot::Port(_) | Slot::Ports(_)
        );
        if null && !optional {
            // Defaults are never null for non-optional slots, so this does not recurse again.
            return match yaml::load(default) {
                Ok(Some(d)) if !d.is_null() => self.apply(cfg, &d, ctx, "", warnings),
                _ => Ok(()),
            };
        }
        match self {
            Slot::Bool(f) => *(f.set)(cfg) = boolean(node, ctx)?,
            Slot::Count(f) => {
                let n = integer(node, ctx, "an integer")?;
                if n < 1 {
                    return Err(ctx.invalid(node, "must be at least 1"));
                }
                *(f.set)(cfg) =
                    usize::try_from(n).map_err(|_| ctx.invalid(node, "integer too large"))?;
            }
            Slot::Seed(f) => {
                let n = integer(node, ctx, "an integer")?;
                *(f.set)(cfg) = u64::try_from(n)
                    .map_err(|_| ctx.invalid(node, "must be between 0 and 2^64-1"))?;
            }
            Slot::Gigabytes(f) => *(f.set)(cfg) = gigabytes(node, ctx)?,
            Slot::Bytes(f) => {
                let n = integer(node, ctx, "an integer (bytes)")?;
                if n < 1 {
                    return Err(ctx.invalid(node, "a buffer size must be at least 1 byte"));
                }
                *(f.set)(cfg) =
                    u64::try_from(n).map_err(|_| ctx.invalid(node, "size too large"))?;
            }
            Slot::Seconds(f) => *(f.set)(cfg) = seconds(node, ctx)?,
            Slot::Path(f) => {
                let path = text(node, ctx, "a string (path)")?;
                let path = path.map(|p| p.strip_prefix("file://").unwrap_or(p));
                *(f.set)(cfg) = path.filter(|p| !p.is_empty()).map(PathBuf::from);
            }
            Slot::Text(f) => {
                let s = text(node, ctx, "a string")?;
                *(f.set)(cfg) = s.filter(|s| !s.is_empty()).map(str::to_owned);
            }
            Slot::Role(f) => *(f.set)(cfg) = role(node, ctx)?,
            Slot::Channel(f) => {
                if let Some(c) = channel(node, ctx)? {
                    *(f.set)(cfg) = c;
                }
            }
            Slot::Device(f) => {
                if let Some(d) = device(node, ctx)? {
                    *(f.set)(cfg) = d;
                }
            }
            Slot::Ports(f) => {
                *(f.set)(cfg) = if null { Vec::new() } else { ports(node, ctx)? };
            }
            Slot::Port(f) => {
                *(f.set)(cfg) = if null {
                    None
                } else {
                    Some(port(node, ctx, "a port")?)
                };
            }
            Slot::Strings(f) => *(f.set)(cfg) = strings(node, ctx)?,
            Slot::Extra(f) => apply_extra((f.set)(cfg), node, ctx, warnings)?,
        }
        Ok(())
    }

    /// The value as YAML text, as `render()` prints it (loadable by `from_yaml_str`).
    pub(crate) fn render(&self, cfg: &Config) -> String {
        match self {
            Slot::Bool(f) => (f.get)(cfg).to_string(),
            Slot::Count(f) => (f.get)(cfg).to_string(),
            Slot::Seed(f) | Slot::Bytes(f) => (f.get)(cfg).to_string(),
            Slot::Gigabytes(f) => render_gigabytes(*(f.get)(cfg)),
            Slot::Seconds(f) => render_f64(*(f.get)(cfg)),
            Slot::Path(f) => match (f.get)(cfg) {
                Some(p) => quote(&p.to_string_lossy()),
                None => "null".to_owned(),
            },
            Slot::Text(f) => match (f.get)(cfg) {
                Some(s) => quote(s),
                None => "null".to_owned(),
            },
            Slot::Role(f) => match (f.get)(cfg) {
                Some(r) => r.to_string(),
                None => "null".to_owned(),
            },
            Slot::Channel(f) => (f.get)(cfg).to_string(),
            Slot::Device(f) => (f.get)(cfg).to_string(),
            Slot::Ports(f) => {
                let ports: Vec<String> = (f.get)(cfg).iter().map(u16::to_string).collect();
                format!("[{}]", ports.join(", "))
            }
            Slot::Port(f) => match (f.get)(cfg) {
                Some(p) => p.to_string(),
                None => "null".to_owned(),
            },
            Slot::Strings(f) => {
                let items: Vec<String> = (f.get)(cfg).iter().map(|s| quote(s)).collect();
                format!("[{}]", items.join(", "))
            }
            Slot::Extra(f) => render_extra((f.get)(cfg)),
        }
    }
}

/// Merges the `extra_config` mapping in `node` into `extra` (null clears it).
fn apply_extra(
    extra: &mut ExtraConfig,
    node: &Node,
    ctx: &Ctx<'_>,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<(), ConfigError> {
    let entries = match &node.kind {
        _ if node.is_null() => {
            *extra = ExtraConfig::default();
            return Ok(());
        }
        NodeKind::Map(entries) => entries,
        _ => return Err(ctx.wrong_type("a mapping", node)),
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (k, v) in entries {
        let line = ctx.line_of(k);
        let name = match &k.kind {
            NodeKind::Scalar { text, .. } => text.as_str(),
            _ => {
                return Err(ConfigError::Structure {
                    origin: ctx.origin.to_owned(),
                    line: k.line,
                    message: format!("keys inside `{}` must be strings", ctx.key),
                })
            }
        };
        let qualified = format!("{}.{}", ctx.key, name);
        if let Some(first) = seen.get(name) {
            return Err(ConfigError::DuplicateKey {
                origin: ctx.origin.to_owned(),
                key: qualified,
                first_line: *first,
                second_line: k.line,
            });
        }
        seen.insert(name, k.line);
        let inner = Ctx {
            origin: ctx.origin,
            line,
            key: &qualified,
            from_env: ctx.from_env,
        };
        let Some(spec) = EXTRA_KEYS.iter().find(|e| e.name == name) else {
            let hint = suggest(name, EXTRA_KEYS.iter().map(|e| e.name), 3, true)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            warnings.push(ConfigWarning {
                origin: ctx.origin.to_owned(),
                key: qualified.clone(),
                line,
                message: format!(
                    "`{}` is not an extra_config key kvtier reads{hint}; ignored",
                    yaml::truncate(&qualified, 80)
                ),
            });
            continue;
        };
        match &spec.slot {
            ExtraSlot::Text(f) => {
                *(f.set)(extra) = text(v, &inner, "a string")?
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned);
            }
            ExtraSlot::Bytes(f) => {
                *(f.set)(extra) = if v.is_null() {
                    None
                } else {
                    let n = integer(v, &inner, "an integer (bytes)")?;
                    Some(
                        u64::try_from(n)
                            .map_err(|_| inner.invalid(v, "must be between 0 and 2^64-1"))?,
                    )
                };
            }
            ExtraSlot::Seconds(f) => {
                *(f.set)(extra) = if v.is_null() {
                    None
                } else {
                    Some(seconds(v, &inner)?)
                };
            }
            ExtraSlot::Count(f) => {
                *(f.set)(extra) = if v.is_null() {
                    None
                } else {
                    let n = integer(v, &inner, "an integer >= 1")?;
                    Some(
                        u64::try_from(n)
                            .ok()
                            .filter(|&n| n >= 1)
                            .ok_or_else(|| inner.invalid(v, "must be at least 1"))?,
                    )
                };
            }
        }
    }
    Ok(())
}

fn render_extra(extra: &ExtraConfig) -> String {
    let mut parts = Vec::new();
    for spec in EXTRA_KEYS {
        let value = match &spec.slot {
            ExtraSlot::Text(f) => (f.get)(extra).as_deref().map(quote),
            ExtraSlot::Bytes(f) | ExtraSlot::Count(f) => (f.get)(extra).map(|n| n.to_string()),
            ExtraSlot::Seconds(f) => (f.get)(extra).map(render_f64),
        };
        if let Some(v) = value {
            parts.push(format!("{}: {v}", spec.name));
        }
    }
    format!("{{{}}}", parts.join(", "))
}

/// Bytes as GB, as an integer when exact.
pub(crate) fn render_gigabytes(bytes: u64) -> String {
    if bytes % GIB == 0 {
        (bytes / GIB).to_string()
    } else {
        render_f64(bytes as f64 / GIB as f64)
    }
}

/// A float as YAML: shortest round-trip form, `.inf`/`.nan` for non-finite values.
pub(crate) fn render_f64(f: f64) -> String {
    if f.is_nan() {
        ".nan".to_owned()
    } else if f.is_infinite() {
        if f > 0.0 { ".inf" } else { "-.inf" }.to_owned()
    } else {
        format!("{f}")
    }
}

/// A YAML double-quoted string.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

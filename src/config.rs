//! kvtier configuration: loading LMCache-compatible YAML files and environment overrides.
//!
//! This module owns everything between a user's configuration and a validated [`Config`]:
//!
//! * reading LMCache YAML files as written, including LMCache's legacy `nixl_*` aliases,
//!   with a line number for every key and value (`config/yaml.rs` builds a small node tree
//!   from yaml-rust2's event parser, with bounded nesting and no aliases);
//! * `KVTIER_<KEY>` / `LMCACHE_<KEY>` environment overrides ([`Config::apply_env`]);
//! * precise errors ([`ConfigError`]: file, line, key, expected type, suggestions for typos)
//!   and warnings ([`ConfigWarning`]) for LMCache keys kvtier knows but does not implement;
//! * cross-field validation ([`Config::validate`]);
//! * provenance of every value, shown by [`Config::render`];
//! * the configuration reference ([`reference_table_markdown`]);
//! * typed settings per subsystem resolved from it ([`EngineSettings`] and its parts, in
//!   `config/settings.rs`), including the translation of Mooncake's `extra_config` keys.
//!
//! Every key is described once, in the table in `config/keys.rs`; parsing, environment
//! overrides, suggestions, rendering and the reference are all driven from it.
//!
//! Sizes written in GB follow LMCache: `max_local_cpu_size: 5` means 5 GB, and kvtier uses
//! 1 GB = 2^30 bytes. Sizes are stored in bytes.

mod keys;
mod settings;
#[cfg(test)]
mod tests;
mod yaml;

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use keys::{Ctx, KEYS};
pub use settings::{
    store_channel, DiskSettings, EngineSettings, KeySettings, PdReceiverSettings, PdSenderSettings,
    PdSettings, RemoteSettings, TierSettings, TransportSettings, DEFAULT_EMBEDDED_SEGMENT,
    DEFAULT_STAGING_BYTES, MAX_REPLICAS,
};
use yaml::{LoadError, Node, NodeKind};

/// Role of an instance in prefill/decode disaggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PdRole {
    /// Prefiller: computes KV and sends it (`sender`, `producer`, `kv_producer`).
    Sender,
    /// Decoder: receives KV (`receiver`, `consumer`, `kv_consumer`).
    Receiver,
}

impl PdRole {
    /// The canonical YAML spelling (`sender` / `receiver`).
    pub fn as_str(self) -> &'static str {
        match self {
            PdRole::Sender => "sender",
            PdRole::Receiver => "receiver",
        }
    }
}

impl fmt::Display for PdRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport used for P/D transfers (`transfer_channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferChannel {
    /// Plain TCP (`tcp`, the default).
    Tcp,
    /// UCX (`ucx`).
    Ucx,
    /// NVIDIA NIXL (`nixl`).
    Nixl,
}

impl TransferChannel {
    /// The YAML spelling (`tcp` / `ucx` / `nixl`).
    pub fn as_str(self) -> &'static str {
        match self {
            TransferChannel::Tcp => "tcp",
            TransferChannel::Ucx => "ucx",
            TransferChannel::Nixl => "nixl",
        }
    }
}

impl fmt::Display for TransferChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the P/D transfer buffer lives (`pd_buffer_device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferDevice {
    /// Host memory (`cpu`).
    Cpu,
    /// GPU memory on the given CUDA device (`cuda` = `cuda:0`, `cuda:N`).
    Cuda(u32),
}

impl fmt::Display for BufferDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BufferDevice::Cpu => f.write_str("cpu"),
            BufferDevice::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

/// Remote-backend settings from `extra_config` (the Mooncake store keys kvtier reads).
/// Other keys inside `extra_config` are reported as warnings and ignored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtraConfig {
    /// Host name this node registers with the Mooncake store.
    pub local_hostname: Option<String>,
    /// Mooncake metadata server, e.g. `etcd://host:2379`.
    pub metadata_server: Option<String>,
    /// Mooncake transfer protocol, e.g. `rdma` or `tcp`.
    pub protocol: Option<String>,
    /// RDMA device(s) Mooncake uses.
    pub device_name: Option<String>,
    /// Address (`host:port`) of the Mooncake master.
    pub master_server_address: Option<String>,
    /// Bytes this node contributes to the Mooncake global pool.
    pub global_segment_size: Option<u64>,
    /// Bytes of the local Mooncake transfer buffer.
    pub local_buffer_size: Option<u64>,
    /// Mooncake transfer timeout in seconds.
    pub transfer_timeout: Option<f64>,
    /// Copies of each object in the remote store, on distinct nodes.
    pub replica_num: Option<u64>,
}

/// A non-fatal finding while loading: an LMCache key kvtier ignores, or an unknown key inside
/// `extra_config`. Loading does not log them; [`crate::Engine::from_config`] logs each
/// once, and `kvtier config check` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// File name or environment variable the key came from.
    pub origin: String,
    /// The key as written (`extra_config.KEY` for keys inside `extra_config`).
    pub key: String,
    /// Line of the key in the file; `None` for environment variables.
    pub line: Option<usize>,
    /// What kvtier does with the key and why.
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", at(&self.origin, &self.line), self.message)
    }
}

/// Why a configuration could not be loaded. Every message names the file (or environment
/// variable), the key and the line where they are known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid YAML.
    #[error("{origin}:{line}:{column}: YAML syntax error: {message}")]
    Syntax {
        /// File name or environment variable.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// Valid YAML of a shape kvtier does not accept: top level not a mapping, several
    /// documents, aliases, tags, non-string keys, nesting too deep.
    #[error("{origin}:{line}: {message}")]
    Structure {
        /// File name or environment variable.
        origin: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A key that is neither a kvtier key, an LMCache alias nor a known LMCache key.
    #[error("{}: unknown key `{key}`{}", at(.origin, .line), did_you_mean(.suggestion))]
    UnknownKey {
        /// File name or environment variable.
        origin: String,
        /// Line of the key; `None` for environment variables.
        line: Option<usize>,
        /// The key as written (lower-cased for environment variables).
        key: String,
        /// The closest known key, if one is close enough to be the intended one.
        suggestion: Option<String>,
    },
    /// A value of the wrong YAML type.
    #[error("{}: `{key}` expects {expected}, found {found}", at(.origin, .line))]
    WrongType {
        /// File name or environment variable.
        origin: String,
        /// Line of the value; `None` for environment variables.
        line: Option<usize>,
        /// The key as written.
        key: String,
        /// The expected type in words ("an integer", "a number (GB)", …).
        expected: &'static str,
        /// What was found, in words, with the value (and advice such as removing quotes).
        found: String,
    },
    /// A value of the right type but out of range or not one of the allowed values.
    #[error("{}: invalid value {value:?} for `{key}`: {reason}", at(.origin, .line))]
    InvalidValue {
        /// File name or environment variable.
        origin: String,
        /// Line of the value; `None` for environment variables.
        line: Option<usize>,
        /// The key as written.
        key: String,
        /// The value as written.
        value: String,
        /// What is wrong, with the allowed values for enumerations.
        reason: String,
    },
    /// The same key twice in one mapping.
    #[error("{origin}:{second_line}: duplicate key `{key}` (first set at line {first_line})")]
    DuplicateKey {
        /// File name or environment variable.
        origin: String,
        /// The key.
        key: String,
        /// Line of the first occurrence.
        first_line: usize,
        /// Line of the second occurrence.
        second_line: usize,
    },
    /// Two names of one key (an alias and its canonical key, or two aliases) set to
    /// different values in the same file, or in environment variables with the same prefix.
    #[error(
        "{}: `{}` = {} conflicts with {first}; both set `{key}`",
        at(&.second.origin, &.second.line),
        .second.key,
        .second.value
    )]
    Conflict {
        /// The canonical key both names set.
        key: String,
        /// The setting found first.
        first: Box<KeySetting>,
        /// The setting found second.
        second: Box<KeySetting>,
    },
    /// A cross-field check failed ([`Config::validate`]).
    #[error("{origin}: {message}")]
    Invalid {
        /// The file the configuration came from, or `configuration`.
        origin: String,
        /// The keys involved.
        keys: Vec<String>,
        /// What is wrong, naming the keys, their values and where they were set.
        message: String,
    },
}

/// One side of a [`ConfigError::Conflict`]: a key as written, where, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySetting {
    /// The key as written (an alias or the canonical name).
    pub key: String,
    /// File name or environment variable.
    pub origin: String,
    /// Line of the key; `None` for environment variables.
    pub line: Option<usize>,
    /// The value, as rendered YAML.
    pub value: String,
}

impl fmt::Display for KeySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` = {} at {}",
            self.key,
            self.value,
            at(&self.origin, &self.line)
        )
    }
}

/// `origin:line`, or `origin` without a line.
fn at(origin: &str, line: &Option<usize>) -> String {
    match line {
        Some(line) => format!("{origin}:{line}"),
        None => origin.to_owned(),
    }
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ValueSource {
    /// Not set: the table default (or a value assigned in code).
    Default,
    /// A configuration file.
    File { origin: String, line: usize },
    /// An environment variable.
    Env(String),
}

/// Provenance of one key: where its value came from and under which alias.
#[derive(Debug, Clone)]
struct KeyOrigin {
    source: ValueSource,
    alias: Option<&'static str>,
}

/// Where each value of a [`Config`] came from, and the warnings collected while loading.
/// Opaque: read it through [`Config::render`] and [`Config::warnings`]. It is a public field
/// only so that `Config { chunk_size: 16, ..Config::default() }` works outside this module.
#[derive(Debug, Clone)]
pub struct Provenance {
    keys: Vec<KeyOrigin>,
    warnings: Vec<ConfigWarning>,
    origin: Option<String>,
}

impl Default for Provenance {
    fn default() -> Self {
        Provenance {
            keys: vec![
                KeyOrigin {
                    source: ValueSource::Default,
                    alias: None,
                };
                KEYS.len()
            ],
            warnings: Vec::new(),
            origin: None,
        }
    }
}

/// The kvtier configuration. Build it with [`Config::from_env`], [`Config::from_yaml_file`],
/// [`Config::from_yaml_str`] or [`Config::default`]; see [`reference_table_markdown`] for
/// every key, its LMCache aliases and its default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Tokens per KV chunk (`chunk_size`, default 256, > 0).
    pub chunk_size: usize,
    /// Seed mixed into chunk hashes (`hash_seed`, kvtier key, default 0).
    pub hash_seed: u64,
    /// Also store the trailing partial chunk of a sequence (`save_unfull_chunk`, default true).
    pub save_unfull_chunk: bool,
    /// Enable the host-memory tier (`local_cpu`, default true).
    pub local_cpu: bool,
    /// Host-memory tier capacity in bytes; YAML gives GB, 1 GB = 2^30 bytes
    /// (`max_local_cpu_size`, default 5 GB).
    pub max_local_cpu_size: u64,
    /// Directory of the disk tier, `file://` prefix stripped; `None` disables the tier
    /// (`local_disk`, default none).
    pub local_disk: Option<PathBuf>,
    /// Disk tier capacity in bytes; YAML gives GB, 1 GB = 2^30 bytes
    /// (`max_local_disk_size`, default 0; must be > 0 when `local_disk` is set).
    pub max_local_disk_size: u64,
    /// GPU tier capacity in bytes; YAML gives GB, 1 GB = 2^30 bytes; 0 disables the tier
    /// (`max_local_gpu_size`, kvtier key, default 0).
    pub max_local_gpu_size: u64,
    /// Bound, in chunks, of the disk tier's background write queue
    /// (`local_disk_write_queue`, kvtier key, default 64).
    pub local_disk_write_queue: usize,
    /// URL of the remote tier, e.g. `mooncakestore://host:port/` (`remote_url`, default none).
    pub remote_url: Option<String>,
    /// Remote-backend (Mooncake) settings (`extra_config`).
    pub extra_config: ExtraConfig,
    /// Enable prefill/decode disaggregation (`enable_pd`, aliases `enable_nixl`, `enable_xpyd`;
    /// default false).
    pub enable_pd: bool,
    /// This instance's P/D role (`pd_role`, alias `nixl_role`); required when `enable_pd`.
    pub pd_role: Option<PdRole>,
    /// Transport for P/D transfers (`transfer_channel`, default tcp; `enable_nixl: true`
    /// without an explicit channel selects nixl).
    pub transfer_channel: TransferChannel,
    /// P/D transfer buffer size in bytes (`pd_buffer_size`, alias `nixl_buffer_size`,
    /// default 1 GiB).
    pub pd_buffer_size: u64,
    /// Where the P/D transfer buffer lives (`pd_buffer_device`, alias `nixl_buffer_device`,
    /// default cpu).
    pub pd_buffer_device: BufferDevice,
    /// Receiver host (`pd_peer_host`, aliases `nixl_peer_host`, `nixl_receiver_host`).
    pub pd_peer_host: Option<String>,
    /// Receiver handshake port(s), one per TP rank (`pd_peer_init_port`, aliases
    /// `nixl_peer_port`, `nixl_receiver_port`, `nixl_peer_init_port`).
    pub pd_peer_init_port: Vec<u16>,
    /// Receiver allocation port(s), one per TP rank (`pd_peer_alloc_port`, alias
    /// `nixl_peer_alloc_port`). LMCache's legacy single-port NIXL configs (`nixl_peer_port` /
    /// `nixl_receiver_port` and no alloc port) load with this equal to `pd_peer_init_port`:
    /// one listener serves both the handshake and allocations.
    pub pd_peer_alloc_port: Vec<u16>,
    /// P/D proxy host (`pd_proxy_host`, alias `nixl_proxy_host`).
    pub pd_proxy_host: Option<String>,
    /// P/D proxy port (`pd_proxy_port`, alias `nixl_proxy_port`).
    pub pd_proxy_port: Option<u16>,
    /// Free received chunks nobody claims within `pd_ttl_sec` (`pd_enable_gc`, alias
    /// `nixl_enable_gc`, default true).
    pub pd_enable_gc: bool,
    /// Seconds a sender waits for receiver buffer allocation (`pd_allocation_timeout_sec`,
    /// default 30).
    pub pd_allocation_timeout_sec: f64,
    /// Seconds a received chunk is kept for its request (`pd_ttl_sec`, default 300).
    pub pd_ttl_sec: f64,
    /// NIXL backends to load (`nixl_backends`, default `["UCX"]`).
    pub nixl_backends: Vec<String>,
    /// Shared secret for the P/D and remote transports (`transport_auth_token`, kvtier key).
    pub transport_auth_token: Option<String>,
    /// Connect/request timeout of the transports in seconds (`transport_timeout_sec`,
    /// kvtier key, default 30).
    pub transport_timeout_sec: f64,
    /// The file this configuration was loaded from (not a key).
    pub source: Option<PathBuf>,
    /// Where each value came from, and the load warnings (see [`Provenance`]).
    pub provenance: Provenance,
}

impl Default for Config {
    /// Every key at its documented default (from the key table).
    fn default() -> Self {
        static DEFAULTS: OnceLock<Config> = OnceLock::new();
        DEFAULTS.get_or_init(Config::from_table_defaults).clone()
    }
}

impl Config {
    /// Builds the defaults by parsing each key's default text from the key table.
    fn from_table_defaults() -> Config {
        let mut cfg = Config {
            chunk_size: 0,
            hash_seed: 0,
            save_unfull_chunk: false,
            local_cpu: false,
            max_local_cpu_size: 0,
            local_disk: None,
            max_local_disk_size: 0,
            max_local_gpu_size: 0,
            local_disk_write_queue: 0,
            remote_url: None,
            extra_config: ExtraConfig::default(),
            enable_pd: false,
            pd_role: None,
            transfer_channel: TransferChannel::Tcp,
            pd_buffer_size: 0,
            pd_buffer_device: BufferDevice::Cpu,
            pd_peer_host: None,
            pd_peer_init_port: Vec::new(),
            pd_peer_alloc_port: Vec::new(),
            pd_proxy_host: None,
            pd_proxy_port: None,
            pd_enable_gc: false,
            pd_allocation_timeout_sec: 0.0,
            pd_ttl_sec: 0.0,
            nixl_backends: Vec::new(),
            transport_auth_token: None,
            transport_timeout_sec: 0.0,
            source: None,
            provenance: Provenance::default(),
        };
        let mut ignored = Vec::new();
        for spec in KEYS {
            let ctx = Ctx {
                origin: "default",
                line: None,
                key: spec.name,
                from_env: false,
            };
            // The table's defaults are constants covered by tests; a failure here is a bug
            // in the table, never a consequence of user input.
            let result = match yaml::load(spec.default) {
                Ok(Some(node)) => spec.slot.apply(&mut cfg, &node, &ctx, "", &mut ignored),
                Ok(None) => Ok(()),
                Err(e) => Err(load_error(e, "default")),
            };
            debug_assert!(result.is_ok(), "bad default for {}: {result:?}", spec.name);
        }
        cfg
    }

    /// Parses LMCache/kvtier YAML text, then validates it. `origin` names the text in
    /// messages (usually the file name).
    pub fn from_yaml_str(yaml: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        cfg.merge_yaml(yaml, origin)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a YAML file, then validates it. [`Config::source`] is set to `path`.
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let cfg = Config::load_file(path.as_ref())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads the file named by `KVTIER_CONFIG_FILE`, else by `LMCACHE_CONFIG_FILE`, else
    /// starts from the defaults; then applies environment overrides ([`Config::apply_env`])
    /// from the process environment and validates. Environment variables whose name or value
    /// is not UTF-8 are skipped.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_env_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// [`Config::from_env`] with an explicit list of environment variables (for tests and
    /// embedding; never reads the process environment).
    pub fn from_env_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let named = |name: &str| {
            vars.iter()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v.clone())
        };
        let file = named("KVTIER_CONFIG_FILE").or_else(|| named("LMCACHE_CONFIG_FILE"));
        let mut cfg = match file {
            Some(path) => Config::load_file(Path::new(&path))?,
            None => Config::default(),
        };
        cfg.apply_env(vars)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies `KVTIER_<KEY>` and `LMCACHE_<KEY>` overrides. The key part is matched
    /// case-insensitively against canonical keys and LMCache aliases; `KVTIER_` wins over
    /// `LMCACHE_` for the same key. Values are read as YAML scalars or flow collections
    /// (`512`, `true`, `[7300, 7301]`, `{protocol: tcp}`); list keys also take
    /// comma-separated values (`7300,7301`), booleans also `1`/`0`, and string keys take the
    /// raw text when it is not a YAML scalar. `extra_config` values are merged into the
    /// current ones.
    ///
    /// Variables with the prefix that name no key are ignored (e.g. `KVTIER_CONFIG_FILE`,
    /// `KVTIER_LOG`, `LMCACHE_USE_EXPERIMENTAL`), unless the name is within edit distance 2
    /// of a known key: that is reported as [`ConfigError::UnknownKey`] rather than silently
    /// dropping a typo. LMCache keys kvtier ignores produce a [`ConfigWarning`].
    /// Does not call [`Config::validate`].
    pub fn apply_env<I>(&mut self, vars: I) -> Result<(), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        struct Hit {
            kvtier: bool,
            var: String,
            index: usize,
            key: String,
            alias: Option<&'static str>,
            value: String,
        }
        let mut hits = Vec::new();
        for (var, value) in vars {
            let (kvtier, suffix) = if let Some(s) = var.strip_prefix("KVTIER_") {
                (true, s)
            } else if let Some(s) = var.strip_prefix("LMCACHE_") {
                (false, s)
            } else {
                continue;
            };
            let name = suffix.to_ascii_lowercase();
            if let Some((index, alias)) = keys::lookup(&name) {
                hits.push(Hit {
                    kvtier,
                    var,
                    index,
                    key: name,
                    alias,
                    value,
                });
            } else if let Some(reason) = keys::ignored_reason(&name) {
                let message = ignored_message(&name, reason);
                self.warn(ConfigWarning {
                    origin: var,
                    key: name,
                    line: None,
                    message,
                });
            } else if keys::ENV_NON_KEYS.contains(&name.as_str()) || name.starts_with("ec_") {
                // Not configuration keys (config file, logging, LMCache EC overrides).
            } else if let Some(s) = keys::suggest(&name, keys::all_names(), 2, false) {
                return Err(ConfigError::UnknownKey {
                    origin: var,
                    line: None,
                    key: name,
                    suggestion: Some(s.to_owned()),
                });
            } else {
                tracing::debug!(var = %var, "environment variable names no configuration key");
            }
        }
        // LMCACHE_ first, then KVTIER_; by name within a prefix, for deterministic errors.
        hits.sort_by(|a, b| (a.kvtier, &a.var).cmp(&(b.kvtier, &b.var)));
        let overridden: HashSet<usize> =
            hits.iter().filter(|h| h.kvtier).map(|h| h.index).collect();
        let mut applied: Vec<Option<(String, String, String)>> = vec![None; KEYS.len()];
        for hit in hits {
            if !hit.kvtier && overridden.contains(&hit.index) {
                tracing::debug!(var = %hit.var, "overridden by a KVTIER_ variable");
                continue;
            }
            let Some(spec) = KEYS.get(hit.index) else {
                continue;
            };
            let node = env_node(&spec.slot, &hit.var, &hit.value)?;
            let ctx = Ctx {
                origin: &hit.var,
                line: None,
                key: &hit.key,
                from_env: true,
            };
            let first = applied.get(hit.index).cloned().flatten();
            if let Some((first_var, first_key, first_value)) = first {
                let mut probe = self.clone();
                spec.slot
                    .apply(&mut probe, &node, &ctx, spec.default, &mut Vec::new())?;
                let value = spec.slot.render(&probe);
                if value != first_value {
                    return Err(ConfigError::Conflict {
                        key: spec.name.to_owned(),
                        first: Box::new(KeySetting {
                            key: first_key,
                            origin: first_var,
                            line: None,
                            value: first_value,
                        }),
                        second: Box::new(KeySetting {
                            key: hit.key,
                            origin: hit.var,
                            line: None,
                            value,
                        }),
                    });
                }
                continue;
            }
            let mut warnings = Vec::new();
            spec.slot
                .apply(self, &node, &ctx, spec.default, &mut warnings)?;
            for w in warnings {
                self.warn(w);
            }
            if let Some(slot) = applied.get_mut(hit.index) {
                *slot = Some((hit.var.clone(), hit.key.clone(), spec.slot.render(self)));
            }
            self.set_origin(hit.index, ValueSource::Env(hit.var), hit.alias);
        }
        self.apply_implied();
        Ok(())
    }

    /// Cross-field checks, each error naming the keys involved with their values and where
    /// they were set:
    ///
    /// * `chunk_size` and `local_disk_write_queue` > 0; timeouts finite and > 0; ports > 0;
    /// * `local_disk` set needs `max_local_disk_size` > 0;
    /// * `enable_pd` needs `pd_role` and `pd_buffer_size` > 0;
    /// * a receiver needs `pd_peer_init_port` and `pd_peer_alloc_port` with one entry per
    ///   rank each (for legacy single-port NIXL configs the loader sets the alloc ports equal
    ///   to the init ports);
    /// * a sender needs `pd_proxy_host` + `pd_proxy_port`, or (legacy NIXL) `pd_peer_host`
    ///   + `pd_peer_init_port`; `pd_proxy_host` and `pd_proxy_port` go together;
    /// * `transfer_channel: nixl` needs at least one entry in `nixl_backends`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |keys: &[&str], message: String| {
            Err(ConfigError::Invalid {
                origin: self.origin_name(),
                keys: keys.iter().map(|k| (*k).to_owned()).collect(),
                message,
            })
        };
        if self.chunk_size == 0 {
            return fail(
                &["chunk_size"],
                format!("{} must be > 0", self.shown("chunk_size")),
            );
        }
        if self.local_disk_write_queue == 0 {
            return fail(
                &["local_disk_write_queue"],
                format!("{} must be > 0", self.shown("local_disk_write_queue")),
            );
        }
        for (key, value) in [
            ("pd_allocation_timeout_sec", self.pd_allocation_timeout_sec),
            ("pd_ttl_sec", self.pd_ttl_sec),
            ("transport_timeout_sec", self.transport_timeout_sec),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return fail(
                    &[key],
                    format!("{} must be a finite number of seconds > 0", self.shown(key)),
                );
            }
        }
        if let Some(t) = self.extra_config.transfer_timeout {
            if !(t.is_finite() && t > 0.0) {
                return fail(
                    &["extra_config"],
                    format!(
                        "`extra_config.transfer_timeout` must be a finite number of seconds \
                         > 0, found {t}"
                    ),
                );
            }
        }
        // Receiver ports of 0 (set in code, e.g. by tests) mean "any free port"; the
        // receiver reports what it bound. The YAML loader still requires 1..=65535.
        if self.pd_proxy_port == Some(0) {
            return fail(
                &["pd_proxy_port"],
                format!("{}: port 0 is not allowed", self.shown("pd_proxy_port")),
            );
        }
        if self.local_disk.is_some() && self.max_local_disk_size == 0 {
            return fail(
                &["local_disk", "max_local_disk_size"],
                format!(
                    "{} is set but {} is 0; give the disk tier a capacity in GB or remove \
                     `local_disk`",
                    self.shown("local_disk"),
                    self.shown("max_local_disk_size")
                ),
            );
        }
        if self.transfer_channel == TransferChannel::Nixl && self.nixl_backends.is_empty() {
            return fail(
                &["transfer_channel", "nixl_backends"],
                format!(
                    "{} needs at least one backend in {}",
                    self.shown("transfer_channel"),
                    self.shown("nixl_backends")
                ),
            );
        }
        if self.pd_proxy_host.is_some() != self.pd_proxy_port.is_some() {
            return fail(
                &["pd_proxy_host", "pd_proxy_port"],
                format!(
                    "{} and {} must be set together",
                    self.shown("pd_proxy_host"),
                    self.shown("pd_proxy_port")
                ),
            );
        }
        if let Some(p) = self.extra_config.protocol.as_deref() {
            if store_channel(Some(p)).is_none() {
                return fail(
                    &["extra_config"],
                    format!(
                        "`extra_config.protocol: {p}`: expected tcp, ucx (Mooncake's rdma) or nixl"
                    ),
                );
            }
        }
        if !self.enable_pd {
            return Ok(());
        }
        if self.pd_buffer_size == 0 {
            return fail(
                &["enable_pd", "pd_buffer_size"],
                format!(
                    "{} needs {} > 0",
                    self.shown("enable_pd"),
                    self.shown("pd_buffer_size")
                ),
            );
        }
        match self.pd_role {
            None => fail(
                &["enable_pd", "pd_role"],
                format!(
                    "{} needs {} (sender or receiver)",
                    self.shown("enable_pd"),
                    self.shown("pd_role")
                ),
            ),
            Some(PdRole::Receiver) => {
                if self.pd_peer_init_port.is_empty() {
                    return fail(
                        &["pd_role", "pd_peer_init_port"],
                        format!(
                            "{} needs {} (one port per TP rank)",
                            self.shown("pd_role"),
                            self.shown("pd_peer_init_port")
                        ),
                    );
                }
                if self.pd_peer_alloc_port.is_empty() {
                    return fail(
                        &["pd_role", "pd_peer_alloc_port"],
                        format!(
                            "{} needs {} (one port per TP rank)",
                            self.shown("pd_role"),
                            self.shown("pd_peer_alloc_port")
                        ),
                    );
                }
                if !self.pd_peer_alloc_port.is_empty()
                    && self.pd_peer_alloc_port.len() != self.pd_peer_init_port.len()
                {
                    return fail(
                        &["pd_peer_init_port", "pd_peer_alloc_port"],
                        format!(
                            "{} and {} must list the same number of ports (one per TP rank)",
                            self.shown("pd_peer_init_port"),
                            self.shown("pd_peer_alloc_port")
                        ),
                    );
                }
                Ok(())
            }
            Some(PdRole::Sender) => {
                let proxy = self.pd_proxy_host.is_some() && self.pd_proxy_port.is_some();
                let direct = self.pd_peer_host.is_some() && !self.pd_peer_init_port.is_empty();
                if proxy || direct {
                    Ok(())
                } else {
                    fail(
                        &[
                            "pd_role",
                            "pd_proxy_host",
                            "pd_proxy_port",
                            "pd_peer_host",
                            "pd_peer_init_port",
                        ],
                        format!(
                            "{} needs {} and {} (or, legacy NIXL, {} and {})",
                            self.shown("pd_role"),
                            self.shown("pd_proxy_host"),
                            self.shown("pd_proxy_port"),
                            self.shown("pd_peer_host"),
                            self.shown("pd_peer_init_port")
                        ),
                    )
                }
            }
        }
    }

    /// Warnings collected while loading (LMCache keys kvtier ignores, unknown
    /// `extra_config` keys), in the order found.
    pub fn warnings(&self) -> &[ConfigWarning] {
        &self.provenance.warnings
    }

    /// The effective configuration as YAML, one `key: value  # source` line per key in the
    /// key table's order. The source is `default`, `FILE:LINE`, the environment variable's
    /// name, or `set by caller` for a value changed in code. Sizes are printed in GB like
    /// the input; `transport_auth_token` and passwords in URLs (`etcd://user:password@...`)
    /// are printed as `<redacted>`. Apart from the redaction the output loads back to the
    /// same configuration.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, spec) in KEYS.iter().enumerate() {
            let mut value = redact_passwords(&spec.slot.render(self));
            if spec.secret && value != "null" {
                value = "\"<redacted>\"".to_owned();
            }
            let _ = writeln!(out, "{}: {value}  # {}", spec.name, self.source_label(i));
        }
        out
    }

    /// Where key `index` was set: `FILE:LINE`, the environment variable, `default`, or
    /// `set by caller` for a value that differs from the default without a recorded source.
    fn source_label(&self, index: usize) -> String {
        match self.provenance.keys.get(index).map(|o| &o.source) {
            Some(ValueSource::File { origin, line }) => format!("{origin}:{line}"),
            Some(ValueSource::Env(var)) => var.clone(),
            Some(ValueSource::Default) | None => {
                let changed = KEYS.get(index).is_some_and(|spec| {
                    spec.slot.render(self) != spec.slot.render(&Config::default())
                });
                if changed { "set by caller" } else { "default" }.to_owned()
            }
        }
    }

    /// Reads `path` and merges it over the defaults, without validation.
    fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::default();
        cfg.merge_yaml(&text, &path.display().to_string())?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Applies the keys of a YAML document over the current values.
    fn merge_yaml(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        self.provenance.origin = Some(origin.to_owned());
        let Some(root) = yaml::load(text).map_err(|e| load_error(e, origin))? else {
            return Ok(());
        };
        let entries = match root.kind {
            NodeKind::Map(entries) => entries,
            NodeKind::Scalar { .. } if root.is_null() => return Ok(()),
            NodeKind::Scalar { .. } | NodeKind::Seq(_) => {
                return Err(ConfigError::Structure {
                    origin: origin.to_owned(),
                    line: root.line,
                    message: format!(
                        "the top level must be a mapping of configuration keys, found {}",
                        keys::describe(&root)
                    ),
                })
            }
        };
        let mut seen: HashMap<&str, usize> = HashMap::new();
        // Per key: the name it was set under, its line and its rendered value.
        let mut set_by: Vec<Option<(String, usize, String)>> = vec![None; KEYS.len()];
        for (k, v) in &entries {
            let name = match &k.kind {
                NodeKind::Scalar { text, .. } => text.as_str(),
                NodeKind::Seq(_) | NodeKind::Map(_) => {
                    return Err(ConfigError::Structure {
                        origin: origin.to_owned(),
                        line: k.line,
                        message: "configuration keys must be strings".to_owned(),
                    })
                }
            };
            if let Some(first_line) = seen.get(name) {
                return Err(ConfigError::DuplicateKey {
                    origin: origin.to_owned(),
                    key: yaml::truncate(name, 80),
                    first_line: *first_line,
                    second_line: k.line,
                });
            }
            seen.insert(name, k.line);
            let Some((index, alias)) = keys::lookup(name) else {
                if let Some(reason) = keys::ignored_reason(name) {
                    self.warn(ConfigWarning {
                        origin: origin.to_owned(),
                        key: name.to_owned(),
                        line: Some(k.line),
                        message: ignored_message(name, reason),
                    });
                    continue;
                }
                return Err(ConfigError::UnknownKey {
                    origin: origin.to_owned(),
                    line: Some(k.line),
                    key: yaml::truncate(name, 80),
                    suggestion: keys::suggest(name, keys::all_names(), 3, true).map(str::to_owned),
                });
            };
            let Some(spec) = KEYS.get(index) else {
                continue;
            };
            let ctx = Ctx {
                origin,
                line: Some(k.line),
                key: name,
                from_env: false,
            };
            let first = set_by.get(index).cloned().flatten();
            if let Some((first_key, first_line, first_value)) = first {
                let mut probe = self.clone();
                spec.slot
                    .apply(&mut probe, v, &ctx, spec.default, &mut Vec::new())?;
                let value = spec.slot.render(&probe);
                if value != first_value {
                    return Err(ConfigError::Conflict {
                        key: spec.name.to_owned(),
                        first: Box::new(KeySetting {
                            key: first_key,
                            origin: origin.to_owned(),
                            line: Some(first_line),
                            value: first_value,
                        }),
                        second: Box::new(KeySetting {
                            key: name.to_owned(),
                            origin: origin.to_owned(),
                            line: Some(k.line),
                            value,
                        }),
                    });
                }
                continue;
            }
            let mut warnings = Vec::new();
            spec.slot
                .apply(self, v, &ctx, spec.default, &mut warnings)?;
            for w in warnings {
                self.warn(w);
            }
            if let Some(slot) = set_by.get_mut(index) {
                *slot = Some((name.to_owned(), k.line, spec.slot.render(self)));
            }
            self.set_origin(
                index,
                ValueSource::File {
                    origin: origin.to_owned(),
                    line: k.line,
                },
                alias,
            );
        }
        self.apply_implied();
        Ok(())
    }

    /// LMCache's legacy `enable_nixl: true` means "P/D over NIXL": when the channel was not
    /// chosen explicitly, select `nixl` (attributed to the `enable_nixl` line).
    fn apply_implied(&mut self) {
        let (Some(pd), Some(channel)) = (
            keys::index_of("enable_pd"),
            keys::index_of("transfer_channel"),
        ) else {
            return;
        };
        let Some(pd_origin) = self.provenance.keys.get(pd).cloned() else {
            return;
        };
        let channel_is_default = matches!(
            self.provenance.keys.get(channel).map(|o| &o.source),
            Some(ValueSource::Default)
        );
        if self.enable_pd && pd_origin.alias == Some("enable_nixl") && channel_is_default {
            self.transfer_channel = TransferChannel::Nixl;
            self.set_origin(channel, pd_origin.source, pd_origin.alias);
        }

        // LMCache's legacy NIXL configs give the receiver one port (`nixl_peer_port` /
        // `nixl_receiver_port`). kvtier expresses that as `pd_peer_alloc_port` equal to
        // `pd_peer_init_port` (one listener serves both), attributed to the same line, and
        // keeps it in step if the init port is overridden later.
        let (Some(init), Some(alloc)) = (
            keys::index_of("pd_peer_init_port"),
            keys::index_of("pd_peer_alloc_port"),
        ) else {
            return;
        };
        let (Some(init_origin), Some(alloc_origin)) = (
            self.provenance.keys.get(init).cloned(),
            self.provenance.keys.get(alloc).cloned(),
        ) else {
            return;
        };
        let single_port =
            |alias: Option<&str>| matches!(alias, Some("nixl_peer_port" | "nixl_receiver_port"));
        let alloc_derived = single_port(alloc_origin.alias);
        let alloc_unset =
            alloc_origin.source == ValueSource::Default && self.pd_peer_alloc_port.is_empty();
        if !self.pd_peer_init_port.is_empty()
            && (alloc_derived || (alloc_unset && single_port(init_origin.alias)))
        {
            self.pd_peer_alloc_port = self.pd_peer_init_port.clone();
            let alias = if single_port(init_origin.alias) {
                init_origin.alias
            } else {
                alloc_origin.alias
            };
            self.set_origin(alloc, init_origin.source, alias);
        }
    }

    fn set_origin(&mut self, index: usize, source: ValueSource, alias: Option<&'static str>) {
        if let Some(entry) = self.provenance.keys.get_mut(index) {
            *entry = KeyOrigin { source, alias };
        }
    }

    fn warn(&mut self, warning: ConfigWarning) {
        self.provenance.warnings.push(warning);
    }

    /// The name of the file (or text) this configuration came from, for messages.
    fn origin_name(&self) -> String {
        match (&self.source, &self.provenance.origin) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(origin)) => origin.clone(),
            (None, None) => "configuration".to_owned(),
        }
    }

    /// "`key` = value (where it was set)" for validation messages.
    fn shown(&self, key: &str) -> String {
        let Some(index) = keys::index_of(key) else {
            return format!("`{key}`");
        };
        let value = KEYS
            .get(index)
            .map(|spec| {
                if spec.secret {
                    "<redacted>".to_owned()
                } else {
                    spec.slot.render(self)
                }
            })
            .unwrap_or_default();
        let origin = match self.provenance.keys.get(index).and_then(|o| o.alias) {
            Some(alias) => format!("`{alias}` at {}", self.source_label(index)),
            None => self.source_label(index),
        };
        format!("`{key}` = {value} ({origin})")
    }
}

/// The warning text for an LMCache key kvtier ignores.
fn ignored_message(key: &str, reason: &str) -> String {
    format!("`{key}` is an LMCache key kvtier does not use: {reason}; ignored")
}

/// The YAML node for an environment value: a YAML scalar or flow collection, or for string
/// keys the raw text when it is not a scalar.
fn env_node(slot: &keys::Slot, var: &str, value: &str) -> Result<Node, ConfigError> {
    let parsed = yaml::load(value);
    if slot.is_text() {
        return Ok(match parsed {
            Ok(None) => Node::null(1),
            Ok(Some(node)) if node.is_null() => node,
            Ok(Some(Node {
                kind: NodeKind::Scalar { text, .. },
                line,
            })) => Node::string(text, line),
            Ok(Some(_)) | Err(_) => Node::string(value, 1),
        });
    }
    match parsed {
        Ok(Some(node)) => Ok(node),
        Ok(None) => Ok(Node::null(1)),
        Err(e) => Err(load_error(e, var)),
    }
}

fn load_error(e: LoadError, origin: &str) -> ConfigError {
    match e {
        LoadError::Syntax {
            line,
            column,
            message,
        } => ConfigError::Syntax {
            origin: origin.to_owned(),
            line,
            column,
            message,
        },
        LoadError::Structure { line, message } => ConfigError::Structure {
            origin: origin.to_owned(),
            line,
            message,
        },
    }
}

/// The configuration reference as Markdown: every key with its LMCache aliases, type,
/// default and description; the `extra_config` keys; the LMCache keys kvtier accepts and
/// ignores; and how environment overrides work.
pub fn reference_table_markdown() -> String {
    let esc = |s: &str| s.replace('|', "\\|");
    let defaults = Config::default();
    let mut out = String::new();
    out.push_str(
        "Sizes in GB follow LMCache (`max_local_cpu_size: 5` is 5 GB; 1 GB = 2^30 bytes). \
         Keys marked *(kvtier)* are kvtier extensions; the others keep their LMCache \
         meaning.\n\n",
    );
    out.push_str("| Key | LMCache aliases | Type | Default | Description |\n");
    out.push_str("|---|---|---|---|---|\n");
    for spec in KEYS {
        let aliases: Vec<String> = spec.aliases.iter().map(|a| format!("`{a}`")).collect();
        let default = spec.slot.render(&defaults);
        let family = match spec.family {
            keys::Family::Kvtier => "*(kvtier)* ",
            keys::Family::Lmcache => "",
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | `{}` | {family}{} |",
            spec.name,
            aliases.join(", "),
            esc(spec.slot.expected()),
            esc(&default),
            esc(spec.doc)
        );
    }
    out.push_str("\n### `extra_config` keys\n\n| Key | Type | Description |\n|---|---|---|\n");
    for extra in keys::EXTRA_KEYS {
        let ty = match extra.slot {
            keys::ExtraSlot::Text(_) => "a string",
            keys::ExtraSlot::Bytes(_) => "an integer (bytes)",
            keys::ExtraSlot::Seconds(_) => "a number (seconds)",
            keys::ExtraSlot::Count(_) => "an integer >= 1",
        };
        let _ = writeln!(out, "| `{}` | {ty} | {} |", extra.name, esc(extra.doc));
    }
    out.push_str(
        "\n### LMCache keys kvtier accepts and ignores\n\nEach produces a warning naming the \
         key; its value is not used.\n\n| LMCache key | Why it is ignored |\n|---|---|\n",
    );
    for (key, reason) in keys::IGNORED_KEYS {
        let _ = writeln!(out, "| `{key}` | {} |", esc(reason));
    }
    out.push_str(
        "\n### Environment overrides\n\n`KVTIER_<KEY>` and `LMCACHE_<KEY>` (key or alias, any \
         case) override the file given by `KVTIER_CONFIG_FILE` or `LMCACHE_CONFIG_FILE`; \
         `KVTIER_` wins over `LMCACHE_`. Values are YAML (`512`, `true`, `[7300, 7301]`); \
         list keys also take `7300,7301`. A variable that is within two edits of a key but \
         names none is an error.\n",
    );
    out
}

/// `text` with the password of every URL in it (`scheme://user:password@host...`) replaced
/// by `<redacted>`, for rendering and messages.
pub fn redact_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme + 3);
        out.push_str(head);
        // The authority ends at the first character that cannot be in it.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '}'))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                out.push_str(user);
                out.push_str(":<redacted>@");
                out.push_str(host);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

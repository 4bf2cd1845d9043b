//! Typed settings per subsystem, resolved once from a validated [`Config`].
//!
//! The YAML is flat (LMCache's keys); kvtier's subsystems each take only their own part:
//! chunk keys ([`KeySettings`]), the local tiers ([`TierSettings`]), the data-plane
//! transport ([`TransportSettings`]), P/D ([`PdSettings`]) and the remote tier
//! ([`RemoteSettings`]). [`EngineSettings`] gathers them for the engine; an embedder that
//! does not start from YAML builds them with `Engine::builder` instead. Defaults, aliases
//! and the translation of Mooncake's `extra_config` keys live here, next to the key table,
//! and nowhere else.

use std::path::PathBuf;
use std::time::Duration;

use kvtier_transport::limits::CONTROL_IDLE_TIMEOUT;
use kvtier_transport::TransportConfig;

use super::{BufferDevice, Config, PdRole, TransferChannel};

/// Default `extra_config.local_buffer_size`: staging memory a remote-store client registers.
pub const DEFAULT_STAGING_BYTES: u64 = 512 << 20;
/// Default segment of `kvtier://local` (`extra_config.global_segment_size` when unset).
pub const DEFAULT_EMBEDDED_SEGMENT: u64 = 1 << 30;
/// Most copies of an object the remote store keeps (`extra_config.replica_num` is capped).
pub const MAX_REPLICAS: u8 = 16;

/// How token sequences become chunk keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySettings {
    /// Tokens per chunk (`chunk_size`).
    pub chunk_size: usize,
    /// Seed of every chunk hash (`hash_seed`).
    pub hash_seed: u64,
    /// Whether a trailing partial chunk is stored too (`save_unfull_chunk`).
    pub save_unfull_chunk: bool,
}

/// The local disk tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSettings {
    /// Directory of the chunk files (`local_disk`).
    pub dir: PathBuf,
    /// Capacity in bytes (`max_local_disk_size`).
    pub capacity_bytes: u64,
    /// Bound, in chunks, of the background write queue (`local_disk_write_queue`).
    pub write_queue: usize,
}

/// The local tiers, top to bottom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierSettings {
    /// GPU tier capacity in bytes; 0 = no GPU tier (`max_local_gpu_size`).
    pub gpu_bytes: u64,
    /// CPU tier capacity in bytes; `None` = no CPU tier (`local_cpu`, `max_local_cpu_size`).
    pub cpu_bytes: Option<u64>,
    /// The disk tier, if any.
    pub disk: Option<DiskSettings>,
}

/// The data-plane transport of P/D or of the remote store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportSettings {
    /// Which transport (`transfer_channel`, or `extra_config.protocol` for the store).
    pub channel: TransferChannel,
    /// Bound on every wait (`transport_timeout_sec`).
    pub timeout: Duration,
    /// Shared secret every peer proves (`transport_auth_token`).
    pub auth_token: Option<String>,
}

impl TransportSettings {
    /// The transport crate's settings for an endpoint listening on (and advertising) `host`.
    pub fn on_host(&self, host: &str) -> TransportConfig {
        TransportConfig {
            timeout: self.timeout,
            auth_token: self.auth_token.clone(),
            host: host.to_string(),
        }
    }
}

/// A P/D sender (prefiller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PdSenderSettings {
    /// Keys of the chunks sent (they must match the receiver's; the trailing partial chunk
    /// is always sent, whatever `save_unfull_chunk` says).
    pub keys: KeySettings,
    /// Bytes of the staging buffer chunks are gathered into (`pd_buffer_size`).
    pub staging_bytes: u64,
    /// `host:port` of the proxy's notification port (`pd_proxy_host`, `pd_proxy_port`).
    pub proxy: Option<String>,
    /// The transport.
    pub transport: TransportSettings,
}

/// A P/D receiver (decoder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PdReceiverSettings {
    /// Keys of the chunks received (partial chunks included, as for the sender).
    pub keys: KeySettings,
    /// Bytes of the receive buffer (`pd_buffer_size`).
    pub buffer_bytes: u64,
    /// Where the buffer lives (`pd_buffer_device`).
    pub buffer_device: BufferDevice,
    /// Address the control ports and the transport listen on (`pd_peer_host`).
    pub host: String,
    /// Handshake port per TP rank (`pd_peer_init_port`; 0 = any free port).
    pub init_ports: Vec<u16>,
    /// Allocation port per TP rank (`pd_peer_alloc_port`; equal to the init port = one
    /// listener for both).
    pub alloc_ports: Vec<u16>,
    /// How long a sender may wait for buffer space (`pd_allocation_timeout_sec`).
    pub allocation_timeout: Duration,
    /// How long received KV waits for its request; `None` = forever (`pd_ttl_sec`,
    /// `pd_enable_gc`).
    pub ttl: Option<Duration>,
    /// A control connection silent this long is closed (not a YAML key; default
    /// [`CONTROL_IDLE_TIMEOUT`], 120 s). Senders reconnect when a pooled one turns out
    /// closed.
    pub control_idle: Duration,
    /// The transport.
    pub transport: TransportSettings,
}

/// This instance's part in prefill/decode disaggregation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PdSettings {
    /// Pushes KV to decoders.
    Sender(PdSenderSettings),
    /// Receives KV from prefillers.
    Receiver(PdReceiverSettings),
}

/// The remote tier (`remote_url` and Mooncake's `extra_config` keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSettings {
    /// The store's URL as written (`remote_url`).
    pub url: String,
    /// Master of a `mooncakestore://` URL when given apart
    /// (`extra_config.master_server_address`).
    pub master_address: Option<String>,
    /// etcd of the store, `etcd://[user:password@]host:port[/cluster]` (`etcds://…` over
    /// TLS, see [`crate::remote::etcd::Etcd::new`])
    /// (`extra_config.metadata_server`).
    pub metadata_server: Option<String>,
    /// Address this engine's store endpoints listen on and advertise
    /// (`extra_config.local_hostname`, default 127.0.0.1).
    pub host: String,
    /// Name of the segment this engine contributes (`extra_config.local_hostname`, default
    /// `engine-<pid>`).
    pub node_name: Option<String>,
    /// Bytes this engine contributes to the pool (`extra_config.global_segment_size`; with
    /// `kvtier://local`, the embedded segment, default 1 GiB).
    pub segment_bytes: Option<u64>,
    /// Staging memory the client registers (`extra_config.local_buffer_size`, default
    /// 512 MiB).
    pub staging_bytes: u64,
    /// Copies of each object, 1..=16 (`extra_config.replica_num`, default 1).
    pub replicas: u8,
    /// The store's data plane (`extra_config.protocol`, Mooncake's `rdma` = UCX; timeout
    /// `extra_config.transfer_timeout`, else `transport_timeout_sec`).
    pub transport: TransportSettings,
}

/// Everything the engine takes, per subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    /// Chunk keys.
    pub keys: KeySettings,
    /// Local tiers.
    pub tiers: TierSettings,
    /// P/D role, if any.
    pub pd: Option<PdSettings>,
    /// Remote tier, if any.
    pub remote: Option<RemoteSettings>,
}

/// The transport `extra_config.protocol` names (`None`: unknown). Mooncake's `rdma` maps
/// to UCX; unset is TCP.
pub fn store_channel(protocol: Option<&str>) -> Option<TransferChannel> {
    match protocol.unwrap_or("tcp") {
        "tcp" => Some(TransferChannel::Tcp),
        "ucx" | "rdma" => Some(TransferChannel::Ucx),
        "nixl" => Some(TransferChannel::Nixl),
        _ => None,
    }
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

impl Config {
    /// Chunk-key settings.
    pub fn key_settings(&self) -> KeySettings {
        KeySettings {
            chunk_size: self.chunk_size,
            hash_seed: self.hash_seed,
            save_unfull_chunk: self.save_unfull_chunk,
        }
    }

    /// Local-tier settings.
    pub fn tier_settings(&self) -> TierSettings {
        TierSettings {
            gpu_bytes: self.max_local_gpu_size,
            cpu_bytes: self.local_cpu.then_some(self.max_local_cpu_size),
            disk: self.local_disk.as_ref().map(|dir| DiskSettings {
                dir: dir.clone(),
                capacity_bytes: self.max_local_disk_size,
                write_queue: self.local_disk_write_queue,
            }),
        }
    }

    /// The P/D transport (`transfer_channel`, `transport_timeout_sec`,
    /// `transport_auth_token`).
    pub fn transport_settings(&self) -> TransportSettings {
        TransportSettings {
            channel: self.transfer_channel,
            timeout: seconds(self.transport_timeout_sec),
            auth_token: self.transport_auth_token.clone(),
        }
    }

    /// The settings of a P/D sender, whatever `pd_role` says.
    pub fn pd_sender_settings(&self) -> PdSenderSettings {
        PdSenderSettings {
            keys: self.key_settings(),
            staging_bytes: self.pd_buffer_size,
            proxy: match (&self.pd_proxy_host, self.pd_proxy_port) {
                (Some(host), Some(port)) => Some(format!("{host}:{port}")),
                _ => None,
            },
            transport: self.transport_settings(),
        }
    }

    /// The settings of a P/D receiver, whatever `pd_role` says.
    pub fn pd_receiver_settings(&self) -> PdReceiverSettings {
        PdReceiverSettings {
            keys: self.key_settings(),
            buffer_bytes: self.pd_buffer_size,
            buffer_device: self.pd_buffer_device,
            host: self
                .pd_peer_host
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into()),
            init_ports: self.pd_peer_init_port.clone(),
            alloc_ports: self.pd_peer_alloc_port.clone(),
            allocation_timeout: seconds(self.pd_allocation_timeout_sec),
            ttl: self.pd_enable_gc.then(|| seconds(self.pd_ttl_sec)),
            control_idle: CONTROL_IDLE_TIMEOUT,
            transport: self.transport_settings(),
        }
    }

    /// This instance's P/D settings (`None` unless `enable_pd`; a validated configuration
    /// with `enable_pd` has a `pd_role`).
    pub fn pd_settings(&self) -> Option<PdSettings> {
        match (self.enable_pd, self.pd_role) {
            (true, Some(PdRole::Sender)) => Some(PdSettings::Sender(self.pd_sender_settings())),
            (true, Some(PdRole::Receiver)) => {
                Some(PdSettings::Receiver(self.pd_receiver_settings()))
            }
            _ => None,
        }
    }

    /// The remote tier's settings (`None` without `remote_url`), Mooncake's `extra_config`
    /// keys translated. An unknown `extra_config.protocol` (rejected by
    /// [`Config::validate`]) reads as TCP.
    pub fn remote_settings(&self) -> Option<RemoteSettings> {
        let url = self.remote_url.clone()?;
        let extra = &self.extra_config;
        Some(RemoteSettings {
            url,
            master_address: extra.master_server_address.clone(),
            metadata_server: extra.metadata_server.clone(),
            host: extra
                .local_hostname
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into()),
            node_name: extra.local_hostname.clone(),
            segment_bytes: extra.global_segment_size,
            staging_bytes: extra.local_buffer_size.unwrap_or(DEFAULT_STAGING_BYTES),
            replicas: extra.replica_num.unwrap_or(1).clamp(1, MAX_REPLICAS as u64) as u8,
            transport: TransportSettings {
                channel: store_channel(extra.protocol.as_deref()).unwrap_or(TransferChannel::Tcp),
                timeout: Duration::from_secs_f64(
                    extra
                        .transfer_timeout
                        .unwrap_or(self.transport_timeout_sec)
                        .max(0.05),
                ),
                auth_token: self.transport_auth_token.clone(),
            },
        })
    }

    /// Every subsystem's settings.
    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            keys: self.key_settings(),
            tiers: self.tier_settings(),
            pd: self.pd_settings(),
            remote: self.remote_settings(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mooncake_keys_translate_into_remote_settings() {
        let config = Config::from_yaml_str(
            "chunk_size: 256\nremote_url: mooncakestore://m:50051/\ntransport_timeout_sec: 7\n\
             extra_config:\n  protocol: rdma\n  local_hostname: node-a\n  \
             replica_num: 99\n  global_segment_size: 1073741824\n",
            "test.yaml",
        )
        .unwrap();
        let r = config.remote_settings().unwrap();
        assert_eq!(r.transport.channel, TransferChannel::Ucx);
        assert_eq!(r.transport.timeout, Duration::from_secs(7));
        assert_eq!(r.host, "node-a");
        assert_eq!(r.node_name.as_deref(), Some("node-a"));
        assert_eq!(r.replicas, MAX_REPLICAS);
        assert_eq!(r.segment_bytes, Some(1 << 30));
        assert_eq!(r.staging_bytes, DEFAULT_STAGING_BYTES);
        assert_eq!(Config::default().remote_settings(), None);
    }

    #[test]
    fn an_unknown_store_protocol_is_refused_by_validation() {
        assert_eq!(store_channel(None), Some(TransferChannel::Tcp));
        assert_eq!(store_channel(Some("rdma")), Some(TransferChannel::Ucx));
        assert_eq!(store_channel(Some("ib")), None);
        let err = Config::from_yaml_str(
            "remote_url: kvtier://local\nextra_config:\n  protocol: ib\n",
            "test.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("extra_config.protocol: ib"), "{err}");
    }

    #[test]
    fn pd_settings_follow_the_role() {
        let config = Config::from_yaml_str(
            "enable_pd: true\npd_role: receiver\npd_peer_init_port: [7300]\n\
             pd_peer_alloc_port: [7400]\npd_enable_gc: false\n",
            "test.yaml",
        )
        .unwrap();
        let Some(PdSettings::Receiver(r)) = config.pd_settings() else {
            panic!("receiver expected");
        };
        assert_eq!((r.init_ports, r.alloc_ports), (vec![7300], vec![7400]));
        assert_eq!(r.ttl, None);
        assert_eq!(r.host, "127.0.0.1");
        assert_eq!(Config::default().pd_settings(), None);
    }
}

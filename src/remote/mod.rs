//! The remote tier (`remote_url`): a pool of memory across nodes that every engine can
//! read, and what runs it.
//!
//! - The **kvtier store** (`kvtier://host:port`, `mooncakestore://host:port`): a
//!   Mooncake-style master keeps object placement and is elected through etcd; nodes
//!   contribute memory segments and register in etcd under leases (the server side, in
//!   [`store`]); engines
//!   ([`client`]) ask the master where objects go or are, then move the bytes directly
//!   to or from the nodes through a data-plane transport (tcp, ucx, nixl).
//!   `kvtier://local` runs a master and a segment inside the engine (no etcd).
//! - **Redis/Valkey** (`redis://host:port[/db]`, [`redis`]).
//!
//! [`RemoteTier`] is what the engine holds: one of the two behind the same batched
//! put/get/exists/remove.

use std::time::Duration;

pub mod alloc;
pub mod client;
pub mod etcd;
pub(crate) mod offload;
pub mod redis;
pub mod rpc;
pub mod store;

use crate::config::{RemoteSettings, DEFAULT_EMBEDDED_SEGMENT};
use crate::memory::{BufferPool, KvBuffer};
use client::{ClientConfig, PutOutcome, StoreClient};
use rpc::ObjectKey;
use store::master::{MasterConfig, MasterServer};
use store::node::{NodeConfig, StoreNode};

/// Why a remote-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Bad settings.
    #[error("remote store configuration: {0}")]
    Config(String),
    /// etcd could not be reached or answered badly.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A control connection failed.
    #[error("remote store peer {peer}: {reason}")]
    Rpc {
        /// The master or node.
        peer: String,
        /// What went wrong.
        reason: String,
    },
    /// Something took too long.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// The bound.
        after: Duration,
    },
    /// A control connection to a master or node failed: could not be made, failed its
    /// handshake (refused, unproven secret, another kind of listener, not kvtier), timed
    /// out, closed, or carried a malformed frame. The error names the peer.
    #[error(transparent)]
    Control(#[from] kvtier_transport::framed::FramedError),
    /// No master could be reached.
    #[error("no remote-store master reachable: {0}")]
    NoMaster(String),
    /// The data-plane transport failed (opening it, registering memory, a transfer).
    #[error("remote store transfer: {0}")]
    Transport(#[from] kvtier_transport::TransportError),
    /// A node's data plane could not be reached.
    #[error("remote store transfer to node {node}: {source}")]
    NodeUnreachable {
        /// The node.
        node: String,
        /// The transport's error.
        source: kvtier_transport::TransportError,
    },
    /// etcd's HTTP gateway could not be reached or its answer could not be read.
    #[error("etcd {url}: {}", crate::error::error_chain(source))]
    EtcdHttp {
        /// The URL called.
        url: String,
        /// The HTTP client's error.
        source: reqwest::Error,
    },
    /// A control server (master, node) could not listen.
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Listen {
        /// The master or node control server.
        what: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Redis/Valkey failed.
    #[error("redis {url}: {source}")]
    Redis {
        /// The server's URL.
        url: String,
        /// The client's error.
        source: ::redis::RedisError,
    },
    /// A store answered with something that does not fit the question (e.g. another
    /// number of answers than keys asked).
    #[error("remote store {store}: {what}")]
    BadAnswer {
        /// The store's URL.
        store: String,
        /// What did not fit.
        what: String,
    },
}

/// Default etcd lease TTL of masters and nodes.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// What `remote_url` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteUrl {
    /// A kvtier (or Mooncake-configured) store whose master is at this address.
    Store {
        /// `host:port` of the master.
        master: String,
    },
    /// A master and segment inside this process.
    Embedded,
    /// A Redis/Valkey server (the URL as the `redis` crate takes it).
    Redis(String),
}

impl RemoteUrl {
    /// Parses `remote_url` (`master_server_address`, when set, names the master of a
    /// `mooncakestore://` URL).
    pub fn parse(url: &str, master_override: Option<&str>) -> Result<Self, RemoteError> {
        let bad = |why: &str| {
            RemoteError::Config(format!(
                "remote_url `{url}`: {why} (expected kvtier://host:port, kvtier://local, \
                 mooncakestore://host:port or redis://host:port)"
            ))
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let hostport = rest.trim_end_matches('/');
        match scheme {
            "kvtier" if hostport == "local" || hostport == "embedded" => Ok(RemoteUrl::Embedded),
            "kvtier" | "mooncakestore" => {
                let master = match (scheme, master_override) {
                    ("mooncakestore", Some(m)) => m.to_string(),
                    _ => hostport.to_string(),
                };
                if !master.contains(':') {
                    return Err(bad("the master address needs host:port"));
                }
                Ok(RemoteUrl::Store { master })
            }
            "redis" | "rediss" => Ok(RemoteUrl::Redis(url.to_string())),
            "valkey" => Ok(RemoteUrl::Redis(format!("redis://{rest}"))),
            other => Err(bad(&format!("unknown scheme `{other}`"))),
        }
    }
}

enum Backend {
    Store(StoreClient),
    Redis(Box<redis::RedisStore>),
}

/// The engine's remote tier.
pub struct RemoteTier {
    backend: Backend,
    url: String,
    timeout: Duration,
    /// `kvtier://local`: the in-process master and segment.
    _embedded: Option<(MasterServer, StoreNode)>,
    /// The segment this engine contributes (`global_segment_size` with etcd).
    _contributed: Option<StoreNode>,
}

impl RemoteTier {
    /// Opens the tier `settings` name. Contacts no server: the first operation does, and
    /// operations reconnect after outages.
    pub async fn open(settings: &RemoteSettings) -> Result<RemoteTier, RemoteError> {
        let url = &settings.url;
        let timeout = settings.transport.timeout;
        let transport = settings.transport.on_host(&settings.host);
        let protocol = settings.transport.channel;
        let etcd = || match settings.metadata_server.as_deref() {
            None => Ok(None),
            Some(m) if m.starts_with("etcd://") || m.starts_with("etcds://") => {
                etcd::Etcd::new(m, timeout).map(Some)
            }
            Some(m) => Err(RemoteError::Config(format!(
                "`extra_config.metadata_server: {m}`: kvtier keeps membership in etcd \
                 (etcd://host:port[/cluster], etcds://… over TLS); Mooncake's HTTP metadata \
                 server is not supported"
            ))),
        };
        let client_config = |master: Option<String>, etcd: Option<etcd::Etcd>| ClientConfig {
            master,
            etcd,
            protocol,
            transport: transport.clone(),
            staging_bytes: settings.staging_bytes,
            replicas: settings.replicas,
        };
        let tier = match RemoteUrl::parse(url, settings.master_address.as_deref())? {
            RemoteUrl::Redis(u) => RemoteTier {
                backend: Backend::Redis(Box::new(redis::RedisStore::new(&u, timeout)?)),
                url: url.clone(),
                timeout,
                _embedded: None,
                _contributed: None,
            },
            RemoteUrl::Embedded => {
                let node = StoreNode::start(NodeConfig {
                    name: "embedded".into(),
                    segment_size: settings.segment_bytes.unwrap_or(DEFAULT_EMBEDDED_SEGMENT),
                    protocol,
                    transport: settings.transport.on_host("127.0.0.1"),
                    control_port: 0,
                    etcd: None,
                    lease_ttl: DEFAULT_LEASE_TTL,
                })
                .await?;
                let master = MasterServer::start(MasterConfig {
                    listen: "127.0.0.1:0".into(),
                    advertise: None,
                    etcd: None,
                    lease_ttl: DEFAULT_LEASE_TTL,
                    placement: Default::default(),
                    auth_token: settings.transport.auth_token.clone(),
                    timeout,
                    segments: vec![node.info().clone()],
                })
                .await?;
                let client =
                    StoreClient::new(client_config(Some(master.addr().to_string()), None))?;
                RemoteTier {
                    backend: Backend::Store(client),
                    url: url.clone(),
                    timeout,
                    _embedded: Some((master, node)),
                    _contributed: None,
                }
            }
            RemoteUrl::Store { master } => {
                let etcd = etcd()?;
                let contributed = match (settings.segment_bytes, &etcd) {
                    (Some(size), Some(etcd)) if size > 0 => Some(
                        StoreNode::start(NodeConfig {
                            name: settings
                                .node_name
                                .clone()
                                .unwrap_or_else(|| format!("engine-{}", std::process::id())),
                            segment_size: size,
                            protocol,
                            transport: transport.clone(),
                            control_port: 0,
                            etcd: Some(etcd.clone()),
                            lease_ttl: DEFAULT_LEASE_TTL,
                        })
                        .await?,
                    ),
                    _ => None,
                };
                RemoteTier {
                    backend: Backend::Store(StoreClient::new(client_config(Some(master), etcd))?),
                    url: url.clone(),
                    timeout,
                    _embedded: None,
                    _contributed: contributed,
                }
            }
        };
        Ok(tier)
    }

    /// The URL, for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, RemoteError>>,
    ) -> Result<T, RemoteError> {
        let bound = self.timeout * 4;
        tokio::time::timeout(bound, fut)
            .await
            .map_err(|_| RemoteError::Timeout {
                what: format!("{what} on {}", self.url),
                after: bound,
            })?
    }

    /// `answers`, if there is one per key asked; a store answering otherwise is broken
    /// or not to be trusted, and its answers are not used.
    fn one_per_key<T>(
        &self,
        op: &str,
        keys: usize,
        answers: Vec<T>,
    ) -> Result<Vec<T>, RemoteError> {
        if answers.len() == keys {
            return Ok(answers);
        }
        Err(RemoteError::BadAnswer {
            store: self.url.clone(),
            what: format!(
                "{op} of {keys} keys answered with {} answers",
                answers.len()
            ),
        })
    }

    /// Stores objects (each as parts to concatenate); returns how many were written.
    pub async fn put(&self, objects: &[(ObjectKey, Vec<&[u8]>)]) -> Result<usize, RemoteError> {
        self.bounded("put", async {
            match &self.backend {
                Backend::Store(c) => Ok(c
                    .put(objects)
                    .await?
                    .iter()
                    .filter(|o| **o == PutOutcome::Stored)
                    .count()),
                Backend::Redis(r) => r.put(objects).await.map(|_| objects.len()),
            }
        })
        .await
    }

    /// Reads objects, each split after `header` bytes; `None` for misses.
    pub async fn get(
        &self,
        keys: &[ObjectKey],
        header: usize,
        pool: &BufferPool,
    ) -> Result<Vec<Option<(Vec<u8>, KvBuffer)>>, RemoteError> {
        let answers = self
            .bounded("get", async {
                match &self.backend {
                    Backend::Store(c) => c.get(keys, header, pool).await,
                    Backend::Redis(r) => r.get(keys, header, pool).await,
                }
            })
            .await?;
        self.one_per_key("get", keys.len(), answers)
    }

    /// Which objects are stored.
    pub async fn exists(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, RemoteError> {
        let answers = self
            .bounded("exists", async {
                match &self.backend {
                    Backend::Store(c) => c.exists(keys).await,
                    Backend::Redis(r) => r.exists(keys).await,
                }
            })
            .await?;
        self.one_per_key("exists", keys.len(), answers)
    }

    /// Removes objects; returns which were held.
    pub async fn remove(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, RemoteError> {
        let answers = self
            .bounded("remove", async {
                match &self.backend {
                    Backend::Store(c) => c.remove(keys).await,
                    Backend::Redis(r) => r.remove(keys).await,
                }
            })
            .await?;
        self.one_per_key("remove", keys.len(), answers)
    }

    /// Whether reads are checked end to end by the backend (the kvtier store checksums
    /// every object; Redis does not), so callers need not hash them again.
    pub fn checks_reads(&self) -> bool {
        matches!(self.backend, Backend::Store(_))
    }

    /// The kvtier store client (not for Redis).
    pub fn store_client(&self) -> Option<&StoreClient> {
        match &self.backend {
            Backend::Store(c) => Some(c),
            Backend::Redis(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            RemoteUrl::parse("kvtier://h:1", None).unwrap(),
            RemoteUrl::Store {
                master: "h:1".into()
            }
        );
        assert_eq!(
            RemoteUrl::parse("mooncakestore://storage-server:49999/", Some("m:2")).unwrap(),
            RemoteUrl::Store {
                master: "m:2".into()
            }
        );
        assert_eq!(
            RemoteUrl::parse("mooncakestore://storage-server:49999/", None).unwrap(),
            RemoteUrl::Store {
                master: "storage-server:49999".into()
            }
        );
        assert_eq!(
            RemoteUrl::parse("kvtier://local", None).unwrap(),
            RemoteUrl::Embedded
        );
        assert!(matches!(
            RemoteUrl::parse("redis://r:6379/0", None).unwrap(),
            RemoteUrl::Redis(_)
        ));
        assert!(RemoteUrl::parse("ftp://x", None).is_err());
        assert!(RemoteUrl::parse("kvtier://nohost", None).is_err());
    }
}

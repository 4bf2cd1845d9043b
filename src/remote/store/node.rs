//! A store node: one memory segment registered with a data-plane transport, an index of
//! the objects committed in it (what a new master rebuilds placement from), a control
//! server for the master, and membership in etcd under a lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kvtier_transport::handshake::Service;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::TransferChannel;
use crate::remote::etcd::Etcd;
use crate::remote::rpc::{IndexEntry, Request, Response, SegmentInfo};
use crate::remote::RemoteError;
use crate::transport::{
    self, HostBuffer, RegistrationHandle, RemoteAccess, Transport, TransportConfig,
};

/// How to run a store node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Name registered in etcd (`local_hostname`).
    pub name: String,
    /// Bytes contributed (`global_segment_size`).
    pub segment_size: u64,
    /// Data-plane transport clients use to reach the segment.
    pub protocol: TransferChannel,
    /// Transport settings; `host` is also where the control server listens.
    pub transport: TransportConfig,
    /// Control server port (0: any).
    pub control_port: u16,
    /// Membership registry; `None` for a node owned by an in-process master.
    pub etcd: Option<Etcd>,
    /// Membership lease TTL.
    pub lease_ttl: Duration,
}

struct NodeShared {
    /// The segment's memory (kept alive with the node; transports access it).
    _buffer: Arc<HostBuffer>,
    /// Committed objects by offset.
    index: Mutex<BTreeMap<u64, IndexEntry>>,
    info: SegmentInfo,
}

/// A running store node. Dropping it stops serving and leaves the cluster (its etcd
/// lease expires).
pub struct StoreNode {
    shared: Arc<NodeShared>,
    /// The registry and the lease the node is registered under.
    membership: Option<(Etcd, Arc<Mutex<Option<crate::remote::etcd::LeaseId>>>)>,
    tasks: Vec<JoinHandle<()>>,
    // Declared last: deregistered, then the transport closes.
    _registration: RegistrationHandle,
    _transport: Box<dyn Transport>,
}

impl Drop for StoreNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StoreNode {
    /// Allocates and registers the segment, starts the control server and (with etcd)
    /// joins the cluster.
    pub async fn start(config: NodeConfig) -> Result<StoreNode, RemoteError> {
        let size = usize::try_from(config.segment_size)
            .map_err(|_| RemoteError::Config("global_segment_size too large".into()))?;
        if size == 0 {
            return Err(RemoteError::Config(
                "a store node needs `global_segment_size` > 0".into(),
            ));
        }
        let transport = transport::open(config.protocol, config.transport.clone())?;
        let buffer = Arc::new(HostBuffer::new(size));
        // Clients put objects into the node's memory and get them from it.
        let registration = transport.register(buffer.clone(), RemoteAccess::ReadWrite)?;
        let descriptor = transport.local_descriptor()?;
        let listener = TcpListener::bind((config.transport.host.as_str(), config.control_port))
            .await
            .map_err(|source| RemoteError::Listen {
                what: "store node control server",
                addr: format!("{}:{}", config.transport.host, config.control_port),
                source,
            })?;
        let control = listener
            .local_addr()
            .map_err(|source| RemoteError::Listen {
                what: "store node control server",
                addr: format!("{}:{}", config.transport.host, config.control_port),
                source,
            })?;
        kvtier_transport::handshake::warn_if_exposed(
            Service::StoreNode,
            &control,
            config.transport.auth_token.as_deref(),
        );
        let control = control.to_string();
        let nonce = kvtier_transport::auth::nonce();
        let id = <[u8; 8]>::try_from(&nonce[..8]).expect("8 bytes");
        let info = SegmentInfo {
            id: u64::from_le_bytes(id) | 1,
            name: config.name.clone(),
            control,
            protocol: transport.kind().to_string(),
            descriptor,
            region: registration.id().0,
            size: config.segment_size,
        };
        let shared = Arc::new(NodeShared {
            _buffer: buffer,
            index: Mutex::new(BTreeMap::new()),
            info,
        });
        let handler = shared.clone();
        let mut tasks = vec![tokio::spawn(crate::remote::rpc::serve(
            listener,
            Service::StoreNode,
            "store node control",
            config.transport.auth_token.clone(),
            config.transport.timeout,
            Arc::new(move |req| handler.handle(req)),
        ))];
        let membership = config.etcd.clone().map(|etcd| {
            let lease = Arc::new(Mutex::new(None));
            tasks.push(tokio::spawn(register(
                etcd.clone(),
                shared.info.clone(),
                config.lease_ttl,
                lease.clone(),
            )));
            (etcd, lease)
        });
        tracing::info!(
            "store node {}: {:.2} GB segment over {}, control {}",
            config.name,
            config.segment_size as f64 / 1e9,
            shared.info.protocol,
            shared.info.control
        );
        Ok(StoreNode {
            shared,
            membership,
            tasks,
            _registration: registration,
            _transport: transport,
        })
    }

    /// The segment as the cluster sees it.
    pub fn info(&self) -> &SegmentInfo {
        &self.shared.info
    }

    /// Objects committed in the segment.
    pub fn objects(&self) -> usize {
        self.shared.index.lock().len()
    }

    /// Leaves the cluster at once (revokes the membership lease, so the master drops the
    /// segment now rather than after the lease TTL), then stops.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some((etcd, lease)) = &self.membership {
            let lease = *lease.lock();
            if let Some(lease) = lease {
                if let Err(e) = etcd.revoke(lease).await {
                    tracing::warn!(
                        "store node {}: could not leave etcd: {e}",
                        self.shared.info.name
                    );
                }
            }
        }
    }
}

impl NodeShared {
    fn commit(&self, entries: &[IndexEntry]) {
        let mut index = self.index.lock();
        for e in entries {
            let end = e.offset.saturating_add(e.meta.len);
            // An older object overlapping this range has been overwritten: forget it.
            let stale: Vec<u64> = index
                .range(..end)
                .rev()
                .take_while(|(_, old)| old.offset.saturating_add(old.meta.len) > e.offset)
                .map(|(&o, _)| o)
                .collect();
            for o in stale {
                index.remove(&o);
            }
            index.insert(e.offset, *e);
        }
    }

    fn drop_entries(&self, entries: &[(u128, u64)]) {
        let mut index = self.index.lock();
        for (key, offset) in entries {
            if index.get(offset).is_some_and(|e| e.key == *key) {
                index.remove(offset);
            }
        }
    }

    /// The committed objects. Not re-hashed here (that would scale with the segment and
    /// stall a failover): readers check every object's checksum, and an object that fails
    /// it is removed.
    fn index_entries(&self) -> Vec<IndexEntry> {
        self.index.lock().values().copied().collect()
    }

    fn handle(&self, req: Request) -> Response {
        match req {
            Request::NodeInfo => Response::NodeInfo(self.info.clone()),
            Request::NodeIndex => Response::NodeIndex(self.index_entries()),
            Request::NodeCommit(entries) => {
                self.commit(&entries);
                Response::Done
            }
            Request::NodeDrop(entries) => {
                self.drop_entries(&entries);
                Response::Done
            }
            other => Response::Error(format!(
                "store node {}: {other:?} is a request for the master",
                self.info.name
            )),
        }
    }
}

/// Keeps `segments/<name>/<instance>` in etcd under a lease for as long as the node runs; re-joins
/// after etcd outages.
async fn register(
    etcd: Etcd,
    info: SegmentInfo,
    ttl: Duration,
    current: Arc<Mutex<Option<crate::remote::etcd::LeaseId>>>,
) {
    // Name and instance: two nodes given the same name do not overwrite each other.
    let key = etcd.key(&format!("segments/{}/{:016x}", info.name, info.id));
    let value = info.encode();
    let ttl_s = ttl.as_secs().max(1);
    let mut joined = false;
    loop {
        let lease = async {
            let lease = etcd.grant(ttl_s).await?;
            etcd.put(&key, &value, Some(lease)).await?;
            Ok::<_, RemoteError>(lease)
        }
        .await;
        let lease = match lease {
            Ok(l) => l,
            Err(e) => {
                if joined {
                    tracing::warn!("store node {}: cannot register in etcd: {e}", info.name);
                    joined = false;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        *current.lock() = Some(lease);
        tracing::info!(
            "store node {}: registered at {key} ({})",
            info.name,
            etcd.endpoint()
        );
        joined = true;
        loop {
            tokio::time::sleep(ttl / 3).await;
            match etcd.keep_alive(lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "store node {}: etcd lease expired; re-registering",
                        info.name
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!("store node {}: etcd keep-alive failed: {e}", info.name);
                    break;
                }
            }
        }
    }
}

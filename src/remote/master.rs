//! The master: leader election and segment membership through etcd, object placement in
//! memory ([`Placement`]), and the control server engines talk to. It is never on the data
//! path: clients read and write node segments directly through the transports.
//!
//! A newly elected leader rebuilds placement from the nodes' own indexes, so failover
//! loses no objects. A node whose etcd lease expires is dropped and its objects become
//! misses. Without etcd the master runs alone with the segments it was given (embedded).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::etcd::Etcd;
use super::placement::{NodeUpdate, Placement, PlacementConfig};
use super::rpc::{IndexEntry, Request, Response, RpcConn, SegmentInfo, StoreStats};
use super::RemoteError;

/// How to run a master.
#[derive(Clone, Debug)]
pub struct MasterConfig {
    /// Address to listen on (`host:port`; port 0: any).
    pub listen: String,
    /// Address clients should use, published in etcd (default: the bound address).
    pub advertise: Option<String>,
    /// Leader election and membership; `None` runs alone (embedded).
    pub etcd: Option<Etcd>,
    /// Leader lease TTL: a dead leader is replaced within about this long.
    pub lease_ttl: Duration,
    /// Placement policy.
    pub placement: PlacementConfig,
    /// Shared secret clients and nodes must prove (`transport_auth_token`).
    pub auth_token: Option<String>,
    /// Bound on each call to a node.
    pub timeout: Duration,
    /// Segments owned without etcd (embedded mode).
    pub segments: Vec<SegmentInfo>,
}

enum Role {
    Leader(Box<Placement>),
    Follower { leader: String },
}

/// The queue of index updates for one node and the task draining it.
type NodeLink = (mpsc::UnboundedSender<NodeUpdate>, JoinHandle<()>);

struct Shared {
    config: MasterConfig,
    role: Mutex<Role>,
    /// Per-segment queues of index updates, drained by one task per node.
    links: Mutex<HashMap<u64, NodeLink>>,
    /// The etcd lease this master campaigns and leads with.
    lease: Mutex<Option<super::etcd::LeaseId>>,
}

/// A running master. Dropping it stops it (and, with etcd, gives up leadership when its
/// lease expires).
pub struct MasterServer {
    addr: String,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for MasterServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, (_, task)) in self.shared.links.lock().drain() {
            task.abort();
        }
    }
}

impl MasterServer {
    /// Binds the control server and starts leading (or campaigning, with etcd).
    pub async fn start(config: MasterConfig) -> Result<MasterServer, RemoteError> {
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| RemoteError::Config(format!("master listen {}: {e}", config.listen)))?;
        let mut bound = listener
            .local_addr()
            .map_err(|e| RemoteError::Config(e.to_string()))?;
        if bound.ip().is_unspecified() && config.advertise.is_none() {
            tracing::warn!(
                "master listens on {bound}; advertising 127.0.0.1 (set --advertise for other hosts)"
            );
            bound.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let addr = config.advertise.clone().unwrap_or(bound.to_string());
        let shared = Arc::new(Shared {
            role: Mutex::new(Role::Follower {
                leader: String::new(),
            }),
            links: Mutex::new(HashMap::new()),
            lease: Mutex::new(None),
            config,
        });
        let mut tasks = vec![
            tokio::spawn(serve(listener, shared.clone())),
            tokio::spawn(sweep(shared.clone())),
        ];
        match shared.config.etcd.clone() {
            Some(etcd) => tasks.push(tokio::spawn(lead(shared.clone(), etcd, addr.clone()))),
            None => {
                let placement = rebuild(&shared, shared.config.segments.clone()).await;
                *shared.role.lock() = Role::Leader(Box::new(placement));
                tracing::info!("master at {addr}: leading without etcd (embedded)");
            }
        }
        Ok(MasterServer {
            addr,
            shared,
            tasks,
        })
    }

    /// Stops serving and, with etcd, revokes the lease so a standby takes over at once
    /// instead of after the lease TTL.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        let lease = self.shared.lease.lock().take();
        if let (Some(etcd), Some(lease)) = (&self.shared.config.etcd, lease) {
            match etcd.revoke(lease).await {
                Ok(()) => tracing::info!("master: lease revoked; a standby can take over now"),
                Err(e) => tracing::warn!("master: could not revoke the lease: {e}"),
            }
        }
    }

    /// The address clients use.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether this master leads now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.shared.role.lock(), Role::Leader(_))
    }

    /// Counters (zero unless leading).
    pub fn stats(&self) -> StoreStats {
        match &*self.shared.role.lock() {
            Role::Leader(p) => p.stats(),
            Role::Follower { .. } => StoreStats::default(),
        }
    }
}

impl Shared {
    fn handle(&self, req: Request) -> Response {
        let mut updates = Vec::new();
        let now = Instant::now();
        let resp = {
            let mut role = self.role.lock();
            let placement = match &mut *role {
                Role::Leader(p) => p,
                Role::Follower { leader } => {
                    return Response::NotLeader {
                        leader: leader.clone(),
                    }
                }
            };
            match req {
                Request::PutStart { replicas, objects } => {
                    Response::PutStart(placement.put_start(&objects, replicas, now, &mut updates))
                }
                Request::PutEnd { ok, keys } => {
                    Response::PutEnd(placement.put_end(&keys, ok, &mut updates))
                }
                Request::Get(keys) => Response::Get(placement.get(&keys, now)),
                Request::Exists(keys) => Response::Flags(placement.exists(&keys)),
                Request::Remove(keys) => {
                    Response::Flags(placement.remove(&keys, now, &mut updates))
                }
                Request::Segments => Response::Segments(placement.segments()),
                Request::Stats => Response::Stats(placement.stats()),
                other => Response::Error(format!("{other:?} is a request for a store node")),
            }
        };
        self.forward(updates);
        resp
    }

    fn forward(&self, updates: Vec<NodeUpdate>) {
        let links = self.links.lock();
        for u in updates {
            let seg = match &u {
                NodeUpdate::Commit(s, _) | NodeUpdate::Drop(s, ..) => *s,
            };
            if let Some((tx, _)) = links.get(&seg) {
                let _ = tx.send(u);
            }
        }
    }

    /// Starts (or restarts) the task that mirrors index updates to `info`'s node.
    fn link(self: &Arc<Self>, info: &SegmentInfo) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(mirror(self.clone(), info.clone(), rx));
        if let Some((_, old)) = self.links.lock().insert(info.id, (tx, task)) {
            old.abort();
        }
    }

    fn unlink(&self, id: u64) {
        if let Some((_, task)) = self.links.lock().remove(&id) {
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let secret = shared.config.auth_token.clone();
            let mut conn =
                match RpcConn::accept(stream, secret.as_deref(), shared.config.timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("master: {e}");
                        return;
                    }
                };
            while let Some(req) = conn.next_request().await {
                let resp = match req {
                    Ok(req) => shared.handle(req),
                    Err(e) => Response::Error(e.to_string()),
                };
                if conn.reply(&resp).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Reclaims unfinished puts and frees ranges whose read leases ended.
async fn sweep(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Role::Leader(p) = &mut *shared.role.lock() {
            let n = p.sweep(Instant::now());
            if n > 0 {
                tracing::info!("master: reclaimed {n} unfinished puts");
            }
        }
    }
}

/// Sends index updates to one node, batching what has queued up.
async fn mirror(
    shared: Arc<Shared>,
    info: SegmentInfo,
    mut rx: mpsc::UnboundedReceiver<NodeUpdate>,
) {
    let mut conn: Option<RpcConn> = None;
    while let Some(first) = rx.recv().await {
        let mut commits = Vec::new();
        let mut drops = Vec::new();
        let mut next = Some(first);
        while let Some(u) = next.take() {
            match u {
                NodeUpdate::Commit(_, e) => commits.push(e),
                NodeUpdate::Drop(_, k, o) => drops.push((k, o)),
            }
            if commits.len() + drops.len() < 4096 {
                next = rx.try_recv().ok();
            }
        }
        // Drops first: a commit may reuse a dropped range.
        for req in [Request::NodeDrop(drops), Request::NodeCommit(commits)] {
            if matches!(&req, Request::NodeDrop(v) if v.is_empty())
                || matches!(&req, Request::NodeCommit(v) if v.is_empty())
            {
                continue;
            }
            for _ in 0..2 {
                if conn.is_none() {
                    conn = RpcConn::connect(
                        &info.control,
                        shared.config.auth_token.as_deref(),
                        shared.config.timeout,
                    )
                    .await
                    .ok();
                }
                let Some(c) = conn.as_mut() else { continue };
                match c.call(&req, shared.config.timeout).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!("master: index update to {}: {e}", info.name);
                        conn = None;
                    }
                }
            }
        }
    }
}

/// Fetches each node's verified index and builds placement from them. Nodes that do not
/// answer are left out (their segments reappear at the next membership check).
async fn rebuild(shared: &Arc<Shared>, segments: Vec<SegmentInfo>) -> Placement {
    let start = Instant::now();
    let mut placement = Placement::new(shared.config.placement);
    let (mut nodes, mut objects) = (0, 0);
    for info in segments {
        if let Some(index) = fetch_index(shared, &info).await {
            shared.link(&info);
            nodes += 1;
            objects += placement.add_segment(info, &index);
        }
    }
    tracing::info!(
        "master: placement rebuilt from {nodes} nodes ({objects} object copies) in {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    placement
}

/// The verified index `info`'s node reports; `None` if it does not answer.
async fn fetch_index(shared: &Arc<Shared>, info: &SegmentInfo) -> Option<Vec<IndexEntry>> {
    let timeout = shared.config.timeout;
    let index = async {
        let mut conn =
            RpcConn::connect(&info.control, shared.config.auth_token.as_deref(), timeout).await?;
        match conn.call(&Request::NodeIndex, timeout).await? {
            Response::NodeIndex(entries) => Ok(entries),
            other => Err(RemoteError::Rpc {
                peer: info.control.clone(),
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }
    .await;
    match index {
        Ok(entries) => Some(entries),
        Err(e) => {
            tracing::warn!(
                "master: node {} ({}) left out: {e}",
                info.name,
                info.control
            );
            None
        }
    }
}

/// Campaigns for leadership; while leading, keeps the lease and follows membership.
async fn lead(shared: Arc<Shared>, etcd: Etcd, addr: String) {
    let master_key = etcd.key("master");
    let ttl = shared.config.lease_ttl.max(Duration::from_secs(1));
    let tick = (ttl / 3).min(Duration::from_millis(500));
    loop {
        // Campaign.
        let lease = match etcd.grant(ttl.as_secs().max(1)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("master: etcd unreachable: {e}");
                *shared.role.lock() = Role::Follower {
                    leader: String::new(),
                };
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        *shared.lease.lock() = Some(lease);
        let mut last_ok = Instant::now();
        let won = loop {
            match etcd.create(&master_key, addr.as_bytes(), lease).await {
                Ok(None) => break true,
                Ok(Some(current)) => {
                    let leader = String::from_utf8_lossy(&current).into_owned();
                    *shared.role.lock() = Role::Follower { leader };
                }
                Err(e) => tracing::debug!("master: campaign: {e}"),
            }
            tokio::time::sleep(tick).await;
            match etcd.keep_alive(lease).await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => break false,
                Err(_) if last_ok.elapsed() < ttl => {}
                Err(_) => break false,
            }
        };
        if !won {
            continue;
        }
        let elected = Instant::now();
        let segments = list_segments(&etcd).await.unwrap_or_default();
        let placement = rebuild(&shared, segments).await;
        *shared.role.lock() = Role::Leader(Box::new(placement));
        tracing::info!(
            "master at {addr}: elected leader ({master_key}), serving after {:.1} ms",
            elected.elapsed().as_secs_f64() * 1e3
        );
        // Lead until the lease cannot be kept.
        loop {
            tokio::time::sleep(tick).await;
            match etcd.keep_alive(lease).await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    tracing::warn!("master: leader lease expired; stepping down");
                    break;
                }
                Err(e) if last_ok.elapsed() + tick * 2 >= ttl => {
                    tracing::warn!("master: cannot renew the leader lease ({e}); stepping down");
                    break;
                }
                Err(_) => {}
            }
            if let Ok(current) = list_segments(&etcd).await {
                follow_membership(&shared, current).await;
            }
        }
        *shared.role.lock() = Role::Follower {
            leader: String::new(),
        };
        let linked: Vec<u64> = shared.links.lock().keys().copied().collect();
        for id in linked {
            shared.unlink(id);
        }
        let _ = etcd.revoke(lease).await;
    }
}

async fn list_segments(etcd: &Etcd) -> Result<Vec<SegmentInfo>, RemoteError> {
    Ok(etcd
        .list("segments/")
        .await?
        .into_iter()
        .filter_map(|(key, value)| match SegmentInfo::decode(&value) {
            Ok(info) => Some(info),
            Err(e) => {
                tracing::warn!("master: ignoring {key}: {e}");
                None
            }
        })
        .collect())
}

/// Adds segments that joined and drops those whose lease expired.
async fn follow_membership(shared: &Arc<Shared>, current: Vec<SegmentInfo>) {
    let (joined, left) = {
        let role = shared.role.lock();
        let Role::Leader(p) = &*role else { return };
        let known = p.segments();
        let joined: Vec<SegmentInfo> = current
            .iter()
            .filter(|s| !p.has_segment(s.id))
            .cloned()
            .collect();
        let left: Vec<SegmentInfo> = known
            .into_iter()
            .filter(|k| !current.iter().any(|c| c.id == k.id))
            .collect();
        (joined, left)
    };
    for info in left {
        let lost = match &mut *shared.role.lock() {
            Role::Leader(p) => p.remove_segment(info.id),
            Role::Follower { .. } => 0,
        };
        shared.unlink(info.id);
        tracing::warn!(
            "master: node {} left (lease expired); {lost} objects lost with it",
            info.name
        );
    }
    for info in joined {
        let Some(index) = fetch_index(shared, &info).await else {
            continue;
        };
        let name = info.name.clone();
        let mut role = shared.role.lock();
        if let Role::Leader(p) = &mut *role {
            shared.link(&info);
            let restored = p.add_segment(info, &index);
            tracing::info!("master: node {name} joined with {restored} objects");
        }
    }
}

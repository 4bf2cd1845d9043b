//! The master: leader election and segment membership through etcd, object placement in
//! memory ([`Placement`]), and the control server engines talk to. It is never on the data
//! path: clients read and write node segments directly through the transports.
//!
//! A newly elected leader rebuilds placement from the nodes' own indexes, so failover
//! loses no objects. A node whose etcd lease expires is dropped and its objects become
//! misses. Without etcd the master runs alone with the segments it was given (embedded).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_transport::handshake::Service;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::placement::{NodeUpdate, Placement, PlacementConfig};
use crate::remote::etcd::Etcd;
use crate::remote::rpc::{IndexEntry, Request, Response, RpcConn, SegmentInfo, StoreStats};
use crate::remote::RemoteError;

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
type NodeLink = (mpsc::Sender<NodeUpdate>, JoinHandle<()>);

/// Index updates queued per node before new ones are dropped (the node's index then lags
/// placement: harmless for readers, who verify every object).
const MIRROR_QUEUE: usize = 1 << 16;

struct Shared {
    config: MasterConfig,
    role: Mutex<Role>,
    /// Until when this master may act as leader: the end of its etcd lease as last renewed,
    /// less a margin (`None` without etcd: always).
    valid_until: Mutex<Option<Instant>>,
    /// Per-segment queues of index updates, drained by one task per node.
    links: Mutex<HashMap<u64, NodeLink>>,
    /// Index updates dropped because a node's queue was full.
    mirror_dropped: AtomicU64,
    /// The etcd lease this master campaigns and leads with.
    lease: Mutex<Option<crate::remote::etcd::LeaseId>>,
}

/// A running master. Dropping it stops it (and, with etcd, gives up leadership when its
/// lease expires; [`MasterServer::shutdown`] gives it up at once).
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
        self.shared.step_down(String::new());
    }
}

impl MasterServer {
    /// Binds the control server and starts leading (or campaigning, with etcd).
    pub async fn start(config: MasterConfig) -> Result<MasterServer, RemoteError> {
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| RemoteError::Listen {
                    what: "master",
                    addr: config.listen.clone(),
                    source,
                })?;
        let mut bound = listener
            .local_addr()
            .map_err(|source| RemoteError::Listen {
                what: "master",
                addr: config.listen.clone(),
                source,
            })?;
        kvtier_transport::handshake::warn_if_exposed(
            Service::StoreMaster,
            &bound,
            config.auth_token.as_deref(),
        );
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
            valid_until: Mutex::new(None),
            mirror_dropped: AtomicU64::new(0),
            links: Mutex::new(HashMap::new()),
            lease: Mutex::new(None),
            config,
        });
        let mut tasks = vec![
            tokio::spawn(crate::remote::rpc::serve(
                listener,
                Service::StoreMaster,
                "master",
                shared.config.auth_token.clone(),
                shared.config.timeout,
                Arc::new({
                    let shared = shared.clone();
                    move |req| shared.handle(req)
                }),
            )),
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
        self.shared.step_down(String::new());
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
        let now = Instant::now();
        let mut role = self.role.lock();
        if self.valid_until.lock().is_some_and(|t| now >= t) {
            // The lease may have expired in etcd: another master may lead by now.
            return Response::NotLeader {
                leader: String::new(),
            };
        }
        let placement = match &mut *role {
            Role::Leader(p) => p,
            Role::Follower { leader } => {
                return Response::NotLeader {
                    leader: leader.clone(),
                }
            }
        };
        let mut updates = Vec::new();
        let resp = match req {
            Request::PutStart { replicas, objects } => {
                Response::PutStart(placement.put_start(&objects, replicas, now, &mut updates))
            }
            Request::PutEnd { ok, puts } => {
                Response::PutEnd(placement.put_end(&puts, ok, &mut updates))
            }
            Request::Get(keys) => Response::Get(placement.get(&keys, now)),
            Request::Exists(keys) => Response::Flags(placement.exists(&keys)),
            Request::Remove(keys) => Response::Flags(placement.remove(&keys, now, &mut updates)),
            Request::Segments => Response::Segments(placement.segments()),
            Request::Stats => Response::Stats(placement.stats()),
            other => Response::Error(format!("{other:?} is a request for a store node")),
        };
        // Queued under the role lock: each node sees updates in placement order.
        self.forward(updates);
        resp
    }

    fn forward(&self, updates: Vec<NodeUpdate>) {
        if updates.is_empty() {
            return;
        }
        let links = self.links.lock();
        for u in updates {
            let seg = match &u {
                NodeUpdate::Commit(s, _) | NodeUpdate::Drop(s, ..) => *s,
            };
            if let Some((tx, _)) = links.get(&seg) {
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(u) {
                    let n = self.mirror_dropped.fetch_add(1, Ordering::Relaxed);
                    if n % 1000 == 0 {
                        tracing::warn!(
                            "master: segment {seg}'s node is {MIRROR_QUEUE} index updates \
                             behind; dropping updates ({} so far)",
                            n + 1
                        );
                    }
                }
            }
        }
    }

    /// Starts (or restarts) the task that mirrors index updates to `info`'s node.
    fn link(self: &Arc<Self>, info: &SegmentInfo) {
        let (tx, rx) = mpsc::channel(MIRROR_QUEUE);
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

    /// Stops leading (placement is dropped; a new term rebuilds it from the nodes).
    fn step_down(&self, leader: String) {
        *self.role.lock() = Role::Follower { leader };
        let linked: Vec<u64> = self.links.lock().keys().copied().collect();
        for id in linked {
            self.unlink(id);
        }
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

/// Sends index updates to one node in the order placement made them, batching runs of
/// the same kind.
async fn mirror(shared: Arc<Shared>, info: SegmentInfo, mut rx: mpsc::Receiver<NodeUpdate>) {
    let mut conn: Option<RpcConn> = None;
    let mut queued: Vec<NodeUpdate> = Vec::new();
    while let Some(first) = rx.recv().await {
        queued.push(first);
        while queued.len() < 4096 {
            match rx.try_recv() {
                Ok(u) => queued.push(u),
                Err(_) => break,
            }
        }
        let mut requests: Vec<Request> = Vec::new();
        for u in queued.drain(..) {
            match (u, requests.last_mut()) {
                (NodeUpdate::Commit(_, e), Some(Request::NodeCommit(v))) => v.push(e),
                (NodeUpdate::Drop(_, k, o), Some(Request::NodeDrop(v))) => v.push((k, o)),
                (NodeUpdate::Commit(_, e), _) => requests.push(Request::NodeCommit(vec![e])),
                (NodeUpdate::Drop(_, k, o), _) => requests.push(Request::NodeDrop(vec![(k, o)])),
            }
        }
        for req in requests {
            let mut sent = false;
            for attempt in 0..3u32 {
                if conn.is_none() {
                    conn = RpcConn::connect(
                        &info.control,
                        Service::StoreNode,
                        "master",
                        shared.config.auth_token.as_deref(),
                        shared.config.timeout,
                    )
                    .await
                    .ok();
                }
                if let Some(c) = conn.as_mut() {
                    match c.request(&req, shared.config.timeout).await {
                        Ok(_) => {
                            sent = true;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!("master: index update to {}: {e}", info.name);
                            conn = None;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            if !sent {
                // The node's index now lags placement. Harmless for readers (they verify
                // checksums); a rebuild may restore an object that was removed.
                tracing::warn!(
                    "master: node {} unreachable; its index misses an update",
                    info.name
                );
            }
        }
    }
}

/// The bound on asking one node for its index: well inside the leader lease, so a dead
/// node cannot stall an election or a membership check past it.
fn index_timeout(shared: &Shared) -> Duration {
    (shared.config.lease_ttl / 3).min(shared.config.timeout)
}

/// Fetches every node's index concurrently and builds placement from them. Nodes that do
/// not answer in time are left out (they rejoin at a later membership check).
async fn rebuild(shared: &Arc<Shared>, segments: Vec<SegmentInfo>) -> Placement {
    let start = Instant::now();
    let mut placement = Placement::new(shared.config.placement);
    let fetched = futures_util::future::join_all(
        segments
            .into_iter()
            .map(|info| async move { (fetch_index(shared, &info).await, info) }),
    )
    .await;
    let (mut nodes, mut objects) = (0, 0);
    for (index, info) in fetched {
        if let Some(index) = index {
            shared.link(&info);
            nodes += 1;
            objects += placement.add_segment(info, &index, Instant::now());
        }
    }
    tracing::info!(
        "master: placement rebuilt from {nodes} nodes ({objects} object copies) in {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    placement
}

/// The index `info`'s node reports; `None` if it does not answer in time.
async fn fetch_index(shared: &Arc<Shared>, info: &SegmentInfo) -> Option<Vec<IndexEntry>> {
    let timeout = index_timeout(shared);
    let index = async {
        let mut conn = RpcConn::connect(
            &info.control,
            Service::StoreNode,
            "master",
            shared.config.auth_token.as_deref(),
            timeout,
        )
        .await?;
        match conn.request(&Request::NodeIndex, timeout).await? {
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

/// Renews `lease` every `tick` while this master leads, moving `valid_until` forward on
/// each success. Ends when the lease is gone.
async fn keep_leading(
    shared: Arc<Shared>,
    etcd: Etcd,
    lease: crate::remote::etcd::LeaseId,
    tick: Duration,
) {
    let ttl = shared.config.lease_ttl;
    loop {
        tokio::time::sleep(tick).await;
        let sent = Instant::now();
        match tokio::time::timeout(tick, etcd.keep_alive(lease)).await {
            Ok(Ok(true)) => {
                // Measured from before the request: etcd renewed no earlier than that.
                *shared.valid_until.lock() = Some(sent + ttl - tick);
            }
            Ok(Ok(false)) => {
                *shared.valid_until.lock() = Some(sent);
                return;
            }
            Ok(Err(e)) => tracing::debug!("master: keep-alive: {e}"),
            Err(_) => tracing::debug!("master: keep-alive timed out"),
        }
    }
}

/// Campaigns for leadership; while leading, keeps the lease and follows membership.
async fn lead(shared: Arc<Shared>, etcd: Etcd, addr: String) {
    let master_key = etcd.key("master");
    let ttl = shared.config.lease_ttl.max(Duration::from_secs(1));
    let tick = (ttl / 4).min(Duration::from_millis(500));
    loop {
        // Campaign.
        let lease = match etcd.grant(ttl.as_secs().max(1)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("master: etcd unreachable: {e}");
                shared.step_down(String::new());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        *shared.lease.lock() = Some(lease);
        let mut renewed = Instant::now();
        let won = loop {
            let attempt = Instant::now();
            match etcd.create(&master_key, addr.as_bytes(), lease).await {
                Ok(None) => break Some(attempt),
                Ok(Some(current)) => {
                    let leader = String::from_utf8_lossy(&current).into_owned();
                    // Our own key from a term we lost: name no leader rather than
                    // sending clients back here.
                    shared.step_down(if leader == addr {
                        String::new()
                    } else {
                        leader
                    });
                }
                Err(e) => tracing::debug!("master: campaign: {e}"),
            }
            tokio::time::sleep(tick).await;
            match etcd.keep_alive(lease).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => break None,
                Err(_) if renewed.elapsed() < ttl => {}
                Err(_) => break None,
            }
        };
        let Some(won_at) = won else { continue };
        // Valid until the lease could expire, counted from before the winning request.
        *shared.valid_until.lock() = Some(renewed.min(won_at) + ttl - tick);
        let keeper = tokio::spawn(keep_leading(shared.clone(), etcd.clone(), lease, tick));
        let elected = Instant::now();
        let segments = match list_segments(&etcd).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("master: elected but cannot list segments ({e}); retrying");
                keeper.abort();
                let _ = etcd.revoke(lease).await;
                continue;
            }
        };
        let placement = rebuild(&shared, segments).await;
        *shared.role.lock() = Role::Leader(Box::new(placement));
        tracing::info!(
            "master at {addr}: elected leader ({master_key}), serving after {:.1} ms",
            elapsed_ms(elected)
        );
        // Lead while the lease holds.
        loop {
            tokio::time::sleep(tick).await;
            let valid = shared
                .valid_until
                .lock()
                .is_some_and(|t| Instant::now() < t);
            if !valid || keeper.is_finished() {
                tracing::warn!("master: leader lease lost or not renewed in time; stepping down");
                break;
            }
            if let Ok(current) = list_segments(&etcd).await {
                follow_membership(&shared, current).await;
            }
        }
        keeper.abort();
        shared.step_down(String::new());
        *shared.valid_until.lock() = None;
        let _ = etcd.revoke(lease).await;
    }
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
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
        let joined: Vec<SegmentInfo> = current
            .iter()
            .filter(|s| !p.has_segment(s.id))
            .cloned()
            .collect();
        let left: Vec<SegmentInfo> = p
            .segments()
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
    let fetched = futures_util::future::join_all(
        joined
            .into_iter()
            .map(|info| async move { (fetch_index(shared, &info).await, info) }),
    )
    .await;
    for (index, info) in fetched {
        let Some(index) = index else { continue };
        let name = info.name.clone();
        let mut role = shared.role.lock();
        if let Role::Leader(p) = &mut *role {
            shared.link(&info);
            let restored = p.add_segment(info, &index, Instant::now());
            tracing::info!("master: node {name} joined with {restored} objects");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::rpc::ObjectKey;

    /// A node that stops reading its index updates costs the master at most
    /// [`MIRROR_QUEUE`] queued updates; the rest are dropped and counted.
    #[tokio::test]
    async fn a_node_that_reads_no_updates_holds_at_most_the_queue_bound() {
        let shared = Shared {
            config: MasterConfig {
                listen: "127.0.0.1:0".into(),
                advertise: None,
                etcd: None,
                lease_ttl: Duration::from_secs(10),
                placement: PlacementConfig::default(),
                auth_token: None,
                timeout: Duration::from_secs(1),
                segments: Vec::new(),
            },
            role: Mutex::new(Role::Follower {
                leader: String::new(),
            }),
            valid_until: Mutex::new(None),
            links: Mutex::new(HashMap::new()),
            mirror_dropped: AtomicU64::new(0),
            lease: Mutex::new(None),
        };
        // Segment 7's node: its queue is never drained.
        let (tx, mut rx) = mpsc::channel(MIRROR_QUEUE);
        shared
            .links
            .lock()
            .insert(7, (tx, tokio::spawn(std::future::pending())));
        let extra = 10;
        let updates = (0..MIRROR_QUEUE + extra)
            .map(|i| NodeUpdate::Drop(7, i as ObjectKey, 0))
            .collect();
        shared.forward(updates);
        assert_eq!(shared.mirror_dropped.load(Ordering::Relaxed), extra as u64);
        // The queue holds the first updates, in order.
        let mut queued = 0;
        while let Ok(u) = rx.try_recv() {
            assert!(matches!(u, NodeUpdate::Drop(7, key, 0) if key == queued as ObjectKey));
            queued += 1;
        }
        assert_eq!(queued, MIRROR_QUEUE);
        // Updates for a segment without a node are not queued anywhere.
        shared.forward(vec![NodeUpdate::Drop(8, 1, 0)]);
        assert_eq!(shared.mirror_dropped.load(Ordering::Relaxed), extra as u64);
        for (_, (_, task)) in shared.links.lock().drain() {
            task.abort();
        }
    }
}

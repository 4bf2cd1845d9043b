//! The remote store's control protocol: the requests engines send the master, the
//! requests the master sends store nodes, their answers, their byte encoding, and the
//! framed, authenticated TCP connection that carries them. Object bytes never travel
//! here; they move through the data-plane transports.
//!
//! A frame is a `u32` LE length and a body; a body is a tag byte and the fields of that
//! message (little-endian, length-prefixed lists with caps). Decoding never panics and
//! never allocates more than the frame holds.

use std::time::Duration;

use kvtier_transport::framed::{Codec, FramedConn, FramedError};
use kvtier_transport::handshake::Service;
use kvtier_transport::limits::{self, reply_within, ConnectionLimit};
use kvtier_transport::wire::{Reader, WireError, Writer};

/// Protocol version; both ends must speak the same one (2: the common handshake).
pub const VERSION: u16 = 2;
/// Largest frame.
pub const MAX_FRAME: usize = 64 << 20;
/// Most objects in one batched request.
pub const MAX_BATCH: usize = 1 << 16;
/// Most replicas of one object.
pub const MAX_REPLICAS: usize = crate::config::MAX_REPLICAS as usize;
const MAX_TEXT: usize = 4096;
const MAX_DESCRIPTOR: usize = 1 << 20;

/// An object's name: a chunk key, or any 128-bit name a client picks.
pub type ObjectKey = u128;

/// What the master and nodes know of an object's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Length in bytes.
    pub len: u64,
    /// xxh3-64 of the bytes; readers check it, so stale placement reads as a miss.
    pub checksum: u64,
}

/// One copy of an object: a range of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    /// The segment's instance id ([`SegmentInfo::id`]).
    pub segment: u64,
    /// Start within the segment's registered region.
    pub offset: u64,
}

/// A memory segment a store node (or an engine) contributes, as registered in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Random per start of the node: a restarted node is a new segment.
    pub id: u64,
    /// The node's name (`local_hostname` or `--name`).
    pub name: String,
    /// The node's control address (`host:port`) the master connects to.
    pub control: String,
    /// Transport kind clients must use (`tcp`, `ucx`, `nixl`).
    pub protocol: String,
    /// The node's transport endpoint descriptor.
    pub descriptor: Vec<u8>,
    /// The registered region holding the segment.
    pub region: u64,
    /// Segment size in bytes.
    pub size: u64,
}

/// A committed object as a node records it (for the master to rebuild placement).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The object.
    pub key: ObjectKey,
    /// Start within the segment.
    pub offset: u64,
    /// Length and checksum.
    pub meta: ObjectMeta,
}

/// The master's answer for one object of a `PutStart`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutSlot {
    /// Write the bytes to each replica, then `PutEnd` naming `put`.
    Write {
        /// This put's id: a late `PutEnd` of a reclaimed put cannot end a newer one.
        put: u64,
        /// Where to write.
        replicas: Vec<Replica>,
    },
    /// Stored already (or being stored by another client): nothing to do.
    Exists,
    /// No room even after eviction (or no segments).
    NoSpace,
}

/// Where to read one object, and for how long the master keeps it in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// Length and checksum.
    pub meta: ObjectMeta,
    /// The read lease: the object's ranges are neither freed nor reused for this long.
    pub lease_ms: u32,
    /// The copies, any of which may be read.
    pub replicas: Vec<Replica>,
}

/// Counters the master reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Segments (nodes) in the pool.
    pub segments: u64,
    /// Bytes across all segments.
    pub capacity: u64,
    /// Bytes allocated to objects (all replicas, pending puts included).
    pub used: u64,
    /// Complete objects.
    pub objects: u64,
    /// Puts started and not yet ended.
    pub pending: u64,
    /// Objects evicted since this master became leader.
    pub evicted: u64,
    /// Unfinished puts reclaimed since this master became leader.
    pub reclaimed: u64,
    /// Objects lost with their segments since this master became leader.
    pub lost: u64,
}

/// A request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Client → master: reserve room for objects on `replicas` distinct segments.
    PutStart {
        /// Copies wanted.
        replicas: u8,
        /// The objects.
        objects: Vec<(ObjectKey, ObjectMeta)>,
    },
    /// Client → master: the writes of these puts finished (`ok`) or failed (`!ok`, the
    /// room is freed).
    PutEnd {
        /// Whether the writes succeeded.
        ok: bool,
        /// The objects and their put ids.
        puts: Vec<(ObjectKey, u64)>,
    },
    /// Client → master: where are these objects (grants read leases).
    Get(Vec<ObjectKey>),
    /// Client → master: which of these objects are stored.
    Exists(Vec<ObjectKey>),
    /// Client → master: remove these objects.
    Remove(Vec<ObjectKey>),
    /// Client → master: the segments in the pool.
    Segments,
    /// Anyone → master: counters.
    Stats,
    /// Master → node: its segment.
    NodeInfo,
    /// Master → node: its committed objects (checksums verified).
    NodeIndex,
    /// Master → node: these objects are committed in your segment.
    NodeCommit(Vec<IndexEntry>),
    /// Master → node: these objects are gone from your segment (key, offset).
    NodeDrop(Vec<(ObjectKey, u64)>),
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// To `PutStart`, one per object.
    PutStart(Vec<PutSlot>),
    /// To `PutEnd`: whether each object is now stored (false: its put was reclaimed).
    PutEnd(Vec<bool>),
    /// To `Get`, one per object (`None`: a miss).
    Get(Vec<Option<Located>>),
    /// To `Exists` and `Remove`: one flag per object.
    Flags(Vec<bool>),
    /// To `Segments`.
    Segments(Vec<SegmentInfo>),
    /// To `Stats`.
    Stats(StoreStats),
    /// To `NodeInfo`.
    NodeInfo(SegmentInfo),
    /// To `NodeIndex`.
    NodeIndex(Vec<IndexEntry>),
    /// Done (to `NodeCommit`, `NodeDrop`).
    Done,
    /// This master is not the leader; `leader` is the leader's address if known.
    NotLeader {
        /// The leader's address, or empty.
        leader: String,
    },
    /// The request failed.
    Error(String),
}

fn put_keys(w: &mut Writer, keys: &[ObjectKey]) {
    w.u32(keys.len() as u32);
    for k in keys {
        w.raw(&k.to_le_bytes());
    }
}

fn get_keys(r: &mut Reader<'_>) -> Result<Vec<ObjectKey>, WireError> {
    let n = r.count(MAX_BATCH, 16)?;
    (0..n).map(|_| get_key(r)).collect()
}

fn get_key(r: &mut Reader<'_>) -> Result<ObjectKey, WireError> {
    Ok(u128::from_le_bytes(r.array()?))
}

fn put_meta(w: &mut Writer, m: &ObjectMeta) {
    w.u64(m.len);
    w.u64(m.checksum);
}

fn get_meta(r: &mut Reader<'_>) -> Result<ObjectMeta, WireError> {
    Ok(ObjectMeta {
        len: r.u64()?,
        checksum: r.u64()?,
    })
}

fn put_replicas(w: &mut Writer, replicas: &[Replica]) {
    // The master never places more than MAX_REPLICAS copies; never write what the
    // decoder refuses.
    let replicas = &replicas[..replicas.len().min(MAX_REPLICAS)];
    w.u8(replicas.len() as u8);
    for rep in replicas {
        w.u64(rep.segment);
        w.u64(rep.offset);
    }
}

fn get_replicas(r: &mut Reader<'_>) -> Result<Vec<Replica>, WireError> {
    let n = r.u8()? as usize;
    if n > MAX_REPLICAS {
        return Err(WireError::TooLong {
            what: "replica list",
            len: n,
            cap: MAX_REPLICAS,
        });
    }
    (0..n)
        .map(|_| {
            Ok(Replica {
                segment: r.u64()?,
                offset: r.u64()?,
            })
        })
        .collect()
}

fn put_entry(w: &mut Writer, e: &IndexEntry) {
    w.raw(&e.key.to_le_bytes());
    w.u64(e.offset);
    put_meta(w, &e.meta);
}

fn get_entry(r: &mut Reader<'_>) -> Result<IndexEntry, WireError> {
    Ok(IndexEntry {
        key: get_key(r)?,
        offset: r.u64()?,
        meta: get_meta(r)?,
    })
}

fn put_segment(w: &mut Writer, s: &SegmentInfo) {
    w.u64(s.id);
    w.str(&s.name, MAX_TEXT, false);
    w.str(&s.control, MAX_TEXT, false);
    w.str(&s.protocol, MAX_TEXT, false);
    w.bytes32(&s.descriptor);
    w.u64(s.region);
    w.u64(s.size);
}

fn get_segment(r: &mut Reader<'_>) -> Result<SegmentInfo, WireError> {
    Ok(SegmentInfo {
        id: r.u64()?,
        name: r.str(MAX_TEXT, false)?,
        control: r.str(MAX_TEXT, false)?,
        protocol: r.str(MAX_TEXT, false)?,
        descriptor: r.bytes32(MAX_DESCRIPTOR)?.to_vec(),
        region: r.u64()?,
        size: r.u64()?,
    })
}

impl SegmentInfo {
    /// The encoding stored in etcd.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u16(VERSION);
        put_segment(&mut w, self);
        w.0
    }

    /// Decodes [`SegmentInfo::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "segment info");
        let version = r.u16()?;
        if version != VERSION {
            return Err(WireError::TooLong {
                what: "segment info version",
                len: version as usize,
                cap: VERSION as usize,
            });
        }
        let s = get_segment(&mut r)?;
        r.finish()?;
        Ok(s)
    }
}

/// Encodes a request body.
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut w = Writer::default();
    match req {
        Request::PutStart { replicas, objects } => {
            w.u8(1);
            w.u8(*replicas);
            w.u32(objects.len() as u32);
            for (k, m) in objects {
                w.raw(&k.to_le_bytes());
                put_meta(&mut w, m);
            }
        }
        Request::PutEnd { ok, puts } => {
            w.u8(2);
            w.u8(*ok as u8);
            w.u32(puts.len() as u32);
            for (k, id) in puts {
                w.raw(&k.to_le_bytes());
                w.u64(*id);
            }
        }
        Request::Get(keys) => {
            w.u8(3);
            put_keys(&mut w, keys);
        }
        Request::Exists(keys) => {
            w.u8(4);
            put_keys(&mut w, keys);
        }
        Request::Remove(keys) => {
            w.u8(5);
            put_keys(&mut w, keys);
        }
        Request::Segments => w.u8(6),
        Request::Stats => w.u8(7),
        Request::NodeInfo => w.u8(8),
        Request::NodeIndex => w.u8(9),
        Request::NodeCommit(entries) => {
            w.u8(10);
            w.u32(entries.len() as u32);
            for e in entries {
                put_entry(&mut w, e);
            }
        }
        Request::NodeDrop(entries) => {
            w.u8(11);
            w.u32(entries.len() as u32);
            for (k, off) in entries {
                w.raw(&k.to_le_bytes());
                w.u64(*off);
            }
        }
    }
    w.0
}

/// Decodes a request body.
pub fn decode_request(body: &[u8]) -> Result<Request, WireError> {
    let mut r = Reader::new(body, "request");
    let req = match r.u8()? {
        1 => {
            let replicas = r.u8()?;
            let n = r.count(MAX_BATCH, 32)?;
            let objects = (0..n)
                .map(|_| Ok((get_key(&mut r)?, get_meta(&mut r)?)))
                .collect::<Result<_, WireError>>()?;
            Request::PutStart { replicas, objects }
        }
        2 => {
            let ok = r.u8()? != 0;
            let n = r.count(MAX_BATCH, 24)?;
            let puts = (0..n)
                .map(|_| Ok((get_key(&mut r)?, r.u64()?)))
                .collect::<Result<_, WireError>>()?;
            Request::PutEnd { ok, puts }
        }
        3 => Request::Get(get_keys(&mut r)?),
        4 => Request::Exists(get_keys(&mut r)?),
        5 => Request::Remove(get_keys(&mut r)?),
        6 => Request::Segments,
        7 => Request::Stats,
        8 => Request::NodeInfo,
        9 => Request::NodeIndex,
        10 => {
            let n = r.count(MAX_BATCH, 40)?;
            Request::NodeCommit(
                (0..n)
                    .map(|_| get_entry(&mut r))
                    .collect::<Result<_, _>>()?,
            )
        }
        11 => {
            let n = r.count(MAX_BATCH, 24)?;
            Request::NodeDrop(
                (0..n)
                    .map(|_| Ok((get_key(&mut r)?, r.u64()?)))
                    .collect::<Result<_, WireError>>()?,
            )
        }
        _ => return Err(WireError::Truncated("request: unknown tag")),
    };
    r.finish()?;
    Ok(req)
}

/// Encodes a response body.
pub fn encode_response(resp: &Response) -> Vec<u8> {
    let mut w = Writer::default();
    match resp {
        Response::PutStart(slots) => {
            w.u8(1);
            w.u32(slots.len() as u32);
            for s in slots {
                match s {
                    PutSlot::Write { put, replicas } => {
                        w.u8(0);
                        w.u64(*put);
                        put_replicas(&mut w, replicas);
                    }
                    PutSlot::Exists => w.u8(1),
                    PutSlot::NoSpace => w.u8(2),
                }
            }
        }
        Response::PutEnd(flags) | Response::Flags(flags) => {
            w.u8(if matches!(resp, Response::PutEnd(_)) {
                2
            } else {
                4
            });
            w.u32(flags.len() as u32);
            for &f in flags {
                w.u8(f as u8);
            }
        }
        Response::Get(found) => {
            w.u8(3);
            w.u32(found.len() as u32);
            for f in found {
                match f {
                    None => w.u8(0),
                    Some(l) => {
                        w.u8(1);
                        put_meta(&mut w, &l.meta);
                        w.u32(l.lease_ms);
                        put_replicas(&mut w, &l.replicas);
                    }
                }
            }
        }
        Response::Segments(segs) => {
            w.u8(5);
            w.u32(segs.len() as u32);
            for s in segs {
                put_segment(&mut w, s);
            }
        }
        Response::Stats(s) => {
            w.u8(6);
            for v in [
                s.segments,
                s.capacity,
                s.used,
                s.objects,
                s.pending,
                s.evicted,
                s.reclaimed,
                s.lost,
            ] {
                w.u64(v);
            }
        }
        Response::NodeInfo(s) => {
            w.u8(7);
            put_segment(&mut w, s);
        }
        Response::NodeIndex(entries) => {
            w.u8(8);
            w.u32(entries.len() as u32);
            for e in entries {
                put_entry(&mut w, e);
            }
        }
        Response::Done => w.u8(9),
        Response::NotLeader { leader } => {
            w.u8(10);
            w.str(leader, MAX_TEXT, false);
        }
        Response::Error(msg) => {
            w.u8(11);
            w.str(msg, MAX_TEXT, false);
        }
    }
    w.0
}

/// Decodes a response body.
pub fn decode_response(body: &[u8]) -> Result<Response, WireError> {
    let mut r = Reader::new(body, "response");
    let flags = |r: &mut Reader<'_>| -> Result<Vec<bool>, WireError> {
        let n = r.count(MAX_BATCH, 1)?;
        (0..n).map(|_| Ok(r.u8()? != 0)).collect()
    };
    let resp = match r.u8()? {
        1 => {
            let n = r.count(MAX_BATCH, 1)?;
            let slots = (0..n)
                .map(|_| {
                    Ok(match r.u8()? {
                        0 => PutSlot::Write {
                            put: r.u64()?,
                            replicas: get_replicas(&mut r)?,
                        },
                        1 => PutSlot::Exists,
                        2 => PutSlot::NoSpace,
                        _ => return Err(WireError::Truncated("put slot: unknown kind")),
                    })
                })
                .collect::<Result<_, WireError>>()?;
            Response::PutStart(slots)
        }
        2 => Response::PutEnd(flags(&mut r)?),
        3 => {
            let n = r.count(MAX_BATCH, 1)?;
            let found = (0..n)
                .map(|_| {
                    Ok(match r.u8()? {
                        0 => None,
                        1 => Some(Located {
                            meta: get_meta(&mut r)?,
                            lease_ms: r.u32()?,
                            replicas: get_replicas(&mut r)?,
                        }),
                        _ => return Err(WireError::Truncated("get answer: unknown kind")),
                    })
                })
                .collect::<Result<_, WireError>>()?;
            Response::Get(found)
        }
        4 => Response::Flags(flags(&mut r)?),
        5 => {
            let n = r.count(1 << 12, 34)?;
            Response::Segments(
                (0..n)
                    .map(|_| get_segment(&mut r))
                    .collect::<Result<_, _>>()?,
            )
        }
        6 => {
            let mut v = [0u64; 8];
            for x in &mut v {
                *x = r.u64()?;
            }
            Response::Stats(StoreStats {
                segments: v[0],
                capacity: v[1],
                used: v[2],
                objects: v[3],
                pending: v[4],
                evicted: v[5],
                reclaimed: v[6],
                lost: v[7],
            })
        }
        7 => Response::NodeInfo(get_segment(&mut r)?),
        8 => {
            let n = r.count(1 << 24, 40)?;
            Response::NodeIndex(
                (0..n)
                    .map(|_| get_entry(&mut r))
                    .collect::<Result<_, _>>()?,
            )
        }
        9 => Response::Done,
        10 => Response::NotLeader {
            leader: r.str(MAX_TEXT, false)?,
        },
        11 => Response::Error(r.str(MAX_TEXT, false)?),
        _ => return Err(WireError::Truncated("response: unknown tag")),
    };
    r.finish()?;
    Ok(resp)
}

/// The store's RPC as a client (engine, master towards nodes) speaks it: [`Request`]s
/// out, [`Response`]s in.
pub struct ClientCodec;

impl Codec for ClientCodec {
    const VERSION: u16 = VERSION;
    type Out = Request;
    type In = Response;
    const MAX_FRAME: usize = MAX_FRAME;

    fn encode(req: &Request) -> Vec<u8> {
        encode_request(req)
    }

    fn decode(body: &[u8]) -> Result<Response, Box<dyn std::error::Error + Send + Sync>> {
        Ok(decode_response(body)?)
    }
}

/// The store's RPC as a server (master, node) speaks it: [`Request`]s in, [`Response`]s
/// out.
pub struct ServerCodec;

impl Codec for ServerCodec {
    const VERSION: u16 = VERSION;
    type Out = Response;
    type In = Request;
    const MAX_FRAME: usize = MAX_FRAME;

    fn encode(resp: &Response) -> Vec<u8> {
        encode_response(resp)
    }

    fn decode(body: &[u8]) -> Result<Request, Box<dyn std::error::Error + Send + Sync>> {
        Ok(decode_request(body)?)
    }
}

/// A client's connection to a master or node, past the handshake. Ask with
/// [`FramedConn::request`]; after an error, drop the connection.
pub type RpcConn = FramedConn<ClientCodec>;

/// Accepts control connections on `listener` for `service` and answers each request with
/// `handle` until the task is aborted. `who` names the server in logs and handshakes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Service,
    who: &'static str,
    secret: Option<String>,
    timeout: Duration,
    handle: std::sync::Arc<dyn Fn(Request) -> Response + Send + Sync>,
) {
    let where_ = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let limit = ConnectionLimit::new(format!("{who} on {where_}"), limits::MAX_CONNECTIONS);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                tracing::warn!("{who}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((stream, permit)) = limit.admit_or_refuse(stream, &peer) else {
            continue;
        };
        let (secret, handle) = (secret.clone(), handle.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let accepted =
                FramedConn::<ServerCodec>::accept(stream, service, who, secret.as_deref(), timeout)
                    .await;
            let mut conn = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("{who}: {e}");
                    return;
                }
            };
            loop {
                let resp = match conn.recv_idle(limits::CONTROL_IDLE_TIMEOUT).await {
                    Ok(req) => handle(req),
                    Err(FramedError::Malformed { source, .. }) => {
                        Response::Error(source.to_string())
                    }
                    // Gone, or a frame over the cap: the stream is out of step.
                    Err(_) => return,
                };
                // A client that stops reading answers is dropped after the timeout.
                if reply_within(timeout, conn.send(&resp)).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(id: u64) -> SegmentInfo {
        SegmentInfo {
            id,
            name: format!("node-{id}"),
            control: "127.0.0.1:1".into(),
            protocol: "tcp".into(),
            descriptor: vec![1, 2, 3],
            region: 7,
            size: 1 << 30,
        }
    }

    #[test]
    fn every_message_round_trips_and_every_truncation_is_an_error() {
        let meta = ObjectMeta {
            len: 5,
            checksum: 9,
        };
        let entry = IndexEntry {
            key: 3,
            offset: 64,
            meta,
        };
        let reqs = vec![
            Request::PutStart {
                replicas: 2,
                objects: vec![(1, meta), (u128::MAX, meta)],
            },
            Request::PutEnd {
                ok: true,
                puts: vec![(1, 7), (2, 8)],
            },
            Request::Get(vec![4]),
            Request::Exists(vec![]),
            Request::Remove(vec![5, 6]),
            Request::Segments,
            Request::Stats,
            Request::NodeInfo,
            Request::NodeIndex,
            Request::NodeCommit(vec![entry]),
            Request::NodeDrop(vec![(3, 64)]),
        ];
        for req in reqs {
            let body = encode_request(&req);
            assert_eq!(decode_request(&body).unwrap(), req);
            for cut in 0..body.len() {
                assert!(
                    decode_request(&body[..cut]).is_err(),
                    "{req:?} cut at {cut}"
                );
            }
        }
        let replicas = vec![Replica {
            segment: 1,
            offset: 128,
        }];
        let resps = vec![
            Response::PutStart(vec![
                PutSlot::Write {
                    put: 5,
                    replicas: replicas.clone(),
                },
                PutSlot::Exists,
                PutSlot::NoSpace,
            ]),
            Response::PutEnd(vec![true, false]),
            Response::Get(vec![
                None,
                Some(Located {
                    meta,
                    lease_ms: 5000,
                    replicas,
                }),
            ]),
            Response::Flags(vec![false]),
            Response::Segments(vec![seg(1), seg(2)]),
            Response::Stats(StoreStats {
                segments: 3,
                used: 4,
                ..StoreStats::default()
            }),
            Response::NodeInfo(seg(3)),
            Response::NodeIndex(vec![entry]),
            Response::Done,
            Response::NotLeader {
                leader: "h:1".into(),
            },
            Response::Error("bad".into()),
        ];
        for resp in resps {
            let body = encode_response(&resp);
            assert_eq!(decode_response(&body).unwrap(), resp);
            for cut in 0..body.len() {
                assert!(
                    decode_response(&body[..cut]).is_err(),
                    "{resp:?} cut at {cut}"
                );
            }
        }
        let s = seg(9);
        assert_eq!(SegmentInfo::decode(&s.encode()).unwrap(), s);
        assert!(SegmentInfo::decode(&[]).is_err());
    }
}

#[cfg(test)]
mod conn_tests {
    use super::*;

    #[tokio::test]
    async fn servers_refuse_clients_without_the_secret_and_answer_those_with_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(serve(
            listener,
            Service::StoreMaster,
            "test server",
            Some("s3cret".into()),
            Duration::from_secs(5),
            std::sync::Arc::new(|req| match req {
                Request::Exists(keys) => Response::Flags(keys.iter().map(|k| k % 2 == 1).collect()),
                _ => Response::Error("unexpected".into()),
            }),
        ));
        let t = Duration::from_secs(5);
        for wrong in [None, Some("guess")] {
            let err = RpcConn::connect(&addr, Service::StoreMaster, "test", wrong, t)
                .await
                .expect_err("refused");
            assert!(err.to_string().contains("transport_auth_token"), "{err}");
        }
        let master = |secret| RpcConn::connect(&addr, Service::StoreMaster, "test", secret, t);
        let mut conn = master(Some("s3cret")).await.unwrap();
        for _ in 0..3 {
            let resp = conn
                .request(&Request::Exists(vec![1, 2, 3]), t)
                .await
                .unwrap();
            assert_eq!(resp, Response::Flags(vec![true, false, true]));
        }
        assert_eq!(
            conn.request(&Request::Stats, t).await.unwrap(),
            Response::Error("unexpected".into())
        );
        server.abort();
    }
}

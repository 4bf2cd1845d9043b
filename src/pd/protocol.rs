//! The P/D control plane: small framed messages between sender, receiver and proxy.
//!
//! Messages travel as the bodies of frames of a
//! [`FramedConn`](kvtier_transport::framed::FramedConn) (`u32` LE body length, at most
//! [`MAX_FRAME`]). A body's first byte is the message type, then its fields (integers little-endian, strings and byte strings
//! as `u32` length + bytes, lists as `u32` count + items). [`decode`] validates every
//! length against the body and the caps before allocating: any input gives a message or a
//! [`ProtocolError`], never a panic.
//!
//! Every connection opens with kvtier's common handshake
//! ([`kvtier_transport::handshake`]: service `PdReceiver` or `PdProxy`, protocol
//! [`VERSION`], the shared secret proved both ways) before the first message.

use kvtier_transport::wire::{self, Reader, WireError, Writer};

use crate::keys::ChunkKey;

/// Protocol version of this build (2: commits carry each chunk's checksum; 3: the common
/// handshake).
pub const VERSION: u16 = 4;
/// Largest message body.
pub const MAX_FRAME: usize = 4 << 20;
/// Most chunks in one allocation.
pub const MAX_CHUNKS: usize = 65_536;
/// Longest string field.
pub const MAX_STR: usize = 4096;

/// One chunk a sender has written and commits: the receiver makes it visible only when
/// the bytes in its page hash to `checksum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkCommit {
    /// The chunk's key.
    pub key: ChunkKey,
    /// xxh3-64 of the chunk's payload as the sender staged it.
    pub checksum: u64,
}

/// One chunk a sender asks room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRequest {
    /// The chunk's key.
    pub key: ChunkKey,
    /// Tokens in the chunk.
    pub tokens: u32,
}

/// Where the receiver will take a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The receiver already holds this chunk: skip it.
    Held,
    /// Write the chunk at this offset of the receiver's P/D buffer region.
    Page {
        /// Byte offset in the registered buffer.
        offset: u64,
    },
}

/// Why an allocation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocFailure {
    /// The request needs more pages than the whole buffer has.
    NeverFits,
    /// No room freed up within `pd_allocation_timeout_sec`.
    Timeout,
}

/// A control-plane message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Sender → receiver: the receiver's transport descriptor, please.
    GetDescriptor,
    /// Receiver → sender: its transport descriptor and page size.
    Descriptor {
        /// Transport kind (`tcp`, `ucx`, `nixl`).
        transport: String,
        /// Page size in bytes.
        page_bytes: u64,
        /// The transport descriptor.
        descriptor: Vec<u8>,
    },
    /// Sender → receiver: room for these chunks of request `req_id`.
    Alloc {
        /// The request.
        req_id: String,
        /// Its chunks, in order.
        chunks: Vec<ChunkRequest>,
        /// The id the receiver's transport knows the sender's data connection by
        /// ([`kvtier_transport::Connection::writer_id`]; 0 where it has none): only that
        /// connection may write the pages granted.
        writer: u64,
    },
    /// Receiver → sender: one slot per chunk.
    Allocated {
        /// The request.
        req_id: String,
        /// Slots, in the order asked.
        slots: Vec<Slot>,
    },
    /// Receiver → sender: no room.
    AllocFailed {
        /// The request.
        req_id: String,
        /// Why.
        failure: AllocFailure,
        /// Bytes the request needs.
        needed_bytes: u64,
        /// Bytes of the whole buffer.
        buffer_bytes: u64,
    },
    /// Sender → receiver: these chunks are written; make those whose bytes match their
    /// checksum visible.
    Commit {
        /// The request.
        req_id: String,
        /// The written chunks.
        chunks: Vec<ChunkCommit>,
    },
    /// Receiver → sender: committed.
    Committed {
        /// The request.
        req_id: String,
    },
    /// Sender → receiver: give up the request's uncommitted pages.
    Abort {
        /// The request.
        req_id: String,
    },
    /// Any → any: the previous request failed.
    Error {
        /// What went wrong.
        reason: String,
    },
    /// Proxy → sender: the `TransferDone` for `req_id` arrived.
    Received {
        /// The request.
        req_id: String,
    },
    /// Sender → proxy: the request's KV has reached the receiver (or failed to).
    TransferDone {
        /// The request.
        req_id: String,
        /// Whether it succeeded.
        ok: bool,
        /// Error text when it failed.
        error: String,
        /// Tokens sent.
        tokens: u64,
        /// Bytes sent.
        bytes: u64,
        /// Microseconds the transfer took.
        elapsed_us: u64,
    },
}

/// Why a message did not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A malformed field, length or framing.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Unknown type byte.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A byte outside its enumeration.
    #[error("bad {0} code")]
    BadCode(&'static str),
}

const GET_DESCRIPTOR: u8 = 5;
const DESCRIPTOR: u8 = 6;
const ALLOC: u8 = 7;
const ALLOCATED: u8 = 8;
const ALLOC_FAILED: u8 = 9;
const COMMIT: u8 = 10;
const COMMITTED: u8 = 11;
const ABORT: u8 = 12;
const ERROR: u8 = 13;
const TRANSFER_DONE: u8 = 14;
const RECEIVED: u8 = 15;

/// A string field: `u32` length, at most [`MAX_STR`] bytes.
fn put_str(w: &mut Writer, v: &str) {
    w.str(v, MAX_STR, true);
}

fn put_key(w: &mut Writer, k: ChunkKey) {
    w.raw(&k.to_le_bytes());
}

/// The body of `msg` (its frame adds the length prefix).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    match msg {
        Message::GetDescriptor => w.u8(GET_DESCRIPTOR),
        Message::Descriptor {
            transport,
            page_bytes,
            descriptor,
        } => {
            w.u8(DESCRIPTOR);
            put_str(&mut w, transport);
            w.u64(*page_bytes);
            w.bytes32(descriptor);
        }
        Message::Alloc {
            req_id,
            chunks,
            writer,
        } => {
            w.u8(ALLOC);
            put_str(&mut w, req_id);
            w.u64(*writer);
            w.u32(chunks.len() as u32);
            for c in chunks {
                put_key(&mut w, c.key);
                w.u32(c.tokens);
            }
        }
        Message::Allocated { req_id, slots } => {
            w.u8(ALLOCATED);
            put_str(&mut w, req_id);
            w.u32(slots.len() as u32);
            for s in slots {
                match s {
                    Slot::Held => w.u8(0),
                    Slot::Page { offset } => {
                        w.u8(1);
                        w.u64(*offset);
                    }
                }
            }
        }
        Message::AllocFailed {
            req_id,
            failure,
            needed_bytes,
            buffer_bytes,
        } => {
            w.u8(ALLOC_FAILED);
            put_str(&mut w, req_id);
            w.u8(match failure {
                AllocFailure::NeverFits => 0,
                AllocFailure::Timeout => 1,
            });
            w.u64(*needed_bytes);
            w.u64(*buffer_bytes);
        }
        Message::Commit { req_id, chunks } => {
            w.u8(COMMIT);
            put_str(&mut w, req_id);
            w.u32(chunks.len() as u32);
            for c in chunks {
                put_key(&mut w, c.key);
                w.u64(c.checksum);
            }
        }
        Message::Committed { req_id } => {
            w.u8(COMMITTED);
            put_str(&mut w, req_id);
        }
        Message::Abort { req_id } => {
            w.u8(ABORT);
            put_str(&mut w, req_id);
        }
        Message::Error { reason } => {
            w.u8(ERROR);
            put_str(&mut w, reason);
        }
        Message::Received { req_id } => {
            w.u8(RECEIVED);
            put_str(&mut w, req_id);
        }
        Message::TransferDone {
            req_id,
            ok,
            error,
            tokens,
            bytes,
            elapsed_us,
        } => {
            w.u8(TRANSFER_DONE);
            put_str(&mut w, req_id);
            w.u8(*ok as u8);
            put_str(&mut w, error);
            w.u64(*tokens);
            w.u64(*bytes);
            w.u64(*elapsed_us);
        }
    }
    w.0
}

fn get_str(r: &mut Reader<'_>) -> Result<String, ProtocolError> {
    Ok(r.str(MAX_STR, true)?)
}

fn get_key(r: &mut Reader<'_>) -> Result<ChunkKey, ProtocolError> {
    Ok(ChunkKey::from_le_bytes(r.array()?))
}

/// Decodes one message body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
    wire::check_len(body.len(), MAX_FRAME)?;
    let (&t, rest) = body.split_first().ok_or(WireError::Empty)?;
    let what = match t {
        GET_DESCRIPTOR => "get-descriptor",
        DESCRIPTOR => "descriptor",
        ALLOC => "alloc",
        ALLOCATED => "allocated",
        ALLOC_FAILED => "alloc-failed",
        COMMIT => "commit",
        COMMITTED => "committed",
        ABORT => "abort",
        ERROR => "error",
        TRANSFER_DONE => "transfer-done",
        RECEIVED => "received",
        other => return Err(ProtocolError::UnknownType(other)),
    };
    let mut r = Reader::new(rest, what);
    let msg = match t {
        GET_DESCRIPTOR => Message::GetDescriptor,
        DESCRIPTOR => Message::Descriptor {
            transport: get_str(&mut r)?,
            page_bytes: r.u64()?,
            descriptor: r.bytes32(MAX_FRAME)?.to_vec(),
        },
        ALLOC => {
            let req_id = get_str(&mut r)?;
            let writer = r.u64()?;
            let n = r.count(MAX_CHUNKS, 20)?;
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                chunks.push(ChunkRequest {
                    key: get_key(&mut r)?,
                    tokens: r.u32()?,
                });
            }
            Message::Alloc {
                req_id,
                chunks,
                writer,
            }
        }
        ALLOCATED => {
            let req_id = get_str(&mut r)?;
            let n = r.count(MAX_CHUNKS, 1)?;
            let mut slots = Vec::with_capacity(n);
            for _ in 0..n {
                slots.push(match r.u8()? {
                    0 => Slot::Held,
                    1 => Slot::Page { offset: r.u64()? },
                    _ => return Err(ProtocolError::BadCode("slot")),
                });
            }
            Message::Allocated { req_id, slots }
        }
        ALLOC_FAILED => Message::AllocFailed {
            req_id: get_str(&mut r)?,
            failure: match r.u8()? {
                0 => AllocFailure::NeverFits,
                1 => AllocFailure::Timeout,
                _ => return Err(ProtocolError::BadCode("failure")),
            },
            needed_bytes: r.u64()?,
            buffer_bytes: r.u64()?,
        },
        COMMIT => {
            let req_id = get_str(&mut r)?;
            let n = r.count(MAX_CHUNKS, 24)?;
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                chunks.push(ChunkCommit {
                    key: get_key(&mut r)?,
                    checksum: r.u64()?,
                });
            }
            Message::Commit { req_id, chunks }
        }
        COMMITTED => Message::Committed {
            req_id: get_str(&mut r)?,
        },
        ABORT => Message::Abort {
            req_id: get_str(&mut r)?,
        },
        ERROR => Message::Error {
            reason: get_str(&mut r)?,
        },
        RECEIVED => Message::Received {
            req_id: get_str(&mut r)?,
        },
        _ => Message::TransferDone {
            req_id: get_str(&mut r)?,
            ok: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(ProtocolError::BadCode("ok")),
            },
            error: get_str(&mut r)?,
            tokens: r.u64()?,
            bytes: r.u64()?,
            elapsed_us: r.u64()?,
        },
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        let k = ChunkKey(0xabcdef);
        vec![
            Message::GetDescriptor,
            Message::Descriptor {
                transport: "tcp".into(),
                page_bytes: 32 << 20,
                descriptor: vec![1, 2, 3],
            },
            Message::Alloc {
                req_id: "r1".into(),
                chunks: vec![ChunkRequest {
                    key: k,
                    tokens: 256,
                }],
                writer: 0x5eed,
            },
            Message::Allocated {
                req_id: "r1".into(),
                slots: vec![Slot::Held, Slot::Page { offset: 4096 }],
            },
            Message::AllocFailed {
                req_id: "r1".into(),
                failure: AllocFailure::NeverFits,
                needed_bytes: 10,
                buffer_bytes: 5,
            },
            Message::Commit {
                req_id: "r1".into(),
                chunks: vec![
                    ChunkCommit {
                        key: k,
                        checksum: 7,
                    },
                    ChunkCommit {
                        key: k,
                        checksum: u64::MAX,
                    },
                ],
            },
            Message::Committed {
                req_id: "r1".into(),
            },
            Message::Abort {
                req_id: "r1".into(),
            },
            Message::Error {
                reason: "no".into(),
            },
            Message::Received {
                req_id: "r1".into(),
            },
            Message::TransferDone {
                req_id: "r1".into(),
                ok: true,
                error: String::new(),
                tokens: 7500,
                bytes: 983_040_000,
                elapsed_us: 250_000,
            },
        ]
    }

    #[test]
    fn round_trip_and_every_truncation_fails() {
        for m in all() {
            let body = &encode(&m);
            assert_eq!(decode(body).unwrap(), m);
            for cut in 1..body.len() {
                assert!(decode(&body[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut long = body.to_vec();
            long.push(0);
            assert!(decode(&long).is_err());
        }
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        let mut body = vec![ALLOC];
        body.extend_from_slice(&0u32.to_le_bytes()); // empty req id
        body.extend_from_slice(&7u64.to_le_bytes()); // writer id
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&body),
            Err(ProtocolError::Wire(WireError::TooLong { .. }))
        ));
    }
}

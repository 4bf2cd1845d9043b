//! The P/D control plane: small framed messages between sender, receiver and proxy.
//!
//! Framing: `u32` LE body length (1..=[`MAX_FRAME`]), then the body; the body's first byte
//! is the message type, then its fields (integers little-endian, strings and byte strings
//! as `u32` length + bytes, lists as `u32` count + items). [`decode`] validates every
//! length against the body and the caps before allocating: any input gives a message or a
//! [`ProtocolError`], never a panic.
//!
//! Every connection starts with the accepting side's `Challenge`, the connecting side's
//! `Hello` (HMAC of the nonce with `transport_auth_token`, see
//! [`kvtier_transport::auth`]) and `Welcome` or `Reject`.

use crate::keys::ChunkKey;

/// Protocol version of this build.
pub const VERSION: u16 = 1;
/// Largest message body.
pub const MAX_FRAME: usize = 4 << 20;
/// Most chunks in one allocation.
pub const MAX_CHUNKS: usize = 65_536;
/// Longest string field.
pub const MAX_STR: usize = 4096;

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
    /// Accepting side → connecting side, first.
    Challenge {
        /// Protocol version.
        version: u16,
        /// Random bytes to authenticate.
        nonce: [u8; 32],
    },
    /// Connecting side's answer.
    Hello {
        /// Protocol version.
        version: u16,
        /// Who is connecting.
        name: String,
        /// HMAC-SHA256 of the nonce.
        mac: [u8; 32],
    },
    /// Accepted.
    Welcome,
    /// Refused; the connection closes.
    Reject {
        /// Why.
        reason: String,
    },
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
    /// Sender → receiver: these chunks are written; make them visible.
    Commit {
        /// The request.
        req_id: String,
        /// The written chunks.
        keys: Vec<ChunkKey>,
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
    /// Empty body.
    #[error("empty message")]
    Empty,
    /// Unknown type byte.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The body ended inside a field.
    #[error("truncated {0} message")]
    Truncated(&'static str),
    /// Bytes after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A length over its cap.
    #[error("{what} of {len} exceeds the cap of {cap}")]
    TooLong {
        /// What.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// A string that is not UTF-8.
    #[error("string field is not UTF-8")]
    BadUtf8,
    /// A byte outside its enumeration.
    #[error("bad {0} code")]
    BadCode(&'static str),
}

const CHALLENGE: u8 = 1;
const HELLO: u8 = 2;
const WELCOME: u8 = 3;
const REJECT: u8 = 4;
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

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn key(&mut self, k: ChunkKey) {
        self.0.extend_from_slice(&k.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(MAX_STR)];
        // Cut on a character boundary so the field stays valid UTF-8.
        let mut n = b.len();
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.bytes(&s.as_bytes()[..n]);
    }
}

/// The message as it goes on the wire, length prefix included.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(64));
    match msg {
        Message::Challenge { version, nonce } => {
            w.u8(CHALLENGE);
            w.u16(*version);
            w.0.extend_from_slice(nonce);
        }
        Message::Hello { version, name, mac } => {
            w.u8(HELLO);
            w.u16(*version);
            w.str(name);
            w.0.extend_from_slice(mac);
        }
        Message::Welcome => w.u8(WELCOME),
        Message::Reject { reason } => {
            w.u8(REJECT);
            w.str(reason);
        }
        Message::GetDescriptor => w.u8(GET_DESCRIPTOR),
        Message::Descriptor {
            transport,
            page_bytes,
            descriptor,
        } => {
            w.u8(DESCRIPTOR);
            w.str(transport);
            w.u64(*page_bytes);
            w.bytes(descriptor);
        }
        Message::Alloc { req_id, chunks } => {
            w.u8(ALLOC);
            w.str(req_id);
            w.u32(chunks.len() as u32);
            for c in chunks {
                w.key(c.key);
                w.u32(c.tokens);
            }
        }
        Message::Allocated { req_id, slots } => {
            w.u8(ALLOCATED);
            w.str(req_id);
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
            w.str(req_id);
            w.u8(match failure {
                AllocFailure::NeverFits => 0,
                AllocFailure::Timeout => 1,
            });
            w.u64(*needed_bytes);
            w.u64(*buffer_bytes);
        }
        Message::Commit { req_id, keys } => {
            w.u8(COMMIT);
            w.str(req_id);
            w.u32(keys.len() as u32);
            for k in keys {
                w.key(*k);
            }
        }
        Message::Committed { req_id } => {
            w.u8(COMMITTED);
            w.str(req_id);
        }
        Message::Abort { req_id } => {
            w.u8(ABORT);
            w.str(req_id);
        }
        Message::Error { reason } => {
            w.u8(ERROR);
            w.str(reason);
        }
        Message::Received { req_id } => {
            w.u8(RECEIVED);
            w.str(req_id);
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
            w.str(req_id);
            w.u8(*ok as u8);
            w.str(error);
            w.u64(*tokens);
            w.u64(*bytes);
            w.u64(*elapsed_us);
        }
    }
    let mut out = Vec::with_capacity(4 + w.0.len());
    out.extend_from_slice(&(w.0.len() as u32).to_le_bytes());
    out.extend_from_slice(&w.0);
    out
}

struct R<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.b.len() < n {
            return Err(ProtocolError::Truncated(self.what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn key(&mut self) -> Result<ChunkKey, ProtocolError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(ChunkKey::from_le_bytes(a))
    }
    fn arr32(&mut self) -> Result<[u8; 32], ProtocolError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn bytes(&mut self, cap: usize) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(ProtocolError::TooLong {
                what: "field",
                len: n,
                cap,
            });
        }
        self.take(n)
    }
    fn str(&mut self) -> Result<String, ProtocolError> {
        std::str::from_utf8(self.bytes(MAX_STR)?)
            .map(str::to_string)
            .map_err(|_| ProtocolError::BadUtf8)
    }
    /// A list count whose items take at least `min_item` bytes each.
    fn count(&mut self, min_item: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_CHUNKS {
            return Err(ProtocolError::TooLong {
                what: "list",
                len: n,
                cap: MAX_CHUNKS,
            });
        }
        if n * min_item > self.b.len() {
            return Err(ProtocolError::Truncated(self.what));
        }
        Ok(n)
    }
}

/// Checks a length prefix; returns the body length.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n == 0 {
        return Err(ProtocolError::Empty);
    }
    if n > MAX_FRAME {
        return Err(ProtocolError::TooLong {
            what: "message",
            len: n,
            cap: MAX_FRAME,
        });
    }
    Ok(n)
}

/// Decodes one message body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLong {
            what: "message",
            len: body.len(),
            cap: MAX_FRAME,
        });
    }
    let (&t, rest) = body.split_first().ok_or(ProtocolError::Empty)?;
    let what = match t {
        CHALLENGE => "challenge",
        HELLO => "hello",
        WELCOME => "welcome",
        REJECT => "reject",
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
    let mut r = R { b: rest, what };
    let msg = match t {
        CHALLENGE => Message::Challenge {
            version: r.u16()?,
            nonce: r.arr32()?,
        },
        HELLO => Message::Hello {
            version: r.u16()?,
            name: r.str()?,
            mac: r.arr32()?,
        },
        WELCOME => Message::Welcome,
        REJECT => Message::Reject { reason: r.str()? },
        GET_DESCRIPTOR => Message::GetDescriptor,
        DESCRIPTOR => Message::Descriptor {
            transport: r.str()?,
            page_bytes: r.u64()?,
            descriptor: r.bytes(MAX_FRAME)?.to_vec(),
        },
        ALLOC => {
            let req_id = r.str()?;
            let n = r.count(20)?;
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                chunks.push(ChunkRequest {
                    key: r.key()?,
                    tokens: r.u32()?,
                });
            }
            Message::Alloc { req_id, chunks }
        }
        ALLOCATED => {
            let req_id = r.str()?;
            let n = r.count(1)?;
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
            req_id: r.str()?,
            failure: match r.u8()? {
                0 => AllocFailure::NeverFits,
                1 => AllocFailure::Timeout,
                _ => return Err(ProtocolError::BadCode("failure")),
            },
            needed_bytes: r.u64()?,
            buffer_bytes: r.u64()?,
        },
        COMMIT => {
            let req_id = r.str()?;
            let n = r.count(16)?;
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push(r.key()?);
            }
            Message::Commit { req_id, keys }
        }
        COMMITTED => Message::Committed { req_id: r.str()? },
        ABORT => Message::Abort { req_id: r.str()? },
        ERROR => Message::Error { reason: r.str()? },
        RECEIVED => Message::Received { req_id: r.str()? },
        _ => Message::TransferDone {
            req_id: r.str()?,
            ok: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(ProtocolError::BadCode("ok")),
            },
            error: r.str()?,
            tokens: r.u64()?,
            bytes: r.u64()?,
            elapsed_us: r.u64()?,
        },
    };
    if !r.b.is_empty() {
        return Err(ProtocolError::Trailing(r.b.len()));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        let k = ChunkKey(0xabcdef);
        vec![
            Message::Challenge {
                version: 1,
                nonce: [3; 32],
            },
            Message::Hello {
                version: 1,
                name: "prefiller-0".into(),
                mac: [4; 32],
            },
            Message::Welcome,
            Message::Reject {
                reason: "wrong secret".into(),
            },
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
                keys: vec![k, k],
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
            let wire = encode(&m);
            assert_eq!(
                body_len([wire[0], wire[1], wire[2], wire[3]]).unwrap(),
                wire.len() - 4
            );
            let body = &wire[4..];
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
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&body), Err(ProtocolError::TooLong { .. })));
        assert!(body_len(u32::MAX.to_le_bytes()).is_err());
    }
}

//! The TCP transport's wire protocol: control frames.
//!
//! Every message is a control frame: `u32` LE body length (at most [`MAX_FRAME`]) then the
//! body, whose first byte is the message type. A `Write` frame is followed on the stream
//! by exactly `len` data bytes, and a `Data` frame likewise; those bytes are not part of
//! the frame and go straight to/from registered memory.
//!
//! Frames follow kvtier's common opening ([`kvtier_transport::handshake`], service
//! `TcpTransport`, protocol [`VERSION`]), which names both ends and proves the shared
//! secret both ways.
//!
//! [`decode`] is total: any input gives a frame or a [`FrameError`], never a panic.

use kvtier_transport::wire::{self, Reader, WireError, Writer};
use kvtier_transport::AccessRefused;

/// Protocol version spoken by this build.
pub const VERSION: u16 = 3;
/// Largest control-frame body.
pub const MAX_FRAME: usize = 128 * 1024;

/// One control frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client → server: `len` data bytes follow, for region `region` at `offset`.
    Write {
        /// Request id, echoed in the `Ack`.
        req: u64,
        /// Destination region.
        region: u64,
        /// Offset in it.
        offset: u64,
        /// Bytes that follow.
        len: u64,
    },
    /// Client → server: send `len` bytes of region `region` at `offset`.
    Read {
        /// Request id, echoed in the `Data`.
        req: u64,
        /// Source region.
        region: u64,
        /// Offset in it.
        offset: u64,
        /// Bytes asked for.
        len: u64,
    },
    /// Client → server: a notification for the server's application.
    Notify {
        /// Request id, echoed in the `Ack`.
        req: u64,
        /// The message.
        message: Vec<u8>,
    },
    /// Client → server, first after the opening: the id the server's write grants know
    /// this connection by (see [`kvtier_transport::access`]).
    Writer {
        /// The connection's writer id (never 0).
        id: u64,
    },
    /// Server → client: request `req` finished.
    Ack {
        /// The request.
        req: u64,
        /// Outcome.
        status: Status,
    },
    /// Server → client: `len` bytes of request `req` follow (len is 0 on failure).
    Data {
        /// The request.
        req: u64,
        /// Outcome.
        status: Status,
        /// Bytes that follow.
        len: u64,
    },
}

/// Outcome of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok,
    /// The range is outside the region (whose length is given; 0 if unknown).
    OutOfBounds {
        /// The region's length.
        region_len: u64,
    },
    /// The range is in bounds but this connection may not access it so.
    Forbidden {
        /// Why.
        reason: AccessRefused,
    },
}

/// Why a frame did not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A malformed field, length or framing.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Unknown message type.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// An unknown status code.
    #[error("unknown status {0}")]
    BadStatus(u8),
    /// A writer id of 0.
    #[error("writer id 0")]
    ZeroWriter,
}

const T_WRITE: u8 = 5;
const T_READ: u8 = 6;
const T_NOTIFY: u8 = 7;
const T_ACK: u8 = 8;
const T_DATA: u8 = 9;
const T_WRITER: u8 = 10;

fn put_status(w: &mut Writer, s: Status) {
    match s {
        Status::Ok => w.u8(0),
        Status::OutOfBounds { region_len } => {
            w.u8(1);
            w.u64(region_len);
        }
        Status::Forbidden { reason } => {
            w.u8(2);
            w.u8(match reason {
                AccessRefused::NoRemoteRead => 0,
                AccessRefused::LocalOnly => 1,
                AccessRefused::NotGranted => 2,
            });
        }
    }
}

/// The frame as it goes on the wire (length prefix included).
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(48));
    match frame {
        Frame::Write {
            req,
            region,
            offset,
            len,
        }
        | Frame::Read {
            req,
            region,
            offset,
            len,
        } => {
            w.u8(if matches!(frame, Frame::Write { .. }) {
                T_WRITE
            } else {
                T_READ
            });
            for v in [req, region, offset, len] {
                w.u64(*v);
            }
        }
        Frame::Notify { req, message } => {
            w.u8(T_NOTIFY);
            w.u64(*req);
            w.raw(message);
        }
        Frame::Writer { id } => {
            w.u8(T_WRITER);
            w.u64(*id);
        }
        Frame::Ack { req, status } => {
            w.u8(T_ACK);
            w.u64(*req);
            put_status(&mut w, *status);
        }
        Frame::Data { req, status, len } => {
            w.u8(T_DATA);
            w.u64(*req);
            put_status(&mut w, *status);
            w.u64(*len);
        }
    }
    w.into_frame()
}

fn status(r: &mut Reader<'_>) -> Result<Status, FrameError> {
    match r.u8()? {
        0 => Ok(Status::Ok),
        1 => Ok(Status::OutOfBounds {
            region_len: r.u64()?,
        }),
        2 => Ok(Status::Forbidden {
            reason: match r.u8()? {
                0 => AccessRefused::NoRemoteRead,
                1 => AccessRefused::LocalOnly,
                2 => AccessRefused::NotGranted,
                s => return Err(FrameError::BadStatus(s)),
            },
        }),
        s => Err(FrameError::BadStatus(s)),
    }
}

/// Checks a frame's length prefix: the body length to read next.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    Ok(wire::frame_len(prefix, MAX_FRAME)?)
}

/// Decodes one frame body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
    wire::check_len(body.len(), MAX_FRAME)?;
    let (&t, rest) = body.split_first().ok_or(WireError::Empty)?;
    let name = match t {
        T_WRITE => "write",
        T_READ => "read",
        T_NOTIFY => "notify",
        T_ACK => "ack",
        T_DATA => "data",
        T_WRITER => "writer",
        other => return Err(FrameError::UnknownType(other)),
    };
    let mut c = Reader::new(rest, name);
    let frame = match t {
        T_WRITE | T_READ => {
            let (req, region, offset, len) = (c.u64()?, c.u64()?, c.u64()?, c.u64()?);
            if t == T_WRITE {
                Frame::Write {
                    req,
                    region,
                    offset,
                    len,
                }
            } else {
                Frame::Read {
                    req,
                    region,
                    offset,
                    len,
                }
            }
        }
        T_NOTIFY => {
            let req = c.u64()?;
            let message = c.rest().to_vec();
            Frame::Notify { req, message }
        }
        T_WRITER => match c.u64()? {
            0 => return Err(FrameError::ZeroWriter),
            id => Frame::Writer { id },
        },
        T_ACK => Frame::Ack {
            req: c.u64()?,
            status: status(&mut c)?,
        },
        _ => Frame::Data {
            req: c.u64()?,
            status: status(&mut c)?,
            len: c.u64()?,
        },
    };
    c.finish()?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Write {
                req: 1,
                region: 2,
                offset: 3,
                len: 4,
            },
            Frame::Read {
                req: 5,
                region: 6,
                offset: 7,
                len: 8,
            },
            Frame::Notify {
                req: 9,
                message: b"done".to_vec(),
            },
            Frame::Ack {
                req: 10,
                status: Status::Ok,
            },
            Frame::Ack {
                req: 11,
                status: Status::OutOfBounds { region_len: 99 },
            },
            Frame::Data {
                req: 12,
                status: Status::Ok,
                len: 4096,
            },
            Frame::Writer { id: 0xfeed },
            Frame::Ack {
                req: 13,
                status: Status::Forbidden {
                    reason: AccessRefused::NotGranted,
                },
            },
            Frame::Data {
                req: 14,
                status: Status::Forbidden {
                    reason: AccessRefused::NoRemoteRead,
                },
                len: 0,
            },
        ]
    }

    #[test]
    fn round_trip_every_frame() {
        for f in all() {
            let wire = encode(&f);
            let len = body_len([wire[0], wire[1], wire[2], wire[3]]).unwrap();
            assert_eq!(len, wire.len() - 4);
            assert_eq!(decode(&wire[4..]).unwrap(), f);
        }
    }

    #[test]
    fn truncations_and_garbage_are_errors() {
        for f in all() {
            let wire = encode(&f);
            let body = &wire[4..];
            // Notify's message is the rest of the frame: every cut is still a frame.
            if !matches!(f, Frame::Notify { .. }) {
                for cut in 0..body.len() {
                    assert!(decode(&body[..cut]).is_err(), "{f:?} cut at {cut}");
                }
            }
        }
        assert_eq!(decode(&[0xee]), Err(FrameError::UnknownType(0xee)));
        assert!(body_len(u32::MAX.to_le_bytes()).is_err());
        assert!(body_len([0; 4]).is_err());
        let mut long = encode(&Frame::Ack {
            req: 1,
            status: Status::Ok,
        })[4..]
            .to_vec();
        long.push(1);
        assert_eq!(decode(&long), Err(FrameError::Wire(WireError::Trailing(1))));
    }
}

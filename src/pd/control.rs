//! P/D control connections: [`FramedConn`]s (framing, caps, handshake and timeouts live in
//! the transport crate) carrying [`Message`]s.

use kvtier_transport::framed::{Codec, FramedConn};

use super::protocol::{self, Message, VERSION};
use super::PdError;

/// The P/D protocol as a codec: the same [`Message`]s both ways.
pub(crate) struct PdCodec;

impl Codec for PdCodec {
    const VERSION: u16 = VERSION;
    type Out = Message;
    type In = Message;
    const MAX_FRAME: usize = protocol::MAX_FRAME;

    fn encode(msg: &Message) -> Vec<u8> {
        protocol::encode(msg)
    }

    fn decode(body: &[u8]) -> Result<Message, Box<dyn std::error::Error + Send + Sync>> {
        Ok(protocol::decode(body)?)
    }
}

/// One P/D control connection, past the handshake.
pub(crate) type ControlConn = FramedConn<PdCodec>;

/// The error for a message from `conn`'s peer that has no business here.
pub(crate) fn unexpected(conn: &ControlConn, msg: &Message) -> PdError {
    match msg {
        Message::Error { reason } => PdError::Remote {
            peer: conn.peer().to_string(),
            reason: reason.clone(),
        },
        other => PdError::Protocol {
            peer: conn.peer().to_string(),
            reason: format!("unexpected {other:?}"),
        },
    }
}

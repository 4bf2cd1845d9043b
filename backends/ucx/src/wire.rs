//! The bytes this transport puts on the wire of its own: the descriptor body (worker
//! address and checksum) and notifications (sender name and message). No UCX calls: what
//! arrives from a peer is checked here before UCX parses any of it.

use kvtier_transport::{Descriptor, Notification, RegionInfo, Result, TransportError};

/// Checksum over the worker address and every region (id, address, length, rkey).
pub fn descriptor_sum(address: &[u8], regions: &[RegionInfo]) -> u64 {
    let mut h = kvtier_transport::Checksum::new();
    h.update(address);
    for r in regions {
        h.update(&r.id.0.to_le_bytes());
        h.update(&r.addr.to_le_bytes());
        h.update(&r.len.to_le_bytes());
        h.update(&(r.key.len() as u64).to_le_bytes());
        h.update(&r.key);
    }
    h.digest()
}

/// The descriptor body: the worker address, then [`descriptor_sum`] (`u64` LE). UCX
/// unpacks worker addresses and rkeys trusting their bytes (a corrupt address can abort
/// the process in an assertion), so [`unseal`] checks the sum before UCX sees them.
pub fn seal(address: &[u8], regions: &[RegionInfo]) -> Vec<u8> {
    let mut body = Vec::with_capacity(address.len() + 8);
    body.extend_from_slice(address);
    body.extend_from_slice(&descriptor_sum(address, regions).to_le_bytes());
    body
}

/// The worker address of a descriptor whose checksum matches.
pub fn unseal(d: &Descriptor) -> Result<&[u8]> {
    let Some((address, sum)) = d.body.split_last_chunk::<8>() else {
        return Err(TransportError::Protocol(
            "ucx descriptor body too short".into(),
        ));
    };
    if address.is_empty() || u64::from_le_bytes(*sum) != descriptor_sum(address, &d.regions) {
        return Err(TransportError::Protocol(
            "ucx descriptor checksum mismatch (corrupt descriptor)".into(),
        ));
    }
    Ok(address)
}

/// Encodes a notification from endpoint `sender`: `u16` LE name length, name, message.
pub fn encode_notification(sender: &str, message: &[u8]) -> Vec<u8> {
    let name = &sender.as_bytes()[..sender.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(2 + name.len() + message.len());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(message);
    out
}

/// Decodes [`encode_notification`]'s bytes.
pub fn decode_notification(bytes: &[u8]) -> Result<Notification> {
    let bad = |what: &str| TransportError::Protocol(format!("ucx notification: {what}"));
    let (len, rest) = bytes.split_at_checked(2).ok_or_else(|| bad("truncated"))?;
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    let (name, message) = rest
        .split_at_checked(len)
        .ok_or_else(|| bad("truncated name"))?;
    if message.len() > kvtier_transport::MAX_NOTIFICATION {
        return Err(bad(&format!("{} bytes message", message.len())));
    }
    let peer = String::from_utf8(name.to_vec()).map_err(|_| bad("sender name is not UTF-8"))?;
    Ok(Notification {
        peer,
        message: message.to_vec(),
    })
}

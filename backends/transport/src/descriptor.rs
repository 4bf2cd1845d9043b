//! Endpoint descriptors: what a peer needs to reach a transport endpoint.
//!
//! Encoding, little-endian, in order:
//! - magic `KVTD` and version (`u16`, 1);
//! - transport kind: `u8` length, then ASCII;
//! - endpoint name: `u16` length, then UTF-8;
//! - region count (`u32`), then per region `id u64, addr u64, len u64` and a key
//!   (`u32` length, then bytes: a packed rkey for UCX, empty otherwise);
//! - the transport-specific body: `u32` length, then bytes.
//!
//! Decoding checks every length against the input and the caps below: it never panics
//! and never allocates more than the input justifies.

use crate::wire::{Reader, WireError, Writer};
use crate::{RegionId, Result, TransportError};

const MAGIC: &[u8; 4] = b"KVTD";
const VERSION: u16 = 1;
/// Most regions a descriptor may list.
pub const MAX_REGIONS: usize = 65_536;
/// Largest descriptor accepted, in bytes.
pub const MAX_DESCRIPTOR: usize = 16 << 20;

/// One registered region as a peer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region's id.
    pub id: RegionId,
    /// Its address in the owner's address space (used by one-sided transports).
    pub addr: u64,
    /// Its length.
    pub len: u64,
    /// Transport-specific key (UCX packed rkey), may be empty.
    pub key: Vec<u8>,
}

/// A decoded endpoint descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Transport kind (`tcp`, `ucx`, `nixl`).
    pub kind: String,
    /// Endpoint name, unique per transport instance.
    pub name: String,
    /// Registered regions.
    pub regions: Vec<RegionInfo>,
    /// Transport-specific bytes (address, worker address, agent metadata).
    pub body: Vec<u8>,
}

impl Descriptor {
    /// The descriptor's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(
            64 + self.body.len() + self.regions.len() * 32,
        ));
        w.raw(MAGIC);
        w.u16(VERSION);
        w.u8(self.kind.len() as u8);
        w.raw(&self.kind.as_bytes()[..self.kind.len().min(255)]);
        w.bytes16(self.name.as_bytes());
        w.u32(self.regions.len() as u32);
        for r in &self.regions {
            w.u64(r.id.0);
            w.u64(r.addr);
            w.u64(r.len);
            w.bytes32(&r.key);
        }
        w.bytes32(&self.body);
        w.0
    }

    /// Decodes and validates `bytes`, expecting transport `kind`.
    pub fn decode(bytes: &[u8], kind: &str) -> Result<Descriptor> {
        Self::decode_wire(bytes, kind).map_err(|e| match e {
            DecodeError::Wire(e) => bad(e.to_string()),
            DecodeError::Other(msg) => bad(msg),
        })
    }

    fn decode_wire(bytes: &[u8], kind: &str) -> Result<Descriptor, DecodeError> {
        if bytes.len() > MAX_DESCRIPTOR {
            return Err(DecodeError::Other(format!(
                "{} bytes exceeds the {MAX_DESCRIPTOR}-byte cap",
                bytes.len()
            )));
        }
        let mut r = Reader::new(bytes, "descriptor");
        if r.take(4)? != MAGIC {
            return Err(DecodeError::Other(
                "not a kvtier endpoint descriptor (bad magic)".into(),
            ));
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(DecodeError::Other(format!(
                "descriptor version {version}, this build reads {VERSION}"
            )));
        }
        let klen = r.u8()? as usize;
        let found = std::str::from_utf8(r.take(klen)?)
            .map_err(|_| WireError::BadUtf8)?
            .to_string();
        if found != kind {
            return Err(DecodeError::Other(format!(
                "descriptor is for transport `{found}`, not `{kind}`"
            )));
        }
        let name = r.str(u16::MAX as usize, false)?;
        let count = r.count(MAX_REGIONS, 28)?;
        let mut regions = Vec::with_capacity(count);
        for _ in 0..count {
            let id = RegionId(r.u64()?);
            let addr = r.u64()?;
            let len = r.u64()?;
            let key = r.bytes32(MAX_DESCRIPTOR)?.to_vec();
            regions.push(RegionInfo { id, addr, len, key });
        }
        let body = r.bytes32(MAX_DESCRIPTOR)?.to_vec();
        r.finish()?;
        Ok(Descriptor {
            kind: found,
            name,
            regions,
            body,
        })
    }

    /// The region `id`, if listed.
    pub fn region(&self, id: RegionId) -> Option<&RegionInfo> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// Checks a transfer before anything is sent: `local` and `remote` pair up, every
    /// local range lies in its registration (`LocalIov`'s fields are public, so this does
    /// not trust how it was built), and every remote range lies in a region this
    /// descriptor lists. Returns the remote regions, in order.
    pub fn check_transfer(
        &self,
        local: &[crate::LocalIov<'_>],
        remote: &[crate::RemoteIov],
    ) -> Result<Vec<&RegionInfo>> {
        crate::check_pairs(local, remote)?;
        local
            .iter()
            .zip(remote)
            .map(|(l, r)| {
                if l.offset
                    .checked_add(l.len)
                    .is_none_or(|end| end > l.region.len())
                {
                    return Err(TransportError::OutOfBounds {
                        region: l.region.id(),
                        offset: l.offset as u64,
                        len: l.len as u64,
                        region_len: l.region.len() as u64,
                    });
                }
                self.check_range(r.region, r.offset, r.len)
            })
            .collect()
    }

    /// Checks `offset..offset+len` against region `id`'s bounds.
    pub fn check_range(&self, id: RegionId, offset: u64, len: u64) -> Result<&RegionInfo> {
        let region = self.region(id);
        let region_len = region.map_or(0, |r| r.len);
        match (region, offset.checked_add(len)) {
            (Some(r), Some(end)) if end <= r.len => Ok(r),
            _ => Err(TransportError::OutOfBounds {
                region: id,
                offset,
                len,
                region_len,
            }),
        }
    }
}

enum DecodeError {
    Wire(WireError),
    Other(String),
}

impl From<WireError> for DecodeError {
    fn from(e: WireError) -> Self {
        DecodeError::Wire(e)
    }
}

fn bad(msg: String) -> TransportError {
    TransportError::Protocol(format!("descriptor: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptor {
        Descriptor {
            kind: "tcp".into(),
            name: "node-a/1".into(),
            regions: vec![RegionInfo {
                id: RegionId(3),
                addr: 0x1000,
                len: 4096,
                key: vec![1, 2, 3],
            }],
            body: b"127.0.0.1:7000".to_vec(),
        }
    }

    #[test]
    fn round_trip_and_range_checks() {
        let d = sample();
        let back = Descriptor::decode(&d.encode(), "tcp").unwrap();
        assert_eq!(back, d);
        assert!(back.check_range(RegionId(3), 4000, 96).is_ok());
        assert!(back.check_range(RegionId(3), 4000, 97).is_err());
        assert!(back.check_range(RegionId(3), u64::MAX, 2).is_err());
        assert!(back.check_range(RegionId(4), 0, 1).is_err());
    }

    #[test]
    fn every_truncation_and_wrong_kind_is_an_error() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Descriptor::decode(&bytes[..cut], "tcp").is_err());
        }
        assert!(Descriptor::decode(&bytes, "ucx").is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(Descriptor::decode(&long, "tcp").is_err());
    }
}

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
        let mut out = Vec::with_capacity(64 + self.body.len() + self.regions.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.kind.len() as u8);
        out.extend_from_slice(self.kind.as_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            out.extend_from_slice(&r.id.0.to_le_bytes());
            out.extend_from_slice(&r.addr.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
            out.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
            out.extend_from_slice(&r.key);
        }
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes and validates `bytes`, expecting transport `kind`.
    pub fn decode(bytes: &[u8], kind: &str) -> Result<Descriptor> {
        if bytes.len() > MAX_DESCRIPTOR {
            return Err(bad(format!(
                "{} bytes exceeds the {MAX_DESCRIPTOR}-byte cap",
                bytes.len()
            )));
        }
        let mut r = Reader { buf: bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(bad("not a kvtier endpoint descriptor (bad magic)".into()));
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(bad(format!(
                "descriptor version {version}, this build reads {VERSION}"
            )));
        }
        let klen = r.u8()? as usize;
        let found = r.str(klen)?;
        if found != kind {
            return Err(bad(format!(
                "descriptor is for transport `{found}`, not `{kind}`"
            )));
        }
        let nlen = r.u16()? as usize;
        let name = r.str(nlen)?;
        let count = r.u32()? as usize;
        if count > MAX_REGIONS || count * 28 > r.remaining() {
            return Err(bad(format!("{count} regions do not fit the descriptor")));
        }
        let mut regions = Vec::with_capacity(count);
        for _ in 0..count {
            let id = RegionId(r.u64()?);
            let addr = r.u64()?;
            let len = r.u64()?;
            let key_len = r.u32()? as usize;
            let key = r.take(key_len)?.to_vec();
            regions.push(RegionInfo { id, addr, len, key });
        }
        let body_len = r.u32()? as usize;
        let body = r.take(body_len)?.to_vec();
        if r.remaining() != 0 {
            return Err(bad(format!("{} trailing bytes", r.remaining())));
        }
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

fn bad(msg: String) -> TransportError {
    TransportError::Protocol(format!("descriptor: {msg}"))
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(bad(format!(
                "truncated: needs {n} more bytes, {} left",
                self.remaining()
            )));
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self, n: usize) -> Result<String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| bad("name is not UTF-8".into()))
    }
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

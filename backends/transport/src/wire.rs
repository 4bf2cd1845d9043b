//! Little-endian field encoding shared by kvtier's wire formats (endpoint descriptors, the
//! TCP transport's frames, the P/D control plane): a [`Writer`] that appends fields and a
//! [`Reader`] that takes them back without ever panicking or reading past its input.

/// Why a field could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame with no body.
    #[error("empty frame")]
    Empty,
    /// The input ended inside a field of this message.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Bytes left after the last field.
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
    /// A string field that is not UTF-8.
    #[error("string field is not UTF-8")]
    BadUtf8,
}

/// Appends little-endian fields to a byte vector.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// `u16` LE.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// `u32` LE.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// `u64` LE.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Raw bytes, no length.
    pub fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// `u16` length, then the bytes (at most `u16::MAX` of them are written).
    pub fn bytes16(&mut self, b: &[u8]) {
        let b = &b[..b.len().min(u16::MAX as usize)];
        self.u16(b.len() as u16);
        self.raw(b);
    }
    /// `u32` length, then the bytes.
    pub fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.raw(b);
    }
    /// A string cut to at most `cap` bytes on a character boundary, with a `u16` or `u32`
    /// length prefix (`wide`).
    pub fn str(&mut self, s: &str, cap: usize, wide: bool) {
        let mut n = s.len().min(cap);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        if wide {
            self.bytes32(&s.as_bytes()[..n]);
        } else {
            self.bytes16(&s.as_bytes()[..n]);
        }
    }
    /// The bytes with a `u32` LE length prefix in front: one frame.
    pub fn into_frame(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.0.len());
        out.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.0);
        out
    }
}

/// Takes little-endian fields from the front of a byte slice.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; `what` names the message in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }
    /// Bytes not yet taken.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// Everything not yet taken.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    /// `u16` LE.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_le_bytes)
    }
    /// `u32` LE.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_le_bytes)
    }
    /// `u64` LE.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_le_bytes)
    }
    /// `u16` length (at most `cap`), then that many bytes.
    pub fn bytes16(&mut self, cap: usize) -> Result<&'a [u8], WireError> {
        let n = self.u16()? as usize;
        self.capped(n, cap)
    }
    /// `u32` length (at most `cap`), then that many bytes.
    pub fn bytes32(&mut self, cap: usize) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.capped(n, cap)
    }
    fn capped(&mut self, n: usize, cap: usize) -> Result<&'a [u8], WireError> {
        if n > cap {
            return Err(WireError::TooLong {
                what: "field",
                len: n,
                cap,
            });
        }
        self.take(n)
    }
    /// A UTF-8 string with a `u16` or `u32` (`wide`) length of at most `cap`.
    pub fn str(&mut self, cap: usize, wide: bool) -> Result<String, WireError> {
        let b = if wide {
            self.bytes32(cap)?
        } else {
            self.bytes16(cap)?
        };
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| WireError::BadUtf8)
    }
    /// A `u32` item count, at most `cap`, whose items take at least `min_item` bytes each
    /// (so a huge count in a short input is refused before anything is allocated).
    pub fn count(&mut self, cap: usize, min_item: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(WireError::TooLong {
                what: "list",
                len: n,
                cap,
            });
        }
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(WireError::Truncated(self.what));
        }
        Ok(n)
    }
    /// Succeeds only if every byte was taken.
    pub fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.buf.len()))
        }
    }
}

/// Checks a `u32` LE length prefix against `1..=cap`; returns the body length.
pub fn frame_len(prefix: [u8; 4], cap: usize) -> Result<usize, WireError> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n == 0 {
        return Err(WireError::Empty);
    }
    check_len(n, cap)?;
    Ok(n)
}

/// Checks a frame body's length against `cap`.
pub fn check_len(len: usize, cap: usize) -> Result<(), WireError> {
    if len > cap {
        return Err(WireError::TooLong {
            what: "frame",
            len,
            cap,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_misuse_is_an_error() {
        let mut w = Writer::default();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.str("héllo", 2, false);
        w.bytes32(b"xyz");
        let bytes = w.0.clone();
        let mut r = Reader::new(&bytes, "test");
        assert_eq!(
            (r.u8(), r.u16(), r.u32(), r.u64()),
            (Ok(1), Ok(2), Ok(3), Ok(4))
        );
        assert_eq!(r.str(16, false).unwrap(), "h"); // cut on a character boundary
        assert_eq!(r.bytes32(3).unwrap(), b"xyz");
        r.finish().unwrap();
        for cut in 0..bytes.len() {
            let mut r = Reader::new(&bytes[..cut], "test");
            let all = (|| {
                r.u8()?;
                r.u16()?;
                r.u32()?;
                r.u64()?;
                r.str(16, false)?;
                r.bytes32(3)
            })();
            assert!(all.is_err(), "cut {cut}");
        }
        let mut r = Reader::new(&[255, 255, 255, 255, 0], "t");
        assert!(r.count(1 << 20, 1).is_err());
        assert!(frame_len(u32::MAX.to_le_bytes(), 1024).is_err());
        assert!(frame_len([0; 4], 1024).is_err());
    }
}

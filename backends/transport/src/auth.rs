//! Shared-secret authentication for control and data connections.
//!
//! The accepting side sends a fresh random nonce; the connecting side answers with
//! HMAC-SHA256(secret, context ‖ nonce); the accepting side checks it in constant time.
//! Without a configured secret the MAC is all zeros and any answer is accepted. The
//! secret itself never crosses the wire.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A fresh random nonce.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("OS random source");
    n
}

/// The answer to `nonce` for `secret` (all zeros without one). `context` separates
/// protocols (e.g. `b"kvtier-tcp-v1"`), so an answer for one is useless for another.
pub fn respond(secret: Option<&str>, context: &[u8], nonce: &[u8; 32]) -> [u8; 32] {
    match secret {
        None => [0; 32],
        Some(s) => {
            let mut m = Hmac::<Sha256>::new_from_slice(s.as_bytes()).expect("HMAC takes any key");
            m.update(context);
            m.update(nonce);
            m.finalize().into_bytes().into()
        }
    }
}

/// Whether `answer` proves knowledge of `secret` for `nonce` (always true without a secret).
pub fn verify(secret: Option<&str>, context: &[u8], nonce: &[u8; 32], answer: &[u8; 32]) -> bool {
    match secret {
        None => true,
        Some(s) => {
            let mut m = Hmac::<Sha256>::new_from_slice(s.as_bytes()).expect("HMAC takes any key");
            m.update(context);
            m.update(nonce);
            m.verify_slice(answer).is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_secret_verifies_wrong_does_not() {
        let n = nonce();
        let ok = respond(Some("k"), b"ctx", &n);
        assert!(verify(Some("k"), b"ctx", &n, &ok));
        assert!(!verify(Some("k"), b"other", &n, &ok));
        assert!(!verify(Some("k"), b"ctx", &nonce(), &ok));
        assert!(!verify(
            Some("k"),
            b"ctx",
            &n,
            &respond(Some("j"), b"ctx", &n)
        ));
        assert!(!verify(Some("k"), b"ctx", &n, &respond(None, b"ctx", &n)));
        assert!(verify(None, b"ctx", &n, &[7; 32]));
    }
}

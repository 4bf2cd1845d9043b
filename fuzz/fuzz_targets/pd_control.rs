//! Any bytes as a P/D control-plane message: a message that re-encodes to the same
//! bytes, or an error, never a panic.
#![no_main]

use kvtier::pd::protocol::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode(data) {
        let wire = encode(&msg);
        assert_eq!(decode(&wire).as_ref(), Ok(&msg));
    }
});

//! Any bytes as a TCP transport control frame: a frame that re-encodes to the same bytes,
//! or an error, never a panic.
#![no_main]

use kvtier_tcp::protocol::{body_len, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = body_len([data[0], data[1], data[2], data[3]]);
    }
    if let Ok(frame) = decode(data) {
        let wire = encode(&frame);
        assert_eq!(decode(&wire[4..]).as_ref(), Ok(&frame));
    }
});

//! Any bytes as a transport endpoint descriptor: a descriptor that re-encodes to the same
//! bytes, or an error, never a panic.
#![no_main]

use kvtier_transport::Descriptor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in ["tcp", "ucx", "nixl"] {
        if let Ok(d) = Descriptor::decode(data, kind) {
            assert_eq!(d.encode(), data);
        }
    }
});

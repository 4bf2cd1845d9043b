//! Any bytes as a UCX descriptor (body: worker address and checksum) or a UCX
//! notification: the checks in front of UCX accept exactly what re-encodes to the same
//! bytes, never panic, and no unchecked byte reaches UCX's own parsers.
#![no_main]

use kvtier_transport::Descriptor;
use kvtier_ucx::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Descriptor::decode(data, "ucx") {
        if let Ok(address) = wire::unseal(&d) {
            // Accepted only when the body is exactly what the owner sealed.
            assert!(!address.is_empty());
            assert_eq!(wire::seal(address, &d.regions), d.body);
        }
    }
    if let Ok(n) = wire::decode_notification(data) {
        assert_eq!(wire::encode_notification(&n.peer, &n.message), data);
    }
});

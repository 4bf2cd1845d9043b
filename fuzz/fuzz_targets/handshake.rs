//! Any bytes as the other side of kvtier's opening handshake, on the accepting side (the
//! bytes are a client's preface and proof) and on the connecting side (a server's
//! greeting and verdict): an error or a finished handshake, never a panic or a hang.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use kvtier_transport::handshake::{self, Hello, Service, MAGIC};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Runs one side against `peer_bytes`, the whole of what the other side ever sends.
async fn side(peer_bytes: &[u8], accepting: bool, secret: Option<&str>) -> bool {
    let (mut ours, mut theirs) = tokio::io::duplex(1 << 16);
    theirs.write_all(peer_bytes).await.unwrap();
    // The peer stops sending (and reading): the handshake must end on what it has.
    drop(theirs);
    let hello = Hello {
        service: Service::PdReceiver,
        version: 3,
        name: "fuzz",
        secret,
    };
    let t = Duration::from_secs(5);
    let done = if accepting {
        handshake::accept(&mut ours, "peer", hello, t).await
    } else {
        handshake::connect(&mut ours, "peer", hello, t).await
    };
    done.is_ok()
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        for secret in [None, Some("k")] {
            if side(data, true, secret).await {
                // Accepted: the bytes opened with kvtier's magic, and with a secret no
                // forged proof gets in (a fresh nonce each time).
                assert!(data.starts_with(MAGIC));
                assert!(secret.is_none());
            }
            if side(data, false, secret).await {
                assert!(data.starts_with(MAGIC));
                assert!(secret.is_none());
            }
        }
    });
});

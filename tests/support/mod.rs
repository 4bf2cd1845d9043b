//! Helpers shared by the integration tests.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

/// `n` distinct ports on 127.0.0.1, each free when chosen and never handed out before by
/// this test process. They lie between 20000 (vLLM's fixed ports are below) and the
/// kernel's ephemeral range: a port the kernel picked for `127.0.0.1:0` can be taken by any
/// outgoing connection of a parallel test before the child process binds it.
pub fn free_ports(n: usize) -> Vec<u16> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .clamp(20002, 65535);
    let span = ephemeral_low - 20000;
    let mut handed = HANDED_OUT.lock().unwrap();
    let handed = handed.get_or_insert_with(HashSet::new);
    let mut ports = Vec::with_capacity(n);
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        assert!(
            tries < 100_000,
            "no free port between 20000 and {ephemeral_low}"
        );
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = (20000 + random % u64::from(span)) as u16;
        if handed.contains(&port) || std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        handed.insert(port);
        ports.push(port);
    }
    ports
}

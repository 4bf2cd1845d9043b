//! Helpers shared by the integration tests.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

/// `n` distinct ports on 127.0.0.1, each free when chosen and never handed out before by
/// this test process. They lie outside the kernel's ephemeral range — between 20000
/// (vLLM's fixed ports are below) and its start, or above its end where it starts lower:
/// a port the kernel picked for `127.0.0.1:0` can be taken by any outgoing connection of
/// a parallel test before the child process binds it.
pub fn free_ports(n: usize) -> Vec<u16> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral: Vec<u32> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let (low, high) = match ephemeral[..] {
        [low, high] => (low, high),
        _ => (32768, 60999),
    };
    // Below the ephemeral range when it leaves room there, else above it, else anywhere.
    let (first, end) = if low >= 21_000 {
        (20_000, low)
    } else if high <= 64_535 {
        (high + 1, 65_536)
    } else {
        (20_000, 65_536)
    };
    let span = u64::from(end - first);
    let mut handed = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let handed = handed.get_or_insert_with(HashSet::new);
    let mut ports = Vec::with_capacity(n);
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        assert!(tries < 100_000, "no free port in {first}..{end}");
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = (u64::from(first) + random % span) as u16;
        if handed.contains(&port) || std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        handed.insert(port);
        ports.push(port);
    }
    ports
}

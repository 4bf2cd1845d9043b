//! Any bytes given to the chunk decoder: an error or a chunk that re-encodes to the same
//! bytes, never a panic.
#![no_main]

use kvtier::chunk::{decode_chunk, encode_chunk, ChunkHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ChunkHeader::decode(data);
    if let Ok((header, payload)) = decode_chunk(data) {
        assert_eq!(payload.len() as u64, header.payload_len);
        assert_eq!(encode_chunk(header.key, header.shape, payload), data);
    }
});

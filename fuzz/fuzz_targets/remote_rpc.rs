//! The remote store's control messages (master and node requests and answers, segment
//! records read from etcd): decoding arbitrary bytes never panics, and whatever decodes
//! re-encodes to a message that decodes to itself.
#![no_main]

use kvtier::remote::rpc::{
    decode_request, decode_response, encode_request, encode_response, SegmentInfo,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_request(data) {
        assert_eq!(decode_request(&encode_request(&req)).unwrap(), req);
    }
    if let Ok(resp) = decode_response(data) {
        assert_eq!(decode_response(&encode_response(&resp)).unwrap(), resp);
    }
    if let Ok(seg) = SegmentInfo::decode(data) {
        assert_eq!(SegmentInfo::decode(&seg.encode()).unwrap(), seg);
    }
});

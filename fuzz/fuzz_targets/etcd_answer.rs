//! Any answer from etcd's JSON gateway — any status, any body — to each call kvtier makes
//! (lease grant, keep-alive and revoke, put, get, list, delete, the create-if-absent
//! transaction leader election uses; with and without etcd authentication), and what
//! the master does with listed values (segment records): an error or a value, never a
//! panic.
//!
//! The answers come from this target's own HTTP/1.1 server on 127.0.0.1, which answers
//! every request with the input's status and body.
#![no_main]

#[path = "common/loopback.rs"]
mod loopback;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvtier::remote::etcd::Etcd;
use kvtier::remote::rpc::SegmentInfo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const STATUSES: [u16; 6] = [200, 400, 401, 404, 500, 503];

type Answer = Arc<Mutex<(u16, Vec<u8>)>>;

/// Reads one request (head and `Content-Length` body); false at the end of the stream.
async fn read_request<R: AsyncBufReadExt + Unpin>(r: &mut R) -> bool {
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                len = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.is_ok()
}

async fn serve(listener: TcpListener, answer: Answer) {
    loopback::serve_each(listener, move |mut r, mut w| {
        let answer = answer.clone();
        async move {
            while read_request(&mut r).await {
                let (status, body) = answer.lock().unwrap().clone();
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                out.extend_from_slice(&body);
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        }
    })
    .await
}

fuzz_target!(|data: &[u8]| {
    let Some((&[op, status, auth], body)) = data.split_first_chunk::<3>() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer: Answer = Arc::new(Mutex::new((
            STATUSES[status as usize % STATUSES.len()],
            body.to_vec(),
        )));
        tokio::spawn(serve(listener, answer));
        let url = if auth & 1 == 0 {
            format!("etcd://127.0.0.1:{port}/fuzz")
        } else {
            format!("etcd://user:secret@127.0.0.1:{port}/fuzz")
        };
        let etcd = Etcd::new(&url, Duration::from_secs(2)).unwrap();
        match op % 8 {
            0 => {
                let _ = etcd.grant(5).await;
            }
            1 => {
                let _ = etcd.keep_alive(7).await;
            }
            2 => {
                let _ = etcd.revoke(7).await;
            }
            3 => {
                let _ = etcd.put(&etcd.key("k"), b"v", Some(7)).await;
            }
            4 => {
                let _ = etcd.get(&etcd.key("master")).await;
            }
            5 => {
                if let Ok(listed) = etcd.list("segments/").await {
                    for (_, value) in listed {
                        let _ = SegmentInfo::decode(&value);
                    }
                }
            }
            6 => {
                let _ = etcd.delete(&etcd.key("k")).await;
            }
            _ => {
                let _ = etcd.create(&etcd.key("master"), b"127.0.0.1:1", 7).await;
            }
        }
    });
});

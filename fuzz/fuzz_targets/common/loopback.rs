//! A stand-in server's accept loop on 127.0.0.1, for targets that fuzz what a peer answers.

use std::future::Future;

use tokio::io::BufReader;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpListener;

/// Serves every connection of `listener` with `conn` (buffered reader, writer), each on
/// its own task, with Nagle off (a stand-in must not add delayed-ACK waits to each run).
pub async fn serve_each<F, Fut>(listener: TcpListener, conn: F)
where
    F: Fn(BufReader<OwnedReadHalf>, OwnedWriteHalf) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        tokio::spawn(conn(BufReader::new(r), w));
    }
}

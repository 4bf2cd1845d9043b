//! What the HTTP apps (proxy, test server) share: serving with a shutdown grace, waiting
//! for a stop signal, the body limit.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::error::{Error, Result};

/// Largest request body the proxy accepts (long prompts as token-id arrays are large).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and gives
/// in-flight requests (streamed bodies included) at most `grace` to finish.
pub(crate) async fn serve_with_grace(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    what: &'static str,
    addr: SocketAddr,
) -> Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        r = server => r.map_err(|e| Error::Listen {
            op: "serve HTTP on",
            addr: addr.to_string(),
            source: e,
        }),
        _ = async {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            tracing::info!("{what}: shutting down, waiting up to {grace:?} for in-flight responses");
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("{what}: responses still open after {grace:?}; closing them");
            Ok(())
        }
    }
}

/// Waits for Ctrl+C (SIGINT) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

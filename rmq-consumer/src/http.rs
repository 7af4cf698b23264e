//! The optional HTTP listener: `/metrics` (Prometheus text), `/livez`, `/readyz`.

//!
//! Anyone who can reach the port can connect, so the listener bounds what a client can hold:
//! at most [`MAX_CONNECTIONS`] connections (more are closed at once), request headers within
//! [`HEADER_READ_TIMEOUT`] and [`MAX_HEADER_BYTES`], and any connection at most
//! [`CONNECTION_LIFETIME`].

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::health::{Health, HealthSnapshot};

/// Connections served at once; one more is closed as soon as it is accepted.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a request's headers (slow senders are disconnected).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// A connection's whole lifetime, keep-alive included.
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds the listener (so a bad address fails the start, not later).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, health: Arc<Health>, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(health);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    let mut refused_logged = false;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error = %error, "the HTTP listener could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if !refused_logged {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "the HTTP listener is at its connection cap; closing new connections"
                );
                refused_logged = true;
            }
            drop(stream);
            continue;
        };
        refused_logged = false;
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                // Errors here are the client's (a reset, a timeout, a bad request): not ours
                // to log.
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
                () = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(&health),
    )
}

async fn livez(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    verdict(liveness(&health.snapshot()))
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    let mut problems = readiness(&health.snapshot());
    problems.extend(
        health
            .store
            .get()
            .map(|store| store.readiness())
            .unwrap_or_default(),
    );
    verdict(problems)
}

fn verdict(problems: Vec<String>) -> (StatusCode, String) {
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

/// Why the process cannot make progress (empty: alive). A broker outage is not one: the
/// engine reconnects by itself, so restarting the process would not help.
pub(crate) fn liveness(snapshot: &HealthSnapshot) -> Vec<String> {
    let mut problems = Vec::new();
    if snapshot.healing_failed {
        problems.push("a consumer is stuck and the watchdog could not heal it".to_owned());
    }
    problems
}

/// Why the worker should not receive traffic now (empty: ready).
pub(crate) fn readiness(snapshot: &HealthSnapshot) -> Vec<String> {
    let mut problems = Vec::new();
    if !snapshot.connected {
        problems.push("not connected to the broker".to_owned());
    }
    if snapshot.blocked {
        problems.push("the broker blocks this connection (resource alarm)".to_owned());
    }
    if snapshot.draining {
        problems.push("shutting down".to_owned());
    }
    for handler in &snapshot.handlers {
        if !handler.consuming {
            problems.push(format!(
                "handler `{}` is not consuming `{}`",
                handler.name, handler.queue
            ));
        }
    }
    problems
}

//! The optional HTTP listener: `/metrics` (Prometheus text), `/livez`, `/readyz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::{Health, HealthSnapshot};

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
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(error) = served {
        tracing::error!(error = %error, "the HTTP listener failed");
    }
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
    verdict(readiness(&health.snapshot()))
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

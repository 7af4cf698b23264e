//! The engine under test: a base configuration and an engine spawned on the test's runtime.

use std::time::{Duration, Instant};

use rmq_consumer::{Config, Engine, HealthHandle, config::SecretUrl};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::env::broker_url;

/// A base configuration for tests: the test broker, a unique exchange, fast timeouts.
pub fn test_config(exchange: &str) -> Config {
    Config {
        urls: vec![SecretUrl::new(broker_url())],
        exchange: exchange.to_owned(),
        retry_connect_interval: Duration::from_millis(500),
        retry_connect_max: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(10),
        confirm_timeout: Duration::from_secs(10),
        ..Config::default()
    }
}

/// A running engine, spawned on the test's runtime.
#[derive(Debug)]
pub struct Running {
    /// The engine's shutdown token: cancelling it starts a graceful shutdown.
    pub stop: CancellationToken,
    /// The engine's health, for snapshots.
    pub health: HealthHandle,
    /// The task running [`Engine::run`], with its result.
    pub task: JoinHandle<Result<(), rmq_consumer::Error>>,
}

impl Running {
    /// Builds and spawns an engine with the given handlers, then waits until each consumes.
    pub async fn start(config: Config, only: &[&str]) -> Self {
        let engine = Engine::builder(config)
            .only(only.iter().copied())
            .build()
            .unwrap();
        let stop = engine.shutdown_token();
        let health = engine.health();
        let task = tokio::spawn(engine.run());
        let running = Self { stop, health, task };
        running.wait_consuming(Duration::from_secs(20)).await;
        running
    }

    /// Waits until the engine is connected and every handler consumes; panics with the last
    /// health snapshot at `timeout`.
    pub async fn wait_consuming(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let snapshot = self.health.snapshot();
            if snapshot.connected && snapshot.handlers.iter().all(|h| h.consuming) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "engine not consuming after {timeout:?}: {snapshot:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the engine has reconnected more than `before` times (a count read from an
    /// earlier snapshot) and is connected with its first handler consuming again.
    pub fn reconnected_since(&self, before: u64) -> bool {
        let s = self.health.snapshot();
        s.reconnects > before && s.connected && s.handlers[0].consuming
    }

    /// Shuts down gracefully and returns the engine's result.
    pub async fn stop(self) -> Result<(), rmq_consumer::Error> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("engine did not stop within 30 s")
            .expect("engine task panicked")
    }
}

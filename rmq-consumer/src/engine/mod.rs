//! The engine: connection supervisor, one consumer per handler, bounded concurrency, drain on
//! shutdown. Only the engine settles deliveries.

mod acks;
pub(crate) mod redelivery;
pub(crate) mod settings;
mod watchdog;
mod worker;

use std::{num::NonZeroUsize, sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{Connection, Event};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use crate::{
    cache::ResultCache,
    config::Config,
    connection,
    error::{Error, SetupError},
    health::{Health, HealthHandle},
    publisher::Publisher,
    registry::{self, HandlerSpec},
    topology,
};
use worker::{Stop, Worker};

/// A configured set of handlers, ready to [`run`](Engine::run).
///
/// [`crate::run`] builds one from every registered handler; tests and embedders use
/// [`Engine::builder`] to pick handlers and to keep a [`shutdown`](Engine::shutdown_token)
/// token and a [`health`](Engine::health) handle.
///
/// ```no_run
/// # async fn demo() -> Result<(), rmq_consumer::Error> {
/// let config = rmq_consumer::Config::load()?;
/// let engine = rmq_consumer::Engine::builder(config).only(["summarize"]).build()?;
/// let stop = engine.shutdown_token();
/// let health = engine.health();
/// let running = tokio::spawn(engine.run());
/// // ... later
/// println!("{:?}", health.snapshot());
/// stop.cancel();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Engine {
    config: Arc<Config>,
    workers: Vec<Arc<Worker>>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    trackers: Arc<std::sync::Mutex<Vec<watchdog::Tracker>>>,
}

/// Builds an [`Engine`].
#[derive(Debug)]
pub struct EngineBuilder {
    config: Config,
    specs: Vec<&'static HandlerSpec>,
    only: Option<Vec<String>>,
    shutdown: Option<CancellationToken>,
}

impl EngineBuilder {
    /// Runs only the handlers with these names.
    #[must_use]
    pub fn only<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.only = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Uses this cancellation token for shutdown instead of a fresh one.
    #[must_use]
    pub fn shutdown_token(mut self, token: CancellationToken) -> Self {
        self.shutdown = Some(token);
        self
    }

    /// Matches the handlers with the configuration.
    ///
    /// # Errors
    /// [`SetupError`]: no handlers, two on one queue, a config section for an unknown handler,
    /// a name that is not a valid AMQP name, ...
    pub fn build(self) -> Result<Engine, Error> {
        let mut specs = self.specs.clone();
        if let Some(only) = &self.only {
            for name in only {
                if !specs.iter().any(|s| s.name == name) {
                    return Err(SetupError::UnknownConsumer {
                        name: name.clone(),
                        known: specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
                    }
                    .into());
                }
            }
            specs.retain(|s| only.iter().any(|n| n == s.name));
        }
        let mut config = self.config;
        if self.only.is_some() {
            config
                .consumers
                .retain(|name, _| specs.iter().any(|s| s.name == name));
        }
        let all = settings::resolve(&config, &specs)?;
        let health = Arc::new(Health::new(
            all.iter().map(|s| (s.name.clone(), s.queue.clone())),
        ));
        let cache_size = NonZeroUsize::new(config.result_cache_size).unwrap_or(NonZeroUsize::MIN);
        let workers = all
            .into_iter()
            .enumerate()
            .map(|(index, settings)| {
                Arc::new(Worker {
                    semaphore: Arc::new(Semaphore::new(settings.concurrency)),
                    memory: crate::body::Budget::new(settings.max_in_flight_bytes),
                    settings,
                    exchange: config.exchange.clone(),
                    max_body_size: config.max_body_size,
                    result_publish_retry: config.result_publish_retry,
                    cache: config
                        .enable_result_cache
                        .then(|| ResultCache::new(cache_size)),
                    health: Arc::clone(&health),
                    index,
                    resubscribe: tokio::sync::Notify::new(),
                    alone: tokio::sync::RwLock::new(()),
                    abandoned: std::sync::Mutex::default(),
                })
            })
            .collect::<Vec<_>>();
        Ok(Engine {
            trackers: Arc::new(std::sync::Mutex::new(vec![
                watchdog::Tracker::default();
                workers.len()
            ])),
            config: Arc::new(config),
            workers,
            health,
            shutdown: self.shutdown.unwrap_or_default(),
        })
    }
}

/// How a connection's session ended.
enum SessionEnd {
    Shutdown,
    Lost,
}

impl Engine {
    /// A builder over every handler registered with `#[consumer]` in this binary.
    #[must_use]
    pub fn builder(config: Config) -> EngineBuilder {
        EngineBuilder {
            config,
            specs: registry::handlers(),
            only: None,
            shutdown: None,
        }
    }

    /// The token that stops the engine: cancel it to shut down gracefully.
    #[must_use]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// A handle to the engine's live state and counters.
    #[must_use]
    pub fn health(&self) -> HealthHandle {
        HealthHandle(Arc::clone(&self.health))
    }

    /// The names and queues of the handlers this engine runs.
    #[must_use]
    pub fn handlers(&self) -> Vec<(String, String)> {
        self.workers
            .iter()
            .map(|w| (w.settings.name.clone(), w.settings.queue.clone()))
            .collect()
    }

    /// Connects, declares the topology and consumes until the shutdown token is cancelled;
    /// then stops consuming, drains in-flight deliveries (up to `shutdown_timeout`) and
    /// closes the connection. Connection losses are healed by reconnecting.
    ///
    /// # Errors
    /// Only errors retrying cannot fix: the broker refused the topology (a queue exists with
    /// other arguments, a permission is missing).
    pub async fn run(self) -> Result<(), Error> {
        let stop_http = CancellationToken::new();
        if let Some(addr) = self.config.http_addr {
            let listener = crate::http::bind(addr)
                .await
                .map_err(|source| Error::Http { addr, source })?;
            info!(%addr, "serving /metrics, /livez and /readyz");
            tokio::spawn(crate::http::serve(
                listener,
                Arc::clone(&self.health),
                stop_http.clone(),
            ));
        }
        let _stop_http = stop_http.drop_guard();
        let tracker = TaskTracker::new();
        let result = self.supervise(&tracker).await;
        self.health
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracker.close();
        if tokio::time::timeout(self.config.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            let left: usize = self
                .health
                .snapshot()
                .handlers
                .iter()
                .map(|h| h.in_flight)
                .sum();
            warn!(
                in_flight = left,
                "shutdown timeout reached; unfinished deliveries will be redelivered by the broker"
            );
        }
        result
    }

    async fn supervise(&self, tracker: &TaskTracker) -> Result<(), Error> {
        let names: Vec<&str> = self
            .workers
            .iter()
            .map(|w| w.settings.name.as_str())
            .collect();
        let connection_name = format!(
            "rmq-consumer[{}] pid {}",
            names.join(","),
            std::process::id()
        );
        let mut attempt: u32 = 0;
        let mut url_index = 0;
        let mut connected_before = false;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let connecting = connection::connect_any(
                &self.config.urls,
                &self.config.tls,
                url_index,
                self.config.heartbeat_interval,
                &connection_name,
            );
            let connected = tokio::select! {
                result = connecting => result,
                () = self.shutdown.cancelled() => return Ok(()),
            };
            match connected {
                Ok((connection, index)) => {
                    url_index = index;
                    attempt = 0;
                    if connected_before {
                        self.health
                            .reconnects
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    connected_before = true;
                    info!(url = %self.config.urls[index], "connected");
                    match self.session(connection, tracker).await? {
                        SessionEnd::Shutdown => return Ok(()),
                        SessionEnd::Lost => warn!("connection lost; reconnecting"),
                    }
                }
                Err(errors) => {
                    let delay = connection::backoff(
                        attempt,
                        self.config.retry_connect_interval,
                        self.config.retry_connect_max,
                    );
                    attempt = attempt.saturating_add(1);
                    for error in &errors {
                        warn!(error = %crate::error::chain(error), "connection attempt failed");
                    }
                    warn!("no broker reachable; next attempt in {delay:.1?}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }

    async fn session(
        &self,
        connection: Connection,
        tracker: &TaskTracker,
    ) -> Result<SessionEnd, Error> {
        let lost = CancellationToken::new();
        let health = Arc::clone(&self.health);
        health
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let events = tokio::spawn(watch_events(
            connection.events_listener(),
            connection.status().clone(),
            lost.clone(),
            Arc::clone(&health),
        ));
        let connection = Arc::new(connection);
        let stop_watchdog = CancellationToken::new();
        let period = Duration::from_secs(u64::from(self.config.heartbeat_interval.max(2)) / 2);
        let watchdog = tokio::spawn(watchdog::run(
            Arc::clone(&connection),
            self.workers.clone(),
            Arc::clone(&health),
            Arc::clone(&self.trackers),
            watchdog::WatchdogSettings {
                period,
                threshold: self.config.queue_stuck_threshold,
                max_failures: self.config.max_consecutive_failures,
            },
            lost.clone(),
            stop_watchdog.clone(),
        ));
        let end = self.consume_all(&connection, tracker, &lost).await;
        stop_watchdog.cancel();
        let _ = watchdog.await;
        health
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        health.set_blocked(false);
        events.abort();
        end
    }

    async fn consume_all(
        &self,
        connection: &Arc<Connection>,
        tracker: &TaskTracker,
        lost: &CancellationToken,
    ) -> Result<SessionEnd, Error> {
        let setup = async {
            let channel = connection.create_channel().await.map_err(|source| {
                crate::error::TopologyError {
                    what: "channel",
                    name: "setup".to_owned(),
                    source,
                }
            })?;
            topology::declare_exchange(&channel, &self.config.exchange).await?;
            let _ = channel.close(200, "declared".into()).await;
            Publisher::open(
                connection,
                self.config.confirm_timeout,
                crate::publisher::DEFAULT_PUBLISH_CHANNELS,
            )
            .await
            .map_err(|source| crate::error::TopologyError {
                what: "channel",
                name: "publisher".to_owned(),
                source,
            })
        };
        let publisher = match setup.await {
            Ok(publisher) => publisher,
            Err(error) if error.is_refusal() => return Err(error.into()),
            Err(error) => {
                warn!(error = %crate::error::chain(&error), "setup failed; reconnecting");
                let _ = connection.close(200, "setup failed".into()).await;
                return Ok(SessionEnd::Lost);
            }
        };
        let mut consumers = tokio::task::JoinSet::new();
        for worker in &self.workers {
            consumers.spawn(Arc::clone(worker).consume(
                Arc::clone(connection),
                publisher.clone(),
                tracker.clone(),
                lost.clone(),
                self.shutdown.clone(),
            ));
        }
        let mut end = SessionEnd::Lost;
        let mut fatal = None;
        while let Some(joined) = consumers.join_next().await {
            match joined {
                Ok(Stop::Shutdown) => end = SessionEnd::Shutdown,
                Ok(Stop::Lost) => lost.cancel(),
                Ok(Stop::Fatal(error)) => {
                    error!(error = %crate::error::chain(&error), "the broker refused the topology");
                    fatal.get_or_insert(error);
                    self.shutdown.cancel();
                }
                Err(join_error) => {
                    error!(error = %join_error, "a consumer task failed");
                    lost.cancel();
                }
            }
        }
        if let Some(error) = fatal {
            let _ = connection.close(200, "topology refused".into()).await;
            return Err(error);
        }
        if matches!(end, SessionEnd::Shutdown) {
            self.health
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // Consumers are cancelled: let in-flight deliveries publish and ack before closing.
            tracker.close();
            let drained = tokio::time::timeout(self.config.shutdown_timeout, tracker.wait()).await;
            if drained.is_err() {
                warn!(
                    "shutdown timeout reached; closing with deliveries in flight (the broker requeues them)"
                );
            } else {
                info!("in-flight deliveries drained");
            }
            publisher.close().await;
            let _ = connection.close(200, "shutdown".into()).await;
        } else {
            let _ = connection.close(200, "reconnecting".into()).await;
        }
        Ok(end)
    }
}

async fn watch_events(
    events: impl futures_util::Stream<Item = Event> + Send + 'static,
    status: lapin::ConnectionStatus,
    lost: CancellationToken,
    health: Arc<Health>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Event::ConnectionBlocked(reason) => {
                warn!(reason = %reason, "the broker blocked this connection (resource alarm); publishing waits");
                health.set_blocked(true);
            }
            Event::ConnectionUnblocked => {
                info!("the broker unblocked this connection");
                health.set_blocked(false);
            }
            // lapin also reports a channel's error here (a 404 on a passive declare or a
            // publish to a missing exchange) while the connection is fine: the channel's
            // owner handles those; only a connection that is down is lost.
            Event::Error(error) if status.connected() => {
                debug!(error = %error, "channel error");
            }
            Event::Error(error) => {
                warn!(error = %error, "connection error");
                lost.cancel();
                return;
            }
            _ => {}
        }
    }
    lost.cancel();
}

//! The engine: [`Engine`] and its builder here; the connection supervisor in `supervisor.rs`,
//! one consumer per handler, bounded concurrency, drain on shutdown. Only the engine settles
//! deliveries.

mod acks;
mod batch;
mod call;
mod consumer;
mod pipeline;
pub(crate) mod redelivery;
mod settle;
mod supervisor;
mod watchdog;
mod worker;

use std::{num::NonZeroUsize, sync::Arc};

use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    cache::ResultCache,
    config::Config,
    error::{Error, SetupError},
    health::{Health, HealthHandle},
    registry::{self, HandlerSpec},
    settings,
};
use supervisor::Deadline;
use worker::Worker;

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
    /// The shared result store, when a handler uses it.
    store: Option<crate::store::Store>,
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
        let store = crate::cache::for_engine(&config, &all, &health)?;
        let workers = all
            .into_iter()
            .enumerate()
            .map(|(index, settings)| {
                let cache = crate::cache::cache_for(
                    &config,
                    &settings.name,
                    store.as_ref(),
                    &health,
                    || ResultCache::new(cache_size, config.result_cache_bytes),
                );
                Arc::new(Worker {
                    semaphore: Arc::new(Semaphore::new(settings.concurrency)),
                    memory: crate::body::Budget::new(settings.max_in_flight_bytes),
                    settings,
                    exchange: config.exchange.clone(),
                    max_body_size: config.max_body_size,
                    result_publish_retry: config.result_publish_retry,
                    cache,
                    health: Arc::clone(&health),
                    index,
                    resubscribe: tokio::sync::Notify::new(),
                    alone: tokio::sync::RwLock::new(()),
                    frame_max: std::sync::atomic::AtomicUsize::new(
                        crate::hostile::DEFAULT_FRAME_MAX,
                    ),
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
            store,
        })
    }
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
    /// other arguments, a permission is missing), or with `declare = false` objects the
    /// handlers need are missing, at startup or later ([`Error::MissingTopology`]).
    pub async fn run(self) -> Result<(), Error> {
        for worker in &self.workers {
            let longest = worker.settings.longest_unacked(
                self.config.confirm_timeout,
                self.config.result_publish_retry,
            );
            if longest > settings::BROKER_CONSUMER_TIMEOUT {
                warn!(handler = %worker.settings.name, ?longest,
                    "a delivery may stay unacked longer than RabbitMQ's default consumer_timeout (30 min): \
                     the broker would close the channel and redeliver everything on it; lower message_timeout \
                     or read_ahead, or raise consumer_timeout (per queue: the x-consumer-timeout argument or a policy)");
            }
        }
        if let Some(store) = &self.store {
            store.start();
        }
        // The run's scope: cancelled when `run` returns (or its future is dropped), it stops
        // the process-level tasks (the HTTP listener, the deadline's timer) and is the root of
        // every session's `lost` (see `supervisor.rs`).
        let process = CancellationToken::new();
        let _process = process.clone().drop_guard();
        // The process-level tasks, awaited after `process` is cancelled.
        let background = TaskTracker::new();
        if let Some(addr) = self.config.http_addr {
            let listener = crate::http::bind(addr)
                .await
                .map_err(|source| Error::Http { addr, source })?;
            info!(%addr, "serving /metrics, /livez and /readyz");
            background.spawn(crate::http::serve(
                listener,
                Arc::clone(&self.health),
                process.child_token(),
            ));
        }
        // The delivery work of every session (delivery tasks, settlers, batchers, batch
        // calls): the drain waits for it.
        let tracker = TaskTracker::new();
        let deadline = Deadline::start(
            &background,
            self.shutdown.clone(),
            self.config.shutdown_timeout,
            process.child_token(),
        );
        let result = self.supervise(&tracker, &deadline, &process).await;
        self.health.set_draining();
        tracker.close();
        // The supervisor returns on a shutdown or a refused topology (which starts one);
        // the deliveries still at work get what is left of the one `shutdown_timeout` the
        // whole shutdown has, however many drains it takes.
        self.shutdown.cancel();
        let drained = tokio::select! {
            () = tracker.wait() => true,
            () = deadline.expired.cancelled() => false,
        };
        if !drained {
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
        // Bounded: the listener and the timer end as soon as `process` is cancelled.
        process.cancel();
        background.close();
        background.wait().await;
        result
    }
}

//! The engine: connection supervisor, one consumer per handler, bounded concurrency, drain on
//! shutdown. Only the engine settles deliveries.

mod acks;
mod batch;
mod pipeline;
pub(crate) mod redelivery;
mod settle;
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
    settings, topology,
};
use worker::{Stop, Worker};

/// A session in which every handler subscribed and that lasted this long (or
/// `retry_connect_interval`, when shorter) was a working one: after its loss the engine
/// reconnects at once. Any other counts as a failed connection attempt and backs off (issue
/// 14, A6: a session refused during setup reconnected in a tight loop).
const STABLE_SESSION: Duration = Duration::from_secs(5);

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
        let store = crate::store::for_engine(&config, &all, &health)?;
        let workers = all
            .into_iter()
            .enumerate()
            .map(|(index, settings)| {
                let cache =
                    crate::store::cache_for(&config, &settings.name, store.as_ref(), || {
                        ResultCache::new(cache_size, config.result_cache_bytes)
                    });
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
        let deadline = Deadline::start(self.shutdown.clone(), self.config.shutdown_timeout);
        let _stop_deadline = deadline.over.clone().drop_guard();
        let result = self.supervise(&tracker, &deadline).await;
        self.health
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
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
        result
    }

    async fn supervise(&self, tracker: &TaskTracker, deadline: &Deadline) -> Result<(), Error> {
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
                    if connected_before {
                        self.health
                            .reconnects
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    connected_before = true;
                    info!(url = %self.config.urls[index], "connected");
                    let opened = tokio::time::Instant::now();
                    let opened_ms = self.health.now_ms();
                    match self.session(connection, tracker, deadline).await? {
                        SessionEnd::Shutdown => return Ok(()),
                        SessionEnd::Lost => {}
                    }
                    // A session in which every handler subscribed and that lived for a while
                    // was a working one: its loss is retried at once. Any other (channels
                    // refused, a setup that fails each time) counts as a failed attempt and
                    // backs off like a failed connect; otherwise it would reconnect in a
                    // tight loop.
                    let lived = opened.elapsed();
                    let subscribed = self
                        .health
                        .handlers
                        .iter()
                        .all(|stats| stats.subscribed_since(opened_ms));
                    if subscribed && lived >= self.config.retry_connect_interval.min(STABLE_SESSION)
                    {
                        attempt = 0;
                        warn!(after = ?lived, "connection lost; reconnecting");
                        continue;
                    }
                    let delay = connection::backoff(
                        attempt,
                        self.config.retry_connect_interval,
                        self.config.retry_connect_max,
                    );
                    attempt = attempt.saturating_add(1);
                    warn!(after = ?lived, "session ended soon after it opened; next attempt in {delay:.1?}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.cancelled() => return Ok(()),
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
        deadline: &Deadline,
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
        let end = self
            .consume_all(&connection, tracker, &lost, deadline)
            .await;
        // The watchdog may be waiting on a probe the broker does not answer (a blocked
        // connection): it holds nothing that needs an orderly end.
        stop_watchdog.cancel();
        watchdog.abort();
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
        deadline: &Deadline,
    ) -> Result<SessionEnd, Error> {
        // With `declare = false`, every missing object of every handler in one error, before
        // anything consumes. (Declaring handlers declare their topology as they subscribe.)
        // Handlers that declare declare the exchange as they subscribe; one that only checks
        // may share it and be checked first.
        if self.workers.iter().any(|w| w.settings.declare)
            && self.workers.iter().any(|w| !w.settings.declare)
        {
            let declared = topology::declare_exchange(connection, &self.config.exchange).await;
            match declared {
                Ok(()) => {}
                Err(error) if error.is_refusal() => return Err(error.into()),
                Err(error) => {
                    warn!(error = %crate::error::chain(&error), "setup failed; reconnecting");
                    let _ = connection.close(200, "setup failed".into()).await;
                    return Ok(SessionEnd::Lost);
                }
            }
        }
        let unmanaged: Vec<&settings::Settings> = self
            .workers
            .iter()
            .map(|w| &w.settings)
            .filter(|s| !s.declare)
            .collect();
        let checked = topology::check(connection, &self.config.exchange, &unmanaged).await;
        match checked {
            Ok(()) => {}
            Err(Error::Topology(error)) if !error.is_refusal() => {
                warn!(error = %crate::error::chain(&error), "setup failed; reconnecting");
                let _ = connection.close(200, "setup failed".into()).await;
                return Ok(SessionEnd::Lost);
            }
            Err(error) => {
                let _ = connection.close(200, "topology missing".into()).await;
                return Err(error);
            }
        }
        let setup = async {
            Publisher::open(
                connection,
                self.config.confirm_timeout,
                crate::publisher::DEFAULT_PUBLISH_CHANNELS,
            )
            .await
            .map_err(|source| crate::error::TopologyError {
                what: "open the publish channels of",
                name: "the publisher".to_owned(),
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
                    error!(error = %crate::error::chain(&error), "the broker refused the topology, or part of it is missing");
                    fatal.get_or_insert(error);
                    self.shutdown.cancel();
                }
                Err(join_error) => {
                    error!(error = %join_error, "a consumer task failed");
                    lost.cancel();
                }
            }
        }
        if fatal.is_some() || matches!(end, SessionEnd::Shutdown) {
            self.health
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // Consumers are cancelled: let in-flight deliveries (of every handler, also after
            // one handler's topology was refused) publish and ack before closing.
            tracker.close();
            let drained = tokio::select! {
                () = tracker.wait() => true,
                () = deadline.expired.cancelled() => false,
            };
            if drained {
                info!("in-flight deliveries drained");
            } else {
                warn!(
                    "shutdown timeout reached; closing with deliveries in flight (the broker requeues them)"
                );
            }
            deadline
                .close("closing the publish channels", publisher.close())
                .await;
            let reason = if fatal.is_some() {
                "topology refused"
            } else {
                "shutdown"
            };
            deadline
                .close(
                    "closing the connection",
                    connection.close(200, reason.into()),
                )
                .await;
        } else {
            // A connection that is going away anyway: do not wait long for its close-ok.
            let close = tokio::time::timeout(
                RECONNECT_CLOSE_WAIT,
                connection.close(200, "reconnecting".into()),
            );
            deadline.close("closing the lost connection", close).await;
        }
        match fatal {
            Some(error) => Err(error),
            None => Ok(end),
        }
    }
}

/// The one deadline of a shutdown, shared by every drain and close on its path (issue 14,
/// A7/A10/A11): `expired` is cancelled `shutdown_timeout` after the shutdown began, `over`
/// [`CLOSE_GRACE`] later. Dropping it stops its timer.
#[derive(Debug, Clone)]
struct Deadline {
    expired: CancellationToken,
    over: CancellationToken,
}

/// How long closing may still take, in all, once the shutdown deadline has passed. While the
/// broker blocks the connection (a resource alarm) nothing the engine writes gets out, so a
/// close would wait for as long as the alarm lasts.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long closing a connection that is being replaced may take.
const RECONNECT_CLOSE_WAIT: Duration = Duration::from_secs(5);

impl Deadline {
    fn start(shutdown: CancellationToken, timeout: Duration) -> Self {
        let deadline = Self {
            expired: CancellationToken::new(),
            over: CancellationToken::new(),
        };
        let timer = deadline.clone();
        tokio::spawn(async move {
            let wait = async {
                shutdown.cancelled().await;
                tokio::time::sleep(timeout).await;
                timer.expired.cancel();
                tokio::time::sleep(CLOSE_GRACE).await;
            };
            tokio::select! {
                () = wait => {}
                () = timer.over.cancelled() => {}
            }
            timer.expired.cancel();
            timer.over.cancel();
        });
        deadline
    }

    /// Runs `close` until it ends or the deadline's grace is over, whichever is first.
    async fn close<T>(&self, what: &str, close: impl std::future::Future<Output = T>) {
        tokio::select! {
            _ = close => {}
            () = self.over.cancelled() => warn!("{what} did not complete within the shutdown deadline; leaving it to the broker"),
        }
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

//! The supervisor: connecting (with backoff over the URL list), one session per connection
//! (its event watcher, its watchdog, every handler's consumer), the drain and close of a
//! session, and the one shutdown [`Deadline`].

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use lapin::{Connection, Event};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use crate::{connection, error::Error, health::Health, publisher::Publisher, settings, topology};

use super::{Engine, consumer::Stop, watchdog};

/// A session in which every handler subscribed and that lasted this long (or
/// `retry_connect_interval`, when shorter) was a working one: after its loss the engine
/// reconnects at once. Any other counts as a failed connection attempt and backs off (issue
/// 14, A6: a session refused during setup reconnected in a tight loop).
const STABLE_SESSION: Duration = Duration::from_secs(5);

/// How a connection's session ended.
enum SessionEnd {
    Shutdown,
    Lost,
}

impl Engine {
    pub(super) async fn supervise(
        &self,
        tracker: &TaskTracker,
        deadline: &Deadline,
        process: &CancellationToken,
    ) -> Result<(), Error> {
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
                        self.health.reconnected();
                    }
                    connected_before = true;
                    info!(url = %self.config.urls[index], "connected");
                    let opened = tokio::time::Instant::now();
                    let opened_ms = self.health.now_ms();
                    match self.session(connection, tracker, deadline, process).await? {
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

    /// One connection's session. Its tokens: `lost` (a child of the run's `process`: the
    /// connection is gone, abandon what is in flight) and, under it, `ending` (the session is
    /// over: its own tasks stop). Its own tasks (the event watcher, the watchdog and its
    /// probe closes, every handler's consumer loop) run on `tasks`, cancelled and awaited
    /// before it returns. Its deliveries run on the run's `tracker`: a lost session's last
    /// deliveries may outlive it, and a drain waits for them.
    async fn session(
        &self,
        connection: Connection,
        tracker: &TaskTracker,
        deadline: &Deadline,
        process: &CancellationToken,
    ) -> Result<SessionEnd, Error> {
        let lost = process.child_token();
        let ending = lost.child_token();
        let tasks = TaskTracker::new();
        let health = Arc::clone(&self.health);
        health.set_connected(true);
        tasks.spawn(watch_events(
            connection.events_listener(),
            connection.status().clone(),
            lost.clone(),
            ending.clone(),
            Arc::clone(&health),
        ));
        let connection = Arc::new(connection);
        let period = Duration::from_secs(u64::from(self.config.heartbeat_interval.max(2)) / 2);
        tasks.spawn(watchdog::run(
            Arc::clone(&connection),
            self.workers.clone(),
            Arc::clone(&health),
            Arc::clone(&self.trackers),
            watchdog::WatchdogSettings {
                period,
                threshold: self.config.queue_stuck_threshold,
                max_failures: self.config.max_consecutive_failures,
            },
            watchdog::Session {
                lost: lost.clone(),
                stop: ending.clone(),
                tasks: tasks.clone(),
            },
        ));
        let end = self
            .consume_all(&connection, tracker, &tasks, &lost, deadline)
            .await;
        // The watchdog may be waiting on a probe the broker does not answer (a blocked
        // connection): it stops at once when cancelled (`watchdog::run`), and so does a
        // probe channel's close.
        ending.cancel();
        tasks.close();
        tasks.wait().await;
        health.set_connected(false);
        health.set_blocked(false);
        end
    }

    async fn consume_all(
        &self,
        connection: &Arc<Connection>,
        tracker: &TaskTracker,
        tasks: &TaskTracker,
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
        // Each handler's consumer loop, on the session's tracker; each reports how it ended
        // (a panic, a bug, counts as a lost connection).
        let (report, mut ended) = tokio::sync::mpsc::unbounded_channel();
        for worker in &self.workers {
            let consume = Arc::clone(worker).consume(
                Arc::clone(connection),
                publisher.clone(),
                tracker.clone(),
                lost.clone(),
                self.shutdown.clone(),
            );
            let report = report.clone();
            tasks.spawn(async move {
                let _ = report.send(AssertUnwindSafe(consume).catch_unwind().await);
            });
        }
        drop(report);
        let mut end = SessionEnd::Lost;
        let mut fatal = None;
        while let Some(stopped) = ended.recv().await {
            match stopped {
                Ok(Stop::Shutdown) => end = SessionEnd::Shutdown,
                Ok(Stop::Lost) => lost.cancel(),
                Ok(Stop::Fatal(error)) => {
                    error!(error = %crate::error::chain(&error), "the broker refused the topology, or part of it is missing");
                    fatal.get_or_insert(error);
                    self.shutdown.cancel();
                }
                Err(panic) => {
                    error!(error = %super::call::panic_message(&*panic), "a consumer task failed");
                    lost.cancel();
                }
            }
        }
        if fatal.is_some() || matches!(end, SessionEnd::Shutdown) {
            self.health.set_draining();
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
/// [`CLOSE_GRACE`] later. Its timer is a process-level task: it ends when the run does.
#[derive(Debug, Clone)]
pub(super) struct Deadline {
    pub(super) expired: CancellationToken,
    pub(super) over: CancellationToken,
}

/// How long closing may still take, in all, once the shutdown deadline has passed. While the
/// broker blocks the connection (a resource alarm) nothing the engine writes gets out, so a
/// close would wait for as long as the alarm lasts.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long closing a connection that is being replaced may take.
const RECONNECT_CLOSE_WAIT: Duration = Duration::from_secs(5);

impl Deadline {
    /// Starts the timer on `tasks`; it ends when `stop` is cancelled (the run is over).
    pub(super) fn start(
        tasks: &TaskTracker,
        shutdown: CancellationToken,
        timeout: Duration,
        stop: CancellationToken,
    ) -> Self {
        let deadline = Self {
            expired: CancellationToken::new(),
            over: CancellationToken::new(),
        };
        let timer = deadline.clone();
        tasks.spawn(async move {
            let wait = async {
                shutdown.cancelled().await;
                tokio::time::sleep(timeout).await;
                timer.expired.cancel();
                tokio::time::sleep(CLOSE_GRACE).await;
            };
            tokio::select! {
                () = wait => {}
                () = stop.cancelled() => {}
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

/// Follows the connection's events until `stop` is cancelled: blocked/unblocked into
/// `health`, a connection error (or the end of the events) cancels `lost`.
async fn watch_events(
    events: impl futures_util::Stream<Item = Event> + Send + 'static,
    status: lapin::ConnectionStatus,
    lost: CancellationToken,
    stop: CancellationToken,
    health: Arc<Health>,
) {
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            event = events.next() => event,
        };
        let Some(event) = event else { break };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (in paused time) for `tasks` to end, at most a minute.
    async fn ended(tasks: &TaskTracker) -> bool {
        tasks.close();
        tokio::time::timeout(Duration::from_secs(60), tasks.wait())
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_expires_after_the_timeout_and_is_over_one_grace_later() {
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let run = CancellationToken::new();
        let timeout = Duration::from_secs(10);
        let deadline = Deadline::start(&tasks, shutdown.clone(), timeout, run.child_token());
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(
            !deadline.expired.is_cancelled(),
            "it starts with the shutdown"
        );
        shutdown.cancel();
        tokio::time::sleep(timeout - Duration::from_millis(100)).await;
        assert!(!deadline.expired.is_cancelled());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(deadline.expired.is_cancelled() && !deadline.over.is_cancelled());
        tokio::time::sleep(CLOSE_GRACE).await;
        assert!(deadline.over.is_cancelled());
        assert!(ended(&tasks).await, "the timer ends once the grace is over");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_timer_ends_with_the_run() {
        let tasks = TaskTracker::new();
        let run = CancellationToken::new();
        let deadline = Deadline::start(
            &tasks,
            CancellationToken::new(),
            Duration::from_secs(10),
            run.child_token(),
        );
        run.cancel();
        assert!(ended(&tasks).await, "cancelled, then awaited");
        assert!(deadline.expired.is_cancelled() && deadline.over.is_cancelled());
    }
}

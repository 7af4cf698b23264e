//! The watchdog: every `heartbeat_interval / 2` it checks the connection, probes each queue's
//! depth (passive declare on its own channel) and looks for a consumer that has stopped making
//! progress. Healing escalates: re-subscribe the consumer, then force a reconnect, then
//! report that healing failed (liveness goes down).

use std::{sync::Arc, time::Duration};

use lapin::{Channel, Connection};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, warn};

use crate::{engine::worker::Worker, health::Health};

/// What one check of one handler saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observation {
    /// Ready messages in the queue (`None`: the probe failed).
    pub(crate) depth: Option<u32>,
    /// Deliveries in flight.
    pub(crate) in_flight: usize,
    /// The delivery tasks the handler runs ([`Settings::slots`](crate::settings::Settings::slots)).
    pub(crate) capacity: usize,
    /// Time since the last settled delivery or (re)subscription.
    pub(crate) idle: Duration,
    /// When the last delivery completed (milliseconds since start; `None`: never).
    pub(crate) completed: Option<u64>,
}

/// The watchdog's memory for one handler.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tracker {
    /// Consecutive stuck observations.
    strikes: u32,
    /// Healing steps taken since the handler last made progress.
    heals: u32,
    /// The last completed delivery when the latest healing step was taken: only a delivery
    /// completed since then is progress. A (re)subscription is not (the watchdog's own
    /// re-subscription or reconnect would reset the escalation and it would never fail).
    completed_at_heal: Option<u64>,
}

impl Tracker {
    /// Whether every healing step was taken and the handler has not made progress since.
    fn failed(&self) -> bool {
        self.heals >= FAILED_AFTER
    }
}

/// Healing steps after which healing has failed: re-subscribe, reconnect, then this.
const FAILED_AFTER: u32 = 3;

/// What to do after an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Healthy,
    /// Stuck, but not yet for `max_consecutive_failures` checks.
    Suspect,
    /// Cancel and re-subscribe the consumer.
    Resubscribe,
    /// Drop the connection and reconnect.
    Reconnect,
    /// Both failed: report it (liveness fails), keep trying reconnects.
    Failed,
}

/// The pure stuck-consumer policy: stuck = messages waiting, capacity free and nothing
/// settled for `threshold`, `max_failures` checks in a row.
pub(crate) fn assess(
    tracker: &mut Tracker,
    seen: Observation,
    threshold: Duration,
    max_failures: u32,
) -> Verdict {
    let stuck = seen.depth.is_some_and(|d| d > 0)
        && seen.in_flight < seen.capacity
        && seen.idle >= threshold;
    if !stuck {
        if seen.completed != tracker.completed_at_heal {
            tracker.heals = 0;
        }
        tracker.strikes = 0;
        return Verdict::Healthy;
    }
    tracker.strikes += 1;
    if tracker.strikes < max_failures.max(1) {
        return Verdict::Suspect;
    }
    tracker.strikes = 0;
    tracker.heals = tracker.heals.saturating_add(1);
    tracker.completed_at_heal = seen.completed;
    match tracker.heals {
        1 => Verdict::Resubscribe,
        2 => Verdict::Reconnect,
        _ => Verdict::Failed,
    }
}

/// Runs checks until `stop` is cancelled; cancels `lost` when the connection must be recycled.
/// A check in progress (a probe the broker does not answer, on a blocked connection) ends at
/// once when `stop` is cancelled: it holds nothing that needs an orderly end. The close of a
/// probe channel that timed out runs on `tasks` (the session's), until it ends or `stop`.
pub(crate) async fn run(
    connection: Arc<Connection>,
    workers: Vec<Arc<Worker>>,
    health: Arc<Health>,
    trackers: Arc<std::sync::Mutex<Vec<Tracker>>>,
    settings: WatchdogSettings,
    session: Session,
) {
    tokio::select! {
        biased;
        () = session.stop.cancelled() => {}
        () = checks(connection, workers, health, trackers, settings, &session) => {}
    }
}

async fn checks(
    connection: Arc<Connection>,
    workers: Vec<Arc<Worker>>,
    health: Arc<Health>,
    trackers: Arc<std::sync::Mutex<Vec<Tracker>>>,
    settings: WatchdogSettings,
    session: &Session,
) {
    let Session { lost, stop, .. } = session;
    let mut probe: Option<Channel> = None;
    let mut ticker = tokio::time::interval(settings.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !connection.status().connected() {
            warn!("watchdog: the connection is down; reconnecting");
            lost.cancel();
            return;
        }
        for worker in &workers {
            let depth = probe_depth(
                &connection,
                &mut probe,
                &worker.settings.queue,
                settings.period.max(MIN_PROBE_WAIT),
                session,
            )
            .await;
            let stats = &health.handlers[worker.index];
            if let Some(depth) = depth {
                stats.set_queue_depth(depth.into());
            }
            let now = health.now_ms();
            let idle = Duration::from_millis(now.saturating_sub(stats.progress_ms()));
            // A suspect at work runs alone: the handler has no free capacity meanwhile.
            let alone = worker.alone.try_read().is_err();
            // Capacity is the delivery tasks that run, `min(concurrency, basic.qos)`: a
            // worker busy in all of them is not stuck, however large `concurrency` is.
            let capacity = worker.settings.slots();
            let seen = Observation {
                depth,
                in_flight: if alone { capacity } else { stats.in_flight() },
                capacity,
                idle,
                completed: stats.last_completed_ms(),
            };
            let (verdict, any_failed) = {
                let mut trackers = trackers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let verdict = match trackers.get_mut(worker.index) {
                    Some(tracker) => {
                        assess(tracker, seen, settings.threshold, settings.max_failures)
                    }
                    None => Verdict::Healthy,
                };
                (verdict, trackers.iter().any(Tracker::failed))
            };
            // Liveness fails while any handler's healing has failed and it has made no
            // progress since (a re-subscription or reconnect alone is no progress).
            health.set_healing_failed(any_failed);
            debug!(handler = %worker.settings.name, ?seen, ?verdict, "watchdog check");
            stats.set_stuck(!matches!(verdict, Verdict::Healthy));
            match verdict {
                Verdict::Healthy | Verdict::Suspect => {}
                Verdict::Resubscribe => {
                    warn!(handler = %worker.settings.name, depth = ?depth, idle = ?idle,
                        "watchdog: consumer stuck (messages waiting, capacity free, no progress); re-subscribing");
                    worker.resubscribe.notify_one();
                }
                Verdict::Reconnect => {
                    warn!(handler = %worker.settings.name, "watchdog: still stuck after re-subscribing; forcing a reconnect");
                    lost.cancel();
                    return;
                }
                Verdict::Failed => {
                    error!(handler = %worker.settings.name, "watchdog: still stuck after a reconnect; healing failed");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// The least a probe may take before it counts as unanswered: a loaded broker or machine can
/// answer a passive declare in more than the watchdog's period, and a probe cut short reads
/// as "depth unknown", which never judges a consumer stuck.
const MIN_PROBE_WAIT: Duration = Duration::from_secs(5);

/// The session the watchdog runs in.
#[derive(Debug)]
pub(crate) struct Session {
    /// Cancelled to force a reconnect.
    pub(crate) lost: CancellationToken,
    /// Stops the watchdog (the session is over).
    pub(crate) stop: CancellationToken,
    /// The session's tracker, for the closes of probe channels that timed out.
    pub(crate) tasks: TaskTracker,
}

impl Session {
    /// Closes a probe channel that timed out, on the session's tracker, until it is closed or
    /// the session ends (the connection's close takes the channel with it).
    fn close(&self, stale: Channel) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stale.close(200, "probe timed out".into()) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// The watchdog's timing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchdogSettings {
    pub(crate) period: Duration,
    pub(crate) threshold: Duration,
    pub(crate) max_failures: u32,
}

/// Ready messages in `queue`, by a passive declare on the probe channel (reopened when a
/// failed probe closed it). Bounded by `wait`: a blocked connection (a resource alarm) answers
/// nothing, and the watchdog must not hang on it. A probe that timed out leaves its channel
/// (a late answer there would be read as the next probe's), which is closed in the background
/// ([`Session::close`]).
async fn probe_depth(
    connection: &Connection,
    probe: &mut Option<Channel>,
    queue: &str,
    wait: Duration,
    session: &Session,
) -> Option<u32> {
    if !probe.as_ref().is_some_and(|c| c.status().connected()) {
        *probe = match tokio::time::timeout(wait, connection.create_channel()).await {
            Ok(Ok(channel)) => Some(channel),
            Ok(Err(error)) => {
                debug!(error = %error, "watchdog: cannot open the probe channel");
                None
            }
            Err(_) => {
                debug!("watchdog: opening the probe channel timed out");
                None
            }
        };
    }
    let channel = probe.as_ref()?;
    let declared = tokio::time::timeout(wait, crate::topology::passive_queue(channel, queue)).await;
    match declared {
        Ok(Ok(Some(queue))) => Some(queue.message_count()),
        Ok(Ok(None)) => {
            debug!(queue, "watchdog: probe failed: the queue does not exist");
            None
        }
        Ok(Err(error)) => {
            debug!(queue, error = %error, "watchdog: probe failed");
            None
        }
        Err(_) => {
            debug!(queue, "watchdog: probe timed out");
            if let Some(stale) = probe.take() {
                session.close(stale);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(90);

    fn seen(depth: u32, in_flight: usize, idle_secs: u64) -> Observation {
        Observation {
            depth: Some(depth),
            in_flight,
            capacity: 4,
            idle: Duration::from_secs(idle_secs),
            completed: Some(0),
        }
    }

    #[test]
    fn busy_empty_or_recent_is_healthy() {
        let mut t = Tracker::default();
        assert_eq!(
            assess(&mut t, seen(0, 0, 500), T, 3),
            Verdict::Healthy,
            "empty queue"
        );
        assert_eq!(
            assess(&mut t, seen(9, 4, 500), T, 3),
            Verdict::Healthy,
            "all slots busy"
        );
        assert_eq!(
            assess(&mut t, seen(9, 0, 10), T, 3),
            Verdict::Healthy,
            "recent progress"
        );
        let unknown = Observation {
            depth: None,
            ..seen(9, 0, 500)
        };
        assert_eq!(
            assess(&mut t, unknown, T, 3),
            Verdict::Healthy,
            "failed probe is not stuck"
        );
    }

    #[test]
    fn escalates_resubscribe_reconnect_failed() {
        let mut t = Tracker::default();
        let stuck = seen(9, 0, 500);
        assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Suspect);
        assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Suspect);
        assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Resubscribe);
        assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Suspect);
        assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Suspect);
        assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Reconnect);
        for _ in 0..2 {
            assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Suspect);
        }
        assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Failed);
    }

    #[test]
    fn progress_resets_the_escalation() {
        let mut t = Tracker::default();
        let stuck = seen(9, 0, 500);
        for _ in 0..3 {
            assess(&mut t, stuck, T, 3);
        }
        let progress = Observation {
            completed: Some(1),
            ..seen(9, 0, 1)
        };
        assert_eq!(assess(&mut t, progress, T, 3), Verdict::Healthy);
        let stuck = Observation {
            completed: Some(1),
            ..stuck
        };
        for _ in 0..2 {
            assert_eq!(assess(&mut t, stuck, T, 3), Verdict::Suspect);
        }
        assert_eq!(
            assess(&mut t, stuck, T, 3),
            Verdict::Resubscribe,
            "starts over at step 1"
        );
    }

    #[test]
    fn a_resubscription_is_no_progress() {
        let mut t = Tracker::default();
        let stuck = seen(9, 0, 500);
        let resubscribed = seen(9, 0, 1);
        assert_eq!(assess(&mut t, stuck, T, 1), Verdict::Resubscribe);
        assert_eq!(assess(&mut t, resubscribed, T, 1), Verdict::Healthy);
        assert_eq!(assess(&mut t, stuck, T, 1), Verdict::Reconnect);
        assert_eq!(assess(&mut t, resubscribed, T, 1), Verdict::Healthy);
        assert_eq!(assess(&mut t, stuck, T, 1), Verdict::Failed);
    }

    #[test]
    fn failed_lasts_until_progress() {
        let mut t = Tracker::default();
        let stuck = seen(9, 0, 500);
        for _ in 0..3 {
            assess(&mut t, stuck, T, 1);
        }
        assert!(t.failed());
        assess(&mut t, seen(9, 0, 1), T, 1);
        assert!(t.failed(), "a reconnect alone is no recovery");
        let progress = Observation {
            completed: Some(1),
            ..seen(9, 0, 1)
        };
        assess(&mut t, progress, T, 1);
        assert!(!t.failed());
    }
}

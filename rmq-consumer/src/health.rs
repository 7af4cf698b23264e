//! Live state and counters of a running engine, readable at any time through
//! [`HealthHandle::snapshot`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

/// Shared state of one engine.
#[derive(Debug)]
pub(crate) struct Health {
    started: Instant,
    pub(crate) connected: AtomicBool,
    pub(crate) blocked: AtomicBool,
    blocked_since_ms: AtomicU64,
    blocked_total_ms: AtomicU64,
    pub(crate) draining: AtomicBool,
    pub(crate) reconnects: AtomicU64,
    pub(crate) healing_failed: AtomicBool,
    pub(crate) handlers: Vec<HandlerStats>,
    /// The shared result store's state and counters, when handlers use it.
    pub(crate) store: std::sync::OnceLock<Arc<crate::store::Monitor>>,
}

/// Buckets of the duration histograms, in seconds: 1 ms to about 10 min.
fn duration_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.5, 15),
    )
}

/// Declares each monotonic counter of a handler once: its field in [`HandlerStats`] and in
/// [`HandlerSnapshot`], its Prometheus name and its help text ([`COUNTERS`], which the metrics
/// endpoint reads). A new counter is one line here, plus the places that count it.
macro_rules! handler_counters {
    ($($field:ident => $metric:literal, $help:literal;)*) => {
        /// Counters and gauges of one handler.
        #[derive(Debug)]
        pub(crate) struct HandlerStats {
            pub(crate) name: String,
            pub(crate) queue: String,
            pub(crate) consuming: AtomicBool,
            pub(crate) in_flight: AtomicUsize,
            /// Milliseconds since start of the last completed delivery, plus one (0 = never).
            last_completed_ms: AtomicU64,
            /// Milliseconds since start of the last (re)subscription.
            subscribed_ms: AtomicU64,
            pub(crate) stuck: AtomicBool,
            pub(crate) queue_depth: AtomicU64,
            $(
                #[doc = $help]
                pub(crate) $field: AtomicU64,
            )*
            pub(crate) handler_duration: prometheus_client::metrics::histogram::Histogram,
            pub(crate) end_to_end: prometheus_client::metrics::histogram::Histogram,
            /// A batch handler's items per call.
            pub(crate) batch_size: prometheus_client::metrics::histogram::Histogram,
            /// How long a batch handler's items waited for their batch to be handed over.
            pub(crate) batch_wait: prometheus_client::metrics::histogram::Histogram,
        }

        impl HandlerStats {
            fn new(name: String, queue: String) -> Self {
                Self {
                    name,
                    queue,
                    consuming: AtomicBool::new(false),
                    in_flight: AtomicUsize::new(0),
                    last_completed_ms: AtomicU64::new(0),
                    subscribed_ms: AtomicU64::new(0),
                    stuck: AtomicBool::new(false),
                    queue_depth: AtomicU64::new(0),
                    $($field: AtomicU64::new(0),)*
                    handler_duration: duration_histogram(),
                    end_to_end: duration_histogram(),
                    batch_size: prometheus_client::metrics::histogram::Histogram::new(
                        prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 11),
                    ),
                    batch_wait: duration_histogram(),
                }
            }

            fn snapshot(&self, now: u64) -> HandlerSnapshot {
                HandlerSnapshot {
                    name: self.name.clone(),
                    queue: self.queue.clone(),
                    consuming: self.consuming.load(Relaxed),
                    in_flight: self.in_flight.load(Relaxed),
                    since_last_completed: self
                        .last_completed_ms()
                        .map(|at| Duration::from_millis(now.saturating_sub(at))),
                    stuck: self.stuck.load(Relaxed),
                    queue_depth: self.queue_depth.load(Relaxed),
                    $($field: self.$field.load(Relaxed),)*
                }
            }
        }

        /// One handler's state and counters.
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub struct HandlerSnapshot {
            /// The handler's name.
            pub name: String,
            /// Its queue.
            pub queue: String,
            /// Whether its consumer is subscribed.
            pub consuming: bool,
            /// Deliveries being processed now.
            pub in_flight: usize,
            /// Time since the last delivery was settled (`None`: never).
            pub since_last_completed: Option<Duration>,
            /// Whether the watchdog considers it stuck.
            pub stuck: bool,
            /// Ready messages in its queue at the last watchdog probe.
            pub queue_depth: u64,
            $(
                #[doc = $help]
                pub $field: u64,
            )*
        }

        /// Every handler counter: its Prometheus name, help text and reader.
        pub(crate) const COUNTERS: &[(&str, &str, fn(&HandlerStats) -> u64)] = &[
            $(($metric, $help, |h: &HandlerStats| h.$field.load(Relaxed)),)*
        ];
    };
}

handler_counters! {
    received => "rmq_consumer_deliveries_received", "Deliveries received.";
    succeeded => "rmq_consumer_deliveries_succeeded", "Deliveries processed successfully (result confirmed, input acked).";
    retried => "rmq_consumer_deliveries_retried", "Deliveries sent for another attempt.";
    dead_lettered => "rmq_consumer_deliveries_dead_lettered", "Deliveries sent to the dead-letter queue.";
    rejected => "rmq_consumer_deliveries_rejected", "Deliveries rejected without requeue (dead-lettering off) or nacked back to the queue.";
    cache_hits => "rmq_consumer_cache_hits", "Results answered from the result cache.";
    stale_acks => "rmq_consumer_stale_acks", "Settlements not sent because the delivery's channel had died (the broker redelivers).";
    suspected => "rmq_consumer_suspected", "Redelivered tasks moved to the suspect queue to run alone (an earlier delivery ended unsettled).";
    results_returned => "rmq_consumer_results_returned", "Results the broker returned as unroutable.";
    results_nacked => "rmq_consumer_results_nacked", "Results the broker nacked.";
    uncertain_copies => "rmq_consumer_uncertain_copies", "Retry, dead-letter or suspect copies whose fate is unknown (no confirm in time, or the channel failed after they were sent) while their original went back to the queue: the broker may hold both, and the task then runs once more (one extra run per count).";
    results_exchange_missing => "rmq_consumer_results_exchange_missing", "Result publishes refused because the result exchange did not exist (404); each is published again within `result_publish_retry`.";
    handler_runs => "rmq_consumer_handler_runs", "Times the handler function was called (a batch handler: once per batch).";
    batches => "rmq_consumer_batches", "Batches handed to a batch handler.";
    batch_items => "rmq_consumer_batch_items", "Items handed to a batch handler, in all its batches.";
}

/// Reads one histogram of a handler.
pub(crate) type HistogramOf =
    fn(&HandlerStats) -> &prometheus_client::metrics::histogram::Histogram;

/// Every handler histogram: its Prometheus name, help text and reader (the metrics endpoint
/// reads this list).
pub(crate) const HISTOGRAMS: &[(&str, &str, HistogramOf)] = &[
    (
        "rmq_consumer_handler_duration_seconds",
        "Time spent in the handler (a batch handler: per batch).",
        |h| &h.handler_duration,
    ),
    (
        "rmq_consumer_end_to_end_seconds",
        "From the request's timestamp property to its settlement.",
        |h| &h.end_to_end,
    ),
    (
        "rmq_consumer_batch_size",
        "Items per call of a batch handler.",
        |h| &h.batch_size,
    ),
    (
        "rmq_consumer_batch_wait_seconds",
        "How long a batch handler's items waited for their batch to be handed over.",
        |h| &h.batch_wait,
    ),
];

impl Health {
    pub(crate) fn new(handlers: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            started: Instant::now(),
            connected: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            blocked_since_ms: AtomicU64::new(0),
            blocked_total_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            healing_failed: AtomicBool::new(false),
            handlers: handlers
                .into_iter()
                .map(|(name, queue)| HandlerStats::new(name, queue))
                .collect(),
            store: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn set_blocked(&self, blocked: bool) {
        let now = self.now_ms();
        if blocked {
            if !self.blocked.swap(true, Relaxed) {
                self.blocked_since_ms.store(now, Relaxed);
            }
        } else if self.blocked.swap(false, Relaxed) {
            let since = self.blocked_since_ms.load(Relaxed);
            self.blocked_total_ms
                .fetch_add(now.saturating_sub(since), Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> HealthSnapshot {
        let now = self.now_ms();
        let mut blocked_ms = self.blocked_total_ms.load(Relaxed);
        if self.blocked.load(Relaxed) {
            blocked_ms += now.saturating_sub(self.blocked_since_ms.load(Relaxed));
        }
        HealthSnapshot {
            taken_at: SystemTime::now(),
            uptime: Duration::from_millis(now),
            connected: self.connected.load(Relaxed),
            blocked: self.blocked.load(Relaxed),
            blocked_for: Duration::from_millis(blocked_ms),
            draining: self.draining.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            healing_failed: self.healing_failed.load(Relaxed),
            handlers: self.handlers.iter().map(|h| h.snapshot(now)).collect(),
        }
    }
}

impl HandlerStats {
    pub(crate) fn completed(&self, now_ms: u64) {
        self.last_completed_ms
            .store(now_ms.saturating_add(1), Relaxed);
    }

    pub(crate) fn subscribed(&self, now_ms: u64) {
        self.subscribed_ms.store(now_ms, Relaxed);
    }

    /// Whether the handler (re)subscribed at or after `since_ms` (milliseconds since start).
    pub(crate) fn subscribed_since(&self, since_ms: u64) -> bool {
        self.subscribed_ms.load(Relaxed) >= since_ms
    }

    /// The last sign of progress: a settled delivery or a (re)subscription.
    pub(crate) fn progress_ms(&self) -> u64 {
        self.last_completed_ms()
            .unwrap_or(0)
            .max(self.subscribed_ms.load(Relaxed))
    }

    /// Milliseconds since start of the last completed delivery.
    pub(crate) fn last_completed_ms(&self) -> Option<u64> {
        match self.last_completed_ms.load(Relaxed) {
            0 => None,
            n => Some(n - 1),
        }
    }
}

/// A cheap handle to a running engine's health.
#[derive(Debug, Clone)]
pub struct HealthHandle(pub(crate) Arc<Health>);

impl HealthHandle {
    /// The current state.
    #[must_use]
    pub fn snapshot(&self) -> HealthSnapshot {
        self.0.snapshot()
    }
}

/// The engine's state at one moment.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HealthSnapshot {
    /// When it was taken.
    pub taken_at: SystemTime,
    /// Time since the engine started.
    pub uptime: Duration,
    /// Whether a broker connection is up.
    pub connected: bool,
    /// Whether the broker has blocked publishing (resource alarm).
    pub blocked: bool,
    /// Total time spent blocked.
    pub blocked_for: Duration,
    /// Whether the engine is shutting down.
    pub draining: bool,
    /// Connections re-established after a loss.
    pub reconnects: u64,
    /// Whether the watchdog failed to heal a stuck consumer.
    pub healing_failed: bool,
    /// Per handler.
    pub handlers: Vec<HandlerSnapshot>,
}

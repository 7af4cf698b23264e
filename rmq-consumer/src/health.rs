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
    connected: AtomicBool,
    blocked: AtomicBool,
    blocked_since_ms: AtomicU64,
    blocked_total_ms: AtomicU64,
    draining: AtomicBool,
    reconnects: AtomicU64,
    healing_failed: AtomicBool,
    pub(crate) handlers: Vec<Arc<HandlerStats>>,
    /// The shared result store's state, when handlers use it.
    pub(crate) store: std::sync::OnceLock<Arc<crate::store::Monitor>>,
}

/// Buckets of the duration histograms, in seconds: 1 ms to about 10 min.
fn duration_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.5, 15),
    )
}

/// Declares each monotonic counter of a handler once, in one line of
/// `name: Variant => "prometheus_name", "help";`. The line gives the counter its field in
/// [`HandlerStats`], its [`Counter`] variant (what the engine passes to
/// [`HandlerStats::count`] and [`HandlerStats::add`]), its Prometheus name and help text
/// ([`COUNTERS`], which the metrics endpoint reads) and, in the `handler` group, its field
/// in [`HandlerSnapshot`]. The `store` group holds the shared result store's counters
/// ([`STORE_COUNTERS`]), recorded by [`crate::cache`] and shown only for the handlers that use
/// the store. A new counter is one line in the `handler_counters!` call below, plus the
/// `count` calls that record it.
macro_rules! handler_counters {
    (
        handler { $($field:ident: $variant:ident => $metric:literal, $help:literal;)* }
        store { $($store_field:ident: $store_variant:ident => $store_metric:literal, $store_help:literal;)* }
    ) => {
        /// Counters and gauges of one handler. The engine writes them only through the
        /// recording methods ([`HandlerStats::count`], [`HandlerStats::add`],
        /// [`HandlerStats::started`], ...).
        #[derive(Debug)]
        pub(crate) struct HandlerStats {
            pub(crate) name: String,
            pub(crate) queue: String,
            consuming: AtomicBool,
            in_flight: AtomicUsize,
            /// Milliseconds since start of the last completed delivery, plus one (0 = never).
            last_completed_ms: AtomicU64,
            /// Milliseconds since start of the last (re)subscription.
            subscribed_ms: AtomicU64,
            stuck: AtomicBool,
            queue_depth: AtomicU64,
            $(
                #[doc = $help]
                #[doc = ""]
                #[doc = "Recorded through [`HandlerStats::count`]."]
                $field: AtomicU64,
            )*
            $(
                #[doc = $store_help]
                #[doc = ""]
                #[doc = "Recorded through [`HandlerStats::count`]."]
                $store_field: AtomicU64,
            )*
            pub(crate) handler_duration: prometheus_client::metrics::histogram::Histogram,
            pub(crate) end_to_end: prometheus_client::metrics::histogram::Histogram,
            /// A batch handler's items per call.
            pub(crate) batch_size: prometheus_client::metrics::histogram::Histogram,
            /// How long a batch handler's items waited for their batch to be handed over.
            pub(crate) batch_wait: prometheus_client::metrics::histogram::Histogram,
        }

        /// One monotonic counter of a handler, as [`HandlerStats::count`] takes it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Counter {
            $(
                #[doc = $help]
                $variant,
            )*
            $(
                #[doc = $store_help]
                $store_variant,
            )*
        }

        impl HandlerStats {
            pub(crate) fn new(name: String, queue: String) -> Self {
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
                    $($store_field: AtomicU64::new(0),)*
                    handler_duration: duration_histogram(),
                    end_to_end: duration_histogram(),
                    batch_size: prometheus_client::metrics::histogram::Histogram::new(
                        prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 11),
                    ),
                    batch_wait: duration_histogram(),
                }
            }

            fn counter(&self, counter: Counter) -> &AtomicU64 {
                match counter {
                    $(Counter::$variant => &self.$field,)*
                    $(Counter::$store_variant => &self.$store_field,)*
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
        pub(crate) const COUNTERS: &[(&str, &str, Read)] = &[
            $(($metric, $help, |h: &HandlerStats| h.$field.load(Relaxed)),)*
        ];

        /// The shared result store's counters, as [`COUNTERS`]: shown while the engine has a
        /// store, for the handlers that use it.
        pub(crate) const STORE_COUNTERS: &[(&str, &str, Read)] = &[
            $(($store_metric, $store_help, |h: &HandlerStats| h.$store_field.load(Relaxed)),)*
        ];
    };
}

/// Reads one counter or gauge of a handler.
pub(crate) type Read = fn(&HandlerStats) -> u64;

handler_counters! {
    handler {
        received: Received => "rmq_consumer_deliveries_received", "Deliveries received.";
        succeeded: Succeeded => "rmq_consumer_deliveries_succeeded", "Deliveries processed successfully (result confirmed, input acked).";
        retried: Retried => "rmq_consumer_deliveries_retried", "Deliveries sent for another attempt.";
        dead_lettered: DeadLettered => "rmq_consumer_deliveries_dead_lettered", "Deliveries sent to the dead-letter queue.";
        rejected: Rejected => "rmq_consumer_deliveries_rejected", "Deliveries rejected without requeue (dead-lettering off) or nacked back to the queue.";
        cache_hits: CacheHits => "rmq_consumer_cache_hits", "Results answered from the result cache.";
        stale_acks: StaleAcks => "rmq_consumer_stale_acks", "Settlements not sent because the delivery's channel had died (the broker redelivers).";
        suspected: Suspected => "rmq_consumer_suspected", "Redelivered tasks moved to the suspect queue to run alone (an earlier delivery ended unsettled).";
        results_returned: ResultsReturned => "rmq_consumer_results_returned", "Results the broker returned as unroutable.";
        results_nacked: ResultsNacked => "rmq_consumer_results_nacked", "Results the broker nacked.";
        uncertain_copies: UncertainCopies => "rmq_consumer_uncertain_copies", "Retry, dead-letter or suspect copies whose fate is unknown (no confirm in time, or the channel failed after they were sent) while their original went back to the queue: the broker may hold both, and the task then runs once more (one extra run per count).";
        results_exchange_missing: ResultsExchangeMissing => "rmq_consumer_results_exchange_missing", "Result publishes refused because the result exchange did not exist (404); each is published again within `result_publish_retry`.";
        handler_runs: HandlerRuns => "rmq_consumer_handler_runs", "Times the handler function was called (a batch handler: once per batch).";
        batches: Batches => "rmq_consumer_batches", "Batches handed to a batch handler.";
        batch_items: BatchItems => "rmq_consumer_batch_items", "Items handed to a batch handler, in all its batches.";
    }
    store {
        store_hits: StoreHits => "rmq_consumer_store_hits", "Results answered from the shared result store.";
        store_misses: StoreMisses => "rmq_consumer_store_misses", "Tasks not in the shared store whose lease this replica took (the handler ran).";
        store_lease_waits: StoreLeaseWaits => "rmq_consumer_store_lease_waits", "Deliveries that waited for another replica's run of their task.";
        store_takeovers: StoreTakeovers => "rmq_consumer_store_takeovers", "Tasks taken over after another replica's lease expired (the handler ran here).";
        store_errors: StoreErrors => "rmq_consumer_store_errors", "Shared store calls that failed, timed out or were skipped while it was down (the delivery went on without it).";
    }
}

/// Every handler gauge: its Prometheus name, help text and reader (the metrics endpoint reads
/// this list).
pub(crate) const GAUGES: &[(&str, &str, Read)] = &[
    (
        "rmq_consumer_in_flight",
        "Deliveries being processed.",
        |h| u64::try_from(h.in_flight.load(Relaxed)).unwrap_or(u64::MAX),
    ),
    (
        "rmq_consumer_queue_depth",
        "Ready messages in the queue at the last watchdog probe.",
        |h| h.queue_depth.load(Relaxed),
    ),
    (
        "rmq_consumer_consumer_up",
        "1 while the handler's consumer is subscribed.",
        |h| u64::from(h.consuming.load(Relaxed)),
    ),
    (
        "rmq_consumer_stuck",
        "1 while the watchdog considers the consumer stuck.",
        |h| u64::from(h.stuck.load(Relaxed)),
    ),
];

/// Reads one gauge of the engine from a snapshot.
pub(crate) type ReadEngine = fn(&HealthSnapshot) -> u64;

/// The engine's own gauges (not per handler): name, help text and reader of a snapshot.
pub(crate) const ENGINE_GAUGES: &[(&str, &str, ReadEngine)] = &[
    (
        "rmq_consumer_connected",
        "1 while a broker connection is up.",
        |s| u64::from(s.connected),
    ),
    (
        "rmq_consumer_blocked",
        "1 while the broker blocks this connection.",
        |s| u64::from(s.blocked),
    ),
    ("rmq_consumer_draining", "1 while shutting down.", |s| {
        u64::from(s.draining)
    }),
];

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
                .map(|(name, queue)| Arc::new(HandlerStats::new(name, queue)))
                .collect(),
            store: std::sync::OnceLock::new(),
        }
    }

    /// The counters of handler `name`.
    pub(crate) fn handler(&self, name: &str) -> Option<Arc<HandlerStats>> {
        self.handlers
            .iter()
            .find(|stats| stats.name == name)
            .map(Arc::clone)
    }

    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records whether a broker connection is up.
    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Relaxed);
    }

    /// Records a connection re-established after a loss.
    pub(crate) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }

    /// Records that the engine is shutting down.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Records whether the watchdog failed to heal a stuck consumer.
    pub(crate) fn set_healing_failed(&self, failed: bool) {
        self.healing_failed.store(failed, Relaxed);
    }

    /// Records whether the broker blocks publishing, and for how long in all.
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
    /// Adds one to a counter.
    pub(crate) fn count(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Adds `n` to a counter.
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.counter(counter).fetch_add(n, Relaxed);
    }

    /// A counter's value.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the unit tests"))]
    pub(crate) fn get(&self, counter: Counter) -> u64 {
        self.counter(counter).load(Relaxed)
    }

    /// Records a delivery received: counted, and in flight until [`HandlerStats::finished`].
    pub(crate) fn started(&self) {
        self.count(Counter::Received);
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// Records the end of a delivery [`HandlerStats::started`] counted, at `now_ms`
    /// (milliseconds since start).
    pub(crate) fn finished(&self, now_ms: u64) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.last_completed_ms
            .store(now_ms.saturating_add(1), Relaxed);
    }

    /// Deliveries being processed now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Records whether the handler's consumer is subscribed; `Some(now_ms)` for a
    /// (re)subscription at that time (milliseconds since start).
    pub(crate) fn set_consuming(&self, subscribed_at_ms: Option<u64>) {
        if let Some(now_ms) = subscribed_at_ms {
            self.subscribed_ms.store(now_ms, Relaxed);
        }
        self.consuming.store(subscribed_at_ms.is_some(), Relaxed);
    }

    /// Records whether the watchdog considers the handler stuck.
    pub(crate) fn set_stuck(&self, stuck: bool) {
        self.stuck.store(stuck, Relaxed);
    }

    /// Records the ready messages of the handler's queue at a watchdog probe.
    pub(crate) fn set_queue_depth(&self, depth: u64) {
        self.queue_depth.store(depth, Relaxed);
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

//! What the parent and a measured child process (this binary re-executed with [`CHILD_ARG`])
//! exchange: the [`Spec`] of one measurement (as JSON on the command line), the lines the child
//! prints ([`READY_LINE`], then [`REPORT_PREFIX`] and its [`Report`] as JSON), and the task and
//! result bodies the handlers read and publish ([`Task`], [`Reply`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The broker when `RMQ_CONSUMER_URL` is not set.
pub(crate) const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The hidden first argument that makes this binary a measured consumer.
pub(crate) const CHILD_ARG: &str = "__bench-child";
/// What a child prints once it consumes.
pub(crate) const READY_LINE: &str = "BENCH-READY";
/// What a child prints before its [`Report`] as JSON.
pub(crate) const REPORT_PREFIX: &str = "BENCH-REPORT ";
/// What the io-bound handler awaits.
pub(crate) const SLEEP: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------------
// Messages.

/// A task as the handlers read it (the padding is ignored).
#[derive(Debug, Deserialize)]
pub(crate) struct Task {
    pub(crate) id: u64,
    pub(crate) sent_us: u64,
}

/// The small JSON result of the request-result handlers.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) id: u64,
    pub(crate) sent_us: u64,
    #[serde(default)]
    pub(crate) ok: bool,
}

impl Reply {
    pub(crate) fn to(task: &Task) -> Self {
        Self {
            id: task.id,
            sent_us: task.sent_us,
            ok: true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What a child is asked to do and what it reports.

/// The consumer measured: the framework's engine or the hand-written lapin one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Imp {
    Framework,
    Raw,
}

impl Imp {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Framework => "framework",
            Self::Raw => "raw lapin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Work {
    /// Receive and ack (S1, M).
    Drain,
    /// Decode, publish a result with confirms, then ack (S2, L).
    Request,
    /// Sleep 10 ms, then ack (S3).
    Sleep,
    /// The same with `tokio::time::sleep` (S3, for comparison).
    TokioSleep,
    /// Decode a hostile body into a `Value`, then ack (H).
    Bomb,
    /// B: one request per forward pass of the simulated model (concurrency 1), result with
    /// confirms.
    Model,
    /// B: batches of up to `size` requests per forward pass, handed over when full or when
    /// their first request has waited `wait_ms` (concurrency 1), each result with confirms.
    Batch { size: u16, wait_ms: u16 },
    /// R: wait 10 ms, then publish a result with confirms and ack.
    IoRequest,
}

impl Work {
    pub(crate) fn handler(self) -> &'static str {
        match self {
            Self::Drain => "bench_drain",
            Self::Request => "bench_request",
            Self::Sleep => "bench_sleep",
            Self::TokioSleep => "bench_tokio_sleep",
            Self::Bomb => "bench_bomb",
            Self::Model => "bench_model",
            Self::Batch { .. } => "bench_batch",
            Self::IoRequest => "bench_io_request",
        }
    }

    /// Whether the handler publishes a result (to a result queue the parent declares).
    pub(crate) fn publishes(self) -> bool {
        matches!(
            self,
            Self::Request | Self::Model | Self::Batch { .. } | Self::IoRequest
        )
    }

    /// The simulated model's handlers run one forward pass at a time (B).
    pub(crate) fn is_model(self) -> bool {
        matches!(self, Self::Model | Self::Batch { .. })
    }

    /// Work the raw consumer does not do (B, and R's costed duplicates).
    pub(crate) fn framework_only(self) -> bool {
        self.is_model() || self == Self::IoRequest
    }
}

/// One measurement, passed to the child as JSON (the URL goes through the environment).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Spec {
    pub(crate) imp: Imp,
    pub(crate) work: Work,
    pub(crate) queue: String,
    pub(crate) exchange: String,
    pub(crate) reply_key: String,
    pub(crate) results: String,
    /// Handler invocations at once (the framework's `prefetch`).
    pub(crate) prefetch: u16,
    pub(crate) count: u64,
    pub(crate) timeout_s: u64,
    /// H: the handler's `max_in_flight_bytes` (`None`: the default).
    #[serde(default)]
    pub(crate) budget: Option<u64>,
    /// R: the shared result store (`cache = "shared"`); `None`: no cache, as by default.
    #[serde(default)]
    pub(crate) store: Option<StoreSpec>,
}

/// R: where the framework's shared result store is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoreSpec {
    /// `result_store`.
    pub(crate) url: String,
    /// `result_store_prefix`, unique per measurement (its keys are deleted afterwards).
    pub(crate) prefix: String,
}

/// What a child measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) processed: u64,
    pub(crate) secs: f64,
    pub(crate) cpu_s: f64,
    pub(crate) rss_kib: u64,
    /// The most deliveries seen in flight (received, not yet settled) at once.
    pub(crate) max_in_flight: u64,
    /// Where the slots' time went (S3).
    #[serde(default)]
    pub(crate) slots: Option<Slots>,
    /// CPU time the broker spent while this child ran (filled in by the parent; `None` when
    /// the broker process is not visible, e.g. a remote broker).
    #[serde(default)]
    pub(crate) broker_cpu_s: Option<f64>,
    /// H: bodies dead-lettered instead of decoded.
    #[serde(default)]
    pub(crate) dead_lettered: u64,
    /// B: the simulated model's forward passes.
    #[serde(default)]
    pub(crate) passes: Option<Passes>,
    /// R: handler runs (S2's handler; deliveries answered from a cache or the store do not
    /// run it).
    #[serde(default)]
    pub(crate) runs: u64,
}

impl Report {
    pub(crate) fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.processed as f64 / self.secs
        } else {
            0.0
        }
    }

    pub(crate) fn cpu_per_10k(&self) -> f64 {
        if self.processed > 0 {
            self.cpu_s * 10_000.0 / self.processed as f64
        } else {
            0.0
        }
    }

    pub(crate) fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub(crate) fn broker_cpu_per_10k(&self) -> f64 {
        match self.broker_cpu_s {
            Some(cpu_s) if self.processed > 0 => cpu_s * 10_000.0 / self.processed as f64,
            _ => f64::NAN,
        }
    }
}

/// Where an S3 run's time went: its `slots` (the prefetch) were either in a handler's wait or
/// between a handler's end and the next one's start (ack, next delivery, task start).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Slots {
    /// The mean wait, in ms (the ideal counts 10).
    pub(crate) wait_ms: f64,
    /// The share of slot time spent waiting, from the first delivery to the last ack: what
    /// the gaps, the first deliveries' arrival and the last round's stragglers leave.
    pub(crate) busy: f64,
    /// The mean time from a wait's end to the start of the wait that took its slot, in ms.
    pub(crate) gap_ms: f64,
}

/// What the model did during one measurement: how many calls, how full, and how long they
/// really took against the cost model.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Passes {
    /// Forward passes (handler calls).
    pub(crate) calls: u64,
    /// Items over all passes.
    pub(crate) items: u64,
    /// The passes' measured time, in seconds.
    pub(crate) busy_s: f64,
    /// The passes' time by the cost model, in seconds.
    pub(crate) nominal_s: f64,
}

impl Passes {
    /// Items per forward pass.
    pub(crate) fn mean_batch(&self) -> f64 {
        self.items as f64 / self.calls.max(1) as f64
    }

    /// How much longer a pass took than the cost model says, on average, in ms (the timer's
    /// overshoot).
    pub(crate) fn overshoot_ms(&self) -> f64 {
        (self.busy_s - self.nominal_s) * 1e3 / self.calls.max(1) as f64
    }

    /// The share of `secs` the model spent in forward passes (one pass at a time).
    pub(crate) fn busy(&self, secs: f64) -> f64 {
        if secs > 0.0 {
            self.busy_s / secs
        } else {
            f64::NAN
        }
    }
}

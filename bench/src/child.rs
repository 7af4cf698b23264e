//! A measured child process (this binary re-executed with [`CHILD_ARG`]): what it is asked
//! to do ([`Spec`]), what it reports ([`Report`]), the framework's consumer and its handlers,
//! and the parent's handle on it ([`Child`]).

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rmq_consumer::{
    Config, Engine,
    config::{CacheMode, ConsumerConfig, LogConfig, SecretUrl},
    consumer,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};

use crate::{
    BoxError, DEFAULT_URL, Res,
    model::Passes,
    procfs::{cpu_seconds, peak_rss_kib},
    raw::child_raw,
};

/// The hidden first argument that makes this binary a measured consumer.
pub(crate) const CHILD_ARG: &str = "__bench-child";
pub(crate) const READY_LINE: &str = "BENCH-READY";
pub(crate) const REPORT_PREFIX: &str = "BENCH-REPORT ";
/// What the io-bound handler awaits.
pub(crate) const SLEEP: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------------
// Messages and the framework's handlers.

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

/// S1 and M: receive and ack, no result.
#[consumer(queue = "bench.drain")]
async fn bench_drain(_task: Value) {
    mark_first();
}

/// S2, L and R: a small JSON result, published with confirms before the input is acked.
#[consumer(queue = "bench.request", reply_key = "bench.request.done")]
async fn bench_request(task: Task) -> Reply {
    mark_first();
    count_run();
    Reply::to(&task)
}

/// R: a request-result handler that waits 10 ms first (as S3's), standing in for a task whose
/// run costs something.
#[consumer(queue = "bench.io_request", reply_key = "bench.io_request.done")]
async fn bench_io_request(task: Task) -> Reply {
    mark_first();
    count_run();
    io_wait().await;
    Reply::to(&task)
}

/// Handler runs in this process (R: a task answered from a cache or the store does not run).
static RUNS: AtomicU64 = AtomicU64::new(0);

/// Counts one run of a request-result handler.
pub(crate) fn count_run() {
    RUNS.fetch_add(1, Ordering::Relaxed);
}

/// S3: an io-bound handler.
#[consumer(queue = "bench.sleep")]
async fn bench_sleep(_task: Value) {
    mark_first();
    io_wait().await;
}

/// H: receives hostile bodies (`[{"":0},...]`) as `Value`.
#[consumer(queue = "bench.bomb")]
async fn bench_bomb(_task: Value) {
    mark_first();
}

/// S3 with `tokio::time::sleep` instead of a timerfd: shown beside S3, for comparison.
#[consumer(queue = "bench.tokio_sleep")]
async fn bench_tokio_sleep(_task: Value) {
    mark_first();
    tokio_wait().await;
}

/// The S3 handlers' 10 ms wait, standing in for an I/O call (a model server, an HTTP API).
///
/// It completes through the reactor the way a socket read does: a `timerfd` fires on time
/// (about 10.2 ms here). `tokio::time::sleep` rounds up to its 1 ms wheel and takes about
/// 11 ms, which alone would hold any tokio consumer near 0.9x of the ideal; the table shows
/// both, with the mean wait each run measured.
pub(crate) async fn io_wait() {
    let started = Instant::now();
    if tokio_timerfd::sleep(SLEEP).await.is_err() {
        tokio::time::sleep(SLEEP).await;
    }
    waited(started);
}

/// `tokio::time::sleep(SLEEP)`, recorded as S3's waits are.
pub(crate) async fn tokio_wait() {
    let started = Instant::now();
    tokio::time::sleep(SLEEP).await;
    waited(started);
}

fn waited(started: Instant) {
    if let Ok(mut waits) = WAITS.lock() {
        waits.push((started, Instant::now()));
    }
}

/// When each S3 wait started and ended, for [`Slots`].
static WAITS: std::sync::Mutex<Vec<(Instant, Instant)>> = std::sync::Mutex::new(Vec::new());

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

impl Slots {
    /// From the waits recorded since the first delivery at `first`, up to `end`.
    pub(crate) fn measure(first: Instant, end: Instant, slots: u16) -> Option<Self> {
        let waits = WAITS.lock().ok()?.clone();
        let span = end.duration_since(first).as_secs_f64();
        if waits.is_empty() || span <= 0.0 {
            return None;
        }
        let total: f64 = waits
            .iter()
            .map(|(start, end)| end.duration_since(*start).as_secs_f64())
            .sum();
        // The k-th wait to start took the slot of the (k - slots)-th wait to end.
        let mut starts: Vec<Instant> = waits.iter().map(|w| w.0).collect();
        let mut ends: Vec<Instant> = waits.iter().map(|w| w.1).collect();
        starts.sort_unstable();
        ends.sort_unstable();
        let gaps: Vec<f64> = starts
            .iter()
            .skip(usize::from(slots))
            .zip(&ends)
            .map(|(start, end)| start.saturating_duration_since(*end).as_secs_f64())
            .collect();
        Some(Self {
            wait_ms: total * 1e3 / waits.len() as f64,
            busy: total / (span * f64::from(slots)),
            gap_ms: gaps.iter().sum::<f64>() * 1e3 / gaps.len().max(1) as f64,
        })
    }
}
// ---------------------------------------------------------------------------------------------
// What a child is asked to do and what it reports.

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

// ---------------------------------------------------------------------------------------------
// The child: one consumer, measured from its first delivery to its last ack.

struct Mark {
    at: Instant,
    cpu_s: f64,
}

static FIRST: OnceLock<Mark> = OnceLock::new();

/// Records the moment (and the CPU time) of the first delivery.
pub(crate) fn mark_first() {
    FIRST.get_or_init(|| Mark {
        at: Instant::now(),
        cpu_s: cpu_seconds().unwrap_or(0.0),
    });
}

pub(crate) fn finish(processed: u64, max_in_flight: u64, slots: u16) -> Res<Report> {
    let end = Instant::now();
    let cpu_end = cpu_seconds()?;
    let first = FIRST.get().ok_or("no delivery arrived")?;
    Ok(Report {
        processed,
        secs: end.duration_since(first.at).as_secs_f64(),
        cpu_s: cpu_end - first.cpu_s,
        rss_kib: peak_rss_kib()?,
        max_in_flight,
        slots: Slots::measure(first.at, end, slots),
        broker_cpu_s: None,
        dead_lettered: 0,
        passes: Passes::recorded(),
        runs: RUNS.load(Ordering::Relaxed),
    })
}

pub(crate) fn warn_logs() -> LogConfig {
    LogConfig {
        level: "warn".to_owned(),
        ..LogConfig::default()
    }
}

pub(crate) async fn child(spec_json: &str) -> Res<()> {
    let spec: Spec = serde_json::from_str(spec_json)?;
    let url = std::env::var("RMQ_CONSUMER_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let report = match spec.imp {
        Imp::Framework => child_framework(&spec, url).await?,
        Imp::Raw => child_raw(&spec, &url).await?,
    };
    println!("{REPORT_PREFIX}{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn child_framework(spec: &Spec, url: String) -> Res<Report> {
    let mut config = Config {
        urls: vec![SecretUrl::new(url)],
        exchange: spec.exchange.clone(),
        prefetch_count: spec.prefetch,
        log: warn_logs(),
        ..Config::default()
    };
    let request = spec.work.publishes();
    let (batch, batch_wait) = match spec.work {
        Work::Batch { size, wait_ms } => {
            (Some(size), Some(Duration::from_millis(u64::from(wait_ms))))
        }
        _ => (None, None),
    };
    config.consumers.insert(
        spec.work.handler().to_owned(),
        ConsumerConfig {
            queue: Some(spec.queue.clone()),
            reply_key: request.then(|| spec.reply_key.clone()),
            reply_queue: request.then(|| spec.results.clone()),
            prefetch: Some(spec.prefetch),
            // The model runs one forward pass at a time, as a GPU worker does.
            concurrency: spec.work.is_model().then_some(1),
            max_in_flight_bytes: spec.budget,
            batch,
            batch_wait,
            cache: Some(if spec.store.is_some() {
                CacheMode::Shared
            } else {
                CacheMode::None
            }),
            ..ConsumerConfig::default()
        },
    );
    if let Some(store) = &spec.store {
        config.result_store = Some(SecretUrl::new(store.url.clone()));
        config.result_store_prefix.clone_from(&store.prefix);
    }
    let _logs = rmq_consumer::logging::init(&config.log)?;
    let engine = Engine::builder(config)
        .only([spec.work.handler()])
        .build()?;
    let stop = engine.shutdown_token();
    let health = engine.health();
    let running = tokio::spawn(engine.run());
    let deadline = Instant::now() + Duration::from_secs(spec.timeout_s);
    while !health.snapshot().handlers.iter().all(|h| h.consuming) {
        if Instant::now() >= deadline || running.is_finished() {
            return Err("the engine did not start consuming".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("{READY_LINE}");
    if spec.work == Work::Bomb {
        // Dead-lettered bodies never reach the handler, which marks the first delivery.
        mark_first();
    }
    let mut max_in_flight = 0;
    let mut dead_lettered;
    let processed = loop {
        let snapshot = health.snapshot();
        let handler = snapshot.handlers.first().ok_or("no handler")?;
        max_in_flight = max_in_flight.max(handler.in_flight as u64);
        // H's bodies may be dead-lettered (too big to decode): settled all the same.
        let settled = handler.succeeded + handler.dead_lettered;
        dead_lettered = handler.dead_lettered;
        if settled >= spec.count || Instant::now() >= deadline || running.is_finished() {
            break settled;
        }
        // Coarse polls while far from the end (their wakeups would count as the framework's
        // CPU time at low rates), fine ones for the last 2%.
        let left = spec.count.saturating_sub(settled);
        let pause = if left > spec.count / 50 { 20 } else { 1 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    };
    let mut report = finish(processed, max_in_flight, spec.prefetch)?;
    report.dead_lettered = dead_lettered;
    stop.cancel();
    running.await??;
    Ok(report)
}

/// A child process running one measured consumer.
pub(crate) struct Child {
    pub(crate) process: tokio::process::Child,
    events: mpsc::UnboundedReceiver<Event>,
}

enum Event {
    Ready,
    Report(Report),
}

impl Child {
    pub(crate) fn spawn(spec: &Spec, url: &str) -> Res<Self> {
        let exe = std::env::current_exe()?;
        // `BENCH_WRAP="valgrind --tool=callgrind"` runs each child under a profiler.
        let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
        let mut command = match wrap.split_whitespace().collect::<Vec<_>>().split_first() {
            Some((program, args)) => {
                let mut command = tokio::process::Command::new(program);
                command.args(args).arg(exe);
                command
            }
            None => tokio::process::Command::new(exe),
        };
        let mut process = command
            .arg(CHILD_ARG)
            .arg(serde_json::to_string(spec)?)
            .env("RMQ_CONSUMER_URL", url)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = process.stdout.take().ok_or("the child has no stdout")?;
        let (events, receiver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line == READY_LINE {
                    let _ = events.send(Event::Ready);
                } else if let Some(json) = line.strip_prefix(REPORT_PREFIX) {
                    match serde_json::from_str(json) {
                        Ok(report) => {
                            let _ = events.send(Event::Report(report));
                        }
                        Err(error) => eprintln!("  child: bad report `{json}`: {error}"),
                    }
                } else {
                    eprintln!("  child: {line}");
                }
            }
        });
        Ok(Self {
            process,
            events: receiver,
        })
    }

    pub(crate) async fn ready(&mut self, timeout: Duration) -> Res<()> {
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Ok(Some(Event::Ready)) => Ok(()),
            Ok(Some(Event::Report(_))) => Err("the child ended before it was ready".into()),
            Ok(None) => Err(self.failure().await),
            Err(_) => Err("the child did not start consuming".into()),
        }
    }

    pub(crate) async fn report(&mut self, timeout: Duration) -> Res<Report> {
        loop {
            match tokio::time::timeout(timeout, self.events.recv()).await {
                Ok(Some(Event::Ready)) => {}
                Ok(Some(Event::Report(report))) => {
                    let status = self.process.wait().await?;
                    if !status.success() {
                        return Err(format!("the child exited with {status}").into());
                    }
                    return Ok(report);
                }
                Ok(None) => return Err(self.failure().await),
                Err(_) => {
                    let _ = self.process.kill().await;
                    return Err("the child timed out".into());
                }
            }
        }
    }

    async fn failure(&mut self) -> BoxError {
        match self.process.wait().await {
            Ok(status) => format!("the child exited without a report ({status})").into(),
            Err(error) => error.into(),
        }
    }
}

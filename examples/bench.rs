//! Throughput, latency and memory of the framework next to a hand-written lapin consumer,
//! measured in one run against the local broker.
//!
//! Run it with `cargo run --release -p examples --example bench` (every scenario, about seven
//! minutes), or pick scenarios and sizes: `-- S1 S2 --quick --runs 1`. Scenarios: `S1`
//! drain-ack, `S2` request-result, `S3` io-bound (a timerfd wait, plus a row with
//! `tokio::time::sleep` for comparison), `L` latency, `M` memory, `H` hostile bodies (peak
//! RSS receiving `[{"":0},...]` at the default limits, and without the memory budget). The
//! broker is
//! `$RMQ_CONSUMER_URL` or `amqp://guest:guest@127.0.0.1:5672/%2f`.
//!
//! Each measurement drains a fresh, prefilled, durable queue in a child process (this binary
//! re-executed), so CPU time (`/proc/self/stat`) and peak RSS (`VmHWM`) belong to that consumer
//! alone. The framework and the raw consumer alternate on identical queues; each cell is the
//! median of `--runs` runs (default 9 at prefetch 64 and 256, 1 for the slow prefetch-4 drains;
//! an explicit `--runs N` applies to every cell). Throughput is counted from the first delivery
//! to the last ack.
//!
//! For profiling: `--only framework|raw` and `--prefetch N` narrow the run, and
//! `BENCH_WRAP="valgrind --tool=callgrind"` starts each measured child under that command.

use std::{
    collections::VecDeque,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use rmq_consumer::{
    Config, Engine,
    config::{ConsumerConfig, LogConfig, SecretUrl},
    consumer,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::{Notify, Semaphore, mpsc},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// The hidden first argument that makes this binary a measured consumer.
const CHILD_ARG: &str = "__bench-child";
const READY_LINE: &str = "BENCH-READY";
const REPORT_PREFIX: &str = "BENCH-REPORT ";
/// Size of every task body, in bytes.
const BODY_SIZE: usize = 200;
/// What the io-bound handler awaits.
const SLEEP: Duration = Duration::from_millis(10);
/// Publishes in flight while prefilling.
const PREFILL_WINDOW: usize = 2_000;

/// The broker counts as idle when it used at most this share of one core over a window.
const SETTLE_IDLE_SHARE: f64 = 0.05;
const SETTLE_WINDOW: Duration = Duration::from_millis(250);
const SETTLE_MAX: Duration = Duration::from_secs(10);
const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

// ---------------------------------------------------------------------------------------------
// Messages and the framework's handlers.

/// A task as the handlers read it (the padding is ignored).
#[derive(Debug, Deserialize)]
struct Task {
    id: u64,
    sent_us: u64,
}

/// A task as the bench publishes it: ~200 bytes of JSON.
#[derive(Debug, Serialize)]
struct TaskBody<'a> {
    id: u64,
    sent_us: u64,
    kind: &'a str,
    user: &'a str,
    payload: &'a str,
}

/// The small JSON result of the request-result handlers.
#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    id: u64,
    sent_us: u64,
    #[serde(default)]
    ok: bool,
}

impl Reply {
    fn to(task: &Task) -> Self {
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

/// S2 and L: a small JSON result, published with confirms before the input is acked.
#[consumer(queue = "bench.request", reply_key = "bench.request.done")]
async fn bench_request(task: Task) -> Reply {
    mark_first();
    Reply::to(&task)
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
async fn io_wait() {
    let started = Instant::now();
    if tokio_timerfd::sleep(SLEEP).await.is_err() {
        tokio::time::sleep(SLEEP).await;
    }
    waited(started);
}

/// `tokio::time::sleep(SLEEP)`, recorded as S3's waits are.
async fn tokio_wait() {
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
struct Slots {
    /// The mean wait, in ms (the ideal counts 10).
    wait_ms: f64,
    /// The share of slot time spent waiting, from the first delivery to the last ack: what
    /// the gaps, the first deliveries' arrival and the last round's stragglers leave.
    busy: f64,
    /// The mean time from a wait's end to the start of the wait that took its slot, in ms.
    gap_ms: f64,
}

impl Slots {
    /// From the waits recorded since the first delivery at `first`, up to `end`.
    fn measure(first: Instant, end: Instant, slots: u16) -> Option<Self> {
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
enum Imp {
    Framework,
    Raw,
}

impl Imp {
    fn label(self) -> &'static str {
        match self {
            Self::Framework => "framework",
            Self::Raw => "raw lapin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Work {
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
}

impl Work {
    fn handler(self) -> &'static str {
        match self {
            Self::Drain => "bench_drain",
            Self::Request => "bench_request",
            Self::Sleep => "bench_sleep",
            Self::TokioSleep => "bench_tokio_sleep",
            Self::Bomb => "bench_bomb",
        }
    }
}

/// One measurement, passed to the child as JSON (the URL goes through the environment).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    imp: Imp,
    work: Work,
    queue: String,
    exchange: String,
    reply_key: String,
    results: String,
    /// Handler invocations at once (the framework's `prefetch`).
    prefetch: u16,
    count: u64,
    timeout_s: u64,
    /// H: the handler's `max_in_flight_bytes` (`None`: the default).
    #[serde(default)]
    budget: Option<u64>,
}

/// What a child measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Report {
    processed: u64,
    secs: f64,
    cpu_s: f64,
    rss_kib: u64,
    /// The most deliveries seen in flight (received, not yet settled) at once.
    max_in_flight: u64,
    /// Where the slots' time went (S3).
    #[serde(default)]
    slots: Option<Slots>,
    /// CPU time the broker spent while this child ran (filled in by the parent; `None` when
    /// the broker process is not visible, e.g. a remote broker).
    #[serde(default)]
    broker_cpu_s: Option<f64>,
    /// H: bodies dead-lettered instead of decoded.
    #[serde(default)]
    dead_lettered: u64,
}

impl Report {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.processed as f64 / self.secs
        } else {
            0.0
        }
    }

    fn cpu_per_10k(&self) -> f64 {
        if self.processed > 0 {
            self.cpu_s * 10_000.0 / self.processed as f64
        } else {
            0.0
        }
    }

    fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    fn broker_cpu_per_10k(&self) -> f64 {
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
fn mark_first() {
    FIRST.get_or_init(|| Mark {
        at: Instant::now(),
        cpu_s: cpu_seconds().unwrap_or(0.0),
    });
}

/// User plus system CPU time of this process, from `/proc/self/stat` (100 ticks per second).
fn cpu_seconds() -> Res<f64> {
    cpu_seconds_of("self")
}

/// User plus system CPU time of process `pid` (`self` for this one).
fn cpu_seconds_of(pid: &str) -> Res<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (_, after_comm) = stat.rsplit_once(')').ok_or("malformed /proc/self/stat")?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime); `after_comm` starts at field 3.
    let tick = |i: usize| -> Res<u64> {
        Ok(fields
            .get(i)
            .ok_or("short /proc/self/stat")?
            .parse::<u64>()?)
    };
    Ok((tick(11)? + tick(12)?) as f64 / 100.0)
}

/// Peak resident set size (`VmHWM`) of this process, in KiB.
fn peak_rss_kib() -> Res<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed VmHWM")?
        .parse()?;
    Ok(kib)
}

fn finish(processed: u64, max_in_flight: u64, slots: u16) -> Res<Report> {
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
    })
}

/// The local RabbitMQ node's process: the one listening on the URL's port (other nodes, such
/// as a local test cluster, may run beside it), if this machine runs it.
fn broker_pid(url: &str) -> Option<String> {
    let port = url_port(url)?;
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    // sl local_address rem_address st ... inode
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit_once(':')?.1;
                    let listening = fields.get(3) == Some(&"0A");
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| fields.get(9).map(|inode| format!("socket:[{inode}]")))?
                })
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(())?;
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| {
                        inodes
                            .iter()
                            .any(|inode| target.as_os_str() == inode.as_str())
                    })
                })
                .then_some(pid)
        })
}

/// The port of an AMQP URL (5672, or 5671 for `amqps`, when none is given).
fn url_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match host_port.rsplit_once(':') {
        Some((_, port)) if !port.ends_with(']') => port.parse().ok(),
        _ => Some(if scheme == "amqps" { 5671 } else { 5672 }),
    }
}

fn warn_logs() -> LogConfig {
    LogConfig {
        level: "warn".to_owned(),
        ..LogConfig::default()
    }
}

async fn child(spec_json: &str) -> Res<()> {
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
    let request = spec.work == Work::Request;
    config.consumers.insert(
        spec.work.handler().to_owned(),
        ConsumerConfig {
            queue: Some(spec.queue.clone()),
            reply_key: request.then(|| spec.reply_key.clone()),
            reply_queue: request.then(|| spec.results.clone()),
            prefetch: Some(spec.prefetch),
            max_in_flight_bytes: spec.budget,
            ..ConsumerConfig::default()
        },
    );
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

/// The consumer channel's `basic.qos` for a prefetch: the framework's default read-ahead
/// (`prefetch / 2`) on top, given to the raw consumer too.
fn qos(prefetch: u16) -> u16 {
    prefetch.saturating_add(prefetch / 2)
}

/// A hand-written lapin consumer, as one would write it without the framework: the same
/// `basic.qos` as the framework's and at most `prefetch` tasks at work at once.
async fn child_raw(spec: &Spec, url: &str) -> Res<Report> {
    let _logs = rmq_consumer::logging::init(&warn_logs())?;
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(qos(spec.prefetch), BasicQosOptions::default())
        .await?;
    let slots = Arc::new(Semaphore::new(usize::from(spec.prefetch)));
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            spec.queue.as_str().into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!("{READY_LINE}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.timeout_s);
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(Notify::new());
    let route: Arc<(String, String)> = Arc::new((spec.exchange.clone(), spec.reply_key.clone()));
    let mut received = 0;
    let mut max_in_flight = 0;
    while received < spec.count {
        let Ok(slot) = tokio::time::timeout_at(deadline, Arc::clone(&slots).acquire_owned()).await
        else {
            break;
        };
        let slot = slot?;
        let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => return Err("the raw consumer was cancelled".into()),
            Err(_) => break,
        };
        mark_first();
        received += 1;
        max_in_flight = max_in_flight.max(received - done.load(Ordering::Acquire));
        let settled = Settled {
            done: Arc::clone(&done),
            finished: Arc::clone(&finished),
            count: spec.count,
        };
        match spec.work {
            Work::Request => {
                let publisher = publisher.clone();
                let route = Arc::clone(&route);
                tokio::spawn(async move {
                    match raw_request(&publisher, &route.0, &route.1, &delivery).await {
                        Ok(()) => settled.one(),
                        Err(error) => eprintln!("raw request failed: {error}"),
                    }
                    drop(slot);
                });
            }
            work @ (Work::Drain | Work::Sleep | Work::TokioSleep | Work::Bomb) => {
                // Acked from its own task, as the framework does: awaiting each ack in the
                // receive loop measured half the rate at twice the CPU per message here.
                tokio::spawn(async move {
                    match work {
                        Work::Sleep => io_wait().await,
                        Work::TokioSleep => tokio_wait().await,
                        Work::Drain | Work::Request | Work::Bomb => {}
                    }
                    match delivery.acker.ack(BasicAckOptions::default()).await {
                        Ok(_) => settled.one(),
                        Err(error) => eprintln!("raw ack failed: {error}"),
                    }
                    drop(slot);
                });
            }
        }
    }
    if done.load(Ordering::Acquire) < spec.count {
        let _ = tokio::time::timeout_at(deadline, finished.notified()).await;
    }
    let report = finish(done.load(Ordering::Acquire), max_in_flight, spec.prefetch)?;
    connection.close(200, "bench done".into()).await?;
    Ok(report)
}

/// Counts settled deliveries and wakes the consumer loop at the last one.
struct Settled {
    done: Arc<AtomicU64>,
    finished: Arc<Notify>,
    count: u64,
}

impl Settled {
    fn one(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.count {
            self.finished.notify_one();
        }
    }
}

/// Decode, publish the result (mandatory, confirmed), then ack the input.
///
/// The usual hand-written shape: every task publishes on one shared confirm channel. It has
/// flaws the framework's publisher avoids (see `rmq_consumer::publisher`): tasks publishing
/// from two threads at once can be numbered out of wire order, and lapin hands a
/// `basic.return` to whichever confirm completes next, so an unroutable result could be taken
/// as delivered. No result is ever returned or nacked here, so it does not show in the numbers.
async fn raw_request(
    publisher: &Channel,
    exchange: &str,
    reply_key: &str,
    delivery: &Delivery,
) -> Res<()> {
    let task: Task = serde_json::from_slice(&delivery.data)?;
    let body = serde_json::to_vec(&Reply::to(&task))?;
    let confirmation = publisher
        .basic_publish(
            exchange.into(),
            reply_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await?
        .await?;
    if !matches!(confirmation, Confirmation::Ack(None)) {
        return Err(format!("result not confirmed: {confirmation:?}").into());
    }
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The parent: prefills queues, runs children, prints the table.

#[derive(Debug, Clone, Copy)]
struct Sizes {
    s1: u64,
    s2: u64,
    s3: u64,
    latency_secs: u64,
    latency_rate: u64,
    m_small: u64,
    m_large: u64,
}

const FULL: Sizes = Sizes {
    s1: 50_000,
    s2: 30_000,
    s3: 5_000,
    latency_secs: 30,
    latency_rate: 1_000,
    m_small: 10_000,
    m_large: 100_000,
};

const QUICK: Sizes = Sizes {
    s1: 10_000,
    s2: 6_000,
    s3: 1_000,
    latency_secs: 10,
    latency_rate: 1_000,
    m_small: 10_000,
    m_large: 50_000,
};

#[derive(Debug)]
struct Args {
    scenarios: Vec<String>,
    sizes: Sizes,
    /// Runs per cell at prefetch 64 and 256 (the targets). Single runs move by ±10 % on a 2-core
    /// machine that also runs the broker; 9 back-to-back pairs keep the median steady.
    runs: usize,
    /// Runs per cell at prefetch 4, whose drains are long: latency-bound at a few hundred to a
    /// few thousand msg/s.
    runs_low: usize,
    /// Measure only this implementation (for profiling).
    only: Option<Imp>,
    /// Measure only the cells at this prefetch (for profiling).
    prefetch: Option<u16>,
}

impl Args {
    fn runs_for(&self, prefetch: u16) -> usize {
        if prefetch < 64 {
            self.runs_low
        } else {
            self.runs
        }
    }
}

const USAGE: &str = "usage: bench [S1] [S2] [S3] [L] [M] [--quick] [--runs N] \
                     [--only framework|raw] [--prefetch N]";

fn parse_args(args: &[String]) -> Res<Args> {
    let mut scenarios = Vec::new();
    let mut quick = false;
    let mut runs = None;
    let mut only = None;
    let mut prefetch = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--runs" => {
                let n: usize = iter.next().ok_or("--runs needs a number")?.parse()?;
                runs = Some(n.max(1));
            }
            "--only" => {
                only = match iter.next().map(String::as_str) {
                    Some("framework") => Some(Imp::Framework),
                    Some("raw") => Some(Imp::Raw),
                    _ => return Err("--only needs `framework` or `raw`".into()),
                };
            }
            "--prefetch" => {
                prefetch = Some(iter.next().ok_or("--prefetch needs a number")?.parse()?);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => {
                let name = other.to_uppercase();
                if !["S1", "S2", "S3", "L", "M", "H"].contains(&name.as_str()) {
                    return Err(format!("unknown argument `{other}`; {USAGE}").into());
                }
                scenarios.push(name);
            }
        }
    }
    if scenarios.is_empty() {
        scenarios = ["S1", "S2", "S3", "L", "M", "H"]
            .map(str::to_owned)
            .to_vec();
    }
    Ok(Args {
        scenarios,
        sizes: if quick { QUICK } else { FULL },
        runs: runs.unwrap_or(if quick { 1 } else { 9 }),
        // An explicit `--runs` applies to every cell; by default the long prefetch-4 drains
        // run once, to keep the full run near six minutes.
        runs_low: runs.unwrap_or(1),
        only,
        prefetch,
    })
}

/// The parent's broker connection, and every name it created (deleted at the end).
struct Bench {
    url: String,
    connection: Connection,
    channel: Channel,
    exchange: String,
    run_id: String,
    seq: u32,
    queues: Vec<String>,
    started: Instant,
    /// The broker's process, to measure its CPU time per measurement.
    broker: Option<String>,
}

impl Bench {
    async fn connect(url: String) -> Res<Self> {
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .map_err(|e| {
                format!(
                    "the bench needs a running RabbitMQ at {} (set RMQ_CONSUMER_URL): {e}",
                    SecretUrl::new(url.clone())
                )
            })?;
        let channel = connection.create_channel().await?;
        let run_id = format!(
            "{}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        );
        let exchange = format!("rmq-consumer.bench.{run_id}");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let broker = broker_pid(&url);
        Ok(Self {
            url,
            connection,
            channel,
            exchange,
            run_id,
            seq: 0,
            queues: Vec::new(),
            started: Instant::now(),
            broker,
        })
    }

    /// A fresh durable queue, plus its bound result queue for the request-result work.
    async fn fresh_queues(&mut self, tag: &str, work: Work) -> Res<(String, String, String)> {
        self.seq += 1;
        let queue = format!("bench.{tag}.{}.{}", self.run_id, self.seq);
        let results = format!("{queue}.results");
        let reply_key = format!("{queue}.done");
        // The engine declares `<queue>.dlq`; it is deleted with the rest.
        self.queues.extend([
            queue.clone(),
            results.clone(),
            format!("{queue}.dlq"),
            format!("{queue}.suspect"),
        ]);
        self.declare(&queue).await?;
        if work == Work::Request {
            self.declare(&results).await?;
            self.channel
                .queue_bind(
                    results.as_str().into(),
                    self.exchange.as_str().into(),
                    reply_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok((queue, results, reply_key))
    }

    async fn declare(&self, queue: &str) -> Res<()> {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Deletes the queues created so far.
    async fn delete_queues(&mut self) -> Res<()> {
        for queue in std::mem::take(&mut self.queues) {
            self.channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    async fn cleanup(mut self) -> Res<()> {
        // A measurement can fail because the broker closed the connection (e.g. another
        // process ran `rabbitmqctl close_all_connections`): clean up on a fresh one.
        if !self.connection.status().connected() {
            self.connection =
                Connection::connect(&self.url, ConnectionProperties::default()).await?;
        }
        if !self.channel.status().connected() {
            self.channel = self.connection.create_channel().await?;
        }
        self.delete_queues().await?;
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await?;
        self.connection.close(200, "bench done".into()).await?;
        Ok(())
    }

    fn broker_cpu(&self) -> Option<f64> {
        self.broker
            .as_deref()
            .and_then(|pid| cpu_seconds_of(pid).ok())
    }

    /// Waits until the broker is idle: deleting a queue of persistent messages, or taking a
    /// prefill, leaves it writing and compacting for a while, and that work would otherwise land
    /// in the next measurement (either implementation's, at random). At most [`SETTLE_MAX`].
    async fn settle(&self) -> Duration {
        let started = Instant::now();
        let Some(mut before) = self.broker_cpu() else {
            return Duration::ZERO;
        };
        while started.elapsed() < SETTLE_MAX {
            tokio::time::sleep(SETTLE_WINDOW).await;
            let Some(now) = self.broker_cpu() else {
                break;
            };
            if now - before <= SETTLE_WINDOW.as_secs_f64() * SETTLE_IDLE_SHARE {
                break;
            }
            before = now;
        }
        started.elapsed()
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Publishes `count` persistent tasks to `queue` with pipelined confirms.
    async fn prefill(&self, queue: &str, count: u64) -> Res<()> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut pending = VecDeque::with_capacity(PREFILL_WINDOW);
        for id in 0..count {
            let confirm = publish_task(&channel, queue, id, 0).await?;
            pending.push_back(confirm);
            if pending.len() >= PREFILL_WINDOW
                && let Some(oldest) = pending.pop_front()
            {
                confirmed(oldest.await?)?;
            }
        }
        for confirm in pending {
            confirmed(confirm.await?)?;
        }
        channel.close(200, "prefilled".into()).await?;
        Ok(())
    }

    fn spec(
        &self,
        imp: Imp,
        work: Work,
        names: &(String, String, String),
        prefetch: u16,
        count: u64,
    ) -> Spec {
        Spec {
            imp,
            work,
            queue: names.0.clone(),
            exchange: self.exchange.clone(),
            reply_key: names.2.clone(),
            results: names.1.clone(),
            prefetch,
            count,
            timeout_s: 120 + count / 200,
            budget: None,
        }
    }

    /// Prefills a fresh queue with `count` tasks and drains it with one child.
    async fn measure(
        &mut self,
        tag: &str,
        imp: Imp,
        work: Work,
        prefetch: u16,
        count: u64,
    ) -> Res<Report> {
        let names = self.fresh_queues(tag, work).await?;
        let prefill_started = Instant::now();
        self.prefill(&names.0, count).await?;
        let prefill = prefill_started.elapsed();
        let spec = self.spec(imp, work, &names, prefetch, count);
        let settle = self.settle().await;
        let broker_before = self.broker_cpu();
        let mut child = Child::spawn(&spec, &self.url)?;
        let pid = child.process.id().unwrap_or(0);
        let mut report = child
            .report(Duration::from_secs(spec.timeout_s + 30))
            .await?;
        report.broker_cpu_s = broker_before.zip(self.broker_cpu()).map(|(a, b)| b - a);
        self.delete_queues().await?;
        if report.processed < count {
            return Err(format!(
                "{tag} {}: only {} of {count} messages were processed before the timeout",
                imp.label(),
                report.processed
            )
            .into());
        }
        let slots = report.slots.map_or_else(String::new, |slots| {
            format!(
                "; wait {:.2} ms, slots busy {:.1} %, gap {:.3} ms",
                slots.wait_ms,
                slots.busy * 100.0,
                slots.gap_ms
            )
        });
        eprintln!(
            "  {tag:<3} prefetch {prefetch:>3} {:<9}: {:>7} msg/s, {:.3} CPU s/10k \
             (broker {:.3}), peak RSS {:.1} MiB, max in flight {} (prefill {:.1?}, drain {:.1?}, \
             settle {settle:.1?}, pid {pid}){slots}",
            imp.label(),
            thousands(report.rate()),
            report.cpu_per_10k(),
            report.broker_cpu_per_10k(),
            report.rss_mib(),
            report.max_in_flight,
            prefill,
            Duration::from_secs_f64(report.secs),
        );
        Ok(report)
    }

    /// H: `count` copies of a hostile body of about `body_bytes` (`[{"":0},...]`, ~100 times
    /// its size as a `Value`) drained by the framework at prefetch 4 with the handler budget
    /// `budget` (`None`: the default); the consumer's peak RSS is the point.
    async fn measure_bombs(
        &mut self,
        body_bytes: usize,
        budget: Option<u64>,
        count: u64,
    ) -> Res<Report> {
        let names = self.fresh_queues("h", Work::Bomb).await?;
        let body = bomb_body(body_bytes);
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        for _ in 0..count {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    names.0.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            confirmed(confirm.await?)?;
        }
        channel.close(200, "prefilled".into()).await?;
        let mut spec = self.spec(Imp::Framework, Work::Bomb, &names, 4, count);
        spec.budget = budget;
        self.settle().await;
        let mut child = Child::spawn(&spec, &self.url)?;
        let report = child
            .report(Duration::from_secs(spec.timeout_s + 30))
            .await?;
        self.delete_queues().await?;
        if report.processed < count {
            return Err(format!(
                "H: only {} of {count} bodies were settled before the timeout",
                report.processed
            )
            .into());
        }
        eprintln!(
            "  h   {:.1} MiB bodies, budget {}: peak RSS {:.1} MiB",
            body_bytes as f64 / 1_048_576.0,
            budget.map_or("default".to_owned(), |b| format!("{b}")),
            report.rss_mib()
        );
        Ok(report)
    }

    /// Publishes `rate` tasks per second for `secs` seconds to a consumer started on an empty
    /// queue; measures request → result latency at the result queue. Without a consumer
    /// (`imp` is `None`) the tasks go straight to the result queue: the broker's own floor.
    async fn latency(
        &mut self,
        imp: Option<Imp>,
        prefetch: u16,
        rate: u64,
        secs: u64,
    ) -> Res<Latency> {
        let names = self.fresh_queues("l", Work::Request).await?;
        let total = rate * secs;
        let spec = self.spec(
            imp.unwrap_or(Imp::Raw),
            Work::Request,
            &names,
            prefetch,
            total,
        );
        let mut child = match imp {
            Some(_) => {
                let mut child = Child::spawn(&spec, &self.url)?;
                child.ready(Duration::from_secs(60)).await?;
                Some(child)
            }
            None => None,
        };
        let target = if imp.is_some() { &names.0 } else { &names.1 };

        let results_channel = self.connection.create_channel().await?;
        let mut results = results_channel
            .basic_consume(
                names.1.as_str().into(),
                "bench-latency".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let started = self.started;
        let want = usize::try_from(total)?;
        let collector = tokio::spawn(async move {
            let mut latencies_us = Vec::with_capacity(want);
            while latencies_us.len() < want {
                let next = tokio::time::timeout(Duration::from_secs(10), results.next()).await;
                let Ok(Some(Ok(delivery))) = next else { break };
                let now = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(reply) = serde_json::from_slice::<Reply>(&delivery.data) {
                    latencies_us.push(now.saturating_sub(reply.sent_us));
                }
            }
            latencies_us
        });

        let publisher = self.connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let interval = Duration::from_secs(1).as_nanos() / u128::from(rate);
        let begin = tokio::time::Instant::now();
        let mut confirms = Vec::with_capacity(want);
        for id in 0..total {
            let offset = Duration::from_nanos(u64::try_from(interval * u128::from(id))?);
            tokio::time::sleep_until(begin + offset).await;
            let confirm = publish_task(&publisher, target, id, self.now_us()).await?;
            let sent = Instant::now();
            // Awaited concurrently, to time the broker's confirms of these persistent tasks.
            confirms.push(tokio::spawn(async move {
                let confirmation = confirm.await;
                (confirmation, sent.elapsed())
            }));
        }
        let mut confirm_us = Vec::with_capacity(want);
        for confirm in confirms {
            let (confirmation, took) = confirm.await?;
            confirmed(confirmation?)?;
            confirm_us.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        }
        confirm_us.sort_unstable();
        let _ = publisher.close(200, "published".into()).await;
        let mut latencies_us = collector.await?;
        let _ = results_channel.close(200, "collected".into()).await;
        let report = match &mut child {
            Some(child) => Some(child.report(Duration::from_secs(60)).await?),
            None => None,
        };
        self.delete_queues().await?;
        latencies_us.sort_unstable();
        let received = latencies_us.len() as u64;
        let latency = Latency {
            sent: total,
            received,
            p50_ms: percentile(&latencies_us, 0.50),
            p99_ms: percentile(&latencies_us, 0.99),
            max_ms: latencies_us
                .last()
                .map_or(f64::NAN, |&us| us as f64 / 1000.0),
            over_20ms: latencies_us.iter().filter(|&&us| us > 20_000).count(),
            confirm_p99_ms: percentile(&confirm_us, 0.99),
            confirm_max_ms: confirm_us.last().map_or(f64::NAN, |&us| us as f64 / 1000.0),
            report,
        };
        eprintln!(
            "  L   prefetch {prefetch:>3} {:<9}: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, \
             {} over 20 ms, {received}/{total} results, max in flight {}, task confirms p99 \
             {:.1} ms max {:.1} ms",
            imp.map_or("no consumer", Imp::label),
            latency.p50_ms,
            latency.p99_ms,
            latency.max_ms,
            latency.over_20ms,
            report.map_or(0, |r| r.max_in_flight),
            latency.confirm_p99_ms,
            latency.confirm_max_ms,
        );
        Ok(latency)
    }
}

async fn publish_task(
    channel: &Channel,
    queue: &str,
    id: u64,
    sent_us: u64,
) -> Res<lapin::PublisherConfirm> {
    let body = task_body(id, sent_us)?;
    Ok(channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await?)
}

fn confirmed(confirmation: Confirmation) -> Res<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("prefill publish not confirmed: {other:?}").into()),
    }
}

/// `[{"":0},{"":0},...]` of about `bytes` bytes: the cheapest body to send and one of the
/// dearest to decode (each one-key object is a B-tree node of ~600 bytes in a `Value`).
fn bomb_body(bytes: usize) -> Vec<u8> {
    let objects = (bytes / 7).max(1);
    let mut body = Vec::with_capacity(objects * 7 + 1);
    body.push(b'[');
    for index in 0..objects {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(br#"{"":0}"#);
    }
    body.push(b']');
    body
}

/// A JSON task padded to [`BODY_SIZE`] bytes.
fn task_body(id: u64, sent_us: u64) -> Res<Vec<u8>> {
    const PAD: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod \
                       tempor incididunt ut labore et dolore magna aliqua. ut enim ad minim veniam";
    let mut task = TaskBody {
        id,
        sent_us,
        kind: "bench.task",
        user: "user-00042",
        payload: "",
    };
    let bare = serde_json::to_vec(&task)?.len();
    let pad = BODY_SIZE.saturating_sub(bare).min(PAD.len());
    task.payload = &PAD[..pad];
    Ok(serde_json::to_vec(&task)?)
}

fn percentile(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[index] as f64 / 1000.0
}

/// A child process running one measured consumer.
struct Child {
    process: tokio::process::Child,
    events: mpsc::UnboundedReceiver<Event>,
}

enum Event {
    Ready,
    Report(Report),
}

impl Child {
    fn spawn(spec: &Spec, url: &str) -> Res<Self> {
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

    async fn ready(&mut self, timeout: Duration) -> Res<()> {
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Ok(Some(Event::Ready)) => Ok(()),
            Ok(Some(Event::Report(_))) => Err("the child ended before it was ready".into()),
            Ok(None) => Err(self.failure().await),
            Err(_) => Err("the child did not start consuming".into()),
        }
    }

    async fn report(&mut self, timeout: Duration) -> Res<Report> {
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

#[derive(Debug, Clone, Copy)]
struct Latency {
    sent: u64,
    received: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    over_20ms: usize,
    /// Publisher-confirm latency of the tasks (persistent, durable queue): the broker's
    /// persistence, which a result's confirm waits for as well.
    confirm_p99_ms: f64,
    confirm_max_ms: f64,
    /// `None` for the broker-only baseline.
    report: Option<Report>,
}

/// The medians of one table row.
#[derive(Debug, Clone, Copy)]
struct Cell {
    rate: f64,
    cpu_per_10k: f64,
    broker_cpu_per_10k: f64,
    rss_mib: f64,
    /// Medians of the runs' [`Slots`] (S3).
    wait_ms: f64,
    busy: f64,
    gap_ms: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => f64::midpoint(values[n / 2 - 1], values[n / 2]),
    }
}

fn cell(reports: &[Report]) -> Cell {
    let of = |value: fn(&Report) -> f64| median(reports.iter().map(value).collect());
    let of_slots = |value: fn(&Slots) -> f64| {
        median(
            reports
                .iter()
                .filter_map(|r| r.slots.as_ref())
                .map(value)
                .collect(),
        )
    };
    Cell {
        rate: of(Report::rate),
        cpu_per_10k: of(Report::cpu_per_10k),
        broker_cpu_per_10k: of(Report::broker_cpu_per_10k),
        rss_mib: of(Report::rss_mib),
        wait_ms: of_slots(|s| s.wait_ms),
        busy: of_slots(|s| s.busy),
        gap_ms: of_slots(|s| s.gap_ms),
    }
}

/// `value` with `places` decimals, `-` when unknown.
fn decimals(value: f64, places: usize) -> String {
    if value.is_finite() {
        format!("{value:.places$}")
    } else {
        "-".to_owned()
    }
}

fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_owned();
    }
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One row of the throughput table.
struct Row {
    scenario: String,
    prefetch: u16,
    runs: usize,
    framework: Cell,
    /// `None` for framework-only variants.
    raw: Option<Cell>,
    /// Framework / raw throughput: the median of the pairs' ratios.
    ratio: f64,
    /// The lowest and highest pair ratio.
    spread: String,
    note: String,
}

/// The two cells of a comparison, and the framework/raw throughput ratio of each run's pair
/// (the two measured back to back, so a drift of the machine's speed hits both alike).
struct Comparison {
    framework: Cell,
    raw: Cell,
    pair_ratios: Vec<f64>,
}

impl Comparison {
    /// The median of the pairs' ratios (the ratio of the medians without pairs).
    fn ratio(&self) -> f64 {
        if self.pair_ratios.is_empty() {
            self.framework.rate / self.raw.rate
        } else {
            median(self.pair_ratios.clone())
        }
    }

    /// `min-max` of the pairs' ratios, when there are several.
    fn spread(&self) -> String {
        let lowest = self
            .pair_ratios
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let highest = self.pair_ratios.iter().copied().fold(0.0, f64::max);
        if self.pair_ratios.len() > 1 {
            format!("{lowest:.2}-{highest:.2}")
        } else {
            "-".to_owned()
        }
    }
}

/// Runs the framework and the raw consumer alternately, `runs` times each.
async fn compare(
    bench: &mut Bench,
    args: &Args,
    tag: &str,
    work: Work,
    prefetch: u16,
    count: u64,
) -> Res<Comparison> {
    let runs = args.runs_for(prefetch);
    let mut framework = Vec::with_capacity(runs);
    let mut raw = Vec::with_capacity(runs);
    for run in 0..runs {
        let order = if run % 2 == 0 {
            [Imp::Framework, Imp::Raw]
        } else {
            [Imp::Raw, Imp::Framework]
        };
        for imp in order {
            if args.only.is_some_and(|only| only != imp) {
                continue;
            }
            let report = bench.measure(tag, imp, work, prefetch, count).await?;
            match imp {
                Imp::Framework => framework.push(report),
                Imp::Raw => raw.push(report),
            }
        }
    }
    let pair_ratios = framework
        .iter()
        .zip(&raw)
        .map(|(framework, raw)| framework.rate() / raw.rate())
        .collect();
    Ok(Comparison {
        framework: cell(&framework),
        raw: cell(&raw),
        pair_ratios,
    })
}

struct Outcome {
    rows: Vec<Row>,
    latency: Vec<(Option<Imp>, u16, Latency)>,
    memory: Vec<(u64, Report)>,
    /// H: (body size, budget label, report).
    hostile: Vec<(usize, String, Report)>,
    verdicts: Vec<String>,
}

async fn run_all(bench: &mut Bench, args: &Args) -> Res<Outcome> {
    let sizes = args.sizes;
    let mut out = Outcome {
        rows: Vec::new(),
        latency: Vec::new(),
        memory: Vec::new(),
        hostile: Vec::new(),
        verdicts: Vec::new(),
    };
    let wants = |name: &str| args.scenarios.iter().any(|s| s == name);
    let plan: [(&str, &str, Work, u64, &[u16]); 4] = [
        ("S1", "drain-ack", Work::Drain, sizes.s1, &[4, 256]),
        ("S2", "request-result", Work::Request, sizes.s2, &[4, 256]),
        ("S3", "io-bound 10 ms", Work::Sleep, sizes.s3, &[4, 64]),
        (
            "S3",
            "io-bound, tokio::time::sleep",
            Work::TokioSleep,
            sizes.s3,
            &[64],
        ),
    ];
    for (name, label, work, count, prefetches) in plan {
        if !wants(name) {
            continue;
        }
        let cells: Vec<String> = prefetches
            .iter()
            .map(|&prefetch| format!("{} at prefetch {prefetch}", args.runs_for(prefetch)))
            .collect();
        eprintln!(
            "{name} {label}: {} tasks, run(s) per cell: {}",
            thousands(count as f64),
            cells.join(", ")
        );
        for &prefetch in prefetches {
            if args.prefetch.is_some_and(|p| p != prefetch) {
                continue;
            }
            let tag = name.to_lowercase();
            let runs = args.runs_for(prefetch);
            let comparison = compare(bench, args, &tag, work, prefetch, count).await?;
            let (framework, raw) = (comparison.framework, comparison.raw);
            let ratio = comparison.ratio();
            let ideal = f64::from(prefetch) / SLEEP.as_secs_f64();
            let of_ideal = |rate: f64| format!("{:.2}x", rate / ideal);
            let note = match work {
                Work::TokioSleep => format!(
                    "ideal {}/s: framework {}, raw {}; {} (tokio's 1 ms timer wheel)",
                    thousands(ideal),
                    of_ideal(framework.rate),
                    of_ideal(raw.rate),
                    slots_note(&framework, &raw),
                ),
                Work::Sleep => {
                    let share = framework.rate / ideal;
                    out.verdicts.push(format!(
                        "{name} prefetch {prefetch}: framework {share:.2}x of ideal ({} msg/s) \
                         (target >= 0.90): {}",
                        thousands(ideal),
                        verdict(share >= 0.9)
                    ));
                    format!(
                        "ideal {}/s: framework {share:.2}x, raw {}; {}",
                        thousands(ideal),
                        of_ideal(raw.rate),
                        slots_note(&framework, &raw),
                    )
                }
                _ if prefetch == 256 => {
                    out.verdicts.push(format!(
                        "{name} prefetch {prefetch}: framework {ratio:.2}x raw (median of {} \
                         pairs, {}; target >= 0.90): {}",
                        comparison.pair_ratios.len(),
                        comparison.spread(),
                        verdict(ratio >= 0.9)
                    ));
                    String::new()
                }
                _ => String::new(),
            };
            out.rows.push(Row {
                scenario: format!("{name} {label}"),
                prefetch,
                runs,
                framework,
                raw: Some(raw),
                ratio,
                spread: comparison.spread(),
                note,
            });
        }
    }
    if wants("L") {
        let prefetch = 256;
        eprintln!(
            "L latency: {} tasks/s for {} s, prefetch {prefetch}",
            thousands(sizes.latency_rate as f64),
            sizes.latency_secs
        );
        for imp in [Some(Imp::Framework), Some(Imp::Raw), None] {
            let latency = bench
                .latency(imp, prefetch, sizes.latency_rate, sizes.latency_secs)
                .await?;
            if imp == Some(Imp::Framework) {
                out.verdicts.push(format!(
                    "L: framework p99 {:.2} ms (target < 20 ms), {}/{} results: {}",
                    latency.p99_ms,
                    latency.received,
                    latency.sent,
                    verdict(latency.p99_ms < 20.0 && latency.received == latency.sent)
                ));
            }
            out.latency.push((imp, prefetch, latency));
        }
    }
    if wants("M") {
        eprintln!("M memory: framework, prefetch 256, growing backlog");
        for backlog in [sizes.m_small, sizes.m_large] {
            let report = bench
                .measure("m", Imp::Framework, Work::Drain, 256, backlog)
                .await?;
            out.memory.push((backlog, report));
        }
        if let [(_, small), (large_n, large)] = out.memory.as_slice() {
            let growth = large.rss_mib() - small.rss_mib();
            out.verdicts.push(format!(
                "M: framework peak RSS {:.1} MiB at {} tasks vs {:.1} MiB at {} (target < 64 MiB, \
                 no growth with the backlog: {:+.1} MiB): {}",
                large.rss_mib(),
                thousands(*large_n as f64),
                small.rss_mib(),
                thousands(sizes.m_small as f64),
                growth,
                verdict(large.rss_mib() < 64.0 && growth < 0.25 * small.rss_mib().max(4.0))
            ));
        }
    }
    if wants("H") {
        let limit = rmq_consumer::config::DEFAULT_MAX_BODY_SIZE;
        eprintln!("H hostile bodies: framework, prefetch 4, 8 bodies per row");
        let big = limit - 1024;
        let cases: [(usize, Option<u64>, &str); 3] = [
            (big, Some(u64::MAX), "none (as before this change)"),
            (big, None, "default"),
            (limit * 3 / 8, None, "default"),
        ];
        for (bytes, budget, label) in cases {
            let report = bench.measure_bombs(bytes, budget, 8).await?;
            if budget.is_none() {
                out.verdicts.push(format!(
                    "H: {:.1} MiB hostile bodies at the default limits: peak RSS {:.1} MiB \
                     (target < 512 MiB): {}",
                    bytes as f64 / 1_048_576.0,
                    report.rss_mib(),
                    verdict(report.rss_mib() < 512.0)
                ));
            }
            out.hostile.push((bytes, label.to_owned(), report));
        }
    }
    Ok(out)
}

/// The 1-minute load average: other work on the machine skews every number.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// S3's wait, slot use and gap between handlers, framework / raw.
fn slots_note(framework: &Cell, raw: &Cell) -> String {
    format!(
        "wait {:.2} / {:.2} ms, slots busy {:.1} / {:.1} %, gap between handlers {:.2} / {:.2} ms",
        framework.wait_ms,
        raw.wait_ms,
        framework.busy * 100.0,
        raw.busy * 100.0,
        framework.gap_ms,
        raw.gap_ms,
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn print_outcome(out: &Outcome, args: &Args, elapsed: Duration) {
    println!();
    println!(
        "Throughput: medians of `runs` alternating runs; ratio: the median of the per-run \
         framework/raw ratios (each pair measured back to back), with their range; CPU time and \
         peak RSS of the consumer process"
    );
    println!();
    println!(
        "| scenario | prefetch | runs | framework msg/s | raw lapin msg/s | ratio | ratio range \
         | CPU s/10k framework / raw | broker CPU s/10k framework / raw | peak RSS framework / raw \
         | note |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in &out.rows {
        let (fw, raw) = (&row.framework, row.raw.as_ref());
        let or_dash = |f: &dyn Fn(&Cell) -> String| raw.map_or("-".to_owned(), f);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.3} / {} | {} / {} | {:.1} / {} MiB | {} |",
            row.scenario,
            row.prefetch,
            row.runs,
            thousands(fw.rate),
            or_dash(&|c| thousands(c.rate)),
            or_dash(&|_| format!("{:.2}", row.ratio)),
            or_dash(&|_| row.spread.clone()),
            fw.cpu_per_10k,
            or_dash(&|c| format!("{:.3}", c.cpu_per_10k)),
            decimals(fw.broker_cpu_per_10k, 3),
            or_dash(&|c| decimals(c.broker_cpu_per_10k, 3)),
            fw.rss_mib,
            or_dash(&|c| format!("{:.1}", c.rss_mib)),
            row.note
        );
    }
    if !out.latency.is_empty() {
        let sizes = args.sizes;
        println!();
        println!(
            "Latency, request → result (L: {} tasks/s for {} s through S2's path)",
            thousands(sizes.latency_rate as f64),
            sizes.latency_secs
        );
        println!();
        println!(
            "| consumer | prefetch | p50 | p99 | max | over 20 ms | results | task confirm p99 / max \
             | CPU s/10k | peak RSS |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (imp, prefetch, l) in &out.latency {
            let (who, prefetch) = match imp {
                Some(imp) => (imp.label(), prefetch.to_string()),
                None => ("no consumer (broker floor)", "-".to_owned()),
            };
            println!(
                "| {who} | {prefetch} | {:.2} ms | {:.2} ms | {:.1} ms | {} | {}/{} | {:.1} / {:.1} ms \
                 | {} | {} |",
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                l.over_20ms,
                l.received,
                l.sent,
                l.confirm_p99_ms,
                l.confirm_max_ms,
                l.report
                    .map_or("-".to_owned(), |r| format!("{:.3}", r.cpu_per_10k())),
                l.report
                    .map_or("-".to_owned(), |r| format!("{:.1} MiB", r.rss_mib())),
            );
        }
    }
    if !out.memory.is_empty() {
        println!();
        println!("Memory (M: framework, drain-ack, prefetch 256)");
        println!();
        println!("| backlog | msg/s | CPU s/10k | peak RSS |");
        println!("|---:|---:|---:|---:|");
        for (backlog, report) in &out.memory {
            println!(
                "| {} | {} | {:.3} | {:.1} MiB |",
                thousands(*backlog as f64),
                thousands(report.rate()),
                report.cpu_per_10k(),
                report.rss_mib()
            );
        }
    }
    if !out.hostile.is_empty() {
        println!();
        println!(
            "Hostile bodies (H: framework, `[{{\"\":0}},...]` decoded as a `Value`, prefetch 4, \
             8 bodies, default max_body_size {} MiB)",
            rmq_consumer::config::DEFAULT_MAX_BODY_SIZE / 1_048_576
        );
        println!();
        println!("| body | max_in_flight_bytes | decoded / dead-lettered | peak RSS |");
        println!("|---:|---|---:|---:|");
        for (bytes, label, report) in &out.hostile {
            println!(
                "| {:.2} MiB | {label} | {} / {} | {:.1} MiB |",
                *bytes as f64 / 1_048_576.0,
                report.processed.saturating_sub(report.dead_lettered),
                report.dead_lettered,
                report.rss_mib()
            );
        }
    }
    if !out.verdicts.is_empty() {
        println!();
        println!("Targets:");
        for line in &out.verdicts {
            println!("- {line}");
        }
    }
    println!();
    println!("total time {:.0?}", elapsed);
}

async fn parent(args: &[String]) -> Res<()> {
    let args = parse_args(args)?;
    let url = std::env::var("RMQ_CONSUMER_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let started = Instant::now();
    eprintln!(
        "bench against {} ({} CPUs), scenarios {}",
        SecretUrl::new(url.clone()),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        args.scenarios.join(" ")
    );
    let load_before = load_average();
    let mut bench = Bench::connect(url).await?;
    // Ctrl-C stops the measurement (children die with their handles) but not the cleanup.
    let outcome = tokio::select! {
        outcome = run_all(&mut bench, &args) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    let load_after = load_average();
    let cleaned = bench.cleanup().await;
    let outcome = outcome?;
    cleaned?;
    print_outcome(&outcome, &args, started.elapsed());
    println!("load average (1 min) before {load_before}, after {load_after}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(CHILD_ARG) => child(args.get(1).map_or("", String::as_str)).await,
        _ => parent(&args).await,
    }
}

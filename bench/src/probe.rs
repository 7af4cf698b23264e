//! What every measured consumer shares inside its child process (the framework's handlers, the
//! raw consumer, the simulated model): its log level, S3's 10 ms wait, and the records its
//! [`Report`] is built from by [`finish`] — the first delivery, handler runs, the waits and the
//! model's forward passes.

use std::{
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rmq_consumer::config::LogConfig;

use crate::{
    error::Res,
    procfs::{cpu_seconds, peak_rss_kib},
    protocol::{Passes, Report, SLEEP, Slots},
};

/// The log configuration of every measured consumer: warnings only.
pub(crate) fn warn_logs() -> LogConfig {
    LogConfig {
        level: "warn".to_owned(),
        ..LogConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The first delivery, handler runs.

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

/// Handler runs in this process (R: a task answered from a cache or the store does not run).
static RUNS: AtomicU64 = AtomicU64::new(0);

/// Counts one run of a request-result handler.
pub(crate) fn count_run() {
    RUNS.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// S3's waits.

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
static WAITS: Mutex<Vec<(Instant, Instant)>> = Mutex::new(Vec::new());

/// Where an S3 run's time went ([`Slots`]), from the waits recorded since the first delivery
/// at `first`, up to `end`.
fn measure_slots(first: Instant, end: Instant, slots: u16) -> Option<Slots> {
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
    Some(Slots {
        wait_ms: total * 1e3 / waits.len() as f64,
        busy: total / (span * f64::from(slots)),
        gap_ms: gaps.iter().sum::<f64>() * 1e3 / gaps.len().max(1) as f64,
    })
}

// ---------------------------------------------------------------------------------------------
// B's forward passes.

/// The forward passes of this process so far.
static PASSES: Mutex<Passes> = Mutex::new(Passes {
    calls: 0,
    items: 0,
    busy_s: 0.0,
    nominal_s: 0.0,
});

/// Records one forward pass over `items` items that took `took` against the cost model's
/// `cost`.
pub(crate) fn record_pass(items: usize, took: Duration, cost: Duration) {
    if let Ok(mut passes) = PASSES.lock() {
        passes.calls += 1;
        passes.items += items as u64;
        passes.busy_s += took.as_secs_f64();
        passes.nominal_s += cost.as_secs_f64();
    }
}

/// The passes recorded in this process, `None` when there were none.
fn passes() -> Option<Passes> {
    let passes = *PASSES.lock().ok()?;
    (passes.calls > 0).then_some(passes)
}

// ---------------------------------------------------------------------------------------------
// The report.

/// This child's [`Report`], from its first delivery to now; `slots` is its prefetch.
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
        slots: measure_slots(first.at, end, slots),
        broker_cpu_s: None,
        dead_lettered: 0,
        passes: passes(),
        runs: RUNS.load(Ordering::Relaxed),
    })
}

//! A measured child process (this binary re-executed with [`crate::protocol::CHILD_ARG`]): it
//! reads its [`Spec`], runs one consumer — the framework's engine with one of the handlers
//! below (or B's, in [`crate::model`]), or the hand-written one in [`crate::raw`] — until the
//! queue is drained, and prints its [`Report`]. What the handlers share (the waits, the
//! records the report is built from) is in [`crate::probe`]; the parent's side is
//! [`crate::process`].

use std::time::{Duration, Instant};

use rmq_consumer::{
    Config, Engine,
    config::{CacheMode, ConsumerConfig, SecretUrl},
    consumer,
};
use serde_json::Value;

use crate::{
    error::Res,
    probe::{count_run, finish, io_wait, mark_first, tokio_wait, warn_logs},
    protocol::{DEFAULT_URL, Imp, READY_LINE, REPORT_PREFIX, Reply, Report, Spec, Task, Work},
    raw::child_raw,
};

// ---------------------------------------------------------------------------------------------
// The framework's handlers (B's are in `model`).

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

// ---------------------------------------------------------------------------------------------
// The child: one consumer, measured from its first delivery to its last ack.

/// Runs the measurement `spec_json` describes and prints its report.
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

/// The framework's engine with the one handler `spec` names.
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

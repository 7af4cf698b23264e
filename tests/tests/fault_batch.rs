//! The fault plan (tests/RELIABILITY.md) for a batch handler, on a real worker process (the
//! `batch-worker` binary: `batch = 8`, `batch_wait = "20ms"`, configured with `RMQ_CONSUMER_*`
//! variables like a deployed worker): F01b its connection closed by the broker mid-run, F04b
//! `kill -9` mid-run and a restart, F05b SIGTERM under load, F19b poison items in batches,
//! F20b a hanging batch. Each run checks the ledger: every confirmed task is a result or
//! dead-lettered, nothing is left in the queue, duplicates are printed and bounded.
//!
//! The worker logs `batch-worker: batch of N` for each call; the tests read the batch sizes
//! from its log.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    os::unix::process::ExitStatusExt,
    time::{Duration, Instant},
};

use rmq_consumer_tests::{
    Broker, Ledger, LedgerReport, Route, WorkerProcess, broker_url, close_connections_named,
    connections_named, eventually_async, id_of, task, test_config, unique,
};
use serde_json::{Value, json};

/// The worker's batch size (`batch = 8` in `batch-worker.rs`).
const BATCH: usize = 8;
/// The handler's prefetch (`batch × (concurrency + 1)`, the default, set explicitly) and
/// read-ahead: `basic.qos` is their sum, the most deliveries a worker holds unacked.
const PREFETCH: u16 = 16;
const READ_AHEAD: u16 = 8;
const QOS: usize = (PREFETCH + READ_AHEAD) as usize;
/// The shutdown timeout the workers are given.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a `batch-worker` for `route` whose calls take `pass_ms`, with `env` on top.
fn spawn_worker(
    exchange: &str,
    route: &Route,
    pass_ms: u64,
    env: &[(&str, String)],
) -> WorkerProcess {
    let mut all = vec![
        (
            "RMQ_CONSUMER_CONSUMERS__WORK__PREFETCH",
            PREFETCH.to_string(),
        ),
        (
            "RMQ_CONSUMER_CONSUMERS__WORK__READ_AHEAD",
            READ_AHEAD.to_string(),
        ),
        (
            "RMQ_CONSUMER_SHUTDOWN_TIMEOUT",
            format!("{}s", SHUTDOWN_TIMEOUT.as_secs()),
        ),
        ("BATCH_WORKER_PASS_MS", pass_ms.to_string()),
    ];
    all.extend(env.iter().cloned());
    WorkerProcess::spawn(
        env!("CARGO_BIN_EXE_batch-worker"),
        &broker_url(),
        exchange,
        route,
        &all,
    )
}

/// The name the worker's engine gives its connection.
fn connection_name(worker: &WorkerProcess) -> String {
    format!("rmq-consumer[work] pid {}", worker.pid())
}

/// The sizes of the batches a worker's log shows, in order.
fn batch_sizes(log: &str) -> Vec<usize> {
    log.lines()
        .filter_map(|line| line.strip_prefix("batch-worker: batch of "))
        .map(|size| size.trim().parse().unwrap())
        .collect()
}

/// A route for the `work` handler with its queue declared (the same arguments as the worker
/// declares it with: durable classic, no arguments).
async fn route(broker: &mut Broker) -> (String, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let route = Route::new(&mut config, "work", broker);
    broker.declare_queue(&route.queue).await;
    (exchange, route)
}

/// Tasks in the queue before the worker starts, so its batches fill.
async fn preload(broker: &mut Broker, ledger: &mut Ledger, tasks: &[Value]) -> (String, Route) {
    let (exchange, route) = route(broker).await;
    // The default exchange: the worker declares the test's exchange when it starts.
    ledger.publish(broker, "", &route.queue, tasks).await;
    (exchange, route)
}

async fn results(broker: &Broker, route: &Route) -> usize {
    broker.depth(&route.reply_queue).await.unwrap_or(0) as usize
}

async fn drain(ledger: &mut Ledger, broker: &Broker, route: &Route) -> LedgerReport {
    ledger
        .drain_route(
            broker,
            route,
            Duration::from_secs(1),
            Duration::from_secs(90),
        )
        .await;
    ledger.assert_nothing_lost()
}

/// The headers of `id`'s dead-lettered copy.
fn dead_headers<'a>(
    ledger: &'a Ledger,
    id: &str,
) -> &'a std::collections::BTreeMap<String, String> {
    &ledger
        .dead_messages
        .iter()
        .find(|m| id_of(m).as_deref() == Some(id))
        .unwrap_or_else(|| panic!("{id} not dead-lettered"))
        .headers
}

/// F01b: the broker closes the batch worker's connection (`rabbitmqctl close_connection`,
/// only this worker's: other clients of the broker keep theirs) three times during a run.
/// The worker reconnects each time and finishes: lost 0, duplicates within `basic.qos` per
/// close (deliveries whose results were published but whose acks died with the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f01b_connection_closed_mid_run() {
    const TASKS: usize = 3000;
    const CLOSES: usize = 3;
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("F01b");
    let ids = ledger.ids(TASKS);
    let tasks: Vec<Value> = ids.iter().map(|id| task(id, json!({}))).collect();
    let (exchange, route) = preload(&mut broker, &mut ledger, &tasks).await;
    let _cleanup = broker.cleanup_on_panic();

    // 40 ms per batch of 8: about 200 tasks/s, a run of 15 s.
    let mut worker = spawn_worker(&exchange, &route, 40, &[]);
    worker.wait_consumers(&broker, &route.queue, 1).await;
    let name = connection_name(&worker);
    for close in 1..=CLOSES {
        let before = results(&broker, &route).await;
        eventually_async(
            "results since the last close",
            Duration::from_secs(60),
            || async { results(&broker, &route).await >= before + TASKS / 10 },
        )
        .await;
        let closed = close_connections_named(&name, "F01b: closed by the test").await;
        assert_eq!(closed, 1, "the worker has one connection ({name})");
        let at = Instant::now();
        let published = results(&broker, &route).await;
        println!("[F01b] close {close} with {published} results published");
        // Each close hit a run in progress (checked at the close, not after the reconnect
        // polls below, whose `rabbitmqctl` calls can take seconds on a busy machine).
        assert!(published < TASKS, "the run ended before close {close}");
        // Back within the retry interval (500 ms) + 1 s, consuming again; the bound allows for
        // `rabbitmqctl`'s own latency (each poll starts an Erlang VM) on a busy machine.
        eventually_async("the worker reconnects", Duration::from_secs(10), || async {
            connections_named(&name).await.len() == 1
                && broker.consumers(&route.queue).await == Some(1)
        })
        .await;
        println!("[F01b] reconnected after {:?}", at.elapsed());
        assert!(
            at.elapsed() <= Duration::from_millis(1500) + Duration::from_secs(4),
            "reconnect took {:?}",
            at.elapsed()
        );
        assert!(worker.exited().is_none(), "log:\n{}", worker.log());
    }
    let report = drain(&mut ledger, &broker, &route).await;
    let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
    let sizes = batch_sizes(&worker.log());
    println!(
        "[F01b] {} batches for {TASKS} tasks, duplicates={} (bound {})",
        sizes.len(),
        report.duplicates,
        CLOSES * QOS
    );
    assert_eq!(
        report.dead_lettered, 0,
        "a closed connection is not a failure"
    );
    assert!(
        report.duplicates <= CLOSES * QOS,
        "{} duplicates, more than basic.qos per close",
        report.duplicates
    );
    assert!(sizes.iter().all(|&s| (1..=BATCH).contains(&s)), "{sizes:?}");
    broker.cleanup().await;
}

/// F04b: the batch worker is killed with SIGKILL mid-run (a batch in flight, the next one
/// gathered). Its unacked deliveries go back to the queue; a restarted worker finishes the
/// run: lost 0, duplicates within `basic.qos`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f04b_worker_killed_and_restarted() {
    const TASKS: usize = 1500;
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("F04b");
    let ids = ledger.ids(TASKS);
    let tasks: Vec<Value> = ids.iter().map(|id| task(id, json!({}))).collect();
    let (exchange, route) = preload(&mut broker, &mut ledger, &tasks).await;
    let _cleanup = broker.cleanup_on_panic();

    let mut first = spawn_worker(&exchange, &route, 20, &[]);
    first.wait_consumers(&broker, &route.queue, 1).await;
    eventually_async(
        "a fifth of the results",
        Duration::from_secs(60),
        || async { results(&broker, &route).await >= TASKS / 5 },
    )
    .await;
    let status = first.kill9().await;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    let at_kill = results(&broker, &route).await;
    println!("[F04b] worker {status} with {at_kill}/{TASKS} results published");
    assert!(at_kill < TASKS, "the run ended before the kill");
    eventually_async(
        "the broker notices the dead worker",
        Duration::from_secs(10),
        || async { broker.consumers(&route.queue).await == Some(0) },
    )
    .await;

    let mut second = spawn_worker(&exchange, &route, 20, &[]);
    second.wait_consumers(&broker, &route.queue, 1).await;
    let report = drain(&mut ledger, &broker, &route).await;
    let (status, _) = second.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", second.log());
    let sizes = batch_sizes(&second.log());
    let full = sizes.iter().filter(|&&s| s == BATCH).count();
    println!(
        "[F04b] restarted worker: {} batches ({full} full); duplicates={} (bound {QOS})",
        sizes.len(),
        report.duplicates
    );
    assert_eq!(report.dead_lettered, 0, "a killed worker is not a failure");
    assert!(
        report.duplicates <= QOS,
        "{} duplicates, more than basic.qos",
        report.duplicates
    );
    broker.cleanup().await;
}

/// F05b: SIGTERM under load. The worker cancels its consumer; the batch in flight finishes
/// and its items are acked; the items already taken run in full batches (the batch being
/// gathered is handed over at once with every item waiting), not one by one; exit 0 within
/// `shutdown_timeout`. Every other task is still in the queue (no result twice, none lost),
/// and a second worker finishes them: duplicates 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f05b_sigterm_under_load_finishes_the_batches_taken() {
    const TASKS: usize = 200;
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("F05b");
    let ids = ledger.ids(TASKS);
    let tasks: Vec<Value> = ids.iter().map(|id| task(id, json!({}))).collect();
    let (exchange, route) = preload(&mut broker, &mut ledger, &tasks).await;
    let _cleanup = broker.cleanup_on_panic();

    // 500 ms per batch of 8: SIGTERM lands with a batch in flight and 16 more items taken.
    let mut first = spawn_worker(&exchange, &route, 500, &[]);
    first.wait_consumers(&broker, &route.queue, 1).await;
    eventually_async("16 results", Duration::from_secs(30), || async {
        results(&broker, &route).await >= 2 * BATCH
    })
    .await;
    let before = batch_sizes(&first.log()).len();
    let (status, took) = first
        .terminate(SHUTDOWN_TIMEOUT + Duration::from_secs(5))
        .await;
    let log = first.log();
    let sizes = batch_sizes(&log);
    let after = &sizes[before.min(sizes.len())..];
    println!("[F05b] first worker {status} {took:?} after SIGTERM; batches after it: {after:?}");
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0 after a clean drain; log:\n{log}"
    );
    assert!(took <= SHUTDOWN_TIMEOUT, "exit took {took:?}");
    assert!(
        log.contains("consumer cancelled") && log.contains("in-flight deliveries drained"),
        "stop consuming first, then drain; log:\n{log}"
    );
    assert!(!log.contains("shutdown timeout reached"), "log:\n{log}");
    // At most `basic.qos` items were taken, one batch of them in flight: the rest run in
    // full batches (the last may be short), never one by one.
    assert!(
        after.len() <= QOS.div_ceil(BATCH),
        "the items taken ran in {} batches, not full ones: {after:?}",
        after.len()
    );
    if let Some((_, full)) = after.split_last() {
        assert!(full.iter().all(|&s| s == BATCH), "{after:?}");
    }

    // Every task is either answered exactly once or still waiting in the queue.
    let answered = broker.drain(&route.reply_queue).await;
    ledger.record_results(&answered);
    let first_report = ledger.report();
    let waiting = broker
        .assert_answered_or_waiting(&route.queue, first_report.results_total, TASKS, &log)
        .await;
    println!(
        "[F05b] after the first worker: results={} duplicates={} waiting={waiting}",
        first_report.results_total, first_report.duplicates
    );
    assert_eq!(first_report.duplicates, 0, "no result twice");
    assert!(waiting > 0, "the shutdown came after the run");

    let mut second = spawn_worker(&exchange, &route, 5, &[]);
    second.wait_consumers(&broker, &route.queue, 1).await;
    let report = drain(&mut ledger, &broker, &route).await;
    let (status, _) = second
        .terminate(SHUTDOWN_TIMEOUT + Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "log:\n{}", second.log());
    println!("[F05b] duplicates={}", report.duplicates);
    assert_eq!(
        report.duplicates, 0,
        "a graceful shutdown duplicates nothing"
    );
    assert_eq!(report.dead_lettered, 0);
    broker.cleanup().await;
}

/// F19b: poison items ride in batches with good ones: one kind always fails (retried
/// `max_retry_count` times, then dead-lettered as `handler_error`), one is refused
/// (dead-lettered at once as `handler_rejected`). Only they reach the dead-letter queue,
/// each with its own `x-retry-count`; every good item is answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f19b_poison_items_in_a_batch_fail_alone() {
    const TASKS: usize = 400;
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("F19b");
    let ids = ledger.ids(TASKS);
    let fails = |i: usize| i % 25 == 3;
    let refused = |i: usize| i % 40 == 17;
    let tasks: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let fail = if fails(i) {
                json!(true)
            } else if refused(i) {
                json!("dead")
            } else {
                json!(false)
            };
            task(id, json!({ "fail": fail }))
        })
        .collect();
    let (exchange, route) = preload(&mut broker, &mut ledger, &tasks).await;
    let _cleanup = broker.cleanup_on_panic();

    let mut worker = spawn_worker(
        &exchange,
        &route,
        20,
        &[("RMQ_CONSUMER_MAX_RETRY_COUNT", "2".to_owned())],
    );
    worker.wait_consumers(&broker, &route.queue, 1).await;
    let report = drain(&mut ledger, &broker, &route).await;
    let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
    let sizes = batch_sizes(&worker.log());
    let poison: Vec<usize> = (0..TASKS).filter(|&i| fails(i) || refused(i)).collect();
    println!(
        "[F19b] {} batches, {} poison items; results={} dead={} duplicates={}",
        sizes.len(),
        poison.len(),
        report.results_unique,
        report.dead_lettered,
        report.duplicates
    );
    assert_eq!(report.dead_lettered, poison.len(), "only the poison items");
    assert_eq!(report.results_unique, TASKS - poison.len());
    assert_eq!((report.duplicates, report.dead_total), (0, poison.len()));
    for i in poison {
        let headers = dead_headers(&ledger, &ids[i]);
        let (kind, count) = if fails(i) {
            ("handler_error", "2")
        } else {
            ("handler_rejected", "0")
        };
        assert_eq!(headers["x-error-kind"], kind, "{}: {headers:?}", ids[i]);
        assert_eq!(headers["x-retry-count"], count, "{}: {headers:?}", ids[i]);
    }
    assert!(
        sizes.iter().filter(|&&s| s == BATCH).count() * 2 >= sizes.len(),
        "most batches are full: {sizes:?}"
    );
    broker.cleanup().await;
}

/// F20b: a batch that never returns. `message_timeout` (1 s) fails every item of it; each is
/// retried on its own count and the hanging item is dead-lettered as `timeout` with its
/// `x-retry-count`; a batch-mate is dead-lettered only when it met the hanging item again on
/// its retry (at most one batch of them). The worker keeps consuming: the tasks published
/// after it are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f20b_a_hanging_batch_times_out_and_the_worker_keeps_consuming() {
    const TASKS: usize = 100;
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("F20b");
    let ids = ledger.ids(TASKS + 40);
    let hang = 10;
    let tasks: Vec<Value> = ids[..TASKS]
        .iter()
        .enumerate()
        .map(|(i, id)| task(id, json!({ "hang": i == hang })))
        .collect();
    let (exchange, route) = preload(&mut broker, &mut ledger, &tasks).await;
    let _cleanup = broker.cleanup_on_panic();

    let mut worker = spawn_worker(
        &exchange,
        &route,
        20,
        &[
            ("RMQ_CONSUMER_MAX_RETRY_COUNT", "1".to_owned()),
            ("RMQ_CONSUMER_MESSAGE_TIMEOUT", "1s".to_owned()),
        ],
    );
    worker.wait_consumers(&broker, &route.queue, 1).await;
    eventually_async(
        "the hanging item dead-lettered",
        Duration::from_secs(30),
        || async { broker.depth(&route.dlq).await.unwrap_or(0) >= 1 },
    )
    .await;
    // Then the worker still consumes.
    let later: Vec<Value> = ids[TASKS..].iter().map(|id| task(id, json!({}))).collect();
    ledger.publish(&broker, "", &route.queue, &later).await;
    let report = drain(&mut ledger, &broker, &route).await;
    assert!(worker.exited().is_none(), "log:\n{}", worker.log());
    let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
    let log = worker.log();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    let timeouts = log.matches("the batch failed as a whole").count();
    println!(
        "[F20b] results={} dead={} duplicates={}, {timeouts} batch(es) timed out",
        report.results_unique, report.dead_lettered, report.duplicates
    );
    assert_eq!(timeouts, 2, "the hanging item's batch, then its retry's");
    let headers = dead_headers(&ledger, &ids[hang]);
    assert_eq!(headers["x-error-kind"], "timeout", "{headers:?}");
    assert_eq!(headers["x-retry-count"], "1", "{headers:?}");
    for dead in &ledger.dead_messages {
        assert_eq!(
            dead.headers["x-error-kind"], "timeout",
            "{:?}",
            dead.headers
        );
    }
    assert!(
        report.dead_lettered <= BATCH,
        "only the hanging item and batch-mates that met it twice: {report:?}"
    );
    assert_eq!(report.results_unique + report.dead_lettered, TASKS + 40);
    assert_eq!(report.duplicates, 0);
    for id in &ids[TASKS..] {
        assert!(
            ledger.results.contains_key(id),
            "{id} published later is answered"
        );
    }
    broker.cleanup().await;
}

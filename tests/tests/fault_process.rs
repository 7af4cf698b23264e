//! Process-level faults on a real worker process (the `fault-worker` binary, configured with
//! `RMQ_CONSUMER_*` variables like a deployed worker): F04 `kill -9` mid-run and a restart,
//! F05 SIGTERM under load. Each run checks the ledger of tests/RELIABILITY.md.
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
    Broker, Ledger, Route, WorkerProcess, broker_url, eventually_async, test_config, unique,
};
use serde_json::json;

/// The shutdown timeout the workers are given.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a `fault-worker` for `route` whose handler works `sleep_ms` per task.
fn spawn_worker(exchange: &str, route: &Route, prefetch: u16, sleep_ms: u64) -> WorkerProcess {
    WorkerProcess::spawn(
        env!("CARGO_BIN_EXE_fault-worker"),
        &broker_url(),
        exchange,
        route,
        &[
            ("RMQ_CONSUMER_PREFETCH_COUNT", prefetch.to_string()),
            (
                "RMQ_CONSUMER_SHUTDOWN_TIMEOUT",
                format!("{}s", SHUTDOWN_TIMEOUT.as_secs()),
            ),
            ("FAULT_WORKER_SLEEP_MS", sleep_ms.to_string()),
        ],
    )
}

/// Waits until `queue` has `count` consumers.
async fn wait_consumers(broker: &Broker, queue: &str, count: u32, worker: &WorkerProcess) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.consumers(queue).await != Some(count) {
        assert!(
            Instant::now() < deadline,
            "{queue} never had {count} consumer(s); worker log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sets up a route for the `work` handler, declares its queue and preloads `count` tasks.
async fn preload(broker: &mut Broker, ledger: &mut Ledger, count: usize) -> (String, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let route = Route::new(&mut config, "work", broker);
    // Same arguments as the worker declares it with (durable classic, no arguments).
    broker.declare_queue(&route.queue).await;
    ledger
        .preload(broker, "", &route.queue, count, &json!({}))
        .await;
    (exchange, route)
}

/// F04: the worker is killed with SIGKILL mid-run. Its unacked deliveries go back to the
/// queue; a restarted worker finishes the run. Nothing is lost; the duplicates (results
/// published but not acked at the kill) stay within prefetch + in-flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f04_worker_killed_and_restarted() {
    const TASKS: usize = 1500;
    const PREFETCH: u16 = 16;
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("F04");
    let (exchange, route) = preload(&mut broker, &mut ledger, TASKS).await;
    let _cleanup = broker.cleanup_on_panic();

    let mut first = spawn_worker(&exchange, &route, PREFETCH, 5);
    wait_consumers(&broker, &route.queue, 1, &first).await;
    eventually_async(
        "a fifth of the results",
        Duration::from_secs(60),
        || async { broker.depth(&route.reply_queue).await.unwrap_or(0) >= (TASKS / 5) as u32 },
    )
    .await;
    let status = first.kill9().await;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    let results_at_kill = broker.depth(&route.reply_queue).await.unwrap_or(0);
    println!("[F04] worker {status} with {results_at_kill}/{TASKS} results published");
    assert!(
        (results_at_kill as usize) < TASKS,
        "the run ended before the kill"
    );
    eventually_async(
        "the broker notices the dead worker",
        Duration::from_secs(10),
        || async { broker.consumers(&route.queue).await == Some(0) },
    )
    .await;

    let mut second = spawn_worker(&exchange, &route, PREFETCH, 5);
    wait_consumers(&broker, &route.queue, 1, &second).await;
    ledger
        .drain_route(
            &broker,
            &route,
            Duration::from_secs(1),
            Duration::from_secs(60),
        )
        .await;
    let (status, _) = second.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", second.log());
    let report = ledger.assert_nothing_lost();
    println!(
        "[F04] duplicates={} (bound {})",
        report.duplicates,
        2 * (PREFETCH + PREFETCH / 2)
    );
    assert_eq!(report.dead_lettered, 0, "a killed worker is not a failure");
    assert!(
        // Unacked deliveries: the prefetch plus the default read-ahead (prefetch / 2).
        report.duplicates <= usize::from(2 * (PREFETCH + PREFETCH / 2)),
        "{} duplicates, more than prefetch + in-flight",
        report.duplicates
    );
    broker.cleanup().await;
}

/// F05: SIGTERM under load. The worker cancels its consumer, finishes and acks what is in
/// flight, exits 0 within `shutdown_timeout`; every other task is still in the queue (no
/// result twice, none lost), and a second worker finishes them: duplicates 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f05_sigterm_under_load_drains_in_flight_and_exits_0() {
    const TASKS: usize = 400;
    const PREFETCH: u16 = 10;
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("F05");
    let (exchange, route) = preload(&mut broker, &mut ledger, TASKS).await;
    let _cleanup = broker.cleanup_on_panic();

    // 200 ms per task, 10 at a time: 50 tasks/s, so SIGTERM lands with 10 in flight.
    let mut first = spawn_worker(&exchange, &route, PREFETCH, 200);
    wait_consumers(&broker, &route.queue, 1, &first).await;
    eventually_async("50 results", Duration::from_secs(30), || async {
        broker.depth(&route.reply_queue).await.unwrap_or(0) >= 50
    })
    .await;
    let (status, took) = first
        .terminate(SHUTDOWN_TIMEOUT + Duration::from_secs(5))
        .await;
    let log = first.log();
    println!("[F05] first worker {status} {took:?} after SIGTERM");
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

    // Every task is either answered exactly once or still waiting in the queue.
    let answered = broker.drain(&route.reply_queue).await;
    ledger.record_results(&answered);
    let first_report = ledger.report();
    let waiting = broker
        .assert_answered_or_waiting(&route.queue, first_report.results_total, TASKS, &log)
        .await;
    println!(
        "[F05] after the first worker: results={} duplicates={} waiting={waiting}",
        first_report.results_total, first_report.duplicates
    );
    assert_eq!(first_report.duplicates, 0, "no result twice");
    assert!(waiting > 0, "the shutdown came after the run");

    let mut second = spawn_worker(&exchange, &route, PREFETCH * 4, 1);
    wait_consumers(&broker, &route.queue, 1, &second).await;
    ledger
        .drain_route(
            &broker,
            &route,
            Duration::from_secs(1),
            Duration::from_secs(60),
        )
        .await;
    let (status, _) = second
        .terminate(SHUTDOWN_TIMEOUT + Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "log:\n{}", second.log());
    let report = ledger.assert_nothing_lost();
    println!("[F05] duplicates={}", report.duplicates);
    assert_eq!(
        report.duplicates, 0,
        "a graceful shutdown duplicates nothing"
    );
    assert_eq!(report.dead_lettered, 0);
    broker.cleanup().await;
}

/// A second signal cuts the drain short: the worker exits at once with 130, and the deliveries
/// it was still working on go back to the queue (nothing lost, nothing answered twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once_and_loses_nothing() {
    const TASKS: usize = 6;
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("second-signal");
    let (exchange, route) = preload(&mut broker, &mut ledger, TASKS).await;
    let _cleanup = broker.cleanup_on_panic();

    // Each task takes 60 s: the drain after the first SIGTERM would outlast the test.
    let mut worker = spawn_worker(&exchange, &route, 2, 60_000);
    wait_consumers(&broker, &route.queue, 1, &worker).await;
    // Prefetch 2 plus the default read-ahead of 1: three deliveries leave the queue.
    eventually_async("two tasks in flight", Duration::from_secs(20), || async {
        broker.depth(&route.queue).await == Some(TASKS as u32 - 3)
    })
    .await;
    worker.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    worker.signal("-TERM");
    let status = tokio::time::timeout(Duration::from_secs(5), worker.wait())
        .await
        .expect("the second signal must end the process at once");
    println!(
        "[second-signal] {status} {:?} after the second SIGTERM",
        start.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(rmq_consumer::FORCED_EXIT_CODE),
        "log:\n{}",
        worker.log()
    );
    assert!(
        worker.log().contains("second signal"),
        "log:\n{}",
        worker.log()
    );
    eventually_async(
        "in-flight tasks requeued",
        Duration::from_secs(10),
        || async { broker.depth(&route.queue).await == Some(TASKS as u32) },
    )
    .await;
    assert_eq!(
        broker.depth(&route.reply_queue).await,
        Some(0),
        "nothing answered"
    );
    broker.cleanup().await;
}

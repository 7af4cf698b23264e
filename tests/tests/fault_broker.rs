//! Broker-wide faults: F01 (the broker closes every connection, several times during a run)
//! and F02 (the broker application is stopped and started mid-run).
//!
//! They disturb every client of the broker, so they live in this one test binary and take
//! [`GLOBAL`] one at a time. Each run checks the ledger of tests/RELIABILITY.md: every
//! confirmed task id ends as a result or in the dead-letter queue; duplicates are printed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use rmq_consumer::consumer;
use rmq_consumer_tests::{
    Broker, Ledger, MemoryAlarm, Route, Running, StoppedApp, eventually, rabbitmqctl, task,
    test_config, unique,
};
use serde_json::{Value, json};

/// Held by every test of this binary: a broker-wide fault must not hit a neighbour test.
static GLOBAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PREFETCH: u16 = 8;
/// The consumer channel's `basic.qos`: the prefetch plus the default read-ahead (prefetch / 2).
const QOS: u16 = PREFETCH + PREFETCH / 2;

/// Extra work time per task while a fault command runs (`rabbitmqctl` needs 1-2 s to start):
/// the workload keeps running but cannot finish before the fault lands, however fast the
/// machine.
static SLOW_MS: AtomicU64 = AtomicU64::new(0);

/// Slows the handler down until dropped.
struct Slowdown;

impl Slowdown {
    fn new(ms: u64) -> Self {
        SLOW_MS.store(ms, Ordering::Relaxed);
        Self
    }
}

impl Drop for Slowdown {
    fn drop(&mut self) {
        SLOW_MS.store(0, Ordering::Relaxed);
    }
}

/// Works `sleep_ms` (or longer during a fault) and answers with the task id.
#[consumer(
    queue = "tests.fault_broker.steady",
    reply_key = "tests.fault_broker.steady.result"
)]
async fn steady(task: Value) -> Value {
    let ms = task["sleep_ms"]
        .as_u64()
        .unwrap_or(0)
        .max(SLOW_MS.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    json!({"id": task["id"]})
}

/// Works `sleep_ms` and publishes nothing (no `reply_key`).
#[consumer(queue = "tests.fault_broker.sink")]
async fn sink(task: Value) {
    let ms = task["sleep_ms"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn succeeded(running: &Running) -> u64 {
    running.health.snapshot().handlers[0].succeeded
}

/// The prefetch of every consumer on `queue`, from `rabbitmqctl list_consumers`.
async fn consumer_prefetch(queue: &str) -> Vec<String> {
    let listing = rabbitmqctl(&[
        "list_consumers",
        "-q",
        "--no-table-headers",
        "queue_name",
        "prefetch_count",
    ])
    .await;
    listing
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(queue)).then(|| fields.next().unwrap_or("").to_owned())
        })
        .collect()
}

/// F01: `rabbitmqctl close_all_connections` three times while a few thousand tasks are being
/// processed. The engine reconnects within the retry interval (+ 1 s), restores its consumer
/// with its prefetch, and the ledger loses nothing; duplicates stay within prefetch +
/// in-flight per fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f01_connections_closed_repeatedly_during_a_run() {
    const TASKS: usize = 4000;
    const FAULTS: usize = 3;
    let _global = GLOBAL.lock().await;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = PREFETCH;
    let retry_interval = config.retry_connect_interval;
    let route = Route::new(&mut config, "steady", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["steady"]).await;

    let mut ledger = Ledger::new("F01");
    let tasks: Vec<Value> = ledger
        .ids(TASKS)
        .iter()
        .map(|id| task(id, json!({"sleep_ms": 1})))
        .collect();
    let started = Instant::now();
    let confirmed = ledger
        .publish(&broker, &exchange, &route.queue, &tasks)
        .await;
    assert_eq!(confirmed, TASKS, "preload not confirmed");

    let mut slowest = Duration::ZERO;
    let mut last_fault_at = 0;
    for round in 1..=FAULTS {
        let target = (TASKS * (1 + 2 * round) / 10) as u64; // 30 %, 50 %, 70 %
        eventually(
            &format!("{target} tasks done before fault {round}"),
            Duration::from_secs(60),
            || succeeded(&running) >= target,
        )
        .await;
        let before = running.health.snapshot().reconnects;
        let slowdown = Slowdown::new(50);
        rabbitmqctl(&["close_all_connections", "test"]).await;
        let done_before = succeeded(&running);
        last_fault_at = done_before;
        let closed = Instant::now();
        eventually(
            &format!("reconnected and consuming after fault {round}"),
            Duration::from_secs(20),
            || running.reconnected_since(before),
        )
        .await;
        let took = closed.elapsed();
        drop(slowdown);
        slowest = slowest.max(took);
        println!(
            "[F01] fault {round}: closed at {done_before}/{TASKS} done, consuming again {took:?} after rabbitmqctl returned"
        );
    }
    println!(
        "[F01] faults done after {:?}; {}/{TASKS} done",
        started.elapsed(),
        succeeded(&running)
    );
    assert!(
        last_fault_at < TASKS as u64,
        "the run ended before the last fault; the faults did not hit a running workload"
    );
    assert!(
        slowest <= retry_interval + Duration::from_secs(1),
        "reconnect took {slowest:?}, more than the retry interval + 1 s"
    );
    assert_eq!(
        consumer_prefetch(&route.queue).await,
        vec![QOS.to_string()],
        "one consumer with the configured prefetch and read-ahead after the reconnects"
    );

    // The test's own connection was closed too: read back on a fresh one.
    let mut fresh = Broker::connect_patiently(Duration::from_secs(10)).await;
    ledger
        .drain_route(
            &fresh,
            &route,
            Duration::from_secs(1),
            Duration::from_secs(90),
        )
        .await;
    println!("[F01] run and drain took {:?}", started.elapsed());
    let report = ledger.assert_nothing_lost();
    let snapshot = running.health.snapshot();
    println!(
        "[F01] reconnects={} stale_acks={} handler_runs={} duplicates={}",
        snapshot.reconnects,
        snapshot.handlers[0].stale_acks,
        snapshot.handlers[0].handler_runs,
        report.duplicates
    );
    assert!(snapshot.reconnects >= FAULTS as u64, "{snapshot:?}");
    assert_eq!(
        report.dead_lettered, 0,
        "a connection loss is not a failure"
    );
    let bound = FAULTS * 2 * usize::from(QOS);
    assert!(
        report.duplicates <= bound,
        "{} duplicates, more than prefetch + in-flight per fault ({bound})",
        report.duplicates
    );
    running.stop().await.unwrap();
    fresh.adopt(broker);
    fresh.cleanup().await;
}

/// F02: `rabbitmqctl stop_app; sleep 5; rabbitmqctl start_app` mid-run. The engine keeps
/// retrying without crashing, is not connected while the broker is down, reconnects after
/// the restart, and the persistent tasks in the durable queue survive: lost 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f02_broker_app_restart_mid_run() {
    const TASKS: usize = 2500;
    let _global = GLOBAL.lock().await;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = PREFETCH;
    let route = Route::new(&mut config, "steady", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["steady"]).await;

    let mut ledger = Ledger::new("F02");
    ledger
        .preload(
            &broker,
            &exchange,
            &route.queue,
            TASKS,
            &json!({"sleep_ms": 2}),
        )
        .await;
    eventually("a tenth of the tasks done", Duration::from_secs(60), || {
        succeeded(&running) >= (TASKS / 10) as u64
    })
    .await;

    // The guard runs `start_app` even if anything below panics.
    let slowdown = Slowdown::new(50);
    let stopped = StoppedApp::stop().await;
    let done_at_stop = succeeded(&running);
    println!("[F02] broker app stopped at {done_at_stop}/{TASKS} done");
    eventually(
        "the engine notices the broker is gone",
        Duration::from_secs(10),
        || !running.health.snapshot().connected,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let down = running.health.snapshot();
    assert!(!down.connected, "connected while the broker is down?");
    assert!(
        !running.task.is_finished(),
        "the engine gave up while the broker was down"
    );
    assert!(
        done_at_stop < TASKS as u64,
        "the run ended before the fault"
    );
    stopped.start().await;
    let restarted = Instant::now();
    eventually(
        "reconnected and consuming after the restart",
        Duration::from_secs(30),
        || running.reconnected_since(0),
    )
    .await;
    println!(
        "[F02] consuming again {:?} after start_app returned",
        restarted.elapsed()
    );
    drop(slowdown);

    let mut fresh = Broker::connect_patiently(Duration::from_secs(30)).await;
    ledger
        .drain_route(
            &fresh,
            &route,
            Duration::from_secs(1),
            Duration::from_secs(90),
        )
        .await;
    let report = ledger.assert_nothing_lost();
    let snapshot = running.health.snapshot();
    println!(
        "[F02] reconnects={} stale_acks={} duplicates={}",
        snapshot.reconnects, snapshot.handlers[0].stale_acks, report.duplicates
    );
    assert_eq!(report.dead_lettered, 0, "a broker restart is not a failure");
    let bound = 2 * usize::from(QOS);
    assert!(
        report.duplicates <= bound,
        "{} duplicates, more than prefetch + in-flight ({bound})",
        report.duplicates
    );
    running.stop().await.unwrap();
    fresh.adopt(broker);
    fresh.cleanup().await;
}

/// F11: a memory alarm (`set_vm_memory_high_watermark 0`) blocks publishing. The engine
/// reports itself blocked, does not storm retries while results cannot be published, and
/// once the alarm clears every task completes: lost 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_memory_alarm_blocks_then_work_resumes() {
    const TASKS: usize = 200;
    let _global = GLOBAL.lock().await;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = 4;
    config.confirm_timeout = Duration::from_secs(2);
    let route = Route::new(&mut config, "steady", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["steady"]).await;

    let mut ledger = Ledger::new("F11");
    let tasks: Vec<Value> = ledger
        .ids(TASKS)
        .iter()
        .map(|id| task(id, json!({"sleep_ms": 50})))
        .collect();
    assert_eq!(
        ledger
            .publish(&broker, &exchange, &route.queue, &tasks)
            .await,
        TASKS
    );
    eventually("some work done", Duration::from_secs(20), || {
        succeeded(&running) >= 4
    })
    .await;

    let alarm = MemoryAlarm::raise().await;
    eventually("blocked reported", Duration::from_secs(20), || {
        running.health.snapshot().blocked
    })
    .await;
    let runs_at_block = running.health.snapshot().handlers[0].handler_runs;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let snapshot = running.health.snapshot();
    let runs_while_blocked = snapshot.handlers[0].handler_runs - runs_at_block;
    println!(
        "[F11] blocked; handler runs in 4 s: {runs_while_blocked}, succeeded so far {}",
        snapshot.handlers[0].succeeded
    );
    assert!(
        runs_while_blocked <= 4 * 4,
        "no retry storm while blocked: {runs_while_blocked} runs in 4 s"
    );
    drop(alarm);
    eventually("unblocked", Duration::from_secs(30), || {
        !running.health.snapshot().blocked
    })
    .await;
    ledger
        .drain_route(
            &broker,
            &route,
            Duration::from_secs(2),
            Duration::from_secs(90),
        )
        .await;
    let report = ledger.assert_nothing_lost();
    let snapshot = running.health.snapshot();
    println!(
        "[F11] duplicates={} dead_lettered={} blocked_for={:?} reconnects={}",
        report.duplicates, report.dead_lettered, snapshot.blocked_for, snapshot.reconnects
    );
    // Lanes whose confirms timed out during the alarm replaced their channels; nothing of
    // theirs may reach the broker out of order when it unblocks (which would close the
    // connection).
    assert_eq!(snapshot.reconnects, 0, "{snapshot:?}");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A7/A10/A11: SIGTERM during a memory alarm. While the broker blocks the connection nothing
/// the engine writes gets out (results, acks, `basic.cancel`, `channel.close`,
/// `connection.close`); the shutdown still ends within one `shutdown_timeout` (plus a small
/// bound for closing), not when the alarm clears, and not after two drains. What was not
/// settled is redelivered: a second engine started after the alarm answers every task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_shutdown_during_a_memory_alarm_is_bounded() {
    const TASKS: usize = 24;
    const SHUTDOWN: Duration = Duration::from_secs(3);
    const CLOSE_BOUND: Duration = Duration::from_secs(2);
    let _global = GLOBAL.lock().await;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = 4;
    config.shutdown_timeout = SHUTDOWN;
    config.confirm_timeout = Duration::from_secs(30);
    let route = Route::new(&mut config, "steady", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config.clone(), &["steady"]).await;

    let mut ledger = Ledger::new("F11-shutdown");
    let tasks: Vec<Value> = ledger
        .ids(TASKS)
        .iter()
        .map(|id| task(id, json!({"sleep_ms": 300})))
        .collect();
    assert_eq!(
        ledger
            .publish(&broker, &exchange, &route.queue, &tasks)
            .await,
        TASKS
    );
    eventually("some work done", Duration::from_secs(20), || {
        succeeded(&running) >= 1
    })
    .await;
    let alarm = MemoryAlarm::raise().await;
    eventually("blocked reported", Duration::from_secs(20), || {
        running.health.snapshot().blocked
    })
    .await;
    // Let the deliveries at work finish and wait on their blocked result publishes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = Instant::now();
    running.stop.cancel();
    let ended = tokio::time::timeout(
        SHUTDOWN + CLOSE_BOUND + Duration::from_secs(20),
        running.task,
    )
    .await;
    let took = asked.elapsed();
    println!("[F11-shutdown] shutdown during the alarm took {took:?}");
    drop(alarm);
    assert!(
        took <= SHUTDOWN + CLOSE_BOUND,
        "shutdown during a memory alarm took {took:?} (shutdown_timeout {SHUTDOWN:?})"
    );
    let result = ended
        .expect("shutdown did not end")
        .expect("engine task panicked");
    assert!(result.is_ok(), "{result:?}");

    // Nothing lost: a fresh engine answers what the first one left.
    let again = Running::start(config, &["steady"]).await;
    ledger
        .drain_route(
            &broker,
            &route,
            Duration::from_secs(2),
            Duration::from_secs(90),
        )
        .await;
    let report = ledger.assert_nothing_lost();
    println!(
        "[F11-shutdown] duplicates={} dead_lettered={}",
        report.duplicates, report.dead_lettered
    );
    again.stop().await.unwrap();
    broker.cleanup().await;
}

/// A memory alarm that lasts five heartbeats, for a handler that publishes nothing (issue 14,
/// "to verify"): lapin writes no frame while the broker blocks the connection, heartbeats
/// and acks included, so the broker could judge the connection dead after two heartbeats and
/// close it. The engine must come through without a reconnect, and every task is acked once
/// the alarm clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_a_long_alarm_does_not_reset_a_worker_that_publishes_nothing() {
    const TASKS: usize = 40;
    let _global = GLOBAL.lock().await;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = 4;
    config.heartbeat_interval = 2;
    let section = config.consumers.entry("sink".to_owned()).or_default();
    let queue = unique("sink");
    section.queue = Some(queue.clone());
    broker.track_queue(&queue);
    broker.track_queue(&format!("{queue}.suspect"));
    broker.track_queue(&format!("{queue}.dlq"));
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["sink"]).await;
    for i in 0..TASKS {
        let body = serde_json::to_vec(&task(&format!("t{i}"), json!({"sleep_ms": 200}))).unwrap();
        broker
            .publish_raw(&exchange, &queue, &body, Default::default())
            .await;
    }
    eventually("some work done", Duration::from_secs(20), || {
        succeeded(&running) >= 1
    })
    .await;
    // RabbitMQ blocks (and tells `connection.blocked` to) only connections that publish: this
    // one is never blocked, so lapin keeps sending heartbeats and acks.
    let alarm = MemoryAlarm::raise().await;
    let at_alarm = succeeded(&running);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = running.health.snapshot();
    println!(
        "[F11-sink] blocked {}, tasks acked during the alarm {}",
        during.blocked,
        during.handlers[0].succeeded - at_alarm
    );
    drop(alarm);
    eventually("every task acked", Duration::from_secs(60), || {
        succeeded(&running) >= TASKS as u64
    })
    .await;
    let after = running.health.snapshot();
    println!(
        "[F11-sink] reconnects during the alarm {}, after {}; succeeded {}",
        during.reconnects, after.reconnects, after.handlers[0].succeeded
    );
    assert_eq!(
        during.reconnects, 0,
        "the connection was reset during the alarm"
    );
    assert_eq!(
        after.reconnects, 0,
        "the connection was reset after the alarm"
    );
    assert_eq!(broker.depth(&queue).await, Some(0));
    running.stop().await.unwrap();
    broker.cleanup().await;
}

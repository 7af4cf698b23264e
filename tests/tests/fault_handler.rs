//! Handler faults against a running engine: F19 a poison task (always fails) retried through
//! the delay queues then dead-lettered, F20 a hanging handler, F09 a blocking handler that
//! outlives three heartbeats, F25 the same task twice with the result cache on, a panicking
//! handler, forged `x-retry-count` headers, and another user's message with a TTL. Each run
//! checks the ledger of tests/RELIABILITY.md.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    collections::BTreeMap,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant, SystemTime},
};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use rmq_consumer::{Config, HandlerError, HandlerSnapshot, consumer};
use rmq_consumer_tests::{
    self as common, Broker, Ledger, Route, Running, TestUser, eventually, task, test_config, unique,
};
use serde_json::{Value, json};

/// Handler runs per task id, across the tests of this binary (ids are unique per test).
static RUNS: LazyLock<Mutex<BTreeMap<String, u32>>> = LazyLock::new(Mutex::default);

fn count_run(task: &Value) -> String {
    let id = task["id"].as_str().unwrap_or_default().to_owned();
    *RUNS.lock().unwrap().entry(id.clone()).or_default() += 1;
    id
}

fn runs(id: &str) -> u32 {
    RUNS.lock().unwrap().get(id).copied().unwrap_or(0)
}

/// Does what the task's `mode` says: `ok` (the default), `fail`, `panic` or `hang`.
#[consumer(
    queue = "tests.fault_handler.scripted",
    reply_key = "tests.fault_handler.scripted.result"
)]
async fn scripted(task: Value) -> Result<Value, HandlerError> {
    let id = count_run(&task);
    match task["mode"].as_str() {
        Some("fail") => Err(HandlerError::retry("poison: this task always fails")),
        Some("panic") => panic!("poison: this task always panics"),
        Some("hang") => std::future::pending().await,
        _ => Ok(json!({"id": id})),
    }
}

fn task_id(task: &Value) -> String {
    task["id"].as_str().unwrap_or_default().to_owned()
}

/// Answers with the id; the task id is the uuid, so the result cache dedups by it.
#[consumer(
    queue = "tests.fault_handler.deduped",
    reply_key = "tests.fault_handler.deduped.result",
    uuid = "task_id"
)]
async fn deduped(task: Value) -> Value {
    let id = count_run(&task);
    tokio::time::sleep(Duration::from_millis(20)).await;
    json!({"id": id})
}

/// Works 500 ms, then fails (retryable); the task id is the uuid.
#[consumer(
    queue = "tests.fault_handler.deduped_failing",
    reply_key = "tests.fault_handler.deduped_failing.result",
    uuid = "task_id"
)]
async fn deduped_failing(task: Value) -> Result<Value, HandlerError> {
    count_run(&task);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Err(HandlerError::retry("poison: this task always fails"))
}

/// A CPU-bound handler: a plain fn that blocks its thread for `block_ms`.
#[consumer(
    queue = "tests.fault_handler.crunch",
    reply_key = "tests.fault_handler.crunch.result",
    blocking = true
)]
fn crunch(task: Value) -> Value {
    let id = count_run(&task);
    std::thread::sleep(Duration::from_millis(
        task["block_ms"].as_u64().unwrap_or(0),
    ));
    json!({"id": id})
}

/// Handler threads of `overrun` alive now, and the most seen at once.
static OVERRUN_ALIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static OVERRUN_MOST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A blocking handler that holds its thread for `block_ms`, counting the threads alive.
#[consumer(
    queue = "tests.fault_handler.overrun",
    reply_key = "tests.fault_handler.overrun.result",
    blocking = true
)]
fn overrun(task: Value) -> Value {
    use std::sync::atomic::Ordering::SeqCst;
    let id = count_run(&task);
    let alive = OVERRUN_ALIVE.fetch_add(1, SeqCst) + 1;
    OVERRUN_MOST.fetch_max(alive, SeqCst);
    std::thread::sleep(Duration::from_millis(
        task["block_ms"].as_u64().unwrap_or(0),
    ));
    OVERRUN_ALIVE.fetch_sub(1, SeqCst);
    json!({"id": id})
}

fn handler(running: &Running) -> HandlerSnapshot {
    running.health.snapshot().handlers[0].clone()
}

/// A broker, a unique exchange, a config and a route for `name`, after `tune` ran on the
/// config (retry settings must be set before the route names the delay queues).
fn setup(
    broker: &mut Broker,
    name: &str,
    tune: impl FnOnce(&mut Config),
) -> (String, Config, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    tune(&mut config);
    let route = Route::new(&mut config, name, broker);
    (exchange, config, route)
}

async fn drain(ledger: &mut Ledger, broker: &Broker, route: &Route, timeout: Duration) {
    ledger
        .drain(
            broker,
            &route.reply_queue,
            &route.dlq,
            &route.input_queues(),
            Duration::from_millis(500),
            timeout,
        )
        .await;
}

fn dead_message<'a>(ledger: &'a Ledger, id: &str) -> &'a BTreeMap<String, String> {
    &ledger
        .dead_messages
        .iter()
        .find(|m| common::id_of(m).as_deref() == Some(id))
        .unwrap_or_else(|| panic!("{id} not dead-lettered"))
        .headers
}

fn parse_time(text: &str) -> SystemTime {
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("bad time {text:?}: {e}"))
}

/// F19: a poison task (the handler always fails) is retried exactly `max_retry_count` times
/// through the TTL delay queues (`retry_delays` 200 ms then 400 ms, the last one reused), so
/// it takes at least the sum of the delays, then lands in the DLQ with the reason headers.
/// Good tasks around it are answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f19_poison_task_retried_with_backoff_then_dead_lettered() {
    const MAX_RETRIES: u32 = 3;
    let delays = [Duration::from_millis(200), Duration::from_millis(400)];
    // Retry 1 waits 200 ms, retries 2 and 3 wait 400 ms each.
    let minimum = Duration::from_millis(200 + 400 + 400);
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "scripted", |c| {
        c.max_retry_count = MAX_RETRIES;
        c.retry_delays = delays.to_vec();
    });
    assert_eq!(
        route.delay_queues,
        [
            format!("{}.retry.200ms", route.queue),
            format!("{}.retry.400ms", route.queue)
        ]
    );
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["scripted"]).await;
    for queue in &route.delay_queues {
        assert!(
            broker.depth(queue).await.is_some(),
            "delay queue {queue} declared"
        );
    }

    let mut ledger = Ledger::new("F19");
    let ids = ledger.ids(13);
    let tasks: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| task(id, json!({"mode": if i < 3 { "fail" } else { "ok" }})))
        .collect();
    let started = Instant::now();
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks)
        .await;
    eventually(
        "the poison tasks dead-lettered",
        Duration::from_secs(20),
        || handler(&running).dead_lettered == 3,
    )
    .await;
    let took = started.elapsed();
    drain(&mut ledger, &broker, &route, Duration::from_secs(20)).await;
    let report = ledger.assert_nothing_lost();
    println!("[F19] poison tasks dead-lettered after {took:?} (delays sum to {minimum:?})");
    assert_eq!((report.results_unique, report.dead_lettered), (10, 3));
    assert_eq!((report.duplicates, report.dead_total), (0, 3));
    assert!(
        took >= minimum,
        "retried faster than the delays allow: {took:?}"
    );
    for id in &ids[..3] {
        assert_eq!(
            runs(id),
            MAX_RETRIES + 1,
            "{id}: one run plus {MAX_RETRIES} retries"
        );
        let h = dead_message(&ledger, id);
        assert_eq!(h["x-retry-count"], MAX_RETRIES.to_string(), "{h:?}");
        assert_eq!(h["x-error-kind"], "handler_error", "{h:?}");
        assert_eq!(h["x-original-queue"], route.queue, "{h:?}");
        assert!(
            h["x-death-reason"].starts_with("retries exhausted"),
            "{h:?}"
        );
        assert!(h["x-last-error"].contains("poison"), "{h:?}");
        let first = parse_time(&h["x-first-failure-at"]);
        let last = parse_time(&h["x-last-failure-at"]);
        let spread = last.duration_since(first).unwrap();
        assert!(
            spread >= minimum - Duration::from_millis(50),
            "first to last failure {spread:?}, delays sum to {minimum:?}"
        );
    }
    for id in &ids[3..] {
        assert_eq!(runs(id), 1, "{id}");
    }
    let h = handler(&running);
    assert_eq!(h.retried, 3 * u64::from(MAX_RETRIES));
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// F20: a handler that never returns. `message_timeout` (1 s) fires, the slot is released
/// (with concurrency 1 the tasks queued behind it still complete), the task is retried and
/// then dead-lettered with `x-error-kind = timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f20_hanging_handler_times_out_and_releases_its_slot() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "scripted", |c| {
        c.max_retry_count = 1;
        c.message_timeout = Duration::from_secs(1);
        c.prefetch_count = 1;
    });
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["scripted"]).await;
    let mut ledger = Ledger::new("F20");
    let ids = ledger.ids(6);
    let tasks: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| task(id, json!({"mode": if i == 0 { "hang" } else { "ok" }})))
        .collect();
    let started = Instant::now();
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks)
        .await;
    eventually(
        "the tasks behind the hanging one",
        Duration::from_secs(10),
        || handler(&running).succeeded == 5,
    )
    .await;
    let others_done = started.elapsed();
    drain(&mut ledger, &broker, &route, Duration::from_secs(20)).await;
    let report = ledger.assert_nothing_lost();
    println!("[F20] the other tasks done after {others_done:?}");
    assert_eq!((report.results_unique, report.dead_lettered), (5, 1));
    assert_eq!(report.duplicates, 0);
    assert_eq!(runs(&ids[0]), 2, "one run and one retry, each timed out");
    let h = dead_message(&ledger, &ids[0]);
    assert_eq!(h["x-error-kind"], "timeout", "{h:?}");
    assert_eq!(h["x-retry-count"], "1", "{h:?}");
    assert!(
        others_done < Duration::from_secs(3),
        "the slot was released after the timeout"
    );
    assert_eq!(handler(&running).in_flight, 0);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// F09: a blocking plain-fn handler (`blocking = true`) that blocks its thread for longer
/// than three heartbeats (heartbeat 2 s), four at a time on a two-thread runtime. It runs on
/// the blocking pool, so heartbeats keep flowing: the connection is never dropped, every
/// task is answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f09_blocking_handler_does_not_starve_heartbeats() {
    const BLOCK: Duration = Duration::from_millis(6500);
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "crunch", |c| {
        c.heartbeat_interval = 2;
        c.prefetch_count = 4;
    });
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["crunch"]).await;
    let mut ledger = Ledger::new("F09");
    let tasks: Vec<Value> = ledger
        .ids(4)
        .iter()
        .map(|id| task(id, json!({"block_ms": BLOCK.as_millis()})))
        .collect();
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks)
        .await;
    eventually("all four blocking", Duration::from_secs(5), || {
        handler(&running).in_flight == 4
    })
    .await;
    let deadline = Instant::now() + BLOCK;
    while Instant::now() < deadline {
        let s = running.health.snapshot();
        assert!(
            s.connected && s.reconnects == 0,
            "connection dropped: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drain(&mut ledger, &broker, &route, Duration::from_secs(20)).await;
    let report = ledger.assert_nothing_lost();
    let s = running.health.snapshot();
    println!(
        "[F09] reconnects={} stale_acks={} duplicates={}",
        s.reconnects, s.handlers[0].stale_acks, report.duplicates
    );
    assert_eq!(s.reconnects, 0, "the heartbeat kept the connection");
    assert_eq!(report.duplicates, 0);
    assert_eq!(s.handlers[0].handler_runs, 4);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A blocking handler that overruns `message_timeout` cannot be stopped (a thread cannot be
/// cancelled): its message is retried, but its thread runs on. The slot it ran in waits for
/// that thread before it takes the next delivery, so a handler never has more threads alive
/// than delivery slots (they used to pile up, one more per overrun, until tokio's pool of
/// 512 blocking threads ran out). Here: one slot, tasks that block 2.5 s against a 1 s
/// timeout, then quick ones; at most one handler thread alive at any time, every task
/// answered or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overrun_blocking_handler_holds_its_slot() {
    let mut broker = Broker::connect().await;
    let (exchange, mut config, route) = setup(&mut broker, "overrun", |c| {
        c.prefetch_count = 1;
        c.max_retry_count = 0;
    });
    config
        .consumers
        .entry("overrun".to_owned())
        .or_default()
        .timeout = Some(Duration::from_secs(1));
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["overrun"]).await;
    let mut ledger = Ledger::new("overrun");
    let ids = ledger.ids(6);
    let tasks: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| task(id, json!({"block_ms": if i < 2 { 2500 } else { 10 }})))
        .collect();
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks)
        .await;
    drain(&mut ledger, &broker, &route, Duration::from_secs(30)).await;
    let report = ledger.assert_nothing_lost();
    let most = OVERRUN_MOST.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "[overrun] most handler threads alive at once: {most}; results {} dead-lettered {}",
        report.results_unique, report.dead_lettered
    );
    assert_eq!(
        report.dead_lettered, 2,
        "the two overruns timed out: {report:?}"
    );
    assert_eq!(report.results_unique, 4);
    assert_eq!(most, 1, "an overrun thread ran beside the next delivery");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// F25: every task published twice with the result cache on: the handler runs once per task
/// id, and each delivery still gets its result (the second answered from the cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f25_duplicate_task_runs_the_handler_once_with_the_cache() {
    const TASKS: usize = 20;
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "deduped", |c| {
        c.enable_result_cache = true;
        c.result_cache_size = 100;
        c.prefetch_count = 8;
    });
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["deduped"]).await;
    let mut ledger = Ledger::new("F25");
    let ids = ledger.ids(TASKS);
    let once: Vec<Value> = ids.iter().map(|id| task(id, json!({}))).collect();
    // Twice, interleaved: some copies are in flight together (single flight), some after.
    let twice: Vec<Value> = once.iter().flat_map(|t| [t.clone(), t.clone()]).collect();
    ledger
        .publish(&broker, &exchange, &route.queue, &twice)
        .await;
    drain(&mut ledger, &broker, &route, Duration::from_secs(20)).await;
    let report = ledger.assert_nothing_lost();
    let h = handler(&running);
    println!(
        "[F25] deliveries={} handler_runs={} cache_hits={} results_total={} duplicates={} (by design: each task sent twice)",
        h.received, h.handler_runs, h.cache_hits, report.results_total, report.duplicates
    );
    assert_eq!(report.results_unique, TASKS);
    assert_eq!(report.results_total, 2 * TASKS, "both deliveries answered");
    assert_eq!(
        h.handler_runs, TASKS as u64,
        "one handler execution per task id"
    );
    assert_eq!(h.cache_hits, TASKS as u64);
    for id in &ids {
        assert_eq!(runs(id), 1, "{id}");
    }
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A12: four deliveries of one failing task at once, with the result cache on. They share
/// one handler run and its failure (each then goes on by its own count: here straight to the
/// dead-letter queue), instead of running one after another, N × the handler's time (with a
/// hanging task, N × `message_timeout`, past the broker's delivery-ack timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a12_concurrent_deliveries_of_a_failing_task_share_one_run() {
    const COPIES: usize = 4;
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "deduped_failing", |c| {
        c.enable_result_cache = true;
        c.prefetch_count = COPIES as u16;
        c.max_retry_count = 0;
    });
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["deduped_failing"]).await;
    let id = unique("task");
    let body = serde_json::to_vec(&task(&id, json!({}))).unwrap();
    for _ in 0..COPIES {
        broker
            .publish_raw(&exchange, &route.queue, &body, BasicProperties::default())
            .await;
    }
    let dead = broker
        .collect(&route.dlq, COPIES, Duration::from_secs(30))
        .await;
    let h = handler(&running);
    println!(
        "[A12] deliveries={} handler_runs={} dead_lettered={}",
        h.received, h.handler_runs, h.dead_lettered
    );
    assert_eq!(
        dead.len(),
        COPIES,
        "every delivery dead-lettered on its own"
    );
    assert_eq!(runs(&id), 1, "the concurrent deliveries shared one run");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A panicking handler is caught at the task boundary: retried, then dead-lettered with
/// `x-error-kind = handler_panicked`; the worker keeps running and answers the next tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_retried_then_dead_lettered_and_the_worker_lives() {
    const MAX_RETRIES: u32 = 2;
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "scripted", |c| {
        c.max_retry_count = MAX_RETRIES;
    });
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["scripted"]).await;
    let mut ledger = Ledger::new("panic");
    let ids = ledger.ids(3);
    let panics: Vec<Value> = ids
        .iter()
        .map(|id| task(id, json!({"mode": "panic"})))
        .collect();
    ledger
        .publish(&broker, &exchange, &route.queue, &panics)
        .await;
    eventually(
        "the panicking tasks dead-lettered",
        Duration::from_secs(20),
        || handler(&running).dead_lettered == 3,
    )
    .await;
    assert!(
        !running.task.is_finished(),
        "the engine survived the panics"
    );
    let after: Vec<Value> = ledger
        .ids(10)
        .iter()
        .map(|id| task(id, json!({})))
        .collect();
    ledger
        .publish(&broker, &exchange, &route.queue, &after)
        .await;
    drain(&mut ledger, &broker, &route, Duration::from_secs(20)).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.dead_lettered), (10, 3));
    assert_eq!(report.duplicates, 0);
    for id in &ids {
        assert_eq!(runs(id), MAX_RETRIES + 1);
        let h = dead_message(&ledger, id);
        assert_eq!(h["x-error-kind"], "handler_panicked", "{h:?}");
        assert_eq!(h["x-retry-count"], MAX_RETRIES.to_string(), "{h:?}");
        assert!(h["x-last-error"].contains("always panics"), "{h:?}");
    }
    let s = running.health.snapshot();
    assert!(s.connected && s.handlers[0].consuming, "{s:?}");
    assert_eq!(s.reconnects, 0);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// Forged `x-retry-count` headers, as documented in `amqp.rs`: any integer width and a string
/// of digits are counted; a negative, float, huge or non-digit value counts as exhausted (the
/// task is dead-lettered after its first failure, never given extra retries). A task that
/// succeeds is answered whatever its header says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_retry_count_headers_are_counted_or_exhausted() {
    const MAX_RETRIES: u32 = 3;
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "scripted", |c| {
        c.max_retry_count = MAX_RETRIES;
    });
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["scripted"]).await;
    let mut ledger = Ledger::new("headers");
    // (header value, mode, expected handler runs, expected x-retry-count in the DLQ or None
    // when the task succeeds).
    let cases: Vec<(AMQPValue, &str, u32, Option<&str>)> = vec![
        (AMQPValue::LongString("2".into()), "fail", 2, Some("3")),
        (AMQPValue::LongString(" 1 ".into()), "fail", 3, Some("3")),
        (AMQPValue::LongInt(1), "fail", 3, Some("3")),
        (AMQPValue::ShortShortUInt(2), "fail", 2, Some("3")),
        (AMQPValue::LongLongInt(3), "fail", 1, Some("3")),
        (AMQPValue::LongLongInt(-1), "fail", 1, Some("0")),
        (AMQPValue::Double(1.0), "fail", 1, Some("0")),
        (AMQPValue::Float(2.5), "fail", 1, Some("0")),
        (AMQPValue::LongLongInt(i64::MAX), "fail", 1, Some("0")),
        // The largest count there is: exhausted, and nothing counts past it.
        (AMQPValue::LongUInt(u32::MAX), "fail", 1, Some("4294967295")),
        (
            AMQPValue::LongString("99999999999999999999".into()),
            "fail",
            1,
            Some("0"),
        ),
        (AMQPValue::LongString("two".into()), "fail", 1, Some("0")),
        (AMQPValue::LongString("-2".into()), "fail", 1, Some("0")),
        (AMQPValue::Boolean(true), "fail", 1, Some("0")),
        (AMQPValue::LongLongInt(-1), "ok", 1, None),
        (AMQPValue::LongString("garbage".into()), "ok", 1, None),
    ];
    let ids = ledger.ids(cases.len());
    for (id, (value, mode, _, _)) in ids.iter().zip(&cases) {
        let mut headers = FieldTable::default();
        headers.insert("x-retry-count".into(), value.clone());
        let body = task(id, json!({"mode": mode}));
        let properties = BasicProperties::default().with_headers(headers);
        assert!(
            ledger
                .publish_with(&broker, &exchange, &route.queue, &body, properties)
                .await
        );
    }
    drain(&mut ledger, &broker, &route, Duration::from_secs(20)).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.dead_lettered), (2, 14));
    assert_eq!((report.duplicates, report.dead_total), (0, 14));
    for (id, (value, _, expected_runs, dlq_count)) in ids.iter().zip(&cases) {
        assert_eq!(runs(id), *expected_runs, "{value:?}: handler runs");
        match dlq_count {
            Some(count) => {
                let h = dead_message(&ledger, id);
                assert_eq!(h["x-retry-count"], *count, "{value:?}: {h:?}");
                assert!(
                    h["x-death-reason"].starts_with("retries exhausted"),
                    "{h:?}"
                );
            }
            None => assert!(ledger.results.contains_key(id), "{value:?}: answered"),
        }
    }
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A failing task published by another user, carrying its `user_id` (which the broker checks
/// against the publishing connection) and a per-message TTL, still ends in the dead-letter
/// queue and stays there: the engine's retry and dead-letter copies drop `user_id` (a copy
/// keeping it is refused with a channel error every time, and the message cycles between the
/// queue and the engine forever), and the dead letter drops `expiration` (kept as a header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_message_with_a_ttl_is_dead_lettered_and_kept() {
    const PASSWORD: &str = "test-user-password";
    let mut broker = Broker::connect().await;
    let (_exchange, config, route) = setup(&mut broker, "scripted", |c| {
        c.max_retry_count = 1;
    });
    let _cleanup = broker.cleanup_on_panic();
    let user = TestUser::create(PASSWORD).await;
    let running = Running::start(config, &["scripted"]).await;

    let id = unique("task");
    let publisher = lapin::Connection::connect(&user.url(PASSWORD), Default::default())
        .await
        .unwrap();
    let channel = publisher.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let body = serde_json::to_vec(&task(&id, json!({"mode": "fail"}))).unwrap();
    let confirm = channel
        .basic_publish(
            "".into(),
            route.queue.as_str().into(),
            Default::default(),
            &body,
            BasicProperties::default()
                .with_user_id(user.name.as_str().into())
                .with_expiration("600000".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let _ = publisher.close(200, "bye".into()).await;

    eventually("the task dead-lettered", Duration::from_secs(20), || {
        handler(&running).dead_lettered == 1
    })
    .await;
    let dead = broker
        .channel
        .basic_get(route.dlq.as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("the dead letter is in the dead-letter queue");
    assert_eq!(dead.delivery.data, body);
    let properties = &dead.delivery.properties;
    assert_eq!(properties.user_id(), &None, "user_id dropped");
    assert_eq!(properties.expiration(), &None, "expiration dropped");
    let headers = properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get("x-original-expiration"),
        Some(&AMQPValue::LongString("600000".into()))
    );
    assert_eq!(
        properties.delivery_mode(),
        &Some(2),
        "other properties kept"
    );
    assert_eq!(runs(&id), 2, "one run and one retry");
    running.stop().await.unwrap();
    drop(user);
    broker.cleanup().await;
}

/// A sender allowed to write only to the task exchange cannot make the worker write anywhere
/// else: the `CC`/`BCC` headers (sender-selected distribution: RabbitMQ routes a message to
/// each routing key they list, too) of a failing task are dropped from its retry and
/// dead-letter copies, which the worker publishes with its own, wider permissions. Without
/// that, every copy also landed in the queue the sender named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_headers_never_reach_other_queues() {
    const PASSWORD: &str = "test-user-password";
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "scripted", |c| {
        c.max_retry_count = 1;
    });
    let _cleanup = broker.cleanup_on_panic();
    let victim = unique("victim");
    broker.declare_queue(&victim).await;
    let user = TestUser::with_permissions(
        PASSWORD,
        "^$",
        &format!("^{}$", exchange.replace('.', "\\.")),
        "^$",
    )
    .await;
    let running = Running::start(config, &["scripted"]).await;

    let publisher = lapin::Connection::connect(&user.url(PASSWORD), Default::default())
        .await
        .unwrap();
    let channel = publisher.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let routing = |key: &str| {
        let mut headers = FieldTable::default();
        headers.insert(
            key.into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString(victim.as_str().into())].into()),
        );
        headers
    };
    let failing = unique("task");
    let unparseable = unique("task");
    let bodies = [
        (
            serde_json::to_vec(&task(&failing, json!({"mode": "fail"}))).unwrap(),
            "CC",
        ),
        (format!("not json {unparseable}").into_bytes(), "BCC"),
    ];
    for (body, key) in &bodies {
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                route.queue.as_str().into(),
                Default::default(),
                body,
                BasicProperties::default()
                    .with_headers(routing(key))
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{confirm:?}");
    }
    let _ = publisher.close(200, "bye".into()).await;

    eventually("both tasks dead-lettered", Duration::from_secs(20), || {
        handler(&running).dead_lettered == 2
    })
    .await;
    assert_eq!(
        handler(&running).retried,
        1,
        "the failing task was retried once"
    );
    assert_eq!(
        broker.depth(&victim).await,
        Some(0),
        "no copy reached the queue the sender named"
    );
    for _ in &bodies {
        let dead = broker
            .channel
            .basic_get(route.dlq.as_str().into(), Default::default())
            .await
            .unwrap()
            .expect("the dead letter is in the dead-letter queue");
        let headers = dead
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        for key in ["CC", "BCC"] {
            assert!(!headers.contains_key(key), "{key} kept: {headers:?}");
        }
    }
    running.stop().await.unwrap();
    drop(user);
    broker.cleanup().await;
}

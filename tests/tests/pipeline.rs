//! The main path against a real broker: consume → handle → confirmed result → ack.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use rmq_consumer::{HandlerError, consumer};
use rmq_consumer_tests::{self as common, Broker, Route, Running, eventually, test_config, unique};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[consumer(
    queue = "tests.pipeline.echo",
    reply_key = "tests.pipeline.echo.result"
)]
async fn echo(data: Value) -> Result<Option<Value>, HandlerError> {
    Ok(Some(
        json!({"code": 200, "message": "success", "data": data}),
    ))
}

#[derive(Debug, Deserialize)]
struct Sum {
    id: u64,
    numbers: Vec<i64>,
}

#[derive(Debug, Serialize)]
struct SumResult {
    id: u64,
    total: i64,
}

fn sum_uuid(task: &Sum) -> String {
    format!("sum-{}", task.id)
}

#[consumer(
    queue = "tests.pipeline.sum",
    reply_key = "tests.pipeline.sum.result",
    uuid = "sum_uuid"
)]
async fn typed_sum(task: Sum) -> SumResult {
    SumResult {
        id: task.id,
        total: task.numbers.iter().sum(),
    }
}

#[consumer(
    queue = "tests.pipeline.upper",
    reply_key = "tests.pipeline.upper.result"
)]
async fn upper(text: String) -> Option<String> {
    (!text.is_empty()).then(|| text.to_uppercase())
}

static CACHED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[consumer(
    queue = "tests.pipeline.cached",
    reply_key = "tests.pipeline.cached.result"
)]
async fn cached(data: Value) -> Value {
    CACHED_RUNS.fetch_add(1, Ordering::SeqCst);
    json!({"seen": data})
}

#[test]
fn handlers_are_plain_functions() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let out = runtime.block_on(echo(json!({"a": 1}))).unwrap();
    assert_eq!(
        out,
        Some(json!({"code": 200, "message": "success", "data": {"a": 1}}))
    );
    let sum = runtime.block_on(typed_sum(Sum {
        id: 7,
        numbers: vec![1, 2, 3],
    }));
    assert_eq!(sum.total, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_1000_tasks_every_result_checked() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = 64;
    let names = Route::new(&mut config, "echo", &mut broker);
    let running = Running::start(config, &["echo"]).await;

    let tasks: Vec<Value> = (0..1000)
        .map(|i| json!({"task_id": i, "text": format!("t{i}")}))
        .collect();
    // Publish through the exchange with the queue's name, as the Python template's publisher does.
    broker.publish_many(&exchange, &names.queue, &tasks).await;
    let results = broker
        .collect(&names.reply_queue, 1000, Duration::from_secs(60))
        .await;
    assert_eq!(results.len(), 1000, "results missing");
    let mut seen = BTreeSet::new();
    for result in &results {
        let body = result.json.as_ref().expect("result is JSON");
        assert_eq!(body["code"], 200);
        let id = body["data"]["task_id"].as_u64().unwrap();
        assert_eq!(body["data"]["text"], format!("t{id}"));
        assert_eq!(result.content_type.as_deref(), Some("application/json"));
        assert_eq!(result.delivery_mode, Some(2), "results are persistent");
        let expected_uuid = rmq_consumer::uuid::md5_json(&tasks[usize::try_from(id).unwrap()]);
        assert_eq!(result.message_id.as_deref(), Some(expected_uuid.as_str()));
        seen.insert(id);
    }
    assert_eq!(seen.len(), 1000, "duplicate or missing task ids");
    eventually("all acked", Duration::from_secs(10), || {
        let h = &running.health.snapshot().handlers[0];
        h.succeeded == 1000 && h.in_flight == 0
    })
    .await;
    assert_eq!(broker.depth(&names.queue).await, Some(0));
    running.stop().await.unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_and_several_handlers_in_one_engine() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let sum = Route::new(&mut config, "typed_sum", &mut broker);
    let up = Route::new(&mut config, "upper", &mut broker);
    let running = Running::start(config, &["typed_sum", "upper"]).await;
    assert_eq!(running.health.snapshot().handlers.len(), 2);

    broker
        .publish_many(
            &exchange,
            &sum.queue,
            &[
                json!({"id": 1, "numbers": [1, 2, 3]}),
                json!({"id": 2, "numbers": [10, -4]}),
            ],
        )
        .await;
    broker
        .publish_many(&exchange, &up.queue, &[json!("hello"), json!("")])
        .await;

    let mut sums = broker
        .collect(&sum.reply_queue, 2, Duration::from_secs(20))
        .await;
    sums.sort_by_key(|r| r.json.as_ref().unwrap()["id"].as_u64());
    assert_eq!(sums.len(), 2);
    assert_eq!(sums[0].json, Some(json!({"id": 1, "total": 6})));
    assert_eq!(
        sums[0].message_id.as_deref(),
        Some("sum-1"),
        "custom uuid fn is the message id"
    );
    assert_eq!(sums[1].json, Some(json!({"id": 2, "total": 6})));

    let uppers = broker
        .collect(&up.reply_queue, 2, Duration::from_secs(5))
        .await;
    assert_eq!(uppers.len(), 1, "None publishes nothing");
    assert_eq!(uppers[0].json, Some(json!("HELLO")));
    eventually("both upper tasks acked", Duration::from_secs(10), || {
        running
            .health
            .snapshot()
            .handlers
            .iter()
            .map(|h| h.succeeded)
            .sum::<u64>()
            == 4
    })
    .await;
    running.stop().await.unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_bodies_are_dead_lettered_and_neighbours_unaffected() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let sum = Route::new(&mut config, "typed_sum", &mut broker);
    let running = Running::start(config, &["typed_sum"]).await;

    let plain = lapin::BasicProperties::default();
    broker
        .publish_json(&exchange, &sum.queue, &json!({"id": 1, "numbers": [1]}))
        .await;
    broker
        .publish_raw(&exchange, &sum.queue, b"\xff\xfe not utf-8", plain.clone())
        .await;
    broker
        .publish_raw(&exchange, &sum.queue, b"{not json", plain.clone())
        .await;
    broker
        .publish_raw(&exchange, &sum.queue, b"", plain.clone())
        .await;
    broker
        .publish_json(&exchange, &sum.queue, &json!({"id": "wrong shape"}))
        .await;
    broker
        .publish_json(&exchange, &sum.queue, &json!({"id": 2, "numbers": [2]}))
        .await;

    let results = broker
        .collect(&sum.reply_queue, 2, Duration::from_secs(20))
        .await;
    let ids: BTreeSet<u64> = results
        .iter()
        .map(|r| r.json.as_ref().unwrap()["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2]), "good neighbours are processed");

    let dead = broker.collect(&sum.dlq, 4, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 4, "every bad body is in the DLQ");
    let kinds: BTreeSet<&str> = dead
        .iter()
        .map(|d| d.headers["x-error-kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["invalid_utf8", "invalid_json", "invalid_shape"])
    );
    for message in &dead {
        assert!(
            message.headers["x-death-reason"].contains("not retryable"),
            "{message:?}"
        );
        assert_eq!(message.headers["x-original-queue"], sum.queue);
    }
    assert!(
        dead.iter().any(|d| d.body == b"\xff\xfe not utf-8"),
        "body kept byte for byte"
    );
    eventually("all settled", Duration::from_secs(10), || {
        let h = &running.health.snapshot().handlers[0];
        h.succeeded == 2 && h.dead_lettered == 4
    })
    .await;
    running.stop().await.unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_result_does_not_ack_the_input_as_success() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.max_retry_count = 2;
    let names = Route::new(&mut config, "echo", &mut broker);
    // No reply queue: nothing is bound to the reply key, so every result is unroutable.
    let section = config.consumers.get_mut("echo").unwrap();
    section.reply_queue = None;
    let running = Running::start(config, &["echo"]).await;

    broker
        .publish_json(&exchange, &names.queue, &json!({"task": "x"}))
        .await;
    let dead = broker.collect(&names.dlq, 1, Duration::from_secs(30)).await;
    assert_eq!(
        dead.len(),
        1,
        "the input ends in the DLQ after its retries, never silently acked"
    );
    assert_eq!(dead[0].headers["x-error-kind"], "result_unroutable");
    assert_eq!(dead[0].headers["x-retry-count"], "2");
    let h = running.health.snapshot().handlers[0].clone();
    assert_eq!(h.succeeded, 0, "never counted as success");
    assert_eq!(h.results_returned, 3, "one return per attempt");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hit_skips_the_handler() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.enable_result_cache = true;
    config.result_cache_size = 16;
    let names = Route::new(&mut config, "cached", &mut broker);
    let running = Running::start(config, &["cached"]).await;

    let task = json!({"task_id": "same", "n": 1});
    broker
        .publish_many(
            &exchange,
            &names.queue,
            &[task.clone(), task.clone(), task, json!({"other": 2})],
        )
        .await;
    let results = broker
        .collect(&names.reply_queue, 4, Duration::from_secs(20))
        .await;
    assert_eq!(
        results.len(),
        4,
        "a cached result is still published for each delivery"
    );
    assert_eq!(
        CACHED_RUNS.load(Ordering::SeqCst),
        2,
        "the handler ran once per distinct task uuid"
    );
    let h = running.health.snapshot().handlers[0].clone();
    assert_eq!(h.cache_hits, 2);
    assert_eq!(h.handler_runs, 2);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_are_declared_when_asked() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.queue_type = rmq_consumer::config::QueueType::Quorum;
    let names = Route::new(&mut config, "echo", &mut broker);
    let running = Running::start(config, &["echo"]).await;
    broker
        .publish_json(&exchange, &names.queue, &json!({"q": 1}))
        .await;
    let results = broker
        .collect(&names.reply_queue, 1, Duration::from_secs(20))
        .await;
    assert_eq!(results.len(), 1);
    let listing =
        common::rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "type"]).await;
    for queue in [&names.queue, &names.reply_queue, &names.dlq] {
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue.as_str()))
            .unwrap_or_else(|| panic!("{queue} not listed:\n{listing}"));
        assert!(line.ends_with("quorum"), "{line}");
    }
    running.stop().await.unwrap();
    broker.cleanup().await;
}

static SCRAMBLED_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Finishes tasks out of delivery order (0-15 ms, by number); every 7th task fails for good.
async fn scramble(task: &Value) -> Result<Value, HandlerError> {
    SCRAMBLED_RUNS.fetch_add(1, Ordering::SeqCst);
    let n = task["n"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(n.wrapping_mul(7919) % 16)).await;
    if n.is_multiple_of(7) {
        return Err(HandlerError::dead_letter("every 7th task fails"));
    }
    Ok(json!({ "n": n }))
}

#[consumer(
    queue = "tests.pipeline.scrambled",
    reply_key = "tests.pipeline.scrambled.result"
)]
async fn scrambled(task: Value) -> Result<Value, HandlerError> {
    scramble(&task).await
}

/// The same, with dead-lettering off: its failures are rejected.
#[consumer(
    queue = "tests.pipeline.scrambled_rejecting",
    reply_key = "tests.pipeline.scrambled_rejecting.result"
)]
async fn scrambled_rejecting(task: Value) -> Result<Value, HandlerError> {
    scramble(&task).await
}

/// The engine acks runs of finished deliveries with one `multiple` ack. Deliveries that finish
/// out of order, interleaved with dead-letter copies (then acked) or rejects, must each be
/// settled exactly once: an ack reaching past a delivery still at work would settle it early
/// (or, with a reject, settle it the wrong way), and one naming a tag already acked makes the
/// broker close the channel (redeliveries, a re-subscription).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_settlements_each_settle_exactly_once() {
    const TASKS: u64 = 2_000;
    const FAILURES: u64 = TASKS / 7;
    let count = |n: u64| usize::try_from(n).unwrap();
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = 64;
    let dead_lettering = Route::new(&mut config, "scrambled", &mut broker);
    let rejecting = Route::new(&mut config, "scrambled_rejecting", &mut broker);
    config
        .consumers
        .entry("scrambled_rejecting".to_owned())
        .or_default()
        .dead_letter = Some(false);
    let running = Running::start(config, &["scrambled", "scrambled_rejecting"]).await;

    let tasks: Vec<Value> = (1..=TASKS).map(|n| json!({ "n": n })).collect();
    for route in [&dead_lettering, &rejecting] {
        broker.publish_many(&exchange, &route.queue, &tasks).await;
    }
    for route in [&dead_lettering, &rejecting] {
        let results = broker
            .collect(
                &route.reply_queue,
                count(TASKS - FAILURES),
                Duration::from_secs(60),
            )
            .await;
        let numbers: BTreeSet<u64> = results
            .iter()
            .map(|r| r.json.as_ref().unwrap()["n"].as_u64().unwrap())
            .collect();
        assert_eq!(
            numbers.len(),
            count(TASKS - FAILURES),
            "a result missing or twice"
        );
        assert!(numbers.iter().all(|n| !n.is_multiple_of(7)));
    }
    let dead = broker
        .collect(
            &dead_lettering.dlq,
            count(FAILURES),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(dead.len(), count(FAILURES));
    eventually("every delivery settled", Duration::from_secs(10), || {
        let s = running.health.snapshot();
        s.handlers
            .iter()
            .all(|h| h.succeeded + h.dead_lettered + h.rejected == TASKS && h.in_flight == 0)
    })
    .await;
    let snapshot = running.health.snapshot();
    assert_eq!(snapshot.reconnects, 0, "the connection was lost");
    for handler in &snapshot.handlers {
        assert_eq!(
            handler.received, TASKS,
            "a delivery came twice: {handler:?}"
        );
        assert_eq!(handler.succeeded, TASKS - FAILURES, "{handler:?}");
        assert_eq!(handler.stale_acks, 0, "{handler:?}");
        let failed = if handler.name == "scrambled" {
            handler.dead_lettered
        } else {
            handler.rejected
        };
        assert_eq!(failed, FAILURES, "{handler:?}");
    }
    assert_eq!(
        SCRAMBLED_RUNS.load(Ordering::SeqCst),
        count(2 * TASKS),
        "a task ran twice"
    );
    for route in [&dead_lettering, &rejecting] {
        assert_eq!(broker.depth(&route.queue).await, Some(0));
    }
    running.stop().await.unwrap();
    broker.cleanup().await;
}

static GATED_NOW: AtomicUsize = AtomicUsize::new(0);
static GATED_MAX: AtomicUsize = AtomicUsize::new(0);

/// Holds each task 30 ms and records how many run at once.
#[consumer(
    queue = "tests.pipeline.gated",
    reply_key = "tests.pipeline.gated.result"
)]
async fn gated(task: Value) -> Value {
    let now = GATED_NOW.fetch_add(1, Ordering::SeqCst) + 1;
    GATED_MAX.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(30)).await;
    GATED_NOW.fetch_sub(1, Ordering::SeqCst);
    task
}

/// `concurrency` bounds the handler invocations at once, below `prefetch` (and the read-ahead
/// on top of it): the deliveries the broker sends ahead wait for a free delivery task, and
/// every one of them is still processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bounds_the_handlers_at_work() {
    const TASKS: usize = 60;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = 8;
    config.concurrency = Some(3);
    let route = Route::new(&mut config, "gated", &mut broker);
    let running = Running::start(config, &["gated"]).await;
    let tasks: Vec<Value> = (0..TASKS).map(|n| json!({ "n": n })).collect();
    broker.publish_many(&exchange, &route.queue, &tasks).await;
    let results = broker
        .collect(&route.reply_queue, TASKS, Duration::from_secs(30))
        .await;
    let numbers: BTreeSet<u64> = results
        .iter()
        .map(|r| r.json.as_ref().unwrap()["n"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers.len(), TASKS, "a result missing or twice");
    assert_eq!(
        GATED_MAX.load(Ordering::SeqCst),
        3,
        "handlers at work at once (concurrency 3, prefetch 8)"
    );
    eventually("every delivery acked", Duration::from_secs(10), || {
        running.health.snapshot().handlers[0].succeeded == TASKS as u64
    })
    .await;
    assert_eq!(broker.depth(&route.queue).await, Some(0));
    running.stop().await.unwrap();
    broker.cleanup().await;
}

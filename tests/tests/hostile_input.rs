//! Requests from publishers that are not trusted, against the real broker `RMQ_TEST_BROKER`
//! selects: what a request's properties may make the worker do.
//!
//! - [`reply_to_policy_limits_where_results_go`]: with `reply_to` restricted to listed
//!   prefixes, a request naming another queue in `reply_to` gets its result on the handler's
//!   `reply_key` instead; the named queue receives nothing. With `reply_to = "ignore"`, even
//!   an allowed-looking `reply_to` is ignored.
//! - [`unroutable_reply_to_is_dead_lettered_without_running_again`]: a `reply_to` naming no
//!   queue is the requester's address gone: the input is dead-lettered after one run
//!   (`x-error-kind = result_unroutable`), never retried through the handler (it ran four
//!   times per task before).
//! - [`memory_is_bounded_by_the_budget_not_the_sender`]: bodies whose decoded size would be
//!   ~100 times their length wait for room in `max_in_flight_bytes` (never more than the
//!   budget decoding at once, whatever the prefetch), one that alone exceeds it is
//!   dead-lettered undecoded (`body_too_large`), as is one above `max_body_size`; no
//!   reconnect, neighbours answered.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    collections::BTreeMap,
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::BasicProperties;
use rmq_consumer::{Config, HandlerSnapshot, config::ReplyToPolicy, consumer};
use rmq_consumer_tests::{
    self as common, Broker, Route, Running, eventually, task, test_config, unique,
};
use serde_json::{Value, json};

/// Handler runs per task id.
static RUNS: LazyLock<Mutex<BTreeMap<String, u32>>> = LazyLock::new(Mutex::default);

fn runs(id: &str) -> u32 {
    RUNS.lock().unwrap().get(id).copied().unwrap_or(0)
}

/// Answers `{"id": <the task's id>}`.
#[consumer(
    queue = "tests.hostile_input.answer",
    reply_key = "tests.hostile_input.answer.result"
)]
async fn answer(task: Value) -> Value {
    let id = task["id"].as_str().unwrap_or_default().to_owned();
    *RUNS.lock().unwrap().entry(id.clone()).or_default() += 1;
    json!({ "id": id })
}

/// Calls of `hold` running now, and the most at once.
static HOLDING: AtomicUsize = AtomicUsize::new(0);
static MOST_HELD: AtomicUsize = AtomicUsize::new(0);

/// Answers `{"id": ...}` after holding its (decoded) task for 300 ms; counts the padded tasks
/// held at once.
#[consumer(
    queue = "tests.hostile_input.hold",
    reply_key = "tests.hostile_input.hold.result"
)]
async fn hold(task: Value) -> Value {
    // Only the padded (dear) tasks count; a small neighbour may run beside them.
    let dear = task.get("pad").is_some();
    if dear {
        let now = HOLDING.fetch_add(1, Ordering::SeqCst) + 1;
        MOST_HELD.fetch_max(now, Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    if dear {
        HOLDING.fetch_sub(1, Ordering::SeqCst);
    }
    json!({ "id": task["id"] })
}

fn setup(broker: &mut Broker, tune: impl FnOnce(&mut Config)) -> (String, Config, Route) {
    setup_handler(broker, "answer", tune)
}

fn setup_handler(
    broker: &mut Broker,
    name: &str,
    tune: impl FnOnce(&mut Config),
) -> (String, Config, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    tune(&mut config);
    let route = Route::new(&mut config, name, broker);
    broker.track_queue(&format!("{}.suspect", route.queue));
    (exchange, config, route)
}

fn handler(running: &Running) -> HandlerSnapshot {
    running.health.snapshot().handlers[0].clone()
}

/// Publishes `{"id": id}` to the work queue with `reply_to`.
async fn request(broker: &Broker, exchange: &str, route: &Route, id: &str, reply_to: &str) {
    let body = serde_json::to_vec(&task(id, json!({}))).unwrap();
    broker
        .publish_raw(
            exchange,
            &route.queue,
            &body,
            BasicProperties::default().with_reply_to(reply_to.into()),
        )
        .await;
}

fn ids(messages: &[common::Received]) -> Vec<String> {
    let mut ids: Vec<String> = messages.iter().filter_map(common::id_of).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_policy_limits_where_results_go() {
    let mut broker = Broker::connect().await;
    let _cleanup = broker.cleanup_on_panic();
    let allowed = format!("rpc.{}", unique("requester"));
    let other = unique("victim");
    broker.declare_queue(&allowed).await;
    broker.declare_queue(&other).await;

    // Prefixes: `rpc.` is honoured, anything else goes to the reply key.
    let (exchange, config, route) = setup(&mut broker, |c| {
        c.reply_to = ReplyToPolicy::Prefixes(vec!["rpc.".to_owned()]);
    });
    let running = Running::start(config, &["answer"]).await;
    let (to_allowed, to_other) = (unique("task"), unique("task"));
    request(&broker, &exchange, &route, &to_allowed, &allowed).await;
    request(&broker, &exchange, &route, &to_other, &other).await;
    let at_allowed = broker.collect(&allowed, 1, Duration::from_secs(10)).await;
    let at_reply_key = broker
        .collect(&route.reply_queue, 1, Duration::from_secs(10))
        .await;
    assert_eq!(ids(&at_allowed), [to_allowed.as_str()]);
    assert_eq!(ids(&at_reply_key), [to_other.as_str()]);
    running.stop().await.unwrap();

    // Ignore: not even an allowed-looking `reply_to` is used.
    let (exchange, config, route) = setup(&mut broker, |c| {
        c.reply_to = ReplyToPolicy::Ignore;
    });
    let running = Running::start(config, &["answer"]).await;
    let ignored = unique("task");
    request(&broker, &exchange, &route, &ignored, &allowed).await;
    let at_reply_key = broker
        .collect(&route.reply_queue, 1, Duration::from_secs(10))
        .await;
    assert_eq!(ids(&at_reply_key), [ignored.as_str()]);
    running.stop().await.unwrap();

    assert_eq!(
        broker.depth(&other).await,
        Some(0),
        "nothing reached {other}"
    );
    assert_eq!(
        broker.depth(&allowed).await,
        Some(0),
        "only the first result"
    );
    for id in [&to_allowed, &to_other, &ignored] {
        assert_eq!(runs(id), 1, "{id} ran once");
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_reply_to_is_dead_lettered_without_running_again() {
    let mut broker = Broker::connect().await;
    let _cleanup = broker.cleanup_on_panic();
    let (exchange, config, route) = setup(&mut broker, |c| c.max_retry_count = 3);
    let running = Running::start(config, &["answer"]).await;
    let id = unique("task");
    request(&broker, &exchange, &route, &id, &unique("nobody")).await;
    eventually("the task dead-lettered", Duration::from_secs(20), || {
        handler(&running).dead_lettered == 1
    })
    .await;
    let snapshot = handler(&running);
    assert_eq!((snapshot.retried, snapshot.results_returned), (0, 1));
    assert_eq!(runs(&id), 1, "the handler ran once");
    let dead = broker.collect(&route.dlq, 1, Duration::from_secs(10)).await;
    assert_eq!(ids(&dead), [id.as_str()]);
    assert_eq!(
        dead[0].headers.get("x-error-kind").map(String::as_str),
        Some("result_unroutable"),
        "{:?}",
        dead[0].headers
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// `{"id": id, "pad": [{"": 0}, ...]}` with `objects` one-key objects: ~7 bytes each on the
/// wire, ~700 once decoded.
fn bomb(id: &str, objects: usize) -> Vec<u8> {
    let pad = vec![r#"{"":0}"#; objects].join(",");
    format!(r#"{{"id": "{id}", "pad": [{pad}]}}"#).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_bounded_by_the_budget_not_the_sender() {
    let mut broker = Broker::connect().await;
    let _cleanup = broker.cleanup_on_panic();
    // 8 MiB in flight; each bomb of 4,000 objects (28 KB) costs ~3 MiB decoded: two at a time
    // fit, though the prefetch would let four run.
    let (exchange, config, route) = setup_handler(&mut broker, "hold", |c| {
        c.prefetch_count = 4;
        c.max_in_flight_bytes = 8 * 1024 * 1024;
        c.max_body_size = 512 * 1024;
    });
    let running = Running::start(config, &["hold"]).await;
    let before = running.health.snapshot().reconnects;
    let publish = |body: Vec<u8>| {
        let (broker, exchange, queue) = (&broker, &exchange, &route.queue);
        async move {
            broker
                .publish_raw(exchange, queue, &body, BasicProperties::default())
                .await;
        }
    };
    let bombs: Vec<String> = (0..6).map(|_| unique("bomb")).collect();
    for id in &bombs {
        publish(bomb(id, 4_000)).await;
    }
    // Alone above the budget (40,000 objects: 280 KB, ~30 MiB decoded) and above
    // max_body_size (600 KB of string): dead-lettered without being decoded.
    let (too_big_decoded, too_long) = (unique("huge"), unique("long"));
    publish(bomb(&too_big_decoded, 40_000)).await;
    let long = serde_json::to_vec(&json!({"id": too_long, "pad": "x".repeat(600 * 1024)})).unwrap();
    publish(long).await;
    let neighbour = unique("task");
    publish(serde_json::to_vec(&task(&neighbour, json!({}))).unwrap()).await;

    let results = broker
        .collect(&route.reply_queue, 7, Duration::from_secs(30))
        .await;
    let mut expected: Vec<String> = bombs.clone();
    expected.push(neighbour.clone());
    expected.sort();
    assert_eq!(ids(&results), expected);
    let dead = broker.collect(&route.dlq, 2, Duration::from_secs(10)).await;
    let mut dead_ids: Vec<String> = dead.iter().filter_map(common::id_of).collect();
    dead_ids.sort();
    let mut dead_expected = vec![too_big_decoded.clone(), too_long.clone()];
    dead_expected.sort();
    assert_eq!(dead_ids, dead_expected);
    for message in &dead {
        assert_eq!(
            message.headers.get("x-error-kind").map(String::as_str),
            Some("body_too_large"),
            "{:?}",
            message.headers
        );
    }
    let reasons: Vec<&str> = dead
        .iter()
        .filter_map(|m| m.headers.get("x-last-error").map(String::as_str))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("max_in_flight_bytes")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("max_body_size")),
        "{reasons:?}"
    );
    let most = MOST_HELD.load(Ordering::SeqCst);
    assert!(
        most <= 2,
        "{most} bombs decoded at once within an 8 MiB budget"
    );
    assert_eq!(running.health.snapshot().reconnects, before);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

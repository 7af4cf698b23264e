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
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

mod common;

use std::{
    collections::BTreeMap,
    sync::{LazyLock, Mutex},
    time::Duration,
};

use common::{Broker, Route, Running, eventually, task, test_config, unique};
use lapin::BasicProperties;
use rmq_consumer::{Config, HandlerSnapshot, config::ReplyToPolicy, consumer};
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

fn setup(broker: &mut Broker, tune: impl FnOnce(&mut Config)) -> (String, Config, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    tune(&mut config);
    let route = Route::new(&mut config, "answer", broker);
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

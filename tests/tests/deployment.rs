//! What a deployment meets beyond the happy path, against the real broker that
//! `RMQ_TEST_BROKER` selects (RabbitMQ 3.10 or 4.0): requests answered through direct
//! reply-to, bodies kept out of the logs, the dead-letter route of quorum work queues,
//! queues declared by an earlier version, retry copies that must survive a missing work
//! queue, and a task that kills its worker.
//!
//! - [`direct_reply_to_answers_once`]: a request whose `reply_to` is `amq.rabbitmq.reply-to`
//!   gets exactly one result on the requester's channel, the handler runs once per request,
//!   nothing is retried, returned or dead-lettered and nothing reaches the handler's
//!   `reply_key` queue. When the requester is gone before the result is published, the
//!   broker drops the result: the input is still acked once, not retried, not dead-lettered.
//! - [`returned_results_log_no_body`]: a worker process whose results are returned
//!   (`reply_to` naming no queue) or dropped (direct reply-to, requester gone) writes no
//!   message or result body to its log at the default level, as text or as the `Debug` of
//!   its bytes (lapin logs a returned message at WARN with its body as `data: [123, 34,
//!   ...]`); the unroutable task still ends in the ledger.
//! - [`quorum_work_queue_dead_letters_past_delivery_limit`]: the engine declares a quorum
//!   work queue with its `delivery_limit` and a dead-letter route to `<queue>.dlq`: a
//!   message nacked back to it more often than the limit lands in the DLQ with an `x-death`
//!   whose reason is `delivery_limit` (instead of being dropped, or cycling forever).
//! - [`existing_queues_without_new_arguments_keep_working_quorum`] / `_classic` / `_mixed`:
//!   a work queue and a delay queue declared the way an earlier version did (without the
//!   new arguments: a quorum work queue with no dead-letter route or delivery limit, a delay
//!   queue that dead-letters at most once) do not stop the engine: it consumes, answers,
//!   and retries through the old delay queue, which it leaves as it is. `_mixed` is a
//!   quorum work queue with a classic delay queue.
//! - [`retry_copy_survives_a_missing_work_queue_quorum`] / `_classic`: a retry copy whose
//!   TTL expires while its work queue does not exist is kept by the (quorum,
//!   `at-least-once`) delay queue and delivered once the work queue is back: the task is
//!   answered, nothing is lost (a classic delay queue dead-letters at most once: the copy
//!   would be dropped).
//! - [`task_that_kills_the_worker_is_dead_lettered_classic`] / `_quorum`: a task that
//!   aborts its worker process is dead-lettered as `worker_lost` after `max_redeliveries`
//!   lost deliveries (the worker-lost guard moves redelivered tasks to `<queue>.suspect`
//!   and runs them one at a time); the worker is restarted at most `max_redeliveries + 1`
//!   times and every other task is answered.
//!
//! Every test uses its own queue names, deletes them at the end and also when it fails
//! ([`Broker::cleanup_on_panic`]), and prints what it measured with `eprintln!`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::process::ExitStatusExt,
    process::ExitStatus,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    message::Delivery,
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use rmq_consumer::{Config, Engine, HandlerError, HandlerSnapshot, config::QueueType, consumer};
use rmq_consumer_tests::{
    self as common, Broker, Ledger, Received, Route, Running, WorkerProcess, broker_url,
    eventually, eventually_async, rabbitmqctl, rabbitmqctl_blocking, task, test_config, unique,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The in-process handler.

/// Handler runs per task id, across the tests of this binary (ids are unique per test).
static RUNS: LazyLock<Mutex<BTreeMap<String, u32>>> = LazyLock::new(Mutex::default);

/// Keys a test has released: a task with `"hold": key` waits in its handler until then.
static RELEASED: LazyLock<Mutex<BTreeSet<String>>> = LazyLock::new(Mutex::default);

fn runs(id: &str) -> u32 {
    RUNS.lock().unwrap().get(id).copied().unwrap_or(0)
}

fn release(key: &str) {
    RELEASED.lock().unwrap().insert(key.to_owned());
}

/// Answers `{"id": <the task's id>}`. A task with `"hold": key` first waits (at most 30 s)
/// until the test calls `release(key)`; a task with `"fail_once": true` fails its first run.
#[consumer(
    queue = "tests.deployment.answer",
    reply_key = "tests.deployment.answer.result"
)]
async fn answer(task: Value) -> Result<Value, HandlerError> {
    let id = task["id"].as_str().unwrap_or_default().to_owned();
    let run = {
        let mut runs = RUNS.lock().unwrap();
        let run = runs.entry(id.clone()).or_default();
        *run += 1;
        *run
    };
    if let Some(key) = task["hold"].as_str() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !RELEASED.lock().unwrap().contains(key) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if task["fail_once"].as_bool() == Some(true) && run == 1 {
        return Err(HandlerError::retry(
            "fail_once: the first run of this task fails",
        ));
    }
    Ok(json!({"id": id}))
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// The direct reply-to pseudo queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The queue where the worker-lost guard parks redelivered tasks.
fn suspect_queue(route: &Route) -> String {
    format!("{}.suspect", route.queue)
}

/// A unique exchange, a config tuned by `tune` (before the route names the delay queues) and
/// a route for `handler`, its suspect queue included, all tracked for cleanup.
fn setup(
    broker: &mut Broker,
    handler: &str,
    tune: impl FnOnce(&mut Config),
) -> (String, Config, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    tune(&mut config);
    let route = Route::new(&mut config, handler, broker);
    broker.track_queue(&suspect_queue(&route));
    (exchange, config, route)
}

/// Like [`Running::start`] for the `answer` handler, but an engine that stops before it
/// consumes fails the test with the engine's error instead of a timeout.
async fn start(config: Config) -> Running {
    let engine = Engine::builder(config).only(["answer"]).build().unwrap();
    let stop = engine.shutdown_token();
    let health = engine.health();
    let task = tokio::spawn(engine.run());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if task.is_finished() {
            panic!("the engine stopped before consuming: {:?}", task.await);
        }
        let snapshot = health.snapshot();
        if snapshot.connected && snapshot.handlers.iter().all(|h| h.consuming) {
            return Running { stop, health, task };
        }
        assert!(
            Instant::now() < deadline,
            "engine not consuming after 20 s: {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn handler(running: &Running) -> HandlerSnapshot {
    running.health.snapshot().handlers[0].clone()
}

/// A header as text: strings as they are, integers in decimal, anything else as `Debug`.
fn header_text(delivery: &Delivery, key: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    Some(match headers.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}

/// A field of the first entry of a message's `x-death` header (an array of tables).
fn x_death_field(delivery: &Delivery, field: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get(field)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// Takes one message from `queue` (acked on receipt), polling for up to `timeout`.
async fn get_one(channel: &Channel, queue: &str, timeout: Duration) -> Option<Delivery> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if let Some(message) = got {
            return Some(message.delivery);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Declares `name` durable with `args` on a throwaway channel; `Err` with the broker's
/// refusal (e.g. PRECONDITION_FAILED when the queue exists with other arguments).
async fn declare(broker: &Broker, name: &str, args: FieldTable) -> Result<(), lapin::Error> {
    let channel = broker.connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(drop);
    if declared.is_ok() {
        let _ = channel.close(200, "declared".into()).await;
    }
    declared
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.as_bytes().to_vec().into())
}

/// The arguments an earlier version declared a delay queue with (classic, at-most-once).
fn legacy_delay_queue_arguments(queue: &str, delay: Duration) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap()),
    );
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(queue));
    args
}

/// A requester for direct reply-to: its own connection and one channel that consumes
/// `amq.rabbitmq.reply-to` (no ack) and publishes its requests (the broker requires both on
/// the same channel), with confirms.
struct Requester {
    connection: Connection,
    channel: Channel,
    replies: lapin::Consumer,
}

impl Requester {
    async fn connect() -> Self {
        let connection = Connection::connect(&broker_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            connection,
            channel,
            replies,
        }
    }

    /// Publishes `body` to `queue` (default exchange, mandatory, confirmed) with
    /// `reply_to = amq.rabbitmq.reply-to` and `correlation_id`.
    async fn request(&self, queue: &str, body: &Value, correlation_id: &str) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &serde_json::to_vec(body).unwrap(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_reply_to(DIRECT_REPLY_TO.into())
                    .with_correlation_id(correlation_id.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "request to {queue} not confirmed: {confirm:?}"
        );
    }

    /// Reads replies until `count` arrived and then nothing more for `quiet` (late
    /// duplicates), or until `timeout`.
    async fn replies(&mut self, count: usize, quiet: Duration, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return out;
            }
            let wait = if out.len() >= count {
                quiet.min(deadline - now)
            } else {
                deadline - now
            };
            match tokio::time::timeout(wait, self.replies.next()).await {
                Ok(Some(Ok(delivery))) => out.push(Received::from(&delivery)),
                Ok(other) => panic!("the reply consumer ended: {other:?}"),
                Err(_) => return out,
            }
        }
    }

    async fn close(self) {
        self.connection
            .close(200, "requester gone".into())
            .await
            .unwrap();
    }
}

/// Sets the broker's `dead_letter_worker_publisher_confirm_timeout` (how long an
/// at-least-once dead-letter worker waits before it tries an unconfirmed or unroutable
/// message again; 3 min by default) and restores the default when dropped, whatever
/// happens to the test. The worker reads it when it starts for a queue: set it before the
/// queue is declared.
#[derive(Debug)]
struct DeadLetterConfirmTimeout;

/// Held by the tests that change `dead_letter_worker_publisher_confirm_timeout`.
static DEAD_LETTER_TIMEOUT_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl DeadLetterConfirmTimeout {
    const DEFAULT_MS: u64 = 180_000;

    async fn set(millis: u64) -> Self {
        let guard = Self;
        rabbitmqctl(&["eval", &Self::expression(millis)]).await;
        guard
    }

    fn expression(millis: u64) -> String {
        format!(
            "application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, {millis})."
        )
    }
}

impl Drop for DeadLetterConfirmTimeout {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl_blocking(&["eval", &Self::expression(Self::DEFAULT_MS)]) {
            eprintln!("could not restore dead_letter_worker_publisher_confirm_timeout: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Worker processes (the `fault-worker` binary, as in fault_process.rs).

/// The shutdown timeout the workers are given.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// SIGABRT, what `std::process::abort()` ends a process with.
const SIGABRT: i32 = 6;

/// Starts a `fault-worker` for `route` (the `work` handler), with `env` on top of the
/// defaults.
fn spawn_worker(exchange: &str, route: &Route, env: &[(&str, String)]) -> WorkerProcess {
    let mut all = vec![(
        "RMQ_CONSUMER_SHUTDOWN_TIMEOUT",
        format!("{}s", SHUTDOWN_TIMEOUT.as_secs()),
    )];
    all.extend(env.iter().map(|(k, v)| (*k, v.clone())));
    WorkerProcess::spawn(
        env!("CARGO_BIN_EXE_fault-worker"),
        &broker_url(),
        exchange,
        route,
        &all,
    )
}

/// Sends SIGTERM and waits for the exit.
async fn terminate(worker: &mut WorkerProcess) -> ExitStatus {
    worker
        .terminate(SHUTDOWN_TIMEOUT + Duration::from_secs(5))
        .await
        .0
}

/// The log lines that contain `canary` as text or as the `Debug` of its bytes (lapin logs a
/// returned message's body as `[123, 34, ...]`).
fn lines_with_canary<'a>(log: &'a str, canary: &str) -> Vec<&'a str> {
    let as_bytes = canary
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    log.lines()
        .filter(|line| line.contains(canary) || line.contains(&as_bytes))
        .collect()
}

/// A route for the worker's `work` handler; the queues are tracked for cleanup.
fn worker_route(broker: &mut Broker) -> (String, Route) {
    let (exchange, _, route) = setup(broker, "work", |_| {});
    (exchange, route)
}

/// Lets a worker declare the topology (with `env`), then stops it: the test publishes into
/// queues declared exactly as the engine declares them, before any worker consumes.
async fn declare_with_worker(
    broker: &Broker,
    exchange: &str,
    route: &Route,
    env: &[(&str, String)],
) {
    let mut worker = spawn_worker(exchange, route, env);
    worker.wait_consumers(broker, &route.queue, 1).await;
    let status = terminate(&mut worker).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
}

// ---------------------------------------------------------------------------------------------
// 1. Direct reply-to.

/// Requests through direct reply-to are answered exactly once each on the requester's
/// channel; with the requester gone, the input is acked once and the result dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_answers_once() {
    const REQUESTS: usize = 20;
    let mut broker = Broker::connect().await;
    let (_exchange, config, route) = setup(&mut broker, "answer", |_| {});
    let _cleanup = broker.cleanup_on_panic();
    let running = start(config).await;

    let ids = Ledger::new("direct-reply-to").ids(REQUESTS);
    let mut requester = Requester::connect().await;
    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        requester
            .request(&route.queue, &task(id, json!({})), &format!("corr-{i}"))
            .await;
    }
    let replies = requester
        .replies(REQUESTS, Duration::from_secs(1), Duration::from_secs(30))
        .await;
    eprintln!(
        "[direct-reply-to] {} replies to {REQUESTS} requests in {:?}",
        replies.len(),
        started.elapsed()
    );
    let mut per_correlation: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for reply in &replies {
        per_correlation
            .entry(reply.correlation_id.clone().unwrap_or_default())
            .or_default()
            .push(common::id_of(reply));
    }
    for (i, id) in ids.iter().enumerate() {
        let got = per_correlation
            .remove(&format!("corr-{i}"))
            .unwrap_or_default();
        assert_eq!(
            got,
            vec![Some(id.clone())],
            "request corr-{i} must be answered exactly once, with its own id"
        );
        assert_eq!(runs(id), 1, "the handler runs once per request");
    }
    assert!(
        per_correlation.is_empty(),
        "replies nobody asked for: {per_correlation:?}"
    );
    assert_eq!(replies.len(), REQUESTS);
    eventually("every request acked", Duration::from_secs(10), || {
        let h = handler(&running);
        h.succeeded == REQUESTS as u64 && h.in_flight == 0
    })
    .await;
    let h = handler(&running);
    eprintln!("[direct-reply-to] handler stats: {h:?}");
    assert_eq!(
        (h.retried, h.dead_lettered, h.rejected),
        (0, 0, 0),
        "no request failed"
    );
    assert_eq!(
        (h.results_returned, h.results_nacked),
        (0, 0),
        "no result returned or nacked"
    );
    assert_eq!(broker.depth(&route.queue).await, Some(0));
    assert_eq!(broker.depth(&route.dlq).await, Some(0));
    assert_eq!(
        broker.depth(&route.reply_queue).await,
        Some(0),
        "a result with reply_to goes to the requester, not to the reply_key queue"
    );

    // The requester is gone before the result is published: the broker drops the result;
    // the input is acked (once), nothing is retried or dead-lettered.
    let gone_id = format!("{}-gone", ids[0]);
    let hold = unique("hold");
    let gone = Requester::connect().await;
    gone.request(
        &route.queue,
        &task(&gone_id, json!({"hold": hold})),
        "corr-gone",
    )
    .await;
    eventually("the handler runs", Duration::from_secs(20), || {
        runs(&gone_id) == 1
    })
    .await;
    gone.close().await;
    release(&hold);
    eventually(
        "the gone requester's task settled",
        Duration::from_secs(20),
        || handler(&running).in_flight == 0,
    )
    .await;
    // Time for a retry or a dead letter to happen, if the engine made one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let h = handler(&running);
    eprintln!("[direct-reply-to] after the gone requester: {h:?}");
    assert_eq!(
        runs(&gone_id),
        1,
        "the handler ran once for the gone requester"
    );
    assert_eq!(
        (h.retried, h.dead_lettered, h.rejected),
        (0, 0, 0),
        "a result nobody waits for anymore is not a failure"
    );
    assert_eq!(h.succeeded, REQUESTS as u64 + 1, "the input was acked");
    assert_eq!(broker.depth(&route.queue).await, Some(0));
    assert_eq!(broker.depth(&route.dlq).await, Some(0));
    assert_eq!(broker.depth(&route.reply_queue).await, Some(0));
    running.stop().await.unwrap();
    assert_eq!(
        broker.depth(&route.queue).await,
        Some(0),
        "nothing was left unacked (it would be back in the queue now)"
    );
    requester.close().await;
    broker.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 2. No bodies in the logs.

/// A worker whose results are returned (unroutable `reply_to`) or dropped (direct reply-to,
/// requester gone) logs no message or result body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_results_log_no_body() {
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new("no-body-in-logs");
    let (exchange, route) = worker_route(&mut broker);
    let _cleanup = broker.cleanup_on_panic();
    declare_with_worker(&broker, &exchange, &route, &[]).await;
    // The canary rides in the task's `echo` field, which the worker copies into its result:
    // in both bodies, and in neither the task id (the task uuid, logged by design) nor any
    // header.
    let canary = unique("CANARY-BODY");

    let unroutable_id = ledger.ids(1).remove(0);
    let nowhere = unique("nope");
    assert!(
        ledger
            .publish_with(
                &broker,
                "",
                &route.queue,
                &task(&unroutable_id, json!({"echo": canary})),
                BasicProperties::default().with_reply_to(nowhere.as_str().into()),
            )
            .await,
        "task not confirmed"
    );
    let gone_id = format!("{unroutable_id}-gone");
    let gone = Requester::connect().await;
    gone.request(
        &route.queue,
        &task(&gone_id, json!({"echo": canary})),
        "corr-gone",
    )
    .await;
    gone.close().await;

    let mut worker = spawn_worker(&exchange, &route, &[]);
    worker.wait_consumers(&broker, &route.queue, 1).await;
    ledger
        .drain_route(
            &broker,
            &route,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )
        .await;
    eventually_async("both tasks taken", Duration::from_secs(30), || async {
        broker.depth(&route.queue).await == Some(0)
    })
    .await;
    let status = terminate(&mut worker).await;
    let log = worker.log();
    eprintln!(
        "[no-body-in-logs] worker {status}; log {} bytes; unroutable task dead-lettered {} \
         time(s), gone requester's task dead-lettered {} time(s)",
        log.len(),
        ledger.dead.get(&unroutable_id).copied().unwrap_or(0),
        ledger.dead.get(&gone_id).copied().unwrap_or(0),
    );
    let leaks = lines_with_canary(&log, &canary);
    assert!(
        leaks.is_empty(),
        "{} log line(s) carry a message or result body, e.g.:\n{}",
        leaks.len(),
        leaks
            .iter()
            .take(3)
            .map(|line| line.chars().take(2000).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        log.contains(&unroutable_id),
        "the log shows the handling of the unroutable task (its task uuid); log:\n{log}"
    );
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    ledger.assert_nothing_lost();
    assert_eq!(
        broker.depth(&route.queue).await,
        Some(0),
        "every input settled"
    );
    broker.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The quorum work queue's delivery limit.

/// A message nacked back to a quorum work queue more often than `delivery_limit` is
/// dead-lettered by the broker into `<queue>.dlq` (reason `delivery_limit`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_work_queue_dead_letters_past_delivery_limit() {
    const LIMIT: u32 = 3;
    const MAX_NACKS: u32 = 10;
    let mut broker = Broker::connect().await;
    let (_exchange, config, route) = setup(&mut broker, "answer", |config| {
        config.queue_type = QueueType::Quorum;
        config
            .consumers
            .entry("answer".to_owned())
            .or_default()
            .delivery_limit = Some(LIMIT);
    });
    let _cleanup = broker.cleanup_on_panic();
    // The engine declares the topology; the test then plays a consumer that keeps failing.
    start(config).await.stop().await.unwrap();
    let id = unique("delivery-limit");
    broker
        .publish_json("", &route.queue, &task(&id, json!({})))
        .await;

    let channel = broker.connection.create_channel().await.unwrap();
    let mut nacks = 0;
    let mut delivery_counts = Vec::new();
    let dead = loop {
        if let Some(dead) = get_one(&channel, &route.dlq, Duration::ZERO).await {
            break Some(dead);
        }
        let got = channel
            .basic_get(
                route.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap();
        match got {
            Some(message) if nacks < MAX_NACKS => {
                delivery_counts.push(header_text(&message.delivery, "x-delivery-count"));
                message
                    .delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .unwrap();
                nacks += 1;
            }
            Some(_) => break None,
            // Between a nack and its return, or dead-lettered: look again.
            None => {
                if let Some(dead) = get_one(&channel, &route.dlq, Duration::from_secs(5)).await {
                    break Some(dead);
                }
            }
        }
    };
    eprintln!(
        "[delivery-limit] {nacks} nacks, x-delivery-count seen: {delivery_counts:?}, \
         dead-lettered: {}",
        dead.is_some()
    );
    let dead = dead.unwrap_or_else(|| {
        panic!(
            "still in {} after {nacks} nacks: no delivery limit, or no dead-letter route",
            route.queue
        )
    });
    let _ = channel.close(200, "done".into()).await;
    assert_eq!(
        x_death_field(&dead, "reason").as_deref(),
        Some("delivery_limit"),
        "x-death: {:?}",
        dead.properties.headers()
    );
    assert_eq!(
        x_death_field(&dead, "queue").as_deref(),
        Some(route.queue.as_str())
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&dead.data).unwrap()["id"],
        json!(id)
    );
    assert_eq!(
        nacks,
        LIMIT + 1,
        "dead-lettered after the configured delivery_limit ({LIMIT}) returns"
    );
    assert_eq!(broker.depth(&route.queue).await, Some(0));
    assert_eq!(broker.depth(&route.dlq).await, Some(0));
    broker.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Queues declared by an earlier version.

/// The work queue and the delay queue as an earlier version declared them: the work queue
/// with `x-queue-type` only (quorum) or no arguments (classic), the delay queue of type
/// `delay_type` with a TTL and a dead-letter route back to the work queue, nothing else (no
/// `x-dead-letter-strategy`, no `x-overflow`). The engine, configured with `queue_type`,
/// starts, answers, retries a failing task through the old delay queue, and leaves both
/// queues as they are.
async fn existing_queues_keep_working(queue_type: QueueType, delay_type: QueueType) {
    const DELAY: Duration = Duration::from_secs(1);
    let name = format!("old-queues {queue_type} work, {delay_type} delay");
    let mut broker = Broker::connect().await;
    let (_exchange, config, route) = setup(&mut broker, "answer", |config| {
        config.queue_type = queue_type;
        config.retry_delays = vec![DELAY];
    });
    let _cleanup = broker.cleanup_on_panic();
    let old_work = type_argument(queue_type);
    declare(&broker, &route.queue, old_work.clone())
        .await
        .unwrap();
    let delay_queue = &route.delay_queues[0];
    let mut old_delay = legacy_delay_queue_arguments(&route.queue, DELAY);
    for (key, value) in &type_argument(delay_type) {
        old_delay.insert(key.clone(), value.clone());
    }
    declare(&broker, delay_queue, old_delay.clone())
        .await
        .unwrap();

    let running = start(config).await;
    let ids = Ledger::new("old-queues").ids(2);
    broker
        .publish_many(
            "",
            &route.queue,
            &[
                task(&ids[0], json!({})),
                task(&ids[1], json!({"fail_once": true})),
            ],
        )
        .await;
    let results = broker
        .collect(&route.reply_queue, 2, Duration::from_secs(30))
        .await;
    let answered: BTreeSet<String> = results.iter().filter_map(common::id_of).collect();
    let h = handler(&running);
    eprintln!(
        "[{name}] {} result(s), runs {}/{}, stats {h:?}",
        results.len(),
        runs(&ids[0]),
        runs(&ids[1])
    );
    assert_eq!(
        answered,
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "both tasks answered"
    );
    assert_eq!(results.len(), 2, "once each");
    assert_eq!(
        runs(&ids[1]),
        2,
        "the failing task ran again after its delay"
    );
    assert_eq!(h.retried, 1);
    assert_eq!(h.dead_lettered, 0);
    assert_eq!(broker.depth(&route.dlq).await, Some(0));
    running.stop().await.unwrap();
    // Both queues are still the old ones (a declare with other arguments would be refused).
    declare(&broker, &route.queue, old_work).await.unwrap();
    declare(&broker, delay_queue, old_delay).await.unwrap();
    broker.cleanup().await;
}

/// `x-queue-type = quorum` for quorum queues, nothing for classic ones (as the engine did).
fn type_argument(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), long("quorum"));
    }
    args
}

/// What an earlier version declared with `queue_type = "quorum"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_queues_without_new_arguments_keep_working_quorum() {
    existing_queues_keep_working(QueueType::Quorum, QueueType::Quorum).await;
}

/// What an earlier version declared with `queue_type = "classic"` (the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_queues_without_new_arguments_keep_working_classic() {
    existing_queues_keep_working(QueueType::Classic, QueueType::Classic).await;
}

/// A quorum work queue with a classic delay queue: no earlier version declared this pair
/// (its delay queues had the work queue's type), but a deployment that moved to quorum work
/// queues by hand may have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_queues_without_new_arguments_keep_working_mixed() {
    existing_queues_keep_working(QueueType::Quorum, QueueType::Classic).await;
}

// ---------------------------------------------------------------------------------------------
// 5. A retry copy whose work queue is missing when its delay expires.

/// The task fails once; its retry copy waits in the delay queue; the engine stops and the
/// work queue is deleted; the copy's TTL expires while the work queue does not exist; the
/// engine starts again (re-declaring the work queue) and the task is answered.
///
/// The delay is 4 s rather than 1 s: the engine must stop and the work queue must be gone
/// before the copy expires (a precondition the test checks). The broker's at-least-once
/// dead-letter worker retries an unroutable copy every
/// `dead_letter_worker_publisher_confirm_timeout`, set to 2 s here (3 min by default).
async fn retry_copy_survives_a_missing_work_queue(queue_type: QueueType) {
    const DELAY: Duration = Duration::from_secs(4);
    const MISSING: Duration = Duration::from_secs(3);
    let mut broker = Broker::connect().await;
    let (_exchange, config, route) = setup(&mut broker, "answer", |config| {
        config.queue_type = queue_type;
        config.retry_delays = vec![DELAY];
    });
    // One test at a time sets the broker-wide timeout: another one's guard would restore the
    // default before this test's delay queue is declared. Restored after the cleanup: locals
    // drop in reverse order.
    let _serial = DEAD_LETTER_TIMEOUT_TESTS.lock().await;
    let _timeout = DeadLetterConfirmTimeout::set(2000).await;
    let _cleanup = broker.cleanup_on_panic();
    let delay_queue = route.delay_queues[0].clone();

    let running = start(config.clone()).await;
    let id = unique("retry-copy");
    broker
        .publish_json("", &route.queue, &task(&id, json!({"fail_once": true})))
        .await;
    let mut waiting = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !waiting && Instant::now() < deadline {
        waiting = broker.depth(&delay_queue).await == Some(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let parked = Instant::now();
    assert!(waiting, "the retry copy never reached {delay_queue}");
    assert_eq!(runs(&id), 1);
    running.stop().await.unwrap();
    broker
        .channel
        .queue_delete(route.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let deleted_after = parked.elapsed();
    eprintln!(
        "[retry-copy {queue_type}] work queue deleted {deleted_after:?} after the copy was \
         seen in the delay queue ({DELAY:?} TTL)"
    );
    assert!(
        deleted_after < DELAY,
        "setup too slow: the copy may have expired before the work queue was deleted \
         (the machine is loaded; rerun)"
    );
    // The TTL expires while the work queue does not exist.
    tokio::time::sleep((DELAY + MISSING).saturating_sub(parked.elapsed())).await;

    let restarted = Instant::now();
    let running = start(config).await;
    let results = broker
        .collect(&route.reply_queue, 1, Duration::from_secs(30))
        .await;
    eprintln!(
        "[retry-copy {queue_type}] {} result(s) {:?} after the restart; runs {}",
        results.len(),
        restarted.elapsed(),
        runs(&id)
    );
    assert_eq!(
        results.iter().filter_map(common::id_of).collect::<Vec<_>>(),
        vec![id.clone()],
        "the retry copy outlived the missing work queue and was answered"
    );
    assert_eq!(runs(&id), 2);
    assert_eq!(
        broker.depth(&route.dlq).await,
        Some(0),
        "nothing dead-lettered"
    );
    assert_eq!(broker.depth(&delay_queue).await, Some(0));
    running.stop().await.unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_copy_survives_a_missing_work_queue_quorum() {
    retry_copy_survives_a_missing_work_queue(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_copy_survives_a_missing_work_queue_classic() {
    retry_copy_survives_a_missing_work_queue(QueueType::Classic).await;
}

// ---------------------------------------------------------------------------------------------
// 6. A task that kills its worker.

/// 40 good tasks and one that aborts the worker process, in the middle. Whenever the worker
/// dies it is started again; the killer ends in the DLQ as `worker_lost` after
/// `max_redeliveries` lost deliveries, every good task is answered.
async fn task_that_kills_the_worker_is_dead_lettered(queue_type: QueueType) {
    const GOOD: usize = 40;
    const MAX_REDELIVERIES: u32 = 3;
    const DEADLINE: Duration = Duration::from_secs(120);
    let name = format!("killer-{queue_type}");
    let mut broker = Broker::connect().await;
    let mut ledger = Ledger::new(&name);
    let (exchange, route) = worker_route(&mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let env = [
        (
            "RMQ_CONSUMER_MAX_REDELIVERIES",
            MAX_REDELIVERIES.to_string(),
        ),
        (
            "RMQ_CONSUMER_CONSUMERS__WORK__QUEUE_TYPE",
            queue_type.to_string(),
        ),
    ];
    declare_with_worker(&broker, &exchange, &route, &env).await;

    let ids = ledger.ids(GOOD + 1);
    let killer = ids[GOOD / 2].clone();
    let tasks: Vec<Value> = ids
        .iter()
        .map(|id| {
            if *id == killer {
                task(id, json!({"abort": true}))
            } else {
                task(id, json!({}))
            }
        })
        .collect();
    let confirmed = ledger.publish(&broker, "", &route.queue, &tasks).await;
    assert_eq!(confirmed, GOOD + 1, "tasks not confirmed");
    let good: Vec<&String> = ids.iter().filter(|id| **id != killer).collect();

    let started = Instant::now();
    let mut workers = vec![spawn_worker(&exchange, &route, &env)];
    let mut exits = Vec::new();
    loop {
        ledger.record_results(&broker.drain(&route.reply_queue).await);
        ledger.record_dead(&broker.drain(&route.dlq).await);
        let answered = good.iter().all(|id| ledger.results.contains_key(*id));
        if answered && ledger.dead.contains_key(&killer) {
            break;
        }
        let worker = workers.last_mut().unwrap();
        assert!(
            started.elapsed() < DEADLINE,
            "[{name}] not done after {DEADLINE:?}: {} restarts, {}/{GOOD} good tasks answered, \
             killer dead-lettered: {}; last worker's log:\n{}",
            exits.len(),
            good.iter()
                .filter(|id| ledger.results.contains_key(**id))
                .count(),
            ledger.dead.contains_key(&killer),
            worker.log()
        );
        if let Some(status) = worker.exited() {
            assert_eq!(
                status.signal(),
                Some(SIGABRT),
                "[{name}] the worker ended otherwise than by the killer task: {status}; log:\n{}",
                worker.log()
            );
            exits.push(status);
            assert!(
                exits.len() <= (MAX_REDELIVERIES + 3) as usize,
                "[{name}] the killer task took the worker down {} times (max_redeliveries \
                 {MAX_REDELIVERIES}): it is not dead-lettered",
                exits.len()
            );
            workers.push(spawn_worker(&exchange, &route, &env));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    let last = workers.last_mut().unwrap();
    let status = terminate(last).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", last.log());
    let mut inputs = route.input_queues();
    inputs.push(suspect_queue(&route));
    ledger
        .drain(
            &broker,
            &route.reply_queue,
            &route.dlq,
            &inputs,
            Duration::from_secs(1),
            Duration::from_secs(10),
        )
        .await;
    let report = ledger.assert_nothing_lost();
    eprintln!(
        "[{name}] done in {took:?}: restarts={} (max_redeliveries {MAX_REDELIVERIES}), \
         good answered={}/{GOOD}, duplicates={}, dead-lettered={}",
        exits.len(),
        good.iter()
            .filter(|id| ledger.results.contains_key(**id))
            .count(),
        report.duplicates,
        report.dead_total
    );
    assert_eq!(
        ledger.dead.get(&killer),
        Some(&1),
        "the killer is dead-lettered exactly once"
    );
    assert_eq!(
        report.dead_total, 1,
        "only the killer is dead-lettered: {:?}",
        ledger.dead
    );
    let dead = &ledger.dead_messages[0];
    eprintln!(
        "[{name}] the killer's dead-letter headers: {:?}",
        dead.headers
    );
    assert_eq!(
        dead.headers.get("x-error-kind").map(String::as_str),
        Some("worker_lost")
    );
    assert!(
        dead.headers
            .get("x-death-reason")
            .is_some_and(|reason| reason.starts_with("worker_lost")),
        "x-death-reason: {:?}",
        dead.headers.get("x-death-reason")
    );
    assert_eq!(
        dead.headers.get("x-original-queue"),
        Some(&route.queue),
        "the work queue, where `dlq replay` puts it back"
    );
    assert!(
        exits.len() <= (MAX_REDELIVERIES + 1) as usize,
        "{} restarts for max_redeliveries {MAX_REDELIVERIES}",
        exits.len()
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_that_kills_the_worker_is_dead_lettered_classic() {
    task_that_kills_the_worker_is_dead_lettered(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_that_kills_the_worker_is_dead_lettered_quorum() {
    task_that_kills_the_worker_is_dead_lettered(QueueType::Quorum).await;
}

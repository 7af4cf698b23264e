//! Topology faults against a running engine: F13 the work queue deleted under the consumer,
//! F14 the result exchange deleted, F15 the result queue unbound (mandatory return), F16 the
//! broker nacking results (a `max-length 0, reject-publish` policy) for good, and for a
//! moment shorter than `result_publish_retry`. Each run checks the
//! ledger of tests/RELIABILITY.md and restores whatever it changed on the broker.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use lapin::{
    BasicProperties, ExchangeKind,
    options::{
        BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use rmq_consumer::{
    __private::publisher::Publisher, HandlerSnapshot, consumer, error::PublishError,
};
use rmq_consumer_tests::{
    self as common, Broker, Ledger, PolicyGuard, Route, Running, eventually, eventually_async,
    task, test_config, unique,
};
use serde_json::{Value, json};

/// Answers with the task id (after `sleep_ms`, if given).
#[consumer(
    queue = "tests.fault_topology.relay",
    reply_key = "tests.fault_topology.relay.result"
)]
async fn relay(task: Value) -> Value {
    if let Some(ms) = task["sleep_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    json!({"id": task["id"]})
}

/// The same, for a second handler in the same engine.
#[consumer(
    queue = "tests.fault_topology.side",
    reply_key = "tests.fault_topology.side.result"
)]
async fn side(task: Value) -> Value {
    json!({"id": task["id"], "side": true})
}

fn handler(running: &Running, name: &str) -> HandlerSnapshot {
    running
        .health
        .snapshot()
        .handlers
        .into_iter()
        .find(|h| h.name == name)
        .unwrap()
}

fn tasks(ledger: &Ledger, count: usize) -> Vec<Value> {
    ledger
        .ids(count)
        .iter()
        .map(|id| task(id, json!({})))
        .collect()
}

async fn drain(ledger: &mut Ledger, broker: &Broker, route: &Route) {
    ledger
        .drain(
            broker,
            &route.reply_queue,
            &route.dlq,
            &route.input_queues(),
            Duration::from_millis(500),
            Duration::from_secs(30),
        )
        .await;
}

async fn declare_exchange(broker: &Broker, exchange: &str) {
    broker
        .channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
}

async fn bind(broker: &Broker, queue: &str, exchange: &str, key: &str) {
    broker
        .channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Every dead-lettered message of the ledger has this error kind and retry count.
fn assert_dead_letters(ledger: &Ledger, kind: &str, retries: u32, queue: &str) {
    for message in &ledger.dead_messages {
        let h = &message.headers;
        assert_eq!(h["x-error-kind"], kind, "{h:?}");
        assert_eq!(h["x-retry-count"], retries.to_string(), "{h:?}");
        assert_eq!(h["x-original-queue"], queue, "{h:?}");
        assert!(
            h["x-death-reason"].starts_with("retries exhausted"),
            "{h:?}"
        );
    }
}

/// F13: the work queue is deleted under the consumer, twice. The broker cancels the consumer;
/// the engine notices, re-declares the queue (and its binding) and consumes again on the
/// same connection; tasks published afterwards are processed. Nothing confirmed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f13_queue_deleted_under_the_consumer() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let route = Route::new(&mut config, "relay", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay"]).await;
    let mut ledger = Ledger::new("F13");

    let mut done = 0;
    for round in 1..=2 {
        let batch = tasks(&ledger, 20);
        ledger
            .publish(&broker, &exchange, &route.queue, &batch)
            .await;
        done += batch.len() as u64;
        eventually("the batch is processed", Duration::from_secs(20), || {
            handler(&running, "relay").succeeded == done
        })
        .await;

        broker
            .channel
            .queue_delete(route.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        let deleted = Instant::now();
        eventually_async(
            "the queue re-declared with one consumer",
            Duration::from_secs(15),
            || async { broker.consumers(&route.queue).await == Some(1) },
        )
        .await;
        println!(
            "[F13] round {round}: queue back with its consumer {:?} after the delete",
            deleted.elapsed()
        );
        // The broker lists the work queue's consumer as soon as it is registered; the
        // engine reports `consuming` once the suspect queue's consumer is registered too.
        eventually(
            "the handler consuming again",
            Duration::from_secs(10),
            || handler(&running, "relay").consuming,
        )
        .await;
    }
    // Published through the exchange: the binding was restored too.
    let batch = tasks(&ledger, 20);
    ledger
        .publish(&broker, &exchange, &route.queue, &batch)
        .await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(report.results_unique, 60);
    assert_eq!(report.duplicates, 0);
    let snapshot = running.health.snapshot();
    assert_eq!(
        snapshot.reconnects, 0,
        "re-subscribed on the same connection"
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A5: the exchange is deleted, then the work queue. The re-subscription declares the
/// exchange again before it binds the queue (it was declared only when a session started: the
/// bind got a 404 and `run()` returned an error), and the engine goes on on the same
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_exchange_then_queue_deleted_are_declared_again() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let route = Route::new(&mut config, "relay", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay"]).await;
    let mut ledger = Ledger::new("A5");
    let batch = tasks(&ledger, 20);
    ledger
        .publish(&broker, &exchange, &route.queue, &batch)
        .await;
    eventually("the batch is processed", Duration::from_secs(20), || {
        handler(&running, "relay").succeeded == 20
    })
    .await;

    broker
        .channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    broker
        .channel
        .queue_delete(route.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    eventually_async(
        "the queue re-declared with one consumer",
        Duration::from_secs(15),
        || async { broker.consumers(&route.queue).await == Some(1) },
    )
    .await;
    assert!(
        !running.task.is_finished(),
        "the engine stopped: {:?}",
        running.health.snapshot()
    );
    // Published through the exchange: exchange and binding are back.
    let batch = tasks(&ledger, 20);
    ledger
        .publish(&broker, &exchange, &route.queue, &batch)
        .await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(report.results_unique, 40);
    assert_eq!(running.health.snapshot().reconnects, 0);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A5: a refusal that passes by itself is retried, not fatal. Another connection holds the
/// work queue as an exclusive queue: declaring it is refused with 405 RESOURCE_LOCKED (every
/// soft error used to stop the engine). The engine keeps trying, with backoff, and consumes
/// once the holder is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_a_queue_locked_by_another_connection_is_waited_for() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.retry_connect_interval = Duration::from_millis(200);
    config.retry_connect_max = Duration::from_secs(1);
    let route = Route::new(&mut config, "relay", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let holder = Broker::connect().await;
    holder
        .channel
        .queue_declare(
            route.queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let engine = rmq_consumer::Engine::builder(config)
        .only(["relay"])
        .build()
        .unwrap();
    let stop = engine.shutdown_token();
    let health = engine.health();
    let task = tokio::spawn(engine.run());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !task.is_finished(),
        "the engine stopped on a locked queue: {:?}",
        task.await
    );
    assert!(!health.snapshot().handlers[0].consuming);
    holder.connection.close(200, "done".into()).await.unwrap();
    let running = Running { stop, health, task };
    running.wait_consuming(Duration::from_secs(20)).await;
    let mut ledger = Ledger::new("A5-locked");
    let batch = tasks(&ledger, 10);
    ledger
        .publish(&broker, &exchange, &route.queue, &batch)
        .await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(report.results_unique, 10);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A10: a refusal that stops the engine (one handler's queue re-created with other
/// arguments: 406 PRECONDITION_FAILED on its re-subscription) still lets the other handler's
/// deliveries at work finish: their results are published and they are acked before the
/// connection closes (it used to close at once under them: redelivered, run twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a10_a_refused_topology_drains_the_other_handlers_work() {
    const SLOW: usize = 4;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = SLOW as u16;
    let relay = Route::new(&mut config, "relay", &mut broker);
    let side = Route::new(&mut config, "side", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay", "side"]).await;
    let mut ledger = Ledger::new("A10");
    let slow: Vec<Value> = ledger
        .ids(SLOW)
        .iter()
        .map(|id| task(id, json!({"sleep_ms": 3000})))
        .collect();
    ledger
        .publish(&broker, &exchange, &relay.queue, &slow)
        .await;
    eventually("the slow tasks at work", Duration::from_secs(10), || {
        handler(&running, "relay").in_flight == SLOW
    })
    .await;
    // The side handler's queue comes back with other arguments: its re-subscription is
    // refused for good.
    broker
        .channel
        .queue_delete(side.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(7));
    broker
        .channel
        .queue_declare(
            side.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), running.task)
        .await
        .expect("the engine did not stop")
        .expect("the engine task panicked");
    assert!(
        matches!(ended, Err(rmq_consumer::Error::Topology(_))),
        "{ended:?}"
    );
    let results = broker
        .collect(&relay.reply_queue, SLOW, Duration::from_secs(5))
        .await;
    assert_eq!(
        results.len(),
        SLOW,
        "the deliveries at work were not finished before the connection closed"
    );
    assert_eq!(
        broker.depth(&relay.queue).await,
        Some(0),
        "a delivery at work went back to the queue"
    );
    broker.cleanup().await;
}

/// F14: the exchange results are published to is deleted while the engine runs, for longer
/// than `result_publish_retry` (0 here: a briefly missing exchange is
/// `a4_a_briefly_missing_result_exchange_costs_no_handler_run`). The input is
/// not acked as a success; it is retried through its delay queue at the configured pace (no
/// hot loop); another handler whose results go elsewhere keeps working; once the exchange is
/// back every task completes (or is dead-lettered): nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f14_result_exchange_missing() {
    const STUCK: usize = 10;
    const WINDOW: Duration = Duration::from_secs(3);
    let delay = Duration::from_millis(500);
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.result_publish_retry = Duration::ZERO;
    let section = config.consumers.entry("relay".to_owned()).or_default();
    section.max_retries = Some(30);
    section.retry_delays = Some(vec![delay]);
    let relay_route = Route::new(&mut config, "relay", &mut broker);
    let side_route = Route::new(&mut config, "side", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay", "side"]).await;
    let mut relay_ledger = Ledger::new("F14.relay");
    let mut side_ledger = Ledger::new("F14.side");

    let before = tasks(&relay_ledger, 5);
    relay_ledger
        .publish(&broker, &exchange, &relay_route.queue, &before)
        .await;
    eventually("the first tasks complete", Duration::from_secs(20), || {
        handler(&running, "relay").succeeded == 5
    })
    .await;

    broker
        .channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    // The exchange is gone (and the bindings with it): publish the inputs directly.
    let stuck = tasks(&relay_ledger, STUCK);
    relay_ledger
        .publish(&broker, "", &relay_route.queue, &stuck)
        .await;
    eventually(
        "every stuck task tried once",
        Duration::from_secs(10),
        || handler(&running, "relay").handler_runs >= 5 + STUCK as u64,
    )
    .await;
    let runs_before = handler(&running, "relay").handler_runs;
    // Meanwhile another handler, answering through `reply_to`, is unaffected.
    for side_task in tasks(&side_ledger, 30) {
        let properties =
            BasicProperties::default().with_reply_to(side_route.reply_queue.as_str().into());
        side_ledger
            .publish_with(&broker, "", &side_route.queue, &side_task, properties)
            .await;
    }
    tokio::time::sleep(WINDOW).await;
    let during = handler(&running, "relay");
    let runs = during.handler_runs - runs_before;
    let bound = STUCK as u64 * (WINDOW.as_millis() / delay.as_millis() + 2) as u64;
    println!(
        "[F14] {runs} handler runs for {STUCK} stuck tasks in {WINDOW:?} (bound {bound}); retried={} dead_lettered={} reconnects={}",
        during.retried,
        during.dead_lettered,
        running.health.snapshot().reconnects
    );
    assert_eq!(during.succeeded, 5, "no input acked as a success");
    assert_eq!(
        running.health.snapshot().reconnects,
        0,
        "a channel error (404 on the publish channel) is not a connection loss"
    );
    assert!(runs <= bound, "hot loop: {runs} runs in {WINDOW:?}");
    assert!(
        runs >= STUCK as u64,
        "the stuck tasks are retried, not parked"
    );
    side_ledger
        .drain(
            &broker,
            &side_route.reply_queue,
            &side_route.dlq,
            &side_route.input_queues(),
            Duration::from_millis(500),
            Duration::from_secs(20),
        )
        .await;
    let side_report = side_ledger.assert_nothing_lost();
    assert_eq!(
        side_report.dead_lettered, 0,
        "the other handler completes its tasks during the outage"
    );

    // The exchange comes back (an operator, or the next reconnect, re-declares it).
    declare_exchange(&broker, &exchange).await;
    bind(
        &broker,
        &relay_route.reply_queue,
        &exchange,
        &relay_route.reply_key,
    )
    .await;
    drain(&mut relay_ledger, &broker, &relay_route).await;
    let report = relay_ledger.assert_nothing_lost();
    println!(
        "[F14] relay duplicates={} side duplicates={}",
        report.duplicates, side_report.duplicates
    );
    assert_eq!(
        report.results_unique,
        5 + STUCK,
        "all complete after the restore"
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A4 (issue 14): F14 under load beside a healthy handler. Both handlers publish through the
/// engine's one publisher, so a lane's batch mixes their results; when the broker closes a
/// lane's channel for the 404 of a result to the deleted exchange, the healthy handler's
/// publishes in that batch must not fail with it: it retries nothing, runs each task once and
/// answers each once. The handler whose exchange is missing loses nothing; its duplicates
/// (results the broker routed just before the delete, then published again) stay few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a4_a_missing_result_exchange_does_not_disturb_a_healthy_handler() {
    const WAVES: usize = 8;
    const EACH: usize = 50;
    const TASKS: usize = WAVES * EACH;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = 32;
    // Missing for longer than this: the broken handler's tasks go through retry copies,
    // which share the lanes' batches with the healthy handler's results.
    config.result_publish_retry = Duration::ZERO;
    let section = config.consumers.entry("relay".to_owned()).or_default();
    section.max_retries = Some(60);
    section.retry_delays = Some(vec![Duration::from_millis(500)]);
    let relay_route = Route::new(&mut config, "relay", &mut broker);
    let side_route = Route::new(&mut config, "side", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay", "side"]).await;
    let side_broker = Broker::connect().await;
    let mut relay_ledger = Ledger::new("A4.relay");
    let mut side_ledger = Ledger::new("A4.side");

    // Both handlers under load; the exchange disappears after the second wave.
    let relay_load = async {
        for _ in 0..WAVES {
            let wave = tasks(&relay_ledger, EACH);
            relay_ledger
                .publish(&broker, "", &relay_route.queue, &wave)
                .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    let side_load = async {
        for _ in 0..WAVES {
            let wave = tasks(&side_ledger, EACH);
            publish_reply_to(
                &mut side_ledger,
                &side_broker,
                &side_route.queue,
                &side_route.reply_queue,
                &wave,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    let delete = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let channel = broker.connection.create_channel().await.unwrap();
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
        let _ = channel.close(200, "deleted".into()).await;
    };
    tokio::join!(relay_load, side_load, delete);

    side_ledger
        .drain_route(
            &broker,
            &side_route,
            Duration::from_millis(500),
            Duration::from_secs(30),
        )
        .await;
    let side_report = side_ledger.assert_nothing_lost();
    let side = handler(&running, "side");
    let relay = handler(&running, "relay");
    println!(
        "[A4] side: runs={} retried={} dead_lettered={} duplicates={}; relay (exchange missing): runs={} retried={} dead_lettered={}; reconnects={}",
        side.handler_runs,
        side.retried,
        side.dead_lettered,
        side_report.duplicates,
        relay.handler_runs,
        relay.retried,
        relay.dead_lettered,
        running.health.snapshot().reconnects
    );
    assert!(relay.retried > 0, "the missing exchange was hit");
    assert_eq!(side.retried, 0, "the healthy handler retried nothing");
    assert_eq!(side.dead_lettered, 0);
    assert_eq!(
        (side.uncertain_copies, relay.uncertain_copies),
        (0, 0),
        "no retry copy failed for the 404"
    );
    assert_eq!(
        side.handler_runs, TASKS as u64,
        "each healthy task ran once"
    );
    assert_eq!(side_report.results_unique, TASKS);
    assert_eq!(side_report.duplicates, 0, "no healthy result twice");
    assert_eq!(
        running.health.snapshot().reconnects,
        0,
        "a 404 on a publish channel is not a connection loss"
    );

    // The exchange comes back: every task of the other handler completes, once or a few
    // times over (the results routed before the delete whose confirms the close swallowed).
    declare_exchange(&broker, &exchange).await;
    bind(
        &broker,
        &relay_route.reply_queue,
        &exchange,
        &relay_route.reply_key,
    )
    .await;
    drain(&mut relay_ledger, &broker, &relay_route).await;
    let report = relay_ledger.assert_nothing_lost();
    assert_eq!(report.results_unique + report.dead_lettered, TASKS);
    assert_eq!(
        report.dead_total, report.dead_lettered,
        "no dead letter twice"
    );
    assert!(
        report.duplicates <= TASKS / 4,
        "duplicates unbounded: {}",
        report.duplicates
    );
    running.stop().await.unwrap();
    side_broker.cleanup().await;
    broker.cleanup().await;
}

/// A4 (issue 14): the result exchange is missing for a moment shorter than
/// `result_publish_retry` (deleted, then declared again, as an operator or a redeploy does).
/// The results refused meanwhile (404) are published again until the exchange is back: a
/// missing exchange costs a re-publish, not a handler run, an attempt or a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a4_a_briefly_missing_result_exchange_costs_no_handler_run() {
    const TASKS: usize = 10;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.result_publish_retry = Duration::from_secs(20);
    // A result waiting for its exchange holds its delivery's slot: room for every task.
    config.prefetch_count = 16;
    let route = Route::new(&mut config, "relay", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay"]).await;
    let mut ledger = Ledger::new("A4b");

    broker
        .channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    ledger
        .publish(&broker, "", &route.queue, &tasks(&ledger, TASKS))
        .await;
    // Several refusals per result (the backoff starts at 50 ms), then the exchange is back.
    eventually(
        "results refused and published again",
        Duration::from_secs(20),
        || handler(&running, "relay").results_exchange_missing >= 2 * TASKS as u64,
    )
    .await;
    declare_exchange(&broker, &exchange).await;
    bind(&broker, &route.reply_queue, &exchange, &route.reply_key).await;

    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    let h = handler(&running, "relay");
    println!(
        "[A4b] runs={} retried={} dead_lettered={} succeeded={} duplicates={}",
        h.handler_runs, h.retried, h.dead_lettered, h.succeeded, report.duplicates
    );
    assert_eq!((report.results_unique, report.dead_lettered), (TASKS, 0));
    assert_eq!(report.duplicates, 0);
    assert_eq!((h.retried, h.dead_lettered), (0, 0), "no attempt counted");
    assert_eq!(h.handler_runs, TASKS as u64, "no handler ran twice");
    assert_eq!(h.succeeded, TASKS as u64);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// Publishes tasks straight to `queue` with `reply_to` set (confirms pipelined), recording
/// them in the ledger.
async fn publish_reply_to(
    ledger: &mut Ledger,
    broker: &Broker,
    queue: &str,
    reply_to: &str,
    tasks: &[Value],
) {
    let mut pending = Vec::with_capacity(tasks.len());
    for task in tasks {
        let id = task["id"].as_str().unwrap().to_owned();
        ledger.published.insert(id.clone());
        let confirm = broker
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &serde_json::to_vec(task).unwrap(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_reply_to(reply_to.into()),
            )
            .await
            .unwrap();
        pending.push((id, confirm));
    }
    for (id, confirm) in pending {
        if let Ok(lapin::Confirmation::Ack(None)) = confirm.await {
            ledger.confirmed.insert(id);
        }
    }
}

/// F15: the result queue is unbound while the engine runs. Every result is returned
/// (mandatory): the input is not acked as a success but retried, and after `max_retries`
/// dead-lettered with `x-error-kind = result_unroutable`. After re-binding, results flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f15_unroutable_result_is_a_failure() {
    const MAX_RETRIES: u32 = 2;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.max_retry_count = MAX_RETRIES;
    let route = Route::new(&mut config, "relay", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay"]).await;
    let mut ledger = Ledger::new("F15");

    ledger
        .publish(&broker, &exchange, &route.queue, &tasks(&ledger, 10))
        .await;
    eventually("routable results", Duration::from_secs(20), || {
        handler(&running, "relay").succeeded == 10
    })
    .await;

    broker
        .channel
        .queue_unbind(
            route.reply_queue.as_str().into(),
            exchange.as_str().into(),
            route.reply_key.as_str().into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks(&ledger, 10))
        .await;
    eventually(
        "unroutable ones dead-lettered",
        Duration::from_secs(20),
        || handler(&running, "relay").dead_lettered == 10,
    )
    .await;

    bind(&broker, &route.reply_queue, &exchange, &route.reply_key).await;
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks(&ledger, 10))
        .await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.dead_lettered), (20, 10));
    assert_eq!(report.duplicates, 0);
    assert_dead_letters(&ledger, "result_unroutable", MAX_RETRIES, &route.queue);
    let h = handler(&running, "relay");
    assert_eq!(h.succeeded, 20, "an unroutable result is never a success");
    assert_eq!(
        h.results_returned,
        10 * u64::from(MAX_RETRIES + 1),
        "one return per attempt"
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// F16: the broker nacks every result (policy `max-length 0, overflow reject-publish` on the
/// result queue). The input is not acked as a success, it is retried, then dead-lettered with
/// `x-error-kind = result_nacked`. The policy is cleared (always, by a guard) and results
/// flow again. (`result_publish_retry = 0`: each nack fails its attempt at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_nacked_result_is_a_failure() {
    const MAX_RETRIES: u32 = 2;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.max_retry_count = MAX_RETRIES;
    config.result_publish_retry = Duration::ZERO;
    let route = Route::new(&mut config, "relay", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay"]).await;
    let mut ledger = Ledger::new("F16");

    ledger
        .publish(&broker, &exchange, &route.queue, &tasks(&ledger, 10))
        .await;
    // Read these results now: the policy would drop them from the queue.
    let first = broker
        .collect(&route.reply_queue, 10, Duration::from_secs(20))
        .await;
    ledger.record_results(&first);

    let policy = nack_results(&broker, &route).await;
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks(&ledger, 10))
        .await;
    eventually("nacked ones dead-lettered", Duration::from_secs(20), || {
        handler(&running, "relay").dead_lettered == 10
    })
    .await;
    policy.clear().await;

    ledger
        .publish(&broker, &exchange, &route.queue, &tasks(&ledger, 10))
        .await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.dead_lettered), (20, 10));
    assert_eq!(report.duplicates, 0);
    assert_dead_letters(&ledger, "result_nacked", MAX_RETRIES, &route.queue);
    let h = handler(&running, "relay");
    assert_eq!(h.succeeded, 20, "a nacked result is never a success");
    assert_eq!(h.results_nacked, 10 * u64::from(MAX_RETRIES + 1));
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// F16 for a moment (as while a quorum queue elects a new leader after a node loss): the
/// broker nacks results for a few seconds, less than `result_publish_retry`. The results are
/// published again until they are taken: every task ends as one result, none is retried or
/// dead-lettered, and no handler runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_briefly_nacked_results_are_published_again() {
    const TASKS: usize = 10;
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.max_retry_count = 1;
    config.result_publish_retry = Duration::from_secs(20);
    let route = Route::new(&mut config, "relay", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["relay"]).await;
    let mut ledger = Ledger::new("F16b");

    let policy = nack_results(&broker, &route).await;
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks(&ledger, TASKS))
        .await;
    // Several nacks per task (the backoff starts at 50 ms), then the window closes.
    eventually(
        "results nacked and published again",
        Duration::from_secs(20),
        || handler(&running, "relay").results_nacked >= 2 * TASKS as u64,
    )
    .await;
    policy.clear().await;

    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.dead_lettered), (TASKS, 0));
    assert_eq!(report.duplicates, 0);
    let h = handler(&running, "relay");
    assert_eq!(h.succeeded, TASKS as u64);
    assert_eq!(
        (h.retried, h.dead_lettered),
        (0, 0),
        "a brief nack costs no attempt"
    );
    assert_eq!(h.handler_runs, TASKS as u64, "no handler ran twice");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// Makes the broker nack every publish to the route's result queue (policy `max-length 0,
/// overflow reject-publish`) until the returned guard is cleared.
async fn nack_results(broker: &Broker, route: &Route) -> PolicyGuard {
    let pattern = format!("^{}$", route.reply_queue.replace('.', "\\."));
    let policy = PolicyGuard::set(
        &unique("f16-policy"),
        &pattern,
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    )
    .await;
    eventually_async(
        "the policy nacks publishes",
        Duration::from_secs(10),
        || probe_nacked(broker, &route.reply_queue),
    )
    .await;
    policy
}

/// Publishes a probe straight to `queue`; `true` when the broker nacked it. A probe that got
/// through is removed again.
async fn probe_nacked(broker: &Broker, queue: &str) -> bool {
    let confirm = broker
        .channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{\"probe\": true}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    if matches!(confirm, lapin::Confirmation::Nack(_)) {
        return true;
    }
    let _ = broker
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await;
    false
}

/// The confirm behind F15/F16: many concurrent publishes on the engine's [`Publisher`] to an
/// accepting queue, a queue that nacks (`x-max-length 0`, `reject-publish`) and an unroutable
/// key. Each must get its own outcome; a nacked or returned publish reported as delivered
/// would let the engine ack an input whose result was dropped. (Fails when the publisher
/// trusts lapin's pairing of returns with confirms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_confirms_are_attributed_under_concurrency() {
    const TASKS: usize = 16;
    const EACH: usize = 300;
    let mut broker = Broker::connect().await;
    let accepting = unique("confirms.ok");
    let nacking = unique("confirms.nack");
    broker.declare_queue(&accepting).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .channel
        .queue_declare(
            nacking.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    broker.track_queue(&nacking);
    let _cleanup = broker.cleanup_on_panic();
    let connection = Arc::new(
        lapin::Connection::connect(
            &common::broker_url(),
            lapin::ConnectionProperties::default(),
        )
        .await
        .unwrap(),
    );
    let publisher = Publisher::open(&connection, Duration::from_secs(10), 4)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (publisher, accepting, nacking) =
            (publisher.clone(), accepting.clone(), nacking.clone());
        tasks.push(tokio::spawn(async move {
            let mut wrong = [0_usize; 3];
            for i in 0..EACH {
                let kind = (i + t) % 3;
                let key = match kind {
                    0 => accepting.as_str(),
                    1 => nacking.as_str(),
                    _ => "tests.no-such-queue",
                };
                // Persistent messages to a durable queue are confirmed after a disk write,
                // returns and nacks at once: the broker's acks then arrive out of order and
                // in `multiple` batches, mixed with returns.
                let outcome = publisher
                    .publish(
                        "",
                        key,
                        b"{}".to_vec(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await;
                let right = match kind {
                    0 => outcome.is_ok(),
                    1 => matches!(outcome, Err(PublishError::Nacked { .. })),
                    _ => matches!(outcome, Err(PublishError::Unroutable { .. })),
                };
                wrong[kind] += usize::from(!right);
            }
            wrong
        }));
    }
    let mut wrong = [0_usize; 3];
    for task in tasks {
        for (total, n) in wrong.iter_mut().zip(task.await.unwrap()) {
            *total += n;
        }
    }
    println!(
        "[confirms] misattributed of {} each: accepted {} / nacked {} / returned {}",
        TASKS * EACH / 3,
        wrong[0],
        wrong[1],
        wrong[2]
    );
    assert_eq!(wrong, [0, 0, 0], "confirms attributed to the wrong publish");
    assert_eq!(
        broker.depth(&accepting).await,
        Some(u32::try_from(TASKS * EACH / 3).unwrap())
    );
    publisher.close().await;
    let _ = connection.close(200, "bye".into()).await;
    broker.cleanup().await;
}

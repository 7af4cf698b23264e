//! Least privilege (issue 13, points 3 and 7): a worker whose broker user has no configure
//! permission and write permission only on the exchange it publishes to runs the whole
//! pipeline with `declare = false` and `publish_via = "exchange"` (results, retries through a
//! delay queue, dead letters); missing objects stop the engine with one error naming each; a
//! queue deleted while running stops it the same way instead of a reconnect loop; a sender
//! allowed to write only to the task exchange cannot make the worker write anywhere else; the
//! permissions the README documents for the default mode suffice; and a checking handler
//! beside a declaring one finds their shared exchange.
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
    time::Duration,
};

use lapin::{
    BasicProperties,
    options::{ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use rmq_consumer::{
    Config, Engine, HandlerError, HandlerSnapshot,
    config::{PublishVia, SecretUrl},
    consumer,
};
use rmq_consumer_tests::{
    self as common, Broker, Route, Running, TestUser, eventually, task, test_config, unique,
};
use serde_json::{Value, json};

const PASSWORD: &str = "least-privilege-password";
const HANDLER: &str = "restricted";

/// Handler runs per task id, across the tests of this binary (ids are unique per test).
static RUNS: LazyLock<Mutex<BTreeMap<String, u32>>> = LazyLock::new(Mutex::default);

fn runs(id: &str) -> u32 {
    RUNS.lock().unwrap().get(id).copied().unwrap_or(0)
}

/// Does what the task's `mode` says: `ok` (the default), `fail` (retryable) or `dead`
/// (dead-letter at once).
#[consumer(
    queue = "tests.least_privilege.restricted",
    reply_key = "tests.least_privilege.restricted.result"
)]
async fn restricted(task: Value) -> Result<Value, HandlerError> {
    let id = task["id"].as_str().unwrap_or_default().to_owned();
    *RUNS.lock().unwrap().entry(id.clone()).or_default() += 1;
    match task["mode"].as_str() {
        Some("fail") => Err(HandlerError::retry("this task always fails")),
        Some("dead") => Err(HandlerError::dead_letter("this task cannot succeed")),
        _ => Ok(json!({"id": id})),
    }
}

/// Answers with the id (a second handler, for an engine mixing `declare` modes).
#[consumer(
    queue = "tests.least_privilege.declaring",
    reply_key = "tests.least_privilege.declaring.result"
)]
async fn declaring(task: Value) -> Value {
    json!({"id": task["id"]})
}

fn handler(running: &Running) -> HandlerSnapshot {
    running.health.snapshot().handlers[0].clone()
}

/// `^(a|b|...)$` matching exactly these names.
fn exactly(names: &[&str]) -> String {
    let escaped: Vec<String> = names.iter().map(|n| regex_escape(n)).collect();
    format!("^({})$", escaped.join("|"))
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if ".^$|()[]{}*+?\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A unique exchange, a config with one retry through a 1 s delay queue, `declare = false`,
/// `publish_via = "exchange"`, and the route of its names.
fn setup(broker: &mut Broker) -> (String, Config, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.max_retry_count = 1;
    config.retry_delays = vec![Duration::from_secs(1)];
    config.declare = false;
    config.publish_via = PublishVia::Exchange;
    let route = Route::new(&mut config, HANDLER, broker);
    (exchange, config, route)
}

/// The administrator's part: the engine itself, as the admin user with `declare = true`,
/// creates the exchange, the queues and the bindings `publish_via` needs, then stops.
async fn admin_declares(config: &Config) {
    let mut admin = config.clone();
    admin.declare = true;
    let running = Running::start(admin, &[HANDLER]).await;
    running.stop().await.unwrap();
}

/// The worker's user: no configure permission, write permission only on the exchange, read
/// permission only on the queues it consumes.
async fn restricted_user(exchange: &str, route: &Route) -> TestUser {
    TestUser::with_permissions(
        PASSWORD,
        "^$",
        &exactly(&[exchange]),
        &exactly(&[&route.queue, &route.suspect]),
    )
    .await
}

/// `config` connecting as `user`.
fn as_user(config: &Config, user: &TestUser) -> Config {
    let mut config = config.clone();
    config.urls = vec![SecretUrl::new(user.url(PASSWORD))];
    config
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut all = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        all.push_str(": ");
        all.push_str(&cause.to_string());
        source = cause.source();
    }
    all
}

/// Publishes an ok task, a failing one and a dead one; checks that the result, the retry
/// (through the delay queue) and both dead letters arrive.
async fn run_pipeline(broker: &Broker, exchange: &str, route: &Route, running: &Running) {
    let ok = unique("ok");
    let failing = unique("fail");
    let dead = unique("dead");
    for (id, mode) in [(&ok, "ok"), (&failing, "fail"), (&dead, "dead")] {
        broker
            .publish_json(exchange, &route.queue, &task(id, json!({"mode": mode})))
            .await;
    }
    let results = broker
        .collect(&route.reply_queue, 1, Duration::from_secs(20))
        .await;
    assert_eq!(results.len(), 1, "the result arrives");
    assert_eq!(common::id_of(&results[0]).as_deref(), Some(ok.as_str()));
    eventually(
        "both failures dead-lettered",
        Duration::from_secs(30),
        || handler(running).dead_lettered == 2,
    )
    .await;
    let h = handler(running);
    assert_eq!(h.retried, 1, "the failing task was retried once: {h:?}");
    assert_eq!(h.succeeded, 1, "{h:?}");
    let dead_letters = broker.collect(&route.dlq, 2, Duration::from_secs(10)).await;
    let mut ids: Vec<String> = dead_letters.iter().filter_map(common::id_of).collect();
    ids.sort();
    let mut expected = vec![failing.clone(), dead.clone()];
    expected.sort();
    assert_eq!(
        ids, expected,
        "both dead letters are in the dead-letter queue"
    );
    for message in &dead_letters {
        let retries = if common::id_of(message).as_deref() == Some(failing.as_str()) {
            "1"
        } else {
            "0"
        };
        assert_eq!(
            message.headers.get("x-retry-count").map(String::as_str),
            Some(retries),
            "{:?}",
            message.headers
        );
    }
    assert_eq!(runs(&ok), 1);
    assert_eq!(runs(&failing), 2, "one run and one retry");
    assert_eq!(runs(&dead), 1);
}

/// A user with `configure = "^$"`, write permission on the task exchange only and read
/// permission on its two queues runs the whole pipeline on a topology an administrator
/// created: results, a retry through the delay queue and dead letters all arrive, the copies
/// going through the handler's exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_worker_runs_the_whole_pipeline() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker);
    let _cleanup = broker.cleanup_on_panic();
    admin_declares(&config).await;
    let user = restricted_user(&exchange, &route).await;
    let running = Running::start(as_user(&config, &user), &[HANDLER]).await;

    run_pipeline(&broker, &exchange, &route, &running).await;

    running.stop().await.unwrap();
    drop(user);
    broker.cleanup().await;
}

/// With `declare = false` and only the exchange and the work queue created, the engine does
/// not start: it stops with one error that names every missing queue and the permission it
/// lacks, instead of retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_queues_stop_the_engine_with_one_error_naming_each() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker);
    let _cleanup = broker.cleanup_on_panic();
    broker
        .channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker
        .channel
        .queue_declare(
            route.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let user = restricted_user(&exchange, &route).await;
    let engine = Engine::builder(as_user(&config, &user))
        .only([HANDLER])
        .build()
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), engine.run())
        .await
        .expect("missing objects must stop the engine, not loop");
    let error = result.expect_err("the engine must not run without its queues");
    let rmq_consumer::Error::MissingTopology(missing) = &error else {
        panic!("expected MissingTopology, got {}", chain(&error));
    };
    let mut names: Vec<&str> = missing.iter().map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    let mut expected = vec![
        route.suspect.as_str(),
        route.dlq.as_str(),
        route.reply_queue.as_str(),
    ];
    expected.extend(route.delay_queues.iter().map(String::as_str));
    expected.sort_unstable();
    assert_eq!(names, expected, "{error}");
    let text = error.to_string();
    for name in &expected {
        assert!(
            text.contains(&format!(
                "queue `{name}` (handler `{HANDLER}`) is missing: needs configure permission on `{name}` or create it"
            )),
            "{text}"
        );
    }
    assert!(!text.contains(&format!("`{}`", route.queue)), "{text}");
    assert!(!text.contains(&format!("`{exchange}`")), "{text}");
    drop(user);
    broker.cleanup().await;
}

/// A work queue deleted while the restricted worker runs stops the engine with the error
/// naming it (the worker cannot re-create it), rather than a reconnect loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_deleted_while_running_stops_the_engine_cleanly() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker);
    let _cleanup = broker.cleanup_on_panic();
    admin_declares(&config).await;
    let user = restricted_user(&exchange, &route).await;
    let running = Running::start(as_user(&config, &user), &[HANDLER]).await;

    broker
        .channel
        .queue_delete(route.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), running.task)
        .await
        .expect("a deleted queue must stop the engine, not loop")
        .expect("engine task panicked");
    let error = result.expect_err("the engine must stop with an error");
    let rmq_consumer::Error::MissingTopology(missing) = &error else {
        panic!("expected MissingTopology, got {}", chain(&error));
    };
    let names: Vec<&str> = missing.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [route.queue.as_str()], "{error}");
    assert_eq!(running.health.snapshot().reconnects, 0, "no reconnect loop");
    drop(user);
    broker.cleanup().await;
}

/// A sender whose permissions let it write only to the task exchange sends failing tasks
/// whose `CC`/`BCC` headers name another queue, to a restricted worker: nothing reaches that
/// queue (neither the sender's message nor the worker's retry and dead-letter copies), and
/// the sender cannot publish to it through the default exchange either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_headers_from_a_restricted_sender_reach_no_other_queue() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker);
    let victim = unique("victim");
    broker.declare_queue(&victim).await;
    let _cleanup = broker.cleanup_on_panic();
    admin_declares(&config).await;
    let worker = restricted_user(&exchange, &route).await;
    let sender = TestUser::with_permissions(PASSWORD, "^$", &exactly(&[&exchange]), "^$").await;
    let running = Running::start(as_user(&config, &worker), &[HANDLER]).await;

    let connection = lapin::Connection::connect(&sender.url(PASSWORD), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
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
    let bodies = [
        (
            serde_json::to_vec(&task(&failing, json!({"mode": "fail"}))).unwrap(),
            "CC",
        ),
        (b"not json".to_vec(), "BCC"),
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
    // The sender's own attempt at the victim through the default exchange is refused.
    let direct = channel
        .basic_publish(
            "".into(),
            victim.as_str().into(),
            Default::default(),
            b"direct",
            BasicProperties::default(),
        )
        .await;
    let refused = match direct {
        Err(_) => true,
        Ok(confirm) => confirm.await.is_err(),
    };
    assert!(refused, "the sender may not write to the default exchange");
    let _ = connection.close(200, "bye".into()).await;

    eventually("both tasks dead-lettered", Duration::from_secs(30), || {
        handler(&running).dead_lettered == 2
    })
    .await;
    assert_eq!(
        handler(&running).retried,
        1,
        "the failing task retried once"
    );
    assert_eq!(runs(&failing), 2);
    assert_eq!(
        broker.depth(&victim).await,
        Some(0),
        "nothing reached the queue the sender named"
    );
    let dead_letters = broker.collect(&route.dlq, 2, Duration::from_secs(10)).await;
    assert_eq!(dead_letters.len(), 2);
    for message in &dead_letters {
        for key in ["CC", "BCC"] {
            assert!(
                !message.headers.contains_key(key),
                "{key} kept: {:?}",
                message.headers
            );
        }
    }
    running.stop().await.unwrap();
    drop((worker, sender));
    broker.cleanup().await;
}

/// The permissions the README documents for the default mode (`declare = true`,
/// `publish_via = "default_exchange"`), with this test's names: the engine declares its
/// topology and runs the whole pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_permissions_suffice_in_the_default_mode() {
    let mut broker = Broker::connect().await;
    let (exchange, mut config, route) = setup(&mut broker);
    config.declare = true;
    config.publish_via = PublishVia::DefaultExchange;
    let _cleanup = broker.cleanup_on_panic();
    // README, "Least privilege": configure `^(EXCHANGE|QUEUE|QUEUE\..+|REPLY_QUEUE)$`, write
    // the same plus `amq.default`, read the same.
    let own = format!(
        "{}|{}|{}\\..+|{}",
        regex_escape(&exchange),
        regex_escape(&route.queue),
        regex_escape(&route.queue),
        regex_escape(&route.reply_queue)
    );
    let user = TestUser::with_permissions(
        PASSWORD,
        &format!("^({own})$"),
        &format!("^(amq\\.default|{own})$"),
        &format!("^({own})$"),
    )
    .await;
    let running = Running::start(as_user(&config, &user), &[HANDLER]).await;

    run_pipeline(&broker, &exchange, &route, &running).await;

    running.stop().await.unwrap();
    drop(user);
    broker.cleanup().await;
}

/// One engine, two handlers sharing a new exchange: `declaring` declares its topology,
/// `restricted` (`declare = false`) only checks that its own exists. The check finds the
/// shared exchange (the engine declares it before checking) and both consume; the declaring
/// handler works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checking_handler_beside_a_declaring_one_finds_the_shared_exchange() {
    let mut broker = Broker::connect().await;
    let (exchange, mut config, route) = setup(&mut broker);
    let _cleanup = broker.cleanup_on_panic();
    // The administrator creates the checking handler's queues, not the exchange.
    admin_declares(&config).await;
    broker
        .channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    config.declare = true;
    config.publish_via = PublishVia::DefaultExchange;
    let section = config.consumers.entry(HANDLER.to_owned()).or_default();
    section.declare = Some(false);
    section.publish_via = Some(PublishVia::Exchange);
    let other = Route::new(&mut config, "declaring", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &[HANDLER, "declaring"]).await;

    let id = unique("ok");
    broker
        .publish_json(&exchange, &other.queue, &task(&id, json!({})))
        .await;
    let results = broker
        .collect(&other.reply_queue, 1, Duration::from_secs(20))
        .await;
    assert_eq!(results.len(), 1, "the declaring handler's result arrives");
    assert_eq!(common::id_of(&results[0]).as_deref(), Some(id.as_str()));
    assert_eq!(
        broker.depth(&route.queue).await,
        Some(0),
        "the checking handler's queue exists"
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

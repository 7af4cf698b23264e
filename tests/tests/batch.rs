//! Batch handlers (`#[consumer(batch = N)]`, issue 16) against a real broker: batches form
//! (full, or after `batch_wait`), every item is answered on its own route with its own
//! correlation id, an item's failure retries or dead-letters that item alone, a body that
//! does not decode never enters a batch, two deliveries of one task run once, and a batch
//! that fails as a whole (wrong count, panic, timeout, `Err`) fails each item on its own
//! count; on shutdown the items taken run in full batches; one `batch` span per call linked
//! to its items' spans, and the batch metrics on `/metrics`. The process-level faults (F01,
//! F04, F05, F19, F20 on a worker process) are in `fault_batch.rs`.
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

use lapin::BasicProperties;
use rmq_consumer::{Config, Engine, HandlerError, HandlerSnapshot, consumer};
use rmq_consumer_tests::{
    Broker, Ledger, Route, Running, eventually, eventually_async, task, test_config, unique,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Handler runs per task id and the size of every batch, per test (ids carry the test's
/// unique prefix).
static RUNS: LazyLock<Mutex<BTreeMap<String, u32>>> = LazyLock::new(Mutex::default);
static BATCHES: LazyLock<Mutex<Vec<(String, usize)>>> = LazyLock::new(Mutex::default);

fn runs(id: &str) -> u32 {
    RUNS.lock().unwrap().get(id).copied().unwrap_or(0)
}

/// The sizes of the batches whose first item's id starts with `prefix`.
fn batch_sizes(prefix: &str) -> Vec<usize> {
    BATCHES
        .lock()
        .unwrap()
        .iter()
        .filter(|(first, _)| first.starts_with(prefix))
        .map(|(_, size)| *size)
        .collect()
}

#[derive(Debug, Deserialize)]
struct Prompt {
    id: String,
    #[serde(default)]
    mode: String,
}

#[derive(Debug, Serialize)]
struct Completion {
    id: String,
    batch: usize,
}

fn prompt_uuid(prompt: &Prompt) -> String {
    prompt.id.clone()
}

/// One "forward pass" of 5 ms for the whole batch. Each prompt's `mode`: `fail` (retryable),
/// `dead` (dead-lettered at once), `short` (the batch returns one result too few), `panic`,
/// `hang` (the batch never returns), `batch_err` (the whole batch fails); else answered.
#[consumer(
    queue = "tests.batch.infer",
    reply_key = "tests.batch.infer.result",
    uuid = "prompt_uuid",
    batch = 8,
    batch_wait = "50ms"
)]
async fn infer(
    prompts: Vec<Prompt>,
) -> Result<Vec<Result<Completion, HandlerError>>, HandlerError> {
    let size = prompts.len();
    {
        let mut runs = RUNS.lock().unwrap();
        for prompt in &prompts {
            *runs.entry(prompt.id.clone()).or_default() += 1;
        }
        if let Some(first) = prompts.first() {
            BATCHES.lock().unwrap().push((first.id.clone(), size));
        }
    }
    let has = |mode: &str| prompts.iter().any(|p| p.mode == mode);
    if has("hang") {
        std::future::pending::<()>().await;
    }
    if has("panic") {
        panic!("poison: this batch panics");
    }
    if has("batch_err") {
        return Err(HandlerError::retry("poison: the model server is down"));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut out: Vec<Result<Completion, HandlerError>> = prompts
        .iter()
        .map(|prompt| match prompt.mode.as_str() {
            "fail" => Err(HandlerError::retry("poison: this prompt always fails")),
            "dead" => Err(HandlerError::dead_letter("poison: this prompt is refused")),
            _ => Ok(Completion {
                id: prompt.id.clone(),
                batch: size,
            }),
        })
        .collect();
    if has("short") {
        out.pop();
    }
    Ok(out)
}

/// A CPU-bound batch handler on the blocking pool (`Value` items, `Vec<Value>` results).
#[consumer(
    queue = "tests.batch.cpu",
    reply_key = "tests.batch.cpu.result",
    batch = 4,
    blocking = true
)]
fn cpu(items: Vec<Value>) -> Vec<Value> {
    std::thread::sleep(Duration::from_millis(5));
    let size = items.len();
    items
        .into_iter()
        .map(|item| json!({"id": item["id"], "batch": size}))
        .collect()
}

/// A slow "model" (300 ms per call, batches of 4) for the shutdown test.
#[consumer(
    queue = "tests.batch.slow",
    reply_key = "tests.batch.slow.result",
    batch = 4,
    batch_wait = "50ms"
)]
async fn slow(items: Vec<Value>) -> Vec<Value> {
    let size = items.len();
    if let Some(first) = items.first().and_then(|item| item["id"].as_str()) {
        BATCHES.lock().unwrap().push((first.to_owned(), size));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    items
        .into_iter()
        .map(|item| json!({"id": item["id"], "batch": size}))
        .collect()
}

/// A batch handler for the observability test (5 ms per call, batches of 8).
#[consumer(
    queue = "tests.batch.observed",
    reply_key = "tests.batch.observed.result",
    batch = 8,
    batch_wait = "50ms"
)]
async fn observed(items: Vec<Value>) -> Vec<Value> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    items
        .into_iter()
        .map(|item| json!({"id": item["id"]}))
        .collect()
}

/// A handler that takes one message per call: the batch keys do not apply to it.
#[consumer(queue = "tests.batch.single")]
async fn single(_task: Value) {}

fn handler(running: &Running) -> HandlerSnapshot {
    running.health.snapshot().handlers[0].clone()
}

fn setup(
    broker: &mut Broker,
    name: &str,
    tune: impl FnOnce(&mut Config),
) -> (String, Config, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.retry_delays = vec![Duration::from_millis(100)];
    tune(&mut config);
    let route = Route::new(&mut config, name, broker);
    (exchange, config, route)
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

fn dead_headers<'a>(ledger: &'a Ledger, id: &str) -> &'a BTreeMap<String, String> {
    &ledger
        .dead_messages
        .iter()
        .find(|m| rmq_consumer_tests::id_of(m).as_deref() == Some(id))
        .unwrap_or_else(|| panic!("{id} not dead-lettered"))
        .headers
}

#[tokio::test]
async fn batch_handlers_are_plain_functions() {
    let out = infer(vec![
        Prompt {
            id: "a".into(),
            mode: String::new(),
        },
        Prompt {
            id: "b".into(),
            mode: "dead".into(),
        },
    ])
    .await
    .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].as_ref().unwrap().batch, 2);
    assert!(out[1].as_ref().unwrap_err().is_dead_letter());
    let cpu = tokio::task::spawn_blocking(|| cpu(vec![json!({"id": 1})]))
        .await
        .unwrap();
    assert_eq!(cpu, [json!({"id": 1, "batch": 1})]);
}

/// 200 tasks published at once: they run in batches of at most 8 (most of them full), and
/// each result goes to its own route (the request's `reply_to` when it has one, else the
/// reply key) with the request's correlation id and the task uuid as message id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_is_answered_on_its_own_route() {
    const TASKS: usize = 200;
    let mut broker = Broker::connect().await;
    let (_, config, route) = setup(&mut broker, "infer", |_| {});
    let _cleanup = broker.cleanup_on_panic();
    let private = unique("batch.private");
    broker.declare_queue(&private).await;
    // Published before the engine starts, so the batches can fill (the same arguments as the
    // engine declares the queue with: durable, classic).
    broker.declare_queue(&route.queue).await;
    let mut ledger = Ledger::new("batch-routes");
    let ids = ledger.ids(TASKS);
    let prefix = ids[0].split('#').next().unwrap().to_owned();
    for (i, id) in ids.iter().enumerate() {
        let mut properties =
            BasicProperties::default().with_correlation_id(format!("corr-{i}").into());
        if i % 10 == 0 {
            properties = properties.with_reply_to(private.clone().into());
        }
        assert!(
            // The default exchange: the engine declares the test's exchange when it starts.
            ledger
                .publish_with(&broker, "", &route.queue, &task(id, json!({})), properties)
                .await
        );
    }
    let running = Running::start(config, &["infer"]).await;
    let via_reply_to = broker
        .collect(&private, TASKS / 10, Duration::from_secs(30))
        .await;
    ledger.record_results(&via_reply_to);
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(report.results_unique, TASKS);
    assert_eq!((report.duplicates, report.dead_lettered), (0, 0));
    assert_eq!(via_reply_to.len(), TASKS / 10);
    for result in &via_reply_to {
        let id = rmq_consumer_tests::id_of(result).unwrap();
        let i: usize = id.rsplit('#').next().unwrap().parse().unwrap();
        assert_eq!(i % 10, 0, "only requests with reply_to answer there: {id}");
    }
    // Every result (both routes) carries its own request's correlation id and task uuid.
    for result in via_reply_to.iter() {
        let id = rmq_consumer_tests::id_of(result).unwrap();
        let i: usize = id.rsplit('#').next().unwrap().parse().unwrap();
        assert_eq!(
            result.correlation_id.as_deref(),
            Some(format!("corr-{i}").as_str())
        );
        assert_eq!(result.message_id.as_deref(), Some(id.as_str()));
    }
    let sizes = batch_sizes(&prefix);
    let items: usize = sizes.iter().sum();
    assert_eq!(items, TASKS, "each task ran once, in some batch: {sizes:?}");
    assert!(sizes.iter().all(|&s| (1..=8).contains(&s)), "{sizes:?}");
    let full = sizes.iter().filter(|&&s| s == 8).count();
    assert!(
        full * 2 >= sizes.len(),
        "tasks published at once fill most batches: {sizes:?}"
    );
    let h = handler(&running);
    assert_eq!(h.batch_items, TASKS as u64);
    assert_eq!(h.batches, sizes.len() as u64);
    assert_eq!(
        h.handler_runs,
        sizes.len() as u64,
        "one handler call per batch"
    );
    assert_eq!(h.succeeded, TASKS as u64);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// Results read back through the reply key also carry their request's correlation id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_by_reply_key_keep_their_correlation_ids() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "infer", |_| {});
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["infer"]).await;
    let mut ledger = Ledger::new("batch-corr");
    let ids = ledger.ids(20);
    for (i, id) in ids.iter().enumerate() {
        let properties = BasicProperties::default().with_correlation_id(format!("c{i}").into());
        ledger
            .publish_with(
                &broker,
                &exchange,
                &route.queue,
                &task(id, json!({})),
                properties,
            )
            .await;
    }
    let results = broker
        .collect(&route.reply_queue, 20, Duration::from_secs(30))
        .await;
    assert_eq!(results.len(), 20);
    for result in &results {
        let id = rmq_consumer_tests::id_of(result).unwrap();
        let i: usize = id.rsplit('#').next().unwrap().parse().unwrap();
        assert_eq!(
            result.correlation_id.as_deref(),
            Some(format!("c{i}").as_str())
        );
        assert_eq!(result.message_id.as_deref(), Some(id.as_str()));
        assert_eq!(result.content_type.as_deref(), Some("application/json"));
    }
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A lone task is not held back for a full batch: it runs once `batch_wait` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_item_runs_after_batch_wait() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "infer", |_| {});
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["infer"]).await;
    let mut ledger = Ledger::new("batch-lone");
    ledger
        .preload(&broker, &exchange, &route.queue, 1, &json!({}))
        .await;
    let results = broker
        .collect(&route.reply_queue, 1, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].json.as_ref().unwrap()["batch"], 1);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// F19 for a batch: poison items (one always fails, one is refused) ride in batches with good
/// ones; only they reach the dead-letter queue, each with its own `x-retry-count`; every good
/// item is answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f19_poison_items_fail_alone() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "infer", |c| c.max_retry_count = 2);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["infer"]).await;
    let mut ledger = Ledger::new("batch-f19");
    let ids = ledger.ids(40);
    let tasks: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mode = match i {
                3 => "fail",
                17 => "dead",
                _ => "",
            };
            task(id, json!({ "mode": mode }))
        })
        .collect();
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks)
        .await;
    eventually(
        "the poison items dead-lettered",
        Duration::from_secs(20),
        || handler(&running).dead_lettered == 2,
    )
    .await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.dead_lettered), (38, 2));
    assert_eq!(report.duplicates, 0);
    assert_eq!(runs(&ids[3]), 3, "one run and two retries");
    assert_eq!(runs(&ids[17]), 1, "refused: no retry");
    for (i, id) in ids.iter().enumerate() {
        if i != 3 && i != 17 {
            assert_eq!(runs(id), 1, "{id}: a good item ran once");
        }
    }
    let h = dead_headers(&ledger, &ids[3]);
    assert_eq!(h["x-retry-count"], "2", "{h:?}");
    assert_eq!(h["x-error-kind"], "handler_error", "{h:?}");
    let h = dead_headers(&ledger, &ids[17]);
    assert_eq!(h["x-retry-count"], "0", "{h:?}");
    assert_eq!(h["x-error-kind"], "handler_rejected", "{h:?}");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A batch that fails as a whole fails each of its items, each retried on its own count and
/// then dead-lettered with the batch's reason: a wrong number of results, a panic, an `Err`
/// for the batch. The worker lives on and answers the tasks published after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_as_a_whole_fails_each_item() {
    for (mode, kind) in [
        ("short", "batch_size_mismatch"),
        ("panic", "handler_panicked"),
        ("batch_err", "handler_error"),
    ] {
        let mut broker = Broker::connect().await;
        let (exchange, config, route) = setup(&mut broker, "infer", |c| {
            c.max_retry_count = 1;
            // One task per batch: the poison cannot take good tasks down with it.
            let section = c.consumers.entry("infer".to_owned()).or_default();
            section.batch = Some(1);
        });
        let _cleanup = broker.cleanup_on_panic();
        let running = Running::start(config, &["infer"]).await;
        let mut ledger = Ledger::new(&format!("batch-whole-{mode}"));
        let ids = ledger.ids(6);
        let tasks: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| task(id, json!({ "mode": if i < 2 { mode } else { "" } })))
            .collect();
        ledger
            .publish(&broker, &exchange, &route.queue, &tasks)
            .await;
        eventually(
            &format!("{mode}: dead-lettered"),
            Duration::from_secs(20),
            || handler(&running).dead_lettered == 2,
        )
        .await;
        drain(&mut ledger, &broker, &route).await;
        let report = ledger.assert_nothing_lost();
        assert_eq!(
            (report.results_unique, report.dead_lettered),
            (4, 2),
            "{mode}"
        );
        for id in &ids[..2] {
            assert_eq!(runs(id), 2, "{mode}: one run and one retry");
            let h = dead_headers(&ledger, id);
            assert_eq!(h["x-error-kind"], kind, "{mode}: {h:?}");
            assert_eq!(h["x-retry-count"], "1", "{mode}: {h:?}");
        }
        running.stop().await.unwrap();
        broker.cleanup().await;
    }
}

/// F20 for a batch: a batch that never returns. `message_timeout` (1 s) fails each of its
/// items (retried, then dead-lettered with `x-error-kind = timeout`), and the batches after
/// it run: the queue keeps moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f20_a_hanging_batch_times_out_and_the_queue_moves() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "infer", |c| {
        c.max_retry_count = 1;
        c.message_timeout = Duration::from_secs(1);
        let section = c.consumers.entry("infer".to_owned()).or_default();
        section.batch = Some(2);
    });
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["infer"]).await;
    let mut ledger = Ledger::new("batch-f20");
    let ids = ledger.ids(10);
    let tasks: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| task(id, json!({ "mode": if i == 0 { "hang" } else { "" } })))
        .collect();
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks)
        .await;
    eventually("every task settled", Duration::from_secs(20), || {
        let h = handler(&running);
        h.dead_lettered >= 1 && h.dead_lettered + h.succeeded == 10
    })
    .await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    // The hanging task's batch-mate (if any) timed out with it and was answered on retry,
    // unless it shared the retry's batch with the hanging task again.
    assert_eq!(report.results_unique + report.dead_lettered, 10);
    assert!(report.results_unique >= 8, "{report:?}");
    let h = dead_headers(&ledger, &ids[0]);
    assert_eq!(h["x-error-kind"], "timeout", "{h:?}");
    assert_eq!(h["x-retry-count"], "1", "{h:?}");
    assert_eq!(handler(&running).in_flight, 0);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// Bodies that do not decode (not JSON, the wrong shape) are dead-lettered on their own and
/// never reach the handler; the good tasks around them are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_do_not_decode_never_enter_a_batch() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "infer", |_| {});
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["infer"]).await;
    let mut ledger = Ledger::new("batch-decode");
    ledger
        .preload(&broker, &exchange, &route.queue, 10, &json!({}))
        .await;
    let json = BasicProperties::default().with_content_type("application/json".into());
    broker
        .publish_raw(&exchange, &route.queue, b"{not json", json.clone())
        .await;
    broker
        .publish_raw(&exchange, &route.queue, br#"{"no_id": true}"#, json)
        .await;
    eventually("both dead-lettered", Duration::from_secs(20), || {
        let h = handler(&running);
        h.dead_lettered == 2 && h.succeeded == 10
    })
    .await;
    let dead = broker.collect(&route.dlq, 2, Duration::from_secs(5)).await;
    let mut kinds: Vec<&str> = dead
        .iter()
        .map(|m| m.headers["x-error-kind"].as_str())
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["invalid_json", "invalid_shape"]);
    assert_eq!(
        handler(&running).batch_items,
        10,
        "only the good tasks reached the handler"
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// Two deliveries of one task uuid published together run once (both answered), and a task
/// whose result is in the cache is answered from it without entering a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_twice_runs_once() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "infer", |c| c.enable_result_cache = true);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["infer"]).await;
    let id = format!("{}#twice", unique("batch-twice"));
    let body = task(&id, json!({}));
    broker
        .publish_many(&exchange, &route.queue, &[body.clone(), body.clone()])
        .await;
    let results = broker
        .collect(&route.reply_queue, 2, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 2, "both deliveries answered");
    assert_eq!(runs(&id), 1, "one run for two deliveries");
    // Later: answered from the cache, no batch.
    let batches = handler(&running).batches;
    broker.publish_json(&exchange, &route.queue, &body).await;
    let results = broker
        .collect(&route.reply_queue, 1, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 1);
    assert_eq!(runs(&id), 1);
    let h = handler(&running);
    assert_eq!(h.batches, batches, "a cached task enters no batch");
    assert!(h.cache_hits >= 2, "{h:?}");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// The same without the result cache: the batch itself runs a task uuid once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_twice_in_one_batch_runs_once_without_the_cache() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "infer", |c| {
        c.enable_result_cache = false;
        // Long enough for both deliveries to meet in one batch.
        let section = c.consumers.entry("infer".to_owned()).or_default();
        section.batch_wait = Some(Duration::from_millis(500));
    });
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["infer"]).await;
    let id = format!("{}#twice", unique("batch-nocache"));
    let body = task(&id, json!({}));
    broker
        .publish_many(&exchange, &route.queue, &[body.clone(), body])
        .await;
    let results = broker
        .collect(&route.reply_queue, 2, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 2, "both deliveries answered");
    assert_eq!(runs(&id), 1, "one run for two deliveries in one batch");
    let h = handler(&running);
    assert_eq!((h.batches, h.batch_items), (1, 2));
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// On shutdown the items already taken from the queue run in full batches: a shutdown while
/// the first batch of 4 runs, with 8 more items taken (prefetch 12), runs them as 4 + 4, not
/// one by one; each is answered and acked (nothing left in the queue, nothing twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_the_items_taken_run_in_full_batches() {
    const TASKS: usize = 12;
    let mut broker = Broker::connect().await;
    let (_, config, route) = setup(&mut broker, "slow", |c| {
        let section = c.consumers.entry("slow".to_owned()).or_default();
        section.prefetch = Some(12);
        section.read_ahead = Some(0);
    });
    let _cleanup = broker.cleanup_on_panic();
    // Published before the engine starts: all 12 are taken at once.
    broker.declare_queue(&route.queue).await;
    let mut ledger = Ledger::new("batch-shutdown");
    let ids = ledger.ids(TASKS);
    let prefix = ids[0].split('#').next().unwrap().to_owned();
    for id in &ids {
        assert!(
            ledger
                .publish_with(
                    &broker,
                    "",
                    &route.queue,
                    &task(id, json!({})),
                    BasicProperties::default()
                )
                .await
        );
    }
    let running = Running::start(config, &["slow"]).await;
    eventually("the first batch runs", Duration::from_secs(10), || {
        !batch_sizes(&prefix).is_empty()
    })
    .await;
    eventually_async("every task taken", Duration::from_secs(10), || async {
        broker.depth(&route.queue).await == Some(0)
    })
    .await;
    // Every taken item has reached the batcher.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    running.stop().await.unwrap();
    let took = started.elapsed();
    let sizes = batch_sizes(&prefix);
    println!("[batch-shutdown] batches {sizes:?}, shutdown took {took:?}");
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.duplicates), (TASKS, 0));
    assert_eq!(sizes, [4, 4, 4], "the items taken run in full batches");
    broker.cleanup().await;
}

/// What the spans of this test binary looked like: each span's name and fields (as
/// recorded, `Debug`-formatted) and the spans it follows from (indices into [`Spans::seen`]).
#[derive(Debug, Default, Clone)]
struct SeenSpan {
    name: &'static str,
    fields: BTreeMap<String, String>,
    follows: Vec<usize>,
}

/// Every span in order of creation, and where each live span id is in it (the subscriber
/// reuses the ids of closed spans: a new span with the id replaces the old one's entry).
#[derive(Debug, Default)]
struct Spans {
    seen: Vec<SeenSpan>,
    live: BTreeMap<u64, usize>,
}

static SPANS: LazyLock<Mutex<Spans>> = LazyLock::new(Mutex::default);

/// Records every span (a global subscriber for this binary, installed once by
/// [`record_spans`]).
struct SpanRecorder;

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanRecorder {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut seen = SeenSpan {
            name: attrs.metadata().name(),
            ..SeenSpan::default()
        };
        attrs.record(&mut Fields(&mut seen.fields));
        let mut spans = SPANS.lock().unwrap();
        let index = spans.seen.len();
        spans.seen.push(seen);
        spans.live.insert(id.into_u64(), index);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut spans = SPANS.lock().unwrap();
        if let Some(&index) = spans.live.get(&id.into_u64()) {
            values.record(&mut Fields(&mut spans.seen[index].fields));
        }
    }

    fn on_follows_from(
        &self,
        id: &tracing::span::Id,
        follows: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut spans = SPANS.lock().unwrap();
        if let (Some(&index), Some(&follows)) = (
            spans.live.get(&id.into_u64()),
            spans.live.get(&follows.into_u64()),
        ) {
            spans.seen[index].follows.push(follows);
        }
    }
}

/// Installs [`SpanRecorder`] as the global subscriber of this binary (once; the other tests
/// run under it too, and only the spans of a handler the test owns are looked at).
fn record_spans() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(SpanRecorder);
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

/// Observability (issue 16, point 4): one `batch` span per call with its size, distinct
/// tasks, longest wait and duration, following from each of its items' `delivery` spans;
/// per handler on `/metrics`: the batch-size histogram, the items' wait for their batch, the
/// batches and items counters (their rates are batches and items per second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_span_per_batch_linked_to_its_items_and_batch_metrics() {
    const TASKS: usize = 40;
    record_spans();
    let mut broker = Broker::connect().await;
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_, config, route) = setup(&mut broker, "observed", |c| c.http_addr = Some(http));
    let _cleanup = broker.cleanup_on_panic();
    broker.declare_queue(&route.queue).await;
    let mut ledger = Ledger::new("batch-observed");
    ledger
        .preload(&broker, "", &route.queue, TASKS, &json!({}))
        .await;
    let running = Running::start(config, &["observed"]).await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.duplicates), (TASKS, 0));
    let batches = handler(&running).batches;

    // The spans: this handler's `batch` spans, each following its items' delivery spans.
    let spans = SPANS.lock().unwrap().seen.clone();
    let ours: Vec<&SeenSpan> = spans
        .iter()
        .filter(|s| {
            s.name == "batch" && s.fields.get("handler").map(String::as_str) == Some("observed")
        })
        .collect();
    assert_eq!(ours.len() as u64, batches, "one span per batch: {ours:?}");
    let mut items = 0;
    for span in &ours {
        let size: usize = span.fields["size"].parse().unwrap();
        items += size;
        assert_eq!(span.fields["tasks"], span.fields["size"], "{span:?}");
        assert!(span.fields.contains_key("waited_ms"), "{span:?}");
        assert!(span.fields.contains_key("duration_ms"), "{span:?}");
        assert_eq!(span.follows.len(), size, "one link per item: {span:?}");
        for link in &span.follows {
            let item = &spans[*link];
            assert_eq!(item.name, "delivery", "{item:?}");
            assert_eq!(item.fields["handler"], "observed", "{item:?}");
        }
    }
    assert_eq!(items, TASKS);

    // The metrics, per handler.
    let (mut stream, request) = (
        tokio::net::TcpStream::connect(http).await.unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let labels = format!("{{handler=\"observed\",queue=\"{}\"}}", route.queue);
    let m = |name: &str| metric(&text, &format!("{name}{labels}"));
    assert_eq!(m("rmq_consumer_batches_total"), batches as f64);
    assert_eq!(m("rmq_consumer_batch_items_total"), TASKS as f64);
    assert_eq!(m("rmq_consumer_batch_size_count"), batches as f64);
    assert_eq!(m("rmq_consumer_batch_size_sum"), TASKS as f64);
    assert_eq!(m("rmq_consumer_batch_wait_seconds_count"), TASKS as f64);
    assert_eq!(m("rmq_consumer_handler_runs_total"), batches as f64);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A blocking batch handler (`blocking = true`) with `Value` items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_batch_handlers_run_on_the_blocking_pool() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, "cpu", |_| {});
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["cpu"]).await;
    let mut ledger = Ledger::new("batch-cpu");
    ledger
        .preload(&broker, &exchange, &route.queue, 40, &json!({}))
        .await;
    drain(&mut ledger, &broker, &route).await;
    let report = ledger.assert_nothing_lost();
    assert_eq!((report.results_unique, report.duplicates), (40, 0));
    let h = handler(&running);
    assert_eq!(h.batch_items, 40);
    assert!(h.batches < 40, "items were batched: {h:?}");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// A configuration that can never fill a batch is a start-up error naming the keys; the
/// batch keys on a handler that takes one message are an error too.
#[test]
fn batch_settings_are_checked_at_start() {
    let mut config = test_config("ex");
    config
        .consumers
        .entry("infer".to_owned())
        .or_default()
        .prefetch = Some(4);
    let error = Engine::builder(config.clone())
        .only(["infer"])
        .build()
        .unwrap_err()
        .to_string();
    assert!(error.contains("prefetch (4) is below batch (8)"), "{error}");
    assert!(error.contains("consumers.infer.prefetch"), "{error}");
    assert!(error.contains("consumers.infer.batch"), "{error}");

    config
        .consumers
        .entry("infer".to_owned())
        .or_default()
        .batch = Some(4);
    assert!(
        Engine::builder(config.clone())
            .only(["infer"])
            .build()
            .is_ok()
    );

    config
        .consumers
        .entry("single".to_owned())
        .or_default()
        .batch = Some(4);
    let error = Engine::builder(config)
        .only(["single"])
        .build()
        .unwrap_err()
        .to_string();
    assert!(error.contains("apply only to batch handlers"), "{error}");
}

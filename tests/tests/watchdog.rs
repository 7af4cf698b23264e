//! The watchdog end to end (issue 14): it must heal a consumer that is really stuck and never
//! disturb one that is busy.
//!
//! A8: the watchdog judged "capacity free" against `concurrency`, while the worker runs only
//! `min(concurrency, basic.qos)` delivery tasks: with `prefetch = 1, concurrency = 4` and
//! tasks slower than `queue_stuck_threshold`, a worker busy with its only slot was judged
//! stuck, re-subscribed, reconnected (abandoning the work) and reported dead.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use rmq_consumer::consumer;
use rmq_consumer_tests::{self as common, Broker, Route, Running, task, test_config, unique};
use serde_json::{Value, json};

/// Works `sleep_ms` and answers with the task id.
#[consumer(
    queue = "tests.watchdog.slow",
    reply_key = "tests.watchdog.slow.result"
)]
async fn slow(task: Value) -> Value {
    let ms = task["sleep_ms"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    json!({"id": task["id"]})
}

/// A8: one delivery slot (prefetch 1, so `basic.qos` 1) with `concurrency = 4`, tasks of 4 s
/// against a 1 s stuck threshold and a watchdog that heals at the first stuck check: the
/// worker is busy, not stuck. No re-subscription, no reconnect, every task answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a8_a_busy_worker_with_one_slot_is_not_stuck() {
    const TASKS: usize = 3;
    let mut broker = Broker::connect().await;
    let _cleanup = broker.cleanup_on_panic();
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.prefetch_count = 1;
    config.concurrency = Some(4);
    config.queue_stuck_threshold = Duration::from_secs(1);
    config.max_consecutive_failures = 1;
    // The watchdog checks every heartbeat / 2 = 1 s.
    config.heartbeat_interval = 2;
    let route = Route::new(&mut config, "slow", &mut broker);
    broker.track_queue(&format!("{}.suspect", route.queue));
    let running = Running::start(config, &["slow"]).await;

    let ids: Vec<String> = (0..TASKS).map(|_| unique("task")).collect();
    for id in &ids {
        let body = serde_json::to_vec(&task(id, json!({"sleep_ms": 4000}))).unwrap();
        broker
            .publish_raw(&exchange, &route.queue, &body, Default::default())
            .await;
    }
    let judged_stuck = AtomicBool::new(false);
    let results = {
        let watch = async {
            loop {
                let snapshot = running.health.snapshot();
                if snapshot.handlers[0].stuck {
                    judged_stuck.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let collect = broker.collect(&route.reply_queue, TASKS, Duration::from_secs(40));
        tokio::select! {
            results = collect => results,
            () = watch => unreachable!(),
        }
    };
    let snapshot = running.health.snapshot();
    let mut answered: Vec<String> = results.iter().filter_map(common::id_of).collect();
    answered.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(answered, expected, "every task answered once");
    assert_eq!(snapshot.reconnects, 0, "the watchdog forced a reconnect");
    assert!(
        !judged_stuck.load(Ordering::Relaxed),
        "the busy handler was judged stuck"
    );
    assert_eq!(
        snapshot.handlers[0].handler_runs, TASKS as u64,
        "no task ran twice"
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

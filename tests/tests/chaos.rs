//! F26 (tests/RELIABILITY.md): chaos under load. Two worker processes (the `fault-worker`
//! binary, through a TCP proxy) work a steady stream of tasks, a share of which fail (retried,
//! then dead-lettered) or are dead-lettered at once, with a little input that is not even
//! UTF-8, while the test injects at random times, from a logged seed: broker-wide connection
//! closes, a broker application restart, proxy resets, a memory alarm and `kill -9` of one
//! worker (restarted each time). Then the ledger: nothing confirmed is lost, duplicates stay
//! bounded per fault, every failing task is in the dead-letter queue; and the worker that
//! was never killed has flat file descriptors, threads and resident memory, and one broker
//! connection with no more channels than at the start.
//!
//! `F26_SECONDS` sets how long faults are injected (default 90; e.g. 1800 for a 30-minute
//! soak, which also prints the worker's resource curve), `F26_SEED` repeats a schedule.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use lapin::{BasicProperties, options::BasicPublishOptions};
use rmq_consumer_tests::{
    Broker, Ledger, MemoryAlarm, Proxy, Route, StoppedApp, WorkerProcess, rabbitmqctl, task,
    test_config, unique,
};
use serde_json::{Value, json};

/// The workers' prefetch (basic.qos is prefetch + prefetch / 2).
const PREFETCH: u16 = 8;

/// A small deterministic generator (SplitMix64): the schedule follows from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the test can do to the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    CloseConnections,
    RestartBroker,
    ResetProxy,
    MemoryAlarm,
    KillWorker,
}

const FAULTS: [Fault; 5] = [
    Fault::CloseConnections,
    Fault::RestartBroker,
    Fault::ResetProxy,
    Fault::MemoryAlarm,
    Fault::KillWorker,
];

/// One process's file descriptors, threads and resident memory.
#[derive(Debug, Clone, Copy)]
struct Resources {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

impl Resources {
    fn of(pid: u32) -> Self {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Self {
            fds,
            threads: usize::try_from(field("Threads:")).unwrap_or(0),
            rss_kib: field("VmRSS:"),
        }
    }
}

/// The channels of each broker connection the worker `pid` holds (its connection name carries
/// its pid).
async fn worker_channels(pid: u32) -> Vec<u32> {
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "client_properties",
        "channels",
    ])
    .await;
    let name = format!("pid {pid}\"");
    listing
        .lines()
        .filter(|line| line.contains(&name))
        .filter_map(|line| line.split_whitespace().last()?.parse().ok())
        .collect()
}

fn spawn(proxy: &Proxy, exchange: &str, route: &Route) -> WorkerProcess {
    WorkerProcess::spawn(
        env!("CARGO_BIN_EXE_fault-worker"),
        &proxy.url(),
        exchange,
        route,
        &[
            ("RMQ_CONSUMER_PREFETCH_COUNT", PREFETCH.to_string()),
            ("RMQ_CONSUMER_HEARTBEAT_INTERVAL", "5".to_owned()),
            ("RMQ_CONSUMER_SHUTDOWN_TIMEOUT", "10s".to_owned()),
            ("FAULT_WORKER_SLEEP_MS", "5".to_owned()),
        ],
    )
}

/// A new connection for the test after a fault that closed its own, keeping what it tracks.
async fn reconnect(broker: &mut Broker) {
    let fresh = Broker::connect_patiently(Duration::from_secs(60)).await;
    let old = std::mem::replace(broker, fresh);
    broker.adopt(old);
}

/// Publishes bodies that are not UTF-8; the broker may refuse some while faults land.
async fn publish_bad(broker: &Broker, exchange: &str, queue: &str, count: usize) -> usize {
    let mut confirmed = 0;
    for i in 0..count {
        let body = [0xff, 0xfe, b'b', b'a', b'd', u8::try_from(i % 200).unwrap()];
        let Ok(confirm) = broker
            .channel
            .basic_publish(
                exchange.into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
        else {
            continue;
        };
        if let Ok(confirmation) = confirm.await
            && confirmation.is_ack()
            && confirmation.take_message().is_none()
        {
            confirmed += 1;
        }
    }
    confirmed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f26_chaos_under_load() {
    let seconds: u64 = std::env::var("F26_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(90);
    let seed: u64 = std::env::var("F26_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(26, |d| d.as_secs())
        });
    println!("[F26] seed {seed} (F26_SEED={seed} repeats this schedule), {seconds} s of faults");
    let mut rng = Rng(seed);

    let mut broker = Broker::connect().await;
    let proxy = Proxy::start().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let route = Route::new(&mut config, "work", &mut broker);
    broker.track_queue(&format!("{}.suspect", route.queue));
    let _cleanup = broker.cleanup_on_panic();
    let mut steady = spawn(&proxy, &exchange, &route);
    let mut other = spawn(&proxy, &exchange, &route);
    steady.wait_consumers(&broker, &route.queue, 2).await;

    let mut ledger = Ledger::new("F26");
    let mut failing = Vec::new();
    let wave = |ledger: &Ledger, failing: &mut Vec<String>, rng: &mut Rng| -> Vec<Value> {
        ledger
            .ids(100)
            .into_iter()
            .map(|id| {
                let roll = rng.below(100);
                let extra = match roll {
                    0..=3 => json!({"fail": true}),
                    4..=5 => json!({"fail": "dead"}),
                    _ => json!({}),
                };
                if roll <= 5 {
                    failing.push(id.clone());
                }
                task(&id, extra)
            })
            .collect()
    };
    // Warm up, then take the steady worker's baseline.
    let tasks = wave(&ledger, &mut failing, &mut rng);
    ledger
        .publish(&broker, &exchange, &route.queue, &tasks)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = Resources::of(steady.pid());
    let channels_before = worker_channels(steady.pid()).await;
    println!(
        "[F26] steady worker at start: {before:?}, channels per connection {channels_before:?}"
    );
    assert_eq!(channels_before.len(), 1, "one connection per worker");

    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut bad = 0;
    let mut curve = vec![(0_u64, before)];
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    while Instant::now() < until {
        let tasks = wave(&ledger, &mut failing, &mut rng);
        ledger
            .publish(&broker, &exchange, &route.queue, &tasks)
            .await;
        if rng.below(4) == 0 {
            bad += publish_bad(&broker, &exchange, &route.queue, 2).await;
        }
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(3000))).await;
        let fault = FAULTS[usize::try_from(rng.below(5)).unwrap()];
        println!("[F26] {:>5.1}s {fault:?}", started.elapsed().as_secs_f64());
        match fault {
            Fault::CloseConnections => {
                rabbitmqctl(&["close_all_connections", "F26"]).await;
                reconnect(&mut broker).await;
            }
            Fault::RestartBroker => {
                let stopped = StoppedApp::stop().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                stopped.start().await;
                reconnect(&mut broker).await;
            }
            Fault::ResetProxy => proxy.reset_once(),
            Fault::MemoryAlarm => {
                let alarm = MemoryAlarm::raise().await;
                tokio::time::sleep(Duration::from_secs(2 + rng.below(3))).await;
                drop(alarm);
            }
            Fault::KillWorker => {
                other.kill9().await;
                other = spawn(&proxy, &exchange, &route);
            }
        }
        *injected.entry(fault).or_default() += 1;
        let now = Resources::of(steady.pid());
        curve.push((started.elapsed().as_secs(), now));
    }
    proxy.stop_resetting();
    println!("[F26] faults: {injected:?}");
    assert!(
        steady.exited().is_none(),
        "the steady worker died; its log:\n{}",
        steady.log()
    );

    ledger
        .drain_route(
            &broker,
            &route,
            Duration::from_secs(3),
            Duration::from_secs(180),
        )
        .await;
    let report = ledger.assert_nothing_lost();
    let faults: u32 = injected.values().sum();
    // Each fault can repeat what was at work: a result published but not acked, per worker,
    // at most basic.qos deliveries, and a retry or dead-letter copy likewise.
    let bound = usize::try_from(faults).unwrap() * 2 * usize::from(PREFETCH + PREFETCH / 2);
    println!(
        "[F26] {} tasks confirmed, {} results ({} duplicates, bound {bound}), {} dead-lettered ids ({} copies), {} failing, {} bad bodies confirmed",
        report.confirmed,
        report.results_total,
        report.duplicates,
        report.dead_lettered,
        report.dead_total,
        failing.len(),
        bad
    );
    assert!(report.duplicates <= bound, "{report:?}");
    for id in &failing {
        if ledger.confirmed.contains(id) {
            assert!(
                ledger.dead.contains_key(id),
                "failing task {id} not in the dead-letter queue"
            );
        }
    }
    let bad_dead = ledger
        .dead_messages
        .iter()
        .filter(|m| m.json.is_none())
        .count();
    assert!(
        bad_dead >= bad,
        "{bad} bad bodies confirmed, {bad_dead} dead-lettered"
    );

    let after = Resources::of(steady.pid());
    curve.push((started.elapsed().as_secs(), after));
    if seconds > 300 {
        for (at, r) in &curve {
            println!(
                "[F26] curve {at:>5}s fds {:>4} threads {:>3} rss {:>7} KiB",
                r.fds, r.threads, r.rss_kib
            );
        }
    }
    // Settled again: one connection, no more channels than at the start (the watchdog's
    // probe channel may be between a close and its reopening).
    let most = channels_before.iter().copied().max().unwrap_or(0) + 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    let channels_after = loop {
        let channels = worker_channels(steady.pid()).await;
        if channels.len() == 1 && channels.iter().all(|c| *c <= most) {
            break channels;
        }
        assert!(
            Instant::now() < deadline,
            "the steady worker holds connections with channels {channels:?} (at the start: {channels_before:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "[F26] steady worker at the end: {after:?}, channels per connection {channels_after:?}"
    );
    assert!(
        after.fds <= before.fds + 8,
        "fds grew: {before:?} -> {after:?}"
    );
    assert!(
        after.threads <= before.threads + 4,
        "threads grew: {before:?} -> {after:?}"
    );
    assert!(
        after.rss_kib <= before.rss_kib * 2 + 32 * 1024,
        "memory grew: {before:?} -> {after:?}"
    );
    let (status, _) = steady.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "steady worker: {status}");
    broker.cleanup().await;
}

//! Network faults between the engine and the broker, made by a TCP proxy (the test's own
//! publisher and reader connect to the broker directly): F07, repeated connection resets.
//!
//! The run checks the ledger of tests/RELIABILITY.md (every confirmed task id ends as a
//! result or in the dead-letter queue; duplicates are printed and bounded) and that nothing
//! leaks across the reconnects: broker connections and channels, file descriptors, threads,
//! tokio tasks.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::time::{Duration, Instant};

use rmq_consumer::{__private::publisher::DEFAULT_PUBLISH_CHANNELS, config::SecretUrl, consumer};
use rmq_consumer_tests::{
    self as common, Broker, Ledger, Proxy, Route, Running, eventually, rabbitmqctl, test_config,
    unique,
};
use serde_json::{Value, json};

const PREFETCH: u16 = 8;
/// The consumer channel's `basic.qos`: the prefetch plus the default read-ahead (prefetch / 2).
const QOS: u16 = PREFETCH + PREFETCH / 2;
/// The engine's channels on a settled connection: the handler's consumer channels (work and
/// suspect queue), the publisher's confirm channels and the watchdog's probe channel.
const ENGINE_CHANNELS: usize = 2 + DEFAULT_PUBLISH_CHANNELS + 1;

/// Works `sleep_ms` and answers with the task id.
#[consumer(
    queue = "tests.fault_network.steady",
    reply_key = "tests.fault_network.steady.result"
)]
async fn steady(task: Value) -> Value {
    let ms = task["sleep_ms"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    json!({"id": task["id"]})
}

fn succeeded(running: &Running) -> u64 {
    running.health.snapshot().handlers[0].succeeded
}

/// Entries of a `/proc/self/...` directory (open fds, threads).
fn proc_entries(dir: &str) -> usize {
    std::fs::read_dir(format!("/proc/self/{dir}"))
        .unwrap_or_else(|e| panic!("/proc/self/{dir}: {e}"))
        .count()
}

/// What the open fds are (`socket:[inode]`, `anon_inode:[eventfd]`, ...), for a leak report.
fn fd_targets() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|entry| {
                let entry = entry.ok()?;
                let target = std::fs::read_link(entry.path()).ok()?;
                Some(format!(
                    "{}->{}",
                    entry.file_name().to_string_lossy(),
                    target.display()
                ))
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Live tokio tasks of the test's runtime (the engine's and the proxy's).
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// What the process looks like from inside.
#[derive(Debug, Clone, Copy)]
struct Resources {
    fds: usize,
    threads: usize,
    tasks: usize,
}

impl Resources {
    fn now() -> Self {
        Self {
            fds: proc_entries("fd"),
            threads: proc_entries("task"),
            tasks: alive_tasks(),
        }
    }
}

/// One broker connection: its peer port (the proxy's upstream socket) and its channels.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BrokerConnection {
    peer_port: u16,
    channels: usize,
    name: String,
}

/// The broker's connections whose client-provided name is this process's engine
/// (`rmq-consumer[...] pid <this pid>`), or whose peer port is one the proxy opened: only
/// this test's, whatever else runs against the broker. `rabbitmqctl` is used rather than the
/// management API, whose connection list lags by a statistics interval.
async fn engine_connections(proxy_ports: &[u16]) -> Vec<BrokerConnection> {
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--formatter",
        "json",
        "peer_port",
        "channels",
        "client_properties",
    ])
    .await;
    let rows: Vec<Value> = serde_json::from_str(&listing)
        .unwrap_or_else(|e| panic!("list_connections output is not JSON ({e}):\n{listing}"));
    let pid_suffix = format!(" pid {}\"", std::process::id());
    rows.iter()
        .filter_map(|row| {
            let peer_port = row["peer_port"].as_u64()? as u16;
            let properties = row["client_properties"].to_string();
            let name_start = properties.find("rmq-consumer[");
            let ours = name_start.is_some() && properties.contains(&pid_suffix);
            (ours || proxy_ports.contains(&peer_port)).then(|| BrokerConnection {
                peer_port,
                channels: row["channels"].as_u64().unwrap_or(u64::MAX) as usize,
                name: name_start
                    .map(|at| {
                        properties[at..]
                            .split('"')
                            .next()
                            .unwrap_or_default()
                            .to_owned()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Waits until the broker shows exactly one engine connection, through the proxy's live
/// upstream socket, with [`ENGINE_CHANNELS`] + `extra_channels` channels; an error with the
/// listing at the timeout.
async fn expect_engine_connection(
    proxy: &Proxy,
    extra_channels: isize,
    timeout: Duration,
) -> Result<BrokerConnection, String> {
    let expected = ENGINE_CHANNELS.saturating_add_signed(extra_channels);
    let deadline = Instant::now() + timeout;
    loop {
        let ports = proxy.upstream_ports();
        let seen = engine_connections(&ports).await;
        if let [only] = seen.as_slice()
            && only.channels == expected
            && ports.last() == Some(&only.peer_port)
        {
            return Ok(only.clone());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "after {timeout:?} the broker still shows {} connection(s) of this engine, \
                 expected exactly 1 (the proxy's newest upstream port {:?}) with {expected} \
                 channels: {seen:?}",
                seen.len(),
                ports.last()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// F07: the proxy between the engine and the broker resets (RST both ways) each connection
/// after it has forwarded 4-40 KB, again and again while a few thousand tasks are processed,
/// then forwards plainly. The engine reconnects each time and converges: every task done,
/// lost 0, duplicates within prefetch + read-ahead per reset, and nothing leaks — one broker
/// connection with its usual channels, no extra fds, threads or tokio tasks, nothing in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f07_connection_reset_repeatedly() {
    const TASKS: usize = 4000;
    const MIN_RESETS: u64 = 12;
    const FD_SLACK: usize = 3;
    const THREAD_SLACK: usize = 2;
    const TASK_SLACK: usize = 2;
    let _logs = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "rmq_consumer=info".to_owned()),
        )
        .with_test_writer()
        .try_init();
    let started = Instant::now();
    let mut broker = Broker::connect().await;
    let proxy = Proxy::start().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.urls = vec![SecretUrl::new(proxy.url())];
    config.prefetch_count = PREFETCH;
    config.retry_connect_interval = Duration::from_millis(200);
    config.retry_connect_max = Duration::from_millis(500);
    // The watchdog ticks every heartbeat / 2 = 1 s: its probe channel is there soon after
    // each connect, so the channel count of a settled connection is exact.
    config.heartbeat_interval = 2;
    let route = Route::new(&mut config, "steady", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["steady"]).await;

    expect_engine_connection(&proxy, 0, Duration::from_secs(10))
        .await
        .unwrap();
    // One reset before the baseline: the first reconnect of a process sets up a few things
    // once (4 more fds, whether 12 or 30 resets follow), so growth per reset is what the
    // check below sees.
    proxy.reset_once();
    eventually(
        "a warm-up reset and reconnect",
        Duration::from_secs(20),
        || proxy.resets() >= 1 && running.reconnected_since(0),
    )
    .await;
    // The baseline: the engine connected and settled, before the faults.
    let first = expect_engine_connection(&proxy, 0, Duration::from_secs(10))
        .await
        .unwrap();
    let before = Resources::now();
    let fds_before = fd_targets();
    println!(
        "[F07] before: broker {first:?}, proxy open={}, {before:?}",
        proxy.open_connections()
    );

    let mut ledger = Ledger::new("F07");
    ledger
        .preload(
            &broker,
            &exchange,
            &route.queue,
            TASKS,
            &json!({"sleep_ms": 1}),
        )
        .await;
    eventually("some work done", Duration::from_secs(30), || {
        succeeded(&running) >= (TASKS / 20) as u64
    })
    .await;

    // Faults: every connection is reset after 4-40 KB.
    let faults_from = Instant::now();
    let done_at_first = succeeded(&running);
    proxy.reset_every(4 * 1024, 40 * 1024);
    eventually(
        &format!("{MIN_RESETS} resets and reconnects"),
        Duration::from_secs(40),
        || {
            let s = running.health.snapshot();
            proxy.resets() >= MIN_RESETS && s.reconnects >= MIN_RESETS - 2
        },
    )
    .await;
    proxy.stop_resetting();
    let done_at_last = succeeded(&running);
    let resets = proxy.resets();
    let reconnects_during = running.health.snapshot().reconnects;
    println!(
        "[F07] {resets} resets ({} proxied connections, {reconnects_during} reconnects) in {:?}, \
         from {done_at_first} to {done_at_last} of {TASKS} done",
        proxy.accepted(),
        faults_from.elapsed()
    );
    assert!(
        done_at_last < TASKS as u64,
        "the run ended before the last reset; the resets did not hit a running workload"
    );

    // Convergence: every task accounted for once the resets stop.
    ledger
        .drain_route(
            &broker,
            &route,
            Duration::from_secs(1),
            Duration::from_secs(40),
        )
        .await;
    let report = ledger.assert_nothing_lost();
    let snapshot = running.health.snapshot();
    println!(
        "[F07] converged after {:?}: reconnects={} stale_acks={} handler_runs={} succeeded={} \
         duplicates={} (bound {} = {resets} resets x qos {QOS})",
        faults_from.elapsed(),
        snapshot.reconnects,
        snapshot.handlers[0].stale_acks,
        snapshot.handlers[0].handler_runs,
        snapshot.handlers[0].succeeded,
        report.duplicates,
        resets * u64::from(QOS),
    );
    assert!(
        snapshot.reconnects >= MIN_RESETS - 2,
        "reconnected only {} times: {snapshot:?}",
        snapshot.reconnects
    );
    assert_eq!(
        report.dead_lettered, 0,
        "a connection reset is not a failure"
    );
    let bound = resets as usize * usize::from(QOS);
    assert!(
        report.duplicates <= bound,
        "{} duplicates, more than prefetch + read-ahead per reset ({bound})",
        report.duplicates
    );

    // No leaks: one connection with its usual channels, nothing in flight, the process back to
    // its fds, threads and tasks of before the faults.
    assert!(
        running.reconnected_since(0),
        "{:?}",
        running.health.snapshot()
    );
    // Every leak found is listed, then the engine is stopped, then the test fails on them:
    // one run shows them all.
    let mut leaks = Vec::new();
    let idle = Instant::now();
    while running.health.snapshot().handlers[0].in_flight > 0
        && idle.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snapshot = running.health.snapshot();
    if snapshot.handlers[0].in_flight != 0 {
        leaks.push(format!(
            "{} deliveries still in flight {:?} after every task was done (received={} \
             succeeded={} stale_acks={} retried={} rejected={})",
            snapshot.handlers[0].in_flight,
            idle.elapsed(),
            snapshot.handlers[0].received,
            snapshot.handlers[0].succeeded,
            snapshot.handlers[0].stale_acks,
            snapshot.handlers[0].retried,
            snapshot.handlers[0].rejected,
        ));
    }
    let last = match expect_engine_connection(&proxy, 0, Duration::from_secs(10)).await {
        Ok(last) => Some(last),
        Err(leak) => {
            leaks.push(leak);
            None
        }
    };
    if proxy.open_connections() != 1 {
        leaks.push(format!(
            "the proxy carries {} connections, expected the engine's one",
            proxy.open_connections()
        ));
    }
    let settle = Instant::now();
    let mut after = Resources::now();
    while (after.fds > before.fds + FD_SLACK
        || after.threads > before.threads + THREAD_SLACK
        || after.tasks > before.tasks + TASK_SLACK)
        && settle.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = Resources::now();
    }
    println!(
        "[F07] after: broker {last:?}, proxy open={}, {after:?} (settled in {:?})",
        proxy.open_connections(),
        settle.elapsed()
    );
    if after.fds > before.fds + FD_SLACK {
        leaks.push(format!(
            "open fds {} -> {} (slack {FD_SLACK}): leaked sockets? before: {fds_before:?}, \
             now: {:?}",
            before.fds,
            after.fds,
            fd_targets()
        ));
    }
    if after.threads > before.threads + THREAD_SLACK {
        leaks.push(format!(
            "threads {} -> {} (slack {THREAD_SLACK})",
            before.threads, after.threads
        ));
    }
    if after.tasks > before.tasks + TASK_SLACK {
        leaks.push(format!(
            "tokio tasks {} -> {} (slack {TASK_SLACK}): leaked per-connection or per-delivery \
             tasks?",
            before.tasks, after.tasks
        ));
    }

    let stopping = Instant::now();
    let stopped = running.stop().await;
    println!(
        "[F07] engine stopped in {:?}: {stopped:?}",
        stopping.elapsed()
    );
    assert!(
        leaks.is_empty(),
        "[F07] leaks after convergence:\n{}",
        leaks.join("\n")
    );
    stopped.unwrap();
    proxy.cut().await;
    println!("[F07] took {:?}", started.elapsed());
    broker.cleanup().await;
}

/// A6: a session that fails right after it opens is retried with the reconnect backoff, not
/// at once. Here the URL's `channel_max=4` leaves the engine too few channels (it needs a
/// consumer channel per queue, its confirm lanes and the watchdog's probe), so every session
/// ends during setup: before the fix the engine reconnected hundreds of times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a6_a_session_that_fails_at_once_backs_off() {
    const WATCH: Duration = Duration::from_secs(6);
    let _logs = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "rmq_consumer=info".to_owned()),
        )
        .with_test_writer()
        .try_init();
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let url = common::broker_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    config.urls = vec![SecretUrl::new(format!("{url}{separator}channel_max=4"))];
    config.retry_connect_interval = Duration::from_millis(200);
    config.retry_connect_max = Duration::from_secs(1);
    let _route = Route::new(&mut config, "steady", &mut broker);
    let _cleanup = broker.cleanup_on_panic();
    let engine = rmq_consumer::Engine::builder(config)
        .only(["steady"])
        .build()
        .unwrap();
    let stop = engine.shutdown_token();
    let health = engine.health();
    let task = tokio::spawn(engine.run());
    tokio::time::sleep(WATCH).await;
    let snapshot = health.snapshot();
    stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
    // 200 ms doubling to 1 s: about 7 sessions in 6 s; a storm makes thousands.
    println!("[A6] {} reconnects in {WATCH:?}", snapshot.reconnects);
    assert!(
        snapshot.reconnects <= 12,
        "{} reconnects in {WATCH:?}: sessions that fail at once are not backed off",
        snapshot.reconnects
    );
    assert!(
        !snapshot.handlers.iter().any(|h| h.consuming),
        "the engine should never have consumed with 4 channels: {snapshot:?}"
    );
    assert!(ended.is_ok(), "the engine did not stop within 10 s");
    broker.cleanup().await;
}

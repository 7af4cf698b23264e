//! The watchdog end to end (issue 14): it must heal a consumer that is really stuck (a proxy
//! swallows its deliveries: re-subscribe, then reconnect, then `/livez` fails, and it recovers
//! once deliveries flow) and never disturb one that is busy.
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
use tokio::io::AsyncWriteExt as _;

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

/// A TCP proxy in front of the broker that, while `dropping` is set, swallows every
/// `basic.deliver` (and its content frames) on the way to the engine: the broker thinks the
/// messages delivered, the engine never sees them. A consumer really stuck, with the
/// connection and everything else healthy.
struct DeliverDropper {
    port: u16,
    dropping: std::sync::Arc<AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl DeliverDropper {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dropping = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&dropping);
        let (host, broker_port) = common::broker_addr();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect((host.as_str(), broker_port)).await
                else {
                    continue;
                };
                let (mut client_read, client_write) = client.into_split();
                let (server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                });
                tokio::spawn(filter(
                    server_read,
                    client_write,
                    std::sync::Arc::clone(&flag),
                ));
            }
        });
        Self {
            port,
            dropping,
            accept,
        }
    }

    fn url(&self) -> String {
        let url = common::broker_url();
        let (host, port) = common::broker_addr();
        url.replacen(
            &format!("{host}:{port}"),
            &format!("127.0.0.1:{}", self.port),
            1,
        )
    }
}

impl Drop for DeliverDropper {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies AMQP frames from the broker to the engine, leaving out deliveries while `dropping`.
async fn filter(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dropping: std::sync::Arc<AtomicBool>,
) {
    use tokio::io::AsyncReadExt as _;
    let mut swallowing = std::collections::HashSet::new();
    loop {
        let mut head = [0_u8; 7];
        if from.read_exact(&mut head).await.is_err() {
            break;
        }
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut rest = vec![0_u8; size + 1];
        if from.read_exact(&mut rest).await.is_err() {
            break;
        }
        let (kind, channel) = (head[0], u16::from_be_bytes([head[1], head[2]]));
        let drop_it = match kind {
            // A method frame: basic.deliver (class 60, method 60) is swallowed with its
            // content; any other method ends a swallowed content.
            1 => {
                let deliver = rest.starts_with(&[0, 60, 0, 60]);
                if deliver && dropping.load(Ordering::Relaxed) {
                    swallowing.insert(channel);
                    true
                } else {
                    swallowing.remove(&channel);
                    false
                }
            }
            2 | 3 => swallowing.contains(&channel),
            _ => false,
        };
        if !drop_it && (to.write_all(&head).await.is_err() || to.write_all(&rest).await.is_err()) {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A `MakeWriter` that keeps every log line.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn livez(addr: std::net::SocketAddr) -> u16 {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let request = "GET /livez HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut response = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response).await;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The watchdog heals a consumer that is really stuck (issue 14): the broker keeps messages
/// ready, the consumer gets nothing (a proxy swallows every `basic.deliver`), the connection
/// is fine. The watchdog re-subscribes first, then forces a reconnect, and only when that
/// fails too does `/livez` fail. Once deliveries flow again the next reconnect heals it,
/// `/livez` passes again, and every task is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_heals_a_stuck_consumer_step_by_step() {
    const TASKS: usize = 12;
    let logs = Captured::default();
    let _logs = tracing_subscriber::fmt()
        .with_env_filter("rmq_consumer=info")
        .with_writer(logs.clone())
        .with_ansi(false)
        .try_init();
    let mut broker = Broker::connect().await;
    let _cleanup = broker.cleanup_on_panic();
    let proxy = DeliverDropper::start().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.urls = vec![rmq_consumer::config::SecretUrl::new(proxy.url())];
    config.prefetch_count = 2;
    config.queue_stuck_threshold = Duration::from_secs(2);
    config.max_consecutive_failures = 1;
    config.heartbeat_interval = 2;
    config.retry_connect_interval = Duration::from_millis(200);
    config.retry_connect_max = Duration::from_millis(500);
    let http = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    config.http_addr = Some(http);
    let route = Route::new(&mut config, "slow", &mut broker);
    broker.track_queue(&format!("{}.suspect", route.queue));
    let running = Running::start(config, &["slow"]).await;
    assert_eq!(livez(http).await, 200);

    proxy.dropping.store(true, Ordering::Relaxed);
    let ids: Vec<String> = (0..TASKS).map(|_| unique("task")).collect();
    for id in &ids {
        let body = serde_json::to_vec(&task(id, json!({}))).unwrap();
        broker
            .publish_raw(&exchange, &route.queue, &body, Default::default())
            .await;
    }
    // Healing runs its steps; /livez holds until the last one fails.
    let mut live_while_healing = true;
    let failed = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let snapshot = running.health.snapshot();
            if snapshot.healing_failed {
                return snapshot;
            }
            if livez(http).await != 200 {
                live_while_healing = false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the watchdog never reported healing failed: {:?}\n{}",
            running.health.snapshot(),
            logs.text()
        )
    });
    assert!(
        failed.reconnects >= 1,
        "no reconnect before failing: {failed:?}"
    );
    assert!(
        live_while_healing,
        "/livez failed before healing had failed"
    );
    assert_eq!(
        livez(http).await,
        503,
        "/livez passes though healing failed"
    );
    // It stays failed through the reconnects that follow: a new subscription is no progress.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(running.health.snapshot().healing_failed);
    assert_eq!(
        livez(http).await,
        503,
        "/livez passes again without progress"
    );
    let text = logs.text();
    let resubscribed = text
        .find("re-subscribing")
        .expect("no re-subscription logged");
    let reconnect = text
        .find("forcing a reconnect")
        .expect("no forced reconnect logged");
    let gave_up = text
        .find("healing failed")
        .expect("no healing failure logged");
    assert!(
        resubscribed < reconnect && reconnect < gave_up,
        "steps out of order:\n{text}"
    );

    // Deliveries flow again: the next reconnect heals.
    proxy.dropping.store(false, Ordering::Relaxed);
    let results = broker
        .collect(&route.reply_queue, TASKS, Duration::from_secs(40))
        .await;
    let mut answered: Vec<String> = results.iter().filter_map(common::id_of).collect();
    answered.sort();
    answered.dedup();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(answered, expected, "every task answered");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while running.health.snapshot().healing_failed || livez(http).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "/livez did not recover: {:?}",
            running.health.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.stop().await.unwrap();
    broker.cleanup().await;
}

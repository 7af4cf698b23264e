//! `/metrics`, `/livez` and `/readyz` during a real run, and across a broker outage made by
//! cutting a TCP proxy between the engine and the broker (other tests are not disturbed).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use rmq_consumer::{config::SecretUrl, consumer};
use rmq_consumer_tests::{Broker, Proxy, Route, Running, eventually, test_config, unique};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[consumer(
    queue = "tests.observability.work",
    reply_key = "tests.observability.done"
)]
async fn work(data: Value) -> Result<Value, rmq_consumer::HandlerError> {
    if data["fail"] == true {
        return Err(rmq_consumer::HandlerError::dead_letter("asked to fail"));
    }
    Ok(json!({"ok": data}))
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or_else(|| panic!("metric {name} missing in:\n{text}"), |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_ledger_and_probes_follow_an_outage() {
    let mut broker = Broker::connect().await;
    let proxy = Proxy::start().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let http = free_port();
    let mut config = test_config(&exchange);
    config.urls = vec![SecretUrl::new(proxy.url())];
    config.http_addr = Some(http);
    let route = Route::new(&mut config, "work", &mut broker);
    let (queue, results) = (route.queue.clone(), route.reply_queue.clone());
    let running = Running::start(config, &["work"]).await;
    assert_eq!(get(http, "/readyz").await.0, 200);
    assert_eq!(get(http, "/livez").await.0, 200);

    let mut tasks: Vec<Value> = (0..50).map(|i| json!({"i": i})).collect();
    tasks.extend((0..5).map(|i| json!({"i": 100 + i, "fail": true})));
    broker.publish_many(&exchange, &queue, &tasks).await;
    let got = broker.collect(&results, 50, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 50);
    eventually("all settled", Duration::from_secs(10), || {
        let h = &running.health.snapshot().handlers[0];
        h.succeeded + h.dead_lettered == 55
    })
    .await;

    let (status, text) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    let labels = format!("{{handler=\"work\",queue=\"{queue}\"}}");
    assert_eq!(
        metric(
            &text,
            &format!("rmq_consumer_deliveries_received_total{labels}")
        ),
        55
    );
    assert_eq!(
        metric(
            &text,
            &format!("rmq_consumer_deliveries_succeeded_total{labels}")
        ),
        50
    );
    assert_eq!(
        metric(
            &text,
            &format!("rmq_consumer_deliveries_dead_lettered_total{labels}")
        ),
        5
    );
    assert_eq!(
        metric(
            &text,
            &format!("rmq_consumer_handler_duration_seconds_count{labels}")
        ),
        55
    );
    assert_eq!(
        metric(&text, &format!("rmq_consumer_consumer_up{labels}")),
        1
    );
    assert_eq!(metric(&text, "rmq_consumer_connected"), 1);

    // Outage: not ready, still alive.
    proxy.cut().await;
    eventually("not connected", Duration::from_secs(20), || {
        !running.health.snapshot().connected
    })
    .await;
    let (status, body) = get(http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not connected"), "{body}");
    assert_eq!(
        get(http, "/livez").await.0,
        200,
        "a broker outage must not fail liveness"
    );

    // Back: ready again, and work flows again.
    proxy.restore().await;
    running.wait_consuming(Duration::from_secs(30)).await;
    eventually("ready again", Duration::from_secs(10), || {
        running.health.snapshot().connected
    })
    .await;
    assert_eq!(get(http, "/readyz").await.0, 200);
    broker
        .publish_json(&exchange, &queue, &json!({"i": 999}))
        .await;
    assert_eq!(
        broker
            .collect(&results, 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    let text = get(http, "/metrics").await.1;
    assert!(metric(&text, "rmq_consumer_reconnects_total") >= 1);

    running.stop().await.unwrap();
    proxy.cut().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_continued_on_the_result() {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let route = Route::new(&mut config, "work", &mut broker);
    let (queue, results) = (route.queue.clone(), route.reply_queue.clone());
    let running = Running::start(config, &["work"]).await;
    let mut headers = lapin::types::FieldTable::default();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(parent.into()),
    );
    let props = lapin::BasicProperties::default()
        .with_headers(headers)
        .with_correlation_id("corr-1".into());
    broker
        .publish_raw(&exchange, &queue, br#"{"i": 1}"#, props)
        .await;
    let got = broker.collect(&results, 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    let child = &got[0].headers["traceparent"];
    assert!(
        child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "same trace: {child}"
    );
    assert_ne!(child, parent, "a new span id");
    assert_eq!(
        got[0].correlation_id.as_deref(),
        Some("corr-1"),
        "correlation id honoured"
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_broker_urls_are_tried_in_turn() {
    let mut broker = Broker::connect().await;
    let first = Proxy::start().await;
    let second = Proxy::start().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let dead = free_port();
    let mut config = test_config(&exchange);
    config.urls = vec![
        SecretUrl::new(format!("amqp://guest:guest@{dead}/%2f")),
        SecretUrl::new(first.url()),
        SecretUrl::new(second.url()),
    ];
    let route = Route::new(&mut config, "work", &mut broker);
    let (queue, results) = (route.queue.clone(), route.reply_queue.clone());
    // The first URL refuses connections: the engine moves on to the second.
    let running = Running::start(config, &["work"]).await;
    broker
        .publish_json(&exchange, &queue, &json!({"i": 1}))
        .await;
    assert_eq!(
        broker
            .collect(&results, 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );

    // The node behind the second URL goes away: the engine fails over to the third.
    first.cut().await;
    eventually("reconnected", Duration::from_secs(30), || {
        let s = running.health.snapshot();
        s.reconnects >= 1 && s.connected && s.handlers[0].consuming
    })
    .await;
    broker
        .publish_json(&exchange, &queue, &json!({"i": 2}))
        .await;
    assert_eq!(
        broker
            .collect(&results, 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    running.stop().await.unwrap();
    second.cut().await;
    broker.cleanup().await;
}

/// F03: the broker is unreachable when the worker starts. The engine keeps retrying at the
/// interval without failing, is alive but not ready, and starts consuming once the broker is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_retries_until_it_is_back() {
    let mut broker = Broker::connect().await;
    let proxy = Proxy::start().await;
    proxy.cut().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let http = free_port();
    let mut config = test_config(&exchange);
    config.urls = vec![SecretUrl::new(proxy.url())];
    config.http_addr = Some(http);
    config.retry_connect_interval = Duration::from_millis(300);
    config.retry_connect_max = Duration::from_millis(300);
    Route::new(&mut config, "work", &mut broker);
    let engine = rmq_consumer::Engine::builder(config)
        .only(["work"])
        .build()
        .unwrap();
    let stop = engine.shutdown_token();
    let health = engine.health();
    let task = tokio::spawn(engine.run());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !task.is_finished(),
        "the engine must not give up while the broker is down"
    );
    assert!(!health.snapshot().connected);
    assert_eq!(get(http, "/readyz").await.0, 503);
    assert_eq!(get(http, "/livez").await.0, 200);

    proxy.restore().await;
    eventually(
        "consuming once the broker is back",
        Duration::from_secs(20),
        || {
            let s = health.snapshot();
            s.connected && s.handlers[0].consuming
        },
    )
    .await;
    assert_eq!(get(http, "/readyz").await.0, 200);
    stop.cancel();
    task.await.unwrap().unwrap();
    proxy.cut().await;
    broker.cleanup().await;
}

/// F06: the network goes silent (the proxy holds the connection but forwards nothing). The
/// missing heartbeats are noticed within a few heartbeat intervals, the engine reconnects once
/// the network is back, and work flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_network_loss_is_detected_by_heartbeats() {
    let mut broker = Broker::connect().await;
    let proxy = Proxy::start().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    config.urls = vec![SecretUrl::new(proxy.url())];
    config.heartbeat_interval = 1;
    let route = Route::new(&mut config, "work", &mut broker);
    let (queue, results) = (route.queue.clone(), route.reply_queue.clone());
    let running = Running::start(config, &["work"]).await;
    proxy.freeze(true);
    let frozen_at = Instant::now();
    eventually("silence detected", Duration::from_secs(15), || {
        !running.health.snapshot().connected
    })
    .await;
    let detected = frozen_at.elapsed();
    println!("[F06] silent loss detected after {detected:?} (heartbeat 1 s)");
    assert!(detected <= Duration::from_secs(6), "took {detected:?}");
    proxy.freeze(false);
    running.wait_consuming(Duration::from_secs(30)).await;
    broker
        .publish_json(&exchange, &queue, &json!({"i": 1}))
        .await;
    assert_eq!(
        broker
            .collect(&results, 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    assert!(running.health.snapshot().reconnects >= 1);
    running.stop().await.unwrap();
    proxy.cut().await;
    broker.cleanup().await;
}

/// Reads until the peer closes; `true` when it did within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0_u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Anyone who reaches the port can connect: connections beyond the cap are closed at once,
/// a client that never finishes its headers is dropped after the header timeout, and the
/// probes answer again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_bounds_connections_and_slow_clients() {
    let mut broker = Broker::connect().await;
    let _cleanup = broker.cleanup_on_panic();
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let http = free_port();
    let mut config = test_config(&exchange);
    config.http_addr = Some(http);
    Route::new(&mut config, "work", &mut broker);
    let running = Running::start(config, &["work"]).await;
    assert_eq!(get(http, "/livez").await.0, 200);

    // 64 slow clients (each sent half a request line) fill the listener.
    let mut slow = Vec::new();
    for _ in 0..64 {
        let mut stream = TcpStream::connect(http).await.unwrap();
        stream.write_all(b"GET /livez HT").await.unwrap();
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = TcpStream::connect(http).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "a connection beyond the cap is closed at once"
    );
    // The header timeout (5 s) frees every slot.
    for stream in &mut slow {
        assert!(
            closed_within(stream, Duration::from_secs(15)).await,
            "a client that never finishes its headers is dropped"
        );
    }
    drop(slow);
    assert_eq!(get(http, "/livez").await.0, 200);

    // An oversized request head is refused, not buffered.
    let mut big = TcpStream::connect(http).await.unwrap();
    let head = format!(
        "GET /livez HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = big.write_all(head.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    assert_eq!(get(http, "/readyz").await.0, 200);
    running.stop().await.unwrap();
    broker.cleanup().await;
}

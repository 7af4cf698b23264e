//! Startup: configuration loading and validation, handler/config matching errors, and the
//! masking of passwords in everything the engine logs while it cannot log in.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use rmq_consumer::{Config, Engine, Error, config::SecretUrl, consumer, error::SetupError};
use rmq_consumer_tests::{self as common, test_config, unique};
use serde_json::Value;

#[consumer(queue = "tests.setup.shared")]
async fn first_on_shared(_data: Value) {}

#[consumer(queue = "tests.setup.shared")]
async fn second_on_shared(_data: Value) {}

#[consumer(queue = "tests.setup.alone", reply_key = "tests.setup.alone.done")]
async fn alone(_data: Value) {}

#[test]
fn two_handlers_on_one_queue_name_both_locations() {
    let error = Engine::builder(Config::default())
        .only(["first_on_shared", "second_on_shared"])
        .build()
        .unwrap_err();
    let Error::Setup(setup) = &error else {
        panic!("expected a setup error, got {error:?}");
    };
    let SetupError::DuplicateQueue {
        queue,
        first_location,
        second_location,
        ..
    } = &**setup
    else {
        panic!("expected DuplicateQueue, got {error:?}");
    };
    assert_eq!(queue, "tests.setup.shared");
    let text = error.to_string();
    for location in [first_location, second_location] {
        assert!(location.starts_with("tests/tests/setup.rs:"), "{location}");
        assert!(text.contains(location.as_str()), "{text}");
    }
}

#[test]
fn config_sections_must_name_registered_handlers() {
    let config = Config::from_toml_str("[consumers.alonee]\nprefetch = 2\n").unwrap();
    let error = Engine::builder(config).build().unwrap_err();
    assert!(error.to_string().contains("[consumers.alonee]"), "{error}");
}

#[test]
fn python_keys_override_the_single_handler_and_are_ambiguous_with_several() {
    let config = Config::from_toml_str(
        r#"
conn_iddress = "amqp://guest:guest@127.0.0.1:5672/%2f"
exchange_iddress = "your.exchange.name"
b2m_queue_iddress = "your.consumer.queue"
m2b_queue_iddress = "your.response.queue"
m2b_routing_key = "your.response.routing.key"
prefetch_count = 4
retry_connect_interval = 30
heartbeat_interval = 30
message_timeout = 300
max_retry_count = 3
queue_stuck_threshold = 90
max_consecutive_failures = 3
enable_result_cache = false
result_cache_size = 1000
"#,
    )
    .unwrap();
    assert_eq!(config.exchange, "your.exchange.name");
    let engine = Engine::builder(config.clone())
        .only(["alone"])
        .build()
        .unwrap();
    assert_eq!(
        engine.handlers(),
        vec![("alone".to_owned(), "your.consumer.queue".to_owned())]
    );
    let error = Engine::builder(config)
        .only(["alone", "first_on_shared"])
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, Error::Setup(e) if matches!(**e, SetupError::AmbiguousOverride { key: "queue", .. })),
        "{error}"
    );
}

#[test]
fn every_config_problem_is_reported_at_once() {
    let error = Config::from_toml_str(
        "prefetch_count = 0\nheartbeat_interval = \"often\"\nretry_delays = [\"soon\"]\nqueue_type = \"stream\"\nurll = \"x\"\n",
    )
    .unwrap_err();
    let text = error.to_string();
    for key in [
        "prefetch_count",
        "heartbeat_interval",
        "retry_delays",
        "queue_type",
        "urll",
    ] {
        assert!(text.contains(key), "`{key}` missing from: {text}");
    }
    assert!(text.contains("url"), "suggests the right key: {text}");
}

/// A `MakeWriter` that keeps everything logged.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

// Current-thread runtime: every task of the engine logs through the thread-local subscriber.
#[tokio::test]
async fn a_canary_password_never_appears_in_logs_errors_or_debug() {
    // `c@n:a/r#y%?密` URL-encoded; the broker refuses it, so the engine logs failed attempts.
    let raw = "c@n:a/r#y%?密";
    let encoded = "c%40n%3Aa%2Fr%23y%25%3F%E5%AF%86";
    let (host, port) = common::broker_addr();
    let url = format!("amqp://canaryuser:{encoded}@{host}:{port}/%2f");
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let mut config = test_config(&unique("ex"));
    config.urls = vec![SecretUrl::new(url.clone())];
    config.retry_connect_interval = Duration::from_millis(200);
    let debug = format!("{config:?} {}", config.urls[0]);
    let engine = Engine::builder(config).only(["alone"]).build().unwrap();
    let stop = engine.shutdown_token();
    let task = tokio::spawn(engine.run());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let result = task.await.unwrap();
    let bad_url =
        Config::from_toml_str(&format!("url = \"http://u:{encoded}@host/\"")).unwrap_err();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("connection attempt failed"),
        "the test must see failed logins: {logs}"
    );
    assert!(
        logs.contains("canaryuser:****@"),
        "masked URL is logged: {logs}"
    );
    let everything = format!("{logs}\n{debug}\n{result:?}\n{bad_url}\n{bad_url:?}");
    for secret in [raw, encoded, "c%40n", "r#y", "%E5%AF%86", "密"] {
        assert!(
            !everything.contains(secret),
            "`{secret}` leaked in:\n{everything}"
        );
    }
}

/// F21: the queue already exists with other arguments: the engine stops with an error that
/// names the queue and the argument, instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_drift_is_a_clear_startup_error() {
    let mut broker = common::Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let queue = unique("drift");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(10),
    );
    broker
        .channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    broker.track_queue(&queue);
    let mut config = test_config(&exchange);
    config.consumers.insert(
        "alone".to_owned(),
        rmq_consumer::config::ConsumerConfig {
            queue: Some(queue.clone()),
            reply_queue: None,
            ..Default::default()
        },
    );
    broker.track_queue(&format!("{queue}.dlq"));
    let engine = Engine::builder(config).only(["alone"]).build().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), engine.run())
        .await
        .expect("a refused topology must stop the engine, not loop");
    let error = result.unwrap_err();
    let chain = {
        let mut all = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            all.push_str(": ");
            all.push_str(&cause.to_string());
            source = cause.source();
        }
        all
    };
    assert!(chain.contains(&queue), "{chain}");
    assert!(chain.contains("x-max-length"), "{chain}");
    broker.cleanup().await;
}

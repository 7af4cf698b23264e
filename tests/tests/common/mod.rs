//! Shared helpers for the integration tests: a real broker connection, unique names, a
//! confirmed publisher, result collection, engine start/stop, cleanup.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
        ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use rmq_consumer::{Config, Engine, HealthHandle, config::SecretUrl};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The broker the tests use: `$RMQ_TEST_URL` or the local default.
pub fn broker_url() -> String {
    std::env::var("RMQ_TEST_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A unique name for this test run.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "test.{prefix}.{}.{}.{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A connection for the test's own publishing and inspection. Fails loudly without a broker.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
    created_queues: Vec<String>,
    created_exchanges: Vec<String>,
}

impl Broker {
    pub async fn connect() -> Self {
        let url = broker_url();
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "these tests need a running RabbitMQ at {} (set RMQ_TEST_URL): {e}",
                    SecretUrl::new(url.clone())
                )
            });
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            connection,
            channel,
            created_queues: Vec::new(),
            created_exchanges: Vec::new(),
        }
    }

    /// Remembers names to delete in [`Broker::cleanup`].
    pub fn track_queue(&mut self, name: &str) {
        self.created_queues.push(name.to_owned());
    }

    pub fn track_exchange(&mut self, name: &str) {
        self.created_exchanges.push(name.to_owned());
    }

    /// Declares a durable queue the test reads results from.
    pub async fn declare_queue(&mut self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.track_queue(name);
    }

    /// Publishes one message with confirms, to the default exchange when `exchange` is "".
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "publish to {exchange}/{routing_key} not confirmed: {confirm:?}"
        );
    }

    pub async fn publish_json(&self, exchange: &str, routing_key: &str, value: &Value) {
        let body = serde_json::to_vec(value).unwrap();
        self.publish_raw(
            exchange,
            routing_key,
            &body,
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
    }

    /// Publishes many JSON messages with pipelined confirms.
    pub async fn publish_many(&self, exchange: &str, routing_key: &str, values: &[Value]) {
        let mut pending = Vec::with_capacity(values.len());
        for value in values {
            let body = serde_json::to_vec(value).unwrap();
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                )
                .await
                .unwrap();
            pending.push(confirm);
        }
        for confirm in pending {
            let confirm = confirm.await.unwrap();
            assert!(
                matches!(confirm, lapin::Confirmation::Ack(None)),
                "{confirm:?}"
            );
        }
    }

    /// Collects `count` messages from `queue` (acking them), or fewer at `timeout`.
    pub async fn collect(&self, queue: &str, count: usize, timeout: Duration) -> Vec<Received> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::with_capacity(count);
        let deadline = Instant::now() + timeout;
        while out.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(Ok(delivery))) = tokio::time::timeout(left, consumer.next()).await else {
                break;
            };
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            out.push(Received::from(&delivery));
        }
        let _ = channel.close(200, "done".into()).await;
        out
    }

    /// Drains whatever is in `queue` now, without waiting for more.
    pub async fn drain(&self, queue: &str) -> Vec<Received> {
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(Received::from(&message.delivery));
        }
        out
    }

    /// Ready messages in `queue` (passive declare on a throwaway channel).
    pub async fn depth(&self, queue: &str) -> Option<u32> {
        let channel = self.connection.create_channel().await.ok()?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = channel.close(200, "done".into()).await;
        Some(declared.message_count())
    }

    /// Deletes every tracked queue and exchange.
    pub async fn cleanup(self) {
        let channel = self.connection.create_channel().await.unwrap();
        for queue in &self.created_queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in &self.created_exchanges {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

/// A message read back by a test.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub json: Option<Value>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub headers: BTreeMap<String, String>,
}

impl From<&lapin::message::Delivery> for Received {
    fn from(delivery: &lapin::message::Delivery) -> Self {
        let props = &delivery.properties;
        let headers = props
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| {
                        let text = match v {
                            lapin::types::AMQPValue::LongString(s) => {
                                String::from_utf8_lossy(s.as_bytes()).into_owned()
                            }
                            lapin::types::AMQPValue::ShortString(s) => s.to_string(),
                            lapin::types::AMQPValue::LongLongInt(n) => n.to_string(),
                            other => format!("{other:?}"),
                        };
                        (k.to_string(), text)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            body: delivery.data.clone(),
            json: serde_json::from_slice(&delivery.data).ok(),
            message_id: props.message_id().as_ref().map(ToString::to_string),
            correlation_id: props.correlation_id().as_ref().map(ToString::to_string),
            content_type: props.content_type().as_ref().map(ToString::to_string),
            delivery_mode: *props.delivery_mode(),
            headers,
        }
    }
}

/// A base configuration for tests: the test broker, a unique exchange, fast timeouts.
pub fn test_config(exchange: &str) -> Config {
    let mut config = Config::default();
    config.urls = vec![SecretUrl::new(broker_url())];
    config.exchange = exchange.to_owned();
    config.retry_connect_interval = Duration::from_millis(500);
    config.retry_connect_max = Duration::from_secs(2);
    config.shutdown_timeout = Duration::from_secs(10);
    config.confirm_timeout = Duration::from_secs(10);
    config
}

/// A running engine.
pub struct Running {
    pub stop: CancellationToken,
    pub health: HealthHandle,
    pub task: JoinHandle<Result<(), rmq_consumer::Error>>,
}

impl Running {
    /// Builds and spawns an engine with the given handlers, then waits until each consumes.
    pub async fn start(config: Config, only: &[&str]) -> Self {
        let engine = Engine::builder(config)
            .only(only.iter().copied())
            .build()
            .unwrap();
        let stop = engine.shutdown_token();
        let health = engine.health();
        let task = tokio::spawn(engine.run());
        let running = Self { stop, health, task };
        running.wait_consuming(Duration::from_secs(20)).await;
        running
    }

    pub async fn wait_consuming(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let snapshot = self.health.snapshot();
            if snapshot.connected && snapshot.handlers.iter().all(|h| h.consuming) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "engine not consuming after {timeout:?}: {snapshot:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Shuts down gracefully and returns the engine's result.
    pub async fn stop(self) -> Result<(), rmq_consumer::Error> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("engine did not stop within 30 s")
            .expect("engine task panicked")
    }
}

/// Waits until `check` holds, polling; panics with `what` at the timeout.
pub async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

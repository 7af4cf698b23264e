//! The test's own connection to the broker, for publishing with confirms and reading back
//! what the engine wrote; it tracks the queues and exchanges a test makes and deletes them.
//! The engine under test has connections of its own.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
        ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use rmq_consumer::config::SecretUrl;
use serde_json::Value;

use crate::env::{broker_name, broker_url, test_broker};

/// A connection for the test's own publishing and inspection. Fails loudly without a broker.
#[derive(Debug)]
pub struct Broker {
    /// The connection, for channels of the test's own (consumers, declarations that may fail).
    pub connection: Connection,
    /// A channel in confirm mode, used by the publishing helpers.
    pub channel: Channel,
    created_queues: Vec<String>,
    created_exchanges: Vec<String>,
}

impl Broker {
    /// Connects to the test broker ([`broker_url`]); panics with how to start it when it is
    /// not running.
    pub async fn connect() -> Self {
        let url = broker_url();
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "these tests need a running RabbitMQ ({}: {}) at {} (or set RMQ_TEST_URL): {e}",
                    broker_name(),
                    test_broker().start_hint(),
                    SecretUrl::new(url.clone())
                )
            });
        Self::on(connection).await
    }

    /// Like [`Broker::connect`], to the broker at `url` instead of the test broker (e.g. one
    /// node of the local cluster of `tests/scripts/cluster.sh`). Fails loudly.
    pub async fn connect_to(url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("no RabbitMQ at {}: {e}", SecretUrl::new(url)));
        Self::on(connection).await
    }

    /// The test's confirming channel on `connection`, nothing tracked yet.
    async fn on(connection: Connection) -> Self {
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

    /// Remembers an exchange to delete in [`Broker::cleanup`].
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
            .send(exchange, routing_key, body, properties)
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "publish to {exchange}/{routing_key} not confirmed: {confirm:?}"
        );
    }

    /// Starts a mandatory, persistent publish on the confirming channel; the caller awaits
    /// the confirm (several can be in flight).
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<PublisherConfirm> {
        self.channel
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
    }

    /// Publishes `value` as a persistent `application/json` message, with confirms.
    pub async fn publish_json(&self, exchange: &str, routing_key: &str, value: &Value) {
        let body = serde_json::to_vec(value).unwrap();
        self.publish_raw(exchange, routing_key, &body, json_properties())
            .await;
    }

    /// Publishes many JSON messages with pipelined confirms.
    pub async fn publish_many(&self, exchange: &str, routing_key: &str, values: &[Value]) {
        let mut pending = Vec::with_capacity(values.len());
        for value in values {
            let body = serde_json::to_vec(value).unwrap();
            let confirm = self
                .send(exchange, routing_key, &body, json_properties())
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

    /// Ready messages in `queue`, `None` when the queue does not exist.
    pub async fn depth(&self, queue: &str) -> Option<u32> {
        Some(self.declare_passive(queue).await?.message_count())
    }

    /// Waits (up to 5 s) until `answered` results plus the messages waiting in `queue` make
    /// `tasks`: after a worker stopped, every task is either answered exactly once or still
    /// queued (its unacked deliveries returned). Returns the messages waiting; panics with
    /// `log` (the worker's output) when the count does not add up in time.
    pub async fn assert_answered_or_waiting(
        &self,
        queue: &str,
        answered: usize,
        tasks: usize,
        log: &str,
    ) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let waiting = self.depth(queue).await.unwrap_or(0);
            if answered + waiting as usize == tasks {
                return waiting;
            }
            assert!(
                Instant::now() < deadline,
                "{answered} results + {waiting} waiting != {tasks} tasks; worker log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Consumers on `queue`, `None` when the queue does not exist.
    pub async fn consumers(&self, queue: &str) -> Option<u32> {
        Some(self.declare_passive(queue).await?.consumer_count())
    }

    /// A passive declare of `queue` on a throwaway channel (a refusal closes the channel).
    async fn declare_passive(&self, queue: &str) -> Option<lapin::Queue> {
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
        Some(declared)
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

    /// Like [`Broker::connect`], retrying for up to `timeout` (the broker may be restarting
    /// because a fault test stopped it).
    pub async fn connect_patiently(timeout: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = Connection::connect(&broker_url(), ConnectionProperties::default()).await;
            match attempt {
                Ok(connection) => return Self::on(connection).await,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no RabbitMQ ({}) at {} after {timeout:?} (set RMQ_TEST_URL): {e}",
                        broker_name(),
                        SecretUrl::new(broker_url())
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Takes over the names `other` tracks, so one cleanup deletes them all.
    pub fn adopt(&mut self, other: Broker) {
        self.created_queues
            .extend(other.created_queues.iter().cloned());
        self.created_exchanges
            .extend(other.created_exchanges.iter().cloned());
    }

    /// A [`CleanupOnPanic`] for the names tracked so far.
    pub fn cleanup_on_panic(&self) -> CleanupOnPanic {
        CleanupOnPanic {
            queues: self.created_queues.clone(),
            exchanges: self.created_exchanges.clone(),
        }
    }
}

/// The properties of a JSON task: `content_type` `application/json`.
pub(crate) fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

/// A message read back by a test.
#[derive(Debug, Clone)]
pub struct Received {
    /// The body as read.
    pub body: Vec<u8>,
    /// The body parsed as JSON, `None` when it is not JSON.
    pub json: Option<Value>,
    /// The `message_id` property.
    pub message_id: Option<String>,
    /// The `correlation_id` property.
    pub correlation_id: Option<String>,
    /// The `content_type` property.
    pub content_type: Option<String>,
    /// The `delivery_mode` property (2: persistent).
    pub delivery_mode: Option<u8>,
    /// The headers as text: strings as they are, integers in decimal, anything else as its
    /// `Debug`.
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

/// Deletes the queues and exchanges a test made when the test panics before its
/// [`Broker::cleanup`], so a failing fault test does not leave its topology on a shared broker.
/// Declare it after the broker-restoring guards ([`StoppedApp`](crate::StoppedApp),
/// [`PolicyGuard`](crate::PolicyGuard)) are possible, i.e. early: locals drop in reverse
/// order, so those restore the broker first.
#[derive(Debug)]
pub struct CleanupOnPanic {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Drop for CleanupOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // A thread of its own: the test's runtime is unwinding around us.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let url = broker_url();
                let connect = Connection::connect(&url, ConnectionProperties::default());
                let Ok(Ok(connection)) =
                    tokio::time::timeout(Duration::from_secs(5), connect).await
                else {
                    return;
                };
                let Ok(channel) = connection.create_channel().await else {
                    return;
                };
                for queue in &queues {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in &exchanges {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = connection
                    .close(200, "cleanup after a failed test".into())
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

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

/// The broker the tests run against, chosen by `$RMQ_TEST_BROKER` (`tests/run.sh` runs the
/// suite once per broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBroker {
    /// `rabbit3` (the default): the machine's RabbitMQ 3.10, node `rabbit@localhost`, AMQP on
    /// 5672, management on 15672, the host's `rabbitmqctl` (`tests/scripts/rabbit3.sh`).
    Rabbit3,
    /// `rabbit4`: RabbitMQ 4.0 in the chroot of `tests/scripts/rabbit4.sh`, node
    /// `rabbit4@localhost`, AMQP on 5673, management on 15673, its `rabbitmqctl` through
    /// `rabbit4.sh ctl`.
    Rabbit4,
}

/// `tests/scripts/rabbit4.sh`, which runs `rabbitmqctl` inside the 4.0 node's root.
const RABBIT4_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbit4.sh");

impl TestBroker {
    /// `$RMQ_TEST_BROKER`; panics on a value that names no broker.
    pub fn selected() -> Self {
        match std::env::var("RMQ_TEST_BROKER").as_deref() {
            Err(_) | Ok("" | "rabbit3") => Self::Rabbit3,
            Ok("rabbit4") => Self::Rabbit4,
            Ok(other) => panic!("RMQ_TEST_BROKER={other:?}: expected `rabbit3` or `rabbit4`"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Rabbit3 => "rabbit3",
            Self::Rabbit4 => "rabbit4",
        }
    }

    pub fn amqp_port(self) -> u16 {
        match self {
            Self::Rabbit3 => 5672,
            Self::Rabbit4 => 5673,
        }
    }

    pub fn management_port(self) -> u16 {
        match self {
            Self::Rabbit3 => 15672,
            Self::Rabbit4 => 15673,
        }
    }

    /// The command that starts it (for the messages of a test that cannot reach it).
    pub fn start_hint(self) -> &'static str {
        match self {
            Self::Rabbit3 => "tests/scripts/rabbit3.sh start",
            Self::Rabbit4 => "tests/scripts/rabbit4.sh start",
        }
    }

    /// A `rabbitmqctl` command for this broker's node, without arguments yet.
    fn rabbitmqctl(self) -> std::process::Command {
        match self {
            Self::Rabbit3 => std::process::Command::new("rabbitmqctl"),
            Self::Rabbit4 => {
                let mut command = std::process::Command::new("bash");
                command.args([RABBIT4_SCRIPT, "ctl"]);
                command
            }
        }
    }

    /// What a failing [`TestBroker::rabbitmqctl`] needs, for its panic message.
    fn rabbitmqctl_hint(self) -> &'static str {
        match self {
            Self::Rabbit3 => "these tests need `rabbitmqctl` on PATH",
            Self::Rabbit4 => "these tests need `tests/scripts/rabbit4.sh ctl` (run as root)",
        }
    }
}

/// The broker of `$RMQ_TEST_BROKER`.
pub fn test_broker() -> TestBroker {
    TestBroker::selected()
}

/// `rabbit3` or `rabbit4`, for test messages.
pub fn broker_name() -> &'static str {
    test_broker().name()
}

/// The broker the tests use: `$RMQ_TEST_URL`, else the AMQP URL of [`test_broker`].
pub fn broker_url() -> String {
    std::env::var("RMQ_TEST_URL").unwrap_or_else(|_| {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            test_broker().amqp_port()
        )
    })
}

/// Host and port of [`broker_url`].
pub fn broker_addr() -> (String, u16) {
    use std::str::FromStr;
    let url = broker_url();
    let uri = lapin::uri::AMQPUri::from_str(&url)
        .unwrap_or_else(|e| panic!("bad test broker URL {}: {e}", SecretUrl::new(url.clone())));
    (uri.authority.host, uri.authority.port)
}

/// The management API of the test broker: [`broker_url`]'s host, [`test_broker`]'s
/// management port.
pub fn management_url() -> String {
    format!(
        "http://{}:{}",
        broker_addr().0,
        test_broker().management_port()
    )
}

/// The `--management-url` the `rmq-consumer` CLI needs to find the test broker's management
/// API: `None` where its default (`http://<broker host>:15672`) does.
pub fn cli_management_url() -> Option<String> {
    (test_broker().management_port() != 15672).then(management_url)
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
    Config {
        urls: vec![SecretUrl::new(broker_url())],
        exchange: exchange.to_owned(),
        retry_connect_interval: Duration::from_millis(500),
        retry_connect_max: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(10),
        confirm_timeout: Duration::from_secs(10),
        ..Config::default()
    }
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

    /// Whether the engine has reconnected more than `before` times (a count read from an
    /// earlier snapshot) and is connected with its first handler consuming again.
    pub fn reconnected_since(&self, before: u64) -> bool {
        let s = self.health.snapshot();
        s.reconnects > before && s.connected && s.handlers[0].consuming
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

// ---------------------------------------------------------------------------------------------
// Fault injection (tests/tests/fault_*.rs): the ledger checker of ../shared/RELIABILITY.md,
// `rabbitmqctl` with guards that always restore what they changed, and small broker probes.

/// A task body carrying a unique id: `{"id": id}` plus the fields of `extra` (an object).
pub fn task(id: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({ "id": id });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

/// The `id` field of a message body (a task, a result echoing it, or a dead-lettered task).
pub fn id_of(message: &Received) -> Option<String> {
    message
        .json
        .as_ref()?
        .get("id")?
        .as_str()
        .map(str::to_owned)
}

/// `<queue>.retry.<N>s` for whole seconds, `<queue>.retry.<N>ms` otherwise (as the engine names
/// its TTL delay queues).
pub fn delay_queue(queue: &str, delay: Duration) -> String {
    if delay.subsec_millis() == 0 {
        format!("{queue}.retry.{}s", delay.as_secs())
    } else {
        format!("{queue}.retry.{}ms", delay.as_millis())
    }
}

/// One handler's queues for one test: the work queue, the reply key and the queue bound to
/// it, the DLQ, and the delay queues of `retry_delays`.
#[derive(Debug, Clone)]
pub struct Route {
    pub queue: String,
    pub reply_key: String,
    pub reply_queue: String,
    pub dlq: String,
    /// `<queue>.suspect`, which the engine declares for every handler.
    pub suspect: String,
    pub delay_queues: Vec<String>,
}

impl Route {
    /// Gives `handler` unique names in `config` (its `[consumers.<handler>]` section, keeping
    /// whatever else the section sets) and tracks every queue for cleanup on `broker`.
    pub fn new(config: &mut Config, handler: &str, broker: &mut Broker) -> Self {
        let queue = unique(handler);
        let section = config.consumers.entry(handler.to_owned()).or_default();
        let delays = section
            .retry_delays
            .clone()
            .unwrap_or_else(|| config.retry_delays.clone());
        let route = Self {
            reply_key: format!("{queue}.result"),
            reply_queue: format!("{queue}.results"),
            dlq: format!("{queue}.dlq"),
            suspect: format!("{queue}.suspect"),
            delay_queues: delays.iter().map(|d| delay_queue(&queue, *d)).collect(),
            queue,
        };
        let section = config.consumers.entry(handler.to_owned()).or_default();
        section.queue = Some(route.queue.clone());
        section.reply_key = Some(route.reply_key.clone());
        section.reply_queue = Some(route.reply_queue.clone());
        for name in route.all_queues() {
            broker.track_queue(&name);
        }
        route
    }

    /// The work queue and its delay queues: where a task can still wait.
    pub fn input_queues(&self) -> Vec<String> {
        let mut queues = vec![self.queue.clone()];
        queues.extend(self.delay_queues.iter().cloned());
        queues
    }

    /// Every queue of the route.
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues = self.input_queues();
        queues.push(self.reply_queue.clone());
        queues.push(self.dlq.clone());
        queues.push(self.suspect.clone());
        queues
    }
}

/// The numbers of a [`Ledger`] after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerReport {
    /// Tasks the test tried to publish.
    pub published: usize,
    /// Tasks whose publish the broker confirmed.
    pub confirmed: usize,
    /// Distinct task ids with at least one result.
    pub results_unique: usize,
    /// Results read, duplicates included.
    pub results_total: usize,
    /// `results_total - results_unique`.
    pub duplicates: usize,
    /// Distinct task ids found in the dead-letter queue.
    pub dead_lettered: usize,
    /// Dead-lettered messages read, duplicates included.
    pub dead_total: usize,
    /// Messages still waiting in the input queues after the final drain.
    pub remaining: usize,
    /// Confirmed ids with neither a result nor a dead-lettered copy.
    pub lost: usize,
}

/// The checker of RELIABILITY.md: every task carries a unique id; the ledger keeps the ids
/// whose publish was confirmed and every result and dead-lettered copy read back, then
/// `lost = confirmed - (results ∪ dead-lettered)` must be empty. Duplicates are counted, not
/// hidden.
#[derive(Debug, Default)]
pub struct Ledger {
    pub name: String,
    pub published: std::collections::BTreeSet<String>,
    pub confirmed: std::collections::BTreeSet<String>,
    /// Results per task id.
    pub results: BTreeMap<String, usize>,
    /// Dead-lettered copies per task id.
    pub dead: BTreeMap<String, usize>,
    /// Every dead-lettered message read, for header checks.
    pub dead_messages: Vec<Received>,
    /// Results and dead-lettered messages without an `id`.
    pub strays: usize,
    pub remaining: usize,
}

impl Ledger {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// `count` fresh task ids, unique across runs.
    pub fn ids(&self, count: usize) -> Vec<String> {
        let prefix = unique(&self.name);
        (0..count).map(|i| format!("{prefix}#{i}")).collect()
    }

    /// Publishes tasks (each with an `id`) with pipelined confirms and records which were
    /// confirmed; returns how many were. A failed publish is recorded, not fatal: a fault
    /// test may publish while the broker misbehaves.
    pub async fn publish(
        &mut self,
        broker: &Broker,
        exchange: &str,
        routing_key: &str,
        tasks: &[Value],
    ) -> usize {
        let mut confirmed = 0;
        for chunk in tasks.chunks(500) {
            let mut pending = Vec::with_capacity(chunk.len());
            for task in chunk {
                let id = task["id"]
                    .as_str()
                    .expect("a task has a string id")
                    .to_owned();
                self.published.insert(id.clone());
                let body = serde_json::to_vec(task).unwrap();
                let sent = broker
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
                    .await;
                pending.push((id, sent));
            }
            for (id, sent) in pending {
                let Ok(confirm) = sent else { continue };
                if let Ok(lapin::Confirmation::Ack(None)) = confirm.await {
                    self.confirmed.insert(id);
                    confirmed += 1;
                }
            }
        }
        confirmed
    }

    /// Publishes `count` fresh tasks (`task(id, extra)` for each of [`Ledger::ids`]) with
    /// [`Ledger::publish`] and asserts that the broker confirmed every one.
    pub async fn preload(
        &mut self,
        broker: &Broker,
        exchange: &str,
        routing_key: &str,
        count: usize,
        extra: &Value,
    ) {
        let tasks: Vec<Value> = self
            .ids(count)
            .iter()
            .map(|id| task(id, extra.clone()))
            .collect();
        let confirmed = self.publish(broker, exchange, routing_key, &tasks).await;
        assert_eq!(confirmed, count, "preload not confirmed");
    }

    /// Publishes one task with the given properties (headers, ...); `true` when confirmed.
    pub async fn publish_with(
        &mut self,
        broker: &Broker,
        exchange: &str,
        routing_key: &str,
        task: &Value,
        properties: BasicProperties,
    ) -> bool {
        let id = task["id"]
            .as_str()
            .expect("a task has a string id")
            .to_owned();
        self.published.insert(id.clone());
        let body = serde_json::to_vec(task).unwrap();
        let confirm = broker
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let ok = matches!(confirm, lapin::Confirmation::Ack(None));
        if ok {
            self.confirmed.insert(id);
        }
        ok
    }

    pub fn record_results(&mut self, messages: &[Received]) {
        for message in messages {
            match id_of(message) {
                Some(id) => *self.results.entry(id).or_default() += 1,
                None => self.strays += 1,
            }
        }
    }

    pub fn record_dead(&mut self, messages: &[Received]) {
        for message in messages {
            match id_of(message) {
                Some(id) => *self.dead.entry(id).or_default() += 1,
                None => self.strays += 1,
            }
        }
        self.dead_messages.extend(messages.iter().cloned());
    }

    /// Confirmed ids with neither a result nor a dead-lettered copy.
    pub fn lost(&self) -> Vec<&String> {
        self.confirmed
            .iter()
            .filter(|id| !self.results.contains_key(*id) && !self.dead.contains_key(*id))
            .collect()
    }

    /// Whether every confirmed id is accounted for.
    pub fn complete(&self) -> bool {
        self.lost().is_empty()
    }

    /// The final drain: reads results from `results_queue` and dead-lettered copies from
    /// `dlq` until every confirmed id is accounted for and nothing more arrived for `quiet`
    /// (late duplicates), or until `timeout`; then counts what still waits in `inputs`.
    pub async fn drain(
        &mut self,
        broker: &Broker,
        results_queue: &str,
        dlq: &str,
        inputs: &[String],
        quiet: Duration,
        timeout: Duration,
    ) {
        let channel = broker.connection.create_channel().await.unwrap();
        let mut results = channel
            .basic_consume(
                results_queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut dead = channel
            .basic_consume(
                dlq.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let deadline = Instant::now() + timeout;
        let mut last = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let wait = Duration::from_millis(100).min(deadline - now);
            let next = tokio::time::timeout(wait, async {
                tokio::select! {
                    Some(Ok(d)) = results.next() => Some((true, d)),
                    Some(Ok(d)) = dead.next() => Some((false, d)),
                    else => None,
                }
            })
            .await;
            let (is_result, delivery) = match next {
                Ok(Some(next)) => next,
                Ok(None) => panic!("[ledger {}] the drain consumers were cancelled", self.name),
                // Idle: done once every id is accounted for and nothing came for `quiet`.
                Err(_) if last.elapsed() >= quiet && self.complete() => break,
                Err(_) => continue,
            };
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            let received = Received::from(&delivery);
            if is_result {
                self.record_results(std::slice::from_ref(&received));
            } else {
                self.record_dead(std::slice::from_ref(&received));
            }
            last = Instant::now();
        }
        let _ = channel.close(200, "drained".into()).await;
        self.remaining = 0;
        for queue in inputs {
            self.remaining += broker.depth(queue).await.unwrap_or(0) as usize;
        }
    }

    /// [`Ledger::drain`] of `route`: its results queue, its DLQ and its input queues.
    pub async fn drain_route(
        &mut self,
        broker: &Broker,
        route: &Route,
        quiet: Duration,
        timeout: Duration,
    ) {
        self.drain(
            broker,
            &route.reply_queue,
            &route.dlq,
            &route.input_queues(),
            quiet,
            timeout,
        )
        .await;
    }

    /// The ledger's numbers.
    pub fn report(&self) -> LedgerReport {
        let results_total: usize = self.results.values().sum();
        LedgerReport {
            published: self.published.len(),
            confirmed: self.confirmed.len(),
            results_unique: self.results.len(),
            results_total,
            duplicates: results_total - self.results.len(),
            dead_lettered: self.dead.len(),
            dead_total: self.dead.values().sum(),
            remaining: self.remaining,
            lost: self.lost().len(),
        }
    }

    /// Prints the numbers (visible with `--nocapture`) and returns them.
    pub fn print(&self) -> LedgerReport {
        let r = self.report();
        println!(
            "[ledger {}] published={} confirmed={} results_unique={} results_total={} \
             duplicates={} dead_lettered={} (dead_total={}) remaining={} lost={} strays={}",
            self.name,
            r.published,
            r.confirmed,
            r.results_unique,
            r.results_total,
            r.duplicates,
            r.dead_lettered,
            r.dead_total,
            r.remaining,
            r.lost,
            self.strays,
        );
        r
    }

    /// Prints the numbers and asserts that nothing was lost and nothing is left behind.
    pub fn assert_nothing_lost(&self) -> LedgerReport {
        let report = self.print();
        let lost = self.lost();
        assert!(
            lost.is_empty(),
            "[ledger {}] {} confirmed task(s) lost, e.g. {:?}",
            self.name,
            lost.len(),
            lost.iter().take(10).collect::<Vec<_>>()
        );
        assert_eq!(
            report.confirmed, report.published,
            "[ledger {}] every publish should have been confirmed",
            self.name
        );
        assert_eq!(
            report.remaining, 0,
            "[ledger {}] messages left in the input queues",
            self.name
        );
        report
    }
}

/// Runs `rabbitmqctl` against the test broker's node (async: the engine under test keeps
/// running meanwhile); panics with its output when it fails.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let broker = test_broker();
    run_rabbitmqctl(broker.rabbitmqctl(), broker.rabbitmqctl_hint(), args).await
}

/// Runs the host's `rabbitmqctl` (3.10) whatever the test broker, e.g. with `-n <node>` for
/// the nodes of `tests/scripts/cluster.sh`; panics with its output when it fails.
pub async fn host_rabbitmqctl(args: &[&str]) -> String {
    let broker = TestBroker::Rabbit3;
    run_rabbitmqctl(broker.rabbitmqctl(), broker.rabbitmqctl_hint(), args).await
}

async fn run_rabbitmqctl(command: std::process::Command, hint: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::from(command)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{hint}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} ({}) failed: {}\n{stdout}\n{}",
        broker_name(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The same, blocking: for `Drop` guards, which must restore the broker even when a test
/// panics.
pub fn rabbitmqctl_blocking(args: &[&str]) -> Result<String, String> {
    let output = test_broker()
        .rabbitmqctl()
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A broker user made for one test, deleted when it drops (even on a panic).
pub struct TestUser {
    pub name: String,
}

impl TestUser {
    /// A user with every permission.
    pub async fn create(password: &str) -> Self {
        Self::with_permissions(password, ".*", ".*", ".*").await
    }

    /// A user with these `configure`, `write` and `read` permission patterns.
    pub async fn with_permissions(
        password: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Self {
        let name = unique("user");
        rabbitmqctl(&["add_user", &name, password]).await;
        let user = Self { name };
        let vhost = <lapin::uri::AMQPUri as std::str::FromStr>::from_str(&broker_url())
            .unwrap()
            .vhost;
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost,
            &user.name,
            configure,
            write,
            read,
        ])
        .await;
        user
    }

    /// The test broker's URL with this user's credentials.
    pub fn url(&self, password: &str) -> String {
        let mut uri = <lapin::uri::AMQPUri as std::str::FromStr>::from_str(&broker_url()).unwrap();
        uri.authority.userinfo.username = self.name.clone();
        uri.authority.userinfo.password = password.to_owned();
        let vhost: String = uri
            .vhost
            .bytes()
            .map(|b| match b {
                b'/' => "%2f".to_owned(),
                _ => char::from(b).to_string(),
            })
            .collect();
        format!(
            "amqp://{}:{}@{}:{}/{vhost}",
            uri.authority.userinfo.username,
            uri.authority.userinfo.password,
            uri.authority.host,
            uri.authority.port
        )
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl_blocking(&["delete_user", &self.name]);
    }
}

/// A broker policy that is cleared when the guard is dropped, whatever happens to the test.
#[derive(Debug)]
pub struct PolicyGuard {
    name: String,
    cleared: bool,
}

impl PolicyGuard {
    /// `rabbitmqctl set_policy <name> <pattern> <definition> --apply-to queues`.
    pub async fn set(name: &str, pattern: &str, definition: &str) -> Self {
        let guard = Self {
            name: name.to_owned(),
            cleared: false,
        };
        rabbitmqctl(&[
            "set_policy",
            name,
            pattern,
            definition,
            "--apply-to",
            "queues",
        ])
        .await;
        guard
    }

    pub async fn clear(mut self) {
        rabbitmqctl(&["clear_policy", &self.name]).await;
        self.cleared = true;
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        if !self.cleared
            && let Err(e) = rabbitmqctl_blocking(&["clear_policy", &self.name])
        {
            eprintln!("could not clear policy {}: {e}", self.name);
        }
    }
}

/// A stopped broker application (`rabbitmqctl stop_app`) that is started again when the
/// guard is dropped, whatever happens to the test.
#[derive(Debug)]
pub struct StoppedApp {
    started: bool,
}

impl StoppedApp {
    pub async fn stop() -> Self {
        let guard = Self { started: false };
        rabbitmqctl(&["stop_app"]).await;
        guard
    }

    /// `rabbitmqctl start_app`, then waits until the broker accepts connections.
    pub async fn start(mut self) {
        rabbitmqctl(&["start_app"]).await;
        self.started = true;
        let _ = Broker::connect_patiently(Duration::from_secs(60)).await;
    }
}

impl Drop for StoppedApp {
    fn drop(&mut self) {
        if !self.started {
            eprintln!("restarting the broker application (rabbitmqctl start_app)");
            if let Err(e) = rabbitmqctl_blocking(&["start_app"]) {
                eprintln!("rabbitmqctl start_app FAILED, start the broker by hand: {e}");
            }
        }
    }
}

impl Broker {
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

    /// Consumers on `queue` (passive declare), `None` when the queue does not exist.
    pub async fn consumers(&self, queue: &str) -> Option<u32> {
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
        Some(declared.consumer_count())
    }
}

/// Waits until `check` resolves to `true`, polling an async probe; panics with `what` at the
/// timeout.
pub async fn eventually_async<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deletes the queues and exchanges a test made when the test panics before its
/// [`Broker::cleanup`], so a failing fault test does not leave its topology on a shared broker.
/// Declare it after the broker-restoring guards ([`StoppedApp`], [`PolicyGuard`]) are
/// possible, i.e. early: locals drop in reverse order, so those restore the broker first.
#[derive(Debug)]
pub struct CleanupOnPanic {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Broker {
    /// A [`CleanupOnPanic`] for the names tracked so far.
    pub fn cleanup_on_panic(&self) -> CleanupOnPanic {
        CleanupOnPanic {
            queues: self.created_queues.clone(),
            exchanges: self.created_exchanges.clone(),
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Network faults: a TCP proxy between the engine and the broker (observability.rs, F06;
// fault_network.rs, F07). The test's own connections go to the broker directly.

/// A TCP proxy to the broker that the test can cut and restore, freeze (a silent network
/// loss), or make reset every connection after it has forwarded a few KB.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    tasks: std::sync::Arc<tokio::sync::Mutex<tokio::task::JoinSet<()>>>,
    /// While set, the proxy holds its connections open but forwards nothing (a silent
    /// network loss).
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    state: std::sync::Arc<ProxyState>,
}

/// The proxy's reset mode and counters, shared with its connection tasks.
#[derive(Debug, Default)]
struct ProxyState {
    /// Reset each connection after it forwarded between `reset_min` and `reset_max` bytes
    /// (both directions together); `reset_max == 0`: plain forwarding.
    reset_min: std::sync::atomic::AtomicUsize,
    reset_max: std::sync::atomic::AtomicUsize,
    /// Back to plain forwarding after the next reset.
    reset_once: std::sync::atomic::AtomicBool,
    /// A xorshift state for the per-connection limits.
    seed: std::sync::atomic::AtomicU64,
    /// Connections reset so far.
    resets: std::sync::atomic::AtomicU64,
    /// Connections accepted so far.
    accepted: std::sync::atomic::AtomicU64,
    /// Proxied connections open now.
    open: std::sync::atomic::AtomicUsize,
    /// The local port of every connection the proxy opened to the broker (the broker's
    /// `peer_port` of the proxied connection).
    upstream_ports: std::sync::Mutex<Vec<u16>>,
}

impl ProxyState {
    /// The reset limit of a new connection: uniform in `reset_min..=reset_max`.
    fn pick_limit(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let mut x = self.seed.load(Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Relaxed);
        let (min, max) = (self.reset_min.load(Relaxed), self.reset_max.load(Relaxed));
        let span = max.saturating_sub(min) as u64 + 1;
        min + (x % span) as usize
    }

    fn resetting(&self) -> bool {
        self.reset_max.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

/// One proxied connection: its byte count, its reset limit, and the token that stops both
/// directions at a reset.
struct ProxyLink {
    state: std::sync::Arc<ProxyState>,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    forwarded: std::sync::atomic::AtomicUsize,
    limit: usize,
    reset: CancellationToken,
}

/// Counts the open proxied connections.
struct OpenGuard(std::sync::Arc<ProxyState>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until EOF, pausing (without reading) while frozen. In reset mode,
/// once the connection forwarded its limit, sets `SO_LINGER` 0 on both sockets and stops
/// both directions: the sockets close with an RST each way.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: std::sync::Arc<ProxyLink>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        while link.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            () = link.reset.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
        };
        let Ok(n @ 1..) = read else { return };
        while link.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if link.reset.is_cancelled() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        let forwarded = link.forwarded.fetch_add(n, Ordering::SeqCst) + n;
        if link.state.resetting() && forwarded >= link.limit && !link.reset.is_cancelled() {
            let _ = from.as_ref().set_zero_linger();
            let _ = to.as_ref().set_zero_linger();
            if link.state.reset_once.swap(false, Ordering::SeqCst) {
                link.state.reset_max.store(0, Ordering::SeqCst);
            }
            link.state.resets.fetch_add(1, Ordering::SeqCst);
            link.reset.cancel();
            return;
        }
    }
}

impl Proxy {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        let state = ProxyState::default();
        state.seed.store(seed, Ordering::Relaxed);
        let proxy = Self {
            addr,
            tasks: std::sync::Arc::new(tokio::sync::Mutex::new(tokio::task::JoinSet::new())),
            frozen: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
            state: std::sync::Arc::new(state),
        };
        proxy.serve(listener).await;
        proxy
    }

    async fn serve(&self, listener: tokio::net::TcpListener) {
        use std::sync::Arc;
        let tasks = Arc::clone(&self.tasks);
        let frozen = Arc::clone(&self.frozen);
        let state = Arc::clone(&self.state);
        // The test broker's AMQP address (`RMQ_TEST_BROKER`, `RMQ_TEST_URL`).
        let (host, port) = broker_addr();
        let upstream_addr: Arc<str> = Arc::from(format!("{host}:{port}"));
        self.tasks.lock().await.spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let frozen = Arc::clone(&frozen);
                let state = Arc::clone(&state);
                let upstream_addr = Arc::clone(&upstream_addr);
                let mut tasks = tasks.lock().await;
                // Reap finished connections: the set holds only live ones.
                while tasks.try_join_next().is_some() {}
                tasks.spawn(async move {
                    state.accepted.fetch_add(1, Ordering::SeqCst);
                    state.open.fetch_add(1, Ordering::SeqCst);
                    let _open = OpenGuard(Arc::clone(&state));
                    let Ok(upstream) = tokio::net::TcpStream::connect(&*upstream_addr).await else {
                        return;
                    };
                    // Forward small frames at once, as a direct connection does (Nagle plus
                    // delayed ACKs would add ~40 ms to every round trip).
                    let _ = inbound.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    if let Ok(local) = upstream.local_addr() {
                        state
                            .upstream_ports
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(local.port());
                    }
                    let link = Arc::new(ProxyLink {
                        limit: state.pick_limit(),
                        state,
                        frozen,
                        forwarded: std::sync::atomic::AtomicUsize::new(0),
                        reset: CancellationToken::new(),
                    });
                    let (in_read, in_write) = inbound.into_split();
                    let (up_read, up_write) = upstream.into_split();
                    tokio::join!(
                        pump(in_read, up_write, Arc::clone(&link)),
                        pump(up_read, in_write, link),
                    );
                });
            }
        });
    }

    /// Drops every proxied connection and stops listening: the broker is unreachable.
    pub async fn cut(&self) {
        self.tasks.lock().await.abort_all();
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    pub async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener).await;
    }

    /// Resets (RST both ways) every connection, the open ones included, once it has forwarded
    /// between `min` and `max` bytes (both directions together; a fresh limit per connection).
    pub fn reset_every(&self, min: usize, max: usize) {
        assert!(0 < min && min <= max, "a byte range, not {min}..={max}");
        self.state.reset_min.store(min, Ordering::SeqCst);
        self.state.reset_max.store(max, Ordering::SeqCst);
    }

    /// Resets the next connection that forwards a byte, then forwards plainly again.
    pub fn reset_once(&self) {
        self.state.reset_once.store(true, Ordering::SeqCst);
        self.reset_every(1, 1);
    }

    /// Back to plain forwarding.
    pub fn stop_resetting(&self) {
        self.state.reset_max.store(0, Ordering::SeqCst);
    }

    /// Connections reset so far.
    pub fn resets(&self) -> u64 {
        self.state.resets.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Proxied connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// The local ports of every connection the proxy opened to the broker.
    pub fn upstream_ports(&self) -> Vec<u16> {
        self.state
            .upstream_ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

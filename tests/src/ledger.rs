//! The checker of `tests/RELIABILITY.md`: every task carries a unique id; the ledger keeps
//! the ids whose publish the broker confirmed and every result and dead-lettered copy read
//! back, then `lost = confirmed - (results ∪ dead-lettered)` must be empty. Duplicates are
//! counted, not hidden.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};
use serde_json::Value;

use crate::{
    broker::{Broker, Received, json_properties},
    env::unique,
    route::Route,
};

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

/// The checker of `tests/RELIABILITY.md` for one run (see the module docs). Tests that publish
/// with a client of their own record into [`Ledger::published`] and [`Ledger::confirmed`]
/// directly.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The run's name, for unique ids and for the printed report.
    name: String,
    /// Ids the test tried to publish.
    pub published: BTreeSet<String>,
    /// Ids whose publish the broker confirmed.
    pub confirmed: BTreeSet<String>,
    /// Results per task id.
    pub results: BTreeMap<String, usize>,
    /// Dead-lettered copies per task id.
    pub dead: BTreeMap<String, usize>,
    /// Every dead-lettered message read, for header checks.
    pub dead_messages: Vec<Received>,
    /// Results and dead-lettered messages without an `id`.
    strays: usize,
    /// Messages left in the input queues after the last [`Ledger::drain`].
    remaining: usize,
}

impl Ledger {
    /// An empty ledger for the run `name`.
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
                    .send(exchange, routing_key, &body, json_properties())
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
        let properties = properties.with_content_type("application/json".into());
        let confirm = broker
            .send(exchange, routing_key, &body, properties)
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

    /// Records results read by the test (by their `id`).
    pub fn record_results(&mut self, messages: &[Received]) {
        for message in messages {
            match id_of(message) {
                Some(id) => *self.results.entry(id).or_default() += 1,
                None => self.strays += 1,
            }
        }
    }

    /// Records dead-lettered copies read by the test (by their `id`), keeping the messages.
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
    fn lost(&self) -> Vec<&String> {
        self.confirmed
            .iter()
            .filter(|id| !self.results.contains_key(*id) && !self.dead.contains_key(*id))
            .collect()
    }

    /// Whether every confirmed id is accounted for.
    fn complete(&self) -> bool {
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
    fn print(&self) -> LedgerReport {
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

//! The parent's side of a measurement: its broker connection and names, the prefill, a child
//! ([`crate::process`]) draining a fresh queue, hostile bodies, and request → result latency;
//! with a [`Variant`], a measurement's shared-result-store keys, deleted afterwards.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use rmq_consumer::config::SecretUrl;

use crate::{
    bodies::{bomb_body, confirmed, publish_task},
    error::Res,
    numbers::{percentile, thousands},
    process::Child,
    procfs::{broker_pid, cpu_seconds_of},
    protocol::{Imp, Reply, Report, Spec, StoreSpec, Work},
};

/// Publishes in flight while prefilling.
const PREFILL_WINDOW: usize = 2_000;

/// The broker counts as idle when it used at most this share of one core over a window.
const SETTLE_IDLE_SHARE: f64 = 0.05;
const SETTLE_WINDOW: Duration = Duration::from_millis(250);
const SETTLE_MAX: Duration = Duration::from_secs(10);
/// Keys deleted per `DEL`.
const DELETE_BATCH: usize = 1_000;

/// How a measurement differs from a plain drain.
#[derive(Debug, Clone, Default)]
pub(crate) struct Variant {
    /// Copies of each task in the queue (0 and 1: one).
    pub(crate) copies: u64,
    /// The shared result store, for the framework.
    pub(crate) store: Option<StoreSpec>,
}

/// The parent's broker connection, and every name it created (deleted at the end).
pub(crate) struct Bench {
    pub(crate) url: String,
    pub(crate) connection: Connection,
    pub(crate) channel: Channel,
    pub(crate) exchange: String,
    pub(crate) run_id: String,
    pub(crate) seq: u32,
    pub(crate) queues: Vec<String>,
    pub(crate) started: Instant,
    /// The broker's process, to measure its CPU time per measurement.
    pub(crate) broker: Option<String>,
}

impl Bench {
    pub(crate) async fn connect(url: String) -> Res<Self> {
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .map_err(|e| {
                format!(
                    "the bench needs a running RabbitMQ at {} (set RMQ_CONSUMER_URL): {e}",
                    SecretUrl::new(url.clone())
                )
            })?;
        let channel = connection.create_channel().await?;
        let run_id = format!(
            "{}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        );
        let exchange = format!("rmq-consumer.bench.{run_id}");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let broker = broker_pid(&url);
        Ok(Self {
            url,
            connection,
            channel,
            exchange,
            run_id,
            seq: 0,
            queues: Vec::new(),
            started: Instant::now(),
            broker,
        })
    }

    /// A fresh durable queue, plus its bound result queue for the request-result work.
    pub(crate) async fn fresh_queues(
        &mut self,
        tag: &str,
        work: Work,
    ) -> Res<(String, String, String)> {
        self.seq += 1;
        let queue = format!("bench.{tag}.{}.{}", self.run_id, self.seq);
        let results = format!("{queue}.results");
        let reply_key = format!("{queue}.done");
        // The engine declares `<queue>.dlq`; it is deleted with the rest.
        self.queues.extend([
            queue.clone(),
            results.clone(),
            format!("{queue}.dlq"),
            format!("{queue}.suspect"),
        ]);
        self.declare(&queue).await?;
        if work.publishes() {
            self.declare(&results).await?;
            self.channel
                .queue_bind(
                    results.as_str().into(),
                    self.exchange.as_str().into(),
                    reply_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok((queue, results, reply_key))
    }

    pub(crate) async fn declare(&self, queue: &str) -> Res<()> {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Deletes the queues created so far.
    pub(crate) async fn delete_queues(&mut self) -> Res<()> {
        for queue in std::mem::take(&mut self.queues) {
            self.channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    pub(crate) async fn cleanup(mut self) -> Res<()> {
        // A measurement can fail because the broker closed the connection (e.g. another
        // process ran `rabbitmqctl close_all_connections`): clean up on a fresh one.
        if !self.connection.status().connected() {
            self.connection =
                Connection::connect(&self.url, ConnectionProperties::default()).await?;
        }
        if !self.channel.status().connected() {
            self.channel = self.connection.create_channel().await?;
        }
        self.delete_queues().await?;
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await?;
        self.connection.close(200, "bench done".into()).await?;
        Ok(())
    }

    pub(crate) fn broker_cpu(&self) -> Option<f64> {
        self.broker
            .as_deref()
            .and_then(|pid| cpu_seconds_of(pid).ok())
    }

    /// Waits until the broker is idle: deleting a queue of persistent messages, or taking a
    /// prefill, leaves it writing and compacting for a while, and that work would otherwise land
    /// in the next measurement (either implementation's, at random). At most [`SETTLE_MAX`].
    pub(crate) async fn settle(&self) -> Duration {
        let started = Instant::now();
        let Some(mut before) = self.broker_cpu() else {
            return Duration::ZERO;
        };
        while started.elapsed() < SETTLE_MAX {
            tokio::time::sleep(SETTLE_WINDOW).await;
            let Some(now) = self.broker_cpu() else {
                break;
            };
            if now - before <= SETTLE_WINDOW.as_secs_f64() * SETTLE_IDLE_SHARE {
                break;
            }
            before = now;
        }
        started.elapsed()
    }

    pub(crate) fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Publishes `count` persistent tasks to `queue` with pipelined confirms.
    pub(crate) async fn prefill(&self, queue: &str, count: u64) -> Res<()> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut pending = VecDeque::with_capacity(PREFILL_WINDOW);
        for id in 0..count {
            let confirm = publish_task(&channel, queue, id, 0).await?;
            pending.push_back(confirm);
            if pending.len() >= PREFILL_WINDOW
                && let Some(oldest) = pending.pop_front()
            {
                confirmed(oldest.await?)?;
            }
        }
        for confirm in pending {
            confirmed(confirm.await?)?;
        }
        channel.close(200, "prefilled".into()).await?;
        Ok(())
    }

    pub(crate) fn spec(
        &self,
        imp: Imp,
        work: Work,
        names: &(String, String, String),
        prefetch: u16,
        count: u64,
    ) -> Spec {
        Spec {
            imp,
            work,
            queue: names.0.clone(),
            exchange: self.exchange.clone(),
            reply_key: names.2.clone(),
            results: names.1.clone(),
            prefetch,
            count,
            timeout_s: 120 + count / 200,
            budget: None,
            store: None,
        }
    }

    /// Prefills a fresh queue with `count` tasks and drains it with one child.
    pub(crate) async fn measure(
        &mut self,
        tag: &str,
        imp: Imp,
        work: Work,
        prefetch: u16,
        count: u64,
    ) -> Res<Report> {
        self.measure_with(tag, imp, work, prefetch, count, Variant::default())
            .await
    }

    /// [`measure`](Self::measure), with `variant`'s copies of each task (published as the
    /// whole set once, then again) and its result store; its keys are deleted afterwards.
    pub(crate) async fn measure_with(
        &mut self,
        tag: &str,
        imp: Imp,
        work: Work,
        prefetch: u16,
        tasks: u64,
        variant: Variant,
    ) -> Res<Report> {
        let names = self.fresh_queues(tag, work).await?;
        let prefill_started = Instant::now();
        for _ in 0..variant.copies.max(1) {
            self.prefill(&names.0, tasks).await?;
        }
        let count = tasks * variant.copies.max(1);
        let prefill = prefill_started.elapsed();
        let mut spec = self.spec(imp, work, &names, prefetch, count);
        spec.store = variant.store;
        let settle = self.settle().await;
        let broker_before = self.broker_cpu();
        let mut child = Child::spawn(&spec, &self.url)?;
        let pid = child.process.id().unwrap_or(0);
        let mut report = child
            .report(Duration::from_secs(spec.timeout_s + 30))
            .await?;
        report.broker_cpu_s = broker_before.zip(self.broker_cpu()).map(|(a, b)| b - a);
        self.delete_queues().await?;
        if let Some(store) = &spec.store {
            delete_keys(store).await?;
        }
        if report.processed < count {
            return Err(format!(
                "{tag} {}: only {} of {count} messages were processed before the timeout",
                imp.label(),
                report.processed
            )
            .into());
        }
        let slots = report.slots.map_or_else(String::new, |slots| {
            format!(
                "; wait {:.2} ms, slots busy {:.1} %, gap {:.3} ms",
                slots.wait_ms,
                slots.busy * 100.0,
                slots.gap_ms
            )
        });
        let who = match &spec.store {
            Some(_) => format!("{} + store", imp.label()),
            None => imp.label().to_owned(),
        };
        let runs = if work.publishes() {
            format!(", handler runs {}", thousands(report.runs as f64))
        } else {
            String::new()
        };
        eprintln!(
            "  {tag:<3} prefetch {prefetch:>3} {who:<9}: {:>7} msg/s, {:.3} CPU s/10k \
             (broker {:.3}), peak RSS {:.1} MiB, max in flight {} (prefill {:.1?}, drain {:.1?}, \
             settle {settle:.1?}, pid {pid}){slots}{runs}",
            thousands(report.rate()),
            report.cpu_per_10k(),
            report.broker_cpu_per_10k(),
            report.rss_mib(),
            report.max_in_flight,
            prefill,
            Duration::from_secs_f64(report.secs),
        );
        Ok(report)
    }

    /// H: `count` copies of a hostile body of about `body_bytes` (`[{"":0},...]`, ~100 times
    /// its size as a `Value`) drained by the framework at prefetch 4 with the handler budget
    /// `budget` (`None`: the default); the consumer's peak RSS is the point.
    pub(crate) async fn measure_bombs(
        &mut self,
        body_bytes: usize,
        budget: Option<u64>,
        count: u64,
    ) -> Res<Report> {
        let names = self.fresh_queues("h", Work::Bomb).await?;
        let body = bomb_body(body_bytes);
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        for _ in 0..count {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    names.0.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            confirmed(confirm.await?)?;
        }
        channel.close(200, "prefilled".into()).await?;
        let mut spec = self.spec(Imp::Framework, Work::Bomb, &names, 4, count);
        spec.budget = budget;
        self.settle().await;
        let mut child = Child::spawn(&spec, &self.url)?;
        let report = child
            .report(Duration::from_secs(spec.timeout_s + 30))
            .await?;
        self.delete_queues().await?;
        if report.processed < count {
            return Err(format!(
                "H: only {} of {count} bodies were settled before the timeout",
                report.processed
            )
            .into());
        }
        eprintln!(
            "  h   {:.1} MiB bodies, budget {}: peak RSS {:.1} MiB",
            body_bytes as f64 / 1_048_576.0,
            budget.map_or("default".to_owned(), |b| format!("{b}")),
            report.rss_mib()
        );
        Ok(report)
    }

    /// Publishes `rate` tasks per second for `secs` seconds to a consumer started on an empty
    /// queue; measures request → result latency at the result queue. Without a consumer
    /// (`imp` is `None`) the tasks go straight to the result queue: the broker's own floor.
    pub(crate) async fn latency(
        &mut self,
        imp: Option<Imp>,
        work: Work,
        prefetch: u16,
        rate: u64,
        secs: u64,
    ) -> Res<Latency> {
        let tag = if work.is_model() { "b" } else { "l" };
        let names = self.fresh_queues(tag, work).await?;
        let total = rate * secs;
        let spec = self.spec(imp.unwrap_or(Imp::Raw), work, &names, prefetch, total);
        let mut child = match imp {
            Some(_) => {
                let mut child = Child::spawn(&spec, &self.url)?;
                child.ready(Duration::from_secs(60)).await?;
                Some(child)
            }
            None => None,
        };
        let target = if imp.is_some() { &names.0 } else { &names.1 };

        let results_channel = self.connection.create_channel().await?;
        let mut results = results_channel
            .basic_consume(
                names.1.as_str().into(),
                "bench-latency".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let started = self.started;
        let want = usize::try_from(total)?;
        let collector = tokio::spawn(async move {
            let mut latencies_us = Vec::with_capacity(want);
            while latencies_us.len() < want {
                let next = tokio::time::timeout(Duration::from_secs(10), results.next()).await;
                let Ok(Some(Ok(delivery))) = next else { break };
                let now = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(reply) = serde_json::from_slice::<Reply>(&delivery.data) {
                    latencies_us.push(now.saturating_sub(reply.sent_us));
                }
            }
            latencies_us
        });

        let publisher = self.connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let interval = Duration::from_secs(1).as_nanos() / u128::from(rate);
        let begin = tokio::time::Instant::now();
        let mut confirms = Vec::with_capacity(want);
        for id in 0..total {
            let offset = Duration::from_nanos(u64::try_from(interval * u128::from(id))?);
            tokio::time::sleep_until(begin + offset).await;
            let confirm = publish_task(&publisher, target, id, self.now_us()).await?;
            let sent = Instant::now();
            // Awaited concurrently, to time the broker's confirms of these persistent tasks.
            confirms.push(tokio::spawn(async move {
                let confirmation = confirm.await;
                (confirmation, sent.elapsed())
            }));
        }
        let mut confirm_us = Vec::with_capacity(want);
        for confirm in confirms {
            let (confirmation, took) = confirm.await?;
            confirmed(confirmation?)?;
            confirm_us.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        }
        confirm_us.sort_unstable();
        let _ = publisher.close(200, "published".into()).await;
        let mut latencies_us = collector.await?;
        let _ = results_channel.close(200, "collected".into()).await;
        let report = match &mut child {
            Some(child) => Some(child.report(Duration::from_secs(60)).await?),
            None => None,
        };
        self.delete_queues().await?;
        latencies_us.sort_unstable();
        let received = latencies_us.len() as u64;
        let latency = Latency {
            sent: total,
            received,
            p50_ms: percentile(&latencies_us, 0.50),
            p99_ms: percentile(&latencies_us, 0.99),
            max_ms: latencies_us
                .last()
                .map_or(f64::NAN, |&us| us as f64 / 1000.0),
            over_20ms: latencies_us.iter().filter(|&&us| us > 20_000).count(),
            confirm_p99_ms: percentile(&confirm_us, 0.99),
            confirm_max_ms: confirm_us.last().map_or(f64::NAN, |&us| us as f64 / 1000.0),
            report,
        };
        eprintln!(
            "  {tag:<3} prefetch {prefetch:>3} {:<9}: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, \
             {} over 20 ms, {received}/{total} results, max in flight {}, task confirms p99 \
             {:.1} ms max {:.1} ms",
            imp.map_or("no consumer", Imp::label),
            latency.p50_ms,
            latency.p99_ms,
            latency.max_ms,
            latency.over_20ms,
            report.map_or(0, |r| r.max_in_flight),
            latency.confirm_p99_ms,
            latency.confirm_max_ms,
        );
        Ok(latency)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) over_20ms: usize,
    /// Publisher-confirm latency of the tasks (persistent, durable queue): the broker's
    /// persistence, which a result's confirm waits for as well.
    pub(crate) confirm_p99_ms: f64,
    pub(crate) confirm_max_ms: f64,
    /// `None` for the broker-only baseline.
    pub(crate) report: Option<Report>,
}

/// Deletes every key under `store`'s prefix; returns how many there were.
async fn delete_keys(store: &StoreSpec) -> Res<u64> {
    let client = redis::Client::open(store.url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{}*", store.prefix);
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(DELETE_BATCH)
            .query_async(&mut connection)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut deleted = 0;
    for chunk in keys.chunks(DELETE_BATCH) {
        let count: u64 = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut connection)
            .await?;
        deleted += count;
    }
    Ok(deleted)
}

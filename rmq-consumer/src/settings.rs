//! A handler's effective settings: its attribute, overridden by the configuration.

use std::{collections::BTreeMap, time::Duration};

use crate::{
    amqp::MAX_SHORT,
    config::{Config, ConsumerConfig, PublishVia, QueueType, ReplyToPolicy},
    error::SetupError,
    registry::{HandlerSpec, PrepareFn, PrepareItemFn, RunBatchFn},
};

/// How long the first item of a batch waits for more when neither the attribute nor the
/// configuration says (`batch_wait`).
pub(crate) const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(10);

/// A batch handler's batching: how items are gathered and how a call is bound.
#[derive(Debug, Clone)]
pub(crate) struct Batching {
    /// The most items per call.
    pub(crate) size: usize,
    /// How long a batch's first item waits for more.
    pub(crate) wait: Duration,
    pub(crate) prepare: PrepareItemFn,
    pub(crate) run: RunBatchFn,
}

/// Everything the engine needs to run one handler.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) name: String,
    pub(crate) queue: String,
    pub(crate) reply_key: Option<String>,
    pub(crate) reply_queue: Option<String>,
    pub(crate) prefetch: u16,
    /// The channel's `basic.qos`: `prefetch` plus the read-ahead.
    pub(crate) qos: u16,
    pub(crate) concurrency: usize,
    pub(crate) timeout: Duration,
    pub(crate) max_retries: u32,
    /// Deliveries that may end unsettled before the task is dead-lettered (`worker_lost`).
    pub(crate) max_redeliveries: u32,
    /// The `x-delivery-limit` of the quorum work and suspect queues.
    pub(crate) delivery_limit: u32,
    /// Bytes the messages in flight may take: bodies plus their estimated decoded size.
    pub(crate) max_in_flight_bytes: u64,
    pub(crate) retry_delays: Vec<Duration>,
    pub(crate) queue_type: QueueType,
    /// What a request's `reply_to` may do.
    pub(crate) reply_to: ReplyToPolicy,
    pub(crate) bind_reply_queue: bool,
    /// `None` when dead-lettering is off (failed messages are rejected without requeue).
    pub(crate) dead_letter_queue: Option<String>,
    /// Whether the engine declares the handler's topology (`false`: checks it exists).
    pub(crate) declare: bool,
    /// Which exchange retry, delay, dead-letter and suspect copies go through.
    pub(crate) publish_via: PublishVia,
    /// Whether the handler runs on the blocking pool (informational: the generated code
    /// already chose how to run it).
    #[cfg_attr(not(feature = "cli"), expect(dead_code, reason = "read by the CLI"))]
    pub(crate) blocking: bool,
    pub(crate) location: String,
    pub(crate) prepare: PrepareFn,
    /// `Some` for a batch handler: `concurrency` then counts batches in flight.
    pub(crate) batch: Option<Batching>,
}

impl Settings {
    /// The delivery tasks the worker runs side by side on the work queue:
    /// `min(concurrency, basic.qos)`, since more tasks than `basic.qos` would never get a
    /// delivery. The watchdog judges free capacity against this, not `concurrency`.
    ///
    /// A batch handler's deliveries each have a task from arrival to settlement (they wait
    /// for their batch there): `basic.qos` tasks, and `concurrency` batches run at once.
    pub(crate) fn slots(&self) -> usize {
        let qos = usize::from(self.qos).max(1);
        match self.batch {
            Some(_) => qos,
            None => self.concurrency.min(qos),
        }
    }

    /// The longest a delivery of this handler can stay unacked while the worker is healthy
    /// (see [`longest_unacked`]).
    pub(crate) fn longest_unacked(&self, confirm: Duration, republish: Duration) -> Duration {
        match &self.batch {
            None => longest_unacked(self.timeout, self.qos, self.slots(), confirm, republish),
            // A delivery may wait for the batches ahead of it (the `basic.qos` deliveries in
            // batches of `size`, `concurrency` at a time), its batch's wait, then its run.
            Some(batch) => {
                let per_round = batch.size.saturating_mul(self.concurrency).max(1);
                let rounds = usize::from(self.qos).div_ceil(per_round).max(1);
                self.timeout
                    .saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
                    .saturating_add(batch.wait)
                    .saturating_add(confirm)
                    .saturating_add(republish)
            }
        }
    }

    /// The queue where tasks whose delivery ended unsettled wait to run alone:
    /// `<queue>.suspect`.
    pub(crate) fn suspect_queue(&self) -> String {
        format!("{}.suspect", self.queue)
    }

    /// The TTL queue a retry after `delay` waits in.
    pub(crate) fn delay_queue(&self, delay: Duration) -> String {
        delay_queue_name(&self.queue, delay)
    }
}

/// `<queue>.retry.<delay>`: `10s` for whole seconds, `1500ms` otherwise.
pub(crate) fn delay_queue_name(queue: &str, delay: Duration) -> String {
    if delay.subsec_millis() == 0 {
        format!("{queue}.retry.{}s", delay.as_secs())
    } else {
        format!("{queue}.retry.{}ms", delay.as_millis())
    }
}

/// The suffix that makes a work queue's name its dead-letter queue's: `<queue>.dlq`.
pub(crate) const DEAD_LETTER_SUFFIX: &str = ".dlq";

/// The default dead-letter queue of `queue`: `<queue>.dlq`.
pub(crate) fn dead_letter_queue_name(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_SUFFIX}")
}

/// The work queue whose dead letters `dlq` holds by the naming rule (`a.dlq` → `a`), or
/// `None` when the name does not follow it. A dead-letter queue configured with another name
/// is found through the configuration instead (the CLI's `status::dead_letter_source`).
#[cfg_attr(not(feature = "cli"), allow(dead_code, reason = "read by the CLI"))]
pub(crate) fn source_of_dead_letter_queue(dlq: &str) -> Option<&str> {
    dlq.strip_suffix(DEAD_LETTER_SUFFIX)
        .filter(|source| !source.is_empty())
}

/// Resolves every registered handler against the configuration; reports the first problem.
pub(crate) fn resolve(
    config: &Config,
    specs: &[&'static HandlerSpec],
) -> Result<Vec<Settings>, SetupError> {
    let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
    for name in config.consumers.keys() {
        if !known.contains(&name.as_str()) {
            return Err(SetupError::UnknownConsumer {
                name: name.clone(),
                known: known.join(", "),
            });
        }
    }
    let mut by_name: BTreeMap<&str, &HandlerSpec> = BTreeMap::new();
    for spec in specs {
        if let Some(first) = by_name.insert(spec.name, spec) {
            return Err(SetupError::DuplicateName {
                name: spec.name.to_owned(),
                first_location: first.location(),
                second_location: spec.location(),
            });
        }
    }
    let enabled: Vec<&HandlerSpec> = specs
        .iter()
        .copied()
        .filter(|s| config.consumer(s.name).enabled.unwrap_or(true))
        .collect();
    if enabled.is_empty() {
        return Err(SetupError::NoHandlers);
    }
    for (key, set) in [
        ("queue", config.queue.is_some()),
        ("reply_key", config.reply_key.is_some()),
        ("reply_queue", config.reply_queue.is_some()),
    ] {
        if set && enabled.len() > 1 {
            return Err(SetupError::AmbiguousOverride {
                key,
                count: enabled.len(),
            });
        }
    }
    let mut all: Vec<Settings> = Vec::with_capacity(enabled.len());
    for spec in enabled {
        let settings = resolve_one(config, spec)?;
        if let Some(first) = all.iter().find(|s| s.queue == settings.queue) {
            return Err(SetupError::DuplicateQueue {
                queue: settings.queue.clone(),
                first: first.name.clone(),
                first_location: first.location.clone(),
                second: settings.name.clone(),
                second_location: settings.location.clone(),
            });
        }
        all.push(settings);
    }
    Ok(all)
}

/// The queues and routing of one handler: its `[consumers.<name>]` section, then the global
/// keys, then what its `#[consumer]` attribute says (`spec`; the stand-alone CLI has none).
/// The engine ([`resolve`]) and `rmq-consumer status` resolve names through this one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueNames {
    pub(crate) queue: String,
    pub(crate) reply_key: Option<String>,
    pub(crate) reply_queue: Option<String>,
    /// `None` when dead-lettering is off.
    pub(crate) dead_letter_queue: Option<String>,
    pub(crate) retry_delays: Vec<Duration>,
}

impl QueueNames {
    /// `None` when neither the configuration nor `spec` names a queue.
    pub(crate) fn resolve(
        config: &Config,
        section: &ConsumerConfig,
        spec: Option<&HandlerSpec>,
    ) -> Option<Self> {
        let queue = section
            .queue
            .clone()
            .or_else(|| config.queue.clone())
            .or_else(|| spec.map(|s| s.queue.to_owned()))?;
        let reply_key = section
            .reply_key
            .clone()
            .or_else(|| config.reply_key.clone())
            .or_else(|| spec.and_then(|s| s.reply_key).map(str::to_owned));
        let reply_queue = section
            .reply_queue
            .clone()
            .or_else(|| config.reply_queue.clone())
            .or_else(|| spec.and_then(|s| s.reply_queue).map(str::to_owned));
        let dead_letter_queue = section.dead_letter.unwrap_or(config.dead_letter).then(|| {
            section
                .dead_letter_queue
                .clone()
                .unwrap_or_else(|| dead_letter_queue_name(&queue))
        });
        let retry_delays = section
            .retry_delays
            .clone()
            .unwrap_or_else(|| config.retry_delays.clone());
        Some(Self {
            queue,
            reply_key,
            reply_queue,
            dead_letter_queue,
            retry_delays,
        })
    }
}

fn resolve_one(config: &Config, spec: &HandlerSpec) -> Result<Settings, SetupError> {
    let section = config.consumer(spec.name);
    let invalid = |problem: String| SetupError::InvalidSetting {
        handler: spec.name.to_owned(),
        problem,
    };
    let Some(QueueNames {
        queue,
        reply_key,
        reply_queue,
        dead_letter_queue,
        retry_delays,
    }) = QueueNames::resolve(config, &section, Some(spec))
    else {
        return Err(invalid("no queue".to_owned()));
    };
    let batch = batching(&section, spec).map_err(invalid)?;
    let (prefetch, concurrency) = match &batch {
        None => {
            let prefetch = section
                .prefetch
                .or(spec.prefetch)
                .unwrap_or(config.prefetch_count);
            let concurrency = section
                .concurrency
                .or(config.concurrency)
                .unwrap_or(prefetch);
            (prefetch, concurrency)
        }
        Some(batch) => batch_prefetch(config, &section, spec, batch.size).map_err(invalid)?,
    };
    if prefetch == 0 {
        return Err(invalid("prefetch must be at least 1".to_owned()));
    }
    if concurrency == 0 {
        return Err(invalid("concurrency must be at least 1".to_owned()));
    }
    let qos = basic_qos(prefetch, section.read_ahead.or(config.read_ahead));
    let queue_type = match (section.queue_type, spec.queue_type) {
        (Some(t), _) => t,
        (None, Some(text)) => text
            .parse()
            .map_err(|_| invalid(format!("unknown queue_type `{text}`")))?,
        (None, None) => config.queue_type,
    };
    let settings = Settings {
        name: spec.name.to_owned(),
        reply_key,
        reply_queue,
        prefetch,
        qos,
        concurrency: usize::from(concurrency),
        timeout: section
            .timeout
            .or(spec.timeout_secs.map(Duration::from_secs))
            .unwrap_or(config.message_timeout),
        max_retries: section
            .max_retries
            .or(spec.max_retries)
            .unwrap_or(config.max_retry_count),
        max_redeliveries: section.max_redeliveries.unwrap_or(config.max_redeliveries),
        delivery_limit: section.delivery_limit.unwrap_or(config.delivery_limit),
        max_in_flight_bytes: section
            .max_in_flight_bytes
            .unwrap_or(config.max_in_flight_bytes),
        retry_delays,
        queue_type,
        reply_to: section
            .reply_to
            .clone()
            .unwrap_or_else(|| config.reply_to.clone()),
        bind_reply_queue: section.bind_reply_queue.unwrap_or(config.bind_reply_queue),
        dead_letter_queue,
        declare: section.declare.unwrap_or(config.declare),
        publish_via: section.publish_via.unwrap_or(config.publish_via),
        blocking: spec.blocking,
        location: spec.location(),
        prepare: spec.prepare,
        batch,
        queue,
    };
    if settings.timeout.is_zero() {
        return Err(invalid("timeout must be positive".to_owned()));
    }
    if settings.retry_delays.iter().any(Duration::is_zero) {
        return Err(invalid("retry delays must be positive".to_owned()));
    }
    let mut names = vec![
        ("queue", settings.queue.clone()),
        ("suspect queue", settings.suspect_queue()),
    ];
    names.extend(settings.reply_key.clone().map(|n| ("reply_key", n)));
    names.extend(settings.reply_queue.clone().map(|n| ("reply_queue", n)));
    names.extend(
        settings
            .dead_letter_queue
            .clone()
            .map(|n| ("dead_letter_queue", n)),
    );
    names.extend(
        settings
            .retry_delays
            .iter()
            .map(|d| ("retry delay queue", settings.delay_queue(*d))),
    );
    for (what, name) in names {
        if name.is_empty() || name.len() > MAX_SHORT {
            return Err(SetupError::InvalidName { what, name });
        }
    }
    Ok(settings)
}

/// A batch handler's batching from its attribute and its section; `None` for other handlers,
/// which the `batch` keys cannot make batch handlers (their fn takes one message).
fn batching(section: &ConsumerConfig, spec: &HandlerSpec) -> Result<Option<Batching>, String> {
    let Some(declared) = spec.batch else {
        return match (section.batch, section.batch_wait) {
            (None, None) => Ok(None),
            _ => Err(format!(
                "`consumers.{}.batch` and `batch_wait` apply only to batch handlers (declared \
                 with `#[consumer(batch = N)]` on a fn taking a `Vec`); this one takes one \
                 message per call",
                spec.name
            )),
        };
    };
    let size = section.batch.unwrap_or(declared.size);
    if size == 0 {
        return Err("batch must be at least 1".to_owned());
    }
    let wait = section
        .batch_wait
        .or(declared.wait_ms.map(Duration::from_millis))
        .unwrap_or(DEFAULT_BATCH_WAIT);
    Ok(Some(Batching {
        size: usize::from(size),
        wait,
        prepare: declared.prepare,
        run: declared.run,
    }))
}

/// A batch handler's prefetch and concurrency. `concurrency` counts batches in flight (default
/// 1); the prefetch defaults to enough deliveries to fill the next batch while
/// `concurrency` run (`batch × (concurrency + 1)`, or the global `prefetch_count` when that is
/// larger), and a prefetch set for the handler that can never fill one batch is an error.
fn batch_prefetch(
    config: &Config,
    section: &ConsumerConfig,
    spec: &HandlerSpec,
    size: usize,
) -> Result<(u16, u16), String> {
    let concurrency = section.concurrency.or(config.concurrency).unwrap_or(1);
    let fill = size.saturating_mul(usize::from(concurrency).saturating_add(1));
    let fill = u16::try_from(fill).unwrap_or(u16::MAX);
    let prefetch = match section.prefetch.or(spec.prefetch) {
        Some(prefetch) if usize::from(prefetch) < size => {
            return Err(format!(
                "prefetch ({prefetch}) is below batch ({size}): a batch could never fill; \
                 raise `consumers.{name}.prefetch` (at least {size}; {fill} lets the next batch \
                 fill while one runs) or lower `consumers.{name}.batch`",
                name = spec.name
            ));
        }
        Some(prefetch) => prefetch,
        None => fill.max(config.prefetch_count),
    };
    Ok((prefetch, concurrency))
}

/// RabbitMQ's default `consumer_timeout` (30 minutes): a delivery unacked for longer makes the
/// broker close the channel, and every delivery on it is redelivered.
pub(crate) const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The longest a delivery can stay unacked while the worker is healthy: with more deliveries
/// than delivery tasks (`basic.qos` > slots: the read-ahead) a delivery can wait one
/// `message_timeout` for a slot before it runs for up to another; then its result waits up to
/// `confirm` for the confirm and is published again for up to `republish`. It is the bound to
/// hold below the broker's `consumer_timeout` (issue 14, A13).
pub(crate) fn longest_unacked(
    timeout: Duration,
    qos: u16,
    slots: usize,
    confirm: Duration,
    republish: Duration,
) -> Duration {
    let waits = if usize::from(qos) > slots { 2 } else { 1 };
    timeout
        .saturating_mul(waits)
        .saturating_add(confirm)
        .saturating_add(republish)
}

/// The consumer channel's `basic.qos`: `prefetch` plus the read-ahead, by default
/// `prefetch / 2`. A handler slot that frees up then finds its next message already here
/// instead of idling for an ack-to-delivery round trip; at a prefetch of 1 there is none, so
/// a one-task-at-a-time worker keeps strict fair dispatch.
fn basic_qos(prefetch: u16, read_ahead: Option<u16>) -> u16 {
    prefetch.saturating_add(read_ahead.unwrap_or(prefetch / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_qos_adds_the_read_ahead() {
        assert_eq!(basic_qos(1, None), 1);
        assert_eq!(basic_qos(2, None), 3);
        assert_eq!(basic_qos(4, None), 6);
        assert_eq!(basic_qos(64, None), 96);
        assert_eq!(basic_qos(64, Some(0)), 64);
        assert_eq!(basic_qos(2, Some(3)), 5);
        assert_eq!(basic_qos(u16::MAX, None), u16::MAX);
    }

    #[test]
    fn longest_unacked_counts_the_wait_for_a_slot() {
        let s = Duration::from_secs;
        // No read-ahead: a delivery runs as soon as it arrives.
        assert_eq!(longest_unacked(s(300), 4, 4, s(30), s(10)), s(340));
        // Read-ahead: it may wait a whole handler run for a slot first.
        assert_eq!(longest_unacked(s(300), 6, 4, s(30), s(10)), s(640));
        assert_eq!(
            longest_unacked(Duration::MAX, 6, 4, s(30), s(10)),
            Duration::MAX
        );
    }

    #[test]
    fn dead_letter_queue_names_go_both_ways() {
        assert_eq!(dead_letter_queue_name("a"), "a.dlq");
        assert_eq!(source_of_dead_letter_queue("a.dlq"), Some("a"));
        assert_eq!(source_of_dead_letter_queue("a.b.dlq"), Some("a.b"));
        assert_eq!(source_of_dead_letter_queue(".dlq"), None);
        assert_eq!(source_of_dead_letter_queue("a"), None);
        assert_eq!(source_of_dead_letter_queue("a.dlq.x"), None);
    }

    #[test]
    fn delay_queue_names() {
        assert_eq!(
            delay_queue_name("q", Duration::from_secs(10)),
            "q.retry.10s"
        );
        assert_eq!(
            delay_queue_name("q", Duration::from_millis(1500)),
            "q.retry.1500ms"
        );
    }
}

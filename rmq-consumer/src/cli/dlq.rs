//! `rmq-consumer dlq peek|replay|purge`: dead-letter queue tools.
//!
//! - `peek` takes up to N messages with `basic.get` *without* acking them, prints them, then
//!   hands them all back with one `basic.nack(multiple, requeue)`. RabbitMQ puts requeued
//!   messages back in their original position, so the order is kept; they come back marked
//!   *redelivered*, and on a quorum queue each peek counts as a delivery attempt (which matters
//!   if the queue has a `delivery-limit`). While a peek runs, the peeked messages are invisible
//!   to other consumers.
//! - `replay` moves messages back to the queue they failed on (`x-original-queue`, or `--to`),
//!   one at a time: get (no ack), publish a copy through the default exchange with confirms and
//!   `mandatory`, wait for the broker's confirm, and only then ack the dead-lettered original.
//!   A copy that is returned, nacked or not confirmed puts the original back (`nack` with
//!   requeue) and stops the replay with exit code 1, so a message is never lost; at worst (the
//!   ack itself fails after a confirmed copy) it is duplicated. Only the messages present when
//!   the replay starts are replayed, so a message that fails again is not replayed in a loop.
//!   The copy's headers: `x-retry-count` and the failure headers the engine wrote
//!   (`x-death-reason`, `x-error-kind`, `x-last-error`, `x-original-*`, `x-first-failure-at`,
//!   `x-last-failure-at`, `x-handler`) are removed so the message gets a full set of retries;
//!   they are kept, as they were, in the `x-replayed-failure` table (the latest failure's, when
//!   a message is replayed more than once); the broker's own `x-death`
//!   family is dropped; `x-replayed-from` (the DLQ), `x-replayed-at` (RFC 3339) and
//!   `x-replay-count` (1, 2, ...) are added. Other headers and properties are copied unchanged.
//! - `purge` deletes every message of the queue, and only with `--yes`.

use std::{collections::BTreeMap, time::SystemTime};

use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        ConfirmSelectOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde::Serialize;
use serde_json::Value;

use super::{
    CliError, EXIT_FAILURE, EXIT_OK, Global, Io, chain, close, close_channel, connect, load_config,
    probe_queue, thousands,
};
use crate::{
    amqp::{header_str, long, short},
    retry::RETRY_COUNT_HEADER,
};

/// Headers the engine writes when a message fails; shown first by `peek`, moved into
/// `x-replayed-failure` by `replay`.
const FAILURE_HEADERS: &[&str] = &[
    "x-death-reason",
    "x-error-kind",
    "x-last-error",
    RETRY_COUNT_HEADER,
    "x-original-queue",
    "x-original-exchange",
    "x-original-routing-key",
    "x-handler",
    "x-first-failure-at",
    "x-last-failure-at",
];
/// The broker's own dead-lettering headers, dropped on replay.
const BROKER_DEATH_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
];
/// Default number of messages `peek` shows.
const DEFAULT_PEEK_COUNT: u32 = 10;
/// Default body bytes `peek` prints per message.
const DEFAULT_PEEK_BODY_BYTES: usize = 2048;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Show dead-lettered messages and their failure headers without removing them (they are
    /// requeued in order, marked redelivered).
    Peek {
        /// The dead-letter queue.
        queue: String,
        /// How many messages to show.
        #[arg(short = 'n', long, default_value_t = DEFAULT_PEEK_COUNT)]
        count: u32,
        /// Body bytes to print per message.
        #[arg(long, default_value_t = DEFAULT_PEEK_BODY_BYTES)]
        max_body: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move messages back to their original queue with the retry count reset; each is removed
    /// from the DLQ only after its copy is confirmed.
    Replay {
        /// The dead-letter queue.
        queue: String,
        /// Replay at most this many messages (default: all present when the replay starts).
        #[arg(long)]
        limit: Option<u64>,
        /// Replay into this queue instead of each message's `x-original-queue`.
        #[arg(long, value_name = "QUEUE")]
        to: Option<String>,
    },
    /// Delete every message in the queue (needs --yes).
    Purge {
        /// The queue.
        queue: String,
        /// Really delete the messages.
        #[arg(long)]
        yes: bool,
    },
}

pub(crate) async fn run(
    global: &Global,
    command: Command,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let config = load_config(global)?;
    match command {
        Command::Peek {
            queue,
            count,
            max_body,
            json,
        } => {
            let (connection, _) = connect(&config, "dlq peek").await?;
            let result = peek(&connection, &queue, count, max_body, json, io).await;
            close(&connection).await;
            result
        }
        Command::Replay { queue, limit, to } => {
            let (connection, _) = connect(&config, "dlq replay").await?;
            let result = replay(&connection, &queue, limit, to.as_deref(), &config, io).await;
            close(&connection).await;
            result
        }
        Command::Purge { queue, yes } => {
            let (connection, _) = connect(&config, "dlq purge").await?;
            let result = purge(&connection, &queue, yes, io).await;
            close(&connection).await;
            result
        }
    }
}

/// One peeked message, as printed.
#[derive(Debug, Serialize)]
struct Peeked {
    index: u64,
    redelivered: bool,
    exchange: String,
    routing_key: String,
    failure: BTreeMap<String, Value>,
    headers: BTreeMap<String, Value>,
    properties: BTreeMap<String, Value>,
    body_bytes: usize,
    body: String,
    body_truncated: bool,
}

async fn peek(
    connection: &lapin::Connection,
    queue: &str,
    count: u32,
    max_body: usize,
    json: bool,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let Some((ready, _)) = probe_queue(connection, queue).await? else {
        return Err(CliError::MissingQueue(queue.to_owned()));
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(CliError::amqp("cannot open a channel"))?;
    let mut peeked = Vec::new();
    let mut last_tag = None;
    let mut failure = None;
    for index in 0..u64::from(count) {
        match channel
            .basic_get(short(queue), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(Some(message)) => {
                last_tag = Some(message.delivery.delivery_tag);
                peeked.push(describe(index + 1, &message.delivery, max_body));
            }
            Ok(None) => break,
            Err(source) => {
                failure = Some(CliError::Amqp {
                    what: format!("cannot get a message from `{queue}`"),
                    source,
                });
                break;
            }
        }
    }
    // Hand everything back in one go; closing the channel would requeue them too.
    if let Some(tag) = last_tag {
        let _ = channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await;
    }
    close_channel(&channel).await;
    if let Some(error) = failure {
        return Err(error);
    }
    if json {
        serde_json::to_writer_pretty(&mut *io.out, &peeked)?;
        writeln!(io.out)?;
        return Ok(EXIT_OK);
    }
    writeln!(
        io.out,
        "{queue}: {} message{} ready; showing {} (requeued, now marked redelivered)",
        thousands(ready.into()),
        if ready == 1 { "" } else { "s" },
        peeked.len()
    )?;
    for message in &peeked {
        writeln!(io.out)?;
        writeln!(
            io.out,
            "#{} from exchange {} routing key `{}`{}",
            message.index,
            if message.exchange.is_empty() {
                "(default)".to_owned()
            } else {
                format!("`{}`", message.exchange)
            },
            message.routing_key,
            if message.redelivered {
                " (redelivered before)"
            } else {
                ""
            }
        )?;
        for (key, value) in &message.failure {
            writeln!(io.out, "  {key}: {}", plain(value))?;
        }
        for (key, value) in &message.headers {
            writeln!(io.out, "  {key}: {}", plain(value))?;
        }
        if !message.properties.is_empty() {
            let list: Vec<String> = message
                .properties
                .iter()
                .map(|(k, v)| format!("{k}={}", plain(v)))
                .collect();
            writeln!(io.out, "  properties: {}", list.join(", "))?;
        }
        writeln!(
            io.out,
            "  body ({} bytes{}): {}",
            message.body_bytes,
            if message.body_truncated {
                ", truncated"
            } else {
                ""
            },
            message.body
        )?;
    }
    Ok(EXIT_OK)
}

fn describe(index: u64, delivery: &Delivery, max_body: usize) -> Peeked {
    let mut failure = BTreeMap::new();
    let mut headers = BTreeMap::new();
    if let Some(table) = delivery.properties.headers() {
        for (key, value) in table.inner() {
            let key = key.as_str();
            let value = to_json(value);
            if FAILURE_HEADERS.contains(&key) {
                failure.insert(key.to_owned(), value);
            } else {
                headers.insert(key.to_owned(), value);
            }
        }
    }
    let p = &delivery.properties;
    let mut properties = BTreeMap::new();
    let mut put = |key: &str, value: Option<String>| {
        if let Some(value) = value {
            properties.insert(key.to_owned(), Value::String(value));
        }
    };
    put(
        "content_type",
        p.content_type().as_ref().map(ToString::to_string),
    );
    put(
        "message_id",
        p.message_id().as_ref().map(ToString::to_string),
    );
    put(
        "correlation_id",
        p.correlation_id().as_ref().map(ToString::to_string),
    );
    put("delivery_mode", p.delivery_mode().map(|m| m.to_string()));
    put("timestamp", p.timestamp().map(|t| t.to_string()));
    put("app_id", p.app_id().as_ref().map(ToString::to_string));
    let body = crate::amqp::truncate(&String::from_utf8_lossy(&delivery.data), max_body).to_owned();
    Peeked {
        index,
        redelivered: delivery.redelivered,
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        failure,
        headers,
        properties,
        body_bytes: delivery.data.len(),
        body_truncated: delivery.data.len() > max_body,
        body,
    }
}

/// A header value as JSON.
fn to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => (*f).into(),
        AMQPValue::Double(f) => (*f).into(),
        AMQPValue::DecimalValue(d) => Value::String(format!("{d:?}")),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => Value::String(format!("{} bytes", b.as_slice().len())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), to_json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Outcome of `replay`.
#[derive(Debug, Default)]
struct Replayed {
    by_target: BTreeMap<String, u64>,
    total: u64,
}

async fn replay(
    connection: &lapin::Connection,
    queue: &str,
    limit: Option<u64>,
    to: Option<&str>,
    config: &crate::Config,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let Some((ready, _)) = probe_queue(connection, queue).await? else {
        return Err(CliError::MissingQueue(queue.to_owned()));
    };
    if to == Some(queue) {
        return Err(CliError::Usage(format!(
            "--to names the dead-letter queue `{queue}` itself"
        )));
    }
    let budget = limit.map_or(u64::from(ready), |l| l.min(u64::from(ready)));
    let channel = connection
        .create_channel()
        .await
        .map_err(CliError::amqp("cannot open a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(CliError::amqp("cannot enable publisher confirms"))?;
    let mut done = Replayed::default();
    let mut problem = None;
    while done.total < budget {
        let message = match channel
            .basic_get(short(queue), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(source) => {
                problem = Some(format!("cannot get a message from `{queue}`: {source}"));
                break;
            }
        };
        let delivery = message.delivery;
        match replay_one(&channel, queue, &delivery, to, config).await {
            Ok(target) => {
                let acked = channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await;
                done.total += 1;
                *done.by_target.entry(target).or_default() += 1;
                if let Err(error) = acked {
                    problem = Some(format!(
                        "the copy was confirmed but the dead-lettered original could not be \
                         acked ({error}); it stays in `{queue}` and would be replayed twice"
                    ));
                    break;
                }
            }
            Err(reason) => {
                let _ = channel
                    .basic_nack(
                        delivery.delivery_tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await;
                problem = Some(format!("{reason}; the message stays in `{queue}`"));
                break;
            }
        }
    }
    close_channel(&channel).await;
    let mut targets: Vec<String> = done
        .by_target
        .iter()
        .map(|(target, n)| format!("`{target}` ({})", thousands(*n)))
        .collect();
    if targets.is_empty() {
        targets.push("nowhere".to_owned());
    }
    writeln!(
        io.out,
        "replayed {} message{} from `{queue}` to {}",
        thousands(done.total),
        if done.total == 1 { "" } else { "s" },
        targets.join(", ")
    )?;
    match problem {
        Some(problem) => {
            writeln!(io.err, "error: {problem}")?;
            Ok(EXIT_FAILURE)
        }
        None => Ok(EXIT_OK),
    }
}

/// Publishes the copy and waits for its confirm; returns the target queue, or why not.
async fn replay_one(
    channel: &Channel,
    dlq: &str,
    delivery: &Delivery,
    to: Option<&str>,
    config: &crate::Config,
) -> Result<String, String> {
    let headers = delivery.properties.headers().as_ref();
    let target = match to {
        Some(to) => to.to_owned(),
        None => header_str(headers, "x-original-queue")
            .map(str::to_owned)
            .ok_or_else(|| {
                "a message has no `x-original-queue` header (it was not dead-lettered by \
                 rmq-consumer); name the target with --to QUEUE"
                    .to_owned()
            })?,
    };
    if target == dlq {
        return Err(format!("a message's original queue is `{dlq}` itself"));
    }
    // Replayed with the operator's credentials: no routing headers (they would reach more
    // queues than the target) and no `user_id` (the broker refuses another user's).
    let properties: BasicProperties =
        crate::amqp::copy_properties(&delivery.properties, replay_headers(headers, dlq), false);
    let confirm = channel
        .basic_publish(
            short(""),
            short(&target),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            properties,
        )
        .await
        .map_err(|e| format!("cannot publish the copy to `{target}`: {e}"))?;
    let confirmation = tokio::time::timeout(config.confirm_timeout, confirm)
        .await
        .map_err(|_| {
            format!(
                "no confirm for the copy to `{target}` within {}",
                humantime::format_duration(config.confirm_timeout)
            )
        })?
        .map_err(|e| format!("the copy to `{target}` failed: {}", chain(&e)))?;
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(target),
        Confirmation::Ack(Some(_)) => Err(format!(
            "the copy was returned as unroutable: queue `{target}` does not exist"
        )),
        Confirmation::Nack(_) => Err(format!(
            "the broker refused (nacked) the copy to `{target}`"
        )),
    }
}

/// The copy's headers; see the module docs.
fn replay_headers(original: Option<&FieldTable>, dlq: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    let mut failure = FieldTable::default();
    let mut previous_replays = 0_i64;
    let mut previous_failure = None;
    if let Some(original) = original {
        for (key, value) in original.inner() {
            let name = key.as_str();
            if FAILURE_HEADERS.contains(&name) {
                failure.insert(key.clone(), value.clone());
            } else if name == "x-replay-count" {
                if let AMQPValue::LongLongInt(n) = value {
                    previous_replays = *n;
                }
            } else if name == "x-replayed-failure" {
                previous_failure = Some(value.clone());
            } else if !BROKER_DEATH_HEADERS.contains(&name)
                && !matches!(name, "x-replayed-from" | "x-replayed-at")
            {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    headers.insert("x-replayed-from".into(), long(dlq));
    headers.insert("x-replayed-at".into(), long(&now));
    headers.insert(
        "x-replay-count".into(),
        AMQPValue::LongLongInt(previous_replays.saturating_add(1)),
    );
    // The latest failure wins; a message replayed again without failing keeps the old one.
    let failure = if failure.inner().is_empty() {
        previous_failure
    } else {
        Some(AMQPValue::FieldTable(failure))
    };
    if let Some(failure) = failure {
        headers.insert("x-replayed-failure".into(), failure);
    }
    headers
}

async fn purge(
    connection: &lapin::Connection,
    queue: &str,
    yes: bool,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let Some((ready, _)) = probe_queue(connection, queue).await? else {
        return Err(CliError::MissingQueue(queue.to_owned()));
    };
    if !yes {
        return Err(CliError::Usage(format!(
            "refusing to purge `{queue}` ({} ready message{}) without --yes",
            thousands(ready.into()),
            if ready == 1 { "" } else { "s" }
        )));
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(CliError::amqp("cannot open a channel"))?;
    let purged = channel
        .queue_purge(short(queue), QueuePurgeOptions::default())
        .await
        .map_err(CliError::amqp(format!("cannot purge `{queue}`")))?;
    close_channel(&channel).await;
    writeln!(
        io.out,
        "purged {} message{} from `{queue}`",
        thousands(purged.into()),
        if purged == 1 { "" } else { "s" }
    )?;
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_headers_reset_the_retry_count_and_keep_the_failure() {
        let mut original = FieldTable::default();
        original.insert("x-retry-count".into(), AMQPValue::LongLongInt(3));
        original.insert("x-death-reason".into(), long("retries exhausted: boom"));
        original.insert("x-original-queue".into(), long("work"));
        original.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        original.insert("tenant".into(), long("acme"));
        let headers = replay_headers(Some(&original), "work.dlq");
        let inner = headers.inner();
        assert!(!inner.contains_key("x-retry-count"));
        assert!(!inner.contains_key("x-death-reason"));
        assert!(!inner.contains_key("x-death"));
        assert_eq!(header_str(Some(&headers), "tenant"), Some("acme"));
        assert_eq!(
            header_str(Some(&headers), "x-replayed-from"),
            Some("work.dlq")
        );
        assert_eq!(
            inner.get("x-replay-count"),
            Some(&AMQPValue::LongLongInt(1))
        );
        let Some(AMQPValue::FieldTable(failure)) = inner.get("x-replayed-failure") else {
            panic!("no x-replayed-failure: {headers:?}");
        };
        assert_eq!(
            failure.inner().get("x-retry-count"),
            Some(&AMQPValue::LongLongInt(3))
        );
        assert_eq!(header_str(Some(failure), "x-original-queue"), Some("work"));

        let again = replay_headers(Some(&headers), "work.dlq");
        assert_eq!(
            again.inner().get("x-replay-count"),
            Some(&AMQPValue::LongLongInt(2))
        );
        assert_eq!(
            again.inner().get("x-replayed-failure"),
            inner.get("x-replayed-failure")
        );
    }

    #[test]
    fn header_values_render_as_json() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongLongInt(2));
        assert_eq!(
            to_json(&AMQPValue::FieldTable(table)),
            serde_json::json!({"n": 2})
        );
        assert_eq!(to_json(&long("text")), Value::String("text".to_owned()));
    }
}

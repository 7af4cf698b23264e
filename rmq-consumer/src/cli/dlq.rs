//! `rmq-consumer dlq peek|list|replay|purge`: dead-letter queue tools.
//!
//! A dead-letter queue belongs to one work queue: the handler's whose configured
//! `dead_letter_queue` it is, else by the naming rule `<queue>.dlq` (one home:
//! [`crate::settings::source_of_dead_letter_queue`], which `status` reports as
//! `dead_letter_sources` too). `replay` and `purge` refuse a queue that is no dead-letter queue
//! (exit 2); `purge --force` purges it anyway.
//!
//! - `peek` (alias `list`) takes up to N messages with `basic.get` *without* acking them,
//!   prints them, then hands them all back with one `basic.nack(multiple, requeue)`. RabbitMQ
//!   puts requeued messages back in their original position, so the order is kept; they come
//!   back marked *redelivered*, and on a quorum queue each peek counts as a delivery attempt
//!   (which matters if the queue has a `delivery-limit`). While a peek runs, the peeked
//!   messages are invisible to other consumers. Message text is printed with its control
//!   characters escaped ([`crate::text::printable`]).
//! - `replay` moves messages back to the queue the dead-letter queue belongs to, or to
//!   `--to QUEUE`, one at a time: get (no ack), publish a copy through the default exchange
//!   with confirms and `mandatory` on a channel of its own, wait for the broker's confirm, and
//!   only then ack the dead-lettered original. Without `--to`, a message whose
//!   `x-original-queue` names another queue is skipped. A copy that is returned, nacked, not
//!   confirmed in time or refused with a channel error (the publishing channel is then
//!   reopened) is skipped too, and the replay goes on: each skip is reported on stderr, the
//!   skipped originals stay unacked until the end and are then given back together
//!   (`nack(multiple, requeue)`), in their order. A summary line counts what was replayed and
//!   skipped, and why; exit 1 when anything was skipped. So a message is never lost; at worst
//!   (the ack fails after a confirmed copy, or a copy not confirmed in time arrives after all)
//!   it is duplicated. Only the messages present when the replay starts are replayed, so a
//!   message that fails again is not replayed in a loop.
//!   The copy's headers: `x-retry-count` and the failure headers the engine wrote
//!   (`x-death-reason`, `x-error-kind`, `x-last-error`, `x-original-*`, `x-first-failure-at`,
//!   `x-last-failure-at`, `x-handler`) are removed so the message gets a full set of retries;
//!   they are kept, as they were, in the `x-replayed-failure` table (the latest failure's, when
//!   a message is replayed more than once); the broker's own `x-death`
//!   family is dropped; `x-replayed-from` (the DLQ), `x-replayed-at` (RFC 3339) and
//!   `x-replay-count` (1, 2, ...) are added. The routing headers `CC` and `BCC` and the
//!   `user_id` property are dropped (the copy is published with the operator's credentials
//!   and goes to one queue only); other headers and properties are copied unchanged.
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

use super::output::{self, say};
use super::status::dead_letter_source;
use super::{
    CliError, EXIT_FAILURE, EXIT_OK, Global, Io, chain, close, close_channel, connect, load_config,
    probe_queue, thousands,
};
use crate::{
    amqp::{header_str, long, short},
    retry::ORIGINAL_QUEUE_HEADER,
    settings::DEAD_LETTER_SUFFIX,
};

use crate::headers::{
    BROKER_DEATH_HEADERS, FAILURE_HEADERS, REPLAY_COUNT, REPLAYED_AT, REPLAYED_FAILURE,
    REPLAYED_FROM,
};
/// Default number of messages `peek` shows.
const DEFAULT_PEEK_COUNT: u32 = 10;
/// Default body bytes `peek` prints per message.
const DEFAULT_PEEK_BODY_BYTES: usize = 2048;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Show dead-lettered messages and their failure headers without removing them (they are
    /// requeued in order, marked redelivered).
    #[command(visible_alias = "list")]
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
    /// Move messages back to the queue the dead-letter queue belongs to, with the retry count
    /// reset; each is removed from the DLQ only after its copy is confirmed, and a copy the
    /// broker refuses is skipped (the message stays) and reported.
    Replay {
        /// The dead-letter queue (`<queue>.dlq`, or a handler's configured
        /// `dead_letter_queue`).
        queue: String,
        /// Replay at most this many messages (default: all present when the replay starts).
        #[arg(long)]
        limit: Option<u64>,
        /// Replay into this queue instead of the one the dead-letter queue belongs to (the
        /// messages' `x-original-queue` is then not checked).
        #[arg(long, value_name = "QUEUE")]
        to: Option<String>,
    },
    /// Delete every message in a dead-letter queue (needs --yes; another queue also needs
    /// --force).
    Purge {
        /// The queue.
        queue: String,
        /// Really delete the messages.
        #[arg(long)]
        yes: bool,
        /// Purge even a queue that is no dead-letter queue.
        #[arg(long)]
        force: bool,
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
            let Some(source) = dead_letter_source(&config, &queue)? else {
                return Err(not_a_dead_letter_queue(&queue, "replay"));
            };
            let (connection, _) = connect(&config, "dlq replay").await?;
            let result = replay(
                &connection,
                &queue,
                &source,
                limit,
                to.as_deref(),
                &config,
                io,
            )
            .await;
            close(&connection).await;
            result
        }
        Command::Purge { queue, yes, force } => {
            if !force && dead_letter_source(&config, &queue)?.is_none() {
                return Err(not_a_dead_letter_queue(&queue, "purge"));
            }
            let (connection, _) = connect(&config, "dlq purge").await?;
            let result = purge(&connection, &queue, yes, io).await;
            close(&connection).await;
            result
        }
    }
}

/// The refusal for a queue that is no dead-letter queue.
fn not_a_dead_letter_queue(queue: &str, what: &str) -> CliError {
    let force = if what == "purge" {
        " (or add --force to purge it anyway)"
    } else {
        ""
    };
    CliError::Usage(format!(
        "refusing to {what} `{queue}`: it is not a dead-letter queue (neither a configured \
         handler's `dead_letter_queue` nor named `<queue>{DEAD_LETTER_SUFFIX}`); name the \
         configuration with --config{force}"
    ))
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
        output::json(io.out, &peeked)?;
        return Ok(EXIT_OK);
    }
    say!(
        io.out,
        "{queue}: {} message{} ready; showing {} (requeued, now marked redelivered)",
        thousands(ready.into()),
        if ready == 1 { "" } else { "s" },
        peeked.len()
    )?;
    for message in &peeked {
        say!(io.out)?;
        say!(
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
            say!(io.out, "  {key}: {}", plain(value))?;
        }
        for (key, value) in &message.headers {
            say!(io.out, "  {key}: {}", plain(value))?;
        }
        if !message.properties.is_empty() {
            let list: Vec<String> = message
                .properties
                .iter()
                .map(|(k, v)| format!("{k}={}", plain(v)))
                .collect();
            say!(io.out, "  properties: {}", list.join(", "))?;
        }
        say!(
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

/// Why a message stayed in the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SkipKind {
    /// Its `x-original-queue` names another queue than the one the DLQ belongs to.
    OtherQueue,
    /// The broker returned the copy (`mandatory`): no queue took it.
    Returned,
    /// The broker nacked the copy (e.g. a full queue with `reject-publish`).
    Nacked,
    /// Publishing the copy closed the channel, or it failed otherwise.
    ChannelError,
    /// No confirm arrived within `confirm_timeout` (the copy may still arrive).
    NoConfirm,
}

impl SkipKind {
    fn describe(self) -> &'static str {
        match self {
            Self::OtherQueue => "belonging to another queue",
            Self::Returned => "returned as unroutable",
            Self::Nacked => "refused (nacked) by the broker",
            Self::ChannelError => "refused with a channel error",
            Self::NoConfirm => "not confirmed in time",
        }
    }
}

/// What became of one message.
enum Outcome {
    /// The copy was confirmed: ack the original.
    Replayed,
    /// The original stays in the DLQ; `reopen` when the publishing channel is no longer usable.
    Skipped {
        kind: SkipKind,
        reason: String,
        reopen: bool,
    },
}

/// Outcome of `replay`.
#[derive(Debug, Default)]
struct Replayed {
    replayed: u64,
    skipped: BTreeMap<SkipKind, u64>,
}

impl Replayed {
    fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// The channel copies are published on: confirms on, reopened after a channel error.
struct Publisher<'a> {
    connection: &'a lapin::Connection,
    channel: Option<Channel>,
}

impl Publisher<'_> {
    async fn channel(&mut self) -> Result<&Channel, CliError> {
        if self
            .channel
            .as_ref()
            .is_some_and(|c| !c.status().connected())
        {
            self.channel = None;
        }
        if self.channel.is_none() {
            let channel = self
                .connection
                .create_channel()
                .await
                .map_err(CliError::amqp("cannot open a channel to publish copies on"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(CliError::amqp("cannot enable publisher confirms"))?;
            self.channel = Some(channel);
        }
        self.channel
            .as_ref()
            .ok_or_else(|| CliError::Usage("no publishing channel".to_owned()))
    }

    async fn reopen(&mut self) {
        if let Some(channel) = self.channel.take() {
            close_channel(&channel).await;
        }
    }

    async fn close(&mut self) {
        self.reopen().await;
    }
}

/// Replays the messages of `dlq` present at the start (at most `limit`) into `target`; see
/// the module docs.
#[allow(
    clippy::too_many_lines,
    reason = "one loop: get, check, publish, settle; split it and the settling rules scatter"
)]
async fn replay(
    connection: &lapin::Connection,
    dlq: &str,
    source: &str,
    limit: Option<u64>,
    to: Option<&str>,
    config: &crate::Config,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let Some((ready, _)) = probe_queue(connection, dlq).await? else {
        return Err(CliError::MissingQueue(dlq.to_owned()));
    };
    let target = to.unwrap_or(source);
    if target == dlq {
        return Err(CliError::Usage(format!(
            "refusing to replay `{dlq}` into itself"
        )));
    }
    let budget = limit.map_or(u64::from(ready), |l| l.min(u64::from(ready)));
    let frame_max = crate::hostile::negotiated_frame_max(connection);
    let channel = connection
        .create_channel()
        .await
        .map_err(CliError::amqp("cannot open a channel"))?;
    let mut publisher = Publisher {
        connection,
        channel: None,
    };
    let mut done = Replayed::default();
    let mut problem = None;
    // Skipped originals stay unacked on `channel` (so they are not fetched again) and go
    // back in one nack at the end.
    let mut last_skipped = None;
    let mut seen = 0_u64;
    while seen < budget {
        let message = match channel
            .basic_get(short(dlq), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(source) => {
                problem = Some(format!("cannot get a message from `{dlq}`: {source}"));
                break;
            }
        };
        seen += 1;
        let delivery = message.delivery;
        let outcome = if to.is_none()
            && let Some(other) = other_original_queue(&delivery, source)
        {
            Outcome::Skipped {
                kind: SkipKind::OtherQueue,
                reason: format!(
                    "its `{ORIGINAL_QUEUE_HEADER}` is `{other}`, but `{dlq}` holds the dead \
                     letters of `{source}` (replay it with --to QUEUE to send it elsewhere)"
                ),
                reopen: false,
            }
        } else {
            match publisher.channel().await {
                Ok(publishing) => {
                    replay_one(publishing, dlq, &delivery, target, config, frame_max).await
                }
                Err(error) => {
                    problem = Some(chain(&error));
                    break;
                }
            }
        };
        match outcome {
            Outcome::Replayed => {
                let acked = channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await;
                done.replayed += 1;
                if let Err(error) = acked {
                    problem = Some(format!(
                        "the copy was confirmed but the dead-lettered original could not be \
                         acked ({error}); it stays in `{dlq}` and would be replayed twice"
                    ));
                    break;
                }
            }
            Outcome::Skipped {
                kind,
                reason,
                reopen,
            } => {
                *done.skipped.entry(kind).or_default() += 1;
                last_skipped = Some(delivery.delivery_tag);
                say!(
                    io.err,
                    "skipped message {seen}{}: {reason}; it stays in `{dlq}`",
                    delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|id| format!(" (message_id {id})"))
                        .unwrap_or_default()
                )?;
                if reopen {
                    publisher.reopen().await;
                }
            }
        }
    }
    publisher.close().await;
    if let Some(tag) = last_skipped
        && problem.is_none()
    {
        let given_back = channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await;
        if let Err(error) = given_back {
            problem = Some(format!(
                "cannot give the skipped messages back ({error}); the broker requeues them \
                 when the channel closes"
            ));
        }
    }
    close_channel(&channel).await;
    let skipped = done.skipped_total();
    let mut summary = format!(
        "replayed {} message{} from `{dlq}` to `{target}`",
        thousands(done.replayed),
        if done.replayed == 1 { "" } else { "s" },
    );
    if skipped > 0 {
        let reasons: Vec<String> = done
            .skipped
            .iter()
            .map(|(kind, n)| format!("{} {}", thousands(*n), kind.describe()))
            .collect();
        summary.push_str(&format!(
            "; skipped {} ({}), kept in `{dlq}`",
            thousands(skipped),
            reasons.join(", ")
        ));
    }
    say!(io.out, "{summary}")?;
    if let Some(problem) = problem {
        say!(io.err, "error: {problem}")?;
        return Ok(EXIT_FAILURE);
    }
    Ok(if skipped > 0 { EXIT_FAILURE } else { EXIT_OK })
}

/// The queue a message's `x-original-queue` names when that is not `source` (`None` when it
/// is, or when the header is absent); a header that is no text counts as another queue.
fn other_original_queue(delivery: &Delivery, source: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref();
    let present = headers.is_some_and(|h| h.inner().contains_key(ORIGINAL_QUEUE_HEADER));
    match header_str(headers, ORIGINAL_QUEUE_HEADER) {
        Some(queue) if queue == source => None,
        Some(queue) => Some(queue.to_owned()),
        None if present => Some("(not text)".to_owned()),
        None => None,
    }
}

/// Publishes the copy and waits for its confirm.
async fn replay_one(
    channel: &Channel,
    dlq: &str,
    delivery: &Delivery,
    target: &str,
    config: &crate::Config,
    frame_max: usize,
) -> Outcome {
    let skip = |kind: SkipKind, reason: String| Outcome::Skipped {
        kind,
        reason,
        reopen: matches!(kind, SkipKind::ChannelError | SkipKind::NoConfirm),
    };
    // Replayed with the operator's credentials: no routing headers (they would reach more
    // queues than the target) and no `user_id` (the broker refuses another user's).
    let headers = delivery.properties.headers().as_ref();
    let properties: BasicProperties = crate::amqp::copy_properties(
        &delivery.properties,
        replay_headers(headers, dlq),
        false,
        frame_max,
    );
    let confirm = match channel
        .basic_publish(
            short(""),
            short(target),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            properties,
        )
        .await
    {
        Ok(confirm) => confirm,
        Err(error) => {
            return skip(
                SkipKind::ChannelError,
                format!("cannot publish the copy to `{target}`: {}", chain(&error)),
            );
        }
    };
    let confirmation = match tokio::time::timeout(config.confirm_timeout, confirm).await {
        Err(_) => {
            return skip(
                SkipKind::NoConfirm,
                format!(
                    "no confirm for the copy to `{target}` within {} (it may still arrive)",
                    humantime::format_duration(config.confirm_timeout)
                ),
            );
        }
        Ok(Err(error)) => {
            return skip(
                SkipKind::ChannelError,
                format!(
                    "the broker refused the copy to `{target}`: {}",
                    chain(&error)
                ),
            );
        }
        Ok(Ok(confirmation)) => confirmation,
    };
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Outcome::Replayed,
        Confirmation::Ack(Some(returned)) => skip(
            SkipKind::Returned,
            format!(
                "the copy was returned as unroutable ({} {}): no queue `{target}` took it",
                returned.reply_code, returned.reply_text
            ),
        ),
        Confirmation::Nack(_) => skip(
            SkipKind::Nacked,
            format!("the broker refused (nacked) the copy to `{target}`"),
        ),
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
            } else if name == REPLAY_COUNT {
                if let AMQPValue::LongLongInt(n) = value {
                    previous_replays = *n;
                }
            } else if name == REPLAYED_FAILURE {
                previous_failure = Some(value.clone());
            } else if !BROKER_DEATH_HEADERS.contains(&name)
                && name != REPLAYED_FROM
                && name != REPLAYED_AT
            {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    headers.insert(REPLAYED_FROM.into(), long(dlq));
    headers.insert(REPLAYED_AT.into(), long(&now));
    headers.insert(
        REPLAY_COUNT.into(),
        AMQPValue::LongLongInt(previous_replays.saturating_add(1)),
    );
    // The latest failure wins; a message replayed again without failing keeps the old one.
    let failure = if failure.inner().is_empty() {
        previous_failure
    } else {
        Some(AMQPValue::FieldTable(failure))
    };
    if let Some(failure) = failure {
        headers.insert(REPLAYED_FAILURE.into(), failure);
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
    say!(
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

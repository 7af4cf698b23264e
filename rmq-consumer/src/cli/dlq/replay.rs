//! `dlq replay`: move dead letters back, each acked only after its copy is confirmed.

use std::{collections::BTreeMap, time::SystemTime};

use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable},
};

use crate::amqp::{header_str, long, short};
use crate::cli::output::say;
use crate::cli::{
    CliError, EXIT_FAILURE, EXIT_OK, Io, chain, close_channel, probe_queue, thousands,
};
use crate::headers::{
    BROKER_DEATH_HEADERS, FAILURE_HEADERS, ORIGINAL_QUEUE, REPLAY_COUNT, REPLAYED_AT,
    REPLAYED_FAILURE, REPLAYED_FROM,
};

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
pub(super) async fn replay(
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
                    "its `{ORIGINAL_QUEUE}` is `{other}`, but `{dlq}` holds the dead \
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
    let present = headers.is_some_and(|h| h.inner().contains_key(ORIGINAL_QUEUE));
    match header_str(headers, ORIGINAL_QUEUE) {
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
}

//! Settlement of a [`Worker`]'s deliveries: the confirmed result, then exactly one of ack,
//! retry copy, dead letter, suspect copy or hand back, with the failure headers.

use std::time::{Duration, SystemTime};

use lapin::{
    BasicProperties,
    message::Delivery,
    types::{AMQPValue, FieldTable},
};
use tracing::{debug, error, warn};

use crate::{
    amqp::{self, long},
    engine::acks::{How, Settler},
    engine::redelivery::{self, WORKER_LOST},
    error::PublishError,
    handler::{FailureAction, HandlerError},
    health::Counter,
    publisher::Publisher,
    retry::{self, Decision},
    topology,
};

use super::{pipeline::Reply, worker::Worker};

/// The longest error text written into a header.
pub(crate) const MAX_REASON_BYTES: usize = 1024;
/// Wait before handing a message back to the broker when a retry or DLQ publish failed, so a
/// broken route cannot turn into a hot loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);
/// The first wait before publishing a nacked result again; it doubles up to
/// [`RESULT_REPUBLISH_MAX_PAUSE`].
const RESULT_REPUBLISH_FIRST_PAUSE: Duration = Duration::from_millis(50);
const RESULT_REPUBLISH_MAX_PAUSE: Duration = Duration::from_secs(2);

impl Worker {
    /// Publishes the handler's result (confirmed, mandatory) to its route.
    pub(super) async fn publish_reply(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        reply: Reply,
    ) -> Result<(), HandlerError> {
        let Some((exchange, routing_key)) = self.reply_route(delivery) else {
            return Ok(());
        };
        let via_reply_to =
            self.settings.reply_key.as_deref() != Some(routing_key) || exchange != self.exchange;
        self.publish_result(
            publisher,
            exchange,
            routing_key,
            reply.body,
            reply.properties,
        )
        .await
        .map_err(|error| {
            // A `reply_to` that routes nowhere names a requester that has gone (or never
            // was): running the handler again cannot change that.
            let action = match &error {
                PublishError::Unroutable { .. } if via_reply_to => FailureAction::DeadLetter,
                _ => FailureAction::Retry,
            };
            HandlerError::with_kind(action, error.kind(), crate::error::chain(&error))
        })
    }

    /// Publishes a result; one the broker nacks, or refuses because the result exchange does
    /// not exist, is published again, with backoff, for up to `result_publish_retry`. A nack
    /// is the broker saying "not now" (a quorum queue between leaders, a full queue with
    /// `reject-publish`), and an exchange deleted under a running engine is usually declared
    /// again soon (by an operator, a redeploy, this engine's next reconnect): the handler's
    /// work is kept instead of counting an attempt and running it again. (A result refused
    /// with its exchange may have been routed just before the delete: publishing it again
    /// then duplicates it, as the handler's retry would.) Other failures return at once.
    pub(super) async fn publish_result(
        &self,
        publisher: &Publisher,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let stats = self.stats();
        let deadline = std::time::Instant::now() + self.result_publish_retry;
        let mut pause = RESULT_REPUBLISH_FIRST_PAUSE;
        loop {
            let outcome = publisher
                .publish(exchange, routing_key, body.clone(), properties.clone())
                .await;
            let why = match &outcome {
                Err(PublishError::Nacked { .. }) => {
                    stats.count(Counter::ResultsNacked);
                    "the broker nacked the result"
                }
                Err(PublishError::ExchangeNotFound { .. }) => {
                    stats.count(Counter::ResultsExchangeMissing);
                    "the result exchange does not exist"
                }
                Err(PublishError::Unroutable { .. }) => {
                    stats.count(Counter::ResultsReturned);
                    return outcome;
                }
                _ => return outcome,
            };
            if std::time::Instant::now() + pause > deadline {
                return outcome;
            }
            debug!(pause = ?pause, "{why}; publishing it again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RESULT_REPUBLISH_MAX_PAUSE);
        }
    }

    /// Settles the delivery exactly once.
    pub(super) async fn settle(
        &self,
        publisher: &Publisher,
        settler: &Settler,
        delivery: Delivery,
        outcome: Result<(), HandlerError>,
    ) {
        let stats = self.stats();
        let failure = match outcome {
            Ok(()) => {
                // Counted as succeeded by `acked` once the ack is out.
                settler.ack(delivery.delivery_tag);
                debug!("done");
                return;
            }
            Err(failure) => failure,
        };
        let previous = amqp::retry_count(delivery.properties.headers().as_ref());
        if let amqp::RetryCount::Count(n) = previous {
            tracing::Span::current().record("attempt", n.saturating_add(1));
        }
        let decision = retry::decide(
            failure.action(),
            previous,
            self.settings.max_retries,
            &self.settings.retry_delays,
        );
        match decision {
            Decision::Retry { count, delay } => {
                let (routing_key, label) = match delay {
                    Some(delay) => (self.settings.delay_queue(delay), format!("in {delay:?}")),
                    None => (self.settings.queue.clone(), "now".to_owned()),
                };
                let headers = self.failure_headers(&delivery, &failure, count, None);
                let properties =
                    amqp::copy_properties(&delivery.properties, headers, false, self.frame_max());
                match self
                    .publish_copy(publisher, &routing_key, &delivery, properties)
                    .await
                {
                    Ok(()) => {
                        warn!(error = %failure, kind = failure.kind(), retry = count,
                            max_retries = self.settings.max_retries, "processing failed; retrying {label}");
                        if self.ack(settler, &delivery).await {
                            stats.count(Counter::Retried);
                        }
                    }
                    Err(error) => self.hand_back(settler, &delivery, &failure, &error).await,
                }
            }
            Decision::DeadLetter { retries_exhausted } => {
                let why = if failure.kind() == WORKER_LOST {
                    WORKER_LOST
                } else if retries_exhausted {
                    "retries exhausted"
                } else {
                    "not retryable"
                };
                let Some(dlq) = &self.settings.dead_letter_queue else {
                    error!(error = %failure, kind = failure.kind(),
                        "processing failed ({why}); rejecting without requeue (dead-lettering is off)");
                    let rejected = settler.settle(delivery.delivery_tag, How::Reject).await;
                    if self.settled(rejected) {
                        stats.count(Counter::Rejected);
                    }
                    return;
                };
                let count = match previous {
                    amqp::RetryCount::Count(n) => n,
                    amqp::RetryCount::Malformed => 0,
                };
                let headers = self.failure_headers(&delivery, &failure, count, Some(why));
                let properties =
                    amqp::copy_properties(&delivery.properties, headers, true, self.frame_max());
                match self
                    .publish_copy(publisher, dlq, &delivery, properties)
                    .await
                {
                    Ok(()) => {
                        warn!(error = %failure, kind = failure.kind(), dead_letter_queue = %dlq,
                            "processing failed ({why}); sent to the dead-letter queue");
                        if self.ack(settler, &delivery).await {
                            stats.count(Counter::DeadLettered);
                        }
                    }
                    Err(error) => self.hand_back(settler, &delivery, &failure, &error).await,
                }
            }
        }
    }

    /// Publishes a copy of `delivery` (confirmed, mandatory) for one of the handler's own
    /// queues, `queue`: a retry, delay, dead-letter or suspect copy. The one path such copies
    /// take ([`topology::copy_route`]).
    pub(super) async fn publish_copy(
        &self,
        publisher: &Publisher,
        queue: &str,
        delivery: &Delivery,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let (exchange, routing_key) = topology::copy_route(&self.exchange, &self.settings, queue);
        publisher
            .publish(exchange, routing_key, delivery.data.clone(), properties)
            .await
    }

    /// The retry or DLQ copy could not be published: give the message back to the broker
    /// (after a pause), so it is redelivered rather than lost. A copy of unknown fate
    /// ([`PublishError::may_have_been_kept`]) is counted in `uncertain_copies`: the broker may
    /// then hold it beside the requeued original. (A copy that failed only because another
    /// publish of its lane's batch named a missing exchange never gets here: the publisher
    /// sends it again.)
    pub(super) async fn hand_back(
        &self,
        settler: &Settler,
        delivery: &Delivery,
        failure: &HandlerError,
        error: &PublishError,
    ) {
        if error.may_have_been_kept() {
            // The copy may be in its queue too: at-least-once keeps the original (requeued
            // below) rather than risk losing both, at the cost of one more run, counted.
            self.stats().count(Counter::UncertainCopies);
            error!(error = %failure, publish_error = %crate::error::chain(error),
                "processing failed and the retry/dead-letter copy was not confirmed (the broker may hold it); returning the message to the queue, so the task may run once more");
        } else {
            error!(error = %failure, publish_error = %crate::error::chain(error),
                "processing failed and the retry/dead-letter copy could not be published; returning the message to the queue");
        }
        tokio::time::sleep(REQUEUE_PAUSE).await;
        self.abandon(delivery);
        let nacked = settler.settle(delivery.delivery_tag, How::Requeue).await;
        self.settled(nacked);
    }

    /// Moves a delivery whose earlier delivery ended unsettled to the suspect queue, counted
    /// (`count` in all), confirmed before the original is acked.
    pub(super) async fn suspect(
        &self,
        publisher: &Publisher,
        settler: &Settler,
        delivery: Delivery,
        count: u32,
    ) {
        let headers = redelivery::counted(delivery.properties.headers().as_ref(), count);
        let properties =
            amqp::copy_properties(&delivery.properties, headers, false, self.frame_max());
        let suspect_queue = self.settings.suspect_queue();
        match self
            .publish_copy(publisher, &suspect_queue, &delivery, properties)
            .await
        {
            Ok(()) => {
                warn!(lost_deliveries = count, max_redeliveries = self.settings.max_redeliveries,
                    suspect_queue = %suspect_queue,
                    "an earlier delivery of this task ended unsettled (a worker died or lost its connection holding it); moved to the suspect queue, where it runs alone");
                if self.ack(settler, &delivery).await {
                    self.stats().count(Counter::Suspected);
                }
            }
            Err(error) => {
                let failure = HandlerError::with_kind(
                    FailureAction::Retry,
                    WORKER_LOST,
                    "an earlier delivery ended unsettled",
                );
                self.hand_back(settler, &delivery, &failure, &error).await;
            }
        }
    }

    pub(super) async fn ack(&self, settler: &Settler, delivery: &Delivery) -> bool {
        let acked = settler.settle(delivery.delivery_tag, How::Ack).await;
        self.settled(acked)
    }

    /// Hears whether a successful delivery's ack ([`Settler::ack`]) reached a live channel.
    /// Not [`Self::settled`]: this runs in the settler, outside the delivery's span, and on a
    /// connection loss once for every ack still queued, so the loss is named at debug level.
    pub(super) fn acked(&self, sent: bool) {
        if sent {
            self.stats().count(Counter::Succeeded);
        } else {
            // The connection or channel loss is logged where it is noticed.
            self.stats().count(Counter::StaleAcks);
            debug!(handler = %self.settings.name, "an ack could not be sent: the delivery's channel is gone; the broker will redeliver the message");
        }
    }

    /// `false` (and counted) when the settlement could not reach the broker: the delivery's
    /// channel died, and the broker will redeliver the message.
    pub(super) fn settled(&self, sent: bool) -> bool {
        if !sent {
            self.stats().count(Counter::StaleAcks);
            warn!("the delivery's channel is gone; the broker will redeliver the message");
        }
        sent
    }

    pub(super) fn failure_headers(
        &self,
        delivery: &Delivery,
        failure: &HandlerError,
        count: u32,
        dead_letter_reason: Option<&str>,
    ) -> FieldTable {
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let dead = dead_letter_reason.map(|why| DeadLetter {
            why,
            queue: &self.settings.queue,
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            handler: &self.settings.name,
        });
        failure_headers(
            delivery.properties.headers().as_ref(),
            failure,
            count,
            &now,
            dead.as_ref(),
        )
    }
}

/// Where a dead letter came from, written into its headers.
struct DeadLetter<'a> {
    /// Why it is dead-lettered (`retries exhausted`, `not retryable`, `worker_lost`).
    why: &'a str,
    queue: &'a str,
    exchange: &'a str,
    routing_key: &'a str,
    handler: &'a str,
}

/// The headers of a retry or dead-letter copy: the request's, plus the failure contract of
/// `headers.rs` (`x-retry-count` = `count`, first and last failure times (`now`), the last
/// error (at most [`MAX_REASON_BYTES`]) and its kind, and for a dead letter where it came
/// from and why).
fn failure_headers(
    request: Option<&FieldTable>,
    failure: &HandlerError,
    count: u32,
    now: &str,
    dead: Option<&DeadLetter<'_>>,
) -> FieldTable {
    use crate::headers as h;
    let mut headers = request.cloned().unwrap_or_default();
    let reason = amqp::truncate(failure.message(), MAX_REASON_BYTES);
    headers.insert(h::RETRY_COUNT.into(), AMQPValue::LongLongInt(count.into()));
    if !headers.contains_key(h::FIRST_FAILURE_AT) {
        headers.insert(h::FIRST_FAILURE_AT.into(), long(now));
    }
    headers.insert(h::LAST_FAILURE_AT.into(), long(now));
    headers.insert(h::LAST_ERROR.into(), long(reason));
    headers.insert(h::ERROR_KIND.into(), long(failure.kind()));
    if let Some(dead) = dead {
        headers.insert(
            h::DEATH_REASON.into(),
            long(&format!("{}: {reason}", dead.why)),
        );
        headers.insert(h::ORIGINAL_QUEUE.into(), long(dead.queue));
        headers.insert(h::ORIGINAL_EXCHANGE.into(), long(dead.exchange));
        headers.insert(h::ORIGINAL_ROUTING_KEY.into(), long(dead.routing_key));
        headers.insert(h::HANDLER.into(), long(dead.handler));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers as h;

    fn text(headers: &FieldTable, name: &str) -> Option<String> {
        match headers.inner().get(name) {
            Some(AMQPValue::LongString(value)) => Some(value.to_string()),
            Some(AMQPValue::LongLongInt(n)) => Some(n.to_string()),
            _ => None,
        }
    }

    #[test]
    fn a_retry_copy_counts_and_keeps_the_first_failure() {
        let mut request = FieldTable::default();
        request.insert("app".into(), long("kept"));
        let failure = HandlerError::retry("downstream busy");
        let first = failure_headers(Some(&request), &failure, 1, "t1", None);
        assert_eq!(text(&first, "app").as_deref(), Some("kept"));
        assert_eq!(text(&first, h::RETRY_COUNT).as_deref(), Some("1"));
        assert_eq!(text(&first, h::FIRST_FAILURE_AT).as_deref(), Some("t1"));
        assert_eq!(
            text(&first, h::LAST_ERROR).as_deref(),
            Some("downstream busy")
        );
        assert_eq!(
            text(&first, h::ERROR_KIND).as_deref(),
            Some("handler_error")
        );
        assert_eq!(text(&first, h::DEATH_REASON), None, "not a dead letter");
        let second = failure_headers(Some(&first), &failure, 2, "t2", None);
        assert_eq!(text(&second, h::RETRY_COUNT).as_deref(), Some("2"));
        assert_eq!(text(&second, h::FIRST_FAILURE_AT).as_deref(), Some("t1"));
        assert_eq!(text(&second, h::LAST_FAILURE_AT).as_deref(), Some("t2"));
    }

    #[test]
    fn a_dead_letter_says_where_it_came_from_and_why() {
        let failure = HandlerError::dead_letter("x".repeat(4 * MAX_REASON_BYTES));
        let dead = DeadLetter {
            why: "not retryable",
            queue: "tasks",
            exchange: "ex",
            routing_key: "tasks",
            handler: "summarize",
        };
        let headers = failure_headers(None, &failure, 0, "t", Some(&dead));
        assert_eq!(text(&headers, h::ORIGINAL_QUEUE).as_deref(), Some("tasks"));
        assert_eq!(text(&headers, h::ORIGINAL_EXCHANGE).as_deref(), Some("ex"));
        assert_eq!(
            text(&headers, h::ORIGINAL_ROUTING_KEY).as_deref(),
            Some("tasks")
        );
        assert_eq!(text(&headers, h::HANDLER).as_deref(), Some("summarize"));
        assert_eq!(
            text(&headers, h::ERROR_KIND).as_deref(),
            Some("handler_rejected")
        );
        let reason = text(&headers, h::DEATH_REASON).unwrap_or_default();
        assert!(reason.starts_with("not retryable: xxx"), "{reason}");
        let last = text(&headers, h::LAST_ERROR).unwrap_or_default();
        assert!(
            last.len() <= MAX_REASON_BYTES,
            "the reason is bounded: {}",
            last.len()
        );
    }
}

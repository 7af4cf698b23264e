//! Settlement of a [`Worker`]'s deliveries: the confirmed result, then exactly one of ack,
//! retry copy, dead letter, suspect copy or hand back, with the failure headers.

use std::time::{Duration, SystemTime};

use lapin::{BasicProperties, message::Delivery, types::FieldTable};
use tracing::{debug, error, warn};

use crate::{
    amqp,
    engine::acks::{How, Settler},
    engine::redelivery::{self, WORKER_LOST},
    error::PublishError,
    handler::{FailureAction, HandlerError},
    headers::{DeadLetter, RetryCount, failure_headers},
    health::Counter,
    publisher::Publisher,
    retry::{self, Decision},
    topology,
};

use super::{pipeline::Reply, worker::Worker};

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
        let previous = crate::headers::retry_count(delivery.properties.headers().as_ref());
        if let RetryCount::Count(n) = previous {
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
                    RetryCount::Count(n) => n,
                    RetryCount::Malformed => 0,
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

    /// The headers of a retry or dead-letter copy of `delivery` (`headers::failure_headers`).
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

//! Confirmed, mandatory publishing over a few confirm channels ("lanes"), in batches.
//!
//! Each lane is a task that owns one confirm channel. Publish requests wait in one queue; an
//! idle lane takes every request waiting (up to [`LANE_BATCH`]), publishes them back to back
//! (lapin writes them together), waits for all their confirms (the broker answers a batch with
//! few `multiple` acks), then reports every outcome; requests that arrive meanwhile go to the
//! next idle lane. A publish thus never waits for another's confirms while a lane is idle, and
//! under load each batch holds consecutive requests, so the confirms, and the input acks that
//! follow them, come back close to delivery order (which lets the consumer side ack in
//! `multiple` runs; one queue per lane, filled in turn, scattered them: 40 % more broker work
//! per result). These lapin 4 and broker behaviours shape this:
//!
//! - lapin numbers a publish and queues its frames in one step, but two tasks publishing on
//!   one channel from two threads can interleave those steps, so the broker's numbering and
//!   lapin's differ and an ack or nack lands on the wrong publish. A lane is the only
//!   publisher on its channel.
//! - lapin hands each `basic.return` to whichever confirm it completes next (a `multiple` ack
//!   completes several, in no set order), so a returned message can ride on another publish's
//!   confirm. The broker sends a message's return before its ack, so once every confirm of a
//!   batch is in, every return of the batch has been seen; the lane matches each one to its
//!   own publish by content (exchange, routing key, properties, body; oldest first).
//! - lapin fails every pending confirm of a channel the broker closes, and the broker closes
//!   a lane's channel for one publish to an exchange that does not exist (a 404, e.g. a
//!   deleted result exchange). The broker handles a channel's publishes in order and discards
//!   all that follow the refused one, but those before it were routed and only their confirms
//!   are lost. So a lane writes a batch's publishes to named exchanges first and those to the
//!   default exchange (retry, dead-letter and suspect copies, `reply_to` results) last: the
//!   default exchange always exists, so after a 404 the default-exchange publishes that failed
//!   with the channel were discarded, never routed, and the lane sends them again on a fresh
//!   channel; only the named-exchange publishes that got no confirm fail, with
//!   [`PublishError::ExchangeNotFound`] (the engine publishes such a result again for up to
//!   `result_publish_retry`; one that was routed before the refused one is then a
//!   duplicate). A handler whose result
//!   exchange is missing thus costs the other handlers nothing, and no retry or dead-letter
//!   copy the broker kept is reported failed for another publish's 404 (which would also
//!   requeue its original). (Issue 14, A4.)
//! - lapin answered a broker's `channel.close` with `close-ok` ahead of publish frames still
//!   queued for that channel, which then reached the broker on a closed channel and it closed
//!   the whole connection; the patched lapin (`patches/lapin-4.12.3/PATCHED.md`) drops them.
//!   A lane also waits for its batch's confirms with nothing of its queued. (Pipelining
//!   publishes without batches measured ~25 % less consumer CPU in S2, but reset every
//!   consumer's connection in one F14 run out of two, before that patch.)

use std::{future::Future, sync::Arc, task::Poll, time::Duration};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error};

use crate::{amqp::short, error::PublishError};

/// Confirm channels (lanes) per connection. A publish goes to an idle lane, so at low
/// concurrency it waits for no one else's confirms.
pub const DEFAULT_PUBLISH_CHANNELS: usize = 4;

/// The most publishes a lane sends before waiting for their confirms.
pub(crate) const LANE_BATCH: usize = 256;

/// Publish requests waiting for a lane.
const QUEUE: usize = 1024;

/// Publishes with publisher confirms and `mandatory` (except to a direct reply-to requester,
/// whose replies the broker returns even when it delivers them); a message counts as published only when the broker acked it and
/// did not return it.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    requests: mpsc::Sender<Request>,
    closing: CancellationToken,
    /// The lanes' tasks; [`Publisher::close`] waits for them.
    lanes: TaskTracker,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Opens `channels` confirm channels on `connection`, each driven by its own task (a
    /// channel that fails is reopened on the next publish).
    ///
    /// # Errors
    /// A channel cannot be opened or put in confirm mode.
    pub async fn open(
        connection: &Arc<Connection>,
        confirm_timeout: Duration,
        channels: usize,
    ) -> Result<Self, lapin::Error> {
        let closing = CancellationToken::new();
        let (requests, receiver) = mpsc::channel(QUEUE);
        let queue = Arc::new(Queue {
            receiver: tokio::sync::Mutex::new(receiver),
        });
        let lanes = TaskTracker::new();
        for _ in 0..channels.max(1) {
            let channel = open_confirm_channel(connection).await?;
            let lane = Lane {
                connection: Arc::clone(connection),
                channel: Some(channel),
                confirm_timeout,
            };
            lanes.spawn(lane.run(Arc::clone(&queue), closing.clone()));
        }
        lanes.close();
        Ok(Self {
            inner: Arc::new(Inner {
                requests,
                closing,
                lanes,
                confirm_timeout,
            }),
        })
    }

    /// Publishes `body` and waits for the broker's confirm.
    ///
    /// # Errors
    /// The message was returned as unroutable, nacked, not confirmed within the confirm
    /// timeout, or the channel failed, or the publisher is closed.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let inner = &self.inner;
        let (reply, outcome) = oneshot::channel();
        let request = Request {
            exchange: short(exchange),
            routing_key: short(routing_key),
            body,
            properties,
            reply,
        };
        let outcome = if inner.requests.send(request).await.is_ok() {
            outcome.await.unwrap_or(Outcome::Closed)
        } else {
            Outcome::Closed
        };
        let (exchange, routing_key) = (exchange.to_owned(), routing_key.to_owned());
        Err(match outcome {
            Outcome::Confirmed => return Ok(()),
            Outcome::Returned {
                reply_code,
                reply_text,
            } => PublishError::Unroutable {
                exchange,
                routing_key,
                reply_code,
                reply_text,
            },
            Outcome::Nacked => PublishError::Nacked {
                exchange,
                routing_key,
            },
            Outcome::TimedOut => PublishError::ConfirmTimeout {
                exchange,
                routing_key,
                after: inner.confirm_timeout,
            },
            Outcome::Failed(source) if is_missing_exchange(&source) => {
                PublishError::ExchangeNotFound {
                    exchange,
                    routing_key,
                    source,
                }
            }
            Outcome::Failed(source) => PublishError::Channel {
                exchange,
                routing_key,
                source,
            },
            Outcome::Closed => PublishError::Closed {
                exchange,
                routing_key,
            },
        })
    }

    /// Stops taking publishes, waits for the confirms of those already taken (each at most the
    /// confirm timeout), and closes the channels.
    pub async fn close(&self) {
        self.inner.closing.cancel();
        self.inner.lanes.wait().await;
    }
}

async fn open_confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The requests waiting for a lane. The idle lane that holds the lock waits for the next
/// request and takes it with all that queued behind it; the other idle lanes wait for the lock.
struct Queue {
    receiver: tokio::sync::Mutex<mpsc::Receiver<Request>>,
}

/// A message to publish and where to report its outcome.
struct Request {
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
    reply: oneshot::Sender<Outcome>,
}

/// What became of one publish.
#[derive(Debug)]
enum Outcome {
    Confirmed,
    Returned { reply_code: u16, reply_text: String },
    Nacked,
    TimedOut,
    Failed(lapin::Error),
    Closed,
}

impl Outcome {
    /// Whether the publish failed because the broker closed the channel with 404 NOT_FOUND.
    fn is_missing_exchange(&self) -> bool {
        matches!(self, Self::Failed(error) if is_missing_exchange(error))
    }
}

/// Whether the broker closed the channel with 404 NOT_FOUND, which on a lane's channel (it
/// only publishes) means a publish to a missing exchange.
fn is_missing_exchange(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if matches!(
                e.kind(),
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
            )
    )
}

/// How the broker answered a publish (its return, if any, is attributed separately).
enum Done {
    Acked,
    Nacked,
    Failed(lapin::Error),
    TimedOut,
}

/// One confirm channel, published to in batches.
struct Lane {
    connection: Arc<Connection>,
    channel: Option<Channel>,
    confirm_timeout: Duration,
}

impl Lane {
    async fn run(mut self, queue: Arc<Queue>, closing: CancellationToken) {
        let mut stopping = false;
        let mut batch = Vec::with_capacity(LANE_BATCH);
        loop {
            {
                let mut requests = queue.receiver.lock().await;
                let first = tokio::select! {
                    biased;
                    () = closing.cancelled(), if !stopping => {
                        // Requests already queued are still sent; `recv` then ends.
                        stopping = true;
                        requests.close();
                        continue;
                    }
                    request = requests.recv() => request,
                };
                let Some(first) = first else {
                    break;
                };
                batch.push(first);
                while batch.len() < LANE_BATCH {
                    match requests.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
            }
            let outcomes = self.send(&mut batch).await;
            for (request, outcome) in batch.drain(..).zip(outcomes) {
                let _ = request.reply.send(outcome);
            }
        }
        if let Some(channel) = self.channel.take()
            && channel.status().connected()
        {
            let _ = channel.close(200, "bye".into()).await;
        }
    }

    /// Publishes a batch, waits for every confirm, and returns the outcomes in the order the
    /// batch is left in: publishes to a named exchange first, then those to the default
    /// exchange (each group in its own order).
    ///
    /// The default exchange always exists, so only a publish to a named exchange can make the
    /// broker close the channel with a 404 (the exchange is missing). The broker handles a
    /// channel's publishes in order and discards whatever follows the one it refused, so the
    /// default-exchange publishes, all behind the named ones, never reached a queue: they are
    /// sent again on a fresh channel instead of failing with the batch. (A named-exchange
    /// publish that was not confirmed may have been routed before the refused one: it fails,
    /// and its caller's retry may duplicate it.)
    ///
    /// Every wait on the broker (opening the channel, writing, confirming) ends by the confirm
    /// timeout, so a lane never hangs on a connection that died under it.
    async fn send(&mut self, batch: &mut [Request]) -> Vec<Outcome> {
        let deadline = Instant::now() + self.confirm_timeout;
        named_exchanges_first(batch);
        let all: Vec<&Request> = batch.iter().collect();
        let mut outcomes = self.attempt(&all, deadline).await;
        // The 404 came from a named-exchange publish (the only kind that can cause one).
        let refused = batch
            .iter()
            .any(|request| !request.exchange.as_str().is_empty())
            && outcomes.iter().any(Outcome::is_missing_exchange);
        if !refused {
            return outcomes;
        }
        let dropped: Vec<(usize, &Request)> = batch
            .iter()
            .zip(&outcomes)
            .enumerate()
            .filter(|(_, (request, outcome))| {
                request.exchange.as_str().is_empty() && matches!(outcome, Outcome::Failed(_))
            })
            .map(|(index, (request, _))| (index, request))
            .collect();
        if dropped.is_empty() {
            return outcomes;
        }
        debug!(
            dropped = dropped.len(),
            "a publish to a missing exchange closed the lane's channel; sending the publishes the broker discarded after it again"
        );
        let again: Vec<&Request> = dropped.iter().map(|(_, request)| *request).collect();
        let retried = self.attempt(&again, deadline).await;
        for ((index, _), outcome) in dropped.into_iter().zip(retried) {
            if let Some(slot) = outcomes.get_mut(index) {
                *slot = outcome;
            }
        }
        outcomes
    }

    /// Publishes `batch` back to back on the lane's channel (opened first if need be), waits
    /// for every confirm until `deadline`, and returns the outcomes in order.
    async fn attempt(&mut self, batch: &[&Request], deadline: Instant) -> Vec<Outcome> {
        let channel = match self.channel.take() {
            Some(channel) if channel.status().connected() => channel,
            _ => match tokio::time::timeout_at(deadline, open_confirm_channel(&self.connection))
                .await
            {
                Ok(Ok(channel)) => channel,
                Ok(Err(error)) => {
                    return batch
                        .iter()
                        .map(|_| Outcome::Failed(error.clone()))
                        .collect();
                }
                Err(_) => return batch.iter().map(|_| Outcome::TimedOut).collect(),
            },
        };
        // The first poll of each publish numbers it and queues its frames, so the batch is
        // queued whole (in order) before lapin writes any of it.
        let mut writes = Vec::with_capacity(batch.len());
        for request in batch {
            let options = BasicPublishOptions {
                mandatory: !is_direct_reply_to(
                    request.exchange.as_str(),
                    request.routing_key.as_str(),
                ),
                ..BasicPublishOptions::default()
            };
            let mut write = Box::pin(channel.basic_publish(
                request.exchange.clone(),
                request.routing_key.clone(),
                options,
                &request.body,
                request.properties.clone(),
            ));
            let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
            writes.push((write, first));
        }
        let mut confirms = Vec::with_capacity(batch.len());
        for (write, first) in writes {
            confirms.push(match first {
                Poll::Ready(written) => Some(written),
                Poll::Pending => tokio::time::timeout_at(deadline, write).await.ok(),
            });
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut returned = Vec::new();
        for confirm in confirms {
            answers.push(match confirm {
                Some(Ok(confirm)) => match tokio::time::timeout_at(deadline, confirm).await {
                    Ok(answer) => settle(answer, &mut returned),
                    Err(_) => Done::TimedOut,
                },
                Some(Err(error)) => Done::Failed(error),
                None => Done::TimedOut,
            });
        }
        // A confirm that never came could still bring a late return, and a nack may come from
        // the channel's stale view of a quorum queue whose leader died (RabbitMQ 3.10 keeps
        // nacking such a channel's publishes long after a new leader took over; a new channel
        // finds the new leader): such a channel is not reused (dropping the last handle closes
        // it).
        if !answers
            .iter()
            .any(|answer| matches!(answer, Done::TimedOut | Done::Nacked))
        {
            self.channel = Some(channel);
        }
        let mut marks: Vec<Option<(u16, String)>> = vec![None; batch.len()];
        for message in returned {
            attribute(batch, &mut marks, &message);
        }
        answers
            .into_iter()
            .zip(marks)
            .map(|(answer, mark)| match (mark, answer) {
                (Some((reply_code, reply_text)), _) => Outcome::Returned {
                    reply_code,
                    reply_text,
                },
                (None, Done::Acked) => Outcome::Confirmed,
                (None, Done::Nacked) => Outcome::Nacked,
                (None, Done::Failed(error)) => Outcome::Failed(error),
                (None, Done::TimedOut) => Outcome::TimedOut,
            })
            .collect()
    }
}

/// Puts the publishes to named exchanges (which may not exist) before those to the default
/// exchange (which always does), keeping each group's order: one caller's publishes keep
/// theirs.
fn named_exchanges_first(batch: &mut [Request]) {
    batch.sort_by_key(|request| request.exchange.as_str().is_empty());
}

/// The prefix of RabbitMQ's direct reply-to pseudo-queue names (`amq.rabbitmq.reply-to`, and
/// the `amq.rabbitmq.reply-to.<token>` a requester's `reply_to` turns into).
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Whether a publish goes to a direct reply-to requester. Such a publish is not `mandatory`:
/// the broker delivers it to the requester's channel but also returns a mandatory publish as
/// unroutable (RabbitMQ 3.10 and 4.0 alike: no queue is involved), and when the requester has
/// gone it drops the message, which is all a reply to nobody can become.
fn is_direct_reply_to(exchange: &str, routing_key: &str) -> bool {
    exchange.is_empty() && routing_key.starts_with(DIRECT_REPLY_TO)
}

/// Marks the oldest publish of the batch this returned message is a copy of.
fn attribute(
    batch: &[&Request],
    marks: &mut [Option<(u16, String)>],
    message: &BasicReturnMessage,
) {
    let returned = &message.delivery;
    let same_route = |(request, mark): &(&&Request, &mut Option<(u16, String)>)| {
        mark.is_none()
            && request.exchange == returned.exchange
            && request.routing_key == returned.routing_key
            && request.body == returned.data
    };
    // The broker may rewrite properties; the oldest copy with the same route and body is
    // then the best match (marking the wrong one of two such copies costs a retry, never a
    // loss: both were routed alike).
    let exact = batch
        .iter()
        .zip(marks.iter_mut())
        .position(|pair| same_route(&pair) && pair.0.properties == returned.properties);
    let position = exact.or_else(|| {
        batch
            .iter()
            .zip(marks.iter_mut())
            .position(|pair| same_route(&pair))
    });
    match position.and_then(|position| marks.get_mut(position)) {
        Some(mark) => *mark = Some((message.reply_code, message.reply_text.to_string())),
        None => error!(
            exchange = %returned.exchange,
            routing_key = %returned.routing_key,
            "the broker returned a message that matches no publish of its batch"
        ),
    }
}

/// The state a completed confirm leaves, keeping any returned message it carried.
fn settle(result: lapin::Result<Confirmation>, returned: &mut Vec<BasicReturnMessage>) -> Done {
    match result {
        Ok(Confirmation::Ack(message)) => {
            returned.extend(message);
            Done::Acked
        }
        Ok(Confirmation::NotRequested) => Done::Acked,
        Ok(Confirmation::Nack(message)) => {
            returned.extend(message);
            Done::Nacked
        }
        Err(error) => Done::Failed(error),
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

    use super::*;

    fn request(exchange: &str, routing_key: &str) -> Request {
        Request {
            exchange: short(exchange),
            routing_key: short(routing_key),
            body: Vec::new(),
            properties: BasicProperties::default(),
            reply: oneshot::channel().0,
        }
    }

    fn closed_with(code: AMQPSoftError) -> Outcome {
        let error = AMQPError::new(AMQPErrorKind::Soft(code), "closed".into());
        Outcome::Failed(lapin::ErrorKind::ProtocolError(error).into())
    }

    #[test]
    fn named_exchange_publishes_go_first_each_group_in_order() {
        let mut batch = vec![
            request("", "retry.1"),
            request("results", "a.1"),
            request("", "reply.1"),
            request("other", "b.1"),
            request("results", "a.2"),
            request("", "retry.2"),
        ];
        named_exchanges_first(&mut batch);
        let order: Vec<_> = batch
            .iter()
            .map(|r| (r.exchange.as_str(), r.routing_key.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("results", "a.1"),
                ("other", "b.1"),
                ("results", "a.2"),
                ("", "retry.1"),
                ("", "reply.1"),
                ("", "retry.2"),
            ]
        );
    }

    #[test]
    fn only_a_404_channel_close_counts_as_a_missing_exchange() {
        assert!(closed_with(AMQPSoftError::NOTFOUND).is_missing_exchange());
        assert!(!closed_with(AMQPSoftError::PRECONDITIONFAILED).is_missing_exchange());
        assert!(!closed_with(AMQPSoftError::ACCESSREFUSED).is_missing_exchange());
        assert!(!Outcome::Nacked.is_missing_exchange());
        assert!(!Outcome::TimedOut.is_missing_exchange());
        let lost = lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "gone");
        assert!(!Outcome::Failed(lost.into()).is_missing_exchange());
    }
}

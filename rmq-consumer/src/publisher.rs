//! Confirmed, mandatory publishing over a few pipelined confirm channels ("lanes").
//!
//! Each lane is a task that owns one confirm channel and keeps many publishes in flight on it,
//! so the broker can confirm them in batches (`multiple` acks). Two lapin 4 behaviours shape
//! the lane:
//!
//! - lapin numbers a publish and queues its frames in one step, but two tasks publishing on
//!   one channel from two threads can interleave those steps, so the broker's numbering (wire
//!   order) and lapin's can differ and an ack or nack lands on the wrong publish. A lane is
//!   the only publisher on its channel and publishes one message at a time.
//! - lapin hands each `basic.return` to whichever confirm it completes next (a `multiple` ack
//!   completes several, in no set order), so a returned message can ride on another publish's
//!   confirm. A lane does not trust that pairing: whenever its oldest confirm completes, it
//!   looks at every confirm that has completed so far, matches each returned message to its own
//!   publish by content (exchange, routing key, properties, body; the oldest match first), and
//!   only then reports outcomes, oldest first. The broker sends a message's return before its
//!   ack, so by the time a publish and every older one are confirmed, its return (if any) has
//!   been seen.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, PublisherConfirm,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::{amqp::short, error::PublishError};

/// Confirm channels (lanes) per connection.
pub const DEFAULT_PUBLISH_CHANNELS: usize = 4;

/// Publishes awaiting their confirm on one lane; more wait in the lane's queue.
const LANE_WINDOW: usize = 256;

/// Publish requests queued for one lane.
const LANE_QUEUE: usize = 256;

/// Publishes with publisher confirms and `mandatory`; a message counts as published only when
/// the broker acked it and did not return it.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    lanes: Vec<mpsc::Sender<Request>>,
    next: AtomicUsize,
    closing: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
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
        let mut lanes = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..channels.max(1) {
            let channel = open_confirm_channel(connection).await?;
            let (sender, receiver) = mpsc::channel(LANE_QUEUE);
            let lane = Lane {
                connection: Arc::clone(connection),
                channel: Some(channel),
                pending: VecDeque::new(),
                confirm_timeout,
            };
            tasks.push(tokio::spawn(lane.run(receiver, closing.clone())));
            lanes.push(sender);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                lanes,
                next: AtomicUsize::new(0),
                closing,
                tasks: Mutex::new(tasks),
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
        let lane = inner.next.fetch_add(1, Ordering::Relaxed) % inner.lanes.len().max(1);
        let (reply, outcome) = oneshot::channel();
        let request = Request {
            exchange: short(exchange),
            routing_key: short(routing_key),
            body,
            properties,
            reply,
        };
        let sent = match inner.lanes.get(lane) {
            Some(lane) => lane.send(request).await.is_ok(),
            None => false,
        };
        let outcome = if sent {
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
        let tasks: Vec<JoinHandle<()>> = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in tasks {
            let _ = task.await;
        }
    }
}

async fn open_confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
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

/// A publish sent on the lane's channel and not yet reported.
struct Pending {
    confirm: Confirm,
    /// The broker returned this message (attributed by content).
    returned: Option<(u16, String)>,
    deadline: Instant,
    request: Request,
}

enum Confirm {
    Waiting(PublisherConfirm),
    Done(Done),
}

/// How the broker answered a publish (its return, if any, is attributed separately).
enum Done {
    Acked,
    Nacked,
    Failed(lapin::Error),
}

/// One confirm channel and the publishes in flight on it, oldest first.
struct Lane {
    connection: Arc<Connection>,
    channel: Option<Channel>,
    pending: VecDeque<Pending>,
    confirm_timeout: Duration,
}

impl Lane {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>, closing: CancellationToken) {
        let mut open = true;
        let mut stopping = false;
        while open || !self.pending.is_empty() {
            let deadline = self.pending.front().map(|pending| pending.deadline);
            let room = open && self.pending.len() < LANE_WINDOW;
            tokio::select! {
                biased;
                result = oldest_confirm(&mut self.pending), if deadline.is_some() => {
                    self.on_oldest_confirmed(result);
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() => self.time_out(),
                () = closing.cancelled(), if !stopping => {
                    // Publishes already queued are still sent; `recv` then ends.
                    stopping = true;
                    requests.close();
                }
                request = requests.recv(), if room => match request {
                    Some(request) => self.publish(request).await,
                    None => open = false,
                },
            }
        }
        if let Some(channel) = self.channel.take()
            && channel.status().connected()
        {
            let _ = channel.close(200, "bye".into()).await;
        }
    }

    async fn publish(&mut self, request: Request) {
        let channel = match self.channel.take() {
            Some(channel) if channel.status().connected() => channel,
            // Publishes still pending on a failed channel are failed by lapin.
            _ => match open_confirm_channel(&self.connection).await {
                Ok(channel) => channel,
                Err(error) => {
                    let _ = request.reply.send(Outcome::Failed(error));
                    return;
                }
            },
        };
        let published = channel
            .basic_publish(
                request.exchange.clone(),
                request.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &request.body,
                request.properties.clone(),
            )
            .await;
        self.channel = Some(channel);
        match published {
            Ok(confirm) => self.pending.push_back(Pending {
                confirm: Confirm::Waiting(confirm),
                returned: None,
                deadline: Instant::now() + self.confirm_timeout,
                request,
            }),
            Err(error) => {
                let _ = request.reply.send(Outcome::Failed(error));
            }
        }
    }

    /// The oldest publish is confirmed: collect every confirm that has completed by now,
    /// attribute the returned messages they carry, and report the confirmed prefix.
    fn on_oldest_confirmed(&mut self, result: lapin::Result<Confirmation>) {
        let mut returned = Vec::new();
        if let Some(oldest) = self.pending.front_mut() {
            oldest.confirm = Confirm::Done(settle(result, &mut returned));
        }
        let mut context = Context::from_waker(Waker::noop());
        for pending in self.pending.iter_mut().skip(1) {
            if let Confirm::Waiting(confirm) = &mut pending.confirm
                && let Poll::Ready(result) = Pin::new(confirm).poll(&mut context)
            {
                pending.confirm = Confirm::Done(settle(result, &mut returned));
            }
        }
        for message in returned {
            self.attribute(message);
        }
        while let Some(pending) = self.pending.pop_front() {
            let done = match pending.confirm {
                Confirm::Done(done) => done,
                Confirm::Waiting(confirm) => {
                    self.pending.push_front(Pending {
                        confirm: Confirm::Waiting(confirm),
                        ..pending
                    });
                    break;
                }
            };
            let outcome = match (pending.returned, done) {
                (Some((reply_code, reply_text)), _) => Outcome::Returned {
                    reply_code,
                    reply_text,
                },
                (None, Done::Acked) => Outcome::Confirmed,
                (None, Done::Nacked) => Outcome::Nacked,
                (None, Done::Failed(error)) => Outcome::Failed(error),
            };
            let _ = pending.request.reply.send(outcome);
        }
    }

    /// Marks the oldest pending publish this returned message is a copy of.
    fn attribute(&mut self, message: BasicReturnMessage) {
        let returned = &message.delivery;
        let same_route = |pending: &Pending| {
            pending.returned.is_none()
                && pending.request.exchange == returned.exchange
                && pending.request.routing_key == returned.routing_key
                && pending.request.body == returned.data
        };
        // The broker may rewrite properties; the oldest copy with the same route and body is
        // then the best match (marking the wrong one of two such copies costs a retry, never
        // a loss: both were routed alike).
        let position = self
            .pending
            .iter()
            .position(|pending| {
                same_route(pending) && pending.request.properties == returned.properties
            })
            .or_else(|| self.pending.iter().position(same_route));
        match position.and_then(|position| self.pending.get_mut(position)) {
            Some(target) => {
                target.returned = Some((message.reply_code, message.reply_text.to_string()));
            }
            None => error!(
                exchange = %returned.exchange,
                routing_key = %returned.routing_key,
                "the broker returned a message that matches no publish in flight"
            ),
        }
    }

    /// The oldest confirm is overdue: the channel is treated as broken. Everything in flight
    /// on it fails (and is retried by its caller); a late confirm or return could still come,
    /// so the channel is not reused.
    fn time_out(&mut self) {
        self.channel = None;
        for pending in self.pending.drain(..) {
            let _ = pending.request.reply.send(Outcome::TimedOut);
        }
    }
}

async fn oldest_confirm(pending: &mut VecDeque<Pending>) -> lapin::Result<Confirmation> {
    match pending.front_mut().map(|pending| &mut pending.confirm) {
        Some(Confirm::Waiting(confirm)) => confirm.await,
        _ => std::future::pending().await,
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

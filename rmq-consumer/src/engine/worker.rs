//! One handler's consumer loop and the per-delivery pipeline: decode, uuid, cache, handler
//! (timeout, panics), confirmed result, then exactly one settlement (ack, retry copy, DLQ).

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, SystemTime},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, error, field, info, info_span, warn};

use crate::{
    amqp::{self, long, short},
    body::not_json,
    cache::{ResultCache, Source},
    engine::acks::{How, Settler},
    engine::redelivery::{self, Abandoned, Verdict, WORKER_LOST},
    engine::settings::Settings,
    error::PublishError,
    handler::{FailureAction, HandlerError, HandlerOutput},
    health::{HandlerStats, Health},
    publisher::Publisher,
    registry::Call,
    retry::{self, Decision},
    topology,
    trace::{TRACEPARENT, TraceParent},
};

/// The longest error text written into a header.
pub(crate) const MAX_REASON_BYTES: usize = 1024;
/// Wait before handing a message back to the broker when a retry or DLQ publish failed, so a
/// broken route cannot turn into a hot loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);
/// The first wait before publishing a nacked result again; it doubles up to
/// [`RESULT_REPUBLISH_MAX_PAUSE`].
const RESULT_REPUBLISH_FIRST_PAUSE: Duration = Duration::from_millis(50);
const RESULT_REPUBLISH_MAX_PAUSE: Duration = Duration::from_secs(2);
/// How long a shutdown waits for the broker to answer a `basic.cancel`.
const CANCEL_WAIT: Duration = Duration::from_secs(1);
/// Wait before re-subscribing a consumer the broker cancelled.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(1);

/// Everything a delivery task needs, shared by all deliveries of one handler.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) settings: Settings,
    pub(crate) exchange: String,
    pub(crate) max_body_size: usize,
    /// Memory the messages in flight may take (`max_in_flight_bytes`).
    pub(crate) memory: crate::body::Budget,
    /// How long a nacked result is published again (`result_publish_retry`).
    pub(crate) result_publish_retry: Duration,
    pub(crate) cache: Option<ResultCache>,
    pub(crate) health: Arc<Health>,
    pub(crate) index: usize,
    pub(crate) semaphore: Arc<Semaphore>,
    /// Signalled by the watchdog to cancel and re-subscribe a stuck consumer.
    pub(crate) resubscribe: tokio::sync::Notify,
    /// Held shared by every delivery at work and alone by a suspect (see
    /// [`redelivery`]): a suspect runs with no other call of this handler beside it.
    pub(crate) alone: tokio::sync::RwLock<()>,
    /// The `frame_max` negotiated on the connection of the latest subscription: copies are
    /// fitted to it.
    pub(crate) frame_max: std::sync::atomic::AtomicUsize,
    /// Deliveries this process gave up on itself (their redelivery is not counted).
    pub(crate) abandoned: std::sync::Mutex<Abandoned>,
}

/// Which of a handler's two consumers a delivery task serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// The work queue: `concurrency` tasks side by side.
    Work,
    /// The suspect queue: one task, each delivery alone.
    Suspect,
}

/// One subscription's channels and consumers.
struct Subscription {
    channel: Channel,
    consumer: lapin::Consumer,
    suspect_channel: Channel,
    suspect_consumer: lapin::Consumer,
}

/// Why a consumer loop returned.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Shutdown was requested; the consumer was cancelled.
    Shutdown,
    /// The connection is gone.
    Lost,
    /// The broker refused this handler's topology: retrying cannot help.
    Fatal(crate::Error),
}

impl Worker {
    fn stats(&self) -> &HandlerStats {
        &self.health.handlers[self.index]
    }

    /// Consumes until shutdown or connection loss; re-subscribes when the broker cancels the
    /// consumer (queue deleted) while the connection lives.
    pub(crate) async fn consume(
        self: Arc<Self>,
        connection: Arc<Connection>,
        publisher: Publisher,
        tracker: TaskTracker,
        lost: CancellationToken,
        shutdown: CancellationToken,
    ) -> Stop {
        let name = &self.settings.name;
        self.frame_max
            .store(crate::hostile::negotiated_frame_max(&connection), Relaxed);
        loop {
            let subscription = match self.subscribe(&connection).await {
                Ok(subscription) => subscription,
                Err(crate::Error::Topology(error)) if error.is_refusal() => {
                    return Stop::Fatal(crate::Error::Topology(error));
                }
                Err(error @ crate::Error::MissingTopology(_)) => return Stop::Fatal(error),
                Err(error) => {
                    warn!(handler = %name, error = %crate::error::chain(&error), "cannot subscribe; reconnecting");
                    lost.cancel();
                    return Stop::Lost;
                }
            };
            let Subscription {
                channel,
                mut consumer,
                suspect_channel,
                mut suspect_consumer,
            } = subscription;
            let channel = Arc::new(channel);
            let suspect_channel = Arc::new(suspect_channel);
            // Shared by the deliveries through an `Arc` (a token's own clone takes a lock).
            let delivery_lost = Arc::new(lost.clone());
            // Deliveries settle through it, and it keeps the channel open until the last of
            // them is settled (the delivery tasks drop their handles when this subscription
            // ends).
            let acked = Arc::clone(&self);
            let settler = Settler::spawn(
                Arc::clone(&channel),
                Arc::clone(&delivery_lost),
                &tracker,
                Box::new(move |sent| acked.acked(sent)),
            );
            // `concurrency` tasks take the deliveries from one queue, each running one to its
            // end and then taking the next, already there (the `basic.qos` read-ahead): no
            // task hop between a delivery's end and the next one's start. More tasks than
            // `basic.qos` would never get a delivery.
            let window = usize::from(self.settings.qos).max(1);
            let (queue, deliveries) = async_channel::bounded(window);
            let stop = CancellationToken::new();
            for _ in 0..self.settings.slots() {
                tracker.spawn(Arc::clone(&self).serve(
                    Lane::Work,
                    deliveries.clone(),
                    publisher.clone(),
                    settler.clone(),
                    Arc::clone(&delivery_lost),
                    stop.clone(),
                ));
            }
            drop(settler);
            // The suspect queue: `basic.qos` 1, one task, each delivery alone.
            let acked = Arc::clone(&self);
            let suspect_settler = Settler::spawn(
                Arc::clone(&suspect_channel),
                Arc::clone(&delivery_lost),
                &tracker,
                Box::new(move |sent| acked.acked(sent)),
            );
            let (suspect_queue, suspects) = async_channel::bounded(1);
            tracker.spawn(Arc::clone(&self).serve(
                Lane::Suspect,
                suspects.clone(),
                publisher.clone(),
                suspect_settler,
                Arc::clone(&delivery_lost),
                stop.clone(),
            ));
            self.stats().consuming.store(true, Relaxed);
            self.stats().subscribed(self.health.now_ms());
            info!(handler = %name, queue = %self.settings.queue, prefetch = self.settings.prefetch,
                basic_qos = self.settings.qos, concurrency = self.settings.concurrency, "consuming");
            let ended = loop {
                let (next, to) = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break Some(Stop::Shutdown),
                    () = lost.cancelled() => break Some(Stop::Lost),
                    () = self.resubscribe.notified() => break None,
                    next = consumer.next() => (next, &queue),
                    next = suspect_consumer.next() => (next, &suspect_queue),
                };
                match next {
                    // Never full: the broker sends at most `basic.qos` unsettled deliveries.
                    Some(Ok(delivery)) => {
                        if to.send(delivery).await.is_err() {
                            break Some(Stop::Lost);
                        }
                    }
                    Some(Err(error)) => {
                        warn!(handler = %name, error = %error, "consumer error");
                    }
                    None => break None,
                }
            };
            // The delivery tasks finish the deliveries they hold and take no more; the ones
            // still queued are dropped unsettled, and the broker requeues them when the
            // channel closes.
            stop.cancel();
            drop((queue, suspect_queue));
            // Their redeliveries are this process's doing: not counted against the tasks.
            for unstarted in [deliveries, suspects] {
                while let Ok(delivery) = unstarted.try_recv() {
                    self.abandon(&delivery);
                }
            }
            self.stats().consuming.store(false, Relaxed);
            match ended {
                Some(Stop::Shutdown) => {
                    for (channel, consumer) in
                        [(&channel, &consumer), (&suspect_channel, &suspect_consumer)]
                    {
                        // Bounded: a connection the broker blocks (a resource alarm) sends
                        // nothing, and the drain must not wait for the alarm to clear.
                        let cancel = tokio::time::timeout(
                            CANCEL_WAIT,
                            channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
                        )
                        .await;
                        match cancel {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => {
                                debug!(handler = %name, error = %error, "basic.cancel failed");
                            }
                            Err(_) => {
                                debug!(handler = %name, "basic.cancel not answered in time");
                            }
                        }
                    }
                    info!(handler = %name, "consumer cancelled; draining in-flight deliveries");
                    return Stop::Shutdown;
                }
                Some(_) => return Stop::Lost,
                None if shutdown.is_cancelled() => return Stop::Shutdown,
                None if !connection.status().connected() || lost.is_cancelled() => {
                    lost.cancel();
                    return Stop::Lost;
                }
                None => {
                    warn!(handler = %name, queue = %self.settings.queue,
                        "consumer ended (cancelled by the broker, e.g. queue deleted, or by the watchdog); re-declaring and re-subscribing");
                    for (channel, consumer) in
                        [(&channel, &consumer), (&suspect_channel, &suspect_consumer)]
                    {
                        if channel.status().connected() {
                            let _ = channel
                                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                                .await;
                        }
                    }
                    tokio::select! {
                        () = tokio::time::sleep(RESUBSCRIBE_PAUSE) => {}
                        () = shutdown.cancelled() => return Stop::Shutdown,
                        () = lost.cancelled() => return Stop::Lost,
                    }
                }
            }
        }
    }

    /// The `frame_max` every copy must fit.
    fn frame_max(&self) -> usize {
        self.frame_max.load(Relaxed)
    }

    /// Declares the handler's topology (with `declare = false`: checks that it exists) and
    /// consumes its work queue (`basic.qos` as set) and
    /// its suspect queue (`basic.qos` 1), each on a channel of its own: a channel's acks run
    /// in delivery-tag order of one consumer (see the settler).
    async fn subscribe(&self, connection: &Connection) -> Result<Subscription, crate::Error> {
        if self.settings.declare {
            topology::declare_handler(connection, &self.exchange, &self.settings).await?;
        } else {
            topology::check(connection, &self.exchange, &[&self.settings]).await?;
        }
        let (channel, consumer) = self
            .consume_queue(connection, &self.settings.queue, self.settings.qos)
            .await?;
        let (suspect_channel, suspect_consumer) = self
            .consume_queue(connection, &self.settings.suspect_queue(), 1)
            .await?;
        Ok(Subscription {
            channel,
            consumer,
            suspect_channel,
            suspect_consumer,
        })
    }

    async fn consume_queue(
        &self,
        connection: &Connection,
        queue: &str,
        qos: u16,
    ) -> Result<(Channel, lapin::Consumer), crate::Error> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| topology_error("open a channel for", queue, source))?;
        channel
            .basic_qos(qos, BasicQosOptions::default())
            .await
            .map_err(|source| topology_error("set basic.qos on queue", queue, source))?;
        let consumer = channel
            .basic_consume(
                short(queue),
                short(&format!("{}.{}", self.settings.name, std::process::id())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| topology_error("consume from queue", queue, source))?;
        Ok((channel, consumer))
    }

    /// Remembers a delivery this process gives up on: its redelivery is not counted.
    fn abandon(&self, delivery: &Delivery) {
        self.abandon_print(redelivery::fingerprint(delivery));
    }

    fn abandon_print(&self, print: u64) {
        self.abandoned_set().remember(print);
    }

    fn abandoned_set(&self) -> std::sync::MutexGuard<'_, Abandoned> {
        self.abandoned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One of the handler's `concurrency` delivery tasks for one subscription: takes the next
    /// delivery from the queue and runs it to its settlement, until the subscription `stop`s
    /// (or the queue closes). It holds one of the handler's permits while it lives, so a new
    /// subscription's tasks never run more deliveries at once than `concurrency` beside the
    /// old one's last ones.
    ///
    /// The suspect lane's one task takes no permit (it runs alone instead: every delivery of
    /// the work lane holds [`Worker::alone`] shared, a suspect holds it exclusively).
    async fn serve(
        self: Arc<Self>,
        lane: Lane,
        deliveries: async_channel::Receiver<Delivery>,
        publisher: Publisher,
        settler: Settler,
        lost: Arc<CancellationToken>,
        stop: CancellationToken,
    ) {
        let _permit = match lane {
            Lane::Suspect => None,
            Lane::Work => {
                let permit = tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    permit = Arc::clone(&self.semaphore).acquire_owned() => permit,
                };
                let Ok(permit) = permit else {
                    return;
                };
                Some(permit)
            }
        };
        loop {
            // A delivery of a lost connection is not started: the broker redelivers it.
            if stop.is_cancelled() || lost.is_cancelled() {
                return;
            }
            // The next delivery is usually queued already: no wait, no wakeup.
            let delivery = match deliveries.try_recv() {
                Ok(delivery) => delivery,
                Err(async_channel::TryRecvError::Closed) => return,
                Err(async_channel::TryRecvError::Empty) => tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    delivery = deliveries.recv() => match delivery {
                        Ok(delivery) => delivery,
                        Err(_) => return,
                    },
                },
            };
            let overrun = Overrun::default();
            let work = async {
                // Boxed: the pipeline's future is several KiB, and an idle task should not
                // hold one. A panic outside the handler (a bug: handler panics are caught
                // where it runs) costs this delivery, which stays unsettled until its channel
                // closes, not the task and its slot.
                let pipeline =
                    Box::pin(self.process(&publisher, &settler, delivery, &lost, &overrun));
                if AssertUnwindSafe(pipeline).catch_unwind().await.is_err() {
                    error!(handler = %self.settings.name,
                        "the delivery pipeline panicked; the delivery stays unsettled until its channel closes");
                }
            };
            match lane {
                Lane::Work => {
                    let _shared = self.alone.read().await;
                    work.await;
                }
                Lane::Suspect => {
                    let _alone = self.alone.write().await;
                    work.await;
                }
            }
            // A blocking handler that overran `message_timeout` still runs on its thread
            // (threads cannot be cancelled); its message was retried. This slot waits for it
            // before taking another delivery: at most one handler thread per slot, never a
            // pile of them growing by one per overrun until the blocking pool runs out.
            let left = overrun
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(thread) = left {
                warn!(handler = %self.settings.name,
                    "a blocking handler overran message_timeout and cannot be stopped; its slot waits for it to return");
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    _ = thread => {}
                }
            }
        }
    }

    /// Runs one delivery to its settlement. Once the connection it came on is `lost`, its
    /// result and settlement are abandoned: nothing sent on that connection can be confirmed
    /// any more, the broker requeues the delivery, and waiting for a dead connection's
    /// answers would hold the slot (and shutdown) for the confirm timeout or longer. The
    /// handler itself runs to its end (its result may be cached for the redelivery).
    async fn process(
        &self,
        publisher: &Publisher,
        settler: &Settler,
        delivery: Delivery,
        lost: &CancellationToken,
        overrun: &Overrun,
    ) {
        let stats = self.stats();
        stats.received.fetch_add(1, Relaxed);
        stats.in_flight.fetch_add(1, Relaxed);
        let span = info_span!(
            "delivery",
            queue = %self.settings.queue,
            handler = %self.settings.name,
            delivery_tag = delivery.delivery_tag,
            message_id = field::Empty,
            task_uuid = field::Empty,
            trace_id = field::Empty,
            attempt = field::Empty,
        );
        let timestamp = *delivery.properties.timestamp();
        if let Some(id) = delivery.properties.message_id() {
            span.record("message_id", id.as_str());
        }
        async {
            // Hashed once per delivery (~0.1 µs for a 200-byte body): the loss below needs
            // it after the delivery has moved into the settlement.
            let print = redelivery::fingerprint(&delivery);
            let verdict = redelivery::judge(
                delivery.redelivered,
                delivery.properties.headers().as_ref(),
                delivery.redelivered && self.abandoned_set().take(print),
                self.settings.max_redeliveries,
            );
            let handled = match verdict {
                Verdict::Run => Some(self.handle(&delivery, overrun).await),
                Verdict::Suspect { .. } | Verdict::Exhausted { .. } => None,
            };
            let finish = async {
                match (verdict, handled) {
                    (Verdict::Suspect { count }, _) => {
                        self.suspect(publisher, settler, delivery, count).await;
                    }
                    (Verdict::Exhausted { count }, _) => {
                        let mut delivery = delivery;
                        delivery.properties = delivery.properties.clone().with_headers(
                            redelivery::counted(delivery.properties.headers().as_ref(), count),
                        );
                        let failure = HandlerError::with_kind(
                            FailureAction::DeadLetter,
                            WORKER_LOST,
                            format_args!(
                                "{count} deliveries of this task ended unsettled (the worker died or lost its connection while holding it), above max_redeliveries ({})",
                                self.settings.max_redeliveries
                            ),
                        );
                        self.settle(publisher, settler, delivery, Err(failure)).await;
                    }
                    (Verdict::Run, handled) => {
                        let outcome = match handled {
                            Some(Ok(Some(reply))) => {
                                self.publish_reply(publisher, &delivery, reply).await
                            }
                            Some(Ok(None)) | None => Ok(()),
                            Some(Err(failure)) => Err(failure),
                        };
                        self.settle(publisher, settler, delivery, outcome).await;
                    }
                }
            };
            tokio::select! {
                biased;
                () = lost.cancelled() => {
                    stats.stale_acks.fetch_add(1, Relaxed);
                    self.abandon_print(print);
                    debug!("the connection was lost before this delivery was settled; the broker redelivers it");
                }
                () = finish => {}
            }
        }
        .instrument(span)
        .await;
        if let Some(sent) = timestamp {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            #[expect(
                clippy::cast_precision_loss,
                reason = "seconds since 1970 fit an f64 exactly"
            )]
            let sent = sent as f64;
            stats.end_to_end.observe((now - sent).max(0.0));
        }
        stats.in_flight.fetch_sub(1, Relaxed);
        stats.completed(self.health.now_ms());
    }

    /// Decodes and runs the handler; `Ok(Some)` is a result to publish before the ack,
    /// `Ok(None)` means the input may be acked as it is.
    async fn handle(
        &self,
        delivery: &Delivery,
        overrun: &Overrun,
    ) -> Result<Option<Reply>, HandlerError> {
        crate::hostile::check(delivery)?;
        if delivery.data.len() > self.max_body_size {
            return Err(HandlerError::with_kind(
                FailureAction::DeadLetter,
                "body_too_large",
                format_args!(
                    "the body is {} bytes, above max_body_size ({})",
                    delivery.data.len(),
                    self.max_body_size
                ),
            ));
        }
        std::str::from_utf8(&delivery.data).map_err(|error| {
            HandlerError::with_kind(
                FailureAction::DeadLetter,
                "invalid_utf8",
                format_args!("the body is not UTF-8: {error}"),
            )
        })?;
        // What decoding will cost, known without decoding: the message waits for room in the
        // handler's budget, so what senders can make the worker hold is configured, not chosen
        // by them.
        let decoded = crate::body::decoded_cost(&delivery.data).map_err(not_json)?;
        let _reserved = self
            .memory
            .reserve(delivery.data.len(), decoded)
            .await
            .map_err(|over| {
                HandlerError::with_kind(FailureAction::DeadLetter, "body_too_large", over)
            })?;
        let prepare = self.settings.prepare;
        let body = &delivery.data;
        let prepared = std::panic::catch_unwind(move || prepare(body))
            .map_err(|panic| panicked("the task uuid function", &*panic))??;
        let task_uuid = prepared.task_uuid;
        tracing::Span::current().record("task_uuid", task_uuid.as_str());
        let stats = self.stats();
        let timeout = self.settings.timeout;
        let run = || async move {
            stats.handler_runs.fetch_add(1, Relaxed);
            let started = std::time::Instant::now();
            let output = run_call(prepared.call, timeout, overrun).await;
            stats
                .handler_duration
                .observe(started.elapsed().as_secs_f64());
            output
        };
        let output = match &self.cache {
            Some(cache) => {
                let (output, source) = cache.get_or_run(&task_uuid, timeout, run).await;
                if source == Source::Cached {
                    stats.cache_hits.fetch_add(1, Relaxed);
                    debug!("result answered from the cache");
                }
                output
            }
            None => run().await,
        }?;
        let Some(result) = output else {
            return Ok(None);
        };
        if self.reply_route(delivery).is_none() {
            debug!("the handler returned a result but no reply_key is set; nothing published");
            return Ok(None);
        }
        let body = serde_json::to_vec(&result).map_err(|error| {
            HandlerError::with_kind(FailureAction::DeadLetter, "result_not_serializable", error)
        })?;
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(short(&task_uuid))
            .with_timestamp(unix_now());
        let parent = amqp::header_str(delivery.properties.headers().as_ref(), TRACEPARENT)
            .and_then(TraceParent::parse);
        // Continue a trace the request carries; do not start one (a headers table on every
        // result costs the broker more than the rest of the result).
        if let Some(parent) = parent {
            let context = parent.child();
            tracing::Span::current().record("trace_id", context.trace_id.as_str());
            let mut headers = FieldTable::default();
            headers.insert(TRACEPARENT.into(), long(&context.header()));
            properties = properties.with_headers(headers);
        }
        if let Some(correlation_id) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        Ok(Some(Reply { body, properties }))
    }

    /// Where a result goes: the request's `reply_to` (default exchange) when the handler's
    /// `reply_to` policy allows it, else the exchange with the handler's reply key; `None`
    /// when neither applies.
    fn reply_route<'a>(&'a self, delivery: &'a Delivery) -> Option<(&'a str, &'a str)> {
        let reply_to = delivery
            .properties
            .reply_to()
            .as_ref()
            .filter(|reply_to| self.settings.reply_to.allows(reply_to.as_str()));
        match (reply_to, &self.settings.reply_key) {
            (Some(reply_to), _) => Some(("", reply_to.as_str())),
            (None, Some(reply_key)) => Some((self.exchange.as_str(), reply_key.as_str())),
            (None, None) => None,
        }
    }

    /// Publishes the handler's result (confirmed, mandatory) to its route.
    async fn publish_reply(
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
    async fn publish_result(
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
                    stats.results_nacked.fetch_add(1, Relaxed);
                    "the broker nacked the result"
                }
                Err(PublishError::ExchangeNotFound { .. }) => {
                    stats.results_exchange_missing.fetch_add(1, Relaxed);
                    "the result exchange does not exist"
                }
                Err(PublishError::Unroutable { .. }) => {
                    stats.results_returned.fetch_add(1, Relaxed);
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
    async fn settle(
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
                            stats.retried.fetch_add(1, Relaxed);
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
                        stats.rejected.fetch_add(1, Relaxed);
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
                            stats.dead_lettered.fetch_add(1, Relaxed);
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
    async fn publish_copy(
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
    async fn hand_back(
        &self,
        settler: &Settler,
        delivery: &Delivery,
        failure: &HandlerError,
        error: &PublishError,
    ) {
        if error.may_have_been_kept() {
            // The copy may be in its queue too: at-least-once keeps the original (requeued
            // below) rather than risk losing both, at the cost of one more run, counted.
            self.stats().uncertain_copies.fetch_add(1, Relaxed);
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
    async fn suspect(
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
                    self.stats().suspected.fetch_add(1, Relaxed);
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

    async fn ack(&self, settler: &Settler, delivery: &Delivery) -> bool {
        let acked = settler.settle(delivery.delivery_tag, How::Ack).await;
        self.settled(acked)
    }

    /// Hears whether a successful delivery's ack ([`Settler::ack`]) reached a live channel.
    /// Not [`Self::settled`]: this runs in the settler, outside the delivery's span, and on a
    /// connection loss once for every ack still queued, so the loss is named at debug level.
    fn acked(&self, sent: bool) {
        if sent {
            self.stats().succeeded.fetch_add(1, Relaxed);
        } else {
            // The connection or channel loss is logged where it is noticed.
            self.stats().stale_acks.fetch_add(1, Relaxed);
            debug!(handler = %self.settings.name, "an ack could not be sent: the delivery's channel is gone; the broker will redeliver the message");
        }
    }

    /// `false` (and counted) when the settlement could not reach the broker: the delivery's
    /// channel died, and the broker will redeliver the message.
    fn settled(&self, sent: bool) -> bool {
        if !sent {
            self.stats().stale_acks.fetch_add(1, Relaxed);
            warn!("the delivery's channel is gone; the broker will redeliver the message");
        }
        sent
    }

    fn failure_headers(
        &self,
        delivery: &Delivery,
        failure: &HandlerError,
        count: u32,
        dead_letter_reason: Option<&str>,
    ) -> FieldTable {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let reason = amqp::truncate(failure.message(), MAX_REASON_BYTES);
        use crate::headers as h;
        headers.insert(h::RETRY_COUNT.into(), AMQPValue::LongLongInt(count.into()));
        if !headers.contains_key(h::FIRST_FAILURE_AT) {
            headers.insert(h::FIRST_FAILURE_AT.into(), long(&now));
        }
        headers.insert(h::LAST_FAILURE_AT.into(), long(&now));
        headers.insert(h::LAST_ERROR.into(), long(reason));
        headers.insert(h::ERROR_KIND.into(), long(failure.kind()));
        if let Some(why) = dead_letter_reason {
            headers.insert(h::DEATH_REASON.into(), long(&format!("{why}: {reason}")));
            headers.insert(h::ORIGINAL_QUEUE.into(), long(&self.settings.queue));
            headers.insert(
                h::ORIGINAL_EXCHANGE.into(),
                long(delivery.exchange.as_str()),
            );
            headers.insert(
                h::ORIGINAL_ROUTING_KEY.into(),
                long(delivery.routing_key.as_str()),
            );
            headers.insert(h::HANDLER.into(), long(&self.settings.name));
        }
        headers
    }
}

/// A handler's result, serialized, with the properties it is published with.
struct Reply {
    body: Vec<u8>,
    properties: BasicProperties,
}

/// A blocking handler's thread that outlived its `message_timeout`, left for its slot to wait
/// for.
type Overrun = std::sync::Mutex<Option<tokio::task::JoinHandle<HandlerOutput>>>;

/// Runs the handler call under the timeout, turning panics into retryable errors. A blocking
/// call that times out leaves its thread in `overrun`.
async fn run_call(call: Call, timeout: Duration, overrun: &Overrun) -> HandlerOutput {
    let timed_out = || {
        Err(HandlerError::with_kind(
            FailureAction::Retry,
            "timeout",
            format_args!("the handler did not finish within {timeout:?}"),
        ))
    };
    match call {
        Call::Async(call) => {
            let run = AssertUnwindSafe(async move { call().await }).catch_unwind();
            match tokio::time::timeout(timeout, run).await {
                Ok(Ok(output)) => output,
                Ok(Err(panic)) => Err(panicked("the handler", &*panic)),
                Err(_) => timed_out(),
            }
        }
        Call::Blocking(call) => {
            let mut thread = tokio::task::spawn_blocking(call);
            match tokio::time::timeout(timeout, &mut thread).await {
                Ok(Ok(output)) => output,
                Ok(Err(error)) if error.is_panic() => {
                    Err(panicked("the handler", &*error.into_panic()))
                }
                Ok(Err(error)) => Err(HandlerError::with_kind(
                    FailureAction::Retry,
                    "cancelled",
                    error,
                )),
                Err(_) => {
                    *overrun
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(thread);
                    timed_out()
                }
            }
        }
    }
}

fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> HandlerError {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-text panic payload)");
    HandlerError::with_kind(
        FailureAction::Retry,
        "handler_panicked",
        format_args!("{what} panicked: {message}"),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn topology_error(what: &'static str, name: &str, source: lapin::Error) -> crate::Error {
    crate::error::TopologyError {
        what,
        name: name.to_owned(),
        source,
    }
    .into()
}

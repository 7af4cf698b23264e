//! The per-delivery pipeline of a [`Worker`]: the delivery tasks that take deliveries from a
//! subscription (`serve`), and each delivery's run (`process`, `handle`): the worker-lost
//! guard, size, UTF-8 and decoded-size checks, the task uuid, the cache, the handler call
//! under its timeout, and the result to publish.

use std::{panic::AssertUnwindSafe, sync::Arc, time::SystemTime};

use futures_util::FutureExt;
use lapin::{BasicProperties, message::Delivery, types::FieldTable};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, field, info_span, warn};

use crate::{
    amqp::{self, long, short},
    body::not_json,
    cache::Source,
    config::ReplyToPolicy,
    engine::acks::Settler,
    engine::redelivery::{self, Verdict, WORKER_LOST},
    handler::{FailureAction, HandlerError, HandlerOutput},
    health::Counter,
    publisher::Publisher,
    trace::{TRACEPARENT, TraceParent},
};

use super::{
    batch::Batcher,
    call::{Overrun, panicked, run_call},
    worker::Worker,
};

/// Which of a handler's two consumers a delivery task serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// The work queue: `concurrency` tasks side by side.
    Work,
    /// The suspect queue: one task, each delivery alone.
    Suspect,
}

impl Worker {
    /// One of the handler's `concurrency` delivery tasks for one subscription: takes the next
    /// delivery from the queue and runs it to its settlement, until the subscription `stop`s
    /// (or the queue closes). It holds one of the handler's permits while it lives, so a new
    /// subscription's tasks never run more deliveries at once than `concurrency` beside the
    /// old one's last ones.
    ///
    /// The suspect lane's one task takes no permit (it runs alone instead: every delivery of
    /// the work lane holds [`Worker::alone`] shared, a suspect holds it exclusively).
    pub(super) async fn serve(
        self: Arc<Self>,
        lane: Lane,
        Intake {
            deliveries,
            batcher,
        }: Intake,
        publisher: Publisher,
        settler: Settler,
        lost: Arc<CancellationToken>,
        stop: CancellationToken,
    ) {
        let _permit = match lane {
            // A batch handler's permits are taken by its batches, one per call.
            Lane::Suspect => None,
            Lane::Work if batcher.is_some() => None,
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
                let pipeline = Box::pin(self.process(
                    &publisher,
                    &settler,
                    delivery,
                    &lost,
                    &overrun,
                    batcher.as_ref(),
                ));
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
    pub(super) async fn process(
        &self,
        publisher: &Publisher,
        settler: &Settler,
        delivery: Delivery,
        lost: &CancellationToken,
        overrun: &Overrun,
        batcher: Option<&Batcher>,
    ) {
        let stats = self.stats();
        stats.started();
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
                Verdict::Run => Some(self.handle(&delivery, overrun, batcher).await),
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
                    stats.count(Counter::StaleAcks);
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
        stats.finished(self.health.now_ms());
    }

    /// Decodes and runs the handler; `Ok(Some)` is a result to publish before the ack,
    /// `Ok(None)` means the input may be acked as it is. A batch handler's work-lane
    /// deliveries (`batcher`) run in a batch with others; on the suspect lane they run alone,
    /// in a batch of one.
    pub(super) async fn handle(
        &self,
        delivery: &Delivery,
        overrun: &Overrun,
        batcher: Option<&Batcher>,
    ) -> Result<Option<Reply>, HandlerError> {
        let _reserved = self.admit(delivery).await?;
        let (task_uuid, output) = match (batcher, &self.settings.batch) {
            (Some(batcher), Some(batching)) => {
                let prepare = batching.prepare;
                let body = &delivery.data;
                let prepared = std::panic::catch_unwind(move || prepare(body))
                    .map_err(|panic| panicked("the task uuid function", &*panic))??;
                tracing::Span::current().record("task_uuid", prepared.task_uuid.as_str());
                let output = self
                    .cached(&prepared.task_uuid, || {
                        batcher.run(prepared.task_uuid.clone(), prepared.item)
                    })
                    .await;
                (prepared.task_uuid, output)
            }
            _ => {
                let prepare = self.settings.prepare;
                let body = &delivery.data;
                let prepared = std::panic::catch_unwind(move || prepare(body))
                    .map_err(|panic| panicked("the task uuid function", &*panic))??;
                let task_uuid = prepared.task_uuid;
                tracing::Span::current().record("task_uuid", task_uuid.as_str());
                let stats = self.stats();
                let timeout = self.settings.timeout;
                let run = || async move {
                    stats.count(Counter::HandlerRuns);
                    let started = std::time::Instant::now();
                    let output = run_call(prepared.call, timeout, overrun).await;
                    stats
                        .handler_duration
                        .observe(started.elapsed().as_secs_f64());
                    output
                };
                let output = self.cached(&task_uuid, run).await;
                (task_uuid, output)
            }
        };
        self.reply(delivery, &task_uuid, output?)
    }

    /// The checks every delivery passes before it is decoded: hostile frames, size, UTF-8,
    /// and room in the handler's memory budget for its decoded size, reserved until the
    /// returned permit is dropped.
    async fn admit(
        &self,
        delivery: &Delivery,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, HandlerError> {
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
        self.memory
            .reserve(delivery.data.len(), decoded)
            .await
            .map_err(|over| {
                HandlerError::with_kind(FailureAction::DeadLetter, "body_too_large", over)
            })
    }

    /// The task's output: from the result cache when it holds it (or another delivery of the
    /// task is running: its outcome is shared), else from `run`.
    async fn cached<F, Fut>(&self, task_uuid: &str, run: F) -> HandlerOutput
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = HandlerOutput>,
    {
        let Some(cache) = &self.cache else {
            return run().await;
        };
        let (output, source) = cache
            .get_or_run(task_uuid, self.settings.timeout, run)
            .await;
        match source {
            Source::Cached => {
                self.stats().count(Counter::CacheHits);
                debug!("result answered from the cache");
            }
            Source::Stored => {
                self.stats().count(Counter::CacheHits);
                debug!("result answered from the shared result store");
            }
            Source::Ran | Source::SharedFailure => {}
        }
        output
    }

    /// The result to publish for a handler's output, with its properties: `None` when the
    /// handler returned none or there is no route for it.
    fn reply(
        &self,
        delivery: &Delivery,
        task_uuid: &str,
        output: Option<serde_json::Value>,
    ) -> Result<Option<Reply>, HandlerError> {
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
        let (properties, trace_id) = reply_properties(task_uuid, &delivery.properties, unix_now());
        if let Some(trace_id) = trace_id {
            tracing::Span::current().record("trace_id", trace_id.as_str());
        }
        Ok(Some(Reply { body, properties }))
    }

    /// Where a result goes: the request's `reply_to` (default exchange) when the handler's
    /// `reply_to` policy allows it, else the exchange with the handler's reply key; `None`
    /// when neither applies.
    pub(super) fn reply_route<'a>(&'a self, delivery: &'a Delivery) -> Option<(&'a str, &'a str)> {
        reply_route(
            delivery.properties.reply_to().as_ref().map(|r| r.as_str()),
            &self.settings.reply_to,
            self.settings.reply_key.as_deref(),
            &self.exchange,
        )
    }
}

/// Where a result goes: `reply_to` (default exchange) when `policy` allows it, else
/// `exchange` with `reply_key`; `None` when neither applies.
fn reply_route<'a>(
    reply_to: Option<&'a str>,
    policy: &ReplyToPolicy,
    reply_key: Option<&'a str>,
    exchange: &'a str,
) -> Option<(&'a str, &'a str)> {
    match (
        reply_to.filter(|reply_to| policy.allows(reply_to)),
        reply_key,
    ) {
        (Some(reply_to), _) => Some(("", reply_to)),
        (None, Some(reply_key)) => Some((exchange, reply_key)),
        (None, None) => None,
    }
}

/// A result's properties, from its request's: persistent JSON, `message_id` = the task uuid,
/// the request's `correlation_id`, and the request's trace continued (a child
/// `traceparent`, whose trace id is returned too); no trace is started (a headers table on
/// every result costs the broker more than the rest of the result).
fn reply_properties(
    task_uuid: &str,
    request: &BasicProperties,
    now: u64,
) -> (BasicProperties, Option<String>) {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(short(task_uuid))
        .with_timestamp(now);
    let mut trace_id = None;
    let parent =
        amqp::header_str(request.headers().as_ref(), TRACEPARENT).and_then(TraceParent::parse);
    if let Some(parent) = parent {
        let context = parent.child();
        let mut headers = FieldTable::default();
        headers.insert(TRACEPARENT.into(), long(&context.header()));
        properties = properties.with_headers(headers);
        trace_id = Some(context.trace_id);
    }
    if let Some(correlation_id) = request.correlation_id() {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    (properties, trace_id)
}

/// Where a delivery task takes its deliveries from, and where a batch handler's work-lane
/// items go to be run.
#[derive(Debug)]
pub(super) struct Intake {
    pub(super) deliveries: async_channel::Receiver<Delivery>,
    /// A batch handler's batcher (work lane only).
    pub(super) batcher: Option<Batcher>,
}

/// A handler's result, serialized, with the properties it is published with.
pub(super) struct Reply {
    pub(super) body: Vec<u8>,
    pub(super) properties: BasicProperties,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use lapin::types::AMQPValue;

    use super::*;

    #[test]
    fn results_follow_reply_to_only_where_the_policy_allows() {
        let honour = ReplyToPolicy::Honour;
        let rpc = ReplyToPolicy::Prefixes(vec!["rpc.".to_owned()]);
        type Case<'a> = (
            Option<&'a str>,
            &'a ReplyToPolicy,
            Option<&'a str>,
            Option<(&'a str, &'a str)>,
        );
        let cases: [Case<'_>; 7] = [
            (Some("rpc.a"), &honour, Some("done"), Some(("", "rpc.a"))),
            (Some("rpc.a"), &honour, None, Some(("", "rpc.a"))),
            (
                Some("rpc.a"),
                &ReplyToPolicy::Ignore,
                Some("done"),
                Some(("ex", "done")),
            ),
            (Some("rpc.a"), &ReplyToPolicy::Ignore, None, None),
            (Some("rpc.a"), &rpc, Some("done"), Some(("", "rpc.a"))),
            (Some("other"), &rpc, Some("done"), Some(("ex", "done"))),
            (None, &honour, None, None),
        ];
        for (reply_to, policy, reply_key, expected) in cases {
            assert_eq!(
                reply_route(reply_to, policy, reply_key, "ex"),
                expected,
                "{reply_to:?} {policy:?} {reply_key:?}"
            );
        }
    }

    #[test]
    fn a_result_carries_its_requests_ids_and_continues_its_trace() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut headers = FieldTable::default();
        headers.insert(TRACEPARENT.into(), long(parent));
        let request = BasicProperties::default()
            .with_correlation_id("corr-1".into())
            .with_headers(headers);
        let (properties, trace_id) = reply_properties("uuid-1", &request, 42);
        assert_eq!(
            properties.message_id().as_ref().map(|m| m.as_str()),
            Some("uuid-1")
        );
        assert_eq!(
            properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some("corr-1")
        );
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(properties.timestamp(), &Some(42));
        assert_eq!(
            properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(
            trace_id.as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        let child = match properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(TRACEPARENT))
        {
            Some(AMQPValue::LongString(child)) => child.to_string(),
            other => panic!("no traceparent: {other:?}"),
        };
        assert!(
            child.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{child}"
        );
        assert_ne!(child, parent, "a new span id");

        // No trace, no correlation id: none is invented.
        let (properties, trace_id) = reply_properties("u", &BasicProperties::default(), 1);
        assert!(properties.headers().is_none() && properties.correlation_id().is_none());
        assert!(trace_id.is_none());
    }
}

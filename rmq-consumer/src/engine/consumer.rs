//! A handler's subscription loop: subscribe (declare or check the topology, `basic.qos`, the
//! work and suspect consumers), hand deliveries to the delivery tasks (`pipeline.rs`),
//! re-subscribe when the broker or the watchdog cancels the consumer, stop on shutdown or
//! connection loss.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    amqp::short,
    engine::acks::Settler,
    engine::batch::Batcher,
    engine::pipeline::{Intake, Lane},
    engine::worker::Worker,
    publisher::Publisher,
    topology,
};

/// How long a shutdown waits for the broker to answer a `basic.cancel`.
const CANCEL_WAIT: Duration = Duration::from_secs(1);
/// Wait before re-subscribing a consumer the broker cancelled.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(1);

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
    /// Consumes until shutdown or connection loss; re-subscribes when the broker cancels the
    /// consumer (queue deleted) while the connection lives. `lost` (the session's) abandons
    /// what is in flight; `shutdown` drains it: this loop is where a shutdown reaches the
    /// session's tokens, by cancelling its subscription's `stop`.
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
            // The subscription's end (shutdown, re-subscription, or the connection lost: a
            // child of `lost`): its delivery tasks take no more deliveries, its batcher hands
            // over the batch it gathers.
            let stop = lost.child_token();
            // A batch handler's items gather here, one call per batch (`batch.rs`).
            let batcher = self
                .settings
                .batch
                .as_ref()
                .map(|batching| Batcher::spawn(&self, batching, &tracker, stop.clone()));
            for _ in 0..self.settings.slots() {
                tracker.spawn(Arc::clone(&self).serve(
                    Lane::Work,
                    Intake {
                        deliveries: deliveries.clone(),
                        batcher: batcher.clone(),
                    },
                    publisher.clone(),
                    settler.clone(),
                    Arc::clone(&delivery_lost),
                    stop.clone(),
                ));
            }
            drop((settler, batcher));
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
                Intake {
                    deliveries: suspects.clone(),
                    batcher: None,
                },
                publisher.clone(),
                suspect_settler,
                Arc::clone(&delivery_lost),
                stop.clone(),
            ));
            self.stats().set_consuming(Some(self.health.now_ms()));
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
            self.stats().set_consuming(None);
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
}

fn topology_error(what: &'static str, name: &str, source: lapin::Error) -> crate::Error {
    crate::error::TopologyError {
        what,
        name: name.to_owned(),
        source,
    }
    .into()
}

//! The hand-written lapin consumer the framework is measured against.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::FieldTable,
};
use tokio::sync::{Notify, Semaphore};

use crate::{
    error::Res,
    probe::{count_run, finish, io_wait, mark_first, tokio_wait, warn_logs},
    protocol::{READY_LINE, Reply, Report, Spec, Task, Work},
};

/// The consumer channel's `basic.qos` for a prefetch: the framework's default read-ahead
/// (`prefetch / 2`) on top, given to the raw consumer too.
fn qos(prefetch: u16) -> u16 {
    prefetch.saturating_add(prefetch / 2)
}

/// A hand-written lapin consumer, as one would write it without the framework: the same
/// `basic.qos` as the framework's and at most `prefetch` tasks at work at once.
pub(crate) async fn child_raw(spec: &Spec, url: &str) -> Res<Report> {
    if spec.work.framework_only() {
        return Err(format!("the raw consumer does not do {:?}", spec.work).into());
    }
    let _logs = rmq_consumer::logging::init(&warn_logs())?;
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(qos(spec.prefetch), BasicQosOptions::default())
        .await?;
    let slots = Arc::new(Semaphore::new(usize::from(spec.prefetch)));
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            spec.queue.as_str().into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!("{READY_LINE}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.timeout_s);
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(Notify::new());
    let route: Arc<(String, String)> = Arc::new((spec.exchange.clone(), spec.reply_key.clone()));
    let mut received = 0;
    let mut max_in_flight = 0;
    while received < spec.count {
        let Ok(slot) = tokio::time::timeout_at(deadline, Arc::clone(&slots).acquire_owned()).await
        else {
            break;
        };
        let slot = slot?;
        let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => return Err("the raw consumer was cancelled".into()),
            Err(_) => break,
        };
        mark_first();
        received += 1;
        max_in_flight = max_in_flight.max(received - done.load(Ordering::Acquire));
        let settled = Settled {
            done: Arc::clone(&done),
            finished: Arc::clone(&finished),
            count: spec.count,
        };
        match spec.work {
            Work::Request => {
                let publisher = publisher.clone();
                let route = Arc::clone(&route);
                tokio::spawn(async move {
                    match raw_request(&publisher, &route.0, &route.1, &delivery).await {
                        Ok(()) => settled.one(),
                        Err(error) => eprintln!("raw request failed: {error}"),
                    }
                    drop(slot);
                });
            }
            work @ (Work::Drain
            | Work::Sleep
            | Work::TokioSleep
            | Work::Bomb
            | Work::Model
            | Work::Batch { .. }
            | Work::IoRequest) => {
                // Acked from its own task, as the framework does: awaiting each ack in the
                // receive loop measured half the rate at twice the CPU per message here.
                tokio::spawn(async move {
                    match work {
                        Work::Sleep => io_wait().await,
                        Work::TokioSleep => tokio_wait().await,
                        Work::Drain
                        | Work::Request
                        | Work::Bomb
                        | Work::Model
                        | Work::Batch { .. }
                        | Work::IoRequest => {}
                    }
                    match delivery.acker.ack(BasicAckOptions::default()).await {
                        Ok(_) => settled.one(),
                        Err(error) => eprintln!("raw ack failed: {error}"),
                    }
                    drop(slot);
                });
            }
        }
    }
    if done.load(Ordering::Acquire) < spec.count {
        let _ = tokio::time::timeout_at(deadline, finished.notified()).await;
    }
    let report = finish(done.load(Ordering::Acquire), max_in_flight, spec.prefetch)?;
    connection.close(200, "bench done".into()).await?;
    Ok(report)
}

/// Counts settled deliveries and wakes the consumer loop at the last one.
struct Settled {
    done: Arc<AtomicU64>,
    finished: Arc<Notify>,
    count: u64,
}

impl Settled {
    fn one(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.count {
            self.finished.notify_one();
        }
    }
}

/// Decode, publish the result (mandatory, confirmed), then ack the input.
///
/// The usual hand-written shape: every task publishes on one shared confirm channel. It has
/// flaws the framework's publisher avoids (see `rmq_consumer::publisher`): tasks publishing
/// from two threads at once can be numbered out of wire order, and lapin hands a
/// `basic.return` to whichever confirm completes next, so an unroutable result could be taken
/// as delivered. No result is ever returned or nacked here, so it does not show in the numbers.
async fn raw_request(
    publisher: &Channel,
    exchange: &str,
    reply_key: &str,
    delivery: &Delivery,
) -> Res<()> {
    let task: Task = serde_json::from_slice(&delivery.data)?;
    count_run();
    let body = serde_json::to_vec(&Reply::to(&task))?;
    let confirmation = publisher
        .basic_publish(
            exchange.into(),
            reply_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await?
        .await?;
    if !matches!(confirmation, Confirmation::Ack(None)) {
        return Err(format!("result not confirmed: {confirmation:?}").into());
    }
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

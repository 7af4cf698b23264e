//! Batch handlers (`#[consumer(batch = N)]`): the [`Batcher`] gathers a handler's decoded
//! items into batches and runs one handler call per batch; each item's delivery keeps its own
//! task, which waits here for its own output and then publishes, retries, dead-letters and
//! settles exactly as a one-message handler's delivery does.
//!
//! - A batch is handed to the handler when it holds `batch` items or when its first item has
//!   waited `batch_wait`, whichever comes first. When all `concurrency` batches are running
//!   by then, the batch keeps taking items (up to `batch`) until a call is free: the next
//!   batch fills while one runs.
//! - Items that fail before they are decoded (size, UTF-8, JSON, shape, the task uuid) never
//!   reach a batch; nor does an item whose result is in the cache, or whose task is running
//!   already (it shares that run's outcome: the cache's single flight). Without the cache, two
//!   items of one task uuid in a batch run once: the handler sees the first, both get its
//!   output.
//! - A call that fails as a whole (an `Err` for the batch, a panic, a wrong number of outputs,
//!   `message_timeout` overrun, an item of the wrong type) fails every item with the same
//!   error, logged once here; each item is then retried or dead-lettered on its own
//!   `x-retry-count`.
//! - On shutdown the batch being gathered is handed over at once, not after `batch_wait`: its
//!   items' deliveries are already taken, and a drain finishes them. It is closed with every
//!   item already waiting (up to `batch`, `fill_now`): the items taken run in full batches,
//!   not one by one after the first (`tests/tests/batch.rs`,
//!   `on_shutdown_the_items_taken_run_in_full_batches`: 4 + 4 + 1 + 1 + 1 + 1 before).

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, Span, error, info_span};

use crate::{
    handler::{FailureAction, HandlerError, HandlerOutput},
    health::Counter,
    registry::{BatchCall, BatchOutput, Item},
    settings::Batching,
};

use super::{call::panicked, worker::Worker};

/// One item waiting for its batch.
struct Submission {
    task_uuid: String,
    item: Item,
    arrived: Instant,
    /// The item's delivery span, linked from its batch's span.
    span: Span,
    output: oneshot::Sender<HandlerOutput>,
}

/// A handle to one subscription's batcher task: the work lane's delivery tasks hand it their
/// decoded items. The task ends once every handle is dropped and its last batch is handed
/// over.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    items: async_channel::Sender<Submission>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("task_uuid", &self.task_uuid)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the batcher of `worker` (a batch handler) on `tracker`. `stop` hands over the
    /// batch being gathered at once.
    pub(super) fn spawn(
        worker: &Arc<Worker>,
        batching: &Batching,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        // Never more items than deliveries in flight (`basic.qos`): never full for long.
        let (items, queue) = async_channel::bounded(worker.settings.slots().max(1));
        tracker.spawn(gather(
            Arc::clone(worker),
            batching.clone(),
            queue,
            tracker.clone(),
            stop,
        ));
        Self { items }
    }

    /// Runs `item` (task `task_uuid`) in a batch and returns its own output.
    pub(super) async fn run(&self, task_uuid: String, item: Item) -> HandlerOutput {
        let (output, receive) = oneshot::channel();
        let submission = Submission {
            task_uuid,
            item,
            arrived: Instant::now(),
            span: Span::current(),
            output,
        };
        if self.items.send(submission).await.is_err() {
            return Err(dropped());
        }
        receive.await.unwrap_or_else(|_| Err(dropped()))
    }
}

/// The error of an item whose batch ended without an output for it (the batcher stopped).
fn dropped() -> HandlerError {
    HandlerError::with_kind(
        FailureAction::Retry,
        "batch_dropped",
        "the batch this item waited for ended without running it",
    )
}

/// The batcher task: gathers batches and starts a call for each, at most `concurrency` at
/// once (the worker's semaphore).
async fn gather(
    worker: Arc<Worker>,
    batching: Batching,
    queue: async_channel::Receiver<Submission>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let size = batching.size.max(1);
    loop {
        let Ok(first) = queue.recv().await else {
            return;
        };
        let deadline = tokio::time::Instant::from_std(first.arrived) + batching.wait;
        let mut batch = vec![first];
        // Until it is full or its first item has waited `batch_wait`.
        let mut open = true;
        while open && batch.len() < size && !stop.is_cancelled() {
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                next = queue.recv() => match next {
                    Ok(next) => batch.push(next),
                    Err(_) => open = false,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Then until a call is free, still taking items up to `batch`.
        let permit = loop {
            if batch.len() >= size || !open || stop.is_cancelled() {
                match Arc::clone(&worker.semaphore).acquire_owned().await {
                    Ok(permit) => break Some(permit),
                    Err(_) => break None,
                }
            }
            tokio::select! {
                biased;
                permit = Arc::clone(&worker.semaphore).acquire_owned() => break permit.ok(),
                () = stop.cancelled() => {}
                next = queue.recv() => match next {
                    Ok(next) => batch.push(next),
                    Err(_) => open = false,
                },
            }
        };
        let Some(permit) = permit else {
            // The semaphore is never closed; the items' senders drop: each is retried.
            return;
        };
        if stop.is_cancelled() {
            fill_now(&mut batch, &queue, size);
        }
        tracker.spawn(run_batch(
            Arc::clone(&worker),
            batching.clone(),
            batch,
            permit,
        ));
    }
}

/// On shutdown: closes `batch` with the items already waiting (up to `size`) instead of
/// handing it over with the few it holds, so the items taken run in full batches, not one by
/// one after the first.
fn fill_now(batch: &mut Vec<Submission>, queue: &async_channel::Receiver<Submission>, size: usize) {
    while batch.len() < size {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => return,
        }
    }
}

/// Runs one batch: one handler call for its distinct task uuids, each item then getting its
/// task's output.
async fn run_batch(
    worker: Arc<Worker>,
    batching: Batching,
    batch: Vec<Submission>,
    permit: OwnedSemaphorePermit,
) {
    let stats = worker.stats();
    let now = Instant::now();
    let size = batch.len();
    let mut waited_most = Duration::ZERO;
    let span = info_span!(
        "batch",
        handler = %worker.settings.name,
        size,
        tasks = tracing::field::Empty,
        waited_ms = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    );
    let (items, receivers) = distinct(batch, |submission| {
        let waited = now.saturating_duration_since(submission.arrived);
        waited_most = waited_most.max(waited);
        stats.batch_wait.observe(waited.as_secs_f64());
        span.follows_from(submission.span.id());
    });
    span.record("tasks", items.len());
    span.record("waited_ms", waited_most.as_millis());
    stats.count(Counter::Batches);
    stats.add(Counter::BatchItems, u64::try_from(size).unwrap_or(u64::MAX));
    #[expect(
        clippy::cast_precision_loss,
        reason = "a batch size fits an f64 exactly"
    )]
    stats.batch_size.observe(size as f64);
    let count = items.len();
    let started = Instant::now();
    let outputs = async {
        stats.count(Counter::HandlerRuns);
        let outputs = call(&batching, items, worker.settings.timeout, permit).await;
        let took = started.elapsed();
        stats.handler_duration.observe(took.as_secs_f64());
        Span::current().record("duration_ms", took.as_millis());
        match outputs {
            Ok(outputs) if outputs.len() == count => Ok(outputs),
            Ok(outputs) => Err(HandlerError::with_kind(
                FailureAction::Retry,
                "batch_size_mismatch",
                format_args!(
                    "the batch handler returned {} results for {count} items",
                    outputs.len()
                ),
            )),
            Err(failure) => Err(failure),
        }
        .inspect_err(|failure| {
            error!(error = %failure, kind = failure.kind(), size,
                "the batch failed as a whole; each of its items is retried or dead-lettered on its own count");
        })
    }
    .instrument(span)
    .await;
    match outputs {
        Ok(outputs) => {
            for (output, senders) in outputs.into_iter().zip(receivers) {
                deliver(output, senders);
            }
        }
        Err(failure) => {
            for senders in receivers {
                deliver(Err(share_error(&failure)), senders);
            }
        }
    }
}

/// The batch's items with one per task uuid (the first), and for each the senders of every
/// item of its task. `each` sees every submission.
fn distinct(
    batch: Vec<Submission>,
    mut each: impl FnMut(&Submission),
) -> (Vec<Item>, Vec<Vec<oneshot::Sender<HandlerOutput>>>) {
    let mut items = Vec::with_capacity(batch.len());
    let mut senders: Vec<Vec<oneshot::Sender<HandlerOutput>>> = Vec::with_capacity(batch.len());
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(batch.len());
    for submission in batch {
        each(&submission);
        match seen.get(&submission.task_uuid) {
            Some(&index) => {
                if let Some(group) = senders.get_mut(index) {
                    group.push(submission.output);
                }
            }
            None => {
                seen.insert(submission.task_uuid, items.len());
                items.push(submission.item);
                senders.push(vec![submission.output]);
            }
        }
    }
    (items, senders)
}

/// Hands one task's output to each item of it (an item whose delivery was abandoned has no
/// receiver any more).
fn deliver(output: HandlerOutput, senders: Vec<oneshot::Sender<HandlerOutput>>) {
    let mut senders = senders.into_iter().peekable();
    while let Some(sender) = senders.next() {
        if senders.peek().is_some() {
            let _ = sender.send(share(&output));
        } else {
            let _ = sender.send(output);
            return;
        }
    }
}

/// A copy of an output for another item of the same task.
fn share(output: &HandlerOutput) -> HandlerOutput {
    match output {
        Ok(value) => Ok(value.clone()),
        Err(failure) => Err(share_error(failure)),
    }
}

fn share_error(failure: &HandlerError) -> HandlerError {
    HandlerError::with_kind(failure.action(), failure.kind(), failure.message())
}

/// Binds and runs one call under `timeout`, turning panics into retryable errors. A blocking
/// call that overruns keeps `permit` until its thread returns: at most `concurrency` handler
/// threads, never a pile of them.
async fn call(
    batching: &Batching,
    items: Vec<Item>,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) -> BatchOutput {
    let timed_out = || {
        Err(HandlerError::with_kind(
            FailureAction::Retry,
            "timeout",
            format_args!("the batch handler did not finish within {timeout:?}"),
        ))
    };
    let bind = batching.run;
    let bound = std::panic::catch_unwind(AssertUnwindSafe(move || bind(items)))
        .map_err(|panic| panicked("the batch handler", &*panic))??;
    match bound.call {
        BatchCall::Async(future) => {
            let run = AssertUnwindSafe(future).catch_unwind();
            let output = match tokio::time::timeout(timeout, run).await {
                Ok(Ok(output)) => output,
                Ok(Err(panic)) => Err(panicked("the batch handler", &*panic)),
                Err(_) => timed_out(),
            };
            drop(permit);
            output
        }
        BatchCall::Blocking(call) => {
            let mut thread = tokio::task::spawn_blocking(call);
            match tokio::time::timeout(timeout, &mut thread).await {
                Ok(Ok(output)) => output,
                Ok(Err(error)) if error.is_panic() => {
                    Err(panicked("the batch handler", &*error.into_panic()))
                }
                Ok(Err(error)) => Err(HandlerError::with_kind(
                    FailureAction::Retry,
                    "cancelled",
                    error,
                )),
                Err(_) => {
                    // The items are answered now; the call's slot waits for the thread.
                    tokio::spawn(async move {
                        let _ = thread.await;
                        drop(permit);
                    });
                    timed_out()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn submission(uuid: &str, n: u32) -> (Submission, oneshot::Receiver<HandlerOutput>) {
        let (output, receive) = oneshot::channel();
        (
            Submission {
                task_uuid: uuid.to_owned(),
                item: Box::new(n),
                arrived: Instant::now(),
                span: Span::none(),
                output,
            },
            receive,
        )
    }

    #[test]
    fn one_item_per_task_uuid_and_every_item_answered() {
        let (a1, mut r_a1) = submission("a", 1);
        let (b, mut r_b) = submission("b", 2);
        let (a2, mut r_a2) = submission("a", 3);
        let mut seen = 0;
        let (items, senders) = distinct(vec![a1, b, a2], |_| seen += 1);
        assert_eq!(seen, 3);
        let items: Vec<u32> = items
            .into_iter()
            .map(|item| *item.downcast::<u32>().unwrap())
            .collect();
        assert_eq!(items, [1, 2], "the first item of each task, in order");
        assert_eq!(senders.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        let outputs = vec![
            Ok(Some(json!("A"))),
            Err(HandlerError::dead_letter("bad b")),
        ];
        for (output, group) in outputs.into_iter().zip(senders) {
            deliver(output, group);
        }
        assert_eq!(r_a1.try_recv().unwrap().unwrap(), Some(json!("A")));
        assert_eq!(r_a2.try_recv().unwrap().unwrap(), Some(json!("A")));
        let failure = r_b.try_recv().unwrap().unwrap_err();
        assert!(failure.is_dead_letter());
        assert_eq!(failure.kind(), "handler_rejected");
    }

    #[test]
    fn shared_failures_keep_their_action_and_kind() {
        let failure = HandlerError::with_kind(FailureAction::Retry, "timeout", "slow");
        let copy = share_error(&failure);
        assert_eq!(
            (copy.action(), copy.kind(), copy.message()),
            (FailureAction::Retry, "timeout", "slow")
        );
    }
}

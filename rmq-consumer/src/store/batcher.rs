//! Coalescing of concurrent store calls: one queue and one batcher task, which takes every
//! request waiting when it wakes (up to [`BATCH_MAX`]), makes one call for all of them (the
//! store's one round trip for its claims, finishes and releases) and answers each caller
//! through its own oneshot. One batch is on its way at a time, so the requests that arrive
//! meanwhile make the next batch: the busier the store, the fuller the batches (group commit).
//!
//! The batcher holds the store weakly between batches and ends when the store is dropped (its
//! queue's sender goes with it). It never holds a lock across an await.

use std::{
    future::Future,
    sync::{
        Mutex, PoisonError, Weak,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use tokio::sync::{mpsc, oneshot};

use super::{Inner, Store};
use crate::error::StoreError;

/// Requests answered by one call, at most.
pub(super) const BATCH_MAX: usize = 500;

/// One caller's request and where its answer goes.
struct Ask<T, R> {
    item: T,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

/// The answer a caller waits for.
pub(super) type Answer<R> = oneshot::Receiver<Result<R, StoreError>>;

/// A queue of requests of one kind, and its batcher's end until the batcher starts.
pub(super) struct Queue<T, R> {
    // Unbounded: every request is a caller waiting for its answer, and the callers are
    // bounded by the deliveries in flight.
    sender: mpsc::UnboundedSender<Ask<T, R>>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Ask<T, R>>>>,
    started: AtomicBool,
}

impl<T, R> Default for Queue<T, R> {
    fn default() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Self {
            sender,
            receiver: Mutex::new(Some(receiver)),
            started: AtomicBool::new(false),
        }
    }
}

impl<T, R> Queue<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    /// Queues `item` for the batcher; gives it back when no batcher reads the queue (not
    /// started: no runtime).
    pub(super) fn ask(&self, item: T) -> Result<Answer<R>, T> {
        if !self.started.load(Relaxed) {
            return Err(item);
        }
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Ask { item, reply })
            .map(|()| answer)
            .map_err(|error| error.0.item)
    }

    /// Starts the batcher on `runtime` (once): `serve` makes one call for a batch and returns
    /// one answer per item, in order.
    pub(super) fn start<F, Fut>(
        &self,
        runtime: &tokio::runtime::Handle,
        store: Weak<Inner>,
        serve: F,
    ) where
        F: FnMut(Store, Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<R, StoreError>>> + Send + 'static,
    {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(receiver) = receiver {
            runtime.spawn(run(store, receiver, serve));
            self.started.store(true, Relaxed);
        }
    }
}

/// The batcher: until the store is dropped, takes every waiting request (up to
/// [`BATCH_MAX`]), serves them in one call and answers each.
async fn run<T, R, F, Fut>(
    store: Weak<Inner>,
    mut receiver: mpsc::UnboundedReceiver<Ask<T, R>>,
    mut serve: F,
) where
    F: FnMut(Store, Vec<T>) -> Fut,
    Fut: Future<Output = Vec<Result<R, StoreError>>>,
{
    let mut batch = Vec::new();
    // `None`: every sender is gone, so is the store.
    while receiver.recv_many(&mut batch, BATCH_MAX).await > 0 {
        let Some(inner) = store.upgrade() else {
            return;
        };
        let (items, replies): (Vec<T>, Vec<_>) =
            batch.drain(..).map(|ask| (ask.item, ask.reply)).unzip();
        let answers = serve(Store { inner }, items).await;
        // A caller that gave up (its timeout) drops its answer here: a lease it was given is
        // released by the lease's drop.
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}

impl<T, R> std::fmt::Debug for Queue<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

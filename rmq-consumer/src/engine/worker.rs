//! One handler's [`Worker`]: what all its deliveries share (settings, the concurrency
//! semaphore, the memory budget, the result cache, the `alone` lock, the fingerprints of
//! deliveries this process abandoned), and its small shared accessors. The subscription loop
//! is in `consumer.rs`, the delivery tasks and one delivery's run in `pipeline.rs` (batch
//! handlers: `batch.rs`), the settlement in `settle.rs`. This module uses none of them: they
//! all build on it.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use lapin::message::Delivery;
use tokio::sync::Semaphore;

use crate::{
    cache::ResultCache,
    engine::redelivery::{self, Abandoned},
    health::{HandlerStats, Health},
    settings::Settings,
};

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

impl Worker {
    pub(super) fn stats(&self) -> &HandlerStats {
        &self.health.handlers[self.index]
    }

    /// The `frame_max` every copy must fit.
    pub(super) fn frame_max(&self) -> usize {
        self.frame_max.load(Relaxed)
    }

    /// Remembers a delivery this process gives up on: its redelivery is not counted.
    pub(super) fn abandon(&self, delivery: &Delivery) {
        self.abandon_print(redelivery::fingerprint(delivery));
    }

    pub(super) fn abandon_print(&self, print: u64) {
        self.abandoned_set().remember(print);
    }

    pub(super) fn abandoned_set(&self) -> std::sync::MutexGuard<'_, Abandoned> {
        self.abandoned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

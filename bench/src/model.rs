//! Scenario B's simulated model: a forward pass costs [`FORWARD_BASE`] plus [`FORWARD_PER_ITEM`]
//! per item, waited on a `timerfd` (as S3's handlers wait), and its two handlers: one request
//! per call (`batch = 1`, a normal handler at concurrency 1, the way a GPU worker runs) and a
//! batch handler whose `batch` and `batch_wait` the child sets in the config. Each pass is
//! recorded ([`crate::probe::record_pass`]) for the child's report; the parent's B
//! ([`crate::batching`]) uses the cost model for its ideal rates.

use std::time::{Duration, Instant};

use rmq_consumer::consumer;

use crate::{
    probe::{mark_first, record_pass},
    protocol::{Reply, Task},
};

/// The fixed cost of one forward pass.
pub(crate) const FORWARD_BASE: Duration = Duration::from_millis(20);
/// What each item of a batch adds to its forward pass.
pub(crate) const FORWARD_PER_ITEM: Duration = Duration::from_micros(300);

/// One forward pass over `items` items, as the model's cost model says.
pub(crate) fn forward_cost(items: usize) -> Duration {
    let items = u32::try_from(items).unwrap_or(u32::MAX);
    FORWARD_BASE.saturating_add(FORWARD_PER_ITEM.saturating_mul(items))
}

/// The most requests per second a model with this cost can answer in batches of `batch`, one
/// forward pass at a time: `batch / (20 ms + 0.3 ms × batch)`.
pub(crate) fn ideal_rate(batch: u16) -> f64 {
    f64::from(batch) / forward_cost(usize::from(batch)).as_secs_f64()
}

/// B at `batch = 1`: one request per forward pass.
#[consumer(queue = "bench.model", reply_key = "bench.model.done")]
async fn bench_model(task: Task) -> Reply {
    mark_first();
    forward(1).await;
    Reply::to(&task)
}

/// B at `batch = N`: one forward pass per batch (the child overrides `batch` and `batch_wait`
/// in the config).
#[consumer(
    queue = "bench.batch",
    reply_key = "bench.batch.done",
    batch = 32,
    batch_wait = "15ms"
)]
async fn bench_batch(tasks: Vec<Task>) -> Vec<Reply> {
    mark_first();
    forward(tasks.len()).await;
    tasks.iter().map(Reply::to).collect()
}

/// Waits out one forward pass over `items` items and records it.
async fn forward(items: usize) {
    let cost = forward_cost(items);
    let started = Instant::now();
    if tokio_timerfd::sleep(cost).await.is_err() {
        tokio::time::sleep(cost).await;
    }
    record_pass(items, started.elapsed(), cost);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ideal_rates_follow_the_cost_model() {
        assert_eq!(forward_cost(32), Duration::from_micros(29_600));
        assert!((ideal_rate(1) - 49.26).abs() < 0.01);
        assert!((ideal_rate(8) - 357.14).abs() < 0.01);
        assert!((ideal_rate(32) - 1081.08).abs() < 0.01);
    }
}

//! Scenario B's simulated model: a forward pass costs [`FORWARD_BASE`] plus [`FORWARD_PER_ITEM`]
//! per item, waited on a `timerfd` (as S3's handlers wait), and its two handlers: one request
//! per call (`batch = 1`, a normal handler at concurrency 1, the way a GPU worker runs) and a
//! batch handler whose `batch` and `batch_wait` the child sets in the config.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use rmq_consumer::consumer;
use serde::{Deserialize, Serialize};

use crate::child::{Reply, Task, mark_first};

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
    let took = started.elapsed();
    if let Ok(mut passes) = PASSES.lock() {
        passes.calls += 1;
        passes.items += items as u64;
        passes.busy_s += took.as_secs_f64();
        passes.nominal_s += cost.as_secs_f64();
    }
}

/// The forward passes of this process so far.
static PASSES: Mutex<Passes> = Mutex::new(Passes {
    calls: 0,
    items: 0,
    busy_s: 0.0,
    nominal_s: 0.0,
});

/// What the model did during one measurement: how many calls, how full, and how long they
/// really took against the cost model.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Passes {
    /// Forward passes (handler calls).
    pub(crate) calls: u64,
    /// Items over all passes.
    pub(crate) items: u64,
    /// The passes' measured time, in seconds.
    pub(crate) busy_s: f64,
    /// The passes' time by the cost model, in seconds.
    pub(crate) nominal_s: f64,
}

impl Passes {
    /// The passes recorded in this process, `None` when there were none.
    pub(crate) fn recorded() -> Option<Self> {
        let passes = *PASSES.lock().ok()?;
        (passes.calls > 0).then_some(passes)
    }

    /// Items per forward pass.
    pub(crate) fn mean_batch(&self) -> f64 {
        self.items as f64 / self.calls.max(1) as f64
    }

    /// How much longer a pass took than the cost model says, on average, in ms (the timer's
    /// overshoot).
    pub(crate) fn overshoot_ms(&self) -> f64 {
        (self.busy_s - self.nominal_s) * 1e3 / self.calls.max(1) as f64
    }

    /// The share of `secs` the model spent in forward passes (one pass at a time).
    pub(crate) fn busy(&self, secs: f64) -> f64 {
        if secs > 0.0 {
            self.busy_s / secs
        } else {
            f64::NAN
        }
    }
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

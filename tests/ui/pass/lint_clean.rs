//! The expansion adds no warnings under strict lints, in any of its variants.
#![forbid(unsafe_code)]
#![deny(
    warnings,
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    unused_results
)]
#![deny(missing_debug_implementations, rust_2018_idioms)]

use rmq_consumer::{HandlerError, consumer};
use serde::Deserialize;
use serde_json::Value;

/// A task.
#[derive(Debug, Deserialize)]
pub struct Task {
    /// Its id.
    pub id: u64,
}

fn id(task: &Task) -> String {
    task.id.to_string()
}

/// Typed, custom uuid.
#[consumer(queue = "a", uuid = "id")]
pub async fn typed(task: Task) -> Result<Option<u64>, HandlerError> {
    Ok(Some(task.id))
}

/// Deprecated handlers still register without a warning.
#[deprecated = "use `typed`"]
#[consumer(queue = "b", reply_key = "r")]
pub async fn old(body: Value) -> Value {
    body
}

/// Blocking, plain.
#[consumer(queue = "c", blocking)]
pub fn plain(_body: Value) {}

/// Blocking, async.
#[consumer(queue = "d", blocking = true)]
pub async fn blocking_async(_body: Value) -> Result<(), HandlerError> {
    Ok(())
}

/// Batch, typed, custom uuid of one item.
#[consumer(queue = "g", reply_key = "r", batch = 16, batch_wait = "5ms", uuid = "id")]
pub async fn batched(tasks: Vec<Task>) -> Vec<Result<u64, HandlerError>> {
    tasks.into_iter().map(|task| Ok(task.id)).collect()
}

/// Batch, blocking, nothing published, deprecated.
#[deprecated = "use `batched`"]
#[consumer(queue = "h", batch = 2, blocking)]
pub fn batched_blocking(bodies: Vec<Value>) -> Result<Vec<()>, HandlerError> {
    Ok(bodies.iter().map(|_| ()).collect())
}

mod nested {
    use rmq_consumer::consumer;

    /// A raw identifier as the fn name.
    #[consumer(queue = "e", uuid = "super::id")]
    pub(crate) async fn r#type(task: super::Task) -> Option<u64> {
        Some(task.id)
    }
}

/// Compiled out, registration included.
#[consumer(queue = "f")]
#[cfg(any())]
pub async fn never(_body: Value) {}

fn main() {
    let _ = nested::r#type;
}

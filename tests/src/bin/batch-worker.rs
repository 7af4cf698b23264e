//! A worker process with a batch handler for the batch fault tests
//! (`tests/tests/fault_batch.rs`): one handler, `work`, `batch = 8`, `batch_wait = "20ms"`,
//! configured entirely from `RMQ_CONSUMER_*` environment variables like any deployed worker
//! (the same ones as `fault-worker`, so [`WorkerProcess`](rmq_consumer_tests::WorkerProcess)
//! starts either), so a test can `kill -9` it, SIGTERM it or close its connection.
//!
//! - `BATCH_WORKER_PASS_MS`: how long one call (a "forward pass") takes, whatever the batch
//!   size (default 20).
//! - Each call logs one line `batch-worker: batch of N` on stderr, so a test can read the
//!   batch sizes from the worker's log.
//! - Each item is answered with `{"id": <the item's id>, "pid": <this process id>, "batch":
//!   <the call's size>}`; the item's id is also its task uuid.
//! - An item with `"fail": true` fails alone (retryable: retried, then dead-lettered), one
//!   with `"fail": "dead"` is dead-lettered at once (poison); an item with `"hang": true`
//!   hangs the whole call past `message_timeout`, which fails every item of that batch.
//!
//! Exit code 0 after a clean drain, 1 when the engine stops with an error.

use std::{process::ExitCode, sync::OnceLock, time::Duration};

use rmq_consumer::{HandlerError, consumer};
use serde_json::{Value, json};

/// The variable setting one call's work time in milliseconds.
const PASS_ENV: &str = "BATCH_WORKER_PASS_MS";

fn pass_time() -> Duration {
    static TIME: OnceLock<Duration> = OnceLock::new();
    *TIME.get_or_init(|| {
        let millis = std::env::var(PASS_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        Duration::from_millis(millis)
    })
}

fn task_uuid(task: &Value) -> String {
    task["id"]
        .as_str()
        .map_or_else(|| task["id"].to_string(), str::to_owned)
}

/// One "forward pass" of `BATCH_WORKER_PASS_MS` for the whole batch; each item answered on
/// its own, failed alone (`fail`), or refused (`fail: "dead"`); a `hang` item hangs the call.
#[consumer(
    queue = "batch_worker.tasks",
    reply_key = "batch_worker.results",
    uuid = "task_uuid",
    batch = 8,
    batch_wait = "20ms"
)]
async fn work(tasks: Vec<Value>) -> Vec<Result<Value, HandlerError>> {
    let size = tasks.len();
    eprintln!("batch-worker: batch of {size}");
    if tasks
        .iter()
        .any(|task| task["hang"].as_bool() == Some(true))
    {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(pass_time()).await;
    tasks
        .iter()
        .map(|task| match &task["fail"] {
            Value::Bool(true) => Err(HandlerError::retry("asked to fail")),
            Value::String(how) if how == "dead" => {
                Err(HandlerError::dead_letter("asked to fail for good"))
            }
            _ => Ok(json!({"id": task["id"], "pid": std::process::id(), "batch": size})),
        })
        .collect()
}

#[tokio::main]
async fn main() -> ExitCode {
    match rmq_consumer::run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("batch-worker: {error}");
            ExitCode::FAILURE
        }
    }
}

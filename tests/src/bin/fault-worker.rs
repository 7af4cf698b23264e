//! A worker process for the process-level fault tests (`tests/tests/fault_process.rs`): one
//! handler, `work`, configured entirely from `RMQ_CONSUMER_*` environment variables like any
//! deployed worker, so a test can `kill -9` it or send it SIGTERM.
//!
//! - `FAULT_WORKER_SLEEP_MS`: how long the handler works on each task (default 10).
//! - The handler returns `{"id": <the task's id>, "pid": <this process id>}`; the task id is
//!   also the task uuid. A task's `"echo"` field, when present, is copied into the result
//!   (`tests/tests/deployment.rs` puts a canary there to check that no log line carries a
//!   message or result body).
//! - A task with `"fail": true` fails (retryable: retried, then dead-lettered), one with
//!   `"fail": "dead"` is dead-lettered at once (`tests/tests/chaos.rs`).
//! - A task with `"abort": true` kills the process from inside the handler
//!   (`std::process::abort()`: no drain, no ack, no flush), as a task that crashes its
//!   worker does (`tests/tests/deployment.rs`, the worker-lost guard).
//!
//! Exit code 0 after a clean drain, 1 when the engine stops with an error.

use std::{process::ExitCode, sync::OnceLock, time::Duration};

use rmq_consumer::{HandlerError, consumer};
use serde_json::{Value, json};

/// The variable setting the handler's work time in milliseconds.
const SLEEP_ENV: &str = "FAULT_WORKER_SLEEP_MS";

fn work_time() -> Duration {
    static TIME: OnceLock<Duration> = OnceLock::new();
    *TIME.get_or_init(|| {
        let millis = std::env::var(SLEEP_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        Duration::from_millis(millis)
    })
}

fn task_uuid(task: &Value) -> String {
    task["id"]
        .as_str()
        .map_or_else(|| task["id"].to_string(), str::to_owned)
}

/// Works on a task for `FAULT_WORKER_SLEEP_MS` and answers with its id (and its `echo`);
/// a task with `"abort": true` aborts the process instead.
#[consumer(
    queue = "fault_worker.tasks",
    reply_key = "fault_worker.results",
    uuid = "task_uuid"
)]
async fn work(task: Value) -> Result<Value, HandlerError> {
    if task["abort"].as_bool() == Some(true) {
        std::process::abort();
    }
    tokio::time::sleep(work_time()).await;
    match &task["fail"] {
        Value::Bool(true) => return Err(HandlerError::retry("asked to fail")),
        Value::String(how) if how == "dead" => {
            return Err(HandlerError::dead_letter("asked to fail for good"));
        }
        _ => {}
    }
    let mut result = json!({"id": task["id"], "pid": std::process::id()});
    if let Some(echo) = task.get("echo") {
        result["echo"] = echo.clone();
    }
    Ok(result)
}

#[tokio::main]
async fn main() -> ExitCode {
    match rmq_consumer::run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fault-worker: {error}");
            ExitCode::FAILURE
        }
    }
}

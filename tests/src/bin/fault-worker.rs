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
//! - A task's `"sleep_ms"` field, when present, replaces `FAULT_WORKER_SLEEP_MS` for that task
//!   (a long task keeps a run in flight while the test kills the worker).
//! - `FAULT_WORKER_RUNS_FILE`: when set, every handler run appends one line, the task uuid, to
//!   that file as it starts (opened with `O_APPEND`, one `write` per line, so the runs of
//!   several worker processes interleave whole lines): the shared result store tests
//!   (`tests/tests/shared_store.rs`) count handler runs outside the workers, a killed run
//!   included. The result then also carries `"run"`, this process's count of runs so far, so
//!   two runs of one task never give the same result (a result served from the store is
//!   identical to the stored one).
//!
//! Exit code 0 after a clean drain, 1 when the engine stops with an error.

use std::{
    fs::File,
    io::Write,
    process::ExitCode,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

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

/// The variable naming the file that counts handler runs.
const RUNS_FILE_ENV: &str = "FAULT_WORKER_RUNS_FILE";

/// The runs file of `FAULT_WORKER_RUNS_FILE`, opened for appending at start ([`main`]);
/// `None` when unset.
static RUNS_FILE: OnceLock<Option<File>> = OnceLock::new();

/// Opens the runs file of `FAULT_WORKER_RUNS_FILE`, if set.
fn open_runs_file() -> Result<(), String> {
    let file = match std::env::var_os(RUNS_FILE_ENV) {
        None => None,
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("{RUNS_FILE_ENV}={path:?}: {e}"))?,
        ),
    };
    let _ = RUNS_FILE.set(file);
    Ok(())
}

/// Records a handler run of `uuid` in the runs file (one `write` of one whole line); returns
/// this process's number of runs so far, `None` without a runs file. A run that cannot be
/// counted aborts the process: the test must not go on with a wrong count.
fn record_run(uuid: &str) -> Option<u64> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let mut file = RUNS_FILE.get()?.as_ref()?;
    let line = format!("{uuid}\n");
    match file.write(line.as_bytes()) {
        Ok(written) if written == line.len() => {}
        outcome => {
            eprintln!("fault-worker: cannot append a run to {RUNS_FILE_ENV}: {outcome:?}");
            std::process::abort();
        }
    }
    Some(RUNS.fetch_add(1, Ordering::Relaxed) + 1)
}

fn task_uuid(task: &Value) -> String {
    task["id"]
        .as_str()
        .map_or_else(|| task["id"].to_string(), str::to_owned)
}

/// Works on a task for `FAULT_WORKER_SLEEP_MS` (or its `sleep_ms`) and answers with its id
/// (and its `echo`, and the run number with a runs file); a task with `"abort": true` aborts
/// the process instead.
#[consumer(
    queue = "fault_worker.tasks",
    reply_key = "fault_worker.results",
    uuid = "task_uuid"
)]
async fn work(task: Value) -> Result<Value, HandlerError> {
    let run = record_run(&task_uuid(&task));
    if task["abort"].as_bool() == Some(true) {
        std::process::abort();
    }
    let sleep = task["sleep_ms"]
        .as_u64()
        .map_or_else(work_time, Duration::from_millis);
    tokio::time::sleep(sleep).await;
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
    if let Some(run) = run {
        result["run"] = run.into();
    }
    Ok(result)
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(error) = open_runs_file() {
        eprintln!("fault-worker: {error}");
        return ExitCode::FAILURE;
    }
    match rmq_consumer::run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fault-worker: {error}");
            ExitCode::FAILURE
        }
    }
}

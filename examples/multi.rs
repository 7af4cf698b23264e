//! Several handlers in one binary: a `Value` handler, a typed one and a CPU-bound one on the
//! blocking pool; each gets its own channel and consumer.
//!
//! Run it with `cargo run -p examples --example multi`.

use rmq_consumer::{HandlerError, consumer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A typed task: bodies that do not fit go to the dead-letter queue with the reason.
#[derive(Debug, Deserialize)]
struct Translate {
    task_id: String,
    text: String,
    target: String,
}

#[derive(Debug, Serialize)]
struct Translated {
    task_id: String,
    text: String,
}

fn translate_uuid(task: &Translate) -> String {
    task.task_id.clone()
}

#[consumer(
    queue = "demo.translate",
    reply_key = "demo.translate.done",
    reply_queue = "demo.translate.results",
    uuid = "translate_uuid"
)]
async fn translate(task: Translate) -> Result<Translated, HandlerError> {
    if task.target.is_empty() {
        return Err(HandlerError::dead_letter("no target language"));
    }
    Ok(Translated {
        task_id: task.task_id,
        text: format!("[{}] {}", task.target, task.text),
    })
}

#[consumer(
    queue = "demo.echo",
    reply_key = "demo.echo.done",
    reply_queue = "demo.echo.results"
)]
async fn echo(data: Value) -> Value {
    json!({"code": 200, "message": "success", "data": data})
}

/// CPU-bound work runs on the blocking pool so heartbeats keep flowing.
#[consumer(
    queue = "demo.checksum",
    reply_key = "demo.checksum.done",
    reply_queue = "demo.checksum.results",
    blocking = true
)]
fn checksum(data: Value) -> Value {
    let text = data.to_string();
    let sum = text.bytes().fold(0_u64, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(u64::from(b))
    });
    json!({"checksum": sum})
}

#[tokio::main]
async fn main() -> Result<(), rmq_consumer::Error> {
    rmq_consumer::run().await
}

//! The smallest worker: one handler, results to `llm.task.m2b`.
//!
//! Run it with `cargo run -p examples --example quickstart` (Ctrl-C stops it gracefully).
//! Publish a task with `cargo run -p rmq-consumer -- publish --queue llm.task.b2m.queue --count 1`.

use rmq_consumer::consumer;
use serde_json::{Value, json};

fn task_uuid(data: &Value) -> String {
    rmq_consumer::uuid::md5_json(data)
}

#[consumer(
    queue = "llm.task.b2m.queue",
    reply_key = "llm.task.m2b",
    reply_queue = "llm.task.m2b.queue",
    uuid = "task_uuid"
)]
async fn summarize(data: Value) -> Result<Option<Value>, rmq_consumer::HandlerError> {
    Ok(Some(
        json!({"code": 200, "message": "success", "data": data}),
    ))
}

#[tokio::main]
async fn main() -> Result<(), rmq_consumer::Error> {
    rmq_consumer::run().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn summarize_wraps_the_task() {
        let out = summarize(json!({"a": 1})).await.ok().flatten();
        assert_eq!(
            out,
            Some(json!({"code": 200, "message": "success", "data": {"a": 1}}))
        );
    }
}

//! A `serde_json::Value` handler using every key.

use rmq_consumer::consumer;
use serde_json::Value;

fn task_uuid(body: &Value) -> String {
    body["id"].to_string()
}

#[consumer(
    queue = "tasks",
    reply_key = "results",
    reply_queue = "results",
    uuid = "task_uuid",
    name = "echo_all",
    prefetch = 4,
    timeout = 30,
    max_retries = 3,
    queue_type = "quorum",
    blocking = false
)]
async fn echo(body: Value) -> Value {
    body
}

fn main() {
    let _ = echo;
}

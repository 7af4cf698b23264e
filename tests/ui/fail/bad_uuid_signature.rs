use rmq_consumer::consumer;
use serde_json::Value;

fn task_uuid(body: &Value) -> u32 {
    body.as_u64().unwrap_or_default() as u32
}

#[consumer(queue = "tasks", uuid = "task_uuid")]
async fn handle(_body: Value) {}

fn main() {}

use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", uuid = "ids::task_uuid")]
async fn handle(_body: Value) {}

fn main() {}

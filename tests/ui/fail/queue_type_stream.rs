use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", queue_type = "stream")]
async fn handle(_body: Value) {}

fn main() {}

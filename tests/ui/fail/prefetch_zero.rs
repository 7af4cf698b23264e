use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", prefetch = 0)]
async fn handle(_body: Value) {}

fn main() {}

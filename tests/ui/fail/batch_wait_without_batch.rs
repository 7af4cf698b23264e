use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", batch_wait = "15ms")]
async fn store(_item: Value) {}

fn main() {}

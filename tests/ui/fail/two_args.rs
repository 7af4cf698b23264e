use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks")]
async fn handle(_body: Value, _retries: u32) {}

fn main() {}

use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", uuid = "|body| body.to_string()")]
async fn handle(_body: Value) {}

fn main() {}

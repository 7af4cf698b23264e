use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", exchange = "amq.direct")]
async fn handle(_body: Value) {}

fn main() {}

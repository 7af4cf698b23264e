use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", blocking = "true")]
fn handle(_body: Value) {}

fn main() {}

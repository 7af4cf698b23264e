use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", batch = 32)]
async fn store(_items: Vec<Value>) {}

fn main() {}

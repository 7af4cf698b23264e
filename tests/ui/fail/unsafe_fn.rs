use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks")]
async unsafe fn handle(_body: Value) {}

fn main() {}

use rmq_consumer::consumer;
use serde_json::Value;

#[consumer]
async fn handle(_body: Value) {}

fn main() {}

use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", reply_key = "results", queue = "other")]
async fn handle(body: Value) -> Value {
    body
}

fn main() {}

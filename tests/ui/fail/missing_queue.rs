use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(reply_key = "results", prefetch = 4)]
async fn handle(body: Value) -> Value {
    body
}

fn main() {}

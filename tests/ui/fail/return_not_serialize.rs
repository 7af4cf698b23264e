use rmq_consumer::consumer;
use serde_json::Value;

struct Summary {
    words: usize,
}

#[consumer(queue = "tasks", reply_key = "summaries")]
async fn handle(_body: Value) -> Option<Summary> {
    Some(Summary { words: 1 })
}

fn main() {}

use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", batch = 0)]
async fn store(items: Vec<Value>) -> Vec<()> {
    items.iter().map(|_| ()).collect()
}

fn main() {}

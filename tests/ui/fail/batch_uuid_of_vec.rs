use rmq_consumer::consumer;
use serde_json::Value;

// A batch handler's `uuid` fn takes one item, not the batch.
fn batch_uuid(_items: &Vec<Value>) -> String {
    String::new()
}

#[consumer(queue = "tasks", batch = 8, uuid = "batch_uuid")]
async fn store(items: Vec<Value>) -> Vec<()> {
    items.iter().map(|_| ()).collect()
}

fn main() {}

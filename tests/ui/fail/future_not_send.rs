use std::rc::Rc;

use rmq_consumer::consumer;
use serde_json::Value;

async fn store(_value: &Value) {}

#[consumer(queue = "tasks")]
async fn handle(body: Value) {
    let shared = Rc::new(body);
    store(&shared).await;
}

fn main() {}

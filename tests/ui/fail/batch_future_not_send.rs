use std::rc::Rc;

use rmq_consumer::consumer;
use serde_json::Value;

async fn store(_values: &[Value]) {}

#[consumer(queue = "tasks", batch = 8)]
async fn handle(bodies: Vec<Value>) -> Vec<()> {
    let shared = Rc::new(bodies);
    store(&shared).await;
    shared.iter().map(|_| ()).collect()
}

fn main() {}

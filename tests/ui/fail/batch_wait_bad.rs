use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", batch = 8, batch_wait = "1.5s")]
async fn fractional(items: Vec<Value>) -> Vec<()> {
    items.iter().map(|_| ()).collect()
}

#[consumer(queue = "tasks", batch = 8, batch_wait = "500us")]
async fn micros(items: Vec<Value>) -> Vec<()> {
    items.iter().map(|_| ()).collect()
}

#[consumer(queue = "tasks", batch = 8, batch_wait = 15)]
async fn no_unit(items: Vec<Value>) -> Vec<()> {
    items.iter().map(|_| ()).collect()
}

fn main() {}

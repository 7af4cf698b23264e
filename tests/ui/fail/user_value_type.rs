use rmq_consumer::consumer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Value {
    id: u64,
}

#[consumer(queue = "tasks")]
async fn handle(body: Value) {
    let _ = body.id;
}

fn main() {}

use rmq_consumer::{HandlerError, consumer};
use serde_json::Value;

#[consumer(queue = "tasks", batch = 32)]
async fn infer(prompt: Value) -> Vec<Result<Value, HandlerError>> {
    vec![Ok(prompt)]
}

fn main() {}

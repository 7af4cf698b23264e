use rmq_consumer::{HandlerError, consumer};
use serde_json::Value;

#[consumer(queue = "tasks", reply_key = "results", batch = 32)]
async fn infer(prompts: Vec<Value>) -> Result<Value, HandlerError> {
    Ok(Value::Array(prompts))
}

#[consumer(queue = "tasks", reply_key = "results", batch = 32)]
async fn count(prompts: Vec<Value>) -> usize {
    prompts.len()
}

fn main() {}

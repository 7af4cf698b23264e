use rmq_consumer::{HandlerError, consumer};
use serde_json::Value;

struct Completion;

#[consumer(queue = "tasks", reply_key = "results", batch = 8)]
async fn infer(prompts: Vec<Value>) -> Vec<Result<Completion, HandlerError>> {
    prompts.iter().map(|_| Ok(Completion)).collect()
}

#[consumer(queue = "tasks", reply_key = "results", batch = 8)]
async fn whole(prompts: Vec<Value>) -> Result<Vec<Option<Completion>>, String> {
    Ok(prompts.iter().map(|_| None).collect())
}

fn main() {}

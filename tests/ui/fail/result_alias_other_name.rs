//! The return shape is read from the spelling: an alias not named `Result` is a plain `R`.
use rmq_consumer::{HandlerError, consumer};
use serde_json::Value;

type HandlerResult<T> = Result<T, HandlerError>;

#[consumer(queue = "tasks", reply_key = "results")]
async fn handle(body: Value) -> HandlerResult<Value> {
    Ok(body)
}

fn main() {}

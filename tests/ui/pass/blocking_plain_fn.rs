//! `blocking = true` (or a bare `blocking`) accepts a plain fn, and an async one.

use rmq_consumer::{HandlerError, consumer};
use serde_json::Value;

#[consumer(queue = "crunch", reply_key = "crunched", blocking = true)]
fn crunch(body: Value) -> Result<u64, HandlerError> {
    body.as_u64()
        .map(|n| (1..=n).sum())
        .ok_or_else(|| HandlerError::dead_letter("not a number"))
}

#[consumer(queue = "crunch_bare", blocking)]
fn crunch_bare(_body: Vec<u8>) {}

#[consumer(queue = "crunch_async", blocking)]
async fn crunch_async(body: Value) -> Value {
    body
}

fn main() {}

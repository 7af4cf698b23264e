//! Batch handlers (`batch = N`): every supported return shape, typed and `Value` items, a
//! custom uuid of the item type, and blocking handlers.

use std::fmt;

use rmq_consumer::{HandlerError, consumer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Deserialize)]
struct Prompt {
    id: u64,
    text: String,
}

#[derive(Serialize)]
struct Completion {
    text: String,
}

#[derive(Debug)]
struct MyError;

impl fmt::Display for MyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("my error")
    }
}

impl std::error::Error for MyError {}

/// A one-argument `Result` alias, as `anyhow` and `std::io` have.
mod app {
    pub(crate) type Result<T> = std::result::Result<T, rmq_consumer::HandlerError>;
}

fn prompt_uuid(prompt: &Prompt) -> String {
    format!("prompt-{}", prompt.id)
}

fn complete(prompt: &Prompt) -> Completion {
    Completion {
        text: prompt.text.to_uppercase(),
    }
}

#[consumer(queue = "values", reply_key = "r", batch = 32, batch_wait = "15ms")]
async fn values(prompts: Vec<Prompt>) -> Vec<Completion> {
    prompts.iter().map(complete).collect()
}

#[consumer(queue = "units", batch = 8)]
async fn units(items: Vec<Value>) -> Vec<()> {
    items.iter().map(|_| ()).collect()
}

#[consumer(queue = "options", reply_key = "r", batch = 8, batch_wait = "1s")]
async fn options(items: Vec<serde_json::Value>) -> Vec<Option<Value>> {
    items.into_iter().map(Some).collect()
}

#[consumer(queue = "results", reply_key = "r", batch = 4, uuid = "prompt_uuid")]
async fn results(prompts: Vec<Prompt>) -> Vec<Result<Completion, HandlerError>> {
    prompts.iter().map(|p| Ok(complete(p))).collect()
}

#[consumer(queue = "result_units", batch = 4)]
async fn result_units(prompts: std::vec::Vec<Prompt>) -> Vec<Result<(), MyError>> {
    prompts.iter().map(|_| Err(MyError)).collect()
}

#[consumer(queue = "result_options", reply_key = "r", batch = 4)]
async fn result_options(prompts: Vec<Prompt>) -> Vec<app::Result<Option<Completion>>> {
    prompts.iter().map(|p| Ok(Some(complete(p)))).collect()
}

#[consumer(queue = "whole", reply_key = "r", batch = 65535, batch_wait = "250ms")]
async fn whole(prompts: Vec<Prompt>) -> Result<Vec<Completion>, MyError> {
    Ok(prompts.iter().map(complete).collect())
}

#[consumer(queue = "whole_alias", reply_key = "r", batch = 2)]
async fn whole_alias(
    prompts: Vec<Prompt>,
) -> app::Result<Vec<Result<Option<Completion>, MyError>>> {
    Ok(prompts.iter().map(|p| Ok(Some(complete(p)))).collect())
}

#[consumer(queue = "whole_unit", batch = 2)]
async fn whole_unit(items: Vec<Value>) -> Result<Vec<()>, HandlerError> {
    Ok(vec![(); items.len()])
}

#[consumer(queue = "blocking_plain", reply_key = "r", batch = 16, blocking)]
fn blocking_plain(prompts: Vec<Prompt>) -> Vec<Completion> {
    prompts.iter().map(complete).collect()
}

#[consumer(
    queue = "blocking_async",
    reply_key = "r",
    batch = 16,
    blocking = true,
    uuid = "prompt_uuid"
)]
async fn blocking_async(prompts: Vec<Prompt>) -> Result<Vec<Option<Completion>>, HandlerError> {
    Ok(prompts.iter().map(|p| Some(complete(p))).collect())
}

#[consumer(queue = "blocking_units", batch = 1, blocking)]
fn blocking_units(items: Vec<Value>) -> Vec<()> {
    items.iter().map(|_| ()).collect()
}

fn main() {}

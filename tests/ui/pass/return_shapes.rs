//! Every supported return shape.

use std::fmt;

use rmq_consumer::{HandlerError, consumer};
use serde::Serialize;
use serde_json::Value;

#[derive(Serialize)]
struct Out {
    n: u32,
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

#[consumer(queue = "nothing")]
async fn nothing(_body: Value) {}

#[consumer(queue = "unit")]
async fn unit(_body: Value) -> () {}

#[consumer(queue = "plain", reply_key = "r")]
async fn plain(_body: Value) -> Out {
    Out { n: 1 }
}

#[consumer(queue = "optional", reply_key = "r")]
async fn optional(_body: Value) -> Option<Out> {
    None
}

#[consumer(queue = "fallible", reply_key = "r")]
async fn fallible(_body: Value) -> Result<Out, MyError> {
    Err(MyError)
}

#[consumer(queue = "fallible_handler_error", reply_key = "r")]
async fn fallible_handler_error(_body: Value) -> std::result::Result<Out, HandlerError> {
    Err(HandlerError::dead_letter("no"))
}

#[consumer(queue = "fallible_optional", reply_key = "r")]
async fn fallible_optional(_body: Value) -> Result<Option<Out>, MyError> {
    Ok(None)
}

#[consumer(queue = "fallible_unit")]
async fn fallible_unit(_body: Value) -> Result<(), MyError> {
    Ok(())
}

#[consumer(queue = "alias", reply_key = "r")]
async fn alias(_body: Value) -> app::Result<Out> {
    Ok(Out { n: 2 })
}

#[consumer(queue = "alias_unit")]
async fn alias_unit(_body: Value) -> app::Result<()> {
    Ok(())
}

#[consumer(queue = "alias_optional", reply_key = "r")]
async fn alias_optional(_body: Value) -> app::Result<Option<Value>> {
    Ok(None)
}

#[consumer(queue = "opaque", reply_key = "r")]
async fn opaque(_body: Value) -> impl Serialize {
    vec![1, 2, 3]
}

fn main() {}

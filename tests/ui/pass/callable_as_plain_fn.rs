//! The annotated fn stays an ordinary fn: callable and referable, attributes intact.

use rmq_consumer::consumer;
use serde::Deserialize;
use serde_json::{Value, json};

/// Two numbers.
#[derive(Deserialize)]
pub struct Pair {
    a: i64,
    b: i64,
}

/// Adds the two numbers.
#[consumer(queue = "add", reply_key = "sums", blocking = true)]
#[allow(clippy::needless_pass_by_value, reason = "the handler owns its body")]
pub fn add(Pair { a, b }: Pair) -> i64 {
    a + b
}

#[consumer(queue = "summaries", reply_key = "summaries")]
async fn summarize(mut body: Value) -> Value {
    body["summarized"] = json!(true);
    body
}

fn main() {
    assert_eq!(add(Pair { a: 2, b: 3 }), 5);
    let _ = summarize;
    let _: fn(Pair) -> i64 = add;
}

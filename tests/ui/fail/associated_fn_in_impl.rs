//! An associated fn without `self` cannot be told apart from a free fn by the attribute; the
//! registration it adds is not valid inside an `impl`, so rustc reports that instead.
use rmq_consumer::consumer;
use serde_json::Value;

struct Service;

impl Service {
    #[consumer(queue = "tasks")]
    async fn handle(_body: Value) {}
}

fn main() {}

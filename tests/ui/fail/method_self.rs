use rmq_consumer::consumer;
use serde_json::Value;

struct Service;

impl Service {
    #[consumer(queue = "tasks")]
    async fn handle(&self, _body: Value) {}
}

fn main() {}

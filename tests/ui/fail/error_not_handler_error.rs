use rmq_consumer::consumer;
use serde_json::Value;

#[consumer(queue = "tasks", reply_key = "results")]
async fn handle(_body: Value) -> Result<u32, String> {
    Err("no".to_owned())
}

fn main() {}

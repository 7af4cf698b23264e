use rmq_consumer::consumer;
use serde::de::DeserializeOwned;

#[consumer(queue = "tasks")]
async fn handle<T: DeserializeOwned>(_body: T) {}

fn main() {}

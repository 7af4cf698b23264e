use rmq_consumer::consumer;

#[consumer(queue = "tasks")]
async fn handle(_body: &str) {}

fn main() {}

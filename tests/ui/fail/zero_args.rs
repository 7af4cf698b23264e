use rmq_consumer::consumer;

#[consumer(queue = "tasks")]
async fn handle() {}

fn main() {}

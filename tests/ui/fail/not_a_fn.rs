use rmq_consumer::consumer;

#[consumer(queue = "tasks")]
struct Handler;

fn main() {}

use rmq_consumer::consumer;

#[consumer(queue = "tasks", blocking)]
const fn handle(_body: u32) {}

fn main() {}

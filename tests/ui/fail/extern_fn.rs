use rmq_consumer::consumer;

#[consumer(queue = "tasks", blocking)]
extern "C" fn handle(_body: u32) {}

fn main() {}

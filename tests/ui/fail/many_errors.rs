use rmq_consumer::consumer;

#[consumer(prefetch = 0, timeout = "30s", reply-key = "results", queue_type = "stream")]
fn handle<T>(_a: T, _b: T) {}

fn main() {}

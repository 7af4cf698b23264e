use rmq_consumer::consumer;

struct Task {
    id: u64,
}

#[consumer(queue = "tasks")]
async fn handle(task: Task) {
    let _ = task.id;
}

fn main() {}

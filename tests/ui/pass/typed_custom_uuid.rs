//! A typed handler (a serde struct) with a custom `uuid` fn taking `&Task`.

use rmq_consumer::{HandlerError, consumer};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Task {
    id: u64,
    text: String,
}

#[derive(Serialize)]
struct Summary {
    id: u64,
    words: usize,
}

mod ids {
    pub(crate) fn of_task(task: &super::Task) -> String {
        format!("task-{}", task.id)
    }
}

#[consumer(queue = "tasks", reply_key = "summaries", uuid = "ids::of_task")]
async fn summarize(task: Task) -> Result<Summary, HandlerError> {
    Ok(Summary {
        id: task.id,
        words: task.text.split_whitespace().count(),
    })
}

fn main() {
    let _ = summarize;
}

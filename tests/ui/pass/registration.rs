//! What the attribute registers: the spec fields, the user's line, and `prepare`, which decodes
//! the body and computes the task uuid.

use rmq_consumer::{consumer, registry};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Task {
    id: u64,
}

fn task_uuid(task: &Task) -> String {
    format!("task-{}", task.id)
}

#[consumer(queue = "tasks", uuid = "task_uuid")]
async fn typed(task: Task) -> u64 {
    task.id
}

#[consumer(
    queue = "raw",
    reply_key = "raw_results",
    reply_queue = "raw_results_q",
    name = "raw_handler",
    prefetch = 7,
    timeout = 9,
    max_retries = 2,
    queue_type = "classic",
    blocking
)]
fn raw(body: Value) -> Value {
    body
}

fn main() {
    let handlers = registry::handlers();
    let names: Vec<&str> = handlers.iter().map(|spec| spec.name).collect();
    assert_eq!(names, ["raw_handler", "typed"]);

    let raw = handlers[0];
    assert_eq!(raw.queue, "raw");
    assert_eq!(raw.reply_key, Some("raw_results"));
    assert_eq!(raw.reply_queue, Some("raw_results_q"));
    assert_eq!(raw.prefetch, Some(7));
    assert_eq!(raw.timeout_secs, Some(9));
    assert_eq!(raw.max_retries, Some(2));
    assert_eq!(raw.queue_type, Some("classic"));
    assert!(raw.blocking);
    assert_eq!(raw.module_path, module_path!());
    assert!(raw.file.ends_with("registration.rs"), "{}", raw.file);
    assert_eq!(raw.line, 33);
    let prepared = (raw.prepare)(br#"{"b": 1, "a": 2}"#).unwrap();
    assert_eq!(
        prepared.task_uuid(),
        rmq_consumer::uuid::md5_json(&json!({"a": 2, "b": 1}))
    );
    let error = (raw.prepare)(b"{").unwrap_err();
    assert_eq!(error.kind(), "invalid_json");

    let typed = handlers[1];
    assert_eq!(typed.queue, "tasks");
    assert_eq!((typed.reply_key, typed.reply_queue), (None, None));
    assert_eq!(
        (typed.prefetch, typed.timeout_secs, typed.max_retries),
        (None, None, None)
    );
    assert_eq!(typed.queue_type, None);
    assert!(!typed.blocking);
    assert_eq!(typed.line, 18);
    let prepared = (typed.prepare)(br#"{"id": 42}"#).unwrap();
    assert_eq!(prepared.task_uuid(), "task-42");
    let error = (typed.prepare)(br#"{"id": "not a number"}"#).unwrap_err();
    assert!(error.is_dead_letter());
    assert_eq!(error.kind(), "invalid_shape");
}

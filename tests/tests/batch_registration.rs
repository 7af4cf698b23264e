//! Batch handlers (`batch = N`) through their registration, without a broker: what
//! `#[consumer]` registers, and the generated `prepare`, `run` and batch-of-one `prepare`
//! called the way the engine calls them. Running a bound call is the engine's (its unit tests
//! and the integration tests); the conversions are tested in `rmq_consumer::__private`.

use rmq_consumer::{
    HandlerError, consumer,
    registry::{HandlerSpec, Item},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
struct Prompt {
    id: u64,
    text: String,
}

#[derive(Debug, PartialEq, Serialize)]
struct Completion {
    text: String,
}

fn prompt_uuid(prompt: &Prompt) -> String {
    format!("prompt-{}", prompt.id)
}

#[consumer(
    queue = "llm.infer.b2m",
    reply_key = "llm.infer.m2b",
    batch = 32,
    batch_wait = "15ms",
    uuid = "prompt_uuid"
)]
async fn infer(prompts: Vec<Prompt>) -> Vec<Result<Completion, HandlerError>> {
    prompts
        .into_iter()
        .map(|prompt| {
            if prompt.text.is_empty() {
                Err(HandlerError::dead_letter("empty prompt"))
            } else {
                Ok(Completion {
                    text: prompt.text.to_uppercase(),
                })
            }
        })
        .collect()
}

#[consumer(queue = "crunch", batch = 4, blocking)]
fn crunch(bodies: Vec<Value>) -> Result<Vec<()>, HandlerError> {
    Ok(bodies.iter().map(|_| ()).collect())
}

#[consumer(queue = "single")]
async fn single(_body: Value) {}

/// The registered handler named `name`.
#[allow(
    clippy::unwrap_used,
    reason = "a test helper: every name asked for is registered above"
)]
fn spec(name: &str) -> &'static HandlerSpec {
    rmq_consumer::registry::handlers()
        .into_iter()
        .find(|spec| spec.name == name)
        .unwrap()
}

#[test]
fn the_attribute_registers_the_batch() {
    let infer = spec("infer");
    let batch = infer.batch.unwrap();
    assert_eq!((batch.size, batch.wait_ms), (32, Some(15)));
    assert_eq!(infer.reply_key, Some("llm.infer.m2b"));
    assert!(!infer.blocking);

    let crunch = spec("crunch");
    let batch = crunch.batch.unwrap();
    assert_eq!(
        (batch.size, batch.wait_ms),
        (4, None),
        "no wait: the engine's default"
    );
    assert!(crunch.blocking);

    assert!(spec("single").batch.is_none());
}

#[test]
fn each_item_is_prepared_alone() {
    let prepare = spec("infer").batch.unwrap().prepare;
    let item = prepare(br#"{"id": 7, "text": "hi"}"#).unwrap();
    assert_eq!(item.task_uuid(), "prompt-7");
    let error = prepare(br#"{"id": "seven"}"#).unwrap_err();
    assert_eq!(error.kind(), "invalid_shape");
    assert!(error.is_dead_letter());

    // The default uuid: md5 of the body's canonical JSON, as for one-message handlers.
    let prepare = spec("crunch").batch.unwrap().prepare;
    let body = br#"{"b": 2, "a": 1}"#;
    let item = prepare(body).unwrap();
    assert_eq!(
        item.task_uuid(),
        rmq_consumer::uuid::md5_json(&json!({"a": 1, "b": 2}))
    );
    let single = (spec("crunch").prepare)(body).unwrap();
    assert_eq!(single.task_uuid(), item.task_uuid());
}

#[test]
fn a_batch_binds_the_items_of_its_own_handler() {
    // The items `prepare` makes (its `Item`s are the engine's to take apart).
    let prompt = |id, text: &str| -> Item {
        Box::new(Prompt {
            id,
            text: text.into(),
        })
    };
    let run = (spec("infer").batch.unwrap().run)(vec![prompt(1, "a"), prompt(2, "")]).unwrap();
    assert_eq!(format!("{run:?}"), "BatchRun { call: \"async\" }");

    let crunch = spec("crunch").batch.unwrap().run;
    let run = crunch(vec![Box::new(json!({}))]).unwrap();
    assert_eq!(format!("{run:?}"), "BatchRun { call: \"blocking\" }");

    // An item of another type is an error, never a panic.
    let error = crunch(vec![Box::new(json!(1)), prompt(1, "a")]).unwrap_err();
    assert_eq!(error.kind(), "batch_item_type");
}

#[test]
fn the_suspect_queue_runs_a_batch_of_one() {
    let prepared = (spec("infer").prepare)(br#"{"id": 3, "text": "x"}"#).unwrap();
    assert_eq!(prepared.task_uuid(), "prompt-3");
    assert!(format!("{prepared:?}").contains("\"async\""));
    let prepared = (spec("crunch").prepare)(b"[]").unwrap();
    assert!(format!("{prepared:?}").contains("\"blocking\""));
}

#[tokio::test]
async fn the_handler_stays_callable() {
    let results = infer(vec![
        Prompt {
            id: 1,
            text: "hi".into(),
        },
        Prompt {
            id: 2,
            text: String::new(),
        },
    ])
    .await;
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[0].as_ref().unwrap(),
        &Completion { text: "HI".into() }
    );
    assert!(results[1].as_ref().unwrap_err().is_dead_letter());
    assert_eq!(crunch(vec![json!(1), json!(2)]).unwrap().len(), 2);
}

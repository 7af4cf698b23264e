//! A batch handler stays an ordinary fn: a test calls it with a `Vec` of items.

use rmq_consumer::{HandlerError, consumer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
pub struct Prompt {
    text: String,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct Completion {
    text: String,
}

struct Model;

impl Model {
    async fn generate(&self, prompts: &[Prompt]) -> Vec<Result<Completion, HandlerError>> {
        prompts
            .iter()
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
}

static MODEL: Model = Model;

#[consumer(
    queue = "llm.infer.b2m",
    reply_key = "llm.infer.m2b",
    batch = 32,
    batch_wait = "15ms"
)]
async fn infer(prompts: Vec<Prompt>) -> Vec<Result<Completion, HandlerError>> {
    MODEL.generate(&prompts).await
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let p1 = Prompt { text: "hi".into() };
    let p2 = Prompt {
        text: String::new(),
    };
    let results = infer(vec![p1, p2]).await;
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[0].as_ref().ok(),
        Some(&Completion { text: "HI".into() })
    );
    assert!(results[1].is_err());
    let _: fn(Vec<Prompt>) -> _ = infer;
}

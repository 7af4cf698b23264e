//! A batch handler shaped like model inference: up to 32 prompts per call, one "forward
//! pass" for all of them, each prompt answered (or refused) on its own.
//!
//! Run it with `cargo run -p examples --example batch` (Ctrl-C stops it gracefully: the
//! batch in flight finishes, the prompts already taken run in full batches). Publish prompts
//! with `cargo run -p rmq-consumer -- publish --queue llm.infer.b2m --count 200 --template
//! '{"id": "p{i}", "text": "tell me about {i}"}'`; the completions arrive on
//! `llm.infer.m2b.queue` (or each prompt's `reply_to`), one per prompt, with its
//! `correlation_id`.
//!
//! The engine gathers a batch until it holds `batch` prompts or its first prompt has waited
//! `batch_wait`; the next batch fills while one runs. A prompt whose body does not decode is
//! dead-lettered on its own and never reaches the model; an empty prompt is refused here
//! (dead-lettered alone, the others of its batch are answered).

use std::time::Duration;

use rmq_consumer::{HandlerError, consumer};
use serde::{Deserialize, Serialize};

/// One request.
#[derive(Debug, Clone, Deserialize)]
struct Prompt {
    id: String,
    text: String,
}

/// One response, for the prompt with the same `id`.
#[derive(Debug, PartialEq, Serialize)]
struct Completion {
    id: String,
    text: String,
    tokens: usize,
}

/// A stand-in for a model: one forward pass costs 20 ms plus 0.3 ms per prompt, nearly the
/// same for 1 prompt as for 32.
async fn generate(prompts: &[Prompt]) -> Vec<Option<Completion>> {
    let per_item = Duration::from_micros(300);
    let items = u32::try_from(prompts.len()).unwrap_or(u32::MAX);
    tokio::time::sleep(Duration::from_millis(20) + per_item.saturating_mul(items)).await;
    prompts
        .iter()
        .map(|prompt| {
            let words = prompt.text.split_whitespace().count();
            (words > 0).then(|| Completion {
                id: prompt.id.clone(),
                text: format!("a completion of: {}", prompt.text),
                tokens: words * 4,
            })
        })
        .collect()
}

/// The task uuid of a prompt (deduplication and the result cache): its id.
fn prompt_id(prompt: &Prompt) -> String {
    prompt.id.clone()
}

/// Up to 32 prompts per call; one result per prompt, in the same order. An `Err` entry
/// fails that prompt alone (`dead_letter`: no retry; `retry` would retry it on its own
/// count).
#[consumer(
    queue = "llm.infer.b2m",
    reply_key = "llm.infer.m2b",
    reply_queue = "llm.infer.m2b.queue",
    uuid = "prompt_id",
    batch = 32,
    batch_wait = "15ms"
)]
async fn infer(prompts: Vec<Prompt>) -> Vec<Result<Completion, HandlerError>> {
    generate(&prompts)
        .await
        .into_iter()
        .map(|completion| completion.ok_or_else(|| HandlerError::dead_letter("empty prompt")))
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), rmq_consumer::Error> {
    rmq_consumer::run().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(id: &str, text: &str) -> Prompt {
        Prompt {
            id: id.to_owned(),
            text: text.to_owned(),
        }
    }

    /// The handler is a plain async fn: call it with a batch.
    #[tokio::test]
    async fn each_prompt_gets_its_own_result_in_order() {
        let out = infer(vec![prompt("a", "two words"), prompt("b", "  ")]).await;
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].as_ref().ok(),
            Some(&Completion {
                id: "a".to_owned(),
                text: "a completion of: two words".to_owned(),
                tokens: 8,
            })
        );
        assert!(out[1].as_ref().is_err_and(HandlerError::is_dead_letter));
    }
}

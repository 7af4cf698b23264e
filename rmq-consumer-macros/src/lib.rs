//! The `#[consumer]` attribute of `rmq-consumer`. Use it through `rmq_consumer::consumer`; this
//! crate's expansion refers to `::rmq_consumer`, and it is versioned in lockstep with it.

mod args;
mod expand;
mod paths;
mod validate;

use proc_macro::TokenStream;

/// Registers an `async fn` as the handler of a RabbitMQ queue.
///
/// ```text
/// use rmq_consumer::{consumer, HandlerError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Deserialize)]
/// struct Task { id: u64, text: String }
///
/// #[derive(Serialize)]
/// struct Summary { id: u64, words: usize }
///
/// fn task_uuid(task: &Task) -> String {
///     task.id.to_string()
/// }
///
/// /// Counts the words of a task; the result is published with routing key `summaries`.
/// #[consumer(queue = "tasks", reply_key = "summaries", uuid = "task_uuid")]
/// async fn summarize(task: Task) -> Result<Summary, HandlerError> {
///     if task.text.is_empty() {
///         return Err(HandlerError::dead_letter("empty text"));
///     }
///     Ok(Summary { id: task.id, words: task.text.split_whitespace().count() })
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), rmq_consumer::Error> {
///     rmq_consumer::run().await
/// }
/// ```
///
/// The fn is left exactly as written, so it can still be called directly (in unit tests, for
/// instance). Next to it the attribute adds a hidden registration that `rmq_consumer::run()`
/// discovers at startup: no list of handlers to maintain.
///
/// # Keys
///
/// | key | value | default | meaning |
/// |---|---|---|---|
/// | `queue` | string | *required* | the queue to consume |
/// | `reply_key` | string | none: no result is published | routing key of the published result |
/// | `reply_queue` | string | none | a queue to declare and bind to `reply_key` |
/// | `uuid` | string: path of a `fn(&T) -> String` | md5 of the body's canonical JSON | the task id, used for deduplication and logs |
/// | `name` | string | the fn's name | the handler's name in logs and in `[consumers.<name>]` of the config file |
/// | `prefetch` | integer, 1 to 65535 | the config's | deliveries in flight for this handler |
/// | `timeout` | integer seconds, at least 1 | the config's | how long one message may take |
/// | `max_retries` | integer, 0 or more | the config's | retries before the message is dead-lettered |
/// | `queue_type` | `"classic"` or `"quorum"` | the config's | the type `queue` is declared with |
/// | `blocking` | `true` or `false`; bare `blocking` means `true` | `false` | run on tokio's blocking thread pool |
/// | `batch` | integer, 1 to 65535 | none: one message per call | a batch handler: the most messages one call takes (see [Batch handlers](#batch-handlers)) |
/// | `batch_wait` | string: a whole number of `ms` or `s`, `"1ms"` to `"3600s"` | the engine's | how long the first message of a batch waits for more; only with `batch` |
///
/// Settings in the configuration file override the attribute's. Unknown and duplicate keys
/// are compile errors.
///
/// # The argument
///
/// Exactly one argument, the message body: `serde_json::Value` to take the JSON as is, or any
/// type implementing `serde::de::DeserializeOwned`. A body that does not decode into it is
/// dead-lettered without calling the fn. Any pattern may bind it (`Task { id, .. }: Task`).
///
/// A type written `Value` or `serde_json::Value` is passed through undecoded; it must then be
/// `serde_json::Value`.
///
/// # The return type
///
/// | declared return type | published result (when `reply_key` is set) | failure |
/// |---|---|---|
/// | none or `()` | nothing | - |
/// | `R` | `R` as JSON | - |
/// | `Option<R>` | `R`, or nothing for `None` | - |
/// | `Result<R, E>` | `R` | `E` |
/// | `Result<Option<R>, E>` | `R`, or nothing for `None` | `E` |
/// | `Result<(), E>` | nothing | `E` |
///
/// `R` implements `serde::Serialize` and `E` converts into `rmq_consumer::HandlerError`: any
/// `std::error::Error + Send + Sync + 'static` is retried, `HandlerError::dead_letter` is not.
/// The shape is read from how the type is written, so a one-argument alias such as
/// `Result<R>` works, but an alias under another name is treated as a plain `R`.
///
/// # Blocking handlers
///
/// CPU-bound work on the async runtime starves the connection's heartbeats. With
/// `blocking = true` the handler runs on tokio's blocking thread pool, and may be a plain
/// `fn`:
///
/// ```text
/// #[consumer(queue = "images", reply_key = "thumbnails", blocking = true)]
/// fn thumbnail(image: Image) -> Result<Thumbnail, HandlerError> {
///     resize(&image)
/// }
/// ```
///
/// An `async fn` with `blocking = true` is driven to completion on a blocking thread.
///
/// # Batch handlers
///
/// With `batch = N` the handler takes up to `N` messages per call, as a `Vec`, and returns one
/// result per message:
///
/// ```text
/// #[consumer(queue = "llm.infer.b2m", reply_key = "llm.infer.m2b", batch = 32, batch_wait = "15ms")]
/// async fn infer(prompts: Vec<Prompt>) -> Vec<Result<Completion, HandlerError>> {
///     model.generate(&prompts).await
/// }
/// ```
///
/// A batch is handed to the fn when it is full or when its first message has waited
/// `batch_wait`, whichever comes first. Each message is still answered, retried and
/// dead-lettered on its own: the returned `Vec` has one entry per input, in the same order,
/// and entry `i` is the result of message `i`. A `Vec` of the wrong length, a panic or a
/// timeout fails every message of the batch. A message is decoded (and its task uuid
/// computed) on its own before it joins a batch, so a body that does not fit `T` is
/// dead-lettered without holding up the others; a message redelivered after a worker crash
/// runs alone, as a batch of one.
///
/// The argument is `Vec<T>`, with `T` as for any handler (`serde_json::Value` or any
/// `DeserializeOwned` type); the `uuid` fn takes one item, `fn(&T) -> String`. The return
/// type is `Vec<X>` with `X` one of the shapes of the table above (`R`, `()`, `Option<R>`,
/// `Result<R, E>`, `Result<(), E>`, `Result<Option<R>, E>`), or `Result<Vec<X>, E>`, whose
/// `Err` fails every message of the batch. `blocking = true` works as for other handlers. The
/// fn stays callable: a unit test calls `infer(vec![p1, p2]).await`.
///
/// # Restrictions
///
/// Handlers are free functions (not methods), neither generic, `const`, `unsafe` nor
/// `extern`, and their future must be `Send`. The `uuid` path is resolved from the handler's
/// module.
#[proc_macro_attribute]
pub fn consumer(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::consumer(attr.into(), item.into()).into()
}

//! Reliable RabbitMQ consumers from an attribute on an async fn.
//!
//! Annotate a handler with [`#[consumer]`](consumer) and call [`run`]: the engine connects,
//! declares the topology, consumes with bounded concurrency, publishes each result with
//! publisher confirms before acking its input, retries failures with a counted
//! `x-retry-count`, dead-letters what cannot be processed, reconnects after broker trouble,
//! and drains on SIGINT/SIGTERM.
//!
//! ```no_run
//! use rmq_consumer::consumer;
//! use serde_json::{Value, json};
//!
//! fn task_uuid(data: &Value) -> String {
//!     rmq_consumer::uuid::md5_json(data)
//! }
//!
//! #[consumer(queue = "llm.task.b2m.queue", reply_key = "llm.task.m2b", uuid = "task_uuid")]
//! async fn summarize(data: Value) -> Result<Option<Value>, rmq_consumer::HandlerError> {
//!     Ok(Some(json!({"code": 200, "message": "success", "data": data})))
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), rmq_consumer::Error> {
//!     rmq_consumer::run().await
//! }
//! ```
//!
//! The handler stays a plain async fn: a unit test calls `summarize(json!({"a": 1})).await`.
//!
//! Handlers may take `serde_json::Value` or any `T: DeserializeOwned`, and return `R`,
//! `Option<R>`, `Result<R, E>` or `Result<Option<R>, E>` with `R: Serialize` and
//! `E: Into<HandlerError>` (any `std::error::Error` converts); `None` publishes nothing.
//! A [`HandlerError`] says whether to retry (the default) or dead-letter at once.
//!
//! Configuration comes from `rmq-consumer.toml` (or `$RMQ_CONSUMER_CONFIG`) and
//! `RMQ_CONSUMER_*` environment variables; see [`Config`].
//!
//! How the crate is put together (the path of one delivery, where each concept lives, the
//! invariants and why) is described in `ARCHITECTURE.md` at the repository root.

mod amqp;
mod body;
mod cache;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
mod connection;
mod engine;
pub mod error;
pub mod handler;
pub mod headers;
pub mod health;
mod hostile;
mod http;
pub mod logging;
mod metrics;
pub mod publisher;
pub mod registry;
pub mod retry;
pub(crate) mod settings;
mod shutdown;
mod store;
pub mod text;
pub mod tls;
mod topology;
mod trace;
pub mod uuid;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use config::Config;
pub use engine::{Engine, EngineBuilder};
pub use error::Error;
pub use handler::{FailureAction, HandlerError, HandlerOutput};
pub use health::{HandlerSnapshot, HealthHandle, HealthSnapshot};
pub use rmq_consumer_macros::consumer;
pub use shutdown::FORCED_EXIT_CODE;

/// Runs every registered handler until SIGINT or SIGTERM, with the configuration from
/// `rmq-consumer.toml` (or `$RMQ_CONSUMER_CONFIG`) and `RMQ_CONSUMER_*` variables.
///
/// Installs the global tracing subscriber (console, and files when `log_dir` is set).
///
/// # Errors
/// An invalid configuration, handlers that do not fit together, a topology the broker
/// refuses or (with `declare = false`) that is missing. Broker outages are not errors: the engine reconnects.
pub async fn run() -> Result<(), Error> {
    let config = Config::load()?;
    run_with(config).await
}

/// Like [`run`], with a configuration built by the caller.
///
/// # Errors
/// See [`run`].
pub async fn run_with(config: Config) -> Result<(), Error> {
    let _guard = match logging::init(&config.log) {
        Ok(guard) => Some(guard),
        Err(logging::LoggingError::AlreadyInitialized) => None,
        Err(error) => return Err(error.into()),
    };
    let engine = Engine::builder(config).build()?;
    shutdown::listen(engine.shutdown_token()).map_err(Error::Signal)?;
    for (name, queue) in engine.handlers() {
        tracing::info!(handler = %name, queue = %queue, "handler registered");
    }
    let result = engine.run().await;
    if let Err(error) = &result {
        tracing::error!(error = %error::chain(error), "stopped");
    }
    result
}

//! Reliable RabbitMQ consumers from an attribute on an async fn. (Crate docs: TODO by lead.)

pub mod config;
pub mod handler;
pub mod logging;
pub mod registry;
pub mod uuid;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use handler::{FailureAction, HandlerError, HandlerOutput};
pub use rmq_consumer_macros::consumer;

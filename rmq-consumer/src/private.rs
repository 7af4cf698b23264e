//! Not public API: items the `#[consumer]` expansion refers to. Nothing here is covered by
//! semver.

pub use inventory;
pub use serde_json::Value;

pub use crate::handler::{HandlerError, HandlerOutput};
pub use crate::registry::{HandlerFuture, HandlerSpec, Prepared};

/// Not public API: the default task uuid (md5 of the canonical JSON of the body).
#[must_use]
pub fn default_task_uuid(value: &Value) -> String {
    crate::uuid::md5_json(value)
}

/// Not public API: the default task uuid of a typed handler's body, from its bytes (the same
/// as [`default_task_uuid`] of the parsed body, without building a [`Value`]).
///
/// # Errors
/// A [`HandlerError`] of kind `invalid_json` when the body is not JSON.
pub fn default_task_uuid_of_body(body: &[u8]) -> Result<String, HandlerError> {
    crate::uuid::md5_json_slice(body).map_err(crate::body::not_json)
}

/// Not public API: parses the body of a `Value` handler.
///
/// # Errors
/// A [`HandlerError`] of kind `invalid_json` when the body is not JSON.
pub fn parse(body: &[u8]) -> Result<Value, HandlerError> {
    serde_json::from_slice(body).map_err(crate::body::not_json)
}

/// Not public API: decodes the argument of a typed handler straight from the body's bytes; a
/// mismatch dead-letters the message.
///
/// # Errors
/// A [`HandlerError`] of kind `invalid_shape` when the JSON does not fit `T`.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(body).map_err(|error| {
        HandlerError::with_kind(
            crate::handler::FailureAction::DeadLetter,
            "invalid_shape",
            format_args!("the message does not fit the handler's argument type: {error}"),
        )
    })
}

/// Not public API: runs an async handler's future to completion on a blocking thread.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(future)
}

/// Not public API: conversions from each supported return shape to a [`HandlerOutput`].
pub mod output {
    use serde::Serialize;

    use crate::handler::{HandlerError, HandlerOutput, encode};

    /// Not public API: `R`.
    pub fn value<R: Serialize>(result: R) -> HandlerOutput {
        encode(result)
    }

    /// Not public API: `()` publishes nothing.
    pub fn unit(_result: ()) -> HandlerOutput {
        Ok(None)
    }

    /// Not public API: `Option<R>`; `None` publishes nothing.
    pub fn option<R: Serialize>(result: Option<R>) -> HandlerOutput {
        result.map_or(Ok(None), encode)
    }

    /// Not public API: `Result<R, E>`.
    ///
    /// # Errors
    /// The handler's error, converted.
    pub fn result<R: Serialize, E: Into<HandlerError>>(result: Result<R, E>) -> HandlerOutput {
        result.map_err(Into::into).and_then(encode)
    }

    /// Not public API: `Result<(), E>`.
    ///
    /// # Errors
    /// The handler's error, converted.
    pub fn result_unit<E: Into<HandlerError>>(result: Result<(), E>) -> HandlerOutput {
        result.map(|()| None).map_err(Into::into)
    }

    /// Not public API: `Result<Option<R>, E>`.
    ///
    /// # Errors
    /// The handler's error, converted.
    pub fn result_option<R: Serialize, E: Into<HandlerError>>(
        result: Result<Option<R>, E>,
    ) -> HandlerOutput {
        result
            .map_err(Into::into)
            .and_then(|r| r.map_or(Ok(None), encode))
    }
}

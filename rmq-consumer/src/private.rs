//! Not public API: items the `#[consumer]` expansion refers to. Nothing here is covered by
//! semver.

pub use inventory;
pub use serde_json::Value;

pub use crate::handler::{HandlerError, HandlerOutput};
pub use crate::registry::{
    BatchFuture, BatchOutput, BatchRun, BatchSpec, HandlerFuture, HandlerSpec, Item, Prepared,
    PreparedItem,
};

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

/// Not public API: the items of one batch, back to the handler's argument type.
///
/// # Errors
/// A retryable [`HandlerError`] of kind `batch_item_type` when an item is not a `T` (a bug:
/// the engine only gathers items its handler's own `prepare` made).
pub fn downcast_items<T: 'static>(items: Vec<Item>) -> Result<Vec<T>, HandlerError> {
    items
        .into_iter()
        .map(|item| {
            item.downcast::<T>().map(|item| *item).map_err(|_| {
                HandlerError::with_kind(
                    crate::handler::FailureAction::Retry,
                    "batch_item_type",
                    "a batch item is not of the handler's argument type",
                )
            })
        })
        .collect()
}

/// Not public API: conversions from each supported batch return shape to a [`BatchOutput`],
/// and from a batch of one back to one message's [`HandlerOutput`].
pub mod batch {
    use serde::Serialize;

    use crate::handler::{FailureAction, HandlerError, HandlerOutput, encode};
    use crate::registry::BatchOutput;

    /// Not public API: `Vec<R>`.
    pub fn vec_value<R: Serialize>(results: Vec<R>) -> BatchOutput {
        Ok(results.into_iter().map(encode).collect())
    }

    /// Not public API: `Vec<()>`: nothing to publish.
    pub fn vec_unit(results: Vec<()>) -> BatchOutput {
        Ok(results.into_iter().map(|()| Ok(None)).collect())
    }

    /// Not public API: `Vec<Option<R>>`; a `None` publishes nothing for its item.
    pub fn vec_option<R: Serialize>(results: Vec<Option<R>>) -> BatchOutput {
        Ok(results
            .into_iter()
            .map(|r| r.map_or(Ok(None), encode))
            .collect())
    }

    /// Not public API: `Vec<Result<R, E>>`: an `Err` fails its item alone.
    pub fn vec_result<R: Serialize, E: Into<HandlerError>>(
        results: Vec<Result<R, E>>,
    ) -> BatchOutput {
        Ok(results
            .into_iter()
            .map(|r| r.map_err(Into::into).and_then(encode))
            .collect())
    }

    /// Not public API: `Vec<Result<(), E>>`.
    pub fn vec_result_unit<E: Into<HandlerError>>(results: Vec<Result<(), E>>) -> BatchOutput {
        Ok(results
            .into_iter()
            .map(|r| r.map(|()| None).map_err(Into::into))
            .collect())
    }

    /// Not public API: `Vec<Result<Option<R>, E>>`.
    pub fn vec_result_option<R: Serialize, E: Into<HandlerError>>(
        results: Vec<Result<Option<R>, E>>,
    ) -> BatchOutput {
        Ok(results
            .into_iter()
            .map(|r| {
                r.map_err(Into::into)
                    .and_then(|r| r.map_or(Ok(None), encode))
            })
            .collect())
    }

    /// Not public API: `Result<V, E>` around one of the shapes above: an `Err` fails every
    /// item.
    ///
    /// # Errors
    /// The handler's error, converted.
    pub fn result<V, E: Into<HandlerError>>(
        result: Result<V, E>,
        inner: fn(V) -> BatchOutput,
    ) -> BatchOutput {
        result.map_err(Into::into).and_then(inner)
    }

    /// Not public API: the one output of a batch of one (the suspect queue runs each message
    /// alone).
    ///
    /// # Errors
    /// The batch's error, or a retryable `batch_size_mismatch` error when the handler did not
    /// return exactly one output.
    pub fn single(output: BatchOutput) -> HandlerOutput {
        let mut outputs = output?;
        match (outputs.pop(), outputs.is_empty()) {
            (Some(output), true) => output,
            (popped, _) => Err(HandlerError::with_kind(
                FailureAction::Retry,
                "batch_size_mismatch",
                format_args!(
                    "the batch handler returned {} results for 1 item",
                    outputs.len().saturating_add(usize::from(popped.is_some()))
                ),
            )),
        }
    }
}

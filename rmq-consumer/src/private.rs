//! Not public API: items the `#[consumer]` expansion refers to. Nothing here is covered by
//! semver.

pub use inventory;
pub use serde_json::Value;

pub use crate::handler::{HandlerError, HandlerOutput};

/// Not public API: the engine's confirm-lane publisher, reached by the integration tests
/// (`tests/tests/fault_topology.rs`, `fault_network.rs`) only.
pub mod publisher {
    pub use crate::publisher::{DEFAULT_PUBLISH_CHANNELS, Publisher};
}
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
    use crate::registry::{BatchCall, BatchOutput, BatchRun, HandlerFuture, Prepared};

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

    /// Not public API: one message's call of a batch handler, bound as a batch of one (the
    /// suspect queue runs each message alone), as a [`Prepared`] whose output is converted
    /// back to one with [`single`].
    pub fn alone(task_uuid: String, run: BatchRun) -> Prepared {
        match run.call {
            BatchCall::Async(future) => Prepared::new(task_uuid, move || -> HandlerFuture {
                Box::pin(async move { single(future.await) })
            }),
            BatchCall::Blocking(call) => Prepared::blocking(task_uuid, move || single(call())),
        }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::handler::FailureAction;

    /// Each output's published value, or its error's kind; empty when the whole failed.
    fn kinds(output: &BatchOutput) -> Vec<Result<Option<Value>, &'static str>> {
        output
            .as_ref()
            .map(|outputs| {
                outputs
                    .iter()
                    .map(|output| match output {
                        Ok(value) => Ok(value.clone()),
                        Err(error) => Err(error.kind()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[derive(Debug)]
    struct Oops;

    impl std::fmt::Display for Oops {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("oops")
        }
    }

    impl std::error::Error for Oops {}

    #[test]
    fn every_batch_shape_gives_one_output_per_item_in_order() {
        assert_eq!(
            kinds(&batch::vec_value(vec![1, 2])),
            [Ok(Some(json!(1))), Ok(Some(json!(2)))]
        );
        assert_eq!(kinds(&batch::vec_unit(vec![(), ()])), [Ok(None), Ok(None)]);
        assert_eq!(
            kinds(&batch::vec_option(vec![None, Some("a")])),
            [Ok(None), Ok(Some(json!("a")))]
        );
        assert_eq!(
            kinds(&batch::vec_result(vec![
                Ok(1),
                Err(HandlerError::dead_letter("bad")),
                Ok(3)
            ])),
            [
                Ok(Some(json!(1))),
                Err("handler_rejected"),
                Ok(Some(json!(3)))
            ]
        );
        let units: Vec<Result<(), Oops>> = vec![Err(Oops), Ok(())];
        let output = batch::vec_result_unit(units);
        assert_eq!(kinds(&output), [Err("handler_error"), Ok(None)]);
        let failed = output.unwrap().remove(0).unwrap_err();
        assert_eq!(failed.action(), FailureAction::Retry);
        assert_eq!(failed.message(), "oops");
        assert_eq!(
            kinds(&batch::vec_result_option(vec![
                Ok(Some(true)),
                Ok(None),
                Err(HandlerError::retry("later")),
            ])),
            [Ok(Some(json!(true))), Ok(None), Err("handler_error")]
        );
        assert!(kinds(&batch::vec_value(Vec::<u8>::new())).is_empty());
    }

    #[test]
    fn a_failed_whole_fails_the_batch() {
        let ok: Result<Vec<u8>, Oops> = Ok(vec![7]);
        assert_eq!(
            kinds(&batch::result(ok, batch::vec_value)),
            [Ok(Some(json!(7)))]
        );
        let err: Result<Vec<()>, Oops> = Err(Oops);
        let error = batch::result(err, batch::vec_unit).unwrap_err();
        assert_eq!(
            (error.action(), error.message()),
            (FailureAction::Retry, "oops")
        );
    }

    #[test]
    fn a_batch_of_one_gives_its_one_output() {
        assert_eq!(
            batch::single(batch::vec_value(vec!["a"])).unwrap(),
            Some(json!("a"))
        );
        let error = batch::single(batch::vec_result(vec![Err::<u8, _>(
            HandlerError::dead_letter("no"),
        )]))
        .unwrap_err();
        assert!(error.is_dead_letter());
        let error = batch::single(Err(HandlerError::dead_letter("all"))).unwrap_err();
        assert_eq!(error.message(), "all");
        for (outputs, count) in [(vec![], 0), (vec![1, 2], 2)] {
            let error = batch::single(batch::vec_value(outputs)).unwrap_err();
            assert_eq!(error.kind(), "batch_size_mismatch");
            assert_eq!(error.action(), FailureAction::Retry);
            assert_eq!(
                error.message(),
                format!("the batch handler returned {count} results for 1 item")
            );
        }
    }

    #[test]
    fn items_downcast_to_their_type_only() {
        let items: Vec<Item> = vec![
            PreparedItem::new("a".to_owned(), 1_u32).item,
            PreparedItem::new("b".to_owned(), 2_u32).item,
        ];
        assert_eq!(downcast_items::<u32>(items).unwrap(), [1, 2]);
        let items: Vec<Item> = vec![Box::new(1_u32), Box::new("two")];
        let error = downcast_items::<u32>(items).unwrap_err();
        assert_eq!(error.kind(), "batch_item_type");
        assert_eq!(error.action(), FailureAction::Retry);
    }

    #[tokio::test]
    async fn a_batch_run_yields_the_converted_outputs() {
        // What the expansion of `async fn h(items: Vec<u32>) -> Vec<u32>` binds.
        let items = downcast_items::<u32>(vec![Box::new(1_u32), Box::new(2_u32)]).unwrap();
        let run = BatchRun::new(Box::pin(async move {
            batch::vec_value(items.into_iter().map(|n| n * 10).collect::<Vec<_>>())
        }));
        assert_eq!(format!("{run:?}"), "BatchRun { call: \"async\" }");
        let crate::registry::BatchCall::Async(future) = run.call else {
            panic!("an async call");
        };
        assert_eq!(
            kinds(&future.await),
            [Ok(Some(json!(10))), Ok(Some(json!(20)))]
        );
        let run = BatchRun::blocking(|| batch::vec_unit(vec![()]));
        let crate::registry::BatchCall::Blocking(call) = run.call else {
            panic!("a blocking call");
        };
        assert_eq!(kinds(&call()), [Ok(None)]);
    }

    #[tokio::test]
    async fn a_batch_of_one_runs_as_one_message() {
        let run = BatchRun::new(Box::pin(async { batch::vec_value(vec![5]) }));
        let prepared = batch::alone("u".to_owned(), run);
        assert_eq!(prepared.task_uuid(), "u");
        let crate::registry::Call::Async(call) = prepared.call else {
            panic!("an async call");
        };
        assert_eq!(call().await.unwrap(), Some(json!(5)));

        let run = BatchRun::blocking(|| batch::vec_unit(vec![(), ()]));
        let crate::registry::Call::Blocking(call) = batch::alone("v".to_owned(), run).call else {
            panic!("a blocking call");
        };
        assert_eq!(call().unwrap_err().kind(), "batch_size_mismatch");
    }
}

//! One handler call: the handler's bound call run under `message_timeout`, its panics caught
//! as retryable failures, and a blocking call that overran left for its slot to wait for.
//! Used by the pipeline (one delivery, one call) and the batcher (one call per batch).

use std::{panic::AssertUnwindSafe, time::Duration};

use futures_util::FutureExt;

use crate::{
    handler::{FailureAction, HandlerError, HandlerOutput},
    registry::Call,
};

/// A blocking handler's thread that outlived its `message_timeout`, left for its slot to wait
/// for.
pub(super) type Overrun = std::sync::Mutex<Option<tokio::task::JoinHandle<HandlerOutput>>>;

/// Runs the handler call under the timeout, turning panics into retryable errors. A blocking
/// call that times out leaves its thread in `overrun`.
pub(super) async fn run_call(call: Call, timeout: Duration, overrun: &Overrun) -> HandlerOutput {
    let timed_out = || {
        Err(HandlerError::with_kind(
            FailureAction::Retry,
            "timeout",
            format_args!("the handler did not finish within {timeout:?}"),
        ))
    };
    match call {
        Call::Async(call) => {
            let run = AssertUnwindSafe(async move { call().await }).catch_unwind();
            match tokio::time::timeout(timeout, run).await {
                Ok(Ok(output)) => output,
                Ok(Err(panic)) => Err(panicked("the handler", &*panic)),
                Err(_) => timed_out(),
            }
        }
        Call::Blocking(call) => {
            let mut thread = tokio::task::spawn_blocking(call);
            match tokio::time::timeout(timeout, &mut thread).await {
                Ok(Ok(output)) => output,
                Ok(Err(error)) if error.is_panic() => {
                    Err(panicked("the handler", &*error.into_panic()))
                }
                Ok(Err(error)) => Err(HandlerError::with_kind(
                    FailureAction::Retry,
                    "cancelled",
                    error,
                )),
                Err(_) => {
                    *overrun
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(thread);
                    timed_out()
                }
            }
        }
    }
}

pub(super) fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> HandlerError {
    let message = panic_message(payload);
    HandlerError::with_kind(
        FailureAction::Retry,
        "handler_panicked",
        format_args!("{what} panicked: {message}"),
    )
}

/// A panic's message, when it has one.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-text panic payload)")
}

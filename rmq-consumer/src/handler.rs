//! What a handler returns: its failure type, [`HandlerError`], and the conversions the
//! `#[consumer]` attribute uses to turn any supported return type into a result.

use std::fmt;

/// What the engine should do with a message whose handler failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureAction {
    /// Try again later: publish a copy with `x-retry-count` + 1 (after the configured delay),
    /// and dead-letter it once `max_retry_count` retries are spent. The default.
    Retry,
    /// Do not retry: send the message to the dead-letter queue now (or reject it when
    /// dead-lettering is off).
    DeadLetter,
}

/// The error a handler returns.
///
/// It carries a message and a [`FailureAction`]. Any `std::error::Error` converts into a
/// retryable `HandlerError`, so `?` works inside handlers:
///
/// ```
/// use rmq_consumer::HandlerError;
///
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     let n: u32 = s.parse()?; // a ParseIntError becomes a retryable HandlerError
///     if n == 0 {
///         return Err(HandlerError::dead_letter("zero is not a valid task size"));
///     }
///     Ok(n)
/// }
/// assert!(parse("0").unwrap_err().is_dead_letter());
/// assert!(!parse("x").unwrap_err().is_dead_letter());
/// ```
///
/// Like `anyhow::Error`, `HandlerError` deliberately does not implement
/// `std::error::Error` itself, which is what makes the blanket `From` possible.
pub struct HandlerError {
    action: FailureAction,
    message: String,
    kind: &'static str,
}

impl HandlerError {
    /// A failure worth retrying (a timeout downstream, a busy model server, ...).
    pub fn retry(message: impl fmt::Display) -> Self {
        Self {
            action: FailureAction::Retry,
            message: message.to_string(),
            kind: "handler_error",
        }
    }

    /// A failure that retrying cannot fix: the message goes to the dead-letter queue at once.
    pub fn dead_letter(message: impl fmt::Display) -> Self {
        Self {
            action: FailureAction::DeadLetter,
            message: message.to_string(),
            kind: "handler_rejected",
        }
    }

    /// Alias of [`HandlerError::dead_letter`], for readers coming from `reject(requeue=False)`.
    pub fn reject(message: impl fmt::Display) -> Self {
        Self::dead_letter(message)
    }

    /// Builds an error with an explicit action and kind (used by the engine for decode errors).
    pub(crate) fn with_kind(
        action: FailureAction,
        kind: &'static str,
        message: impl fmt::Display,
    ) -> Self {
        Self {
            action,
            message: message.to_string(),
            kind,
        }
    }

    /// What the engine will do with the message.
    #[must_use]
    pub fn action(&self) -> FailureAction {
        self.action
    }

    /// `true` when the message goes to the dead-letter queue without further retries.
    #[must_use]
    pub fn is_dead_letter(&self) -> bool {
        self.action == FailureAction::DeadLetter
    }

    /// The human-readable reason.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// A short machine-readable kind, written into the `x-error-kind` dead-letter header.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("action", &self.action)
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        Self::retry(crate::error::chain(&error))
    }
}

/// What a handler produced, in the shape the engine publishes: `None` publishes nothing.
pub type HandlerOutput = Result<Option<serde_json::Value>, HandlerError>;

pub(crate) fn encode<R: serde::Serialize>(value: R) -> HandlerOutput {
    serde_json::to_value(value).map(Some).map_err(|error| {
        HandlerError::with_kind(
            FailureAction::DeadLetter,
            "result_not_serializable",
            format_args!("the handler's result cannot be serialized to JSON: {error}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_errors_convert_to_retry_with_their_chain() {
        let error: HandlerError = "x".parse::<u8>().unwrap_err().into();
        assert_eq!(error.action(), FailureAction::Retry);
        assert!(error.message().contains("invalid digit"));
    }

    #[test]
    fn dead_letter_and_reject_are_the_same() {
        assert!(HandlerError::reject("no").is_dead_letter());
        assert_eq!(HandlerError::dead_letter("no").kind(), "handler_rejected");
        assert_eq!(HandlerError::retry("later").to_string(), "later");
    }
}

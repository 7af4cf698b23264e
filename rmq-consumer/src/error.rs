//! Error types. One enum per concern, wrapped by the top-level [`Error`].

use lapin::protocol::AMQPSoftError;
use std::time::Duration;

pub use crate::config::ConfigError;
pub use crate::logging::LoggingError;

/// Everything [`crate::run`] can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Logging could not be set up.
    #[error(transparent)]
    Logging(#[from] LoggingError),
    /// The registered handlers do not fit together or with the configuration.
    #[error(transparent)]
    Setup(Box<SetupError>),
    /// The broker refused the topology (a queue exists with other arguments, a permission is
    /// missing, ...).
    #[error(transparent)]
    Topology(Box<TopologyError>),
    /// With `declare = false`, objects the handlers need do not exist (each named once).
    #[error("{}", missing_text(.0))]
    MissingTopology(Vec<MissingObject>),
    /// The HTTP listener (`http_addr`) could not be bound.
    #[error("cannot listen on {addr} for /metrics, /livez and /readyz")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot listen for shutdown signals")]
    Signal(#[source] std::io::Error),
    /// The shared result store (`result_store`) cannot be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SetupError> for Error {
    fn from(error: SetupError) -> Self {
        Self::Setup(Box::new(error))
    }
}

impl From<TopologyError> for Error {
    fn from(error: TopologyError) -> Self {
        Self::Topology(Box::new(error))
    }
}

/// Problems found when matching handlers with the configuration, before connecting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// No handler is registered (or every one is disabled).
    #[error(
        "no #[consumer] handler is registered in this binary (or all are disabled with `enabled = false`)"
    )]
    NoHandlers,
    /// Two handlers consume the same queue.
    #[error(
        "handlers `{first}` ({first_location}) and `{second}` ({second_location}) both consume queue `{queue}`"
    )]
    DuplicateQueue {
        /// The queue.
        queue: String,
        /// The first handler's name.
        first: String,
        /// Where the first handler is declared.
        first_location: String,
        /// The second handler's name.
        second: String,
        /// Where the second handler is declared.
        second_location: String,
    },
    /// Two handlers share a name.
    #[error(
        "two handlers are named `{name}` ({first_location} and {second_location}); give one a `name = \"...\"`"
    )]
    DuplicateName {
        /// The name.
        name: String,
        /// Where the first is declared.
        first_location: String,
        /// Where the second is declared.
        second_location: String,
    },
    /// A top-level `queue`/`reply_key`/`reply_queue` (the Python template's keys) was set while
    /// several handlers are registered.
    #[error(
        "top-level `{key}` applies to a single handler, but {count} are registered: set it under [consumers.<name>] instead"
    )]
    AmbiguousOverride {
        /// The key.
        key: &'static str,
        /// How many handlers are registered.
        count: usize,
    },
    /// A `[consumers.<name>]` section names no registered handler.
    #[error("config section [consumers.{name}] matches no registered handler (known: {known})")]
    UnknownConsumer {
        /// The section name.
        name: String,
        /// The registered names.
        known: String,
    },
    /// A name is not usable as an AMQP name (empty or longer than 255 bytes).
    #[error("{what} `{name}` is not a valid AMQP name: it must be 1 to 255 bytes")]
    InvalidName {
        /// What the name is for.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A handler's settings are out of range.
    #[error("handler `{handler}`: {problem}")]
    InvalidSetting {
        /// The handler.
        handler: String,
        /// What is wrong.
        problem: String,
    },
}

/// The broker refused a step of setting up a handler's topology or subscription.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} `{name}`")]
pub struct TopologyError {
    /// The step that failed: `declare exchange`, `declare queue`, `check queue`, `bind`,
    /// `open a channel for`, `open the publish channels of`, `set basic.qos on queue`,
    /// `consume from queue`.
    pub what: &'static str,
    /// Its name.
    pub name: String,
    /// The broker's answer.
    #[source]
    pub source: lapin::Error,
}

impl TopologyError {
    /// `true` when the broker refused in a way that retrying cannot fix: 406
    /// PRECONDITION_FAILED (a queue exists with other arguments) or 403 ACCESS_REFUSED (a
    /// permission is missing). `false` for connection trouble and for refusals that can pass
    /// by themselves, which are retried with backoff: 404 NOT_FOUND (an exchange deleted while
    /// a queue was being bound to it, a classic queue whose node is down) and 405
    /// RESOURCE_LOCKED (an exclusive queue another connection still holds).
    #[must_use]
    pub fn is_refusal(&self) -> bool {
        matches!(
            soft_error(&self.source),
            Some(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED)
        )
    }
}

/// The channel-level error the broker answered with, if it was one.
pub(crate) fn soft_error(error: &lapin::Error) -> Option<&AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => match e.kind() {
            lapin::protocol::AMQPErrorKind::Soft(soft) => Some(soft),
            lapin::protocol::AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// The broker's 404 NOT_FOUND (e.g. a passive declare of an object that does not exist).
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    matches!(soft_error(error), Some(AMQPSoftError::NOTFOUND))
}

/// The broker's 406 PRECONDITION_FAILED (e.g. a declare whose arguments differ from the
/// queue's).
pub(crate) fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(soft_error(error), Some(AMQPSoftError::PRECONDITIONFAILED))
}

/// An exchange or queue a handler needs that a passive declare did not find
/// (`declare = false`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MissingObject {
    /// `exchange` or `queue`.
    pub what: &'static str,
    /// Its name.
    pub name: String,
    /// The handler that needs it.
    pub handler: String,
}

impl std::fmt::Display for MissingObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} `{}` (handler `{}`) is missing: needs configure permission on `{}` or create it",
            self.what, self.name, self.handler, self.name
        )
    }
}

fn missing_text(missing: &[MissingObject]) -> String {
    let list = missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    format!(
        "declare = false and {} object(s) the handlers need are missing (an administrator creates them, see the README's least privilege): {list}",
        missing.len()
    )
}

/// A publish that the broker did not take responsibility for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("publishing to exchange `{exchange}` with routing key `{routing_key}` failed")]
    Channel {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The failure.
        #[source]
        source: lapin::Error,
    },
    /// The exchange does not exist: the broker refused a publish to it (404) and closed the
    /// channel, failing every unconfirmed publish of the channel to that exchange (one of
    /// them may have been routed before the exchange went away).
    #[error(
        "exchange `{exchange}` does not exist: publishing with routing key `{routing_key}` failed"
    )]
    ExchangeNotFound {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The broker's channel close.
        #[source]
        source: lapin::Error,
    },
    /// The broker returned the message: no queue is bound for the routing key.
    #[error(
        "message to exchange `{exchange}` with routing key `{routing_key}` was returned as unroutable ({reply_code} {reply_text})"
    )]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The broker's reply code (312 NO_ROUTE).
        reply_code: u16,
        /// The broker's reply text.
        reply_text: String,
    },
    /// The broker nacked the message (e.g. a full queue with `overflow = reject-publish`).
    #[error(
        "the broker refused (nacked) the message to exchange `{exchange}` with routing key `{routing_key}`"
    )]
    Nacked {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// No confirm arrived in time.
    #[error(
        "no publisher confirm for the message to exchange `{exchange}` with routing key `{routing_key}` within {after:?}"
    )]
    ConfirmTimeout {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The wait.
        after: Duration,
    },
    /// The publisher was closed (the session is ending) before the message was sent.
    #[error(
        "the message to exchange `{exchange}` with routing key `{routing_key}` was not sent: the publisher is closed"
    )]
    Closed {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
}

impl PublishError {
    /// Whether the broker may have kept the message all the same: it was sent, but its
    /// confirm did not come in time ([`Self::ConfirmTimeout`]) or its channel failed before
    /// the confirm ([`Self::Channel`], [`Self::ExchangeNotFound`]: the close may have come for
    /// a later publish). A returned, nacked or unsent message was not kept.
    #[must_use]
    pub fn may_have_been_kept(&self) -> bool {
        matches!(
            self,
            Self::Channel { .. } | Self::ConfirmTimeout { .. } | Self::ExchangeNotFound { .. }
        )
    }

    /// A short machine-readable kind, for headers and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Channel { .. } => "publish_failed",
            Self::ExchangeNotFound { .. } => "exchange_not_found",
            Self::Unroutable { .. } => "result_unroutable",
            Self::Nacked { .. } => "result_nacked",
            Self::ConfirmTimeout { .. } => "confirm_timeout",
            Self::Closed { .. } => "publisher_closed",
        }
    }
}

/// A connection attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL does not parse as an AMQP URI.
    #[error("invalid broker URL {url}")]
    InvalidUrl {
        /// The URL, password masked.
        url: String,
    },
    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to {url}")]
    Failed {
        /// The URL, password masked.
        url: String,
        /// The failure.
        #[source]
        source: lapin::Error,
    },
    /// The TLS handshake failed: `problem` says why in an operator's words ("issued by an
    /// unknown CA", "name mismatch", "the broker requires a client certificate ...").
    #[error("cannot connect to {url}: {problem}")]
    Tls {
        /// The URL, password masked.
        url: String,
        /// What went wrong, in words.
        problem: String,
        /// The failure.
        #[source]
        source: lapin::Error,
    },
    /// The TLS settings (`tls_ca_file`, `tls_cert_file`, `tls_key_file`) cannot be used.
    #[error("the TLS settings cannot be used")]
    TlsSettings {
        /// What is wrong with them.
        #[source]
        source: crate::tls::TlsError,
    },
    /// The attempt did not finish in time.
    #[error("connecting to {url} timed out after {after:?}")]
    TimedOut {
        /// The URL, password masked.
        url: String,
        /// The limit.
        after: std::time::Duration,
    },
}

/// The shared result store (`result_store`) failed. The engine goes on without it (the
/// handler runs); only setting it up ([`StoreError::InvalidUrl`], [`StoreError::TlsFile`])
/// stops the engine. No variant holds the URL's password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL is not one the Redis client accepts.
    #[error("invalid result_store URL `{url}`")]
    InvalidUrl {
        /// The URL, password masked.
        url: String,
    },
    /// A TLS file for `rediss://` cannot be read.
    #[error("cannot read {path} for the result store's TLS")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The store is down (an earlier call failed) and the next probe is not due: the call was
    /// not made.
    #[error("the result store {url} is down (probed again within a second)")]
    Down {
        /// The URL, password masked.
        url: String,
    },
    /// The store answered with an error or the connection failed.
    #[error("the result store {url} failed: {message}")]
    Failed {
        /// The URL, password masked.
        url: String,
        /// The client's message, any password removed.
        message: String,
    },
    /// The store did not answer within `result_store_timeout`.
    #[error("the result store {url} did not answer within {after:?} (result_store_timeout)")]
    TimedOut {
        /// The URL, password masked.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// A stored value is not a result this version wrote.
    #[error("the value at `{key}` in the result store is not a stored result")]
    Undecodable {
        /// The key.
        key: String,
    },
    /// A result could not be serialized for the store.
    #[error("the result cannot be serialized for the result store")]
    Unserializable,
}

/// `error: cause: cause` on one line, for logs; a cause whose text the line already holds is
/// skipped (lapin repeats its source's text in its own message).
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sent_but_unconfirmed_publish_may_have_been_kept() {
        let (exchange, routing_key) = (String::new(), "q".to_owned());
        let lost = lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "gone");
        let kept = [
            PublishError::Channel {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                source: lost.into(),
            },
            PublishError::ConfirmTimeout {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                after: Duration::from_secs(1),
            },
            PublishError::ExchangeNotFound {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                source: lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "404")
                    .into(),
            },
        ];
        let not_kept = [
            PublishError::Unroutable {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                reply_code: 312,
                reply_text: "NO_ROUTE".to_owned(),
            },
            PublishError::Nacked {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
            },
            PublishError::Closed {
                exchange,
                routing_key,
            },
        ];
        assert!(kept.iter().all(PublishError::may_have_been_kept));
        assert!(!not_kept.iter().any(PublishError::may_have_been_kept));
    }
}

//! Every message header the engine and the CLI read or write: one home for each name, and the
//! lists built from them (issue 15). A new failure header is added here, to
//! [`FAILURE_HEADERS`] if it describes a failure, and written where the failure is handled
//! (`engine/settle.rs`, `Worker::failure_headers`).

/// Counts retries. Always written as a 64-bit signed integer (`l`).
pub const RETRY_COUNT: &str = "x-retry-count";
/// The queue a dead-lettered message failed on; `dlq replay` checks it against its target.
pub const ORIGINAL_QUEUE: &str = "x-original-queue";
/// The exchange the failed message was published to.
pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
/// The routing key the failed message was published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
/// A dead letter's `expiration` property, kept here (a dead letter must not expire).
pub const ORIGINAL_EXPIRATION: &str = "x-original-expiration";
/// When the message first failed (RFC 3339).
pub const FIRST_FAILURE_AT: &str = "x-first-failure-at";
/// When the message last failed (RFC 3339).
pub const LAST_FAILURE_AT: &str = "x-last-failure-at";
/// The last error, truncated to 1 KiB.
pub const LAST_ERROR: &str = "x-last-error";
/// The last error's kind (`handler_error`, `timeout`, `body_too_large`, ...).
pub const ERROR_KIND: &str = "x-error-kind";
/// Why the message was dead-lettered.
pub const DEATH_REASON: &str = "x-death-reason";
/// The handler the message failed in.
pub const HANDLER: &str = "x-handler";
/// Counts a task's deliveries that ended without a settlement (64-bit signed integer).
pub const LOST_DELIVERIES: &str = "x-lost-deliveries";
/// The original's headers a copy left out to fit one frame, and their sizes.
pub const HEADERS_DROPPED: &str = "x-headers-dropped";
/// W3C trace context, continued from a request to its result.
pub const TRACEPARENT: &str = "traceparent";

/// The dead-letter queue a replayed message came from.
pub const REPLAYED_FROM: &str = "x-replayed-from";
/// When it was replayed.
pub const REPLAYED_AT: &str = "x-replayed-at";
/// How often it was replayed.
pub const REPLAY_COUNT: &str = "x-replay-count";
/// Its failure headers before the replay, as a table.
pub const REPLAYED_FAILURE: &str = "x-replayed-failure";

/// The quorum queue's own count of a message's earlier deliveries (read, never written).
pub const DELIVERY_COUNT: &str = "x-delivery-count";

/// Headers the engine writes when a message fails: shown first by `dlq peek`, moved into
/// [`REPLAYED_FAILURE`] by `dlq replay`.
pub const FAILURE_HEADERS: &[&str] = &[
    DEATH_REASON,
    ERROR_KIND,
    LAST_ERROR,
    RETRY_COUNT,
    ORIGINAL_QUEUE,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    HANDLER,
    FIRST_FAILURE_AT,
    LAST_FAILURE_AT,
];

/// Every header the engine or the CLI writes into a copy: a copy fitted to one frame keeps
/// them while they are small (a larger one came from the sender). [`FAILURE_HEADERS`]
/// followed by the others, so a new failure header is listed once.
pub const ENGINE_HEADERS: &[&str] = &ENGINE_HEADER_LIST;

/// The headers of [`ENGINE_HEADERS`] that do not describe a failure.
const OTHER_ENGINE_HEADERS: &[&str] = &[
    ORIGINAL_EXPIRATION,
    LOST_DELIVERIES,
    REPLAYED_AT,
    REPLAYED_FAILURE,
    REPLAYED_FROM,
    TRACEPARENT,
];

const ENGINE_HEADER_LIST: [&str; FAILURE_HEADERS.len() + OTHER_ENGINE_HEADERS.len()] =
    concat(FAILURE_HEADERS, OTHER_ENGINE_HEADERS);

/// `a` then `b`, at compile time (`N` must be their total length, or the build fails).
const fn concat<const N: usize>(a: &[&'static str], b: &[&'static str]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[i + j] = b[j];
        j += 1;
    }
    out
}

/// The broker's own dead-lettering headers, dropped on replay.
pub const BROKER_DEATH_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
];

/// Headers by which RabbitMQ routes a message to more queues than its routing key names
/// (sender-selected distribution: `CC`, `BCC`, each a list of routing keys). A copy the
/// engine or the CLI publishes of someone else's message never keeps them: a sender allowed
/// to write only to the task exchange could otherwise make the worker write into any queue.
pub const ROUTING_HEADERS: &[&str] = &["CC", "BCC"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_headers_are_engine_headers() {
        for name in FAILURE_HEADERS {
            assert!(ENGINE_HEADERS.contains(name), "{name}");
        }
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = ENGINE_HEADERS.to_vec();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before);
    }
}

//! Every message header the engine and the CLI read or write: one home for each name, and the
//! lists built from them (issue 15).
//!
//! The failure headers are declared once, in the `failure_headers!` call below: each line
//! gives the header its name constant, its place in [`FAILURE_HEADERS`] (and so in
//! [`ENGINE_HEADERS`], the headers a copy fitted to one frame keeps, and in what `dlq replay`
//! moves into [`REPLAYED_FAILURE`]) and the value `failure_headers` writes into a retry or
//! dead-letter copy. A new failure header is one line there. The counting headers
//! (`x-retry-count`, `x-lost-deliveries`, `x-delivery-count`) are read here too
//! (`count_header`).

use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::handler::HandlerError;

/// The longest error text written into a header.
pub(crate) const MAX_REASON_BYTES: usize = 1024;

/// A long-string header value.
pub(crate) fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

/// What an `x-retry-count` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RetryCount {
    /// A usable count (absent means 0).
    Count(u32),
    /// Present but unusable (negative, a float, non-digits, beyond `u32`): treated as
    /// exhausted, so a forged header can never buy extra retries.
    Malformed,
}

/// Reads `x-retry-count` tolerantly: any integer width, or a string of ASCII digits.
pub(crate) fn retry_count(headers: Option<&FieldTable>) -> RetryCount {
    count_header(headers, RETRY_COUNT)
}

/// Reads a counting header (`x-retry-count`, `x-lost-deliveries`, `x-delivery-count`)
/// tolerantly: any integer width, or a string of ASCII digits; absent is 0.
pub(crate) fn count_header(headers: Option<&FieldTable>, key: &str) -> RetryCount {
    let Some(value) = headers.and_then(|h| h.inner().get(key)) else {
        return RetryCount::Count(0);
    };
    let wide: Option<i128> = match value {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some((*v).into()),
        AMQPValue::ShortString(s) => digits(s.as_str()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().and_then(digits),
        _ => None,
    };
    wide.and_then(|n| u32::try_from(n).ok())
        .map_or(RetryCount::Malformed, RetryCount::Count)
}

fn digits(text: &str) -> Option<i128> {
    let text = text.trim();
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Where a dead letter came from, written into its headers.
#[derive(Debug)]
pub(crate) struct DeadLetter<'a> {
    /// Why it is dead-lettered (`retries exhausted`, `not retryable`, `worker_lost`).
    pub(crate) why: &'a str,
    pub(crate) queue: &'a str,
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) handler: &'a str,
}

/// What the failure headers of one copy are written from.
struct Failure<'a> {
    /// The request's headers.
    request: Option<&'a FieldTable>,
    /// The retry count to write.
    count: u32,
    /// The time of this failure (RFC 3339).
    now: &'a str,
    /// The error, at most [`MAX_REASON_BYTES`].
    reason: &'a str,
    /// The error's kind.
    kind: &'a str,
    /// Set for a dead letter.
    dead: Option<&'a DeadLetter<'a>>,
}

/// Declares the failure headers, one line each:
/// `/// doc` `NAME = "x-name", |failure| value;` where `value` is the header's
/// `Option<AMQPValue>` for a [`Failure`] (`None`: left as the request had it). Gives each its
/// `pub const NAME`, [`FAILURE_HEADERS`] (in this order) and [`failure_headers`].
macro_rules! failure_headers {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident = $header:literal, |$failure:ident| $value:expr;
    )*) => {
        $(
            $(#[doc = $doc])*
            pub const $name: &str = $header;
        )*

        /// Headers the engine writes when a message fails: shown first by `dlq peek`, moved
        /// into [`REPLAYED_FAILURE`] by `dlq replay`.
        pub const FAILURE_HEADERS: &[&str] = &[$($name),*];

        /// The headers of a retry or dead-letter copy: the request's, plus every failure
        /// header's value.
        fn write_failure_headers(failure: &Failure<'_>) -> FieldTable {
            let mut headers = failure.request.cloned().unwrap_or_default();
            $(
                let $failure = failure;
                if let Some(value) = $value {
                    headers.insert($name.into(), value);
                }
            )*
            headers
        }
    };
}

failure_headers! {
    /// Why the message was dead-lettered.
    DEATH_REASON = "x-death-reason",
        |f| f.dead.map(|dead| long(&format!("{}: {}", dead.why, f.reason)));
    /// The last error's kind (`handler_error`, `timeout`, `body_too_large`, ...).
    ERROR_KIND = "x-error-kind", |f| Some(long(f.kind));
    /// The last error, truncated to 1 KiB.
    LAST_ERROR = "x-last-error", |f| Some(long(f.reason));
    /// Counts retries. Always written as a 64-bit signed integer (`l`).
    RETRY_COUNT = "x-retry-count", |f| Some(AMQPValue::LongLongInt(f.count.into()));
    /// The queue a dead-lettered message failed on; `dlq replay` checks it against its target.
    ORIGINAL_QUEUE = "x-original-queue", |f| f.dead.map(|dead| long(dead.queue));
    /// The exchange the failed message was published to.
    ORIGINAL_EXCHANGE = "x-original-exchange", |f| f.dead.map(|dead| long(dead.exchange));
    /// The routing key the failed message was published with.
    ORIGINAL_ROUTING_KEY = "x-original-routing-key",
        |f| f.dead.map(|dead| long(dead.routing_key));
    /// The handler the message failed in.
    HANDLER = "x-handler", |f| f.dead.map(|dead| long(dead.handler));
    /// When the message first failed (RFC 3339).
    FIRST_FAILURE_AT = "x-first-failure-at", |f| {
        let first = f.request.is_none_or(|request| !request.contains_key(FIRST_FAILURE_AT));
        first.then(|| long(f.now))
    };
    /// When the message last failed (RFC 3339).
    LAST_FAILURE_AT = "x-last-failure-at", |f| Some(long(f.now));
}

/// The headers of a retry or dead-letter copy: the request's, plus the failure headers
/// (`x-retry-count` = `count`, first and last failure times (`now`), the last error (at most
/// [`MAX_REASON_BYTES`]) and its kind, and for a dead letter where it came from and why).
pub(crate) fn failure_headers(
    request: Option<&FieldTable>,
    failure: &HandlerError,
    count: u32,
    now: &str,
    dead: Option<&DeadLetter<'_>>,
) -> FieldTable {
    write_failure_headers(&Failure {
        request,
        count,
        now,
        reason: crate::text::truncate(failure.message(), MAX_REASON_BYTES),
        kind: failure.kind(),
        dead,
    })
}

/// A dead letter's `expiration` property, kept here (a dead letter must not expire).
pub const ORIGINAL_EXPIRATION: &str = "x-original-expiration";
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
    use crate::headers as h;

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

    fn text(headers: &FieldTable, name: &str) -> Option<String> {
        match headers.inner().get(name) {
            Some(AMQPValue::LongString(value)) => Some(value.to_string()),
            Some(AMQPValue::LongLongInt(n)) => Some(n.to_string()),
            _ => None,
        }
    }

    #[test]
    fn a_retry_copy_counts_and_keeps_the_first_failure() {
        let mut request = FieldTable::default();
        request.insert("app".into(), long("kept"));
        let failure = HandlerError::retry("downstream busy");
        let first = failure_headers(Some(&request), &failure, 1, "t1", None);
        assert_eq!(text(&first, "app").as_deref(), Some("kept"));
        assert_eq!(text(&first, h::RETRY_COUNT).as_deref(), Some("1"));
        assert_eq!(text(&first, h::FIRST_FAILURE_AT).as_deref(), Some("t1"));
        assert_eq!(
            text(&first, h::LAST_ERROR).as_deref(),
            Some("downstream busy")
        );
        assert_eq!(
            text(&first, h::ERROR_KIND).as_deref(),
            Some("handler_error")
        );
        assert_eq!(text(&first, h::DEATH_REASON), None, "not a dead letter");
        let second = failure_headers(Some(&first), &failure, 2, "t2", None);
        assert_eq!(text(&second, h::RETRY_COUNT).as_deref(), Some("2"));
        assert_eq!(text(&second, h::FIRST_FAILURE_AT).as_deref(), Some("t1"));
        assert_eq!(text(&second, h::LAST_FAILURE_AT).as_deref(), Some("t2"));
    }

    #[test]
    fn a_dead_letter_says_where_it_came_from_and_why() {
        let failure = HandlerError::dead_letter("x".repeat(4 * MAX_REASON_BYTES));
        let dead = DeadLetter {
            why: "not retryable",
            queue: "tasks",
            exchange: "ex",
            routing_key: "tasks",
            handler: "summarize",
        };
        let headers = failure_headers(None, &failure, 0, "t", Some(&dead));
        assert_eq!(text(&headers, h::ORIGINAL_QUEUE).as_deref(), Some("tasks"));
        assert_eq!(text(&headers, h::ORIGINAL_EXCHANGE).as_deref(), Some("ex"));
        assert_eq!(
            text(&headers, h::ORIGINAL_ROUTING_KEY).as_deref(),
            Some("tasks")
        );
        assert_eq!(text(&headers, h::HANDLER).as_deref(), Some("summarize"));
        assert_eq!(
            text(&headers, h::ERROR_KIND).as_deref(),
            Some("handler_rejected")
        );
        let reason = text(&headers, h::DEATH_REASON).unwrap_or_default();
        assert!(reason.starts_with("not retryable: xxx"), "{reason}");
        let last = text(&headers, h::LAST_ERROR).unwrap_or_default();
        assert!(
            last.len() <= MAX_REASON_BYTES,
            "the reason is bounded: {}",
            last.len()
        );
    }

    fn with(value: AMQPValue) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert("x-retry-count".into(), value);
        table
    }

    #[test]
    fn retry_count_reads_every_integer_width_and_digit_strings() {
        assert_eq!(retry_count(None), RetryCount::Count(0));
        assert_eq!(
            retry_count(Some(&FieldTable::default())),
            RetryCount::Count(0)
        );
        for value in [
            AMQPValue::ShortShortInt(2),
            AMQPValue::ShortShortUInt(2),
            AMQPValue::ShortInt(2),
            AMQPValue::ShortUInt(2),
            AMQPValue::LongInt(2),
            AMQPValue::LongUInt(2),
            AMQPValue::LongLongInt(2),
            AMQPValue::ShortString("2".into()),
            long(" 2 "),
        ] {
            assert_eq!(retry_count(Some(&with(value))), RetryCount::Count(2));
        }
    }

    #[test]
    fn malformed_retry_counts_are_exhausted() {
        for value in [
            AMQPValue::LongLongInt(-1),
            AMQPValue::LongLongInt(i64::MAX),
            AMQPValue::Double(1.0),
            AMQPValue::Boolean(true),
            long("-3"),
            long("two"),
            long("99999999999999999999"),
        ] {
            assert_eq!(retry_count(Some(&with(value))), RetryCount::Malformed);
        }
    }
}

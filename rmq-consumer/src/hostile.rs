//! Deliveries that the client library could parse only partially (issue 13).
//!
//! A `headers` table nested thousands of levels deep overflowed the stack of lapin's io
//! thread (the process aborted, and the message, still queued, killed the next worker). The
//! patched parser (`patches/amq-protocol-types-*`) stops at [`MAX_NESTING_DEPTH`] levels: a
//! table or array nested deeper is skipped and [`TOO_DEEP_MARKER`] (a long string) takes its
//! place. Such a delivery is not the message its sender published, so it is not run: it is
//! dead-lettered (kind [`HEADERS_TOO_DEEP`]). Its dead-letter and retry copies carry the
//! marker, a plain string, never the dropped levels.
//!
//! RabbitMQ takes content header frames whose payload is up to `frame_max` from publishers
//! (8 bytes more than the spec allows) and delivers them as they are: the patched lapin
//! (`patches/lapin-*`) reads them. A copy the engine publishes of such a message (retry,
//! dead letter, suspect, replay) adds its own headers and would no longer fit one frame: the
//! broker answers a frame that large by closing the whole connection, and the engine would
//! reconnect, get the message again, and loop. [`fit_copy`] drops the largest of the
//! original's headers from such a copy, naming them in [`HEADERS_DROPPED`].
//!
//! RabbitMQ passes short strings on without checking that they are UTF-8 (header keys,
//! properties such as `message_id`); lapin's parser failed the frame on them, which killed
//! the connection, again and again. The patched parser decodes them lossily (U+FFFD for each
//! bad sequence); such a delivery is dead-lettered too (kind [`TEXT_NOT_UTF8`]).

use lapin::{
    BasicProperties,
    message::Delivery,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tracing::warn;

use crate::handler::{FailureAction, HandlerError};

/// The error kind (`x-error-kind`) of a delivery whose headers nest too deep.
pub(crate) const HEADERS_TOO_DEEP: &str = "headers_too_deep";

/// The error kind of a delivery whose short strings were not UTF-8.
pub(crate) const TEXT_NOT_UTF8: &str = "text_not_utf8";

/// What the patched parser puts in place of each byte sequence of a short string that is not
/// UTF-8.
const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Levels of field tables and arrays the parser keeps (the `headers` table is level 1);
/// `amq_protocol_types::parsing::MAX_NESTING_DEPTH` of the patched crate.
pub(crate) const MAX_NESTING_DEPTH: usize = 64;

/// What the patched parser puts in place of a table or array nested deeper than
/// [`MAX_NESTING_DEPTH`]; `amq_protocol_types::parsing::TOO_DEEP_MARKER`. Spelled out here so
/// the check keeps working (and keeps compiling) without the patch.
pub(crate) const TOO_DEEP_MARKER: &str = "(nested deeper than 64 levels: dropped)";

/// RabbitMQ's default `frame_max`, which the engine negotiates unless the broker or the URL
/// (`?frame_max=`) sets another.
pub(crate) const DEFAULT_FRAME_MAX: usize = 131_072;

/// The `frame_max` negotiated on `connection`, which every frame the engine writes must fit
/// ([`DEFAULT_FRAME_MAX`] when the peers agreed on none).
pub(crate) fn negotiated_frame_max(connection: &lapin::Connection) -> usize {
    match usize::try_from(connection.configuration().frame_max()) {
        Ok(0) | Err(_) => DEFAULT_FRAME_MAX,
        Ok(frame_max) => frame_max,
    }
}

/// The header of a copy that names the original's headers [`fit_copy`] dropped.
pub(crate) use crate::headers::HEADERS_DROPPED;

/// A frame's bytes around its payload: type, channel, size, frame-end.
const FRAME_OVERHEAD: usize = 8;

/// The content header frame's payload before the properties: class id, weight, body size,
/// property flags.
const CONTENT_HEADER_FIXED: usize = 2 + 2 + 8 + 2;

/// The longest [`HEADERS_DROPPED`] text.
const MAX_DROPPED_NOTE_BYTES: usize = 1024;

/// Headers the engine writes into its copies ([`fit_copy`] keeps them while they are this
/// small; a larger one came from the sender and may be dropped).
use crate::headers::ENGINE_HEADERS;

/// The largest engine header [`fit_copy`] always keeps (the engine's own are at most ~1.1 KB).
const MAX_KEPT_HEADER_BYTES: usize = 2048;

/// The longest header path quoted in a reason.
const MAX_PATH_BYTES: usize = 200;

/// Why a delivery with these `headers` must not run: a table or array in them was nested
/// deeper than the parser keeps ([`TOO_DEEP_MARKER`] in its place), or is nested deeper than
/// [`MAX_NESTING_DEPTH`] (a parser that kept more). `None` for ordinary headers.
///
/// Walks the headers without recursion.
pub(crate) fn headers_too_deep(headers: Option<&FieldTable>) -> Option<String> {
    let headers = headers?;
    // (the value, its path, the level of the table or array holding it)
    let mut pending: Vec<(&AMQPValue, String, usize)> = headers
        .inner()
        .iter()
        .map(|(key, value)| (value, key.to_string(), 1))
        .collect();
    while let Some((value, path, level)) = pending.pop() {
        match value {
            AMQPValue::LongString(text) if text.as_bytes() == TOO_DEEP_MARKER.as_bytes() => {
                return Some(reason(&path, "was nested deeper than"));
            }
            AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_)
                if level + 1 > MAX_NESTING_DEPTH =>
            {
                return Some(reason(&path, "is nested deeper than"));
            }
            AMQPValue::FieldTable(table) => pending.extend(
                table
                    .inner()
                    .iter()
                    .map(|(key, value)| (value, format!("{path}.{key}"), level + 1)),
            ),
            AMQPValue::FieldArray(array) => pending.extend(
                array
                    .as_slice()
                    .iter()
                    .enumerate()
                    .map(|(index, value)| (value, format!("{path}[{index}]"), level + 1)),
            ),
            _ => {}
        }
    }
    None
}

/// Where a delivery's short strings (exchange, routing key, the properties, header keys at
/// any depth) hold U+FFFD, which the patched parser writes for bytes that are not UTF-8 (a
/// sender may also have written U+FFFD itself: such a rare message is dead-lettered too).
/// `None` when there is none.
pub(crate) fn text_not_utf8(delivery: &Delivery) -> Option<String> {
    let properties = &delivery.properties;
    let fields = [
        ("the exchange", Some(&delivery.exchange)),
        ("the routing key", Some(&delivery.routing_key)),
        ("content_type", properties.content_type().as_ref()),
        ("content_encoding", properties.content_encoding().as_ref()),
        ("correlation_id", properties.correlation_id().as_ref()),
        ("reply_to", properties.reply_to().as_ref()),
        ("expiration", properties.expiration().as_ref()),
        ("message_id", properties.message_id().as_ref()),
        ("type", properties.kind().as_ref()),
        ("user_id", properties.user_id().as_ref()),
        ("app_id", properties.app_id().as_ref()),
        ("cluster_id", properties.cluster_id().as_ref()),
    ];
    for (name, value) in fields {
        if value.is_some_and(|text| text.as_str().contains(REPLACEMENT)) {
            return Some(format!(
                "{name} is not UTF-8 (the client library replaced the bad bytes with U+FFFD)"
            ));
        }
    }
    let mut pending: Vec<(&ShortString, &AMQPValue, String)> = properties
        .headers()
        .iter()
        .flat_map(|headers| headers.inner())
        .map(|(key, value)| (key, value, String::new()))
        .collect();
    while let Some((key, value, parent)) = pending.pop() {
        let path = format!("{parent}{key}");
        if key.as_str().contains(REPLACEMENT) {
            let path = crate::text::truncate(&path, MAX_PATH_BYTES);
            return Some(format!(
                "the header key {path} is not UTF-8 (the client library replaced the bad bytes with U+FFFD)"
            ));
        }
        let mut tables = vec![(value, path)];
        while let Some((value, path)) = tables.pop() {
            match value {
                AMQPValue::FieldTable(table) => pending.extend(
                    table
                        .inner()
                        .iter()
                        .map(|(key, value)| (key, value, format!("{path}."))),
                ),
                AMQPValue::FieldArray(array) => tables.extend(
                    array
                        .as_slice()
                        .iter()
                        .enumerate()
                        .map(|(index, value)| (value, format!("{path}[{index}]"))),
                ),
                _ => {}
            }
        }
    }
    None
}

/// The pipeline's check of what the client library could parse only partially: headers
/// nested too deep ([`headers_too_deep`], kind [`HEADERS_TOO_DEEP`]) or short strings that
/// were not UTF-8 ([`text_not_utf8`], kind [`TEXT_NOT_UTF8`]). Either is dead-lettered at once
/// (rejected when dead-lettering is off): the message is not the one its sender published.
///
/// # Errors
/// When either check finds a reason.
pub(crate) fn check(delivery: &Delivery) -> Result<(), HandlerError> {
    let failure = |kind, reason| {
        Err(HandlerError::with_kind(
            FailureAction::DeadLetter,
            kind,
            reason,
        ))
    };
    if let Some(reason) = headers_too_deep(delivery.properties.headers().as_ref()) {
        return failure(HEADERS_TOO_DEEP, reason);
    }
    if let Some(reason) = text_not_utf8(delivery) {
        return failure(TEXT_NOT_UTF8, reason);
    }
    Ok(())
}

/// The payload size of the content header frame that carries `properties`, as lapin writes
/// it. Measures nested tables without recursion.
pub(crate) fn content_header_size(properties: &BasicProperties) -> usize {
    let short = |value: &Option<ShortString>| value.as_ref().map_or(0, |s| 1 + s.as_str().len());
    let byte = |value: &Option<u8>| usize::from(value.is_some());
    CONTENT_HEADER_FIXED
        + short(properties.content_type())
        + short(properties.content_encoding())
        + properties.headers().as_ref().map_or(0, table_size)
        + byte(properties.delivery_mode())
        + byte(properties.priority())
        + short(properties.correlation_id())
        + short(properties.reply_to())
        + short(properties.expiration())
        + short(properties.message_id())
        + properties.timestamp().map_or(0, |_| 8)
        + short(properties.kind())
        + short(properties.user_id())
        + short(properties.app_id())
        + short(properties.cluster_id())
}

/// The encoded size of a field table (its length prefix included).
fn table_size(table: &FieldTable) -> usize {
    entries_size(table.inner().iter(), &mut Vec::new())
}

/// The encoded size of one header entry: its key and its value with the type tag.
fn entry_size(key: &ShortString, value: &AMQPValue) -> usize {
    entries_size(std::iter::once((key, value)), &mut Vec::new()) - 4
}

/// 4 (a table's length prefix) plus the encoded size of `entries`, nested values included;
/// `stack` is scratch space.
fn entries_size<'a>(
    entries: impl Iterator<Item = (&'a ShortString, &'a AMQPValue)>,
    stack: &mut Vec<&'a AMQPValue>,
) -> usize {
    let mut size = 4;
    for (key, value) in entries {
        size += 1 + key.as_str().len();
        stack.push(value);
    }
    while let Some(value) = stack.pop() {
        // The type tag, then the value.
        size += 1 + match value {
            AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
            AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
            AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
            AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
            AMQPValue::DecimalValue(_) => 5,
            AMQPValue::ShortString(s) => 1 + s.as_str().len(),
            AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
            AMQPValue::ByteArray(a) => 4 + a.as_slice().len(),
            AMQPValue::Void => 0,
            AMQPValue::FieldArray(array) => {
                stack.extend(array.as_slice());
                4
            }
            AMQPValue::FieldTable(table) => {
                for (key, value) in table.inner() {
                    size += 1 + key.as_str().len();
                    stack.push(value);
                }
                4
            }
        };
    }
    size
}

/// A copy's `properties` made to fit one frame of `frame_max` bytes: unchanged when they fit
/// (nearly always); else the original's headers are dropped, largest first, until they do,
/// and [`HEADERS_DROPPED`] names them (with a log line). The engine's own headers
/// ([`ENGINE_HEADERS`], when small) are kept.
pub(crate) fn fit_copy(properties: BasicProperties, frame_max: usize) -> BasicProperties {
    let limit = frame_max.saturating_sub(FRAME_OVERHEAD);
    let size = content_header_size(&properties);
    if size <= limit {
        return properties;
    }
    let Some(headers) = properties.headers().clone() else {
        return properties;
    };
    // Room for the note.
    let note_room = 1 + HEADERS_DROPPED.len() + 1 + 4 + MAX_DROPPED_NOTE_BYTES;
    let mut excess = (size + note_room).saturating_sub(limit);
    let mut droppable: Vec<(usize, &ShortString)> = headers
        .inner()
        .iter()
        .map(|(key, value)| (entry_size(key, value), key))
        .filter(|(size, key)| {
            *size > MAX_KEPT_HEADER_BYTES || !ENGINE_HEADERS.contains(&key.as_str())
        })
        .collect();
    droppable.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let mut kept = headers.inner().clone();
    let mut dropped = Vec::new();
    for (entry, key) in droppable {
        if excess == 0 {
            break;
        }
        kept.remove(key);
        dropped.push(format!("{key} ({entry} bytes)"));
        excess = excess.saturating_sub(entry);
    }
    let note = format!(
        "{}: the copy's content header ({size} bytes) would not fit one frame (frame_max {frame_max})",
        dropped.join(", ")
    );
    let note = crate::text::truncate(&note, MAX_DROPPED_NOTE_BYTES);
    warn!(dropped = %note, "the headers of this message are too large to copy whole; dropped the largest");
    kept.insert(
        HEADERS_DROPPED.into(),
        AMQPValue::LongString(LongString::from(note.as_bytes().to_vec())),
    );
    properties.with_headers(kept.into())
}

fn reason(path: &str, what: &str) -> String {
    let quoted = crate::text::truncate(path, MAX_PATH_BYTES);
    let cut = if quoted.len() < path.len() { "..." } else { "" };
    format!(
        "the header {quoted}{cut} {what} {MAX_NESTING_DEPTH} levels of tables and arrays; the levels below were dropped, so the message is not the one its sender published"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::long;

    /// `levels` tables, the outermost being the `headers` table itself, the innermost holding
    /// `innermost` under "x".
    fn nested(levels: usize, innermost: AMQPValue) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert("x".into(), innermost);
        for _ in 1..levels {
            let mut outer = FieldTable::default();
            outer.insert("t".into(), AMQPValue::FieldTable(table));
            table = outer;
        }
        table
    }

    #[test]
    fn content_header_size_counts_what_lapin_writes() {
        assert_eq!(content_header_size(&BasicProperties::default()), 14);
        let mut inner = FieldTable::default();
        inner.insert(
            "k".into(),
            AMQPValue::FieldArray(vec![AMQPValue::Void].into()),
        );
        let mut headers = FieldTable::default();
        headers.insert("t".into(), AMQPValue::FieldTable(inner));
        headers.insert("s".into(), long("abc"));
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(1)
            .with_headers(headers);
        // table: 4 + "t" (2) + F (1) + [4 + "k" (2) + A (1) + [4 + V (1)]] + "s" (2) + S (1)
        // + 4 + 3 = 29
        assert_eq!(content_header_size(&properties), 14 + 17 + 29 + 1 + 8);
    }

    #[test]
    fn copies_that_fit_are_unchanged() {
        let mut headers = FieldTable::default();
        headers.insert("pad".into(), long(&"x".repeat(1000)));
        let properties = BasicProperties::default().with_headers(headers);
        assert_eq!(
            fit_copy(properties.clone(), DEFAULT_FRAME_MAX),
            properties.clone()
        );
        let size = content_header_size(&properties);
        assert_eq!(fit_copy(properties.clone(), size + 8), properties);
    }

    #[test]
    fn copies_too_large_for_a_frame_drop_the_largest_original_headers() {
        let mut headers = FieldTable::default();
        headers.insert("pad".into(), long(&"x".repeat(130_000)));
        headers.insert("small".into(), long("kept"));
        headers.insert("x-error-kind".into(), long("handler_rejected"));
        headers.insert("x-last-error".into(), long(&"e".repeat(1024)));
        // A forged engine header this large may go, but need not here.
        headers.insert("x-first-failure-at".into(), long(&"f".repeat(5000)));
        let properties = BasicProperties::default()
            .with_message_id("m".into())
            .with_headers(headers);
        assert!(content_header_size(&properties) > DEFAULT_FRAME_MAX);
        let copy = fit_copy(properties, DEFAULT_FRAME_MAX);
        assert!(content_header_size(&copy) <= DEFAULT_FRAME_MAX - 8);
        assert_eq!(copy.message_id(), &Some("m".into()));
        let headers = copy.headers().clone().unwrap_or_default();
        let keys: Vec<&str> = headers.inner().keys().map(ShortString::as_str).collect();
        assert_eq!(
            keys,
            [
                "small",
                "x-error-kind",
                "x-first-failure-at",
                HEADERS_DROPPED,
                "x-last-error"
            ]
        );
        let note = crate::amqp::header_str(Some(&headers), HEADERS_DROPPED).unwrap_or_default();
        assert!(note.starts_with("pad (130009 bytes): "), "{note}");
        // With a smaller frame_max, the forged one goes too.
        let mut headers = FieldTable::default();
        headers.insert("pad".into(), long(&"x".repeat(131_000)));
        headers.insert("x-first-failure-at".into(), long(&"f".repeat(5000)));
        let copy = fit_copy(BasicProperties::default().with_headers(headers), 4096);
        assert!(content_header_size(&copy) <= 4096 - 8);
        let headers = copy.headers().clone().unwrap_or_default();
        let note = crate::amqp::header_str(Some(&headers), HEADERS_DROPPED).unwrap_or_default();
        assert!(
            note.starts_with("pad (131009 bytes), x-first-failure-at (5024 bytes): "),
            "{note}"
        );
    }

    fn delivery(properties: BasicProperties) -> Delivery {
        let mut delivery = Delivery::mock(1, "ex".into(), "key".into(), false, Vec::new());
        delivery.properties = properties;
        delivery
    }

    #[test]
    fn text_that_was_not_utf8_is_refused() {
        let plain = delivery(
            BasicProperties::default()
                .with_message_id("m-1".into())
                .with_headers(nested(3, long("x\u{FFFD}"))),
        );
        // U+FFFD in a long string value is data, not a decoding loss.
        assert_eq!(text_not_utf8(&plain), None);
        assert!(check(&plain).is_ok());
        let bad = delivery(BasicProperties::default().with_message_id("m\u{FFFD}".into()));
        let error = check(&bad).err();
        let error = error.as_ref().map(|e| (e.action(), e.kind(), e.message()));
        assert!(
            matches!(
                error,
                Some((FailureAction::DeadLetter, TEXT_NOT_UTF8, message))
                    if message.starts_with("message_id is not UTF-8")
            ),
            "{error:?}"
        );
        let mut bad = Delivery::mock(1, "ex".into(), "k\u{FFFD}".into(), false, Vec::new());
        assert!(text_not_utf8(&bad).is_some_and(|r| r.starts_with("the routing key")));
        bad.routing_key = "key".into();
        let mut inner = FieldTable::default();
        inner.insert("b\u{FFFD}d".into(), AMQPValue::Void);
        let mut headers = FieldTable::default();
        headers.insert(
            "list".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(inner)].into()),
        );
        bad.properties = BasicProperties::default().with_headers(headers);
        let reason = text_not_utf8(&bad).unwrap_or_default();
        assert!(
            reason.starts_with("the header key list[0].b\u{FFFD}d is not UTF-8"),
            "{reason}"
        );
    }

    #[test]
    fn ordinary_headers_pass() {
        assert_eq!(headers_too_deep(None), None);
        assert_eq!(headers_too_deep(Some(&FieldTable::default())), None);
        let headers = nested(MAX_NESTING_DEPTH, long("a string"));
        assert_eq!(headers_too_deep(Some(&headers)), None);
        assert!(check(&delivery(BasicProperties::default().with_headers(headers))).is_ok());
        let mut headers = FieldTable::default();
        headers.insert(
            "list".into(),
            AMQPValue::FieldArray(vec![long("a"), AMQPValue::LongLongInt(1)].into()),
        );
        assert_eq!(headers_too_deep(Some(&headers)), None);
    }

    #[test]
    fn the_parsers_marker_is_found_at_any_level() {
        let headers = nested(MAX_NESTING_DEPTH, long(TOO_DEEP_MARKER));
        let reason = headers_too_deep(Some(&headers)).unwrap_or_default();
        assert!(reason.starts_with("the header t.t.t."), "{reason}");
        assert!(
            reason.contains("was nested deeper than 64 levels"),
            "{reason}"
        );
        let mut headers = FieldTable::default();
        headers.insert(
            "list".into(),
            AMQPValue::FieldArray(vec![AMQPValue::Void, long(TOO_DEEP_MARKER)].into()),
        );
        let error = check(&delivery(BasicProperties::default().with_headers(headers))).err();
        let error = error.as_ref().map(|e| (e.action(), e.kind(), e.message()));
        assert!(
            matches!(
                error,
                Some((FailureAction::DeadLetter, HEADERS_TOO_DEEP, message))
                    if message.starts_with("the header list[1] was nested")
            ),
            "{error:?}"
        );
    }

    #[test]
    fn headers_nested_deeper_than_the_limit_are_refused() {
        let headers = nested(MAX_NESTING_DEPTH + 1, AMQPValue::Boolean(true));
        let reason = headers_too_deep(Some(&headers)).unwrap_or_default();
        assert!(reason.contains("is nested deeper than 64"), "{reason}");
        // Long paths are cut.
        assert!(reason.len() < MAX_PATH_BYTES + 200, "{reason}");
        let mut array = AMQPValue::Boolean(true);
        for _ in 0..MAX_NESTING_DEPTH {
            array = AMQPValue::FieldArray(vec![array].into());
        }
        let mut headers = FieldTable::default();
        headers.insert("a".into(), array);
        assert!(headers_too_deep(Some(&headers)).is_some());
    }
}

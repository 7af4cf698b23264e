//! Small helpers over lapin's types: bounded strings, header text, property copies.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

/// The longest AMQP short string.
pub(crate) const MAX_SHORT: usize = 255;

pub(crate) use crate::text::truncate;

/// A short string from untrusted text, truncated to 255 bytes (lapin's `From` panics on longer).
pub(crate) fn short(text: &str) -> ShortString {
    ShortString::try_new(truncate(text, MAX_SHORT)).unwrap_or_default()
}

pub(crate) use crate::headers::long;

/// A header as text, when it is a string of any kind.
pub(crate) fn header_str<'a>(headers: Option<&'a FieldTable>, key: &str) -> Option<&'a str> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The properties of a copy of a delivery that the engine publishes itself (a retry or a dead
/// letter), with `headers` in place of the original's.
///
/// Routing headers ([`ROUTING_HEADERS`]) are dropped: a copy goes where the engine sends it
/// and nowhere else.
///
/// `user_id` is dropped: the broker checks it against the publishing connection's user, so
/// the copy of another user's message would be refused with a channel error, every time (the
/// message would cycle between the queue and the engine, never reaching the dead-letter
/// queue). A dead letter also drops `expiration` (kept as the `x-original-expiration`
/// header): a dead letter that expires is lost.
pub(crate) fn copy_properties(
    original: &BasicProperties,
    mut headers: FieldTable,
    dead_letter: bool,
    frame_max: usize,
) -> BasicProperties {
    let mut copy = BasicProperties::default();
    let text = |value: &Option<ShortString>| value.clone();
    if let Some(v) = text(original.content_type()) {
        copy = copy.with_content_type(v);
    }
    if let Some(v) = text(original.content_encoding()) {
        copy = copy.with_content_encoding(v);
    }
    if let Some(v) = *original.delivery_mode() {
        copy = copy.with_delivery_mode(v);
    }
    if let Some(v) = *original.priority() {
        copy = copy.with_priority(v);
    }
    if let Some(v) = text(original.correlation_id()) {
        copy = copy.with_correlation_id(v);
    }
    if let Some(v) = text(original.reply_to()) {
        copy = copy.with_reply_to(v);
    }
    if let Some(v) = text(original.expiration()) {
        if dead_letter {
            headers.insert(crate::headers::ORIGINAL_EXPIRATION.into(), long(v.as_str()));
        } else {
            copy = copy.with_expiration(v);
        }
    }
    if let Some(v) = text(original.message_id()) {
        copy = copy.with_message_id(v);
    }
    if let Some(v) = *original.timestamp() {
        copy = copy.with_timestamp(v);
    }
    if let Some(v) = text(original.kind()) {
        copy = copy.with_type(v);
    }
    if let Some(v) = text(original.app_id()) {
        copy = copy.with_app_id(v);
    }
    if let Some(v) = text(original.cluster_id()) {
        copy = copy.with_cluster_id(v);
    }
    crate::hostile::fit_copy(
        copy.with_headers(without_routing_headers(&headers)),
        frame_max,
    )
}

pub(crate) use crate::headers::ROUTING_HEADERS;

/// `headers` without [`ROUTING_HEADERS`].
pub(crate) fn without_routing_headers(headers: &FieldTable) -> FieldTable {
    headers
        .inner()
        .iter()
        .filter(|(key, _)| !ROUTING_HEADERS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_drop_routing_headers() {
        let mut headers = FieldTable::default();
        for key in ["CC", "BCC", "cc", "x-other"] {
            headers.insert(key.into(), long("elsewhere"));
        }
        let copy = copy_properties(
            &BasicProperties::default(),
            headers,
            false,
            crate::hostile::DEFAULT_FRAME_MAX,
        );
        let keys: Vec<&str> = copy
            .headers()
            .iter()
            .flat_map(|h| h.inner().keys())
            .map(ShortString::as_str)
            .collect();
        // RabbitMQ routes by the exact names only.
        assert_eq!(keys, ["cc", "x-other"]);
    }

    #[test]
    fn copies_drop_user_id_and_dead_letters_drop_expiration() {
        let original = BasicProperties::default()
            .with_user_id("alice".into())
            .with_expiration("60000".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_priority(3)
            .with_delivery_mode(2)
            .with_headers(with(AMQPValue::LongLongInt(1)));
        let retry = copy_properties(
            &original,
            FieldTable::default(),
            false,
            crate::hostile::DEFAULT_FRAME_MAX,
        );
        assert_eq!(retry.user_id(), &None);
        assert_eq!(retry.expiration(), &Some("60000".into()));
        assert_eq!(retry.message_id(), &Some("m-1".into()));
        assert_eq!(retry.correlation_id(), &Some("c-1".into()));
        assert_eq!(retry.priority(), &Some(3));
        assert_eq!(retry.delivery_mode(), &Some(2));
        assert_eq!(retry.headers(), &Some(FieldTable::default()));
        let dead = copy_properties(
            &original,
            FieldTable::default(),
            true,
            crate::hostile::DEFAULT_FRAME_MAX,
        );
        assert_eq!(dead.user_id(), &None);
        assert_eq!(dead.expiration(), &None);
        assert_eq!(
            header_str(dead.headers().as_ref(), "x-original-expiration"),
            Some("60000")
        );
        let plain = BasicProperties::default().with_content_type("application/json".into());
        assert_eq!(
            copy_properties(
                &plain,
                FieldTable::default(),
                true,
                crate::hostile::DEFAULT_FRAME_MAX
            ),
            plain.with_headers(FieldTable::default())
        );
    }

    fn with(value: AMQPValue) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert("x-retry-count".into(), value);
        table
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(short(&"x".repeat(300)).as_str().len(), 255);
    }
}

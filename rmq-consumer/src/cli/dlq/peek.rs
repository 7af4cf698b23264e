//! `dlq peek`: show dead letters without removing them.

use std::collections::BTreeMap;

use lapin::{
    message::Delivery,
    options::{BasicGetOptions, BasicNackOptions},
    types::AMQPValue,
};
use serde::Serialize;
use serde_json::Value;

use crate::amqp::short;
use crate::cli::output::{self, say};
use crate::cli::{CliError, EXIT_OK, Io, close_channel, probe_queue, thousands};

use crate::headers::FAILURE_HEADERS;

/// One peeked message, as printed.
#[derive(Debug, Serialize)]
struct Peeked {
    index: u64,
    redelivered: bool,
    exchange: String,
    routing_key: String,
    failure: BTreeMap<String, Value>,
    headers: BTreeMap<String, Value>,
    properties: BTreeMap<String, Value>,
    body_bytes: usize,
    body: String,
    body_truncated: bool,
}

pub(super) async fn peek(
    connection: &lapin::Connection,
    queue: &str,
    count: u32,
    max_body: usize,
    json: bool,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let Some((ready, _)) = probe_queue(connection, queue).await? else {
        return Err(CliError::MissingQueue(queue.to_owned()));
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(CliError::amqp("cannot open a channel"))?;
    let mut peeked = Vec::new();
    let mut last_tag = None;
    let mut failure = None;
    for index in 0..u64::from(count) {
        match channel
            .basic_get(short(queue), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(Some(message)) => {
                last_tag = Some(message.delivery.delivery_tag);
                peeked.push(describe(index + 1, &message.delivery, max_body));
            }
            Ok(None) => break,
            Err(source) => {
                failure = Some(CliError::Amqp {
                    what: format!("cannot get a message from `{queue}`"),
                    source,
                });
                break;
            }
        }
    }
    // Hand everything back in one go; closing the channel would requeue them too.
    if let Some(tag) = last_tag {
        let _ = channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await;
    }
    close_channel(&channel).await;
    if let Some(error) = failure {
        return Err(error);
    }
    if json {
        output::json(io.out, &peeked)?;
        return Ok(EXIT_OK);
    }
    say!(
        io.out,
        "{queue}: {} message{} ready; showing {} (requeued, now marked redelivered)",
        thousands(ready.into()),
        if ready == 1 { "" } else { "s" },
        peeked.len()
    )?;
    for message in &peeked {
        say!(io.out)?;
        say!(
            io.out,
            "#{} from exchange {} routing key `{}`{}",
            message.index,
            if message.exchange.is_empty() {
                "(default)".to_owned()
            } else {
                format!("`{}`", message.exchange)
            },
            message.routing_key,
            if message.redelivered {
                " (redelivered before)"
            } else {
                ""
            }
        )?;
        for (key, value) in &message.failure {
            say!(io.out, "  {key}: {}", plain(value))?;
        }
        for (key, value) in &message.headers {
            say!(io.out, "  {key}: {}", plain(value))?;
        }
        if !message.properties.is_empty() {
            let list: Vec<String> = message
                .properties
                .iter()
                .map(|(k, v)| format!("{k}={}", plain(v)))
                .collect();
            say!(io.out, "  properties: {}", list.join(", "))?;
        }
        say!(
            io.out,
            "  body ({} bytes{}): {}",
            message.body_bytes,
            if message.body_truncated {
                ", truncated"
            } else {
                ""
            },
            message.body
        )?;
    }
    Ok(EXIT_OK)
}

fn describe(index: u64, delivery: &Delivery, max_body: usize) -> Peeked {
    let mut failure = BTreeMap::new();
    let mut headers = BTreeMap::new();
    if let Some(table) = delivery.properties.headers() {
        for (key, value) in table.inner() {
            let key = key.as_str();
            let value = to_json(value);
            if FAILURE_HEADERS.contains(&key) {
                failure.insert(key.to_owned(), value);
            } else {
                headers.insert(key.to_owned(), value);
            }
        }
    }
    let p = &delivery.properties;
    let mut properties = BTreeMap::new();
    let mut put = |key: &str, value: Option<String>| {
        if let Some(value) = value {
            properties.insert(key.to_owned(), Value::String(value));
        }
    };
    put(
        "content_type",
        p.content_type().as_ref().map(ToString::to_string),
    );
    put(
        "message_id",
        p.message_id().as_ref().map(ToString::to_string),
    );
    put(
        "correlation_id",
        p.correlation_id().as_ref().map(ToString::to_string),
    );
    put("delivery_mode", p.delivery_mode().map(|m| m.to_string()));
    put("timestamp", p.timestamp().map(|t| t.to_string()));
    put("app_id", p.app_id().as_ref().map(ToString::to_string));
    let body = crate::amqp::truncate(&String::from_utf8_lossy(&delivery.data), max_body).to_owned();
    Peeked {
        index,
        redelivered: delivery.redelivered,
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        failure,
        headers,
        properties,
        body_bytes: delivery.data.len(),
        body_truncated: delivery.data.len() > max_body,
        body,
    }
}

/// A header value as JSON.
fn to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => (*f).into(),
        AMQPValue::Double(f) => (*f).into(),
        AMQPValue::DecimalValue(d) => Value::String(format!("{d:?}")),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => Value::String(format!("{} bytes", b.as_slice().len())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), to_json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldTable;

    use super::*;
    use crate::amqp::long;

    #[test]
    fn header_values_render_as_json() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongLongInt(2));
        assert_eq!(
            to_json(&AMQPValue::FieldTable(table)),
            serde_json::json!({"n": 2})
        );
        assert_eq!(to_json(&long("text")), Value::String("text".to_owned()));
    }
}

//! What the parent publishes: the ~200-byte JSON task every scenario sends (the handlers read
//! it as [`crate::protocol::Task`]), persistent and mandatory with publisher confirms, and H's
//! hostile bodies.

use lapin::{BasicProperties, Channel, Confirmation, options::BasicPublishOptions};
use serde::Serialize;

use crate::error::Res;

/// Size of every task body, in bytes.
const BODY_SIZE: usize = 200;

/// A task as the bench publishes it: ~200 bytes of JSON.
#[derive(Debug, Serialize)]
struct TaskBody<'a> {
    id: u64,
    sent_us: u64,
    kind: &'a str,
    user: &'a str,
    payload: &'a str,
}

/// Publishes task `id` (stamped `sent_us`) to `queue`: persistent, mandatory, through the
/// default exchange; returns the pending confirm.
pub(crate) async fn publish_task(
    channel: &Channel,
    queue: &str,
    id: u64,
    sent_us: u64,
) -> Res<lapin::PublisherConfirm> {
    let body = task_body(id, sent_us)?;
    Ok(channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await?)
}

/// `Ok` for a plain ack.
pub(crate) fn confirmed(confirmation: Confirmation) -> Res<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("prefill publish not confirmed: {other:?}").into()),
    }
}

/// `[{"":0},{"":0},...]` of about `bytes` bytes: the cheapest body to send and one of the
/// dearest to decode (each one-key object is a B-tree node of ~600 bytes in a `Value`).
pub(crate) fn bomb_body(bytes: usize) -> Vec<u8> {
    let objects = (bytes / 7).max(1);
    let mut body = Vec::with_capacity(objects * 7 + 1);
    body.push(b'[');
    for index in 0..objects {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(br#"{"":0}"#);
    }
    body.push(b']');
    body
}

/// A JSON task padded to [`BODY_SIZE`] bytes.
fn task_body(id: u64, sent_us: u64) -> Res<Vec<u8>> {
    const PAD: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod \
                       tempor incididunt ut labore et dolore magna aliqua. ut enim ad minim veniam";
    let mut task = TaskBody {
        id,
        sent_us,
        kind: "bench.task",
        user: "user-00042",
        payload: "",
    };
    let bare = serde_json::to_vec(&task)?.len();
    let pad = BODY_SIZE.saturating_sub(bare).min(PAD.len());
    task.payload = &PAD[..pad];
    Ok(serde_json::to_vec(&task)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_body_is_padded_to_its_size() {
        assert_eq!(task_body(42, 7).unwrap().len(), BODY_SIZE);
    }

    #[test]
    fn a_bomb_body_is_json_of_about_its_size() {
        let body = bomb_body(7_000);
        assert_eq!(body.len(), 7_000 + 1);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value.as_array().map(Vec::len), Some(1_000));
    }
}

//! Messages that the broker accepts from publishers but the client library could not parse
//! (issue 13, point 1): a `headers` table nested 2,000 or 12,000 levels deep (it overflowed
//! the stack of lapin's io thread: the process aborted), content header frames whose payload
//! is 131,065..=131,072 bytes (lapin refused them against frame_max 131,072: the connection
//! failed, the message was redelivered, forever), the dead-letter copy of such a message
//! (larger still: the broker closed the engine's connection, forever), and short strings that
//! are not UTF-8 (the parser failed the frame: the same loop). Each must end in the
//! dead-letter queue (or be answered, when it is a good task after all), with the worker
//! alive, no reconnect, and the tasks around it answered.
//!
//! The hostile messages are published by a minimal AMQP 0-9-1 client written here ([`Raw`]):
//! lapin's serializer recurses once per level too (a 12,000-level table would overflow the
//! publishing side's stack), and this way the test writes exactly the bytes it means to,
//! frame sizes included.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{collections::BTreeMap, time::Duration};

use lapin::types::AMQPValue;
use rmq_consumer::{Config, HandlerError, consumer};
use rmq_consumer_tests::{
    self as common, Broker, Ledger, Received, Route, Running, eventually, task, test_config, unique,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What the patched parser puts in place of a table nested deeper than 64 levels.
const TOO_DEEP_MARKER: &str = "(nested deeper than 64 levels: dropped)";
/// RabbitMQ's default `frame_max`, which both sides negotiate.
const FRAME_MAX: usize = 131_072;
/// How long the engine gets to settle what the test published.
const SETTLE: Duration = Duration::from_secs(30);

/// Answers `{"id": ..}`, or fails without retry when the task's `mode` is `reject`.
#[consumer(
    queue = "tests.hostile_frames.echo",
    reply_key = "tests.hostile_frames.echo.result"
)]
async fn echo(task: Value) -> Result<Value, HandlerError> {
    match task["mode"].as_str() {
        Some("reject") => Err(HandlerError::dead_letter("rejected as asked")),
        _ => Ok(json!({"id": task["id"]})),
    }
}

fn setup(broker: &mut Broker, tune: impl FnOnce(&mut Config)) -> (String, Config, Route) {
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    tune(&mut config);
    let route = Route::new(&mut config, "echo", broker);
    (exchange, config, route)
}

// ---------------------------------------------------------------------------------------------
// A minimal AMQP 0-9-1 client: PLAIN login, one channel in confirm mode, publish, basic.get.

/// A frame as read: type, channel, payload.
type Frame = (u8, u16, Vec<u8>);

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;

struct Raw {
    stream: TcpStream,
    /// What the client waits for, for the message of a broker that does not answer.
    step: &'static str,
}

/// How the broker answered a publish.
#[derive(Debug, PartialEq, Eq)]
enum Published {
    Confirmed,
    /// Nacked, returned or refused (channel or connection closed); the broker's words.
    Refused(String),
}

fn put_short(out: &mut Vec<u8>, text: &str) {
    out.push(u8::try_from(text.len()).expect("a short string"));
    out.extend_from_slice(text.as_bytes());
}

fn put_long(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(bytes);
}

fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + args.len());
    payload.extend_from_slice(&class.to_be_bytes());
    payload.extend_from_slice(&method.to_be_bytes());
    payload.extend_from_slice(args);
    payload
}

/// The class and method ids of a method frame's payload.
fn ids(payload: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    )
}

/// The reply text of a `channel.close` / `connection.close`.
fn close_text(payload: &[u8]) -> String {
    let code = u16::from_be_bytes([payload[4], payload[5]]);
    let len = usize::from(payload[6]);
    let text = String::from_utf8_lossy(&payload[7..7 + len]);
    format!("{code} {text}")
}

impl Raw {
    async fn connect() -> Self {
        let (host, port) = common::broker_addr();
        let stream = TcpStream::connect((host.as_str(), port)).await.unwrap();
        let mut raw = Self {
            stream,
            step: "connection.start",
        };
        raw.stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        raw.expect(0, (10, 10)).await; // connection.start
        let mut args = vec![0, 0, 0, 0]; // client-properties: {}
        put_short(&mut args, "PLAIN");
        put_long(&mut args, b"\0guest\0guest");
        put_short(&mut args, "en_US");
        raw.send_method(0, 10, 11, &args).await;
        let tune = raw.expect(0, (10, 30)).await;
        let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
        assert_eq!(
            frame_max as usize, FRAME_MAX,
            "the broker's frame_max (the sizes below assume RabbitMQ's default)"
        );
        let mut args = tune[..6].to_vec(); // channel_max, frame_max
        args.extend_from_slice(&[0, 0]); // no heartbeats
        raw.send_method(0, 10, 31, &args).await;
        let mut args = Vec::new();
        put_short(&mut args, "/");
        args.extend_from_slice(&[0, 0]);
        raw.send_method(0, 10, 40, &args).await;
        raw.expect(0, (10, 41)).await;
        raw.send_method(1, 20, 10, &[0]).await;
        raw.expect(1, (20, 11)).await;
        raw.send_method(1, 85, 10, &[0]).await; // confirm.select
        raw.expect(1, (85, 11)).await;
        raw
    }

    async fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn send_method(&mut self, channel: u16, class: u16, id: u16, args: &[u8]) {
        self.send_frame(FRAME_METHOD, channel, &method(class, id, args))
            .await;
    }

    /// The next frame; `None` once the broker closed the socket.
    async fn read_frame(&mut self) -> Option<Frame> {
        let read = async {
            let mut head = [0_u8; 7];
            self.stream.read_exact(&mut head).await.ok()?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0_u8; size + 1];
            self.stream.read_exact(&mut payload).await.ok()?;
            assert_eq!(payload.pop(), Some(FRAME_END), "frame end");
            Some((head[0], u16::from_be_bytes([head[1], head[2]]), payload))
        };
        let step = self.step;
        tokio::time::timeout(SETTLE, read)
            .await
            .unwrap_or_else(|_| panic!("the broker did not answer ({step})"))
    }

    /// The arguments of the method `(class, method)` expected next on `channel`.
    async fn expect(&mut self, channel: u16, want: (u16, u16)) -> Vec<u8> {
        self.step = "a handshake method";
        let (kind, on, payload) = self.read_frame().await.expect("the broker closed");
        assert_eq!((kind, on), (FRAME_METHOD, channel), "{payload:?}");
        let got = ids(&payload);
        assert!(
            got == want,
            "expected method {want:?}, got {got:?} ({})",
            if matches!(got, (10, 50) | (20, 40)) {
                close_text(&payload)
            } else {
                String::new()
            }
        );
        payload[4..].to_vec()
    }

    /// Publishes (mandatory) a message with the given content properties: `flags` and the
    /// properties' bytes; waits for the broker's answer.
    async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        flags: u16,
        properties: &[u8],
        body: &[u8],
    ) -> Published {
        let mut args = vec![0, 0];
        put_short(&mut args, exchange);
        put_short(&mut args, routing_key);
        args.push(1); // mandatory
        self.step = "the publish confirm";
        self.send_method(1, 60, 40, &args).await;
        self.send_frame(
            FRAME_HEADER,
            1,
            &content_header(body.len(), flags, properties),
        )
        .await;
        self.send_frame(FRAME_BODY, 1, body).await;
        let mut returned = None;
        loop {
            let Some((kind, _, payload)) = self.read_frame().await else {
                return Published::Refused("the broker closed the connection".to_owned());
            };
            if kind != FRAME_METHOD {
                continue; // a returned message's header and body
            }
            match ids(&payload) {
                (60, 80) => {
                    return returned.map_or(Published::Confirmed, Published::Refused);
                }
                (60, 120) => return Published::Refused("nacked".to_owned()),
                (60, 50) => returned = Some(format!("returned: {}", close_text(&payload))),
                (10, 50) | (20, 40) => return Published::Refused(close_text(&payload)),
                other => panic!("unexpected method {other:?}"),
            }
        }
    }

    /// `basic.get` (no-ack) from `queue`: the payload size of the content header frame the
    /// broker sent, and the body; `None` when the queue is empty.
    async fn get(&mut self, queue: &str) -> Option<(usize, Vec<u8>)> {
        let mut args = vec![0, 0];
        put_short(&mut args, queue);
        args.push(1); // no-ack
        self.step = "basic.get";
        self.send_method(1, 60, 70, &args).await;
        let (kind, _, payload) = self.read_frame().await.expect("the broker closed");
        assert_eq!(kind, FRAME_METHOD);
        match ids(&payload) {
            (60, 72) => return None,
            (60, 71) => {}
            (10, 50) | (20, 40) => panic!("basic.get refused: {}", close_text(&payload)),
            other => panic!("unexpected method {other:?}"),
        }
        let (kind, _, header) = self.read_frame().await.expect("a content header");
        assert_eq!(kind, FRAME_HEADER);
        let size = u64::from_be_bytes(header[4..12].try_into().unwrap());
        let mut body = Vec::new();
        while (body.len() as u64) < size {
            let (kind, _, chunk) = self.read_frame().await.expect("a body frame");
            assert_eq!(kind, FRAME_BODY);
            body.extend_from_slice(&chunk);
        }
        Some((header.len(), body))
    }

    async fn close(mut self) {
        let mut args = vec![0, 200];
        put_short(&mut args, "bye");
        args.extend_from_slice(&[0, 0, 0, 0]);
        self.step = "connection.close-ok";
        self.send_method(0, 10, 50, &args).await;
        // Whatever was still on its way, then close-ok (or the socket's end).
        while let Some((kind, _, payload)) = self.read_frame().await {
            if kind == FRAME_METHOD && ids(&payload) == (10, 51) {
                break;
            }
        }
    }
}

/// The payload of a basic content header frame.
fn content_header(body_size: usize, flags: u16, properties: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(14 + properties.len());
    payload.extend_from_slice(&60_u16.to_be_bytes());
    payload.extend_from_slice(&[0, 0]);
    payload.extend_from_slice(&(body_size as u64).to_be_bytes());
    payload.extend_from_slice(&flags.to_be_bytes());
    payload.extend_from_slice(properties);
    payload
}

/// The property flags of [`properties`]: content-type, headers, delivery-mode, message-id.
const FLAGS: u16 = 0x8000 | 0x2000 | 0x1000 | 0x0080;

/// content-type `application/json`, `headers` (the table's entries, encoded), delivery-mode
/// 2, message-id `id`.
fn properties(entries: &[u8], id: &str) -> Vec<u8> {
    properties_with_id(entries, id.as_bytes())
}

/// [`properties`] with any bytes as the message-id.
fn properties_with_id(entries: &[u8], id: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() + 64);
    put_short(&mut out, "application/json");
    put_long(&mut out, entries);
    out.push(2);
    out.push(u8::try_from(id.len()).expect("a short string"));
    out.extend_from_slice(id);
    out
}

/// A header entry `key` holding a field table nested `levels` deep (the value itself is
/// level 1 below the `headers` table), each level holding the next under "a" and the
/// innermost a long string. Written outside in, lengths filled last: no recursion, linear.
fn deep_entry(key: &str, levels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(levels * 7 + 32);
    put_short(&mut out, key);
    out.push(b'F');
    let mut lengths = Vec::with_capacity(levels);
    for level in 0..levels {
        lengths.push(out.len());
        out.extend_from_slice(&[0; 4]);
        if level + 1 < levels {
            out.extend_from_slice(&[1, b'a', b'F']);
        } else {
            put_short(&mut out, "bottom");
            out.push(b'S');
            put_long(&mut out, b"the innermost level");
        }
    }
    // Each table runs to the end of the buffer (its last entry is the next table).
    let end = out.len();
    for at in lengths {
        let len = u32::try_from(end - at - 4).unwrap();
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    out
}

/// A header entry `pad` holding a long string of `len` bytes.
fn pad_entry(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    put_short(&mut out, "pad");
    out.push(b'S');
    put_long(&mut out, &vec![b'x'; len]);
    out
}

/// Properties whose content header frame (for a `body` of `body_len` bytes) has a payload
/// of exactly `size` bytes, padded by a `pad` header.
fn properties_of_size(size: usize, body_len: usize, id: &str) -> Vec<u8> {
    let bare = content_header(body_len, FLAGS, &properties(&pad_entry(0), id)).len();
    let props = properties(&pad_entry(size - bare), id);
    assert_eq!(content_header(body_len, FLAGS, &props).len(), size);
    props
}

fn json_body(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

// ---------------------------------------------------------------------------------------------

/// Good task, a task whose `deep` header is `levels` deep, good task: the deep one is
/// dead-lettered (`headers_too_deep`, the marker in place of the dropped levels), the good
/// ones are answered, the engine never reconnects.
async fn deep_headers_are_dead_lettered(levels: usize) {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, |_| {});
    let probe = unique("hostile.probe");
    broker.declare_queue(&probe).await;
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["echo"]).await;

    let mut ledger = Ledger::new("deep");
    let ids = ledger.ids(3);
    let mut raw = Raw::connect().await;
    let entry = deep_entry("deep", levels);
    // The broker keeps the whole depth and delivers it (to a reader that does not parse it).
    let props = properties(&entry, &ids[1]);
    let body = json_body(&task(&ids[1], json!({})));
    assert_eq!(
        raw.publish("", &probe, FLAGS, &props, &body).await,
        Published::Confirmed,
        "{} accepts {levels} levels",
        common::broker_name()
    );
    let (header, _) = raw.get(&probe).await.expect("the probe copy");
    assert!(header > entry.len(), "{header} bytes delivered");

    ledger
        .publish(
            &broker,
            &exchange,
            &route.queue,
            &[task(&ids[0], json!({}))],
        )
        .await;
    ledger.published.insert(ids[1].clone());
    assert_eq!(
        raw.publish(&exchange, &route.queue, FLAGS, &props, &body)
            .await,
        Published::Confirmed
    );
    ledger.confirmed.insert(ids[1].clone());
    ledger
        .publish(
            &broker,
            &exchange,
            &route.queue,
            &[task(&ids[2], json!({}))],
        )
        .await;
    raw.close().await;
    assert_eq!(ledger.confirmed.len(), 3);

    let stats = || running.health.snapshot().handlers[0].clone();
    eventually("the deep task dead-lettered", SETTLE, || {
        stats().dead_lettered + stats().rejected >= 1
    })
    .await;
    eventually("the good tasks answered", SETTLE, || stats().succeeded >= 2).await;
    ledger
        .drain_route(&broker, &route, Duration::from_millis(500), SETTLE)
        .await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(
        (report.results_unique, report.dead_lettered),
        (2, 1),
        "{report:?}"
    );
    assert_eq!((report.duplicates, report.dead_total), (0, 1), "{report:?}");
    assert!(ledger.results.contains_key(&ids[0]) && ledger.results.contains_key(&ids[2]));
    let dead: &Received = &ledger.dead_messages[0];
    assert_eq!(common::id_of(dead).as_deref(), Some(ids[1].as_str()));
    let h = &dead.headers;
    assert_eq!(h["x-error-kind"], "headers_too_deep", "{h:?}");
    assert!(
        h["x-death-reason"].contains("nested deeper than 64 levels"),
        "{h:?}"
    );
    // The copy carries the marker where the parser stopped (`deep` is level 2 below the
    // `headers` table: 63 tables kept), not the dropped levels.
    let deep = &h["deep"];
    let marker = format!("{:?}", AMQPValue::LongString(TOO_DEEP_MARKER.into()));
    assert!(deep.contains(&marker), "{deep}");
    assert_eq!(deep.matches("FieldTable(FieldTable(").count(), 63, "{deep}");

    let snapshot = running.health.snapshot();
    assert_eq!(snapshot.reconnects, 0, "{snapshot:?}");
    assert!(
        snapshot.connected && snapshot.handlers[0].consuming,
        "{snapshot:?}"
    );
    assert_eq!(snapshot.handlers[0].stale_acks, 0, "{snapshot:?}");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// 2,000 levels (about 14 KB) overflowed the stack of lapin's io thread: SIGABRT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_2000_levels_are_dead_lettered() {
    deep_headers_are_dead_lettered(2_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_12000_levels_are_dead_lettered() {
    deep_headers_are_dead_lettered(12_000).await;
}

/// Content header frames whose payload is 131,064 (the largest lapin took before) to 131,072
/// bytes (frame_max: RabbitMQ accepts payloads up to frame_max from publishers and delivers
/// them as they are) reach the handler and are answered. A good task before and after them is
/// answered; the engine never reconnects. 131,073 is refused by the broker itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_frames_up_to_frame_max_are_consumed() {
    const SIZES: [usize; 5] = [131_064, 131_065, 131_066, 131_071, 131_072];
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, |_| {});
    let probe = unique("hostile.probe");
    broker.declare_queue(&probe).await;
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["echo"]).await;

    let mut ledger = Ledger::new("frames");
    let ids = ledger.ids(SIZES.len() + 2);
    let mut raw = Raw::connect().await;
    // The broker delivers such header frames byte for byte.
    for size in SIZES {
        let body = json_body(&task("probe", json!({})));
        let props = properties_of_size(size, body.len(), "probe");
        assert_eq!(
            raw.publish("", &probe, FLAGS, &props, &body).await,
            Published::Confirmed,
            "{} accepts a {size}-byte header frame payload",
            common::broker_name()
        );
        let (delivered, _) = raw.get(&probe).await.expect("the probe copy");
        assert_eq!(delivered, size, "header frame payload as delivered");
    }

    ledger
        .publish(
            &broker,
            &exchange,
            &route.queue,
            &[task(&ids[0], json!({}))],
        )
        .await;
    for (id, size) in ids[1..].iter().zip(SIZES) {
        let body = json_body(&task(id, json!({})));
        let props = properties_of_size(size, body.len(), id);
        ledger.published.insert(id.clone());
        assert_eq!(
            raw.publish(&exchange, &route.queue, FLAGS, &props, &body)
                .await,
            Published::Confirmed,
            "{size}"
        );
        ledger.confirmed.insert(id.clone());
    }
    let last = ids.last().unwrap();
    ledger
        .publish(&broker, &exchange, &route.queue, &[task(last, json!({}))])
        .await;
    assert_eq!(ledger.confirmed.len(), ids.len());

    // One byte more than frame_max is the broker's own limit: it closes the publisher.
    let body = json_body(&task("too-large", json!({})));
    let props = properties_of_size(FRAME_MAX + 1, body.len(), "too-large");
    let refused = raw.publish("", &probe, FLAGS, &props, &body).await;
    assert!(matches!(refused, Published::Refused(_)), "{refused:?}");
    println!(
        "[frames] a {}-byte header frame payload: {refused:?}",
        FRAME_MAX + 1
    );

    let stats = || running.health.snapshot().handlers[0].clone();
    eventually("every task answered", SETTLE, || {
        stats().succeeded >= ids.len() as u64
    })
    .await;
    ledger
        .drain_route(&broker, &route, Duration::from_millis(500), SETTLE)
        .await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(
        (report.results_unique, report.duplicates, report.dead_total),
        (ids.len(), 0, 0),
        "{report:?}"
    );
    let snapshot = running.health.snapshot();
    assert_eq!(snapshot.reconnects, 0, "{snapshot:?}");
    assert!(
        snapshot.connected && snapshot.handlers[0].consuming,
        "{snapshot:?}"
    );
    assert_eq!(snapshot.handlers[0].stale_acks, 0, "{snapshot:?}");
    running.stop().await.unwrap();
    broker.cleanup().await;
}

/// Publishes, between two good tasks, a task whose content header frame is `header_bytes`
/// and which the handler rejects, to an engine `tune` configures; checks that it ends in the
/// dead-letter queue without its padding header (and says so in `x-headers-dropped`), with
/// the good tasks answered and no reconnect.
async fn reject_a_task_with_large_headers(
    name: &str,
    header_bytes: usize,
    tune: impl FnOnce(&mut Config),
) -> BTreeMap<String, String> {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, tune);
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["echo"]).await;

    let mut ledger = Ledger::new(name);
    let ids = ledger.ids(3);
    let mut raw = Raw::connect().await;
    ledger
        .publish(
            &broker,
            &exchange,
            &route.queue,
            &[task(&ids[0], json!({}))],
        )
        .await;
    let body = json_body(&task(&ids[1], json!({"mode": "reject"})));
    let props = properties_of_size(header_bytes, body.len(), &ids[1]);
    ledger.published.insert(ids[1].clone());
    assert_eq!(
        raw.publish(&exchange, &route.queue, FLAGS, &props, &body)
            .await,
        Published::Confirmed
    );
    ledger.confirmed.insert(ids[1].clone());
    ledger
        .publish(
            &broker,
            &exchange,
            &route.queue,
            &[task(&ids[2], json!({}))],
        )
        .await;
    raw.close().await;

    let stats = || running.health.snapshot().handlers[0].clone();
    eventually("the rejected task dead-lettered", SETTLE, || {
        stats().dead_lettered >= 1
    })
    .await;
    eventually("the good tasks answered", SETTLE, || stats().succeeded >= 2).await;
    ledger
        .drain_route(&broker, &route, Duration::from_millis(500), SETTLE)
        .await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(
        (report.results_unique, report.dead_lettered),
        (2, 1),
        "{report:?}"
    );
    let h = ledger.dead_messages[0].headers.clone();
    // The copy left out the padding header, and says so.
    assert!(!h.contains_key("pad"), "{:?}", h.keys());
    assert!(h["x-headers-dropped"].starts_with("pad ("), "{h:?}");
    let snapshot = running.health.snapshot();
    assert_eq!(snapshot.reconnects, 0, "{snapshot:?}");
    running.stop().await.unwrap();
    broker.cleanup().await;
    h
}

/// A task with a 131,065-byte content header frame that the handler rejects: its dead-letter
/// copy (the original headers plus the engine's `x-*` headers) would not fit one frame, which
/// the broker answers by closing the engine's connection. It must still end in the DLQ, with
/// no reconnect, and the tasks around it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_task_with_a_header_frame_near_frame_max_is_dead_lettered() {
    let h = reject_a_task_with_large_headers("large-reject", 131_065, |_| {}).await;
    assert_eq!(h["x-error-kind"], "handler_rejected", "{h:?}");
}

/// The same with a `frame_max` of 16 KiB asked for in the engine's URL: the copy is fitted to
/// the negotiated size, not to RabbitMQ's default (a 16,000-byte header frame that the engine
/// reads fine grew past 16 KiB with the failure headers, and the broker closed the engine's
/// connection for it, again and again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_fit_the_negotiated_frame_max() {
    const SMALL_FRAME_MAX: usize = 16_384;
    reject_a_task_with_large_headers("small-frame-max", SMALL_FRAME_MAX - 400, |config| {
        let url = common::broker_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        config.urls = vec![rmq_consumer::config::SecretUrl::new(format!(
            "{url}{separator}frame_max={SMALL_FRAME_MAX}"
        ))];
    })
    .await;
}

/// Short strings that are not UTF-8 (RabbitMQ passes them on unchecked): a header key, a
/// message-id. lapin's parser failed the whole frame on them (the connection died, the
/// message came back on the next one, forever); the patched one decodes them lossily, and the
/// engine dead-letters the message (`text_not_utf8`). Good tasks around them are answered; the
/// engine never reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_strings_that_are_not_utf8_are_dead_lettered() {
    let mut broker = Broker::connect().await;
    let (exchange, config, route) = setup(&mut broker, |_| {});
    let probe = unique("hostile.probe");
    broker.declare_queue(&probe).await;
    let _cleanup = broker.cleanup_on_panic();
    let running = Running::start(config, &["echo"]).await;

    let mut ledger = Ledger::new("utf8");
    let ids = ledger.ids(4);
    let mut raw = Raw::connect().await;
    // A header key of one byte that is not UTF-8, and a message-id ending in one.
    let bad_key = [1, 0xff, b'S', 0, 0, 0, 1, b'x'];
    let hostile = [
        (properties(&bad_key, &ids[1]), &ids[1]),
        (
            properties_with_id(&[], &[ids[2].as_bytes(), &[0xff][..]].concat()),
            &ids[2],
        ),
    ];
    for (props, id) in &hostile {
        // The broker takes and delivers them as they are.
        let body = json_body(&task(id, json!({})));
        assert_eq!(
            raw.publish("", &probe, FLAGS, props, &body).await,
            Published::Confirmed
        );
        let (header, _) = raw.get(&probe).await.expect("the probe copy");
        assert_eq!(header, content_header(body.len(), FLAGS, props).len());
    }

    ledger
        .publish(
            &broker,
            &exchange,
            &route.queue,
            &[task(&ids[0], json!({}))],
        )
        .await;
    for (props, id) in &hostile {
        let body = json_body(&task(id, json!({})));
        ledger.published.insert((*id).clone());
        assert_eq!(
            raw.publish(&exchange, &route.queue, FLAGS, props, &body)
                .await,
            Published::Confirmed
        );
        ledger.confirmed.insert((*id).clone());
    }
    ledger
        .publish(
            &broker,
            &exchange,
            &route.queue,
            &[task(&ids[3], json!({}))],
        )
        .await;
    raw.close().await;
    assert_eq!(ledger.confirmed.len(), 4);

    let stats = || running.health.snapshot().handlers[0].clone();
    eventually("the hostile tasks dead-lettered", SETTLE, || {
        stats().dead_lettered + stats().rejected >= 2
    })
    .await;
    eventually("the good tasks answered", SETTLE, || stats().succeeded >= 2).await;
    ledger
        .drain_route(&broker, &route, Duration::from_millis(500), SETTLE)
        .await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(
        (report.results_unique, report.dead_lettered),
        (2, 2),
        "{report:?}"
    );
    assert_eq!((report.duplicates, report.dead_total), (0, 2), "{report:?}");
    assert!(ledger.results.contains_key(&ids[0]) && ledger.results.contains_key(&ids[3]));
    for dead in &ledger.dead_messages {
        let h = &dead.headers;
        assert_eq!(h["x-error-kind"], "text_not_utf8", "{h:?}");
        let id = common::id_of(dead).unwrap_or_default();
        let (what, message_id) = if id == ids[1] {
            ("the header key \u{FFFD} is not UTF-8", id.clone())
        } else {
            ("message_id is not UTF-8", format!("{id}\u{FFFD}"))
        };
        assert!(h["x-death-reason"].contains(what), "{id}: {h:?}");
        // The copies hold the lossy text, which is UTF-8.
        assert_eq!(dead.message_id.as_deref(), Some(message_id.as_str()));
    }
    let snapshot = running.health.snapshot();
    assert_eq!(snapshot.reconnects, 0, "{snapshot:?}");
    assert!(
        snapshot.connected && snapshot.handlers[0].consuming,
        "{snapshot:?}"
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

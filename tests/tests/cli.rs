//! The operator CLI against a real broker (and its management API): publish, status, dlq
//! peek/replay/purge, handlers, check-config; exit codes and password masking.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    str::FromStr,
    time::{Duration, Instant},
};

use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions},
    types::{AMQPValue, FieldTable, LongString},
    uri::AMQPUri,
};
use rmq_consumer::{
    HandlerError,
    cli::{EXIT_ERROR, EXIT_FAILURE, EXIT_OK},
    consumer,
};
use rmq_consumer_tests::{
    Broker, broker_name, broker_url, cli_management_url, rabbitmqctl_blocking, test_broker, unique,
};
use serde_json::{Value, json};

/// Registered so that `handlers` has something to list.
#[consumer(queue = "tests.cli.echo", reply_key = "tests.cli.echo.result")]
async fn cli_echo(data: Value) -> Result<Option<Value>, HandlerError> {
    Ok(Some(data))
}

/// What one CLI run printed.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}\n{}", self.out, self.err)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.all()))
    }
}

/// Runs the CLI in-process with `--url <the test broker>` appended, and `--management-url`
/// where the CLI's default (port 15672 of the broker's host) is not the test broker's.
fn cli(args: &[&str]) -> Run {
    let url = broker_url();
    let management = cli_management_url();
    let mut full = vec!["rmq-consumer"];
    full.extend_from_slice(args);
    if !args.contains(&"--url") {
        full.extend_from_slice(&["--url", &url]);
    }
    if let Some(management) = &management
        && !args.contains(&"--management-url")
    {
        full.extend_from_slice(&["--management-url", management]);
    }
    cli_raw(&full)
}

fn cli_raw(args: &[&str]) -> Run {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = rmq_consumer::cli::run_args(args.iter().copied(), &mut out, &mut err);
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn header_table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// Publishes `count` dead-lettered-looking messages (as the engine writes them) to `dlq`.
async fn fill_dlq(broker: &Broker, dlq: &str, original: &str, count: usize) {
    for i in 0..count {
        let headers = header_table(&[
            ("x-retry-count", AMQPValue::LongLongInt(3)),
            ("x-death-reason", text("retries exhausted: boom")),
            ("x-error-kind", text("handler")),
            ("x-last-error", text("boom")),
            ("x-original-queue", text(original)),
            ("x-original-exchange", text("")),
            ("x-original-routing-key", text(original)),
            ("x-handler", text("cli_echo")),
            ("x-first-failure-at", text("2025-01-01T00:00:00.000Z")),
            ("x-last-failure-at", text("2025-01-01T00:00:01.000Z")),
            ("tenant", text("acme")),
        ]);
        broker
            .publish_raw(
                "",
                dlq,
                json!({"n": i}).to_string().as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(headers),
            )
            .await;
    }
}

/// A GET on the management API (plain HTTP/1.0, credentials from the test broker URL).
fn management_get(path: &str) -> Value {
    let uri = AMQPUri::from_str(&broker_url()).unwrap();
    let host = uri.authority.host.clone();
    let login = format!(
        "{}:{}",
        uri.authority.userinfo.username, uri.authority.userinfo.password
    );
    let port = test_broker().management_port();
    let mut stream = TcpStream::connect((host.as_str(), port)).unwrap_or_else(|e| {
        panic!(
            "these tests need the management plugin of {} on {host}:{port} ({}): {e}",
            broker_name(),
            test_broker().start_hint()
        )
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Basic {}\r\nAccept: application/json\r\n\r\n",
        base64(login.as_bytes())
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    serde_json::from_str(body).unwrap()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Everything about the test's own queues, exchanges and bindings, as the management API sees
/// them.
fn topology(prefix: &str) -> Value {
    let queues: Vec<Value> = management_get(
        "/api/queues/%2F?columns=name,durable,auto_delete,arguments,type,messages,messages_ready,messages_unacknowledged",
    )
    .as_array()
    .unwrap()
    .iter()
    .filter(|q| q["name"].as_str().unwrap().starts_with(prefix))
    .cloned()
    .collect();
    let exchanges: Vec<Value> =
        management_get("/api/exchanges/%2F?columns=name,type,durable,arguments")
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"].as_str().unwrap().starts_with(prefix))
            .cloned()
            .collect();
    let bindings: Vec<Value> = management_get("/api/bindings/%2F")
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| {
            b["destination"].as_str().unwrap().starts_with(prefix)
                || b["source"].as_str().unwrap().starts_with(prefix)
        })
        .cloned()
        .collect();
    json!({"queues": queues, "exchanges": exchanges, "bindings": bindings})
}

/// Waits until the management API's view of `queue` satisfies `check` (its statistics lag).
fn wait_for_management(what: &str, queue: &str, check: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if check(&management_get(&format!("/api/queues/%2F/{queue}"))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the management API never showed the {what} of {queue}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

async fn declare_exchange(broker: &mut Broker, name: &str) {
    broker
        .channel
        .exchange_declare(
            name.into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker.track_exchange(name);
}

async fn bind(broker: &Broker, queue: &str, exchange: &str, key: &str) {
    broker
        .channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// A config file for the registered `cli_echo` handler, with unique names.
struct Routed {
    exchange: String,
    queue: String,
    reply_queue: String,
    reply_key: String,
    file: std::path::PathBuf,
}

fn routed_config(extra: &str) -> Routed {
    let queue = unique("cli");
    let routed = Routed {
        exchange: format!("{queue}.ex"),
        reply_queue: format!("{queue}.results"),
        reply_key: format!("{queue}.result"),
        file: std::env::temp_dir().join(format!("{queue}.toml")),
        queue,
    };
    // The test broker's management API, unless the test configures its own.
    let management = match cli_management_url() {
        Some(url) if !extra.contains("management_url") => format!("management_url = \"{url}\"\n"),
        _ => String::new(),
    };
    let text = format!(
        "url = \"{}\"\nexchange = \"{}\"\n{management}{extra}\n[consumers.cli_echo]\nqueue = \"{}\"\nreply_queue = \"{}\"\nreply_key = \"{}\"\ndead_letter = false\n",
        broker_url(),
        routed.exchange,
        routed.queue,
        routed.reply_queue,
        routed.reply_key
    );
    std::fs::write(&routed.file, text).unwrap();
    routed
}

// --- publish -----------------------------------------------------------------------------

#[test]
fn publish_confirms_every_generated_message() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let queue = unique("cli");
    rt.block_on(broker.declare_queue(&queue));

    let run = cli(&[
        "publish",
        "--queue",
        &queue,
        "--count",
        "500",
        "--template",
        r#"{"task_id": {i}}"#,
        "--concurrency",
        "64",
        "--json",
    ]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    let summary = run.json();
    assert_eq!(summary["sent"], 500);
    assert_eq!(summary["confirmed"], 500);
    assert_eq!(summary["returned"], 0);
    assert_eq!(summary["nacked"], 0);
    assert_eq!(rt.block_on(broker.depth(&queue)), Some(500));

    let received = rt.block_on(broker.collect(&queue, 2, Duration::from_secs(5)));
    assert_eq!(received[0].json, Some(json!({"task_id": 0})));
    assert_eq!(received[1].json, Some(json!({"task_id": 1})));
    assert_eq!(
        received[0].content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(received[0].delivery_mode, Some(2));
    rt.block_on(broker.cleanup());
}

#[test]
fn publish_sends_json_lines_from_a_file_through_an_exchange() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let queue = unique("cli");
    let exchange = format!("{queue}.ex");
    rt.block_on(broker.declare_queue(&queue));
    rt.block_on(declare_exchange(&mut broker, &exchange));
    rt.block_on(bind(&broker, &queue, &exchange, "k"));
    let file = std::env::temp_dir().join(format!("{queue}.jsonl"));
    std::fs::write(&file, "{\"a\": 1}\n\n  [1, 2]  \n\"text\"\n").unwrap();

    let run = cli(&[
        "publish",
        "--exchange",
        &exchange,
        "--routing-key",
        "k",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(
        run.out
            .contains("sent 3, confirmed 3, returned 0, nacked 0"),
        "{}",
        run.out
    );
    let received = rt.block_on(broker.collect(&queue, 3, Duration::from_secs(5)));
    let bodies: Vec<Value> = received.into_iter().map(|r| r.json.unwrap()).collect();
    assert_eq!(bodies, [json!({"a": 1}), json!([1, 2]), json!("text")]);

    // One bad line: nothing is sent at all.
    std::fs::write(&file, "{\"a\": 1}\n{oops\n").unwrap();
    let run = cli(&[
        "publish",
        "--queue",
        &queue,
        "--file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
    assert!(run.err.contains("line 2 is not valid JSON"), "{}", run.err);
    assert_eq!(rt.block_on(broker.depth(&queue)), Some(0));
    let _ = std::fs::remove_file(&file);
    rt.block_on(broker.cleanup());
}

#[test]
fn publish_counts_unroutable_messages_as_returned_and_fails() {
    let missing = unique("cli.missing");
    let run = cli(&[
        "publish",
        "--queue",
        &missing,
        "--count",
        "20",
        "--template",
        r#"{"i": {i}}"#,
        "--json",
    ]);
    assert_eq!(run.code, EXIT_FAILURE, "{}", run.all());
    let summary = run.json();
    assert_eq!(summary["sent"], 20);
    assert_eq!(summary["returned"], 20);
    assert_eq!(summary["confirmed"], 0);

    let run = cli(&[
        "publish",
        "--queue",
        &missing,
        "--count",
        "2",
        "--template",
        "{}",
    ]);
    assert_eq!(run.code, EXIT_FAILURE);
    assert!(run.out.contains("returned 2"), "{}", run.out);
    assert!(run.out.contains("unroutable"), "{}", run.out);
}

#[test]
fn publish_dry_run_validates_without_connecting() {
    let run = cli_raw(&[
        "rmq-consumer",
        "--url",
        "amqp://u:dry-run-secret@127.0.0.1:1/%2f",
        "publish",
        "--queue",
        "nowhere",
        "--count",
        "3",
        "--template",
        r#"{"i": {i}}"#,
        "--dry-run",
    ]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(run.out.contains("3 valid JSON messages"), "{}", run.out);
    assert!(
        run.out.contains(r#"first message: {"i": 0}"#),
        "{}",
        run.out
    );

    let run = cli_raw(&[
        "rmq-consumer",
        "publish",
        "--queue",
        "nowhere",
        "--count",
        "1",
        "--template",
        "{i",
        "--dry-run",
    ]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
}

// --- status ------------------------------------------------------------------------------

#[test]
fn status_shows_an_existing_queue_with_its_bindings_and_consumers() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let queue = unique("cli");
    let exchange = format!("{queue}.ex");
    rt.block_on(broker.declare_queue(&queue));
    rt.block_on(declare_exchange(&mut broker, &exchange));
    rt.block_on(bind(&broker, &queue, &exchange, "route.a"));
    let consumer_channel = rt.block_on(broker.connection.create_channel()).unwrap();
    let consumer = rt
        .block_on(consumer_channel.basic_consume(
            queue.as_str().into(),
            "cli-test-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .unwrap();
    // The management API's consumer details lag behind by its statistics interval.
    wait_for_management("consumer", &queue, |q| {
        q["consumer_details"]
            .as_array()
            .is_some_and(|c| c.len() == 1)
    });

    let run = cli(&["status", "--queue", &queue]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(run.out.contains(&queue), "{}", run.out);
    assert!(run.out.contains("status: healthy (exit 0)"), "{}", run.out);
    assert!(
        run.out.contains(&format!("{exchange} -> `route.a`")),
        "{}",
        run.out
    );
    assert!(
        run.out.contains("consumer cli-test-consumer: prefetch"),
        "{}",
        run.out
    );

    let run = cli(&["status", "--queue", &queue, "--json"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    let report = run.json();
    assert_eq!(report["source"], "management");
    assert_eq!(report["health"], "healthy");
    let status = &report["queues"][0];
    assert_eq!(status["exists"], true);
    assert_eq!(status["consumers"], 1);
    assert_eq!(status["messages_ready"], 0);
    assert_eq!(status["queue_type"], "classic");
    let bindings = status["bindings"].as_array().unwrap();
    assert!(bindings.contains(&json!({"exchange": exchange, "routing_key": "route.a"})));
    assert!(bindings.contains(&json!({"exchange": "", "routing_key": queue})));
    assert_eq!(status["consumer_details"][0]["tag"], "cli-test-consumer");
    assert_eq!(status["consumer_details"][0]["ack_mode"], "manual");

    // The watch mode refreshes (here: twice, as JSON lines).
    let run = cli(&[
        "status",
        "--queue",
        &queue,
        "--json",
        "--watch",
        "--interval",
        "100ms",
        "--iterations",
        "2",
    ]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert_eq!(run.out.lines().count(), 2, "{}", run.out);

    drop(consumer);
    rt.block_on(broker.cleanup());
}

#[test]
fn status_of_a_missing_queue_exits_2() {
    let missing = unique("cli.missing");
    let run = cli(&["status", "--queue", &missing]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
    assert!(run.out.contains("MISSING"), "{}", run.out);
    assert!(
        run.out
            .contains(&format!("error: queue `{missing}` does not exist")),
        "{}",
        run.out
    );
    let report = cli(&["status", "--queue", &missing, "--json"]).json();
    assert_eq!(report["queues"][0]["exists"], false);
    assert_eq!(report["health"], "error");
}

#[test]
fn status_warns_about_messages_without_consumers() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let queue = unique("cli");
    rt.block_on(broker.declare_queue(&queue));
    rt.block_on(broker.publish_json("", &queue, &json!({"waiting": true})));

    let run = cli(&["status", "--queue", &queue]);
    assert_eq!(run.code, EXIT_FAILURE, "{}", run.all());
    assert!(
        run.out.contains("1 message waiting but no consumer"),
        "{}",
        run.out
    );
    let report = cli(&["status", "--queue", &queue, "--json"]).json();
    assert_eq!(report["health"], "warnings");
    assert_eq!(report["warnings"][0]["kind"], "no_consumers");
    rt.block_on(broker.cleanup());
}

#[test]
fn status_warns_about_an_unbound_reply_queue_from_the_config() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let routed = routed_config("");
    rt.block_on(declare_exchange(&mut broker, &routed.exchange));
    rt.block_on(broker.declare_queue(&routed.queue));
    rt.block_on(broker.declare_queue(&routed.reply_queue));
    let config = routed.file.to_str().unwrap();

    let run = cli_raw(&["rmq-consumer", "status", "--config", config]);
    assert_eq!(run.code, EXIT_FAILURE, "{}", run.all());
    assert!(
        run.out.contains(&format!(
            "not bound to exchange `{}` with routing key `{}`",
            routed.exchange, routed.reply_key
        )),
        "{}",
        run.out
    );
    let report = cli_raw(&["rmq-consumer", "status", "--config", config, "--json"]).json();
    let roles: Vec<(&str, &str)> = report["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["name"].as_str().unwrap(), q["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            (routed.queue.as_str(), "work"),
            (routed.reply_queue.as_str(), "reply")
        ]
    );
    assert_eq!(report["warnings"][0]["kind"], "reply_queue_unbound");
    assert_eq!(report["exchange"]["exists"], true);

    // Bound: healthy.
    rt.block_on(bind(
        &broker,
        &routed.reply_queue,
        &routed.exchange,
        &routed.reply_key,
    ));
    let run = cli_raw(&["rmq-consumer", "status", "--config", config]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());

    // A configured queue that does not exist: exit 2.
    broker.track_queue(&routed.queue);
    rt.block_on(
        broker
            .channel
            .queue_delete(routed.queue.as_str().into(), Default::default()),
    )
    .unwrap();
    let run = cli_raw(&["rmq-consumer", "status", "--config", config]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
    let _ = std::fs::remove_file(&routed.file);
    rt.block_on(broker.cleanup());
}

#[test]
fn status_changes_nothing_on_the_broker() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    // Work queue with messages, a reply queue that is missing, DLQ and delay queues missing:
    // a status that "checked" by declaring or binding would create them.
    let routed = routed_config("retry_delays = [\"5s\"]");
    rt.block_on(declare_exchange(&mut broker, &routed.exchange));
    rt.block_on(broker.declare_queue(&routed.queue));
    rt.block_on(bind(
        &broker,
        &routed.queue,
        &routed.exchange,
        &routed.queue,
    ));
    for i in 0..3 {
        rt.block_on(broker.publish_json("", &routed.queue, &json!({"i": i})));
    }
    wait_for_management("3 messages", &routed.queue, |q| {
        q["messages"].as_u64() == Some(3)
    });
    let prefix = routed.queue.clone();
    let before = topology(&prefix);
    assert_eq!(before["queues"].as_array().unwrap().len(), 1, "{before}");

    let config = routed.file.to_str().unwrap();
    let run = cli_raw(&["rmq-consumer", "status", "--config", config]);
    assert_eq!(
        run.code,
        EXIT_ERROR,
        "missing reply/delay queues: {}",
        run.all()
    );
    let run = cli_raw(&["rmq-consumer", "status", "--config", config, "--json"]);
    assert_eq!(run.code, EXIT_ERROR);
    let run = cli(&[
        "status",
        "--queue",
        &routed.reply_queue,
        "--queue",
        &routed.queue,
    ]);
    assert_eq!(run.code, EXIT_ERROR);

    let after = topology(&prefix);
    assert_eq!(before, after, "status changed the topology");
    assert_eq!(rt.block_on(broker.depth(&routed.queue)), Some(3));
    assert_eq!(rt.block_on(broker.depth(&routed.reply_queue)), None);
    let _ = std::fs::remove_file(&routed.file);
    rt.block_on(broker.cleanup());
}

#[test]
fn status_falls_back_to_amqp_without_the_management_api() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let queue = unique("cli");
    rt.block_on(broker.declare_queue(&queue));
    let run = cli(&[
        "status",
        "--queue",
        &queue,
        "--management-url",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(
        run.out.contains("management API is not available"),
        "{}",
        run.out
    );
    let report = cli(&[
        "status",
        "--queue",
        &queue,
        "--management-url",
        "http://127.0.0.1:1",
        "--json",
    ])
    .json();
    assert_eq!(report["source"], "amqp");
    assert_eq!(report["queues"][0]["exists"], true);
    assert_eq!(report["queues"][0]["bindings"], Value::Null);
    rt.block_on(broker.cleanup());
}

#[test]
fn passwords_never_appear_in_the_output() {
    let canary = "Canary-Pw-7f3a9";
    let uri = AMQPUri::from_str(&broker_url()).unwrap();
    let bad_url = format!(
        "amqp://{}:{canary}@{}:{}/%2f",
        uri.authority.userinfo.username, uri.authority.host, uri.authority.port
    );
    let queue = unique("cli");

    // Wrong password: the broker refuses, the management API too; exit 2, URL masked.
    let run = cli(&["status", "--url", &bad_url, "--queue", &queue]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
    assert!(
        !run.all().contains(canary),
        "password leaked:\n{}",
        run.all()
    );
    assert!(run.all().contains(":****@"), "{}", run.all());
    let run = cli(&["status", "--url", &bad_url, "--queue", &queue, "--json"]);
    assert_eq!(run.code, EXIT_ERROR);
    assert!(
        !run.all().contains(canary),
        "password leaked:\n{}",
        run.all()
    );

    for args in [
        vec![
            "publish",
            "--url",
            &bad_url,
            "--queue",
            &queue,
            "--count",
            "1",
            "--template",
            "{}",
        ],
        vec!["dlq", "peek", &queue, "--url", &bad_url],
        vec![
            "check-config",
            "--url",
            &bad_url,
            "--management-url",
            "http://ops:Canary-Pw-7f3a9@m:15672",
        ],
        vec!["check-config", "--url", &bad_url, "--json"],
    ] {
        let run = cli(&args);
        assert!(
            !run.all().contains(canary),
            "password leaked by {args:?}:\n{}",
            run.all()
        );
    }
    let run = cli(&["check-config", "--url", &bad_url]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(
        run.out
            .contains(&format!("amqp://{}:****@", uri.authority.userinfo.username)),
        "{}",
        run.out
    );
}

// --- dlq ---------------------------------------------------------------------------------

#[test]
fn dlq_peek_shows_failures_and_loses_nothing() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli");
    let dlq = format!("{work}.dlq");
    rt.block_on(broker.declare_queue(&dlq));
    rt.block_on(fill_dlq(&broker, &dlq, &work, 5));

    let run = cli(&["dlq", "peek", &dlq, "-n", "3"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(
        run.out.contains("5 messages ready; showing 3"),
        "{}",
        run.out
    );
    assert!(
        run.out.contains("x-death-reason: retries exhausted: boom"),
        "{}",
        run.out
    );
    assert!(
        run.out.contains(&format!("x-original-queue: {work}")),
        "{}",
        run.out
    );
    assert!(
        run.out.contains(r#"body (7 bytes): {"n":2}"#),
        "{}",
        run.out
    );
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(5));

    let run = cli(&["dlq", "peek", &dlq, "-n", "10", "--json"]);
    assert_eq!(run.json().as_array().unwrap().len(), 5);
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(5));

    // Order kept.
    let drained = rt.block_on(broker.drain(&dlq));
    let order: Vec<Value> = drained
        .into_iter()
        .map(|r| r.json.unwrap()["n"].clone())
        .collect();
    assert_eq!(order, [0, 1, 2, 3, 4]);

    let run = cli(&["dlq", "peek", &unique("cli.missing")]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
    rt.block_on(broker.cleanup());
}

#[test]
fn dlq_replay_moves_messages_back_with_nothing_lost() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli");
    let dlq = format!("{work}.dlq");
    rt.block_on(broker.declare_queue(&work));
    rt.block_on(broker.declare_queue(&dlq));
    rt.block_on(fill_dlq(&broker, &dlq, &work, 10));

    let run = cli(&["dlq", "replay", &dlq, "--limit", "4"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(
        run.out
            .contains(&format!("replayed 4 messages from `{dlq}` to `{work}`")),
        "{}",
        run.out
    );
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(6));
    assert_eq!(rt.block_on(broker.depth(&work)), Some(4));

    let replayed = rt.block_on(broker.drain(&work));
    assert_eq!(replayed.len(), 4);
    let first = &replayed[0];
    assert_eq!(first.json, Some(json!({"n": 0})));
    assert!(
        !first.headers.contains_key("x-retry-count"),
        "{:?}",
        first.headers
    );
    assert!(
        !first.headers.contains_key("x-death-reason"),
        "{:?}",
        first.headers
    );
    assert_eq!(first.headers["x-replayed-from"], dlq);
    assert_eq!(first.headers["x-replay-count"], "1");
    assert_eq!(first.headers["tenant"], "acme");
    let failure = &first.headers["x-replayed-failure"];
    assert!(
        failure.contains("x-death-reason") && failure.contains("LongLongInt(3)"),
        "{failure}"
    );
    assert_eq!(first.content_type.as_deref(), Some("application/json"));

    // The rest: 6 more, none lost.
    let run = cli(&["dlq", "replay", &dlq]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(0));
    assert_eq!(rt.block_on(broker.depth(&work)), Some(6));
    let rest: Vec<Value> = rt
        .block_on(broker.drain(&work))
        .into_iter()
        .map(|r| r.json.unwrap()["n"].clone())
        .collect();
    assert_eq!(rest, [4, 5, 6, 7, 8, 9]);
    rt.block_on(broker.cleanup());
}

#[test]
fn dlq_replay_keeps_the_message_when_its_queue_is_gone() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli.gone");
    let dlq = format!("{work}.dlq");
    rt.block_on(broker.declare_queue(&dlq));
    rt.block_on(fill_dlq(&broker, &dlq, &work, 3));

    let run = cli(&["dlq", "replay", &dlq]);
    assert_eq!(run.code, EXIT_FAILURE, "{}", run.all());
    assert!(run.err.contains("returned as unroutable"), "{}", run.err);
    assert!(run.out.contains("replayed 0 messages"), "{}", run.out);
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(3));

    // --to overrides the header.
    let other = unique("cli");
    rt.block_on(broker.declare_queue(&other));
    let run = cli(&["dlq", "replay", &dlq, "--to", &other, "--limit", "2"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(1));
    assert_eq!(rt.block_on(broker.depth(&other)), Some(2));
    rt.block_on(broker.cleanup());
}

#[test]
fn dlq_purge_requires_yes() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let dlq = format!("{}.dlq", unique("cli"));
    rt.block_on(broker.declare_queue(&dlq));
    rt.block_on(fill_dlq(&broker, &dlq, "x", 4));

    let run = cli(&["dlq", "purge", &dlq]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
    assert!(run.err.contains("without --yes"), "{}", run.err);
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(4));

    let run = cli(&["dlq", "purge", &dlq, "--yes"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(run.out.contains("purged 4 messages"), "{}", run.out);
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(0));
    rt.block_on(broker.cleanup());
}

/// Publishes one dead-lettered-looking message with `body` whose `x-original-queue` is
/// `original`, plus `extra` headers and properties.
async fn dead_letter(
    broker: &Broker,
    dlq: &str,
    original: &str,
    body: &[u8],
    extra: &[(&str, AMQPValue)],
    properties: BasicProperties,
) {
    let mut headers = header_table(&[
        ("x-retry-count", AMQPValue::LongLongInt(3)),
        ("x-death-reason", text("retries exhausted: boom")),
        ("x-original-queue", text(original)),
    ]);
    for (key, value) in extra {
        headers.insert((*key).into(), value.clone());
    }
    broker
        .publish_raw("", dlq, body, properties.with_headers(headers))
        .await;
}

/// A queue with arguments, tracked for cleanup.
async fn declare_with(broker: &mut Broker, name: &str, arguments: &[(&str, AMQPValue)]) {
    broker
        .channel
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions::durable(),
            header_table(arguments),
        )
        .await
        .unwrap();
    broker.track_queue(name);
}

/// The bodies left in `queue`, drained.
async fn bodies(broker: &Broker, queue: &str) -> Vec<String> {
    broker
        .drain(queue)
        .await
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

#[test]
fn dlq_replay_sends_only_to_the_queue_the_dlq_belongs_to() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli");
    let dlq = format!("{work}.dlq");
    let other = unique("cli.other");
    for queue in [&work, &dlq, &other] {
        rt.block_on(broker.declare_queue(queue));
    }
    let _cleanup = broker.cleanup_on_panic();
    let plain = BasicProperties::default;
    rt.block_on(async {
        dead_letter(&broker, &dlq, &work, b"first", &[], plain()).await;
        dead_letter(&broker, &dlq, &other, b"stray", &[], plain()).await;
        dead_letter(&broker, &dlq, &work, b"third", &[], plain()).await;
    });

    // Not a dead-letter queue: refused, nothing moves.
    let run = cli(&["dlq", "replay", &other]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
    assert!(run.err.contains("not a dead-letter queue"), "{}", run.err);

    // The message that names another queue stays; the others go to `work` only.
    let run = cli(&["dlq", "replay", &dlq]);
    assert_eq!(run.code, EXIT_FAILURE, "{}", run.all());
    assert!(
        run.out.contains(&format!(
            "replayed 2 messages from `{dlq}` to `{work}`; skipped 1 (1 belonging to another queue)"
        )),
        "{}",
        run.all()
    );
    assert!(run.err.contains(&format!("is `{other}`")), "{}", run.err);
    assert_eq!(rt.block_on(broker.depth(&other)), Some(0));
    assert_eq!(rt.block_on(bodies(&broker, &work)), ["first", "third"]);
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(1));

    // The operator names the other queue: then it goes there.
    let run = cli(&["dlq", "replay", &dlq, "--to", &other]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert_eq!(rt.block_on(bodies(&broker, &other)), ["stray"]);
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(0));
    rt.block_on(broker.cleanup());
}

#[test]
fn dlq_replay_skips_and_keeps_a_refused_message_and_goes_on() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli");
    let dlq = format!("{work}.dlq");
    // The work queue takes at most 100 bytes and refuses (nacks) a publish beyond that.
    rt.block_on(declare_with(
        &mut broker,
        &work,
        &[
            ("x-max-length-bytes", AMQPValue::LongLongInt(100)),
            ("x-overflow", text("reject-publish")),
        ],
    ));
    rt.block_on(broker.declare_queue(&dlq));
    let _cleanup = broker.cleanup_on_panic();
    let big = "b".repeat(500);
    let plain = BasicProperties::default;
    rt.block_on(async {
        dead_letter(&broker, &dlq, &work, b"small-1", &[], plain()).await;
        dead_letter(&broker, &dlq, &work, big.as_bytes(), &[], plain()).await;
        dead_letter(&broker, &dlq, &work, b"small-2", &[], plain()).await;
    });

    let run = cli(&["dlq", "replay", &dlq]);
    assert_eq!(run.code, EXIT_FAILURE, "{}", run.all());
    assert!(
        run.out.contains(&format!(
            "replayed 2 messages from `{dlq}` to `{work}`; skipped 1 (1 refused (nacked) by the broker), kept in `{dlq}`"
        )),
        "{}",
        run.all()
    );
    assert!(run.err.contains("skipped message 2"), "{}", run.err);
    assert_eq!(rt.block_on(bodies(&broker, &work)), ["small-1", "small-2"]);
    assert_eq!(rt.block_on(bodies(&broker, &dlq)), [big]);
    rt.block_on(broker.cleanup());
}

/// Lowers the broker's `max_message_size` (3.10 reads it from the application environment
/// into each new channel, 4.0 from a persistent term) and restores both on drop, also when
/// the test fails.
struct MaxMessageSize {
    previous: Option<u64>,
    previous_term: Option<u64>,
}

impl MaxMessageSize {
    fn eval(expression: &str) -> Option<u64> {
        let out = rabbitmqctl_blocking(&["eval", expression]).unwrap();
        let out = out.trim();
        out.strip_prefix("{ok,")
            .and_then(|n| n.strip_suffix('}'))
            .unwrap_or(out)
            .parse()
            .ok()
    }

    fn current() -> Option<u64> {
        Self::eval("persistent_term:get(max_message_size, undefined).")
            .or_else(|| Self::eval("application:get_env(rabbit, max_message_size)."))
    }

    fn set(bytes: u64) -> Self {
        let guard = Self {
            previous: Self::eval("application:get_env(rabbit, max_message_size)."),
            previous_term: Self::eval("persistent_term:get(max_message_size, undefined)."),
        };
        rabbitmqctl_blocking(&[
            "eval",
            &format!(
                "application:set_env(rabbit, max_message_size, {bytes}), \
                 persistent_term:put(max_message_size, {bytes})."
            ),
        ])
        .unwrap();
        guard
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        let app = match self.previous {
            Some(bytes) => format!("application:set_env(rabbit, max_message_size, {bytes})"),
            None => "application:unset_env(rabbit, max_message_size)".to_owned(),
        };
        let term = match self.previous_term {
            Some(bytes) => format!("persistent_term:put(max_message_size, {bytes})"),
            None => "persistent_term:erase(max_message_size)".to_owned(),
        };
        let _ = rabbitmqctl_blocking(&["eval", &format!("{app}, {term}.")]);
    }
}

/// A copy the broker refuses by closing the channel (here: larger than a `max_message_size`
/// lowered after the original was dead-lettered) is skipped, the channel reopened, and the
/// rest replayed.
#[test]
fn dlq_replay_skips_copies_refused_with_a_channel_error_and_goes_on() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli");
    let dlq = format!("{work}.dlq");
    rt.block_on(broker.declare_queue(&work));
    rt.block_on(broker.declare_queue(&dlq));
    let _cleanup = broker.cleanup_on_panic();
    let limit = MaxMessageSize::current().unwrap_or(16 * 1024 * 1024);
    let big = vec![b'x'; usize::try_from(limit / 8 * 3).unwrap()];
    let plain = BasicProperties::default;
    rt.block_on(async {
        dead_letter(&broker, &dlq, &work, b"small-1", &[], plain()).await;
        dead_letter(&broker, &dlq, &work, &big, &[], plain()).await;
        dead_letter(&broker, &dlq, &work, b"small-2", &[], plain()).await;
    });

    let guard = MaxMessageSize::set(limit / 4);
    let run = cli(&["dlq", "replay", &dlq]);
    drop(guard);
    assert_eq!(run.code, EXIT_FAILURE, "{}", run.all());
    assert!(
        run.out.contains(&format!(
            "replayed 2 messages from `{dlq}` to `{work}`; skipped 1 (1 refused with a channel error), kept in `{dlq}`"
        )),
        "{}",
        run.all()
    );
    assert!(run.err.contains("skipped message 2"), "{}", run.err);
    assert_eq!(rt.block_on(bodies(&broker, &work)), ["small-1", "small-2"]);
    let left = rt.block_on(broker.drain(&dlq));
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].body.len(), big.len());
    rt.block_on(broker.cleanup());
}

/// A broker user for one test, deleted on drop (also when the test fails).
struct OtherUser {
    name: String,
}

impl OtherUser {
    const PASSWORD: &str = "cli-test-user-password";

    fn create() -> Self {
        let name = unique("user");
        rabbitmqctl_blocking(&["add_user", &name, Self::PASSWORD]).unwrap();
        let user = Self { name };
        let vhost = AMQPUri::from_str(&broker_url()).unwrap().vhost;
        rabbitmqctl_blocking(&[
            "set_permissions",
            "-p",
            &vhost,
            &user.name,
            ".*",
            ".*",
            ".*",
        ])
        .unwrap();
        user
    }

    /// The test broker's URL with this user's credentials.
    fn url(&self) -> String {
        let uri = AMQPUri::from_str(&broker_url()).unwrap();
        let vhost = if uri.vhost == "/" {
            "%2f".to_owned()
        } else {
            uri.vhost.clone()
        };
        format!(
            "amqp://{}:{}@{}:{}/{vhost}",
            self.name,
            Self::PASSWORD,
            uri.authority.host,
            uri.authority.port
        )
    }
}

impl Drop for OtherUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl_blocking(&["delete_user", &self.name]);
    }
}

/// Another user's dead letter, sent with `CC`/`BCC` naming a third queue: the replayed copy
/// (published with the operator's credentials) reaches the work queue only, without
/// `user_id` (the broker would refuse a copy claiming to be another user's).
#[test]
fn dlq_replay_copies_drop_cc_bcc_and_user_id() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli");
    let dlq = format!("{work}.dlq");
    let victim = unique("cli.victim");
    for queue in [&work, &dlq, &victim] {
        rt.block_on(broker.declare_queue(queue));
    }
    let _cleanup = broker.cleanup_on_panic();
    let user = OtherUser::create();
    let route = AMQPValue::FieldArray(vec![text(&victim)].into());
    rt.block_on(async {
        let publisher = Broker::connect_to(&user.url()).await;
        dead_letter(
            &publisher,
            &dlq,
            &work,
            b"routed",
            &[
                ("CC", route.clone()),
                ("BCC", route),
                ("tenant", text("acme")),
            ],
            BasicProperties::default()
                .with_user_id(user.name.as_str().into())
                .with_message_id("m-1".into()),
        )
        .await;
        publisher.cleanup().await;
    });
    // Publishing the original with CC/BCC put a copy in the victim queue too: empty it.
    assert_eq!(rt.block_on(broker.drain(&victim)).len(), 1);

    let run = cli(&["dlq", "replay", &dlq]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert_eq!(
        rt.block_on(broker.depth(&victim)),
        Some(0),
        "CC/BCC followed"
    );
    let copy = rt
        .block_on(broker.channel.basic_get(
            work.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        ))
        .unwrap()
        .expect("the copy is in the work queue");
    let properties = &copy.delivery.properties;
    assert_eq!(properties.user_id(), &None);
    assert_eq!(properties.message_id(), &Some("m-1".into()));
    let headers = properties.headers().clone().unwrap_or_default();
    assert!(!headers.contains_key("CC"), "{headers:?}");
    assert!(!headers.contains_key("BCC"), "{headers:?}");
    assert!(headers.contains_key("tenant"), "{headers:?}");
    drop(user);
    rt.block_on(broker.cleanup());
}

/// `status` names the queue a dead-letter queue belongs to by the same rule `dlq replay` uses.
#[test]
fn status_reports_the_queue_a_dead_letter_queue_belongs_to() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli");
    let dlq = format!("{work}.dlq");
    rt.block_on(broker.declare_queue(&dlq));
    let _cleanup = broker.cleanup_on_panic();
    let report = cli(&["status", "--queue", &dlq, "--json"]).json();
    assert_eq!(
        report["dead_letter_sources"][&dlq],
        work.as_str(),
        "{report}"
    );
    let run = cli(&["status", "--queue", &dlq]);
    assert!(
        run.out.contains(&format!("dead letters of `{work}`")),
        "{}",
        run.out
    );
    rt.block_on(broker.cleanup());
}

#[test]
fn dlq_purge_refuses_a_queue_that_is_no_dead_letter_queue() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let queue = unique("cli");
    rt.block_on(broker.declare_queue(&queue));
    let _cleanup = broker.cleanup_on_panic();
    rt.block_on(fill_dlq(&broker, &queue, "x", 2));

    let run = cli(&["dlq", "purge", &queue, "--yes"]);
    assert_eq!(run.code, EXIT_ERROR, "{}", run.all());
    assert!(
        run.err.contains("not a dead-letter queue") && run.err.contains("--force"),
        "{}",
        run.err
    );
    assert_eq!(rt.block_on(broker.depth(&queue)), Some(2));

    let run = cli(&["dlq", "purge", &queue, "--yes", "--force"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert_eq!(rt.block_on(broker.depth(&queue)), Some(0));
    rt.block_on(broker.cleanup());
}

/// Message content cannot drive the operator's terminal or forge lines: `dlq list` (the
/// alias of `peek`) and the human log format escape control characters; the JSON outputs
/// escape DEL and C1, which JSON itself leaves raw.
#[test]
fn message_text_is_escaped_in_dlq_list_and_in_log_lines() {
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let work = unique("cli");
    let dlq = format!("{work}.dlq");
    rt.block_on(broker.declare_queue(&dlq));
    let _cleanup = broker.cleanup_on_panic();
    let hostile = "ok\u{1b}[2J\r\nforged: line\u{7f}\u{9b}31m";
    rt.block_on(dead_letter(
        &broker,
        &dlq,
        &work,
        hostile.as_bytes(),
        &[("x-last-error", text(hostile))],
        BasicProperties::default(),
    ));

    let not_newline = |c: char| c.is_control() && c != '\n';
    let run = cli(&["dlq", "list", &dlq]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(!run.out.chars().any(not_newline), "{:?}", run.out);
    assert!(
        !run.out.lines().any(|l| l.starts_with("forged")),
        "{}",
        run.out
    );
    assert!(
        run.out
            .contains(r"ok\u{1b}[2J\r\nforged: line\u{7f}\u{9b}31m"),
        "{}",
        run.out
    );
    let run = cli(&["dlq", "list", &dlq, "--json"]);
    assert!(!run.out.chars().any(not_newline), "{:?}", run.out);
    assert_eq!(run.json()[0]["body"], hostile);
    assert_eq!(rt.block_on(broker.depth(&dlq)), Some(1));

    // Log lines: one line per event, whatever the fields carry.
    for format in [
        rmq_consumer::config::LogFormat::Human,
        rmq_consumer::config::LogFormat::Json,
    ] {
        let captured = Captured::default();
        let config = rmq_consumer::config::LogConfig {
            level: "info".to_owned(),
            format,
            ..rmq_consumer::config::LogConfig::default()
        };
        let subscriber = rmq_consumer::logging::subscriber(&config, captured.clone()).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("delivery", queue = %hostile);
            let _entered = span.enter();
            tracing::warn!(reason = %hostile, debug = ?hostile, "failed: {hostile}");
        });
        let logged = captured.text();
        assert_eq!(logged.lines().count(), 1, "{format:?}: {logged:?}");
        assert!(!logged.chars().any(not_newline), "{format:?}: {logged:?}");
        if format == rmq_consumer::config::LogFormat::Json {
            let line: Value = serde_json::from_str(logged.trim()).unwrap();
            assert_eq!(line["fields"]["reason"], hostile);
        } else {
            assert!(logged.contains(r"reason=ok\u{1b}[2J\r\nforged"), "{logged}");
        }
    }
    rt.block_on(broker.cleanup());
}

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// --- handlers, check-config --------------------------------------------------------------

#[test]
fn handlers_lists_what_this_binary_registered() {
    let run = cli_raw(&["rmq-consumer", "handlers"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(
        run.out.contains("cli_echo\n  queue: tests.cli.echo"),
        "{}",
        run.out
    );
    assert!(
        run.out.contains("reply_key: tests.cli.echo.result"),
        "{}",
        run.out
    );
    let listed = cli_raw(&["rmq-consumer", "handlers", "--json"]).json();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cli_echo"]);
}

#[test]
fn check_config_validates_and_masks() {
    let routed = routed_config("management_url = \"http://ops:Mgmt-Secret-1@localhost:15672\"");
    let config = routed.file.to_str().unwrap();
    let run = cli_raw(&["rmq-consumer", "check-config", "--config", config]);
    assert_eq!(run.code, EXIT_OK, "{}", run.all());
    assert!(!run.all().contains("Mgmt-Secret-1"), "{}", run.all());
    assert!(
        run.out.contains("http://ops:****@localhost:15672"),
        "{}",
        run.out
    );
    assert!(
        run.out.contains(&format!(
            "[consumers.cli_echo]\nqueue = \"{}\"",
            routed.queue
        )),
        "{}",
        run.out
    );
    assert!(run.out.contains("# valid"), "{}", run.out);
    let document = cli_raw(&["rmq-consumer", "check-config", "--config", config, "--json"]).json();
    assert_eq!(document["valid"], true);
    assert_eq!(
        document["config"]["handlers"]["cli_echo"]["queue"],
        routed.queue.as_str()
    );

    std::fs::write(&routed.file, "prefetch_count = 0\nno_such_key = 1\n").unwrap();
    let run = cli_raw(&["rmq-consumer", "check-config", "--config", config]);
    assert_eq!(run.code, EXIT_FAILURE, "{}", run.all());
    assert!(run.err.contains("no_such_key"), "{}", run.err);
    assert!(run.out.contains("INVALID"), "{}", run.out);
    let _ = std::fs::remove_file(&routed.file);
}

// --- the real binary ---------------------------------------------------------------------

/// A real CLI process: the `embedded-cli` binary of this package calls the same
/// `rmq_consumer::cli::main()` as the `rmq-consumer` binary.
fn binary() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_embedded-cli"))
}

#[test]
fn the_binary_exits_with_the_documented_codes() {
    let binary = binary();
    let rt = runtime();
    let mut broker = rt.block_on(Broker::connect());
    let queue = unique("cli");
    rt.block_on(broker.declare_queue(&queue));
    let url = broker_url();
    let run = |args: &[&str]| {
        let mut command = std::process::Command::new(&binary);
        command.args(args).env_remove("RMQ_CONSUMER_CONFIG");
        if let Some(management) = cli_management_url() {
            command.env("RMQ_CONSUMER_MANAGEMENT_URL", management);
        }
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["status", "--url", &url, "--queue", &queue]);
    assert_eq!(code, Some(0), "{out}");
    let (code, _, _) = run(&[
        "publish",
        "--url",
        &url,
        "--queue",
        &queue,
        "--count",
        "5",
        "--template",
        "{}",
    ]);
    assert_eq!(code, Some(0));
    let (code, out, _) = run(&["status", "--url", &url, "--queue", &queue]);
    assert_eq!(code, Some(1), "{out}");
    let (code, _, _) = run(&["status", "--url", &url, "--queue", &unique("cli.missing")]);
    assert_eq!(code, Some(2));
    let (code, _, err) = run(&[
        "status",
        "--url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--queue",
        &queue,
    ]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, _) = run(&["no-such-command"]);
    assert_eq!(code, Some(2));
    // The stand-alone binary registers no handlers.
    let (code, out, _) = run(&["handlers"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("no handlers are registered"), "{out}");
    rt.block_on(broker.cleanup());
}

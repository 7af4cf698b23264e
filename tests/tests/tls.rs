//! TLS with a custom CA and client certificates, and secrets kept out of every output.
//!
//! These tests always use the RabbitMQ 4.0 node of `tests/scripts/rabbit4.sh` (whatever
//! `RMQ_TEST_BROKER` says): it alone has the TLS listeners, AMQPS on 5674 and management
//! HTTPS on 15674, both requiring a client certificate issued by the test CA. The PKI lives in
//! `$RMQ_TEST_TLS_DIR` (default `/var/lib/rmq-consumer-tests/tls`); `tests/run.sh` runs this
//! binary in phase 1 only.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{path::PathBuf, time::Duration};

use rmq_consumer::{
    Config, HandlerError,
    config::{ConfigError, ConfigProblem},
    consumer,
};
use rmq_consumer_tests::{Broker, Route, Running, pki, unique};
use serde_json::{Value, json};

/// The 4.0 node's plain AMQP listener, for publishing and reading back.
const PLAIN_URL: &str = "amqp://guest:guest@127.0.0.1:5673/%2f";
/// The 4.0 node's AMQPS listener, by the name its certificate carries.
const AMQPS_URL: &str = "amqps://guest:guest@localhost:5674/%2f";
/// The 4.0 node's management API over HTTPS.
const MANAGEMENT_HTTPS: &str = "https://localhost:15674";

#[consumer(queue = "tests.tls.echo", reply_key = "tests.tls.echo.result")]
async fn tls_echo(data: Value) -> Result<Option<Value>, HandlerError> {
    Ok(Some(json!({"echo": data})))
}

/// `tls_ca_file`, `tls_cert_file` and `tls_key_file` lines for the test PKI.
fn tls_keys(ca: &str, client_cert: bool) -> String {
    let mut text = format!("tls_ca_file = \"{}\"\n", pki(ca));
    if client_cert {
        text.push_str(&format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            pki("client.pem"),
            pki("client.key")
        ));
    }
    text
}

/// A temporary file holding `text`, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(unique(name));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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
}

/// Runs the CLI in-process.
fn cli(args: &[&str]) -> Run {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut full = vec!["rmq-consumer"];
    full.extend_from_slice(args);
    let code = rmq_consumer::cli::run_args(full, &mut out, &mut err);
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

/// Runs the `embedded-cli` binary (the same `cli::main()` as `rmq-consumer`) with `env`.
fn binary(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_embedded-cli"));
    command.args(args).env_remove("RMQ_CONSUMER_CONFIG");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `dlq peek` on a fresh name through the configuration `toml`: the connection attempt is
/// all that matters.
fn connect_through(toml: &str) -> Run {
    let file = TempFile::new("tls.toml", toml);
    cli(&["--config", file.path(), "dlq", "peek", &unique("tls.none")])
}

fn problems(result: Result<Config, ConfigError>) -> Vec<ConfigProblem> {
    match result {
        Err(ConfigError::Invalid { problems }) => problems,
        Err(other) => panic!("unexpected error: {other}"),
        Ok(config) => panic!("expected problems, got {config:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_works_over_amqps_with_a_client_certificate() {
    let mut broker = Broker::connect_to(PLAIN_URL).await;
    let exchange = unique("tls.ex");
    broker.track_exchange(&exchange);
    let mut config = Config::from_toml_str(&format!(
        "url = \"{AMQPS_URL}\"\nexchange = \"{exchange}\"\nretry_connect_interval = \"500ms\"\n\
         shutdown_timeout = \"10s\"\n{}",
        tls_keys("ca.pem", true)
    ))
    .unwrap();
    let route = Route::new(&mut config, "tls_echo", &mut broker);
    let running = Running::start(config, &["tls_echo"]).await;
    broker
        .publish_json(&exchange, &route.queue, &json!({"task": "over tls"}))
        .await;
    let results = broker
        .collect(&route.reply_queue, 1, Duration::from_secs(20))
        .await;
    assert_eq!(results.len(), 1, "no result over amqps");
    assert_eq!(
        results[0].json.as_ref().unwrap(),
        &json!({"echo": {"task": "over tls"}})
    );
    running.stop().await.unwrap();
    broker.cleanup().await;
}

#[test]
fn a_broker_certificate_from_an_unknown_ca_is_named() {
    let run = connect_through(&format!(
        "url = \"{AMQPS_URL}\"\n{}",
        tls_keys("wrong-ca.pem", true)
    ));
    assert_eq!(run.code, rmq_consumer::cli::EXIT_ERROR, "{}", run.all());
    assert!(run.err.contains("unknown CA"), "{}", run.all());
    assert!(!run.all().contains("guest:guest"), "{}", run.all());
}

#[test]
fn a_host_the_certificate_does_not_name_is_a_name_mismatch() {
    // 127.0.0.2 reaches the same listener; the certificate names localhost and 127.0.0.1.
    let run = connect_through(&format!(
        "url = \"amqps://guest:guest@127.0.0.2:5674/%2f\"\n{}",
        tls_keys("ca.pem", true)
    ));
    assert_eq!(run.code, rmq_consumer::cli::EXIT_ERROR, "{}", run.all());
    assert!(run.err.contains("name mismatch"), "{}", run.all());
}

#[test]
fn a_missing_client_certificate_is_explained() {
    let run = connect_through(&format!(
        "url = \"{AMQPS_URL}\"\n{}",
        tls_keys("ca.pem", false)
    ));
    assert_eq!(run.code, rmq_consumer::cli::EXIT_ERROR, "{}", run.all());
    assert!(
        run.err.contains(
            "the broker requires a client certificate (set tls_cert_file and tls_key_file)"
        ),
        "{}",
        run.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_management_api_over_https_with_the_client_certificate() {
    let mut broker = Broker::connect_to(PLAIN_URL).await;
    let queue = unique("tls.status");
    broker.declare_queue(&queue).await;
    let file = TempFile::new(
        "tls.toml",
        &format!(
            "url = \"{AMQPS_URL}\"\nmanagement_url = \"{MANAGEMENT_HTTPS}\"\n{}",
            tls_keys("ca.pem", true)
        ),
    );
    let path = file.path().to_owned();
    let queue_name = queue.clone();
    let run = tokio::task::spawn_blocking(move || {
        cli(&[
            "--config",
            &path,
            "status",
            "--queue",
            &queue_name,
            "--json",
        ])
    })
    .await
    .unwrap();
    let report: Value =
        serde_json::from_str(&run.out).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.all()));
    assert_eq!(report["source"], "management", "{}", run.all());
    assert_eq!(report["management_api"], MANAGEMENT_HTTPS, "{}", run.all());
    assert!(report["broker_error"].is_null(), "{}", run.all());
    broker.cleanup().await;
}

#[test]
fn the_management_api_over_https_names_tls_problems() {
    // The AMQP side over plain AMQP, so only the management API meets the wrong CA.
    let file = TempFile::new(
        "tls.toml",
        &format!(
            "url = \"{PLAIN_URL}\"\nmanagement_url = \"{MANAGEMENT_HTTPS}\"\n{}",
            tls_keys("wrong-ca.pem", true)
        ),
    );
    let run = cli(&[
        "--config",
        file.path(),
        "status",
        "--queue",
        &unique("tls.q"),
    ]);
    assert!(run.all().contains("unknown CA"), "{}", run.all());
    let file = TempFile::new(
        "tls.toml",
        &format!(
            "url = \"{PLAIN_URL}\"\nmanagement_url = \"{MANAGEMENT_HTTPS}\"\n{}",
            tls_keys("ca.pem", false)
        ),
    );
    let run = cli(&[
        "--config",
        file.path(),
        "status",
        "--queue",
        &unique("tls.q"),
    ]);
    assert!(
        run.all().contains("requires a client certificate"),
        "{}",
        run.all()
    );
}

#[test]
fn credentials_are_not_sent_over_plain_http_to_another_host() {
    // 192.0.2.1 (TEST-NET-1) is not loopback: the client refuses before connecting.
    let file = TempFile::new(
        "tls.toml",
        &format!("url = \"{PLAIN_URL}\"\nmanagement_url = \"http://192.0.2.1:15672\"\n"),
    );
    let run = cli(&[
        "--config",
        file.path(),
        "status",
        "--queue",
        &unique("tls.q"),
    ]);
    assert!(run.all().contains("management_allow_http"), "{}", run.all());
    assert!(run.all().contains("plain http"), "{}", run.all());
}

#[test]
fn tls_files_are_checked_when_the_configuration_loads() {
    let missing = "/nonexistent/rmq-consumer/ca.pem";
    let found = problems(Config::from_toml_str(&format!(
        "tls_ca_file = \"{missing}\""
    )));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].key, "tls_ca_file");
    assert!(found[0].message.contains(missing), "{found:?}");

    // The server's key with the client's certificate.
    let found = problems(Config::from_toml_str(&format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        pki("client.pem"),
        pki("server.key")
    )));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].key, "tls_key_file");
    assert!(found[0].message.contains("does not match"), "{found:?}");

    let found = problems(Config::from_toml_str(&format!(
        "tls_cert_file = \"{}\"",
        pki("client.pem")
    )));
    assert_eq!(found[0].key, "tls_key_file", "{found:?}");

    // Not PEM: the message names the file, never what it holds.
    let garbage = TempFile::new("tls.key", "CANARY-KEY-MATERIAL not a key");
    let found = problems(Config::from_toml_str(&format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        pki("client.pem"),
        garbage.path()
    )));
    assert_eq!(found[0].key, "tls_key_file", "{found:?}");
    assert!(found[0].message.contains(garbage.path()), "{found:?}");
    assert!(!format!("{found:?}").contains("CANARY"), "{found:?}");

    // Other clients' TLS query parameters are rejected, not ignored.
    for (param, key) in [
        ("cacertfile=/etc/ca.pem", "tls_ca_file"),
        ("certfile=/etc/c.pem", "tls_cert_file"),
        ("keyfile=/etc/c.key", "tls_key_file"),
        ("verify=verify_none", "tls_ca_file"),
    ] {
        let found = problems(Config::from_toml_str(&format!(
            "url = \"amqps://app:hunter2@rabbit:5671/%2f?{param}\""
        )));
        assert_eq!(found[0].key, "url", "{found:?}");
        let name = param.split('=').next().unwrap();
        assert!(found[0].message.contains(name), "{found:?}");
        assert!(found[0].message.contains(key), "{found:?}");
        assert!(!found[0].message.contains("hunter2"), "{found:?}");
    }
}

#[test]
fn passwords_never_show() {
    let canary = "Canary,p@ss:7";
    // The `password` key.
    let config = Config::from_toml_str(&format!(
        "url = \"amqp://guest@127.0.0.1:5673/%2f\"\npassword = \"{canary}\""
    ))
    .unwrap();
    assert!(!format!("{config:?}").contains("Canary"), "{config:?}");
    // `password` and a URL with its own password: a problem that shows neither.
    let error = Config::from_toml_str(&format!(
        "url = \"amqp://guest:{canary}@h:5672/%2f\"\npassword = \"{canary}\""
    ))
    .unwrap_err();
    let text = format!("{error} {error:?}");
    assert!(text.contains("`password`"), "{text}");
    assert!(!text.contains("Canary"), "{text}");
    // RMQ_CONSUMER_URL with a comma in the password, and a bad key beside it.
    let error = Config::from_sources(
        None,
        [
            (
                "RMQ_CONSUMER_URL".to_owned(),
                format!("amqp://guest:{canary}@a:5672/%2f,amqp://guest:{canary}@b:5672/%2f"),
            ),
            ("RMQ_CONSUMER_PREFETCH_COUNT".to_owned(), "0".to_owned()),
        ],
    )
    .unwrap_err();
    assert!(!format!("{error} {error:?}").contains("Canary"), "{error}");

    // check-config with RMQ_CONSUMER_PASSWORD.
    let run = binary(
        &["check-config"],
        &[
            ("RMQ_CONSUMER_URL", "amqp://guest@127.0.0.1:5673/%2f"),
            ("RMQ_CONSUMER_PASSWORD", canary),
        ],
    );
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(!run.all().contains("Canary"), "{}", run.all());
    assert!(run.out.contains("password = \"****\""), "{}", run.all());

    // --password-file: the password reaches the broker (guest's is `guest`)...
    let good = TempFile::new("tls.pw", "guest\n");
    let run = binary(
        &[
            "--url",
            "amqp://guest@127.0.0.1:5673/%2f",
            "--password-file",
            good.path(),
            "--management-url",
            "http://127.0.0.1:15673",
            "status",
            "--queue",
            &unique("tls.q"),
        ],
        &[],
    );
    assert!(run.out.contains("management"), "{}", run.all());
    assert!(!run.all().contains("ACCESS_REFUSED"), "{}", run.all());
    // ... and a wrong one is refused without being shown.
    let bad = TempFile::new("tls.pw", canary);
    let run = binary(
        &[
            "--url",
            "amqp://guest@127.0.0.1:5673/%2f",
            "--password-file",
            bad.path(),
            "dlq",
            "peek",
            &unique("tls.q"),
        ],
        &[],
    );
    assert_eq!(run.code, rmq_consumer::cli::EXIT_ERROR, "{}", run.all());
    assert!(!run.all().contains("Canary"), "{}", run.all());

    // A password on the command line is visible in `ps`: a warning says what to use instead.
    let run = binary(
        &[
            "--url",
            "amqp://guest:guest@127.0.0.1:5673/%2f",
            "check-config",
        ],
        &[],
    );
    assert!(run.err.contains("--password-file"), "{}", run.all());
    assert!(run.err.contains("RMQ_CONSUMER_PASSWORD"), "{}", run.all());
}

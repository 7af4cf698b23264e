//! Tests of `read.rs`.

use super::*;
use crate::config::tests::{env, problem_for, problems};
use crate::config::*;

#[test]
fn python_template_keys_load() {
    let config = Config::from_toml_str(
        r#"
        conn_iddress = "amqp://username:password@rabbit:5672/vhost"
        exchange_iddress = "your.exchange.name"
        b2m_queue_iddress = "your.consumer.queue"
        m2b_queue_iddress = "your.response.queue"
        m2b_routing_key = "your.response.routing.key"
        prefetch_count = 4
        retry_connect_interval = 30
        heartbeat_interval = 30
        message_timeout = 300
        max_retry_count = 3
        queue_stuck_threshold = 90
        max_consecutive_failures = 3
        enable_result_cache = false
        result_cache_size = 1000
        "#,
    )
    .unwrap();
    assert_eq!(
        config.urls,
        vec![SecretUrl::new("amqp://username:password@rabbit:5672/vhost")]
    );
    assert_eq!(config.exchange, "your.exchange.name");
    assert_eq!(config.queue.as_deref(), Some("your.consumer.queue"));
    assert_eq!(config.reply_queue.as_deref(), Some("your.response.queue"));
    assert_eq!(
        config.reply_key.as_deref(),
        Some("your.response.routing.key")
    );
    assert_eq!(config.retry_connect_interval, Duration::from_secs(30));
    assert_eq!(config.message_timeout, Duration::from_secs(300));
}

#[test]
fn aliases_and_names_are_equivalent() {
    let by_alias = Config::from_toml_str(
        r#"
        conn_iddress = "amqp://u:p@h/v"
        exchange_iddress = "x"
        b2m_queue_iddress = "q"
        m2b_queue_iddress = "rq"
        m2b_routing_key = "rk"
        "#,
    )
    .unwrap();
    let by_name = Config::from_toml_str(
        r#"
        url = "amqp://u:p@h/v"
        exchange = "x"
        queue = "q"
        reply_queue = "rq"
        reply_key = "rk"
        "#,
    )
    .unwrap();
    assert_eq!(by_alias, by_name);
    let by_env = Config::from_sources(
        None,
        env(&[
            ("RMQ_CONSUMER_CONN_IDDRESS", "amqp://u:p@h/v"),
            ("RMQ_CONSUMER_EXCHANGE_IDDRESS", "x"),
            ("RMQ_CONSUMER_B2M_QUEUE_IDDRESS", "q"),
            ("RMQ_CONSUMER_M2B_QUEUE_IDDRESS", "rq"),
            ("RMQ_CONSUMER_M2B_ROUTING_KEY", "rk"),
        ]),
    )
    .unwrap();
    assert_eq!(by_env, by_name);
}

#[test]
fn alias_and_name_together_is_a_problem() {
    let problems = problems(Config::from_sources(
        Some(
            r#"
            url = "amqp://u:p@h/v"
            conn_iddress = "amqp://u:p@h/v"
            log_level = "info"
            [log]
            level = "debug"
            "#,
        ),
        env(&[
            ("RMQ_CONSUMER_QUEUE", "a"),
            ("RMQ_CONSUMER_B2M_QUEUE_IDDRESS", "b"),
        ]),
    ));
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert_eq!(
        problem_for(&problems, "conn_iddress").message,
        "`url` is also set; keep only one of them"
    );
    assert_eq!(
        problem_for(&problems, "log.level").message,
        "`log_level` is also set; keep only one of them"
    );
    problem_for(&problems, "RMQ_CONSUMER_B2M_QUEUE_IDDRESS");
}

#[test]
fn every_problem_is_reported() {
    let result = Config::from_sources(
        Some(
            r#"
            prefetch_count = 0
            heartbeat_interval = 70000
            result_cache_size = 0
            message_timeout = "soon"
            queue_type = "lazy"
            log_format = "xml"
            http_addr = "localhost"
            exchange = 5
            url = "http://u:p@h/"
            retry_connect_interval = -1
            retry_delays = ["1s", true]
            colour = "blue"
            [consumers.resize]
            prefetch = 0
            frobnicate = true
            "#,
        ),
        env(&[
            ("RMQ_CONSUMER_MAX_RETRY_COUNT", "many"),
            ("RMQ_CONSUMER_DEAD_LETTER", "yes"),
            ("RMQ_CONSUMER_BOGUS", "1"),
        ]),
    );
    let error = result.unwrap_err();
    let text = error.to_string();
    let ConfigError::Invalid { problems } = error else {
        panic!("expected Invalid");
    };
    let expected: &[(&str, &str)] = &[
        ("prefetch_count", "must be between 1 and 65535, got 0"),
        (
            "heartbeat_interval",
            "must be between 0 and 65535, got 70000",
        ),
        ("result_cache_size", "must be between 1 and 10000000, got 0"),
        ("queue_type", "expected `classic` or `quorum`, got `lazy`"),
        ("log_format", "expected `human` or `json`, got `xml`"),
        (
            "http_addr",
            "expected an address like `127.0.0.1:9090`, got `localhost`",
        ),
        ("exchange", "expected a string, got an integer"),
        (
            "url",
            "must be an amqp:// or amqps:// URL, got `http://u:****@h/`",
        ),
        ("retry_connect_interval", "must not be negative, got -1"),
        (
            "retry_delays",
            "expected a duration (seconds, or a string like \"500ms\" or \"2m\"), got a boolean",
        ),
        ("colour", "unknown key"),
        (
            "consumers.resize.prefetch",
            "must be between 1 and 65535, got 0",
        ),
        ("consumers.resize.frobnicate", "unknown key"),
        (
            "RMQ_CONSUMER_MAX_RETRY_COUNT",
            "expected an integer, got `many`",
        ),
        (
            "RMQ_CONSUMER_DEAD_LETTER",
            "expected `true`, `false`, `1` or `0`, got `yes`",
        ),
        ("RMQ_CONSUMER_BOGUS", "unknown variable"),
    ];
    for (key, message) in expected {
        assert_eq!(problem_for(&problems, key).message, *message);
    }
    assert!(
        problem_for(&problems, "message_timeout")
            .message
            .starts_with("expected a duration like \"30s\", \"500ms\" or \"2m\", got `soon`")
    );
    assert_eq!(problems.len(), expected.len() + 1, "{problems:#?}");
    assert!(text.starts_with(&format!(
        "invalid configuration ({} problems): `",
        problems.len()
    )));
    assert!(text.contains("`prefetch_count`: must be between 1 and 65535, got 0; "));
    assert!(text.contains("`colour`: unknown key"));
}

#[test]
fn unknown_keys_get_suggestions() {
    let problems = problems(Config::from_sources(
        Some(
            r#"
            prefetch_cont = 3
            conn_idress = "amqp://u:p@h/v"
            totally_unrelated = 1
            [log]
            levle = "info"
            [consumers.resize]
            queu = "q"
            "#,
        ),
        env(&[
            ("RMQ_CONSUMER_PREFECH_COUNT", "3"),
            ("RMQ_CONSUMER_CONSUMERS__RESIZE__TIMOUT", "3"),
            ("RMQ_CONSUMER_CONSUMERS__BROKEN", "3"),
        ]),
    ));
    assert_eq!(
        problem_for(&problems, "prefetch_cont").message,
        "unknown key (did you mean `prefetch_count`?)"
    );
    assert_eq!(
        problem_for(&problems, "conn_idress").message,
        "unknown key (did you mean `conn_iddress`?)"
    );
    assert_eq!(
        problem_for(&problems, "totally_unrelated").message,
        "unknown key"
    );
    assert_eq!(
        problem_for(&problems, "log.levle").message,
        "unknown key (did you mean `level`?)"
    );
    assert_eq!(
        problem_for(&problems, "consumers.resize.queu").message,
        "unknown key (did you mean `queue`?)"
    );
    assert_eq!(
        problem_for(&problems, "RMQ_CONSUMER_PREFECH_COUNT").message,
        "unknown variable (did you mean `RMQ_CONSUMER_PREFETCH_COUNT`?)"
    );
    assert_eq!(
        problem_for(&problems, "RMQ_CONSUMER_CONSUMERS__RESIZE__TIMOUT").message,
        "unknown variable (did you mean `RMQ_CONSUMER_CONSUMERS__RESIZE__TIMEOUT`?)"
    );
    problem_for(&problems, "RMQ_CONSUMER_CONSUMERS__BROKEN");
    assert_eq!(problems.len(), 8, "{problems:#?}");
}

#[test]
fn consumer_sections_and_env() {
    let config = Config::from_sources(
        Some(
            r#"
            [consumers.resize]
            queue = "media.resize"
            timeout = "45s"
            [consumers.thumbnail]
            enabled = false
            "#,
        ),
        env(&[
            ("RMQ_CONSUMER_CONSUMERS__RESIZE__PREFETCH", "2"),
            ("RMQ_CONSUMER_CONSUMERS__RESIZE__RETRY_DELAYS", "1s,5s"),
            ("RMQ_CONSUMER_CONSUMERS__OCR__QUEUE", "ocr.in"),
            ("RMQ_CONSUMER_CONSUMERS__OCR__ENABLED", "true"),
            ("RMQ_CONSUMER_CONSUMERS__OCR__QUEUE_TYPE", "QUORUM"),
        ]),
    )
    .unwrap();
    assert_eq!(
        config.consumers.keys().collect::<Vec<_>>(),
        ["ocr", "resize", "thumbnail"]
    );
    let resize = config.consumer("resize");
    assert_eq!(resize.queue.as_deref(), Some("media.resize"));
    assert_eq!(resize.timeout, Some(Duration::from_secs(45)));
    assert_eq!(resize.prefetch, Some(2));
    assert_eq!(
        resize.retry_delays,
        Some(vec![Duration::from_secs(1), Duration::from_secs(5)])
    );
    assert_eq!(config.consumer("thumbnail").enabled, Some(false));
    let ocr = config.consumer("ocr");
    assert_eq!(ocr.queue.as_deref(), Some("ocr.in"));
    assert_eq!(ocr.enabled, Some(true));
    assert_eq!(ocr.queue_type, Some(QueueType::Quorum));
    assert_eq!(config.consumer("missing"), ConsumerConfig::default());

    let problems = problems(Config::from_toml_str(
        "[consumers]\nresize = 3\n[consumers.ocr]\ntimeout = 0",
    ));
    assert_eq!(
        problem_for(&problems, "consumers.resize").message,
        "expected a table, got an integer"
    );
    assert_eq!(
        problem_for(&problems, "consumers.ocr.timeout").message,
        "must be greater than zero"
    );
}

#[test]
fn log_table_and_validation() {
    let config = Config::from_toml_str(
        r#"
        [log]
        level = "warn,my_app=trace"
        format = "json"
        dir = "logs"
        file_prefix = "worker"
        "#,
    )
    .unwrap();
    assert_eq!(
        config.log,
        LogConfig {
            level: "warn,my_app=trace".to_owned(),
            format: LogFormat::Json,
            dir: Some(PathBuf::from("logs")),
            file_prefix: "worker".to_owned(),
        }
    );
    let problems = problems(Config::from_toml_str(
        "log_level = \"info,=[bad\"\nlog_file_prefix = \"a/b\"\nlog = 3",
    ));
    assert!(
        problem_for(&problems, "log_level")
            .message
            .starts_with("invalid filter `info,=[bad` (")
    );
    problem_for(&problems, "log_file_prefix");
    assert_eq!(
        problem_for(&problems, "log").message,
        "expected a table, got an integer"
    );
}

#[test]
fn tls_key_problems_name_the_variable_as_written() {
    let found = problems(Config::from_sources(
        None,
        env(&[("RMQ_CONSUMER_TLS_CA_FILE", "/nonexistent/ca.pem")]),
    ));
    let problem = problem_for(&found, "RMQ_CONSUMER_TLS_CA_FILE");
    assert!(problem.message.contains("/nonexistent/ca.pem"), "{problem}");
    let found = problems(Config::from_toml_str("tls_key_file = \"/nonexistent/k\""));
    assert!(found.iter().any(|p| p.key == "tls_cert_file"), "{found:?}");
}

#[test]
fn levenshtein_distances() {
    assert_eq!(levenshtein("", ""), 0);
    assert_eq!(levenshtein("abc", ""), 3);
    assert_eq!(levenshtein("kitten", "sitting"), 3);
    assert_eq!(levenshtein("queu", "queue"), 1);
    assert_eq!(levenshtein("ab", "ba"), 2);
}

/// The README's configuration table is the one place besides `keys.rs` that names the keys:
/// every key the reader asks for (top level and `[consumers.<name>]`, aliases included) is in
/// it.
#[test]
fn the_readme_documents_every_key() {
    let readme = include_str!("../../../../README.md");
    let start = readme.find("## Configuration").unwrap();
    let end = start + readme[start..].find("\n## ").unwrap();
    let table = &readme[start..end];
    let empty = || {
        Scope::new(
            String::new(),
            String::new(),
            toml::Table::new(),
            BTreeMap::new(),
        )
    };
    let mut top = empty();
    let _ = Config::read_from(&mut top);
    let mut section = empty();
    let _ = ConsumerConfig::read_from(&mut section);
    let missing: Vec<&str> = (top.known.iter().chain(&section.known))
        .copied()
        .filter(|name| !name.contains('.') && !table.contains(&format!("`{name}`")))
        .collect();
    assert!(missing.is_empty(), "not in the README's table: {missing:?}");
}

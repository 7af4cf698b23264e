//! Tests of the public types, defaults and entry points; the helpers shared by the
//! other files' tests.

use std::time::Duration;

use super::*;

pub(crate) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub(crate) fn problems(result: Result<Config, ConfigError>) -> Vec<ConfigProblem> {
    match result {
        Err(ConfigError::Invalid { problems }) => problems,
        Err(other) => panic!("unexpected error: {other}"),
        Ok(config) => panic!("expected problems, got {config:?}"),
    }
}

pub(crate) fn problem_for<'a>(problems: &'a [ConfigProblem], key: &str) -> &'a ConfigProblem {
    problems
        .iter()
        .find(|p| p.key == key)
        .unwrap_or_else(|| panic!("no problem for `{key}` in {problems:?}"))
}

#[test]
fn defaults() {
    let config = Config::from_toml_str("").unwrap();
    assert_eq!(config, Config::default());
    assert_eq!(Config::from_sources(None, Vec::new()).unwrap(), config);
    assert_eq!(config.urls, vec![SecretUrl::new(DEFAULT_URL)]);
    assert_eq!(config.exchange, "rmq-consumer");
    assert_eq!(config.prefetch_count, 4);
    assert_eq!(config.concurrency, None);
    assert_eq!(config.read_ahead, None);
    assert_eq!(config.retry_connect_interval, Duration::from_secs(30));
    assert_eq!(config.retry_connect_max, Duration::from_secs(30));
    assert_eq!(config.heartbeat_interval, 30);
    assert_eq!(config.message_timeout, Duration::from_secs(300));
    assert_eq!(config.max_retry_count, 3);
    assert!(config.retry_delays.is_empty());
    assert_eq!(config.queue_stuck_threshold, Duration::from_secs(90));
    assert_eq!(config.max_consecutive_failures, 3);
    assert!(!config.enable_result_cache);
    assert_eq!(config.result_cache_size, 1000);
    assert_eq!(config.queue_type, QueueType::Classic);
    assert!(config.bind_reply_queue);
    assert!(config.dead_letter);
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(config.confirm_timeout, Duration::from_secs(30));
    assert_eq!(config.max_body_size, 4 * 1024 * 1024);
    assert_eq!(config.max_in_flight_bytes, 256 * 1024 * 1024);
    assert_eq!(config.log.level, "info");
    assert_eq!(config.log.format, LogFormat::Human);
    assert_eq!(config.log.dir, None);
    assert_eq!(config.log.file_prefix, "rmq-consumer");
    assert_eq!(config.http_addr, None);
    assert_eq!(config.management_url, None);
    assert_eq!(config.queue, None);
    assert!(config.consumers.is_empty());
    assert_eq!(config.consumer("anything"), ConsumerConfig::default());
}

#[test]
fn full_toml() {
    let config = Config::from_toml_str(
        r#"
        url = ["amqp://a:pa@rabbit-1:5672/%2f", "amqps://a:pa@rabbit-2:5671/prod"]
        exchange = "media"
        prefetch_count = 16
        concurrency = 8
        read_ahead = 0
        retry_connect_interval = "2s"
        retry_connect_max = "1m"
        heartbeat_interval = 0
        message_timeout = 60
        max_retry_count = 5
        retry_delays = ["1s", 10, 60.5]
        queue_stuck_threshold = "3m"
        max_consecutive_failures = 2
        enable_result_cache = true
        result_cache_size = 50
        queue_type = "Quorum"
        bind_reply_queue = false
        dead_letter = false
        shutdown_timeout = "0s"
        confirm_timeout = "5s"
        result_publish_retry = "0s"
        max_body_size = 1024
        log_level = "debug,lapin=info"
        log_format = "json"
        log_dir = "/var/log/app"
        log_file_prefix = "media"
        http_addr = "0.0.0.0:9090"
        management_url = "http://a:pa@rabbit-1:15672"
        queue = "in"
        reply_queue = "out"
        reply_key = "out.key"

        [consumers.resize]
        queue = "media.resize"
        reply_key = "media.resized"
        reply_queue = "media.resized"
        prefetch = 2
        concurrency = 1
        read_ahead = 3
        timeout = "30s"
        max_retries = 0
        retry_delays = []
        queue_type = "classic"
        bind_reply_queue = true
        dead_letter = true
        dead_letter_queue = "media.resize.dlq"
        enabled = false
        "#,
    )
    .unwrap();
    assert_eq!(
        config.urls,
        vec![
            SecretUrl::new("amqp://a:pa@rabbit-1:5672/%2f"),
            SecretUrl::new("amqps://a:pa@rabbit-2:5671/prod"),
        ]
    );
    assert_eq!(config.exchange, "media");
    assert_eq!(config.prefetch_count, 16);
    assert_eq!(config.concurrency, Some(8));
    assert_eq!(config.read_ahead, Some(0));
    assert_eq!(config.retry_connect_interval, Duration::from_secs(2));
    assert_eq!(config.retry_connect_max, Duration::from_secs(60));
    assert_eq!(config.heartbeat_interval, 0);
    assert_eq!(config.message_timeout, Duration::from_secs(60));
    assert_eq!(config.max_retry_count, 5);
    assert_eq!(
        config.retry_delays,
        vec![
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_millis(60_500)
        ]
    );
    assert_eq!(config.queue_stuck_threshold, Duration::from_secs(180));
    assert_eq!(config.max_consecutive_failures, 2);
    assert!(config.enable_result_cache);
    assert_eq!(config.result_cache_size, 50);
    assert_eq!(config.queue_type, QueueType::Quorum);
    assert!(!config.bind_reply_queue);
    assert!(!config.dead_letter);
    assert_eq!(config.shutdown_timeout, Duration::ZERO);
    assert_eq!(config.confirm_timeout, Duration::from_secs(5));
    assert_eq!(config.result_publish_retry, Duration::ZERO);
    assert_eq!(config.max_body_size, 1024);
    assert_eq!(
        config.log,
        LogConfig {
            level: "debug,lapin=info".to_owned(),
            format: LogFormat::Json,
            dir: Some(PathBuf::from("/var/log/app")),
            file_prefix: "media".to_owned(),
        }
    );
    assert_eq!(config.http_addr, Some("0.0.0.0:9090".parse().unwrap()));
    assert_eq!(
        config.management_url,
        Some(SecretUrl::new("http://a:pa@rabbit-1:15672"))
    );
    assert_eq!(config.queue.as_deref(), Some("in"));
    assert_eq!(config.reply_queue.as_deref(), Some("out"));
    assert_eq!(config.reply_key.as_deref(), Some("out.key"));
    assert_eq!(
        config.consumer("resize"),
        ConsumerConfig {
            queue: Some("media.resize".to_owned()),
            reply_key: Some("media.resized".to_owned()),
            reply_queue: Some("media.resized".to_owned()),
            prefetch: Some(2),
            concurrency: Some(1),
            read_ahead: Some(3),
            timeout: Some(Duration::from_secs(30)),
            max_retries: Some(0),
            max_redeliveries: None,
            delivery_limit: None,
            max_in_flight_bytes: None,
            retry_delays: Some(Vec::new()),
            queue_type: Some(QueueType::Classic),
            reply_to: None,
            bind_reply_queue: Some(true),
            dead_letter: Some(true),
            dead_letter_queue: Some("media.resize.dlq".to_owned()),
            declare: None,
            publish_via: None,
            enabled: Some(false),
            batch: None,
            batch_wait: None,
            cache: None,
        }
    );
}

#[test]
fn declare_and_publish_via_globally_and_per_handler() {
    let config = Config::from_sources(None, []).unwrap();
    assert!(config.declare);
    assert_eq!(config.publish_via, PublishVia::DefaultExchange);
    let config = Config::from_sources(
        Some(
            r#"
        declare = false
        publish_via = "exchange"
        [consumers.a]
        declare = true
        publish_via = "default_exchange"
        "#,
        ),
        [(
            "RMQ_CONSUMER_CONSUMERS__B__PUBLISH_VIA".to_owned(),
            "Exchange".to_owned(),
        )],
    )
    .unwrap();
    assert!(!config.declare);
    assert_eq!(config.publish_via, PublishVia::Exchange);
    assert_eq!(config.consumer("a").declare, Some(true));
    assert_eq!(
        config.consumer("a").publish_via,
        Some(PublishVia::DefaultExchange)
    );
    assert_eq!(config.consumer("b").publish_via, Some(PublishVia::Exchange));
    let error = Config::from_sources(Some(r#"publish_via = "amq.default""#), [])
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("publish_via") && error.contains("`default_exchange` or `exchange`"),
        "{error}"
    );
}

#[test]
fn env_overrides_file() {
    let config = Config::from_sources(
        Some(
            r#"
            conn_iddress = "amqp://file:file@file-host/v"
            prefetch_count = 2
            enable_result_cache = true
            log_format = "json"
            [log]
            dir = "/file/logs"
            [consumers.resize]
            queue = "file.queue"
            prefetch = 3
            "#,
        ),
        env(&[
            ("RMQ_CONSUMER_URL", "amqp://a:b@env-1/v, amqp://a:b@env-2/v"),
            ("RMQ_CONSUMER_PREFETCH_COUNT", "9"),
            ("RMQ_CONSUMER_ENABLE_RESULT_CACHE", "0"),
            ("RMQ_CONSUMER_LOG_FORMAT", "HUMAN"),
            ("RMQ_CONSUMER_LOG_DIR", "/env/logs"),
            ("RMQ_CONSUMER_LOG_LEVEL", "warn"),
            ("RMQ_CONSUMER_HTTP_ADDR", "127.0.0.1:9000"),
            ("RMQ_CONSUMER_MANAGEMENT_URL", "https://a:b@env-1:15671"),
            ("RMQ_CONSUMER_RETRY_DELAYS", "1s, 2.5, 3"),
            ("RMQ_CONSUMER_QUEUE_TYPE", "quorum"),
            ("RMQ_CONSUMER_CONSUMERS__RESIZE__QUEUE", "env.queue"),
            ("RMQ_CONSUMER_CONFIG", "/ignored/here.toml"),
            ("PATH", "/usr/bin"),
            ("rmq_consumer_prefetch_count", "not ours"),
        ]),
    )
    .unwrap();
    assert_eq!(
        config.urls,
        vec![
            SecretUrl::new("amqp://a:b@env-1/v"),
            SecretUrl::new("amqp://a:b@env-2/v")
        ]
    );
    assert_eq!(config.prefetch_count, 9);
    assert!(!config.enable_result_cache);
    assert_eq!(config.log.format, LogFormat::Human);
    assert_eq!(config.log.dir, Some(PathBuf::from("/env/logs")));
    assert_eq!(config.log.level, "warn");
    assert_eq!(config.http_addr, Some("127.0.0.1:9000".parse().unwrap()));
    assert_eq!(
        config.management_url,
        Some(SecretUrl::new("https://a:b@env-1:15671"))
    );
    assert_eq!(
        config.retry_delays,
        vec![
            Duration::from_secs(1),
            Duration::from_millis(2500),
            Duration::from_secs(3)
        ]
    );
    assert_eq!(config.queue_type, QueueType::Quorum);
    let resize = config.consumer("resize");
    assert_eq!(resize.queue.as_deref(), Some("env.queue"));
    assert_eq!(resize.prefetch, Some(3));
}

#[test]
fn enums_parse_case_insensitively() {
    assert_eq!("Quorum".parse::<QueueType>(), Ok(QueueType::Quorum));
    assert_eq!("CLASSIC".parse::<QueueType>(), Ok(QueueType::Classic));
    assert_eq!(QueueType::Quorum.as_str(), "quorum");
    assert_eq!(
        "stream".parse::<QueueType>().unwrap_err().to_string(),
        "expected `classic` or `quorum`, got `stream`"
    );
    assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
    assert_eq!(LogFormat::Human.to_string(), "human");
}

/// `Serialize` writes every key as the file spells it: a new field of a type serde writes
/// otherwise (a `Duration` without `serialize_with = "written"`) shows up here as an object.
#[test]
fn serializes_as_the_file_writes_it() {
    let config = Config::from_toml_str(
        r#"
        url = ["amqp://app:hunter1@a:5672/%2f"]
        management_url = "http://ops:hunter2@m:15672"
        retry_delays = ["10s", "1500ms"]
        reply_to = ["rpc."]
        log_dir = "logs"
        [consumers.x]
        timeout = "30s"
        retry_delays = ["1s"]
        queue_type = "quorum"
        "#,
    )
    .unwrap();
    let json = serde_json::to_value(&config).unwrap();
    let text = json.to_string();
    assert!(!text.contains("hunter"), "{text}");
    assert_eq!(json["url"][0], "amqp://app:****@a:5672/%2f");
    assert_eq!(json["management_url"], "http://ops:****@m:15672");
    assert_eq!(json["retry_delays"], serde_json::json!(["10s", "1s 500ms"]));
    assert_eq!(json["message_timeout"], "5m");
    assert_eq!(json["reply_to"], serde_json::json!(["rpc."]));
    assert_eq!(json["publish_via"], "default_exchange");
    assert_eq!(json["tls_ca_file"], serde_json::Value::Null);
    assert_eq!(json["log"]["dir"], "logs");
    assert_eq!(json["log"]["format"], "human");
    assert_eq!(json["consumers"]["x"]["timeout"], "30s");
    assert_eq!(json["consumers"]["x"]["queue_type"], "quorum");
    for (name, section) in [("", &json), ("log.", &json["log"])] {
        for (key, value) in section.as_object().unwrap() {
            if !(name.is_empty() && matches!(key.as_str(), "log" | "consumers")) {
                assert!(!value.is_object(), "{name}{key} = {value}");
            }
        }
    }
    for (key, value) in json["consumers"]["x"].as_object().unwrap() {
        assert!(!value.is_object(), "consumers.x.{key} = {value}");
    }

    let with_password = Config::from_sources(
        None,
        env(&[
            ("RMQ_CONSUMER_URL", "amqp://app@a:5672/%2f"),
            ("RMQ_CONSUMER_PASSWORD", "hunter3"),
        ]),
    )
    .unwrap();
    let json = serde_json::to_value(&with_password).unwrap();
    assert!(!json.to_string().contains("hunter"), "{json}");
    assert_eq!(json["password"], "****");
    assert_eq!(json["url"][0], "amqp://app:****@a:5672/%2f");
}

#[test]
fn result_store_keys_default_off() {
    let config = Config::default();
    assert_eq!(config.result_store, None);
    assert_eq!(config.result_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(config.result_store_timeout, Duration::from_millis(500));
    assert_eq!(config.result_store_lease, Duration::from_secs(10));
    assert!(!config.result_store_required);
    assert_eq!(config.result_store_prefix, "rmq-consumer:");
    assert_eq!(config.cache_mode("any"), CacheMode::None);
    let local = Config::from_toml_str("enable_result_cache = true").unwrap();
    assert_eq!(local.cache_mode("any"), CacheMode::Local);
}

#[test]
fn result_store_keys_from_the_file_and_the_environment() {
    let config = Config::from_sources(
        Some(
            r#"
            result_store = "rediss://app:s3cret@redis:6380/2"
            result_ttl = "1h"
            result_store_timeout = "200ms"
            result_store_lease = "5s"
            result_store_required = true
            result_store_prefix = "prod:"
            enable_result_cache = true

            [consumers.resize]
            cache = "shared"

            [consumers.thumb]
            cache = "NONE"
            "#,
        ),
        env(&[
            ("RMQ_CONSUMER_RESULT_TTL", "2h"),
            ("RMQ_CONSUMER_CONSUMERS__OCR__CACHE", "shared"),
        ]),
    )
    .unwrap();
    assert_eq!(
        config.result_store.as_ref().map(SecretUrl::expose),
        Some("rediss://app:s3cret@redis:6380/2")
    );
    assert_eq!(config.result_ttl, Duration::from_secs(2 * 3600));
    assert_eq!(config.result_store_timeout, Duration::from_millis(200));
    assert_eq!(config.result_store_lease, Duration::from_secs(5));
    assert!(config.result_store_required);
    assert_eq!(config.result_store_prefix, "prod:");
    assert_eq!(config.cache_mode("resize"), CacheMode::Shared);
    assert_eq!(config.cache_mode("thumb"), CacheMode::None);
    assert_eq!(config.cache_mode("ocr"), CacheMode::Shared);
    assert_eq!(config.cache_mode("other"), CacheMode::Local);
    // The password never shows.
    let shown = format!(
        "{config:?} {} {}",
        serde_json::to_string(&config).unwrap(),
        config.result_store.as_ref().unwrap()
    );
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("rediss://app:****@redis:6380/2"), "{shown}");
}

#[test]
fn result_store_problems_name_their_keys() {
    let found = problems(Config::from_toml_str(
        r#"
        result_store = "http://:s3cret@redis:6379"
        result_ttl = 0
        [consumers.a]
        cache = "fleet"
        "#,
    ));
    assert!(!format!("{found:?}").contains("s3cret"), "{found:?}");
    assert!(
        problem_for(&found, "result_store")
            .message
            .contains("redis:// or rediss://"),
        "{found:?}"
    );
    assert!(
        problem_for(&found, "result_ttl")
            .message
            .contains("greater than zero")
    );
    assert!(
        problem_for(&found, "consumers.a.cache")
            .message
            .contains("`none`, `local` or `shared`")
    );

    // `shared` without a store names both keys.
    let found = problems(Config::from_toml_str("[consumers.a]\ncache = \"shared\""));
    let message = &problem_for(&found, "consumers.a.cache").message;
    assert!(message.contains("result_store"), "{message}");

    // The lease must outlive a few calls.
    let found = problems(Config::from_toml_str(
        "result_store_timeout = \"1s\"\nresult_store_lease = \"2s\"",
    ));
    assert!(
        problem_for(&found, "result_store_lease")
            .message
            .contains("3 ×")
    );

    // A near miss gets a hint.
    let found = problems(Config::from_toml_str("result_stor = \"redis://r\""));
    assert!(
        problem_for(&found, "result_stor")
            .message
            .contains("result_store"),
        "{found:?}"
    );
}

//! Tests of `value.rs`.

use super::*;
use crate::config::tests::{env, problem_for, problems};
use crate::config::*;

#[test]
fn durations_in_all_forms() {
    let config = Config::from_sources(
        Some(
            r#"
            message_timeout = 45
            queue_stuck_threshold = 1.5
            shutdown_timeout = "500ms"
            confirm_timeout = "2m"
            retry_connect_interval = "1h 30m"
            retry_delays = [1, 0.25, "3s", "1m"]
            "#,
        ),
        env(&[("RMQ_CONSUMER_RETRY_CONNECT_MAX", "2h")]),
    )
    .unwrap();
    assert_eq!(config.message_timeout, Duration::from_secs(45));
    assert_eq!(config.queue_stuck_threshold, Duration::from_millis(1500));
    assert_eq!(config.shutdown_timeout, Duration::from_millis(500));
    assert_eq!(config.confirm_timeout, Duration::from_secs(120));
    assert_eq!(config.retry_connect_interval, Duration::from_secs(5400));
    assert_eq!(config.retry_connect_max, Duration::from_secs(7200));
    assert_eq!(
        config.retry_delays,
        vec![
            Duration::from_secs(1),
            Duration::from_millis(250),
            Duration::from_secs(3),
            Duration::from_secs(60)
        ]
    );

    let from_env = Config::from_sources(
        None,
        env(&[
            ("RMQ_CONSUMER_MESSAGE_TIMEOUT", "45"),
            ("RMQ_CONSUMER_QUEUE_STUCK_THRESHOLD", "1.5"),
            ("RMQ_CONSUMER_SHUTDOWN_TIMEOUT", "500ms"),
            ("RMQ_CONSUMER_RETRY_DELAYS", ""),
        ]),
    )
    .unwrap();
    assert_eq!(from_env.message_timeout, Duration::from_secs(45));
    assert_eq!(from_env.queue_stuck_threshold, Duration::from_millis(1500));
    assert_eq!(from_env.shutdown_timeout, Duration::from_millis(500));
    assert!(from_env.retry_delays.is_empty());

    let problems = problems(Config::from_toml_str(
        r#"
        message_timeout = 0
        confirm_timeout = -0.5
        retry_connect_interval = "10s"
        retry_connect_max = "5s"
        queue_stuck_threshold = true
        retry_delays = ["1s", "0s"]
        "#,
    ));
    assert_eq!(
        problem_for(&problems, "message_timeout").message,
        "must be greater than zero"
    );
    assert_eq!(
        problem_for(&problems, "confirm_timeout").message,
        "expected a non-negative number of seconds, got -0.5"
    );
    assert_eq!(
        problem_for(&problems, "retry_connect_max").message,
        "must be at least retry_connect_interval (10s), got 5s"
    );
    assert_eq!(
        problem_for(&problems, "queue_stuck_threshold").message,
        "expected a duration (seconds, or a string like \"500ms\" or \"2m\"), got a boolean"
    );
    assert_eq!(
        problem_for(&problems, "retry_delays").message,
        "every delay must be at least 1ms"
    );
    assert_eq!(problems.len(), 5);
}

#[test]
fn absurd_values_are_problems_naming_the_key() {
    let problems = problems(Config::from_sources(
        Some(
            r#"
            message_timeout = "1000years"
            shutdown_timeout = 99999999999
            retry_delays = ["1s", "400d"]
            result_cache_size = 1000000000000
            max_body_size = 1099511627776
            max_in_flight_bytes = 0
            [consumers.a]
            timeout = "500d"
            max_in_flight_bytes = -1
            "#,
        ),
        env(&[("RMQ_CONSUMER_QUEUE_STUCK_THRESHOLD", "18446744073709551615")]),
    ));
    for key in [
        "message_timeout",
        "shutdown_timeout",
        "retry_delays",
        "consumers.a.timeout",
        "RMQ_CONSUMER_QUEUE_STUCK_THRESHOLD",
    ] {
        let message = &problem_for(&problems, key).message;
        assert!(
            message.starts_with("must be at most 366 days"),
            "{key}: {message}"
        );
    }
    assert_eq!(
        problem_for(&problems, "result_cache_size").message,
        "must be between 1 and 10000000, got 1000000000000"
    );
    assert_eq!(
        problem_for(&problems, "max_body_size").message,
        "must be between 1 and 536870912, got 1099511627776"
    );
    assert_eq!(
        problem_for(&problems, "max_in_flight_bytes").message,
        "must be at least 1, got 0"
    );
    assert_eq!(
        problem_for(&problems, "consumers.a.max_in_flight_bytes").message,
        "must be at least 1, got -1"
    );
    assert_eq!(problems.len(), 9, "{problems:#?}");
}

#[test]
fn reply_to_policies_parse() {
    let config = Config::from_toml_str(
        r#"
        reply_to = ["amq.rabbitmq.reply-to", "rpc."]
        [consumers.a]
        reply_to = "ignore"
        [consumers.b]
        reply_to = "honour"
        "#,
    )
    .unwrap();
    let prefixes =
        ReplyToPolicy::Prefixes(vec!["amq.rabbitmq.reply-to".to_owned(), "rpc.".to_owned()]);
    assert_eq!(config.reply_to, prefixes);
    assert!(prefixes.allows("rpc.client-7") && !prefixes.allows("tasks.other"));
    assert_eq!(config.consumer("a").reply_to, Some(ReplyToPolicy::Ignore));
    assert_eq!(config.consumer("b").reply_to, Some(ReplyToPolicy::Honour));
    assert!(!ReplyToPolicy::Ignore.allows("anything"));
    assert_eq!(
        ReplyToPolicy::from_env("rpc., amq.rabbitmq.reply-to"),
        Ok(ReplyToPolicy::Prefixes(vec![
            "rpc.".to_owned(),
            "amq.rabbitmq.reply-to".to_owned()
        ]))
    );
    for bad in [
        "reply_to = 3",
        "reply_to = [\"\"]",
        "reply_to = \"sometimes\"",
    ] {
        assert!(Config::from_toml_str(bad).is_err(), "{bad}");
    }
}

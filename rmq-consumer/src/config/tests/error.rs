//! Tests of `error.rs`.

use crate::config::tests::problems;
use crate::config::*;

#[test]
fn invalid_display_format() {
    let error = Config::from_toml_str("prefetch_count = 0").unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid configuration (1 problem): `prefetch_count`: must be between 1 and 65535, got 0"
    );
    let error = Config::from_toml_str("prefetch_count = 0\nfoo = 1").unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid configuration (2 problems): `prefetch_count`: must be between 1 and 65535, \
         got 0; `foo`: unknown key"
    );
}

#[test]
fn syntax_error_reports_line_without_secrets() {
    let problems = problems(Config::from_toml_str(
        "prefetch_count = 4\nurl = \"amqp://u:hunter2-secret@h/v\nexchange = \"x\"\n",
    ));
    assert_eq!(problems.len(), 1);
    let problem = &problems[0];
    assert_eq!(problem.key, "toml");
    assert!(
        problem
            .message
            .starts_with("TOML syntax error at line 2, column"),
        "{problem}"
    );
    assert!(!problem.to_string().contains("hunter2"), "{problem}");
}

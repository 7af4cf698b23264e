//! Tests of `secret.rs`.

use super::*;
use crate::config::tests::{env, problem_for, problems};
use crate::config::*;

#[test]
fn bad_urls_are_reported_masked() {
    let problems = problems(Config::from_toml_str(
        r#"
        url = ["amqp://u:p@h:99999/v", "amqp://u:p@[::1]:5672/v", "amqp:opaque", "amqp://u:p@ok/v"]
        management_url = "ftp://u:p@h"
        "#,
    ));
    let url_problems: Vec<&str> = problems
        .iter()
        .filter(|p| p.key == "url")
        .map(|p| p.message.as_str())
        .collect();
    assert_eq!(
        url_problems,
        [
            "is not a valid AMQP URL (invalid port number): `amqp://u:****@h:99999/v`",
            "IPv6 address hosts are not supported (lapin's URL parser would connect to \
             localhost); use a host name: `amqp://u:****@[::1]:5672/v`",
            "must be an amqp:// or amqps:// URL, got `amqp:opaque`",
        ]
    );
    assert_eq!(
        problem_for(&problems, "management_url").message,
        "must be an http:// or https:// URL with a host, got `ftp://u:****@h`"
    );
    let problems = problems_of_empty_url();
    assert_eq!(problems[0].message, "must list at least one URL");
}

fn problems_of_empty_url() -> Vec<ConfigProblem> {
    problems(Config::from_toml_str("url = []"))
}

#[test]
fn passwords_with_commas_stay_in_their_url() {
    let canary = "Can,ary,amqp:x";
    let one = format!("amqp://u:{canary}@rabbit:5672/%2f");
    assert_eq!(split_urls(&one), [one.as_str()]);
    let two = format!("{one}, amqps://v:{canary}@other/%2f ,");
    let urls = split_urls(&two);
    assert_eq!(urls.len(), 2, "{urls:?}");
    assert_eq!(urls[1], format!("amqps://v:{canary}@other/%2f"));
    // An unusable list: every problem printed without the password.
    let result = Config::from_sources(
        None,
        env(&[(
            "RMQ_CONSUMER_URL",
            "amqp://u:Can,ary@rabbit:5672/%2f,http://w:Can,ary@x/",
        )]),
    );
    let text = format!(
        "{:?} {}",
        result,
        match &result {
            Ok(_) => String::new(),
            Err(error) => error.to_string(),
        }
    );
    assert!(result.is_err(), "the http URL is a problem");
    assert!(
        !text.contains("Can,ary") && !text.contains("ary@"),
        "{text}"
    );
}

#[test]
fn query_secrets_are_masked() {
    let cases = [
        (
            "amqps://u:p@h/v?heartbeat=10&password=hunter2&token=abc#frag",
            "amqps://u:****@h/v?heartbeat=10&password=****&token=****#****",
        ),
        (
            "amqp://h/v?auth_mechanism=external&secret=s&cacertfile=/ca.pem",
            "amqp://h/v?auth_mechanism=external&secret=****&cacertfile=/ca.pem",
        ),
        ("http://h:15672/?api_key=k", "http://h:15672/?api_key=****"),
    ];
    for (raw, masked) in cases {
        assert_eq!(SecretUrl::new(raw).masked(), masked);
    }
}

#[test]
fn secret_url_masking() {
    let cases = [
        (
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://guest:****@127.0.0.1:5672/%2f",
        ),
        ("amqp://u:c@n:a/r#y%?密@h:5672/v", "amqp://u:****@h:5672/v"),
        ("amqps://user@h/v", "amqps://user@h/v"),
        ("amqp://h:5672/v", "amqp://h:5672/v"),
        ("amqp://u:@h/v", "amqp://u:****@h/v"),
        ("u:secret@h", "u:****@h"),
        ("", ""),
    ];
    for (raw, masked) in cases {
        let url = SecretUrl::new(raw);
        assert_eq!(url.masked(), masked);
        assert_eq!(url.to_string(), masked);
        assert_eq!(format!("{url:?}"), format!("SecretUrl({masked:?})"));
        assert_eq!(url.expose(), raw);
        assert_eq!(raw.parse::<SecretUrl>(), Ok(url));
    }
}

/// `u` / `c@n:a/r#y%?密`, percent-encoded.
const CANARY_URL: &str = "amqp://u:c%40n%3Aa%2Fr%23y%25%3F%E5%AF%86@rabbit:5672/%2f";

const CANARY_FRAGMENTS: &[&str] = &[
    "c@n",
    "c%40n",
    "%40n",
    "%3Aa",
    "a/r",
    "%2Fr",
    "r#y",
    "%23y",
    "y%?",
    "%25%3F",
    "密",
    "%E5%AF%86",
    "%e5%af%86",
    "canary",
];

fn assert_no_canary(text: &str) {
    for fragment in CANARY_FRAGMENTS {
        assert!(!text.contains(fragment), "`{fragment}` leaked in {text}");
    }
}

#[test]
fn passwords_never_printed() {
    let config = Config::from_sources(
        Some(&format!("url = \"{CANARY_URL}\"")),
        env(&[(
            "RMQ_CONSUMER_MANAGEMENT_URL",
            "http://u:c%40n%3Aa@rabbit:15672",
        )]),
    )
    .unwrap();
    assert_eq!(config.urls[0].expose(), CANARY_URL);
    assert_no_canary(&format!("{config:?}"));
    assert_no_canary(&format!("{config:#?}"));
    assert_no_canary(&format!("{:?} {}", config.urls[0], config.urls[0]));
    assert!(format!("{config:?}").contains("amqp://u:****@rabbit:5672/%2f"));

    // Bad URLs carrying the canary, through the file and the environment.
    let bad_port = CANARY_URL.replace(":5672", ":99999");
    let bad_utf8 = CANARY_URL.replace("%E5%AF%86", "%FF");
    let bad_scheme = CANARY_URL.replace("amqp://", "http://");
    let raw_password = "amqp://u:c@n:a/r#y%?密@rabbit:5672/%2f";
    let errors = [
        Config::from_toml_str(&format!("url = [\"{bad_port}\", \"{bad_utf8}\"]")).unwrap_err(),
        Config::from_toml_str(&format!("url = \"{raw_password}\"")).unwrap_err(),
        Config::from_sources(
            None,
            env(&[
                ("RMQ_CONSUMER_URL", &format!("{bad_scheme},{bad_port}")),
                ("RMQ_CONSUMER_PREFETCH_COUNT", &bad_port),
                ("RMQ_CONSUMER_HTTP_ADDR", CANARY_URL),
                ("RMQ_CONSUMER_QUEUE_TYPE", CANARY_URL),
                (
                    "RMQ_CONSUMER_MANAGEMENT_URL",
                    &bad_scheme.replace("http", "ftp"),
                ),
            ]),
        )
        .unwrap_err(),
    ];
    for error in errors {
        let ConfigError::Invalid { problems } = &error else {
            panic!("expected Invalid");
        };
        assert!(!problems.is_empty());
        assert_no_canary(&error.to_string());
        assert_no_canary(&format!("{error:?}"));
        for problem in problems {
            assert_no_canary(&problem.to_string());
            assert_no_canary(&format!("{problem:?}"));
        }
    }
}

#[test]
fn the_password_key_goes_into_every_url() {
    let config = Config::from_toml_str(
        r#"
        url = ["amqp://app@a:5672/%2f", "amqps://b:5671/prod"]
        password = "p@ss w,rd"
        "#,
    )
    .unwrap();
    assert_eq!(
        config.urls[0].expose(),
        "amqp://app:p%40ss%20w%2Crd@a:5672/%2f"
    );
    assert_eq!(
        config.urls[1].expose(),
        "amqps://guest:p%40ss%20w%2Crd@b:5671/prod"
    );
    assert_eq!(config.password, Some(Password::new("p@ss w,rd")));
    // Without `url`: the default URL, with this password instead of guest's.
    let config = Config::from_sources(None, env(&[("RMQ_CONSUMER_PASSWORD", "s3cret")])).unwrap();
    assert_eq!(
        config.urls[0].expose(),
        "amqp://guest:s3cret@127.0.0.1:5672/%2f"
    );
    // A URL with its own password beside the key: a problem naming the key, no password.
    let found = problems(Config::from_sources(
        Some("url = \"amqp://app:hunter2@a:5672/%2f\""),
        env(&[("RMQ_CONSUMER_PASSWORD", "hunter3")]),
    ));
    let problem = problem_for(&found, "RMQ_CONSUMER_PASSWORD");
    assert!(problem.message.contains("amqp://app:****@a"), "{problem}");
    assert!(!format!("{found:?}").contains("hunter"), "{found:?}");
    let found = problems(Config::from_toml_str("password = \"\""));
    assert_eq!(problem_for(&found, "password").message, "must not be empty");
}

#[test]
fn tls_query_parameters_are_rejected_naming_the_key() {
    for (param, key) in [
        ("cacertfile", "tls_ca_file"),
        ("certfile", "tls_cert_file"),
        ("keyfile", "tls_key_file"),
        ("verify", "tls_ca_file"),
        ("fail_if_no_peer_cert", "tls_cert_file"),
        ("server_name_indication", "host"),
        ("depth", "tls_ca_file"),
    ] {
        let found = problems(Config::from_toml_str(&format!(
            "url = \"amqps://u:hunter2@h:5671/%2f?heartbeat=5&{param}=x\""
        )));
        let problem = problem_for(&found, "url");
        assert!(problem.message.contains(&format!("`{param}`")), "{problem}");
        assert!(problem.message.contains(key), "{problem}");
        assert!(!problem.message.contains("hunter2"), "{problem}");
    }
    assert!(Config::from_toml_str("url = \"amqps://h:5671/%2f?heartbeat=5\"").is_ok());
}

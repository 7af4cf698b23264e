//! The test environment: which broker the tests run against (`$RMQ_TEST_BROKER`,
//! `$RMQ_TEST_URL`), how to reach it, and unique names so that tests never share a queue.

use std::sync::atomic::{AtomicU32, Ordering};

use rmq_consumer::config::SecretUrl;

/// The broker the tests run against, chosen by `$RMQ_TEST_BROKER` (`tests/run.sh` runs the
/// suite once per broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBroker {
    /// `rabbit3` (the default): the machine's RabbitMQ 3.10, node `rabbit@localhost`, AMQP on
    /// 5672, management on 15672, the host's `rabbitmqctl` (`tests/scripts/rabbit3.sh`).
    Rabbit3,
    /// `rabbit4`: RabbitMQ 4.0 in the chroot of `tests/scripts/rabbit4.sh`, node
    /// `rabbit4@localhost`, AMQP on 5673, management on 15673, its `rabbitmqctl` through
    /// `rabbit4.sh ctl`.
    Rabbit4,
}

/// `tests/scripts/rabbit4.sh`, which runs `rabbitmqctl` inside the 4.0 node's root.
const RABBIT4_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbit4.sh");

impl TestBroker {
    /// `$RMQ_TEST_BROKER`; panics on a value that names no broker.
    fn selected() -> Self {
        match std::env::var("RMQ_TEST_BROKER").as_deref() {
            Err(_) | Ok("" | "rabbit3") => Self::Rabbit3,
            Ok("rabbit4") => Self::Rabbit4,
            Ok(other) => panic!("RMQ_TEST_BROKER={other:?}: expected `rabbit3` or `rabbit4`"),
        }
    }

    /// `rabbit3` or `rabbit4`, the value of `$RMQ_TEST_BROKER` that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rabbit3 => "rabbit3",
            Self::Rabbit4 => "rabbit4",
        }
    }

    /// The port of its AMQP listener on 127.0.0.1.
    pub fn amqp_port(self) -> u16 {
        match self {
            Self::Rabbit3 => 5672,
            Self::Rabbit4 => 5673,
        }
    }

    /// The port of its management API on 127.0.0.1.
    pub fn management_port(self) -> u16 {
        match self {
            Self::Rabbit3 => 15672,
            Self::Rabbit4 => 15673,
        }
    }

    /// The command that starts it (for the messages of a test that cannot reach it).
    pub fn start_hint(self) -> &'static str {
        match self {
            Self::Rabbit3 => "tests/scripts/rabbit3.sh start",
            Self::Rabbit4 => "tests/scripts/rabbit4.sh start",
        }
    }

    /// A `rabbitmqctl` command for this broker's node, without arguments yet.
    pub(crate) fn rabbitmqctl(self) -> std::process::Command {
        match self {
            Self::Rabbit3 => std::process::Command::new("rabbitmqctl"),
            Self::Rabbit4 => {
                let mut command = std::process::Command::new("bash");
                command.args([RABBIT4_SCRIPT, "ctl"]);
                command
            }
        }
    }

    /// What a failing [`TestBroker::rabbitmqctl`] needs, for its panic message.
    pub(crate) fn rabbitmqctl_hint(self) -> &'static str {
        match self {
            Self::Rabbit3 => "these tests need `rabbitmqctl` on PATH",
            Self::Rabbit4 => "these tests need `tests/scripts/rabbit4.sh ctl` (run as root)",
        }
    }
}

/// The broker of `$RMQ_TEST_BROKER`.
pub fn test_broker() -> TestBroker {
    TestBroker::selected()
}

/// `rabbit3` or `rabbit4`, for test messages.
pub fn broker_name() -> &'static str {
    test_broker().name()
}

/// The broker the tests use: `$RMQ_TEST_URL`, else the AMQP URL of [`test_broker`].
pub fn broker_url() -> String {
    std::env::var("RMQ_TEST_URL").unwrap_or_else(|_| {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            test_broker().amqp_port()
        )
    })
}

/// Host and port of [`broker_url`].
pub fn broker_addr() -> (String, u16) {
    use std::str::FromStr;
    let url = broker_url();
    let uri = lapin::uri::AMQPUri::from_str(&url)
        .unwrap_or_else(|e| panic!("bad test broker URL {}: {e}", SecretUrl::new(url.clone())));
    (uri.authority.host, uri.authority.port)
}

/// The management API of the test broker: [`broker_url`]'s host, [`test_broker`]'s
/// management port.
pub fn management_url() -> String {
    format!(
        "http://{}:{}",
        broker_addr().0,
        test_broker().management_port()
    )
}

/// The `--management-url` the `rmq-consumer` CLI needs to find the test broker's management
/// API: `None` where its default (`http://<broker host>:15672`) does.
pub fn cli_management_url() -> Option<String> {
    (test_broker().management_port() != 15672).then(management_url)
}

/// A unique name for this test run.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "test.{prefix}.{}.{}.{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The path of a file of the test PKI that `tests/scripts/rabbit4.sh start` makes
/// (`$RMQ_TEST_TLS_DIR`, default `/var/lib/rmq-consumer-tests/tls`): a CA, server and client
/// certificates and keys. Panics, naming the script, when the file is missing.
#[must_use]
pub fn pki(name: &str) -> String {
    let dir = std::env::var("RMQ_TEST_TLS_DIR")
        .unwrap_or_else(|_| "/var/lib/rmq-consumer-tests/tls".to_owned());
    let path = std::path::PathBuf::from(dir).join(name);
    assert!(
        path.exists(),
        "{} is missing: run `tests/scripts/rabbit4.sh start` (as root) first",
        path.display()
    );
    path.display().to_string()
}

//! `rmq-consumer status`: a strictly read-only health view of the configured (or named)
//! queues.
//!
//! Read-only by construction: the management API is only ever sent GET requests, and over
//! AMQP the command only makes *passive* declares (which never create anything), each on a
//! short-lived channel of its own because a 404 closes the channel. It never declares, binds,
//! purges, publishes or consumes.
//!
//! Live counts (ready messages, consumers) come from the passive declares; bindings,
//! unacknowledged counts, consumer details, queue type, arguments, policies and rates come
//! from the management API when it answers (its statistics lag by a few seconds).

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use serde::Serialize;
use serde_json::Value;

mod judge;
mod probe;
mod render;
mod targets;

use judge::judge;
use probe::Prober;
use render::render;
pub(crate) use targets::dead_letter_source;
use targets::targets;

use super::output::{self, say};
use super::{CliError, Global, Io, load_config};

/// Show queues, bindings and consumers, read-only.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Check these queues only (repeatable); default: every configured handler's work, reply,
    /// dead-letter and delay queues.
    #[arg(long = "queue", short = 'q', value_name = "QUEUE")]
    queues: Vec<String>,
    /// Print machine-readable JSON (one document per refresh with --watch).
    #[arg(long)]
    json: bool,
    /// Refresh until interrupted (Ctrl-C), redrawing in place on a terminal.
    #[arg(long, short = 'w')]
    watch: bool,
    /// Time between refreshes with --watch.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// With --watch: stop after this many refreshes.
    #[arg(long, requires = "watch")]
    iterations: Option<u64>,
}

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    /// A handler consumes it.
    Work,
    /// Results are routed to it with the reply key.
    Reply,
    /// Failed messages end up here.
    DeadLetter,
    /// A TTL queue a retry waits in.
    Delay,
    /// Named on the command line, not configured.
    Named,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Self::Work => "work",
            Self::Reply => "reply",
            Self::DeadLetter => "dlq",
            Self::Delay => "delay",
            Self::Named => "queue",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Self::Work => "work queue",
            Self::Reply => "reply queue",
            Self::DeadLetter => "dead-letter queue",
            Self::Delay => "retry delay queue",
            Self::Named => "queue",
        }
    }

    /// Whether messages waiting with no consumer are a problem.
    fn needs_consumer(self) -> bool {
        matches!(self, Self::Work | Self::Reply | Self::Named)
    }
}

/// One queue to check.
#[derive(Debug, Clone)]
struct Target {
    queue: String,
    role: Role,
    handler: Option<String>,
    /// For reply queues: the binding results need.
    reply_key: Option<String>,
    /// For dead-letter queues: the work queue whose dead letters they hold.
    dead_letter_source: Option<String>,
}

/// A binding of a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Binding {
    /// The source exchange; empty for the default exchange.
    exchange: String,
    routing_key: String,
}

/// One consumer of a queue, from the management API.
#[derive(Debug, Clone, Serialize)]
struct ConsumerInfo {
    tag: String,
    prefetch: Option<u64>,
    ack_mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<String>,
}

/// Message rates per second, from the management API.
#[derive(Debug, Clone, Default, Serialize)]
struct Rates {
    publish: f64,
    deliver: f64,
    ack: f64,
    /// Change of the message count per second.
    messages: f64,
}

/// What was found about one queue.
#[derive(Debug, Clone, Serialize)]
struct QueueStatus {
    name: String,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    handler: Option<String>,
    /// `None` when it could not be determined.
    exists: Option<bool>,
    messages_ready: Option<u64>,
    messages_unacknowledged: Option<u64>,
    consumers: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    durable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    arguments: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    effective_policy: BTreeMap<String, Value>,
    /// `None` without the management API.
    bindings: Option<Vec<Binding>>,
    /// `None` without the management API.
    consumer_details: Option<Vec<ConsumerInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rates: Option<Rates>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_binding: Option<Binding>,
}

/// The exchange results are published to.
#[derive(Debug, Clone, Serialize)]
struct ExchangeStatus {
    name: String,
    exists: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    durable: Option<bool>,
}

/// Something that needs attention.
#[derive(Debug, Clone, Serialize)]
struct Warning {
    queue: String,
    kind: &'static str,
    message: String,
}

/// Overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Health {
    Healthy,
    Warnings,
    Error,
}

/// One refresh.
#[derive(Debug, Clone, Serialize)]
struct Report {
    broker: String,
    vhost: String,
    /// `management` when the management API answered, else `amqp`.
    source: &'static str,
    management_api: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    management_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exchange: Option<ExchangeStatus>,
    queues: Vec<QueueStatus>,
    warnings: Vec<Warning>,
    errors: Vec<String>,
    notes: Vec<String>,
    /// Dead-letter queue → the work queue whose dead letters it holds (what `dlq replay`
    /// sends them back to), for the dead-letter queues among `queues`.
    dead_letter_sources: BTreeMap<String, String>,
    health: Health,
    exit_code: i32,
}

pub(crate) async fn run(global: &Global, args: Args, io: &mut Io<'_>) -> Result<i32, CliError> {
    let config = load_config(global)?;
    let (targets, notes) = targets(&config, &args.queues)?;
    let mut prober = Prober::new(&config);
    let mut previous: HashMap<String, u64> = HashMap::new();
    let mut refreshes = 0_u64;
    loop {
        let mut report = prober.report(&targets, &notes, &previous).await;
        for queue in &report.queues {
            if let (Some(ready), Some(unacked)) =
                (queue.messages_ready, queue.messages_unacknowledged)
            {
                previous.insert(queue.name.clone(), ready + unacked);
            } else if let Some(ready) = queue.messages_ready {
                previous.insert(queue.name.clone(), ready);
            }
        }
        refreshes += 1;
        let code = report.exit_code;
        if args.watch && !args.json && io.terminal.stdout {
            // Redraw in place: clear the screen, cursor home.
            write!(io.out, "\x1b[2J\x1b[H")?;
        } else if args.watch && !args.json && refreshes > 1 {
            say!(io.out)?;
        }
        if args.json {
            if args.watch {
                output::json_line(io.out, &report)?;
            } else {
                output::json(io.out, &report)?;
            }
        } else {
            if args.watch {
                report.notes.push(format!(
                    "refreshing every {}; Ctrl-C to stop",
                    humantime::format_duration(args.interval)
                ));
            }
            render(&report, io.out)?;
        }
        io.out.flush()?;
        let done = !args.watch || args.iterations.is_some_and(|max| refreshes >= max);
        if done {
            prober.close().await;
            return Ok(code);
        }
        tokio::select! {
            () = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => {
                prober.close().await;
                return Ok(code);
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::judge::judge;
    use super::targets::targets;
    use super::*;
    use crate::{
        Config,
        cli::{EXIT_ERROR, EXIT_FAILURE, EXIT_OK},
        registry,
    };

    fn queue(name: &str, role: Role) -> QueueStatus {
        QueueStatus {
            name: name.to_owned(),
            role,
            handler: Some("h".to_owned()),
            exists: Some(true),
            messages_ready: Some(0),
            messages_unacknowledged: Some(0),
            consumers: Some(1),
            queue_type: None,
            durable: None,
            state: None,
            arguments: BTreeMap::new(),
            policy: None,
            effective_policy: BTreeMap::new(),
            bindings: None,
            consumer_details: None,
            rates: None,
            expected_binding: None,
        }
    }

    fn report(queues: Vec<QueueStatus>) -> Report {
        Report {
            broker: "amqp://u:****@h/%2f".to_owned(),
            vhost: "/".to_owned(),
            source: "management",
            management_api: None,
            management_error: None,
            broker_error: None,
            exchange: None,
            queues,
            warnings: Vec::new(),
            errors: Vec::new(),
            notes: Vec::new(),
            dead_letter_sources: BTreeMap::new(),
            health: Health::Healthy,
            exit_code: EXIT_OK,
        }
    }

    #[test]
    fn healthy_queues_exit_zero() {
        let mut r = report(vec![queue("q", Role::Work)]);
        judge(&mut r, &HashMap::new());
        assert_eq!((r.health, r.exit_code), (Health::Healthy, EXIT_OK));
    }

    #[test]
    fn waiting_messages_without_consumers_warn_except_on_dlq_and_delay_queues() {
        let mut work = queue("q", Role::Work);
        work.messages_ready = Some(3);
        work.consumers = Some(0);
        let mut dlq = queue("q.dlq", Role::DeadLetter);
        dlq.messages_ready = Some(3);
        dlq.consumers = Some(0);
        let mut delay = queue("q.retry.1s", Role::Delay);
        delay.messages_ready = Some(3);
        delay.consumers = Some(0);
        let mut r = report(vec![work, dlq, delay]);
        judge(&mut r, &HashMap::new());
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert_eq!(r.warnings[0].kind, "no_consumers");
        assert_eq!(r.exit_code, EXIT_FAILURE);
    }

    #[test]
    fn an_unbound_reply_queue_warns() {
        let mut reply = queue("results", Role::Reply);
        reply.expected_binding = Some(Binding {
            exchange: "x".to_owned(),
            routing_key: "k".to_owned(),
        });
        reply.bindings = Some(vec![Binding {
            exchange: String::new(),
            routing_key: "results".to_owned(),
        }]);
        let mut r = report(vec![reply.clone()]);
        judge(&mut r, &HashMap::new());
        assert_eq!(r.warnings[0].kind, "reply_queue_unbound");

        reply
            .bindings
            .as_mut()
            .unwrap()
            .push(reply.expected_binding.clone().unwrap());
        let mut r = report(vec![reply]);
        judge(&mut r, &HashMap::new());
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn a_growing_dlq_warns_a_stable_one_does_not() {
        let mut dlq = queue("q.dlq", Role::DeadLetter);
        dlq.messages_ready = Some(4);
        let mut r = report(vec![dlq.clone()]);
        judge(&mut r, &HashMap::from([("q.dlq".to_owned(), 4)]));
        assert!(r.warnings.is_empty());
        let mut r = report(vec![dlq.clone()]);
        judge(&mut r, &HashMap::from([("q.dlq".to_owned(), 2)]));
        assert_eq!(r.warnings[0].kind, "dead_letter_queue_growing");
        dlq.rates = Some(Rates {
            messages: 0.4,
            ..Rates::default()
        });
        let mut r = report(vec![dlq]);
        judge(&mut r, &HashMap::new());
        assert_eq!(r.warnings.len(), 1);
    }

    #[test]
    fn a_missing_queue_or_broker_is_an_error() {
        let mut missing = queue("q", Role::Work);
        missing.exists = Some(false);
        let mut r = report(vec![missing]);
        judge(&mut r, &HashMap::new());
        assert_eq!((r.health, r.exit_code), (Health::Error, EXIT_ERROR));
        let mut r = report(vec![]);
        r.broker_error = Some("refused".to_owned());
        judge(&mut r, &HashMap::new());
        assert_eq!(r.exit_code, EXIT_ERROR);
    }

    #[test]
    fn dead_letter_queues_belong_to_their_handler_or_follow_the_naming_rule() {
        let config = Config::from_toml_str(
            r#"
            [consumers.a]
            queue = "qa"
            dead_letter_queue = "graveyard"
            "#,
        )
        .unwrap();
        if !registry::handlers().is_empty() {
            return; // only meaningful without registered handlers
        }
        let source = |queue: &str| dead_letter_source(&config, queue).unwrap();
        assert_eq!(source("graveyard").as_deref(), Some("qa"));
        assert_eq!(source("other.dlq").as_deref(), Some("other"));
        assert_eq!(source("qa"), None);
        assert_eq!(source("qa.retry.1s"), None);
    }

    #[test]
    fn configured_handlers_expand_to_their_queues() {
        let config = Config::from_toml_str(
            r#"
            exchange = "ex"
            retry_delays = ["1s", "10s"]
            [consumers.a]
            queue = "qa"
            reply_queue = "ra"
            reply_key = "ka"
            [consumers.b]
            queue = "qb"
            dead_letter = false
            "#,
        )
        .unwrap();
        if !registry::handlers().is_empty() {
            return; // only meaningful without registered handlers
        }
        let (all, _) = targets(&config, &[]).unwrap();
        let names: Vec<(&str, Role)> = all.iter().map(|t| (t.queue.as_str(), t.role)).collect();
        assert_eq!(
            names,
            [
                ("qa", Role::Work),
                ("ra", Role::Reply),
                ("qa.dlq", Role::DeadLetter),
                ("qa.retry.1s", Role::Delay),
                ("qa.retry.10s", Role::Delay),
                ("qb", Role::Work),
                ("qb.retry.1s", Role::Delay),
                ("qb.retry.10s", Role::Delay),
            ]
        );
        let (named, _) = targets(&config, &["ra".to_owned(), "other".to_owned()]).unwrap();
        assert_eq!(named[0].reply_key.as_deref(), Some("ka"));
        assert_eq!(named[1].role, Role::Named);
    }
}

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
    io::Write,
    time::Duration,
};

use lapin::{Connection, ExchangeKind, options::ExchangeDeclareOptions, types::FieldTable};
use serde::Serialize;
use serde_json::Value;

use super::output::{self, say};
use super::{
    CliError, EXIT_ERROR, EXIT_FAILURE, EXIT_OK, Global, Io, chain, close, close_channel,
    is_not_found, load_config,
    management::{Management, ManagementError},
    probe_queue, thousands, vhost_of,
};
use crate::{
    config::{Config, ConsumerConfig, SecretUrl},
    engine::settings::{self, dead_letter_queue_name, delay_queue_name},
    registry,
};

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

/// The queues to check, and notes about configured handlers that could not be resolved.
fn targets(config: &Config, named: &[String]) -> Result<(Vec<Target>, Vec<String>), CliError> {
    let (derived, mut notes) = configured_targets(config)?;
    if named.is_empty() {
        if derived.is_empty() {
            return Err(CliError::Usage(
                "no queues to check: name them with --queue, or configure handlers \
                 (`queue` or [consumers.<name>] queue = ...)"
                    .to_owned(),
            ));
        }
        return Ok((derived, notes));
    }
    let mut chosen: Vec<Target> = Vec::new();
    for name in named {
        if chosen.iter().any(|t| &t.queue == name) {
            continue;
        }
        chosen.push(
            derived
                .iter()
                .find(|t| &t.queue == name)
                .cloned()
                .unwrap_or_else(|| Target {
                    queue: name.clone(),
                    role: Role::Named,
                    handler: None,
                    reply_key: None,
                    dead_letter_source: settings::source_of_dead_letter_queue(name)
                        .map(str::to_owned),
                }),
        );
    }
    notes.clear();
    Ok((chosen, notes))
}

/// The work queue whose dead letters `queue` holds: the queue of the configured handler (or
/// of this binary's registered handler) whose dead-letter queue it is, else by the naming
/// rule (`a.dlq` holds the dead letters of `a`); `None` when `queue` is no dead-letter queue.
/// `status` reports the same (`dead_letter_sources`).
pub(crate) fn dead_letter_source(config: &Config, queue: &str) -> Result<Option<String>, CliError> {
    let (configured, _) = configured_targets(config)?;
    Ok(configured
        .into_iter()
        .find(|t| t.role == Role::DeadLetter && t.queue == queue)
        .and_then(|t| t.dead_letter_source)
        .or_else(|| settings::source_of_dead_letter_queue(queue).map(str::to_owned)))
}

/// The queues the configuration (or this binary's handlers) implies, and notes about
/// configured handlers that could not be resolved.
fn configured_targets(config: &Config) -> Result<(Vec<Target>, Vec<String>), CliError> {
    let mut notes = Vec::new();
    let specs = registry::handlers();
    let mut derived = Vec::new();
    let mut push = |target: Target| {
        if !derived.iter().any(|t: &Target| t.queue == target.queue) {
            derived.push(target);
        }
    };
    if specs.is_empty() {
        // The stand-alone binary knows no handlers: use what the configuration names.
        let mut sections: Vec<(String, ConsumerConfig)> = config
            .consumers
            .iter()
            .map(|(name, section)| (name.clone(), section.clone()))
            .collect();
        if sections.is_empty() && config.queue.is_some() {
            sections.push(("(config)".to_owned(), ConsumerConfig::default()));
        }
        for (name, section) in sections {
            if section.enabled == Some(false) {
                continue;
            }
            let Some(queue) = section.queue.clone().or_else(|| config.queue.clone()) else {
                notes.push(format!(
                    "[consumers.{name}] sets no `queue` and no handler `{name}` is registered in \
                     this binary: its queues are not checked"
                ));
                continue;
            };
            let reply_key = section
                .reply_key
                .clone()
                .or_else(|| config.reply_key.clone());
            let reply_queue = section
                .reply_queue
                .clone()
                .or_else(|| config.reply_queue.clone());
            let dead_letter_queue = section.dead_letter.unwrap_or(config.dead_letter).then(|| {
                section
                    .dead_letter_queue
                    .clone()
                    .unwrap_or_else(|| dead_letter_queue_name(&queue))
            });
            let delays = section
                .retry_delays
                .clone()
                .unwrap_or_else(|| config.retry_delays.clone());
            let delay_queues = delays
                .iter()
                .map(|d| delay_queue_name(&queue, *d))
                .collect();
            for target in handler_targets(
                &name,
                queue,
                reply_queue,
                reply_key,
                dead_letter_queue,
                delay_queues,
            ) {
                push(target);
            }
        }
    } else {
        for settings in settings::resolve(config, &specs)? {
            let delay_queues = settings
                .retry_delays
                .iter()
                .map(|d| settings.delay_queue(*d))
                .collect();
            for target in handler_targets(
                &settings.name,
                settings.queue,
                settings.reply_queue,
                settings.reply_key,
                settings.dead_letter_queue,
                delay_queues,
            ) {
                push(target);
            }
        }
    }
    Ok((derived, notes))
}

fn handler_targets(
    handler: &str,
    queue: String,
    reply_queue: Option<String>,
    reply_key: Option<String>,
    dead_letter_queue: Option<String>,
    delay_queues: Vec<String>,
) -> Vec<Target> {
    let target = |queue: String, role: Role, reply_key: Option<String>| Target {
        queue,
        role,
        handler: Some(handler.to_owned()),
        reply_key,
        dead_letter_source: None,
    };
    let source = queue.clone();
    let mut all = vec![target(queue, Role::Work, None)];
    if let Some(reply_queue) = reply_queue {
        all.push(target(reply_queue, Role::Reply, reply_key));
    }
    if let Some(dlq) = dead_letter_queue {
        all.push(Target {
            dead_letter_source: Some(source),
            ..target(dlq, Role::DeadLetter, None)
        });
    }
    for delay in delay_queues {
        all.push(target(delay, Role::Delay, None));
    }
    all
}

/// Holds the AMQP connection (reused across refreshes) and the management client.
struct Prober<'a> {
    config: &'a Config,
    connection: Option<(Connection, SecretUrl)>,
}

impl<'a> Prober<'a> {
    fn new(config: &'a Config) -> Self {
        Self {
            config,
            connection: None,
        }
    }

    async fn close(&mut self) {
        if let Some((connection, _)) = self.connection.take() {
            close(&connection).await;
        }
    }

    async fn report(
        &mut self,
        targets: &[Target],
        notes: &[String],
        previous: &HashMap<String, u64>,
    ) -> Report {
        let mut broker_error = None;
        if self
            .connection
            .as_ref()
            .is_none_or(|(c, _)| !c.status().connected())
        {
            self.connection = None;
            match super::connect(self.config, "status").await {
                Ok(found) => self.connection = Some(found),
                Err(error) => broker_error = Some(chain(&error)),
            }
        }
        let broker_url = self.connection.as_ref().map_or_else(
            || {
                self.config
                    .urls
                    .first()
                    .cloned()
                    .unwrap_or_else(|| SecretUrl::new(""))
            },
            |(_, url)| url.clone(),
        );
        let mut report = Report {
            broker: broker_url.masked(),
            vhost: vhost_of(&broker_url),
            source: "amqp",
            management_api: None,
            management_error: None,
            broker_error,
            exchange: None,
            queues: Vec::new(),
            warnings: Vec::new(),
            errors: Vec::new(),
            notes: notes.to_vec(),
            dead_letter_sources: targets
                .iter()
                .filter_map(|t| Some((t.queue.clone(), t.dead_letter_source.clone()?)))
                .collect(),
            health: Health::Healthy,
            exit_code: EXIT_OK,
        };
        let management = match Management::new(self.config, &broker_url) {
            Ok(management) => {
                report.management_api = Some(management.base().to_owned());
                match management.overview().await {
                    Ok(_) => Some(management),
                    Err(error) => {
                        report.management_error = Some(chain(&error));
                        None
                    }
                }
            }
            Err(error) => {
                report.management_error = Some(chain(&error));
                None
            }
        };
        if management.is_some() {
            report.source = "management";
        } else {
            report.notes.push(
                "the management API is not available: showing AMQP passive-declare data only \
                 (no bindings, unacknowledged counts, consumer details or rates)"
                    .to_owned(),
            );
        }
        let connection = self.connection.as_ref().map(|(c, _)| c);

        if targets.iter().any(|t| t.reply_key.is_some()) {
            report.exchange = Some(
                exchange_status(
                    &self.config.exchange,
                    connection,
                    management.as_ref(),
                    &mut report.notes,
                )
                .await,
            );
        }
        for target in targets {
            let status = queue_status(
                target,
                connection,
                management.as_ref(),
                &self.config.exchange,
                &mut report.notes,
            )
            .await;
            report.queues.push(status);
        }
        judge(&mut report, previous);
        report
    }
}

async fn exchange_status(
    name: &str,
    connection: Option<&Connection>,
    management: Option<&Management>,
    notes: &mut Vec<String>,
) -> ExchangeStatus {
    let mut status = ExchangeStatus {
        name: name.to_owned(),
        exists: None,
        kind: None,
        durable: None,
    };
    if let Some(management) = management {
        match management.exchange(name).await {
            Ok(Some(found)) => {
                status.exists = Some(true);
                status.kind = found.get("type").and_then(Value::as_str).map(str::to_owned);
                status.durable = found.get("durable").and_then(Value::as_bool);
            }
            Ok(None) => status.exists = Some(false),
            Err(error) => notes.push(chain(&error)),
        }
    }
    if let (None, Some(connection)) = (status.exists, connection) {
        status.exists = probe_exchange(connection, name).await;
    }
    status
}

/// Passive exchange declare on a channel of its own.
async fn probe_exchange(connection: &Connection, name: &str) -> Option<bool> {
    let channel = connection.create_channel().await.ok()?;
    let result = channel
        .exchange_declare(
            crate::amqp::short(name),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match result {
        Ok(()) => {
            close_channel(&channel).await;
            Some(true)
        }
        Err(error) if is_not_found(&error) => Some(false),
        Err(_) => None,
    }
}

async fn queue_status(
    target: &Target,
    connection: Option<&Connection>,
    management: Option<&Management>,
    exchange: &str,
    notes: &mut Vec<String>,
) -> QueueStatus {
    let mut status = QueueStatus {
        name: target.queue.clone(),
        role: target.role,
        handler: target.handler.clone(),
        exists: None,
        messages_ready: None,
        messages_unacknowledged: None,
        consumers: None,
        queue_type: None,
        durable: None,
        state: None,
        arguments: BTreeMap::new(),
        policy: None,
        effective_policy: BTreeMap::new(),
        bindings: None,
        consumer_details: None,
        rates: None,
        expected_binding: target.reply_key.as_ref().map(|key| Binding {
            exchange: exchange.to_owned(),
            routing_key: key.clone(),
        }),
    };
    if let Some(connection) = connection {
        match probe_queue(connection, &target.queue).await {
            Ok(Some((ready, consumers))) => {
                status.exists = Some(true);
                status.messages_ready = Some(ready.into());
                status.consumers = Some(consumers.into());
            }
            Ok(None) => status.exists = Some(false),
            Err(error) => notes.push(chain(&error)),
        }
    }
    if status.exists == Some(false) {
        return status;
    }
    if let Some(management) = management {
        match management_details(management, &target.queue, &mut status).await {
            Ok(()) => {}
            Err(error) => notes.push(chain(&error)),
        }
    }
    status
}

async fn management_details(
    management: &Management,
    queue: &str,
    status: &mut QueueStatus,
) -> Result<(), ManagementError> {
    let Some(found) = management.queue(queue).await? else {
        if status.exists.is_none() {
            status.exists = Some(false);
        }
        return Ok(());
    };
    status.exists = Some(true);
    let u64_of = |key: &str| found.get(key).and_then(Value::as_u64);
    let rate_of = |path: &[&str]| {
        let mut value = &found;
        for key in path {
            value = value.get(key)?;
        }
        value.get("rate").and_then(Value::as_f64)
    };
    if status.messages_ready.is_none() {
        status.messages_ready = u64_of("messages_ready");
    }
    if status.consumers.is_none() {
        status.consumers = u64_of("consumers");
    }
    status.messages_unacknowledged = u64_of("messages_unacknowledged");
    status.queue_type = found.get("type").and_then(Value::as_str).map(str::to_owned);
    status.durable = found.get("durable").and_then(Value::as_bool);
    status.state = found
        .get("state")
        .and_then(Value::as_str)
        .map(str::to_owned);
    status.policy = found
        .get("policy")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(Value::Object(map)) = found.get("arguments") {
        status.arguments = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    if let Some(Value::Object(map)) = found.get("effective_policy_definition") {
        status.effective_policy = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    if let Some(Value::Array(consumers)) = found.get("consumer_details") {
        status.consumer_details = Some(
            consumers
                .iter()
                .map(|c| ConsumerInfo {
                    tag: c
                        .get("consumer_tag")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    prefetch: c.get("prefetch_count").and_then(Value::as_u64),
                    ack_mode: if c
                        .get("ack_required")
                        .and_then(Value::as_bool)
                        .unwrap_or(true)
                    {
                        "manual"
                    } else {
                        "auto"
                    },
                    channel: c
                        .pointer("/channel_details/name")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                })
                .collect(),
        );
    }
    let has_stats = found.get("messages_details").is_some() || found.get("message_stats").is_some();
    if has_stats {
        status.rates = Some(Rates {
            publish: rate_of(&["message_stats", "publish_details"]).unwrap_or(0.0),
            deliver: rate_of(&["message_stats", "deliver_get_details"]).unwrap_or(0.0),
            ack: rate_of(&["message_stats", "ack_details"]).unwrap_or(0.0),
            messages: rate_of(&["messages_details"]).unwrap_or(0.0),
        });
    }
    if let Some(Value::Array(bindings)) = management.queue_bindings(queue).await? {
        status.bindings = Some(
            bindings
                .iter()
                .map(|b| Binding {
                    exchange: b
                        .get("source")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    routing_key: b
                        .get("routing_key")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                })
                .collect(),
        );
    }
    Ok(())
}

/// Adds warnings and errors and sets the verdict.
fn judge(report: &mut Report, previous: &HashMap<String, u64>) {
    if let Some(error) = &report.broker_error {
        report.errors.push(format!("broker unreachable: {error}"));
    }
    if let Some(exchange) = &report.exchange
        && exchange.exists == Some(false)
    {
        report.errors.push(format!(
            "exchange `{}` does not exist: results cannot be routed",
            exchange.name
        ));
    }
    for queue in &report.queues {
        if queue.exists == Some(false) {
            let of_handler = queue
                .handler
                .as_deref()
                .map(|h| format!(" of handler `{h}`"))
                .unwrap_or_default();
            report.errors.push(format!(
                "{} `{}`{of_handler} does not exist",
                queue.role.noun(),
                queue.name
            ));
            continue;
        }
        let ready = queue.messages_ready.unwrap_or(0);
        if queue.role.needs_consumer() && ready > 0 && queue.consumers == Some(0) {
            report.warnings.push(Warning {
                queue: queue.name.clone(),
                kind: "no_consumers",
                message: format!(
                    "{} message{} waiting but no consumer",
                    thousands(ready),
                    if ready == 1 { "" } else { "s" }
                ),
            });
        }
        if let (Some(expected), Some(bindings)) = (&queue.expected_binding, &queue.bindings)
            && !bindings.contains(expected)
        {
            report.warnings.push(Warning {
                queue: queue.name.clone(),
                kind: "reply_queue_unbound",
                message: format!(
                    "not bound to exchange `{}` with routing key `{}`: results published \
                     with that key are returned as unroutable instead of reaching this queue",
                    expected.exchange, expected.routing_key
                ),
            });
        }
        if queue.role == Role::DeadLetter {
            let total = ready + queue.messages_unacknowledged.unwrap_or(0);
            let rate = queue.rates.as_ref().map_or(0.0, |r| r.messages);
            let grew = previous
                .get(&queue.name)
                .is_some_and(|&before| total > before);
            if total > 0 && (rate > 0.0 || grew) {
                report.warnings.push(Warning {
                    queue: queue.name.clone(),
                    kind: "dead_letter_queue_growing",
                    message: format!(
                        "dead-letter queue is growing ({} message{} now); inspect with \
                         `rmq-consumer dlq peek {}`",
                        thousands(total),
                        if total == 1 { "" } else { "s" },
                        queue.name
                    ),
                });
            }
        }
    }
    (report.health, report.exit_code) = if !report.errors.is_empty() {
        (Health::Error, EXIT_ERROR)
    } else if !report.warnings.is_empty() {
        (Health::Warnings, EXIT_FAILURE)
    } else {
        (Health::Healthy, EXIT_OK)
    };
}

fn count(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), thousands)
}

fn render(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    say!(out, "broker     {} (vhost {})", report.broker, report.vhost)?;
    match (&report.management_api, &report.management_error) {
        (Some(api), None) => say!(out, "management {api}")?,
        (api, Some(error)) => say!(
            out,
            "management {} unavailable: {error}",
            api.as_deref().unwrap_or("-")
        )?,
        (None, None) => {}
    }
    if let Some(exchange) = &report.exchange {
        let what = match exchange.exists {
            Some(true) => format!(
                "{}{}",
                exchange.kind.as_deref().unwrap_or("exists"),
                if exchange.durable == Some(true) {
                    ", durable"
                } else {
                    ""
                }
            ),
            Some(false) => "MISSING".to_owned(),
            None => "unknown".to_owned(),
        };
        say!(out, "exchange   {} ({what})", exchange.name)?;
    }
    say!(out)?;

    let name_width = report
        .queues
        .iter()
        .map(|q| q.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let handler_width = report
        .queues
        .iter()
        .map(|q| q.handler.as_deref().map_or(1, str::len))
        .max()
        .unwrap_or(7)
        .max(7);
    say!(
        out,
        "{:<name_width$}  {:<5}  {:<handler_width$}  {:>9}  {:>9}  {:>9}  {:>8}  {:>8}",
        "QUEUE",
        "ROLE",
        "HANDLER",
        "READY",
        "UNACKED",
        "CONSUMERS",
        "IN/S",
        "OUT/S"
    )?;
    for queue in &report.queues {
        let handler = queue.handler.as_deref().unwrap_or("-");
        match queue.exists {
            Some(false) => say!(
                out,
                "{:<name_width$}  {:<5}  {handler:<handler_width$}  {:>9}",
                queue.name,
                queue.role.label(),
                "MISSING"
            )?,
            _ => {
                let (rate_in, rate_out) = queue.rates.as_ref().map_or_else(
                    || ("-".to_owned(), "-".to_owned()),
                    |r| (format!("{:.1}", r.publish), format!("{:.1}", r.deliver)),
                );
                say!(
                    out,
                    "{:<name_width$}  {:<5}  {handler:<handler_width$}  {:>9}  {:>9}  {:>9}  {:>8}  {:>8}",
                    queue.name,
                    queue.role.label(),
                    count(queue.messages_ready),
                    count(queue.messages_unacknowledged),
                    count(queue.consumers),
                    rate_in,
                    rate_out,
                )?;
            }
        }
    }
    for queue in report.queues.iter().filter(|q| q.exists == Some(true)) {
        if queue.queue_type.is_none() && queue.bindings.is_none() {
            continue;
        }
        say!(out)?;
        let mut facts = vec![
            queue
                .queue_type
                .clone()
                .unwrap_or_else(|| "queue".to_owned()),
        ];
        if queue.durable == Some(true) {
            facts.push("durable".to_owned());
        }
        if let Some(state) = queue.state.as_deref().filter(|s| *s != "running") {
            facts.push(format!("state {state}"));
        }
        if let Some(source) = report.dead_letter_sources.get(&queue.name) {
            facts.push(format!("dead letters of `{source}`"));
        }
        if !queue.arguments.is_empty() {
            facts.push(format!("arguments {}", describe_map(&queue.arguments)));
        }
        if let Some(policy) = &queue.policy {
            facts.push(format!(
                "policy {policy} ({})",
                describe_map(&queue.effective_policy)
            ));
        }
        say!(out, "{}: {}", queue.name, facts.join("; "))?;
        if let Some(bindings) = &queue.bindings {
            // Every queue is bound to the default exchange under its own name: not news.
            let list: Vec<String> = bindings
                .iter()
                .filter(|b| !b.exchange.is_empty())
                .map(|b| format!("{} -> `{}`", b.exchange, b.routing_key))
                .collect();
            say!(
                out,
                "  bindings: {}",
                if list.is_empty() {
                    "none besides the default exchange".to_owned()
                } else {
                    list.join(", ")
                }
            )?;
        }
        if let Some(consumers) = &queue.consumer_details {
            for consumer in consumers {
                say!(
                    out,
                    "  consumer {}: prefetch {}, {} ack{}",
                    consumer.tag,
                    consumer
                        .prefetch
                        .map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    consumer.ack_mode,
                    consumer
                        .channel
                        .as_deref()
                        .map(|c| format!(", channel {c}"))
                        .unwrap_or_default()
                )?;
            }
        }
        if let Some(rates) = &queue.rates
            && (rates.ack > 0.0 || rates.messages != 0.0)
        {
            say!(
                out,
                "  rates/s: in {:.1}, out {:.1}, ack {:.1}, backlog {:+.1}",
                rates.publish,
                rates.deliver,
                rates.ack,
                rates.messages
            )?;
        }
    }
    if !report.notes.is_empty() {
        say!(out)?;
        for note in &report.notes {
            say!(out, "note: {note}")?;
        }
    }
    if !report.errors.is_empty() || !report.warnings.is_empty() {
        say!(out)?;
    }
    for error in &report.errors {
        say!(out, "error: {error}")?;
    }
    for warning in &report.warnings {
        say!(out, "warning: {}: {}", warning.queue, warning.message)?;
    }
    say!(out)?;
    let verdict = match report.health {
        Health::Healthy => "healthy".to_owned(),
        Health::Warnings => format!(
            "{} warning{}",
            report.warnings.len(),
            if report.warnings.len() == 1 { "" } else { "s" }
        ),
        Health::Error => format!(
            "{} error{}",
            report.errors.len(),
            if report.errors.len() == 1 { "" } else { "s" }
        ),
    };
    say!(out, "status: {verdict} (exit {})", report.exit_code)
}

fn describe_map(map: &BTreeMap<String, Value>) -> String {
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

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

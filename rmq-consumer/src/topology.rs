//! What the engine relies on ([`needs`]): a durable direct exchange; per handler the work
//! queue bound to the exchange under its own name, the response queue bound to the reply key,
//! the dead-letter queue and one TTL delay queue per retry delay. Declared
//! ([`declare_handler`]), or with `declare = false` checked to exist ([`check`]).

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use crate::{
    amqp::{long, short},
    config::{PublishVia, QueueType},
    error::{Error, MissingObject, TopologyError, is_not_found, is_precondition_failed},
    settings::Settings,
};
use tracing::warn;

/// Declares the durable direct exchange on a channel of its own.
pub(crate) async fn declare_exchange(
    connection: &Connection,
    exchange: &str,
) -> Result<(), TopologyError> {
    let mut declarer = Declarer {
        connection,
        channel: None,
    };
    declare_exchange_on(declarer.channel().await?, exchange).await?;
    declarer.close().await;
    Ok(())
}

async fn declare_exchange_on(channel: &Channel, exchange: &str) -> Result<(), TopologyError> {
    channel
        .exchange_declare(
            short(exchange),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError {
            what: "declare exchange",
            name: exchange.to_owned(),
            source,
        })
}

/// One object a handler relies on.
#[derive(Debug, Clone)]
pub(crate) enum Need {
    /// The durable direct exchange.
    Exchange(String),
    /// A durable queue, declared with `wanted` (or kept as one of the `legacy` argument sets
    /// of earlier versions).
    Queue {
        name: String,
        wanted: FieldTable,
        legacy: Vec<FieldTable>,
    },
    /// `queue` bound to `exchange` under `key`. A passive declare cannot check a binding.
    Binding {
        queue: String,
        exchange: String,
        key: String,
    },
}

/// Every object one handler needs, in declaration order: the one list both declaring
/// ([`declare_handler`]) and checking ([`check`]) go through.
///
/// The exchange; the work queue and its suspect queue; the work queue bound under its own
/// name; the dead-letter queue; one TTL delay queue per retry delay; the reply queue, bound
/// to the reply key. With `publish_via = "exchange"` the suspect, dead-letter and delay
/// queues are bound to the exchange under their own names too (see [`copy_route`]).
pub(crate) fn needs(exchange: &str, settings: &Settings) -> Vec<Need> {
    let via_exchange = settings.publish_via == PublishVia::Exchange;
    let kind = settings.queue_type;
    let queue = |name: &str, wanted: FieldTable, legacy: Vec<FieldTable>| Need::Queue {
        name: name.to_owned(),
        wanted,
        legacy,
    };
    let binding = |queue: &str, key: &str| Need::Binding {
        queue: queue.to_owned(),
        exchange: exchange.to_owned(),
        key: key.to_owned(),
    };
    let mut needs = vec![Need::Exchange(exchange.to_owned())];
    let work = work_queue_arguments(settings);
    let suspect = settings.suspect_queue();
    needs.push(queue(&settings.queue, work.wanted.clone(), work.legacy));
    needs.push(queue(&suspect, work.wanted, Vec::new()));
    needs.push(binding(&settings.queue, &settings.queue));
    if via_exchange {
        needs.push(binding(&suspect, &suspect));
    }
    if let Some(dlq) = &settings.dead_letter_queue {
        needs.push(queue(dlq, queue_type(kind), Vec::new()));
        if via_exchange {
            needs.push(binding(dlq, dlq));
        }
    }
    for delay in &settings.retry_delays {
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        // Earlier versions declared the handler's queue type; a deployment that changed
        // `queue_type` since may have either.
        let legacy = [kind, other_type(kind)].map(|kind| {
            let mut legacy = queue_type(kind);
            legacy.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            legacy.insert("x-dead-letter-exchange".into(), long(""));
            legacy.insert("x-dead-letter-routing-key".into(), long(&settings.queue));
            legacy
        });
        // Quorum whatever the work queue's type: only a quorum queue dead-letters at least
        // once (an expired copy stays here until the work queue confirms it), and that needs
        // `reject-publish`.
        let mut wanted = queue_type(QueueType::Quorum);
        wanted.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        wanted.insert("x-dead-letter-exchange".into(), long(""));
        wanted.insert("x-dead-letter-routing-key".into(), long(&settings.queue));
        wanted.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        wanted.insert("x-overflow".into(), long("reject-publish"));
        let name = settings.delay_queue(*delay);
        needs.push(queue(&name, wanted, legacy.to_vec()));
        if via_exchange {
            needs.push(binding(&name, &name));
        }
    }
    if let Some(reply_queue) = &settings.reply_queue {
        needs.push(queue(reply_queue, queue_type(kind), Vec::new()));
        if let (true, Some(reply_key)) = (settings.bind_reply_queue, &settings.reply_key) {
            needs.push(binding(reply_queue, reply_key));
        }
    }
    needs
}

/// Where a copy for one of the handler's own queues (a retry, delay, dead-letter or suspect
/// copy) is published: `(exchange, routing key)`. The default exchange, or with
/// `publish_via = "exchange"` the handler's exchange, where `queue` is bound under its own
/// name ([`needs`]).
pub(crate) fn copy_route<'a>(
    exchange: &'a str,
    settings: &Settings,
    queue: &'a str,
) -> (&'a str, &'a str) {
    match settings.publish_via {
        PublishVia::DefaultExchange => ("", queue),
        PublishVia::Exchange => (exchange, queue),
    }
}

/// Declares one handler's exchange, queues and bindings ([`needs`]), on channels of its own
/// (a refused declare closes its channel).
///
/// A queue that already exists without the arguments this version adds (the dead-letter route
/// and delivery limit of quorum work queues, at-least-once delay queues) is used as it is,
/// with a warning naming the policy that gives it the missing ones: a deployment upgrades
/// without deleting queues that may hold messages. Any other difference stops the engine.
pub(crate) async fn declare_handler(
    connection: &Connection,
    exchange: &str,
    settings: &Settings,
) -> Result<(), TopologyError> {
    let mut declarer = Declarer {
        connection,
        channel: None,
    };
    for need in needs(exchange, settings) {
        match need {
            Need::Exchange(name) => declare_exchange_on(declarer.channel().await?, &name).await?,
            Need::Queue {
                name,
                wanted,
                legacy,
            } => declarer.queue(&name, wanted, &legacy).await?,
            Need::Binding {
                queue,
                exchange,
                key,
            } => bind(declarer.channel().await?, &queue, &exchange, &key).await?,
        }
    }
    declarer.close().await;
    Ok(())
}

/// Checks with passive declares that every exchange and queue the handlers need exists
/// (`declare = false`); bindings cannot be checked this way. A 404 closes its channel, so
/// each check after one runs on a fresh channel.
///
/// # Errors
/// [`Error::MissingTopology`] naming every missing object; [`Error::Topology`] when the
/// broker answered otherwise (a refusal, or the connection failed).
pub(crate) async fn check(
    connection: &Connection,
    exchange: &str,
    handlers: &[&Settings],
) -> Result<(), Error> {
    let mut declarer = Declarer {
        connection,
        channel: None,
    };
    let mut missing = Vec::new();
    for settings in handlers {
        for need in needs(exchange, settings) {
            let (what, name) = match need {
                Need::Exchange(name) => ("exchange", name),
                Need::Queue { name, .. } => ("queue", name),
                Need::Binding { .. } => continue,
            };
            let object = MissingObject {
                what,
                name,
                handler: settings.name.clone(),
            };
            if missing.contains(&object) {
                continue;
            }
            let channel = declarer.channel().await?;
            let found = match what {
                "exchange" => passive_exchange(channel, &object.name).await,
                _ => passive_queue(channel, &object.name)
                    .await
                    .map(|queue| queue.is_some()),
            };
            match found {
                Ok(true) => {}
                Ok(false) => missing.push(object),
                Err(source) => {
                    return Err(TopologyError {
                        what: if what == "exchange" {
                            "check exchange"
                        } else {
                            "check queue"
                        },
                        name: object.name,
                        source,
                    }
                    .into());
                }
            }
        }
    }
    declarer.close().await;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingTopology(missing))
    }
}

/// The arguments a work queue (and its suspect queue) is declared with, and the ones an
/// earlier version declared it with.
struct WorkQueueArguments {
    wanted: FieldTable,
    /// None when nothing changed for this queue type.
    legacy: Vec<FieldTable>,
}

/// A quorum work queue dead-letters what the broker gives up on (`x-delivery-limit`, 20 by
/// default on RabbitMQ 4; without a dead-letter route the message would be dropped) into the
/// handler's dead-letter queue. Classic queues have no delivery limit: unchanged.
fn work_queue_arguments(settings: &Settings) -> WorkQueueArguments {
    if settings.queue_type != QueueType::Quorum {
        return WorkQueueArguments {
            wanted: FieldTable::default(),
            legacy: Vec::new(),
        };
    }
    let legacy = queue_type(QueueType::Quorum);
    let mut wanted = legacy.clone();
    wanted.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(settings.delivery_limit.into()),
    );
    if let Some(dlq) = &settings.dead_letter_queue {
        wanted.insert("x-dead-letter-exchange".into(), long(""));
        wanted.insert("x-dead-letter-routing-key".into(), long(dlq));
    }
    WorkQueueArguments {
        wanted,
        legacy: vec![legacy],
    }
}

fn other_type(kind: QueueType) -> QueueType {
    match kind {
        QueueType::Classic => QueueType::Quorum,
        QueueType::Quorum => QueueType::Classic,
    }
}

/// `x-queue-type` for quorum queues; nothing (the broker's default) for classic ones.
fn queue_type(kind: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if kind == QueueType::Quorum {
        args.insert("x-queue-type".into(), long("quorum"));
    }
    args
}

/// Declares on a channel it replaces when the broker closes it.
struct Declarer<'a> {
    connection: &'a Connection,
    channel: Option<Channel>,
}

impl Declarer<'_> {
    async fn channel(&mut self) -> Result<&Channel, TopologyError> {
        let channel = match self.channel.take() {
            Some(channel) if channel.status().connected() => channel,
            _ => self
                .connection
                .create_channel()
                .await
                .map_err(|source| TopologyError {
                    what: "open a channel for",
                    name: "the topology".to_owned(),
                    source,
                })?,
        };
        Ok(self.channel.insert(channel))
    }

    /// Declares `name` with `wanted`; when the queue exists with one of the `legacy`
    /// argument sets instead (refused with PRECONDITION_FAILED, and that set is accepted),
    /// keeps it as it is and says how to migrate.
    async fn queue(
        &mut self,
        name: &str,
        wanted: FieldTable,
        legacy: &[FieldTable],
    ) -> Result<(), TopologyError> {
        let wanted_text = describe_table(&wanted);
        let first = declare_queue(self.channel().await?, name, wanted).await;
        let error = match first {
            Err(error) if is_precondition_failed(&error.source) => error,
            other => return other,
        };
        for earlier in legacy {
            if declare_queue(self.channel().await?, name, earlier.clone())
                .await
                .is_ok()
            {
                warn!(queue = %name, wanted = %wanted_text, existing = %describe_table(earlier),
                    "the queue exists with the arguments of an earlier version; using it as it is. Give it the missing ones with a policy (policies apply without redeclaring; queue arguments cannot change), see the README's delivery semantics");
                return Ok(());
            }
        }
        // Neither this version's arguments nor an earlier one's: report the first refusal,
        // which names the argument that differs.
        Err(error)
    }

    async fn close(self) {
        if let Some(channel) = self.channel
            && channel.status().connected()
        {
            let _ = channel.close(200, "topology declared".into()).await;
        }
    }
}

fn describe_table(table: &FieldTable) -> String {
    table
        .inner()
        .iter()
        .map(|(key, value)| format!("{key} = {}", describe(value)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(text) => format!("\"{text}\""),
        AMQPValue::ShortString(text) => format!("\"{}\"", text.as_str()),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
) -> Result<(), TopologyError> {
    channel
        .queue_declare(short(name), QueueDeclareOptions::durable(), args)
        .await
        .map(drop)
        .map_err(|source| TopologyError {
            what: "declare queue",
            name: name.to_owned(),
            source,
        })
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), TopologyError> {
    channel
        .queue_bind(
            short(queue),
            short(exchange),
            short(routing_key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError {
            what: "bind",
            name: format!("{exchange} -> {queue} ({routing_key})"),
            source,
        })
}

/// Whether queue `name` exists, by a passive declare on `channel`: its counts when it does,
/// `None` when the broker answered 404 (which closes `channel`). The one passive queue probe
/// of the crate: [`check`], the watchdog and the CLI use it.
///
/// # Errors
/// Any other failure of the declare.
pub(crate) async fn passive_queue(
    channel: &Channel,
    name: &str,
) -> Result<Option<lapin::Queue>, lapin::Error> {
    let declared = channel
        .queue_declare(
            short(name),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(queue) => Ok(Some(queue)),
        Err(error) if is_not_found(&error) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Whether exchange `name` exists, by a passive declare on `channel` (a 404 closes
/// `channel`). The one passive exchange probe of the crate: [`check`] and the CLI use it.
///
/// # Errors
/// Any other failure of the declare.
pub(crate) async fn passive_exchange(channel: &Channel, name: &str) -> Result<bool, lapin::Error> {
    let declared = channel
        .exchange_declare(
            short(name),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => Ok(true),
        Err(error) if is_not_found(&error) => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        config::Config,
        handler::HandlerError,
        registry::{HandlerSpec, Prepared},
        settings,
    };

    fn never(_: &[u8]) -> Result<Prepared, HandlerError> {
        Err(HandlerError::dead_letter("not called"))
    }

    static SPEC: HandlerSpec = HandlerSpec {
        name: "h",
        queue: "q",
        reply_key: Some("q.result"),
        reply_queue: Some("q.results"),
        prefetch: None,
        timeout_secs: None,
        max_retries: None,
        queue_type: None,
        blocking: false,
        module_path: "tests",
        file: "topology.rs",
        line: 1,
        prepare: never,
        batch: None,
    };

    fn settings_with(publish_via: PublishVia) -> Settings {
        let config = Config {
            retry_delays: vec![Duration::from_secs(5)],
            publish_via,
            ..Config::default()
        };
        settings::resolve(&config, &[&SPEC]).unwrap().remove(0)
    }

    /// `what name` or `binding queue <- key` for each need, in order.
    fn describe_needs(settings: &Settings) -> Vec<String> {
        needs("ex", settings)
            .into_iter()
            .map(|need| match need {
                Need::Exchange(name) => format!("exchange {name}"),
                Need::Queue { name, .. } => format!("queue {name}"),
                Need::Binding {
                    queue,
                    exchange,
                    key,
                } => format!("binding {queue} <- {exchange} {key}"),
            })
            .collect()
    }

    #[test]
    fn needs_in_the_default_mode() {
        assert_eq!(
            describe_needs(&settings_with(PublishVia::DefaultExchange)),
            [
                "exchange ex",
                "queue q",
                "queue q.suspect",
                "binding q <- ex q",
                "queue q.dlq",
                "queue q.retry.5s",
                "queue q.results",
                "binding q.results <- ex q.result",
            ]
        );
    }

    #[test]
    fn needs_bind_the_copies_queues_when_copies_go_through_the_exchange() {
        assert_eq!(
            describe_needs(&settings_with(PublishVia::Exchange)),
            [
                "exchange ex",
                "queue q",
                "queue q.suspect",
                "binding q <- ex q",
                "binding q.suspect <- ex q.suspect",
                "queue q.dlq",
                "binding q.dlq <- ex q.dlq",
                "queue q.retry.5s",
                "binding q.retry.5s <- ex q.retry.5s",
                "queue q.results",
                "binding q.results <- ex q.result",
            ]
        );
    }

    #[test]
    fn copies_route_by_the_queue_name_through_the_chosen_exchange() {
        let default = settings_with(PublishVia::DefaultExchange);
        assert_eq!(copy_route("ex", &default, "q.dlq"), ("", "q.dlq"));
        let exchange = settings_with(PublishVia::Exchange);
        assert_eq!(copy_route("ex", &exchange, "q.dlq"), ("ex", "q.dlq"));
    }

    #[test]
    fn a_missing_object_names_itself_and_the_permission() {
        let error = Error::MissingTopology(vec![
            MissingObject {
                what: "queue",
                name: "q.dlq".to_owned(),
                handler: "h".to_owned(),
            },
            MissingObject {
                what: "exchange",
                name: "ex".to_owned(),
                handler: "h".to_owned(),
            },
        ]);
        let text = error.to_string();
        assert!(
            text.contains("queue `q.dlq` (handler `h`) is missing: needs configure permission on `q.dlq` or create it"),
            "{text}"
        );
        assert!(
            text.contains("exchange `ex` (handler `h`) is missing: needs configure permission on `ex` or create it"),
            "{text}"
        );
    }
}

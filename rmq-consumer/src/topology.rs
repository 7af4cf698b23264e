//! Declares what the engine relies on: a durable direct exchange; per handler the work queue
//! bound to the exchange under its own name, the response queue bound to the reply key, the
//! dead-letter queue and one TTL delay queue per retry delay.

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use crate::{
    amqp::{long, short},
    config::QueueType,
    engine::settings::Settings,
    error::TopologyError,
};

/// Declares the durable direct exchange.
pub(crate) async fn declare_exchange(
    channel: &Channel,
    exchange: &str,
) -> Result<(), TopologyError> {
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
            what: "exchange",
            name: exchange.to_owned(),
            source,
        })
}

/// Declares one handler's queues and bindings.
pub(crate) async fn declare_handler(
    channel: &Channel,
    exchange: &str,
    settings: &Settings,
) -> Result<(), TopologyError> {
    let kind = settings.queue_type;
    declare_queue(channel, &settings.queue, kind, FieldTable::default()).await?;
    bind(channel, &settings.queue, exchange, &settings.queue).await?;
    if let Some(dlq) = &settings.dead_letter_queue {
        declare_queue(channel, dlq, kind, FieldTable::default()).await?;
    }
    for delay in &settings.retry_delays {
        let mut args = FieldTable::default();
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&settings.queue));
        declare_queue(channel, &settings.delay_queue(*delay), kind, args).await?;
    }
    if let Some(reply_queue) = &settings.reply_queue {
        declare_queue(channel, reply_queue, kind, FieldTable::default()).await?;
        if let (true, Some(reply_key)) = (settings.bind_reply_queue, &settings.reply_key) {
            bind(channel, reply_queue, exchange, reply_key).await?;
        }
    }
    Ok(())
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    kind: QueueType,
    mut args: FieldTable,
) -> Result<(), TopologyError> {
    if kind == QueueType::Quorum {
        args.insert("x-queue-type".into(), long("quorum"));
    }
    channel
        .queue_declare(short(name), QueueDeclareOptions::durable(), args)
        .await
        .map(drop)
        .map_err(|source| TopologyError {
            what: "queue",
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
            what: "binding",
            name: format!("{exchange} -> {queue} ({routing_key})"),
            source,
        })
}

//! The README's first command: starts two handlers against the local broker, publishes 100
//! sample tasks with confirms, waits for their 100 results, prints a summary and exits 0.
//!
//! Run it with `cargo run -p examples --example demo` (broker: `$RMQ_CONSUMER_URL` or
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        ExchangeDeleteOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use rmq_consumer::{Config, Engine, HandlerError, config::ConsumerConfig, consumer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const TASKS: usize = 100;

/// A model-inference style task.
#[derive(Debug, Deserialize)]
struct Prompt {
    task_id: usize,
    prompt: String,
}

#[derive(Debug, Serialize)]
struct Completion {
    task_id: usize,
    completion: String,
    tokens: usize,
}

fn prompt_uuid(task: &Prompt) -> String {
    format!("prompt-{}", task.task_id)
}

#[consumer(
    queue = "demo.b2m",
    reply_key = "demo.m2b",
    reply_queue = "demo.m2b.queue",
    uuid = "prompt_uuid"
)]
async fn complete(task: Prompt) -> Result<Completion, HandlerError> {
    tokio::time::sleep(Duration::from_millis(5)).await; // pretend to think
    Ok(Completion {
        task_id: task.task_id,
        tokens: task.prompt.split_whitespace().count(),
        completion: task.prompt.chars().rev().collect(),
    })
}

#[consumer(
    queue = "demo.echo.b2m",
    reply_key = "demo.echo.m2b",
    reply_queue = "demo.echo.m2b.queue"
)]
async fn echo(data: Value) -> Value {
    json!({"code": 200, "message": "success", "data": data})
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut config = Config::load()?;
    config.log.level =
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,rmq_consumer=info".to_owned());
    let _logs = rmq_consumer::logging::init(&config.log)?;
    // A fresh set of names per run, so a demo never reads an earlier run's leftovers.
    let run_id = std::process::id();
    config.exchange = format!("rmq-consumer.demo.{run_id}");
    config.enable_result_cache = true;
    config.prefetch_count = 16;
    let mut queues = Vec::new();
    for (name, base) in [("complete", "demo.prompt"), ("echo", "demo.echo")] {
        let queue = format!("{base}.{run_id}");
        queues.extend([
            queue.clone(),
            format!("{queue}.results"),
            format!("{queue}.dlq"),
        ]);
        config.consumers.insert(
            name.to_owned(),
            ConsumerConfig {
                queue: Some(queue.clone()),
                reply_key: Some(format!("{queue}.done")),
                reply_queue: Some(format!("{queue}.results")),
                ..ConsumerConfig::default()
            },
        );
    }
    let url = config.urls[0].clone();
    let exchange = config.exchange.clone();

    let engine = Engine::builder(config).build()?;
    let stop = engine.shutdown_token();
    let health = engine.health();
    let worker = tokio::spawn(engine.run());

    let connection = Connection::connect(url.expose(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    while !health.snapshot().handlers.iter().all(|h| h.consuming) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "engine up: {} handlers consuming ({url})",
        health.snapshot().handlers.len()
    );

    let mut confirms = Vec::with_capacity(TASKS);
    for i in 0..TASKS {
        let (queue, body) = if i % 2 == 0 {
            (
                &queues[0],
                json!({"task_id": i, "prompt": format!("summarize document number {i}")}),
            )
        } else {
            (
                &queues[3],
                json!({"task_id": i, "text": format!("hello {i}")}),
            )
        };
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &serde_json::to_vec(&body)?,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await?;
        confirms.push(confirm);
    }
    let mut confirmed = 0;
    for confirm in confirms {
        if matches!(confirm.await?, lapin::Confirmation::Ack(None)) {
            confirmed += 1;
        }
    }
    println!("published {TASKS} tasks, {confirmed} confirmed by the broker");

    let mut ids = BTreeSet::new();
    for results in [&queues[1], &queues[4]] {
        let mut consumer = channel
            .basic_consume(
                results.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let want = TASKS / 2;
        let mut got = 0;
        while got < want {
            let next = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await;
            let Ok(Some(Ok(delivery))) = next else { break };
            delivery.acker.ack(BasicAckOptions::default()).await?;
            let value: Value = serde_json::from_slice(&delivery.data)?;
            let id = value
                .get("task_id")
                .or_else(|| value.pointer("/data/task_id"))
                .and_then(Value::as_u64);
            ids.extend(id);
            got += 1;
        }
        channel
            .basic_cancel(
                consumer.tag(),
                lapin::options::BasicCancelOptions::default(),
            )
            .await?;
    }

    stop.cancel();
    worker.await??;
    let snapshot = health.snapshot();
    for queue in &queues {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    connection.close(200, "demo done".into()).await?;

    println!();
    println!(
        "{:<10} {:>9} {:>9} {:>8} {:>13}",
        "handler", "received", "succeeded", "retried", "dead-lettered"
    );
    for h in &snapshot.handlers {
        println!(
            "{:<10} {:>9} {:>9} {:>8} {:>13}",
            h.name, h.received, h.succeeded, h.retried, h.dead_lettered
        );
    }
    println!();
    println!(
        "results received: {} of {TASKS} (distinct task ids: {}) in {:.2?}",
        ids.len(),
        ids.len(),
        started.elapsed()
    );
    if ids.len() == TASKS {
        println!("demo OK");
        Ok(())
    } else {
        Err(format!("only {} of {TASKS} results arrived", ids.len()).into())
    }
}

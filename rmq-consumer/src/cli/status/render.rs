//! The human-readable report.

use std::{collections::BTreeMap, io::Write};

use serde_json::Value;

use super::super::output::say;
use super::super::thousands;

use super::*;

pub(super) fn count(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), thousands)
}

pub(super) fn render(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
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

pub(super) fn describe_map(map: &BTreeMap<String, Value>) -> String {
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

//! Warnings and the overall health from a report (pure).

use std::collections::HashMap;

use super::super::{EXIT_ERROR, EXIT_FAILURE, EXIT_OK, thousands};

use super::*;

/// Adds warnings and errors and sets the verdict.
pub(super) fn judge(report: &mut Report, previous: &HashMap<String, u64>) {
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

//! Prometheus metrics, read from the engine's live counters at scrape time.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::health::{COUNTERS, HandlerStats, Health};

type Read = fn(&HandlerStats) -> u64;

const GAUGES: &[(&str, &str, Read)] = &[
    (
        "rmq_consumer_in_flight",
        "Deliveries being processed.",
        |h| u64::try_from(h.in_flight.load(Relaxed)).unwrap_or(u64::MAX),
    ),
    (
        "rmq_consumer_queue_depth",
        "Ready messages in the queue at the last watchdog probe.",
        |h| h.queue_depth.load(Relaxed),
    ),
    (
        "rmq_consumer_consumer_up",
        "1 while the handler's consumer is subscribed.",
        |h| u64::from(h.consuming.load(Relaxed)),
    ),
    (
        "rmq_consumer_stuck",
        "1 while the watchdog considers the consumer stuck.",
        |h| u64::from(h.stuck.load(Relaxed)),
    ),
];

#[derive(Debug)]
struct EngineCollector(Arc<Health>);

fn gauge(value: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let health = &self.0;
        for (family, table) in [(MetricType::Counter, COUNTERS), (MetricType::Gauge, GAUGES)] {
            for (name, help, read) in table {
                let mut metric = encoder.encode_descriptor(name, help, None, family)?;
                for handler in &health.handlers {
                    let labels = [
                        ("handler", handler.name.as_str()),
                        ("queue", handler.queue.as_str()),
                    ];
                    let value = read(handler);
                    let encoder = metric.encode_family(&labels)?;
                    match family {
                        MetricType::Counter => ConstCounter::new(value).encode(encoder)?,
                        _ => gauge(value).encode(encoder)?,
                    }
                }
            }
        }
        for &(name, help, pick) in crate::health::HISTOGRAMS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for handler in &health.handlers {
                let labels = [
                    ("handler", handler.name.as_str()),
                    ("queue", handler.queue.as_str()),
                ];
                pick(handler).encode(metric.encode_family(&labels)?)?;
            }
        }
        if let Some(store) = health.store.get() {
            store.encode(&mut encoder)?;
        }
        let snapshot = health.snapshot();
        let engine_gauges = [
            (
                "rmq_consumer_connected",
                "1 while a broker connection is up.",
                u64::from(snapshot.connected),
            ),
            (
                "rmq_consumer_blocked",
                "1 while the broker blocks this connection.",
                u64::from(snapshot.blocked),
            ),
            (
                "rmq_consumer_draining",
                "1 while shutting down.",
                u64::from(snapshot.draining),
            ),
        ];
        for (name, help, value) in engine_gauges {
            gauge(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        ConstCounter::new(snapshot.reconnects).encode(encoder.encode_descriptor(
            "rmq_consumer_reconnects",
            "Connections re-established after a loss.",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(snapshot.blocked_for.as_secs_f64()).encode(
            encoder.encode_descriptor(
                "rmq_consumer_blocked_seconds",
                "Time the broker blocked this connection.",
                None,
                MetricType::Counter,
            )?,
        )?;
        Ok(())
    }
}

/// Renders every metric in the Prometheus text format.
pub(crate) fn render(health: &Arc<Health>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(EngineCollector(Arc::clone(health))));
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        text.clear();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_per_handler() {
        let health = Arc::new(Health::new([("echo".to_owned(), "q.echo".to_owned())]));
        health.handlers[0].received.fetch_add(3, Relaxed);
        health.handlers[0].handler_duration.observe(0.02);
        let text = render(&health);
        assert!(
            text.contains(
                r#"rmq_consumer_deliveries_received_total{handler="echo",queue="q.echo"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"rmq_consumer_in_flight{handler="echo",queue="q.echo"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(
                "rmq_consumer_handler_duration_seconds_count{handler=\"echo\",queue=\"q.echo\"} 1"
            ),
            "{text}"
        );
        health.handlers[0].batch_size.observe(8.0);
        health.handlers[0].batches.fetch_add(1, Relaxed);
        let text = render(&health);
        for line in [
            r#"rmq_consumer_batch_size_count{handler="echo",queue="q.echo"} 1"#,
            r#"rmq_consumer_batch_size_bucket{le="8.0",handler="echo",queue="q.echo"} 1"#,
            r#"rmq_consumer_batch_wait_seconds_count{handler="echo",queue="q.echo"} 0"#,
            r#"rmq_consumer_batches_total{handler="echo",queue="q.echo"} 1"#,
            r#"rmq_consumer_batch_items_total{handler="echo",queue="q.echo"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(text.contains("rmq_consumer_connected 0"), "{text}");
        assert!(text.contains("rmq_consumer_reconnects_total 0"), "{text}");
    }
}

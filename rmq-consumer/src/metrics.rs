//! Prometheus metrics, read from the engine's live counters at scrape time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::health::{COUNTERS, ENGINE_GAUGES, GAUGES, HISTOGRAMS, Health, STORE_COUNTERS};

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
        for &(name, help, pick) in HISTOGRAMS {
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
            for (name, help, read) in STORE_COUNTERS {
                let mut metric =
                    encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for handler in health.handlers.iter().filter(|h| store.serves(&h.name)) {
                    let labels = [
                        ("handler", handler.name.as_str()),
                        ("queue", handler.queue.as_str()),
                    ];
                    ConstCounter::new(read(handler)).encode(metric.encode_family(&labels)?)?;
                }
            }
            gauge(u64::from(store.is_up())).encode(encoder.encode_descriptor(
                "rmq_consumer_store_up",
                "1 while the shared result store answers (0 during an outage episode).",
                None,
                MetricType::Gauge,
            )?)?;
        }
        let snapshot = health.snapshot();
        for (name, help, read) in ENGINE_GAUGES {
            gauge(read(&snapshot)).encode(encoder.encode_descriptor(
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
        health.handlers[0].add(crate::health::Counter::Received, 3);
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
        health.handlers[0].count(crate::health::Counter::Batches);
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

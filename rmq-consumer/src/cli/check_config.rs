//! `rmq-consumer check-config`: validates the configuration (and, in a binary with handlers,
//! how the handlers resolve against it) and prints the effective values with passwords
//! masked.

use std::{io::Write, time::Duration};

use serde_json::{Map, Value, json};

use super::{CliError, EXIT_FAILURE, EXIT_OK, Global, Io, chain, load_config};
use crate::{
    config::{
        CONFIG_PATH_ENV, Config, ConsumerConfig, DEFAULT_CONFIG_FILE, ENV_PREFIX, PublishVia,
        QueueType, SecretUrl,
    },
    registry, settings,
};

/// Validate the configuration and print it with passwords masked.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(global: &Global, args: &Args, io: &mut Io<'_>) -> Result<i32, CliError> {
    let origin = origin(global);
    let config = match load_config(global) {
        Ok(config) => config,
        Err(error) => {
            writeln!(io.out, "configuration from {origin}: INVALID")?;
            writeln!(io.err, "error: {}", chain(&error))?;
            return Ok(EXIT_FAILURE);
        }
    };
    let specs = registry::handlers();
    let resolved = if specs.is_empty() {
        Ok(Vec::new())
    } else {
        settings::resolve(&config, &specs)
    };
    let mut view = view(&config);
    if let Ok(all) = &resolved
        && !all.is_empty()
    {
        let mut handlers = Table::default();
        for s in all {
            let mut h = Table::default();
            h.put("queue", json!(s.queue));
            h.put("reply_key", json!(s.reply_key));
            h.put("reply_queue", json!(s.reply_queue));
            h.put("dead_letter_queue", json!(s.dead_letter_queue));
            h.put(
                "retry_queues",
                json!(
                    s.retry_delays
                        .iter()
                        .map(|d| s.delay_queue(*d))
                        .collect::<Vec<_>>()
                ),
            );
            h.put("prefetch", json!(s.prefetch));
            h.put("basic_qos", json!(s.qos));
            h.put("concurrency", json!(s.concurrency));
            h.put("timeout", json!(duration(s.timeout)));
            h.put("max_retries", json!(s.max_retries));
            h.put("max_redeliveries", json!(s.max_redeliveries));
            h.put("delivery_limit", json!(s.delivery_limit));
            h.put("max_in_flight_bytes", json!(s.max_in_flight_bytes));
            h.put("queue_type", json!(s.queue_type.as_str()));
            h.put("reply_to", reply_to(&s.reply_to));
            h.put("bind_reply_queue", json!(s.bind_reply_queue));
            h.put("declare", json!(s.declare));
            h.put("publish_via", json!(s.publish_via.as_str()));
            h.put("blocking", json!(s.blocking));
            if let Some(batch) = &s.batch {
                h.put("batch", json!(batch.size));
                h.put("batch_wait", json!(duration(batch.wait)));
            }
            h.put("location", json!(s.location));
            handlers.put_table(&s.name, h);
        }
        view.put_table("handlers", handlers);
    }
    if args.json {
        let document = json!({
            "origin": origin,
            "valid": resolved.is_ok(),
            "error": resolved.as_ref().err().map(|e| chain(e)),
            "config": view.to_json(),
        });
        serde_json::to_writer_pretty(&mut *io.out, &document)?;
        writeln!(io.out)?;
    } else {
        writeln!(io.out, "# configuration from {origin}; passwords masked")?;
        view.write_toml(io.out, "")?;
    }
    match resolved {
        Ok(_) => {
            if !args.json {
                writeln!(io.out, "\n# valid")?;
            }
            Ok(EXIT_OK)
        }
        Err(error) => {
            writeln!(
                io.err,
                "error: the handlers do not fit the configuration: {}",
                chain(&error)
            )?;
            Ok(EXIT_FAILURE)
        }
    }
}

/// Where the configuration comes from, for the header line.
fn origin(global: &Global) -> String {
    let file = match (&global.config, std::env::var_os(CONFIG_PATH_ENV)) {
        (Some(path), _) => format!("{} (--config)", path.display()),
        (None, Some(path)) => format!(
            "{} (${CONFIG_PATH_ENV})",
            std::path::Path::new(&path).display()
        ),
        (None, None) if std::path::Path::new(DEFAULT_CONFIG_FILE).exists() => {
            format!("./{DEFAULT_CONFIG_FILE}")
        }
        (None, None) => "defaults (no config file)".to_owned(),
    };
    let mut vars: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with(ENV_PREFIX) && name != CONFIG_PATH_ENV)
        .collect();
    vars.sort();
    let mut parts = vec![file];
    if !vars.is_empty() {
        parts.push(format!("environment {}", vars.join(", ")));
    }
    let mut flags = Vec::new();
    if !global.urls.is_empty() {
        flags.push("--url");
    }
    if global.management_url.is_some() {
        flags.push("--management-url");
    }
    if global.password_file.is_some() {
        flags.push("--password-file");
    }
    if !flags.is_empty() {
        parts.push(flags.join(", "));
    }
    parts.join(" + ")
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// An ordered list of keys: printed as TOML-like text in this order, or as a JSON object.
#[derive(Debug, Default)]
struct Table(Vec<(String, Node)>);

#[derive(Debug)]
enum Node {
    Value(Value),
    Table(Table),
}

impl Table {
    fn put(&mut self, key: &str, value: Value) {
        self.0.push((key.to_owned(), Node::Value(value)));
    }

    /// Like [`Table::put`], leaving out unset (`null`) values.
    fn put_set(&mut self, key: &str, value: Value) {
        if !value.is_null() {
            self.put(key, value);
        }
    }

    fn put_table(&mut self, key: &str, table: Table) {
        self.0.push((key.to_owned(), Node::Table(table)));
    }

    fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(key, node)| {
                    let value = match node {
                        Node::Value(value) => value.clone(),
                        Node::Table(table) => table.to_json(),
                    };
                    (key.clone(), value)
                })
                .collect::<Map<String, Value>>(),
        )
    }

    /// Scalars first (unset ones as comments), then each sub-table under its `[path]`.
    fn write_toml(&self, out: &mut dyn Write, path: &str) -> std::io::Result<()> {
        let scalars: Vec<(&String, &Value)> = self
            .0
            .iter()
            .filter_map(|(key, node)| match node {
                Node::Value(value) => Some((key, value)),
                Node::Table(_) => None,
            })
            .collect();
        if !path.is_empty() && !scalars.is_empty() {
            writeln!(out, "\n[{path}]")?;
        }
        for (key, value) in scalars {
            match value {
                Value::Null => writeln!(out, "# {key} = (unset)")?,
                other => writeln!(out, "{key} = {other}")?,
            }
        }
        for (key, node) in &self.0 {
            if let Node::Table(table) = node {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                table.write_toml(out, &path)?;
            }
        }
        Ok(())
    }
}

/// The effective configuration, URLs masked.
fn view(config: &Config) -> Table {
    let mut t = Table::default();
    t.put(
        "url",
        Value::Array(
            config
                .urls
                .iter()
                .map(|u| Value::String(u.masked()))
                .collect(),
        ),
    );
    t.put("password", json!(config.password.as_ref().map(|_| "****")));
    let path = |p: &Option<std::path::PathBuf>| json!(p.as_ref().map(|p| p.display().to_string()));
    t.put("tls_ca_file", path(&config.tls.ca_file));
    t.put("tls_cert_file", path(&config.tls.cert_file));
    t.put("tls_key_file", path(&config.tls.key_file));
    t.put("exchange", json!(config.exchange));
    t.put("queue", json!(config.queue));
    t.put("reply_queue", json!(config.reply_queue));
    t.put("reply_key", json!(config.reply_key));
    t.put(
        "management_url",
        json!(config.management_url.as_ref().map(SecretUrl::masked)),
    );
    t.put("management_allow_http", json!(config.management_allow_http));
    t.put("prefetch_count", json!(config.prefetch_count));
    t.put("concurrency", json!(config.concurrency));
    t.put("read_ahead", json!(config.read_ahead));
    t.put("message_timeout", json!(duration(config.message_timeout)));
    t.put("max_retry_count", json!(config.max_retry_count));
    t.put("max_redeliveries", json!(config.max_redeliveries));
    t.put("delivery_limit", json!(config.delivery_limit));
    t.put(
        "retry_delays",
        json!(
            config
                .retry_delays
                .iter()
                .map(|d| duration(*d))
                .collect::<Vec<_>>()
        ),
    );
    t.put("dead_letter", json!(config.dead_letter));
    t.put("bind_reply_queue", json!(config.bind_reply_queue));
    t.put("declare", json!(config.declare));
    t.put("publish_via", json!(config.publish_via.as_str()));
    t.put("queue_type", json!(config.queue_type.as_str()));
    t.put("reply_to", reply_to(&config.reply_to));
    t.put(
        "retry_connect_interval",
        json!(duration(config.retry_connect_interval)),
    );
    t.put(
        "retry_connect_max",
        json!(duration(config.retry_connect_max)),
    );
    t.put("heartbeat_interval", json!(config.heartbeat_interval));
    t.put(
        "queue_stuck_threshold",
        json!(duration(config.queue_stuck_threshold)),
    );
    t.put(
        "max_consecutive_failures",
        json!(config.max_consecutive_failures),
    );
    t.put("enable_result_cache", json!(config.enable_result_cache));
    t.put("result_cache_size", json!(config.result_cache_size));
    t.put("result_cache_bytes", json!(config.result_cache_bytes));
    t.put("shutdown_timeout", json!(duration(config.shutdown_timeout)));
    t.put("confirm_timeout", json!(duration(config.confirm_timeout)));
    t.put(
        "result_publish_retry",
        json!(duration(config.result_publish_retry)),
    );
    t.put("max_body_size", json!(config.max_body_size));
    t.put("max_in_flight_bytes", json!(config.max_in_flight_bytes));
    t.put("http_addr", json!(config.http_addr.map(|a| a.to_string())));
    let mut log = Table::default();
    log.put("level", json!(config.log.level));
    log.put("format", json!(config.log.format.as_str()));
    log.put(
        "dir",
        json!(config.log.dir.as_ref().map(|d| d.display().to_string())),
    );
    log.put("file_prefix", json!(config.log.file_prefix));
    t.put_table("log", log);
    let mut consumers = Table::default();
    for (name, c) in &config.consumers {
        consumers.put_table(name, consumer_view(c));
    }
    t.put_table("consumers", consumers);
    t
}

fn consumer_view(c: &ConsumerConfig) -> Table {
    let mut t = Table::default();
    t.put_set("queue", json!(c.queue));
    t.put_set("reply_key", json!(c.reply_key));
    t.put_set("reply_queue", json!(c.reply_queue));
    t.put_set("prefetch", json!(c.prefetch));
    t.put_set("concurrency", json!(c.concurrency));
    t.put_set("read_ahead", json!(c.read_ahead));
    t.put_set("timeout", json!(c.timeout.map(duration)));
    t.put_set("max_retries", json!(c.max_retries));
    t.put_set("max_redeliveries", json!(c.max_redeliveries));
    t.put_set("delivery_limit", json!(c.delivery_limit));
    t.put_set("max_in_flight_bytes", json!(c.max_in_flight_bytes));
    t.put_set(
        "retry_delays",
        json!(
            c.retry_delays
                .as_ref()
                .map(|v| v.iter().map(|d| duration(*d)).collect::<Vec<_>>())
        ),
    );
    t.put_set("queue_type", json!(c.queue_type.map(QueueType::as_str)));
    t.put_set(
        "reply_to",
        c.reply_to.as_ref().map_or(Value::Null, reply_to),
    );
    t.put_set("bind_reply_queue", json!(c.bind_reply_queue));
    t.put_set("dead_letter", json!(c.dead_letter));
    t.put_set("dead_letter_queue", json!(c.dead_letter_queue));
    t.put_set("declare", json!(c.declare));
    t.put_set("publish_via", json!(c.publish_via.map(PublishVia::as_str)));
    t.put_set("enabled", json!(c.enabled));
    t.put_set("batch", json!(c.batch));
    t.put_set("batch_wait", json!(c.batch_wait.map(duration)));
    t
}

/// `"honour"`, `"ignore"` or the list of prefixes.
fn reply_to(policy: &crate::config::ReplyToPolicy) -> Value {
    use crate::config::ReplyToPolicy;
    match policy {
        ReplyToPolicy::Prefixes(prefixes) => json!(prefixes),
        ReplyToPolicy::Ignore => json!("ignore"),
        _ => json!("honour"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_masks_passwords() {
        let mut config = Config::from_toml_str(
            r#"
            url = ["amqp://app@a:5672/%2f", "amqp://app@b:5672/%2f"]
            password = "hunter2"
            management_url = "http://ops:hunter3@m:15672"
            [consumers.x]
            queue = "q"
            "#,
        )
        .unwrap();
        config.retry_delays = vec![Duration::from_secs(10)];
        let mut text = Vec::new();
        view(&config).write_toml(&mut text, "").unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(!text.contains("hunter"), "{text}");
        assert!(text.contains("amqp://app:****@a:5672/%2f"), "{text}");
        assert!(text.contains("password = \"****\""), "{text}");
        assert!(text.contains("management_allow_http = false"), "{text}");
        assert!(text.contains("# tls_ca_file = (unset)"), "{text}");
        assert!(text.contains("[consumers.x]\nqueue = \"q\""), "{text}");
        assert!(text.contains("retry_delays = [\"10s\"]"), "{text}");
    }
}

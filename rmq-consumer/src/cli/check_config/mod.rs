//! `rmq-consumer check-config`: validates the configuration (and, in a binary with handlers,
//! how the handlers resolve against it) and prints the effective values with passwords
//! masked.

use std::time::Duration;

use serde_json::json;

use super::{CliError, EXIT_FAILURE, EXIT_OK, Global, Io, chain, load_config};
use crate::{
    config::{CONFIG_PATH_ENV, Config, ConfigFile, ENV_PREFIX},
    registry, settings,
};

mod table;

use table::Table;

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
    let mut view = view(&config)?;
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
            h.put("reply_to", json!(s.reply_to));
            h.put("bind_reply_queue", json!(s.bind_reply_queue));
            h.put("declare", json!(s.declare));
            h.put("publish_via", json!(s.publish_via.as_str()));
            h.put("blocking", json!(s.blocking));
            h.put("cache", json!(config.cache_mode(&s.name).as_str()));
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
    let file = match ConfigFile::find(global.config.as_deref()) {
        ConfigFile::Given(path) => format!("{} (--config)", path.display()),
        ConfigFile::Env(path) => format!("{} (${CONFIG_PATH_ENV})", path.display()),
        ConfigFile::Default(path) => format!("./{}", path.display()),
        ConfigFile::None => "defaults (no config file)".to_owned(),
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

/// The effective configuration as `Config` serializes itself (URLs and the password
/// masked); a `[consumers.<name>]` section shows only the keys it sets.
fn view(config: &Config) -> Result<Table, serde_json::Error> {
    let mut view = Table::of(config)?;
    if let Some(consumers) = view.table_mut("consumers") {
        consumers.tables_mut().for_each(Table::drop_unset);
    }
    Ok(view)
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
        view(&config).unwrap().write_toml(&mut text, "").unwrap();
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

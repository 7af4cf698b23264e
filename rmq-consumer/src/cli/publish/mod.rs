//! `rmq-consumer publish`: JSON messages from a JSON-lines file, stdin or a template, with
//! publisher confirms and `mandatory`, many in flight at once (a confirm window).

use std::{
    io::{BufRead, IsTerminal},
    path::PathBuf,
    time::Duration,
};

use serde::Serialize;

use super::output::{self, say};
use super::{CliError, EXIT_FAILURE, EXIT_OK, Global, Io, close, connect, load_config, thousands};
use crate::amqp::MAX_SHORT;

/// Default number of unconfirmed messages in flight.
pub(crate) const DEFAULT_CONCURRENCY: u32 = 256;
/// How often plain progress lines are printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

mod send;
use send::{Outcome, publish};

/// Publish JSON messages with confirms.
///
/// Messages come from `--count N --template T` (`{i}` is replaced by 0..N-1), from a
/// JSON-lines `--file` (`-` for stdin), or from stdin. Every message is validated as JSON
/// before the first one is sent (templates: each as it is generated).
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["queue", "routing_key"])))]
pub(crate) struct Args {
    /// Publish straight to this queue (via the default exchange).
    #[arg(long, short = 'q', conflicts_with_all = ["exchange", "routing_key"])]
    queue: Option<String>,
    /// Exchange to publish to (default: the configured `exchange`).
    #[arg(long, short = 'e', requires = "routing_key")]
    exchange: Option<String>,
    /// Routing key.
    #[arg(long, short = 'k')]
    routing_key: Option<String>,
    /// A JSON-lines file, one message per line; `-` reads stdin (the default without
    /// `--count`).
    #[arg(long, short = 'f', conflicts_with = "count")]
    file: Option<PathBuf>,
    /// Generate this many messages from `--template`.
    #[arg(long, short = 'n', requires = "template")]
    count: Option<u64>,
    /// JSON template for `--count`; `{i}` is replaced by the message index.
    #[arg(long, short = 't', requires = "count")]
    template: Option<String>,
    /// At most this many messages per second (default: as fast as confirms allow).
    #[arg(long)]
    rate: Option<f64>,
    /// Unconfirmed messages in flight at once (the confirm window).
    #[arg(long, short = 'c', default_value_t = DEFAULT_CONCURRENCY,
          value_parser = clap::value_parser!(u32).range(1..=65_535))]
    concurrency: u32,
    /// Validate and show what would be sent, without connecting.
    #[arg(long)]
    dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The messages to send.
enum Source {
    Template {
        template: String,
        count: u64,
    },
    /// Non-empty lines with their 1-based line numbers.
    Lines {
        what: String,
        lines: Vec<(u64, String)>,
    },
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Self::Template { count, .. } => *count,
            Self::Lines { lines, .. } => lines.len() as u64,
        }
    }

    /// Message `index`, validated as JSON.
    fn message(&self, index: u64) -> Result<Vec<u8>, CliError> {
        let (what, position, text) = match self {
            Self::Template { template, .. } => (
                "--template",
                format!("message {index}"),
                template.replace("{i}", &index.to_string()),
            ),
            Self::Lines { what, lines } => {
                let (line, text) = lines
                    .get(usize::try_from(index).unwrap_or(usize::MAX))
                    .cloned()
                    .unwrap_or_default();
                (what.as_str(), format!("line {line}"), text)
            }
        };
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|source| {
            CliError::InvalidJson {
                what: what.to_owned(),
                position,
                source,
            }
        })?;
        Ok(text.into_bytes())
    }
}

/// Final counts.
#[derive(Debug, Default, Serialize)]
struct Summary {
    exchange: String,
    routing_key: String,
    total: u64,
    sent: u64,
    confirmed: u64,
    returned: u64,
    nacked: u64,
    failed: u64,
    elapsed_secs: f64,
    msgs_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Summary {
    fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Confirmed => self.confirmed += 1,
            Outcome::Returned => self.returned += 1,
            Outcome::Nacked => self.nacked += 1,
            Outcome::Lost(error) => {
                self.failed += 1;
                self.error
                    .get_or_insert_with(|| format!("channel failed: {error}"));
            }
            Outcome::NotSent(error) => {
                self.failed += 1;
                self.error
                    .get_or_insert_with(|| format!("publish failed: {error}"));
                return;
            }
        }
        self.sent += 1;
    }

    fn settled(&self) -> u64 {
        self.confirmed + self.returned + self.nacked + self.failed
    }

    fn ok(&self) -> bool {
        self.confirmed == self.total && self.error.is_none()
    }
}

pub(crate) async fn run(global: &Global, args: Args, io: &mut Io<'_>) -> Result<i32, CliError> {
    let config = load_config(global)?;
    let (exchange, routing_key) = match (&args.queue, &args.routing_key) {
        (Some(queue), _) => (String::new(), queue.clone()),
        (None, Some(key)) => (
            args.exchange
                .clone()
                .unwrap_or_else(|| config.exchange.clone()),
            key.clone(),
        ),
        (None, None) => {
            return Err(CliError::Usage(
                "give --queue, or --routing-key (with --exchange)".to_owned(),
            ));
        }
    };
    for (what, name) in [("exchange", &exchange), ("routing key", &routing_key)] {
        if name.len() > MAX_SHORT {
            return Err(CliError::Usage(format!(
                "the {what} is longer than 255 bytes"
            )));
        }
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(CliError::Usage(
            "--rate must be a positive number".to_owned(),
        ));
    }
    let source = read_source(&args)?;
    let total = source.len();
    let target = if exchange.is_empty() {
        format!("queue `{routing_key}` (default exchange)")
    } else {
        format!("exchange `{exchange}` with routing key `{routing_key}`")
    };

    if args.dry_run {
        // Validate every message now (templates too), without connecting.
        let mut first = None;
        for index in 0..total {
            let body = source.message(index)?;
            first.get_or_insert(body);
        }
        say!(
            io.out,
            "dry run: {} valid JSON message{} would be published to {target}, persistent, \
             application/json, with confirms and mandatory",
            thousands(total),
            if total == 1 { "" } else { "s" }
        )?;
        if let Some(first) = first {
            say!(io.out, "first message: {}", String::from_utf8_lossy(&first))?;
        }
        return Ok(EXIT_OK);
    }

    let (connection, url) = connect(&config, "publish").await?;
    if !args.json {
        say!(
            io.err,
            "publishing {} messages to {target} on {url}",
            thousands(total)
        )?;
    }
    let result = publish(
        &connection,
        &source,
        &exchange,
        &routing_key,
        &args,
        &config,
        io,
    )
    .await;
    close(&connection).await;
    let summary = result?;
    if args.json {
        output::json(io.out, &summary)?;
    } else {
        say!(
            io.out,
            "sent {}, confirmed {}, returned {}, nacked {}, failed {} in {:.2}s ({} msg/s)",
            thousands(summary.sent),
            thousands(summary.confirmed),
            thousands(summary.returned),
            thousands(summary.nacked),
            thousands(summary.failed),
            summary.elapsed_secs,
            thousands(summary.msgs_per_sec.round() as u64),
        )?;
        if summary.returned > 0 {
            let why = if exchange.is_empty() {
                format!("queue `{routing_key}` does not exist")
            } else {
                format!(
                    "no queue is bound to exchange `{exchange}` with routing key `{routing_key}`"
                )
            };
            say!(
                io.out,
                "warning: {} message{} returned as unroutable: {why}",
                thousands(summary.returned),
                if summary.returned == 1 {
                    " was"
                } else {
                    "s were"
                }
            )?;
        }
        if summary.nacked > 0 {
            say!(
                io.out,
                "warning: the broker refused (nacked) {} message{}",
                thousands(summary.nacked),
                if summary.nacked == 1 { "" } else { "s" }
            )?;
        }
        if let Some(error) = &summary.error {
            say!(io.out, "error: {error}")?;
        }
    }
    Ok(if summary.ok() { EXIT_OK } else { EXIT_FAILURE })
}

fn read_source(args: &Args) -> Result<Source, CliError> {
    if let (Some(count), Some(template)) = (args.count, &args.template) {
        let source = Source::Template {
            template: template.clone(),
            count,
        };
        if count > 0 {
            source.message(0)?;
        }
        return Ok(source);
    }
    let (what, reader): (String, Box<dyn BufRead>) = match &args.file {
        Some(path) if path.as_os_str() != "-" => {
            let what = path.display().to_string();
            let file = std::fs::File::open(path).map_err(|source| CliError::Input {
                what: what.clone(),
                source,
            })?;
            (what, Box::new(std::io::BufReader::new(file)))
        }
        _ => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("reading JSON lines from stdin (end with Ctrl-D)");
            }
            ("stdin".to_owned(), Box::new(stdin.lock()))
        }
    };
    let mut lines = Vec::new();
    for (number, line) in (1_u64..).zip(reader.lines()) {
        let line = line.map_err(|source| CliError::Input {
            what: what.clone(),
            source,
        })?;
        let line = line.trim();
        if !line.is_empty() {
            lines.push((number, line.to_owned()));
        }
    }
    let source = Source::Lines { what, lines };
    for index in 0..source.len() {
        source.message(index)?;
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use lapin::Confirmation;

    use super::*;

    #[test]
    fn templates_substitute_the_index_and_must_be_json() {
        let source = Source::Template {
            template: r#"{"task_id": {i}, "name": "t{i}"}"#.to_owned(),
            count: 3,
        };
        assert_eq!(
            source.message(2).unwrap(),
            br#"{"task_id": 2, "name": "t2"}"#
        );
        let bad = Source::Template {
            template: "{i".to_owned(),
            count: 1,
        };
        let Err(CliError::InvalidJson { position, .. }) = bad.message(0) else {
            panic!("not an InvalidJson error");
        };
        assert_eq!(position, "message 0");
    }

    #[test]
    fn summaries_count_every_outcome() {
        let mut summary = Summary {
            total: 3,
            ..Summary::default()
        };
        summary.record(Outcome::Confirmed);
        assert!(!summary.ok());
        summary.record(Outcome::Confirmed);
        summary.record(Outcome::Confirmed);
        assert!(summary.ok());
        summary.total = 5;
        summary.record(Outcome::from(Ok(Confirmation::Nack(None))));
        assert_eq!(
            (summary.confirmed, summary.nacked, summary.settled()),
            (3, 1, 4)
        );
        assert!(!summary.ok());
    }
}

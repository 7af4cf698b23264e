//! Logging: a `tracing` subscriber writing to stderr and, optionally, to daily-rotated files.
//!
//! A library must not install a global subscriber behind its user's back, so only
//! `rmq_consumer::run()` and the binaries call [`init`]; applications that set up `tracing`
//! themselves simply don't.
//!
//! What [`init`] installs, from a [`LogConfig`]:
//! - A filter: `RUST_LOG` if set, else [`LogConfig::level`]. When the level comes from the
//!   configuration and does not mention `lapin` (or `amq_protocol`), `lapin=warn`
//!   (`amq_protocol=warn`) is appended to keep the AMQP client's chatter out of `info` logs.
//!   Either way `lapin::returned_messages=off` is appended unless the filter mentions
//!   `returned_messages`: lapin logs every message the broker returns, body included, at WARN,
//!   while the engine handles returns itself (a message body never reaches a log line).
//! - stderr, in the configured [`LogFormat`]: human-readable lines with targets (ANSI colours
//!   only when stderr is a terminal), or one JSON object per line with the current span and
//!   the span list. Field values (and messages) may quote message content, so control
//!   characters are escaped ([`crate::text::printable`]): a human line is always one line
//!   that cannot drive a terminal, and a JSON line escapes DEL and C1 too
//!   ([`crate::text::json_safe`]; JSON escapes C0 itself).
//! - With [`LogConfig::dir`]: that directory is created and receives, in the same format
//!   without colours, `<prefix>.<YYYY-MM-DD>.log` (every event passing the filter) and
//!   `<prefix>.error.<YYYY-MM-DD>.log` (`ERROR` events only), a new file each day (UTC). Files
//!   are written by a background thread that never drops lines; the returned [`LogGuard`]
//!   flushes them when dropped, so keep it alive until the program ends.
//!
//! [`subscriber`] builds the same formatting around any writer, without installing it (tests
//! capture log lines with it).
//!
//! ```no_run
//! let config = rmq_consumer::config::LogConfig::default();
//! let _guard = rmq_consumer::logging::init(&config)?;
//! tracing::info!("started");
//! # Ok::<(), rmq_consumer::logging::LoggingError>(())
//! ```

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use tracing::{Level, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{InitError, RollingFileAppender, Rotation};
use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::filter::{EnvFilter, ParseError, filter_fn};
use tracing_subscriber::fmt::format::debug_fn;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::layer::{Layer, Layered, SubscriberExt as _};
use tracing_subscriber::registry::Registry;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogConfig, LogFormat};
use crate::text::{json_safe, printable};

/// Keeps the log file writers alive; dropping it flushes and closes the files.
///
/// Hold it for the life of the program (`let _guard = init(..)?;`, not `let _ = ..`).
#[derive(Debug)]
#[must_use = "dropping the guard stops writing log files"]
pub struct LogGuard {
    _guards: Vec<WorkerGuard>,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// The filter (`RUST_LOG` or the configured level) is not a valid `EnvFilter` directive.
    #[error("invalid log filter `{directives}` from {origin}")]
    Filter {
        /// Where the directives came from: `RUST_LOG` or `log_level`.
        origin: &'static str,
        /// The directives as given.
        directives: String,
        /// The parse error.
        #[source]
        source: ParseError,
    },
    /// The log directory could not be created.
    #[error("cannot create log directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A log file could not be opened.
    #[error("cannot open log file {path}")]
    OpenFile {
        /// The file name pattern (`<dir>/<prefix>.<date>.log`).
        path: PathBuf,
        /// The appender's error.
        #[source]
        source: InitError,
    },
    /// A global `tracing` subscriber (or `log` logger) is already installed.
    #[error("a global tracing subscriber or log logger is already installed")]
    AlreadyInitialized,
}

/// Installs the global subscriber described by `config` (see the [module docs](self)).
///
/// # Errors
///
/// [`LoggingError::Filter`] for an invalid `RUST_LOG` or level, [`LoggingError::CreateDir`] or
/// [`LoggingError::OpenFile`] when the log directory or files cannot be created, and
/// [`LoggingError::AlreadyInitialized`] when a global subscriber or `log` logger is already
/// installed (in which case nothing is changed, except that a `log` logger conflict leaves the
/// `tracing` subscriber installed).
pub fn init(config: &LogConfig) -> Result<LogGuard, LoggingError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (subscriber, guard) = build(config, rust_log.as_deref(), true)?;
    subscriber
        .try_init()
        .map_err(|_| LoggingError::AlreadyInitialized)?;
    Ok(guard)
}

/// A subscriber formatting events as [`init`] does (filter from [`LogConfig::level`], ignoring
/// `RUST_LOG`; format from [`LogConfig::format`]; no colours; [`LogConfig::dir`] ignored) and
/// writing them to `writer`. Not installed: use it with
/// `tracing::subscriber::with_default` or `set_global_default`.
///
/// # Errors
///
/// [`LoggingError::Filter`] when the level is not a valid filter.
pub fn subscriber<W>(
    config: &LogConfig,
    writer: W,
) -> Result<impl Subscriber + Send + Sync + 'static, LoggingError>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let filter = filter(&config.level, None)?;
    Ok(Registry::default()
        .with(filter)
        .with(fmt_layer(config.format, writer, false)))
}

type Base = Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Base> + Send + Sync>;

/// Builds the subscriber without installing it. `rust_log` is the value of `RUST_LOG`;
/// `console` adds the stderr layer (tests leave it out).
fn build(
    config: &LogConfig,
    rust_log: Option<&str>,
    console: bool,
) -> Result<(impl Subscriber + Send + Sync + 'static, LogGuard), LoggingError> {
    let filter = filter(&config.level, rust_log)?;
    let mut layers: Vec<BoxedLayer> = Vec::new();
    if console {
        let ansi = std::io::stderr().is_terminal();
        layers.push(fmt_layer(config.format, std::io::stderr, ansi));
    }
    let mut guards = Vec::new();
    if let Some(dir) = &config.dir {
        std::fs::create_dir_all(dir).map_err(|source| LoggingError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let (all, guard) = file_writer(dir, &config.file_prefix)?;
        guards.push(guard);
        layers.push(fmt_layer(config.format, all, false));
        let (errors, guard) = file_writer(dir, &format!("{}.error", config.file_prefix))?;
        guards.push(guard);
        // Spans stay enabled for this layer so error lines keep their context (a
        // `LevelFilter::ERROR` would hide the `INFO` delivery span); only events are filtered.
        let errors_only = filter_fn(|meta| meta.is_span() || *meta.level() == Level::ERROR);
        layers.push(
            fmt_layer(config.format, errors, false)
                .with_filter(errors_only)
                .boxed(),
        );
    }
    let subscriber = Registry::default().with(filter).with(layers);
    Ok((subscriber, LogGuard { _guards: guards }))
}

/// The filter: `RUST_LOG` if set, else `level` with lapin quietened; returned messages off.
fn filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, LoggingError> {
    let (origin, mut directives) = match rust_log.filter(|value| !value.trim().is_empty()) {
        Some(rust_log) => ("RUST_LOG", rust_log.trim().to_owned()),
        None => ("log_level", with_quiet_lapin(level)),
    };
    if !directives.contains("returned_messages") {
        if !directives.is_empty() {
            directives.push(',');
        }
        directives.push_str(RETURNED_MESSAGES_OFF);
    }
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|source| LoggingError::Filter {
            origin,
            directives,
            source,
        })
}

/// lapin's log of returned messages, which carries their bodies.
const RETURNED_MESSAGES_OFF: &str = "lapin::returned_messages=off";

fn with_quiet_lapin(level: &str) -> String {
    let mut directives: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|directive| !directive.is_empty())
        .collect();
    if !level.contains("lapin") {
        directives.push("lapin=warn");
    }
    if !level.contains("amq_protocol") {
        directives.push("amq_protocol=warn");
    }
    directives.join(",")
}

fn file_writer(dir: &Path, prefix: &str) -> Result<(NonBlocking, WorkerGuard), LoggingError> {
    let appender = RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(prefix)
        .filename_suffix("log")
        .build(dir)
        .map_err(|source| LoggingError::OpenFile {
            path: dir.join(format!("{prefix}.<date>.log")),
            source,
        })?;
    Ok(NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("rmq-consumer-log")
        .finish(appender))
}

fn fmt_layer<W>(format: LogFormat, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_target(true);
    match format {
        LogFormat::Human => layer
            .with_writer(writer)
            .fmt_fields(escaped_fields())
            .boxed(),
        LogFormat::Json => layer
            .with_writer(JsonSafe(writer))
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
}

/// The human format's fields, as the default (`message` bare, others `name=value`, spaces
/// between) with control characters escaped: a `%value` or message quoting message content
/// stays on its line and cannot drive a terminal (`?value` and strings are escaped by `Debug`
/// already).
fn escaped_fields() -> impl for<'writer> FormatFields<'writer> + Send + Sync + 'static {
    debug_fn(|writer, field, value| {
        let text = format!("{value:?}");
        let text = printable(&text);
        if field.name() == "message" {
            write!(writer, "{text}")
        } else {
            write!(writer, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

/// A writer maker whose writers escape DEL and C1 in the JSON lines they are given.
struct JsonSafe<M>(M);

impl<'writer, M: MakeWriter<'writer>> MakeWriter<'writer> for JsonSafe<M> {
    type Writer = JsonSafeWriter<M::Writer>;

    fn make_writer(&'writer self) -> Self::Writer {
        JsonSafeWriter(self.0.make_writer())
    }

    fn make_writer_for(&'writer self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        JsonSafeWriter(self.0.make_writer_for(meta))
    }
}

/// See [`JsonSafe`]; the formatter hands over each line whole.
struct JsonSafeWriter<W>(W);

impl<W: std::io::Write> std::io::Write for JsonSafeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(json_safe(text).as_bytes())?,
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests fail loudly")]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!(
            "rmq-consumer-logging-{name}-{}-{nanos}",
            std::process::id()
        ))
    }

    /// The one file in `dir` whose name starts with `prefix.` and has no further `.error`.
    fn read_log(dir: &Path, stem: &str) -> String {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let Some(rest) = name.strip_prefix(&format!("{stem}.")) else {
                continue;
            };
            // `<stem>.<date>.log`: exactly one dot-separated date between.
            if rest.ends_with(".log") && !rest.trim_end_matches(".log").contains('.') {
                found.push(name);
            }
        }
        assert_eq!(found.len(), 1, "files for {stem}: {found:?}");
        std::fs::read_to_string(dir.join(&found[0])).unwrap()
    }

    fn write_sample(config: &LogConfig) {
        let (subscriber, guard) = build(config, None, false).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("delivery", queue = "q1", delivery_tag = 7);
            let _entered = span.enter();
            tracing::info!("info-line-marker");
            tracing::debug!("debug-line-marker");
            tracing::error!(code = 3, "error-line-marker");
        });
        drop(guard);
    }

    #[test]
    fn files_split_by_level() {
        let dir = temp_dir("human");
        let config = LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Human,
            dir: Some(dir.join("nested")),
            file_prefix: "worker".to_owned(),
        };
        write_sample(&config);
        let nested = dir.join("nested");
        let all = read_log(&nested, "worker");
        let errors = read_log(&nested, "worker.error");
        assert!(all.contains("info-line-marker"), "{all}");
        assert!(all.contains("error-line-marker"), "{all}");
        assert!(!all.contains("debug-line-marker"), "{all}");
        assert!(errors.contains("error-line-marker"), "{errors}");
        assert!(!errors.contains("info-line-marker"), "{errors}");
        assert!(
            errors.contains("delivery{queue=\"q1\" delivery_tag=7}"),
            "{errors}"
        );
        assert!(errors.contains("rmq_consumer::logging::tests"), "{errors}");
        assert!(!all.contains('\u{1b}'), "no ANSI escapes in files: {all}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_files() {
        let dir = temp_dir("json");
        let config = LogConfig {
            level: "debug".to_owned(),
            format: LogFormat::Json,
            dir: Some(dir.clone()),
            file_prefix: "rmq-consumer".to_owned(),
        };
        write_sample(&config);
        let all = read_log(&dir, "rmq-consumer");
        assert_eq!(all.lines().count(), 3, "{all}");
        for line in all.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["span"]["name"], "delivery");
            assert_eq!(value["spans"][0]["queue"], "q1");
        }
        let errors = read_log(&dir, "rmq-consumer.error");
        let error: serde_json::Value = serde_json::from_str(errors.trim()).unwrap();
        assert_eq!(error["level"], "ERROR");
        assert_eq!(error["fields"]["message"], "error-line-marker");
        assert_eq!(error["fields"]["code"], 3);
        assert_eq!(error["span"]["queue"], "q1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lapin_is_quietened_unless_mentioned() {
        assert_eq!(
            with_quiet_lapin("info"),
            "info,lapin=warn,amq_protocol=warn"
        );
        assert_eq!(
            with_quiet_lapin("debug,lapin=trace"),
            "debug,lapin=trace,amq_protocol=warn"
        );
        assert_eq!(with_quiet_lapin(""), "lapin=warn,amq_protocol=warn");
        assert!(filter("info", Some("trace")).is_ok());
    }

    #[test]
    fn returned_messages_are_never_logged_by_lapin() {
        for (level, rust_log) in [
            ("info", None),
            ("debug", Some("trace")),
            ("info", Some("lapin=trace")),
        ] {
            let filter = filter(level, rust_log).unwrap().to_string();
            assert!(filter.contains(RETURNED_MESSAGES_OFF), "{filter}");
        }
        let mine = filter("info", Some("lapin::returned_messages=warn"))
            .unwrap()
            .to_string();
        assert!(!mine.contains(RETURNED_MESSAGES_OFF), "{mine}");
    }

    #[test]
    fn bad_filter_and_dir_are_errors() {
        match filter("info,=[bad", None) {
            Err(LoggingError::Filter { origin, .. }) => assert_eq!(origin, "log_level"),
            other => panic!("expected a filter error, got {other:?}"),
        }
        match filter("info", Some("=[bad")) {
            Err(LoggingError::Filter { origin, .. }) => assert_eq!(origin, "RUST_LOG"),
            other => panic!("expected a filter error, got {other:?}"),
        }

        let dir = temp_dir("not-a-dir");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, "").unwrap();
        let config = LogConfig {
            dir: Some(file.join("logs")),
            ..LogConfig::default()
        };
        match build(&config, None, true) {
            Err(LoggingError::CreateDir { path, .. }) => assert_eq!(path, file.join("logs")),
            Err(other) => panic!("expected CreateDir, got {other:?}"),
            Ok(_) => panic!("expected CreateDir, got a subscriber"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn init_twice_is_an_error_not_a_panic() {
        // Installs a silent global subscriber for this test binary; the second call must fail
        // cleanly whoever installed the first one.
        let config = LogConfig {
            level: "off,lapin=off,amq_protocol=off".to_owned(),
            ..LogConfig::default()
        };
        let _first = init(&config);
        assert!(matches!(
            init(&config),
            Err(LoggingError::AlreadyInitialized)
        ));
    }
}

//! The `rmq-consumer` operator CLI: `publish`, `status`, `dlq peek|list|replay|purge`,
//! `cache get|forget`, `handlers`, `check-config`.
//!
//! The `rmq-consumer` binary calls [`main`]. A binary that declares its own `#[consumer]`
//! handlers can embed the same CLI, so that `handlers`, `status` and `check-config` see those
//! handlers and their configured queues:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     rmq_consumer::cli::main()
//! }
//! ```
//!
//! Every command reads the configuration the way [`crate::run`] does (`rmq-consumer.toml` or
//! `$RMQ_CONSUMER_CONFIG`, then `RMQ_CONSUMER_*` variables); the global flags `--config`,
//! `--url`, `--management-url` and `--password-file` win over both. Passwords are never
//! printed: URLs are shown with the password masked. A password in `--url` works but draws a
//! warning (other users see it in `ps`).
//!
//! Exit codes: [`EXIT_OK`] (0) success; [`EXIT_FAILURE`] (1) the command ran but something
//! needs attention (`status` warnings, messages returned or nacked by `publish`, a `dlq replay`
//! that skipped messages, an invalid configuration for `check-config`);
//! [`EXIT_ERROR`] (2) nothing could be done (usage error, a queue missing, the broker
//! unreachable).

mod cache;
mod check_config;
mod dlq;
mod handlers;
mod management;
mod output;
mod publish;
mod status;

use std::{
    ffi::OsString,
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    str::FromStr,
};

use clap::{Parser, Subcommand};
use lapin::{Channel, Connection, uri::AMQPUri};

use crate::{
    config::{Config, ConfigError, ENV_PREFIX, SecretUrl, url_has_password, with_password},
    error::{ConnectError, SetupError},
};

/// Exit code: success, nothing to report.
pub const EXIT_OK: i32 = 0;
/// Exit code: the command ran, but something needs attention (warnings, returned or nacked
/// messages, a failed replay).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: nothing could be done (usage error, a missing queue, an unreachable broker).
pub const EXIT_ERROR: i32 = 2;

/// The heartbeat of the CLI's own connections, in seconds.
const CLI_HEARTBEAT: u16 = 30;

/// Runs the CLI with the process arguments, printing to stdout and stderr; a progress bar is
/// drawn when stderr is a terminal.
#[must_use]
pub fn main() -> ExitCode {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let terminal = Terminal {
        stdout: stdout.is_terminal(),
        stderr: stderr.is_terminal(),
    };
    let mut out = stdout.lock();
    let mut err = stderr;
    let code = run_with(std::env::args_os(), &mut out, &mut err, terminal);
    let _ = out.flush();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Runs the CLI with `args` (the first one is the program name, as in `std::env::args`),
/// writing results to `out` and diagnostics to `err`; returns the exit code. Builds its own
/// tokio runtime, so it must not be called from inside one (use [`execute`] there).
///
/// ```no_run
/// let mut out = Vec::new();
/// let mut err = Vec::new();
/// let code = rmq_consumer::cli::run_args(["rmq-consumer", "handlers"], &mut out, &mut err);
/// assert_eq!(code, rmq_consumer::cli::EXIT_OK);
/// ```
pub fn run_args<I, S>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<OsString> + Clone,
{
    run_with(args, out, err, Terminal::default())
}

/// Like [`run_args`], on the caller's tokio runtime.
pub async fn execute<I, S>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<OsString> + Clone,
{
    let cli = match parse(args, out, err) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let mut io = Io {
        out,
        err,
        terminal: Terminal::default(),
    };
    dispatch(cli, &mut io).await
}

fn run_with<I, S>(args: I, out: &mut dyn Write, err: &mut dyn Write, terminal: Terminal) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<OsString> + Clone,
{
    let cli = match parse(args, out, err) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // One thread: the CLI is I/O-bound, and lapin's I/O runs on its own thread; a single
    // scheduler thread avoids cross-thread wake-ups on every publisher confirm.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = writeln!(err, "error: cannot start the tokio runtime: {error}");
            return EXIT_ERROR;
        }
    };
    let mut io = Io { out, err, terminal };
    let code = runtime.block_on(dispatch(cli, &mut io));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

fn parse<I, S>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> Result<Cli, i32>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString> + Clone,
{
    Cli::try_parse_from(args).map_err(|error| {
        let text = error.render().to_string();
        if error.use_stderr() {
            let _ = write!(err, "{text}");
            EXIT_ERROR
        } else {
            // --help, --version
            let _ = write!(out, "{text}");
            EXIT_OK
        }
    })
}

async fn dispatch(cli: Cli, io: &mut Io<'_>) -> i32 {
    let in_args = cli
        .global
        .urls
        .iter()
        .chain(cli.global.management_url.as_ref())
        .any(|url| url_has_password(url));
    if in_args {
        let _ = writeln!(
            io.err,
            "warning: a password given in --url or --management-url is visible to other users \
             (ps, /proc) and kept in shell history; use --password-file PATH or \
             RMQ_CONSUMER_PASSWORD instead"
        );
    }
    let result = match cli.command {
        Command::Publish(args) => publish::run(&cli.global, args, io).await,
        Command::Status(args) => status::run(&cli.global, args, io).await,
        Command::Dlq { command } => dlq::run(&cli.global, command, io).await,
        Command::Cache { command } => cache::run(&cli.global, command, io).await,
        Command::Handlers(args) => handlers::run(&cli.global, &args, io),
        Command::CheckConfig(args) => check_config::run(&cli.global, &args, io),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            let _ = output::say!(io.err, "error: {}", chain(&error));
            error.exit_code()
        }
    }
}

/// Reliable RabbitMQ consumers: operator tools.
#[derive(Debug, Parser)]
#[command(name = "rmq-consumer", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Flags every command accepts; they win over the config file and the environment.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Global {
    /// Broker URL (repeat for a cluster); default: the config's `url` / `$RMQ_CONSUMER_URL`.
    #[arg(long = "url", global = true, value_name = "AMQP_URL")]
    pub(crate) urls: Vec<String>,
    /// Configuration file; default: `$RMQ_CONSUMER_CONFIG` or `./rmq-consumer.toml`.
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
    /// RabbitMQ management API base URL; default: the config's `management_url`, else
    /// `https://<broker host>:15671` for an amqps:// broker and `http://<broker host>:15672`
    /// otherwise, with the broker URL's user and password.
    #[arg(long, global = true, value_name = "HTTP_URL")]
    pub(crate) management_url: Option<String>,
    /// File holding the broker password (one line), put into every broker URL; wins over
    /// `$RMQ_CONSUMER_PASSWORD` and the config's `password`.
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) password_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish JSON messages with publisher confirms and `mandatory`.
    Publish(publish::Args),
    /// Show queues, bindings and consumers, read-only; exit 0 healthy, 1 warnings, 2 missing
    /// queue or unreachable broker.
    Status(status::Args),
    /// Inspect, replay or purge a dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: dlq::Command,
    },
    /// Show or forget a task's result in the shared result store (`result_store`).
    Cache {
        #[command(subcommand)]
        command: cache::Command,
    },
    /// List the handlers registered in this binary.
    Handlers(handlers::Args),
    /// Validate the configuration and print it with passwords masked.
    CheckConfig(check_config::Args),
}

/// Which of the process's streams are terminals.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Terminal {
    pub(crate) stdout: bool,
    pub(crate) stderr: bool,
}

/// Where a command writes.
pub(crate) struct Io<'a> {
    pub(crate) out: &'a mut dyn Write,
    pub(crate) err: &'a mut dyn Write,
    pub(crate) terminal: Terminal,
}

/// What can stop a command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The file named by `--password-file` cannot be read.
    #[error("cannot read password file {path}")]
    ReadPasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The handlers do not fit the configuration.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// No broker URL answered.
    #[error("cannot connect to the broker: {}", describe_connect(.0))]
    Connect(Vec<ConnectError>),
    /// A broker operation failed.
    #[error("{what}")]
    Amqp {
        what: String,
        #[source]
        source: lapin::Error,
    },
    /// A queue the command needs does not exist.
    #[error("queue `{0}` does not exist")]
    MissingQueue(String),
    /// The arguments do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// Input messages could not be read.
    #[error("cannot read {what}")]
    Input {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An input message is not JSON.
    #[error("{what}: {position} is not valid JSON")]
    InvalidJson {
        what: String,
        position: String,
        #[source]
        source: serde_json::Error,
    },
    /// Writing the output failed (e.g. a closed pipe).
    #[error("cannot write output")]
    Output(#[from] std::io::Error),
    /// Output could not be serialized.
    #[error("cannot encode JSON output")]
    Json(#[from] serde_json::Error),
    /// The shared result store cannot be used.
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
}

impl CliError {
    fn exit_code(&self) -> i32 {
        match self {
            Self::Amqp { .. } | Self::Output(_) | Self::Json(_) => EXIT_FAILURE,
            Self::Config(_)
            | Self::ReadPasswordFile { .. }
            | Self::Setup(_)
            | Self::Connect(_)
            | Self::MissingQueue(_)
            | Self::Usage(_)
            | Self::Input { .. }
            | Self::InvalidJson { .. }
            | Self::Store(_) => EXIT_ERROR,
        }
    }

    pub(crate) fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let what = what.into();
        move |source| Self::Amqp { what, source }
    }
}

fn describe_connect(errors: &[ConnectError]) -> String {
    if errors.is_empty() {
        return "no broker URL is configured".to_owned();
    }
    errors
        .iter()
        .map(|e| chain(e))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Loads the configuration like `run()` does, then applies the global flags.
pub(crate) fn load_config(global: &Global) -> Result<Config, CliError> {
    let mut overrides = Vec::new();
    if let Some(path) = &global.password_file {
        let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadPasswordFile {
            path: path.clone(),
            source,
        })?;
        let password = text
            .strip_suffix('\n')
            .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
        if password.is_empty() {
            return Err(CliError::Usage(format!(
                "password file {} is empty",
                path.display()
            )));
        }
        overrides.push((format!("{ENV_PREFIX}PASSWORD"), password.to_owned()));
    }
    let mut config = Config::load_from(global.config.as_deref(), overrides)?;
    if !global.urls.is_empty() {
        let urls: Vec<SecretUrl> = global.urls.iter().map(SecretUrl::new).collect();
        config.urls = match &config.password {
            Some(password) => with_password(&urls, password).map_err(|masked| {
                CliError::Usage(format!(
                    "--url {masked} has a password, and a password is also given \
                     (--password-file, RMQ_CONSUMER_PASSWORD or the config's `password`): \
                     give it in one place"
                ))
            })?,
            None => urls,
        };
    }
    if let Some(url) = &global.management_url {
        config.management_url = Some(SecretUrl::new(url.clone()));
    }
    Ok(config)
}

/// Connects to the first configured URL that answers; returns the connection and the URL
/// used.
pub(crate) async fn connect(
    config: &Config,
    purpose: &str,
) -> Result<(Connection, SecretUrl), CliError> {
    let name = format!("rmq-consumer-cli {purpose}");
    let (connection, index) =
        crate::connection::connect_any(&config.urls, &config.tls, 0, CLI_HEARTBEAT, &name)
            .await
            .map_err(CliError::Connect)?;
    Ok((connection, config.urls[index].clone()))
}

/// Closes a connection politely, ignoring errors (it may already be gone).
pub(crate) async fn close(connection: &Connection) {
    if connection.status().connected() {
        let _ = connection.close(200, "bye".into()).await;
    }
}

/// Closes a channel politely, ignoring errors.
pub(crate) async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "bye".into()).await;
    }
}

/// The vhost of a broker URL (`/` when the URL does not parse).
pub(crate) fn vhost_of(url: &SecretUrl) -> String {
    AMQPUri::from_str(url.expose()).map_or_else(|_| "/".to_owned(), |uri| uri.vhost)
}

/// Ready message count and consumer count of `queue` by a passive declare on a channel of its
/// own (a missing queue closes the channel with 404): `Ok(None)` when the queue is missing.
pub(crate) async fn probe_queue(
    connection: &Connection,
    queue: &str,
) -> Result<Option<(u32, u32)>, CliError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(CliError::amqp("cannot open a channel"))?;
    let declared = channel
        .queue_declare(
            crate::amqp::short(queue),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    match declared {
        Ok(declared) => {
            close_channel(&channel).await;
            Ok(Some((declared.message_count(), declared.consumer_count())))
        }
        Err(error) if is_not_found(&error) => Ok(None),
        Err(source) => Err(CliError::Amqp {
            what: format!("cannot inspect queue `{queue}`"),
            source,
        }),
    }
}

pub(crate) use crate::error::chain;
pub(crate) use crate::error::is_not_found;

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_skip_repeated_causes() {
        let inner = std::io::Error::other("connection refused");
        let outer = CliError::Input {
            what: "x".to_owned(),
            source: inner,
        };
        assert_eq!(chain(&outer), "cannot read x: connection refused");
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn vhost_defaults_to_slash() {
        assert_eq!(vhost_of(&SecretUrl::new("amqp://a:b@h:5672/%2f")), "/");
        assert_eq!(vhost_of(&SecretUrl::new("amqp://a:b@h:5672/prod")), "prod");
    }
}

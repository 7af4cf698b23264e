//! Configuration: a TOML file, overridden by `RMQ_CONSUMER_*` environment variables.
//!
//! [`Config::load`] reads the file named by `$RMQ_CONSUMER_CONFIG` (or `./rmq-consumer.toml`
//! when it exists), applies the environment, and validates everything at once: an invalid
//! configuration is one [`ConfigError::Invalid`] listing every bad, unknown or conflicting
//! key, so an operator fixes them in one round.
//!
//! ```toml
//! url = ["amqp://app:secret@rabbit-1:5672/%2f", "amqp://app:secret@rabbit-2:5672/%2f"]
//! exchange = "media"
//! prefetch_count = 8
//! message_timeout = "5m"
//! retry_delays = ["1s", "10s", "60s"]
//! log_level = "info,my_app=debug"
//! log_dir = "logs"
//!
//! [consumers.resize_image]
//! queue = "media.resize"
//! reply_key = "media.resized"
//! timeout = "30s"
//! ```
//!
//! - Durations are an integer or float number of seconds (`30`, `0.5`) or a
//!   [humantime](https://docs.rs/humantime) string (`"500ms"`, `"2m"`, `"1h 30m"`).
//! - Log settings are flat keys (`log_level`, `log_format`, `log_dir`, `log_file_prefix`) or a
//!   `[log]` table (`level`, `format`, `dir`, `file_prefix`).
//! - The Python template's key names are accepted as aliases: `conn_iddress` (`url`),
//!   `exchange_iddress` (`exchange`), `b2m_queue_iddress` (`queue`), `m2b_queue_iddress`
//!   (`reply_queue`), `m2b_routing_key` (`reply_key`). Giving a key under both names is an
//!   error.
//! - Every key can be set from the environment as `RMQ_CONSUMER_<KEY>` (upper case), and a
//!   handler's section as `RMQ_CONSUMER_CONSUMERS__<HANDLER>__<KEY>`. Values are parsed as the
//!   key's type; lists (`url`, `retry_delays`) are comma-separated; booleans are
//!   `true`/`false`/`1`/`0`. `<HANDLER>` is lower-cased to name the section. Unknown
//!   `RMQ_CONSUMER_*` variables are errors, like unknown keys.
//!
//! Connection URLs are held as [`SecretUrl`], whose `Debug` and `Display` mask the password;
//! no `Debug` or `Display` of this module's types (errors included) prints a password. The
//! password can also be given on its own (`password`, `RMQ_CONSUMER_PASSWORD`): it is a
//! [`Password`] and goes into every URL ([`with_password`]).
//!
//! TLS for `amqps://` URLs: `tls_ca_file` (a PEM CA bundle that replaces the system roots),
//! `tls_cert_file` and `tls_key_file` (a client certificate, both or neither), checked at
//! load; see [`crate::tls`]. Other AMQP clients' TLS query parameters (`cacertfile`,
//! `verify`, ...) are rejected with the key to use instead.
//!
//! ```
//! use rmq_consumer::config::Config;
//!
//! let config = Config::from_toml_str(
//!     r#"
//!     conn_iddress = "amqp://app:s3cret@rabbit:5672/%2f"
//!     prefetch_count = 8
//!     "#,
//! )?;
//! assert_eq!(config.prefetch_count, 8);
//! assert_eq!(config.urls[0].to_string(), "amqp://app:****@rabbit:5672/%2f");
//! # Ok::<(), rmq_consumer::config::ConfigError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The environment variable naming the configuration file.
pub const CONFIG_PATH_ENV: &str = "RMQ_CONSUMER_CONFIG";
/// The configuration file read when [`CONFIG_PATH_ENV`] is not set, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "rmq-consumer.toml";
/// The prefix of environment variables overriding configuration keys.
pub const ENV_PREFIX: &str = "RMQ_CONSUMER_";

/// Default broker URL (`url`).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default exchange (`exchange`).
pub const DEFAULT_EXCHANGE: &str = "rmq-consumer";
/// Default `prefetch_count`.
pub const DEFAULT_PREFETCH_COUNT: u16 = 4;
/// Default `retry_connect_interval`.
pub const DEFAULT_RETRY_CONNECT_INTERVAL: Duration = Duration::from_secs(30);
/// Default `heartbeat_interval`, in seconds.
pub const DEFAULT_HEARTBEAT_INTERVAL: u16 = 30;
/// Default `message_timeout`.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `max_retry_count`.
pub const DEFAULT_MAX_RETRY_COUNT: u32 = 3;
/// Default `max_redeliveries`.
pub const DEFAULT_MAX_REDELIVERIES: u32 = 5;
/// Default `delivery_limit`.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;
/// Default `queue_stuck_threshold`.
pub const DEFAULT_QUEUE_STUCK_THRESHOLD: Duration = Duration::from_secs(90);
/// Default `max_consecutive_failures`.
pub const DEFAULT_MAX_CONSECUTIVE_FAILURES: u32 = 3;
/// Default `result_cache_size`.
pub const DEFAULT_RESULT_CACHE_SIZE: usize = 1000;
/// Largest `result_cache_size` accepted (the cache is allocated up front).
pub const MAX_RESULT_CACHE_SIZE: usize = 10_000_000;
/// Default `result_cache_bytes` (64 MiB of results' JSON, per handler).
pub const DEFAULT_RESULT_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Default `shutdown_timeout`.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `confirm_timeout`.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `result_publish_retry`.
pub const DEFAULT_RESULT_PUBLISH_RETRY: Duration = Duration::from_secs(10);
/// Default `max_body_size`, in bytes (4 MiB).
pub const DEFAULT_MAX_BODY_SIZE: usize = 4 * 1024 * 1024;
/// Largest `max_body_size` accepted (512 MiB, RabbitMQ's own ceiling for a message).
pub const MAX_BODY_SIZE_LIMIT: usize = 512 * 1024 * 1024;
/// Default `max_in_flight_bytes`, per handler (256 MiB).
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 256 * 1024 * 1024;
/// Default `log_level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default `log_file_prefix`.
pub const DEFAULT_LOG_FILE_PREFIX: &str = "rmq-consumer";

/// The whole runtime configuration. See the [module docs](self) for the file format.
///
/// `Debug` is safe to log: URLs print with their password masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Broker URLs (`url`, alias `conn_iddress`): one string or an array, tried in turn.
    /// Default [`DEFAULT_URL`].
    pub urls: Vec<SecretUrl>,
    /// The direct exchange results are published to (`exchange`, alias `exchange_iddress`).
    /// Default [`DEFAULT_EXCHANGE`].
    pub exchange: String,
    /// Deliveries per handler worked on at once, 1 to 65535 (the channel's `basic.qos` adds
    /// [`read_ahead`](Self::read_ahead)). Default [`DEFAULT_PREFETCH_COUNT`].
    pub prefetch_count: u16,
    /// Handler invocations in flight at once; `None` (the default) means `prefetch_count`.
    pub concurrency: Option<u16>,
    /// Deliveries the broker may send beyond `prefetch_count`, so a handler slot that frees
    /// up finds its next message already here (the channel's `basic.qos` is
    /// `prefetch_count + read_ahead`). `None` (the default) means `prefetch_count / 2`: none
    /// at a prefetch of 1, so a one-task-at-a-time worker keeps strict fair dispatch.
    pub read_ahead: Option<u16>,
    /// The first delay between connection attempts. Default
    /// [`DEFAULT_RETRY_CONNECT_INTERVAL`].
    pub retry_connect_interval: Duration,
    /// The cap of the exponential reconnect backoff; defaults to `retry_connect_interval`,
    /// i.e. a fixed interval as in the Python template. Never below `retry_connect_interval`.
    pub retry_connect_max: Duration,
    /// AMQP heartbeat in seconds (0 disables it). Default [`DEFAULT_HEARTBEAT_INTERVAL`].
    pub heartbeat_interval: u16,
    /// Time allowed for one handler invocation. Default [`DEFAULT_MESSAGE_TIMEOUT`].
    pub message_timeout: Duration,
    /// Retries of a failed message before it is dead-lettered. Default
    /// [`DEFAULT_MAX_RETRY_COUNT`].
    pub max_retry_count: u32,
    /// Deliveries of one task that may end without a settlement (the worker process died,
    /// or its connection was lost) before the task is dead-lettered as `worker_lost` instead
    /// of running again. Default [`DEFAULT_MAX_REDELIVERIES`].
    pub max_redeliveries: u32,
    /// The `x-delivery-limit` of quorum work and suspect queues: the broker dead-letters a
    /// message returned more often than this (a backstop behind `max_redeliveries`).
    /// Default [`DEFAULT_DELIVERY_LIMIT`].
    pub delivery_limit: u32,
    /// Delay before each retry (the last one repeats), each at least 1 ms; empty (the
    /// default) retries at once.
    pub retry_delays: Vec<Duration>,
    /// Time with messages waiting but none processed before the queue counts as stuck.
    /// Default [`DEFAULT_QUEUE_STUCK_THRESHOLD`].
    pub queue_stuck_threshold: Duration,
    /// Consecutive stuck-queue checks before the watchdog acts (re-subscribes, then
    /// reconnects). Default [`DEFAULT_MAX_CONSECUTIVE_FAILURES`].
    pub max_consecutive_failures: u32,
    /// Whether results are cached by task uuid. Default `false`.
    pub enable_result_cache: bool,
    /// Result cache capacity, at least 1. Default [`DEFAULT_RESULT_CACHE_SIZE`].
    pub result_cache_size: usize,
    /// Bytes of JSON the cached results of one handler may take; the least recently used go
    /// first, a larger result is not kept. Default [`DEFAULT_RESULT_CACHE_BYTES`].
    pub result_cache_bytes: usize,
    /// The type of declared queues. Default [`QueueType::Classic`].
    pub queue_type: QueueType,
    /// What a request's `reply_to` may do. Default [`ReplyToPolicy::Honour`].
    pub reply_to: ReplyToPolicy,
    /// Whether the reply queue is bound to the exchange with the reply key. Default `true`.
    pub bind_reply_queue: bool,
    /// Whether exhausted or unrecoverable messages go to a dead-letter queue. Default `true`.
    pub dead_letter: bool,
    /// Whether the engine declares its exchange, queues and bindings. `false` declares
    /// nothing: every object must exist (an administrator creates them), which the engine
    /// checks with passive declares at startup. Default `true`.
    pub declare: bool,
    /// Which exchange retry, delay, dead-letter and suspect copies are published to. Default
    /// [`PublishVia::DefaultExchange`].
    pub publish_via: PublishVia,
    /// Time allowed for in-flight handlers to finish on shutdown. Default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`].
    pub shutdown_timeout: Duration,
    /// Time to wait for a publisher confirm. Default [`DEFAULT_CONFIRM_TIMEOUT`].
    pub confirm_timeout: Duration,
    /// How long a result the broker nacked (e.g. while a quorum queue elects a new leader), or
    /// refused because the result exchange does not exist (deleted, not yet declared again),
    /// is published again, with backoff, before the attempt counts as failed and the message
    /// is retried; the handler does not run again meanwhile (the delivery keeps its slot).
    /// `0` retries no publish. Default [`DEFAULT_RESULT_PUBLISH_RETRY`].
    pub result_publish_retry: Duration,
    /// Largest accepted message body in bytes (at most [`MAX_BODY_SIZE_LIMIT`]); a larger one
    /// is dead-lettered (`body_too_large`) without being decoded. Default
    /// [`DEFAULT_MAX_BODY_SIZE`].
    pub max_body_size: usize,
    /// Memory, in bytes, the messages a handler works on at once may take: each body's length
    /// plus an upper estimate of its decoded size (a `serde_json::Value` of small objects takes
    /// ~100 times the body). A message waits for room before it is decoded; one that alone
    /// needs more is dead-lettered (`body_too_large`). Default [`DEFAULT_MAX_IN_FLIGHT_BYTES`].
    pub max_in_flight_bytes: u64,
    /// Logging.
    pub log: LogConfig,
    /// Address of the health/metrics HTTP endpoint; `None` (the default) serves none.
    pub http_addr: Option<SocketAddr>,
    /// Base URL of the RabbitMQ management API; `None` (the default) lets the CLI derive it
    /// (`https://<host>:15671` for an `amqps://` broker URL, else `http://<host>:15672`).
    pub management_url: Option<SecretUrl>,
    /// Whether the CLI may send the management login over plain `http://` to a host that is
    /// not loopback (`management_allow_http`). Default `false`.
    pub management_allow_http: bool,
    /// TLS files for `amqps://` URLs and the management API over HTTPS (`tls_ca_file`,
    /// `tls_cert_file`, `tls_key_file`), checked at load.
    pub tls: crate::tls::TlsFiles,
    /// The broker password (`password`, or `RMQ_CONSUMER_PASSWORD`, or the CLI's
    /// `--password-file`), already put into every URL of [`urls`](Self::urls); `None` when
    /// the URLs carry their own.
    pub password: Option<Password>,
    /// The queue of the only handler (`queue`, alias `b2m_queue_iddress`).
    pub queue: Option<String>,
    /// The reply queue of the only handler (`reply_queue`, alias `m2b_queue_iddress`).
    pub reply_queue: Option<String>,
    /// The reply routing key of the only handler (`reply_key`, alias `m2b_routing_key`).
    pub reply_key: Option<String>,
    /// Per-handler settings, `[consumers.<handler name>]`.
    pub consumers: BTreeMap<String, ConsumerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            urls: vec![SecretUrl::new(DEFAULT_URL)],
            exchange: DEFAULT_EXCHANGE.to_owned(),
            prefetch_count: DEFAULT_PREFETCH_COUNT,
            concurrency: None,
            read_ahead: None,
            retry_connect_interval: DEFAULT_RETRY_CONNECT_INTERVAL,
            retry_connect_max: DEFAULT_RETRY_CONNECT_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            max_retry_count: DEFAULT_MAX_RETRY_COUNT,
            max_redeliveries: DEFAULT_MAX_REDELIVERIES,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            retry_delays: Vec::new(),
            queue_stuck_threshold: DEFAULT_QUEUE_STUCK_THRESHOLD,
            max_consecutive_failures: DEFAULT_MAX_CONSECUTIVE_FAILURES,
            enable_result_cache: false,
            result_cache_size: DEFAULT_RESULT_CACHE_SIZE,
            result_cache_bytes: DEFAULT_RESULT_CACHE_BYTES,
            queue_type: QueueType::Classic,
            reply_to: ReplyToPolicy::Honour,
            bind_reply_queue: true,
            dead_letter: true,
            declare: true,
            publish_via: PublishVia::DefaultExchange,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            result_publish_retry: DEFAULT_RESULT_PUBLISH_RETRY,
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            log: LogConfig::default(),
            http_addr: None,
            management_url: None,
            management_allow_http: false,
            tls: crate::tls::TlsFiles::default(),
            password: None,
            queue: None,
            reply_queue: None,
            reply_key: None,
            consumers: BTreeMap::new(),
        }
    }
}

/// Settings of one handler, `[consumers.<handler name>]`; `None` falls back to the
/// handler's attribute, then to the top-level setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// The queue consumed.
    pub queue: Option<String>,
    /// The routing key results are published with.
    pub reply_key: Option<String>,
    /// The queue results are routed to.
    pub reply_queue: Option<String>,
    /// Deliveries this handler works on at once, 1 to 65535 (see [`Config::prefetch_count`]).
    pub prefetch: Option<u16>,
    /// Invocations in flight at once, at least 1.
    pub concurrency: Option<u16>,
    /// Deliveries read ahead beyond `prefetch` (see [`Config::read_ahead`]).
    pub read_ahead: Option<u16>,
    /// Time allowed for one invocation.
    pub timeout: Option<Duration>,
    /// Retries before dead-lettering.
    pub max_retries: Option<u32>,
    /// Unsettled deliveries before dead-lettering (see [`Config::max_redeliveries`]).
    pub max_redeliveries: Option<u32>,
    /// The quorum queues' `x-delivery-limit` (see [`Config::delivery_limit`]).
    pub delivery_limit: Option<u32>,
    /// Memory the messages in flight may take (see [`Config::max_in_flight_bytes`]).
    pub max_in_flight_bytes: Option<u64>,
    /// Delays before each retry.
    pub retry_delays: Option<Vec<Duration>>,
    /// The type of this handler's queues.
    pub queue_type: Option<QueueType>,
    /// What a request's `reply_to` may do for this handler.
    pub reply_to: Option<ReplyToPolicy>,
    /// Whether the reply queue is bound to the exchange.
    pub bind_reply_queue: Option<bool>,
    /// Whether failed messages go to a dead-letter queue.
    pub dead_letter: Option<bool>,
    /// The dead-letter queue's name.
    pub dead_letter_queue: Option<String>,
    /// Whether the engine declares this handler's queues and bindings (see
    /// [`Config::declare`]).
    pub declare: Option<bool>,
    /// Which exchange this handler's copies are published to (see [`Config::publish_via`]).
    pub publish_via: Option<PublishVia>,
    /// Whether the handler runs at all.
    pub enabled: Option<bool>,
}

/// The type of declared queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QueueType {
    /// A classic queue.
    #[default]
    Classic,
    /// A replicated quorum queue.
    Quorum,
}

impl QueueType {
    /// The name used in configuration and as the `x-queue-type` argument.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueType {
    type Err = ParseVariantError;

    /// Accepts `classic` or `quorum`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            _ => Err(ParseVariantError::new("`classic` or `quorum`", s)),
        }
    }
}

/// Which exchange the engine publishes a handler's retry, delay, dead-letter and suspect
/// copies to (the `publish_via` key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PublishVia {
    /// The default exchange (`amq.default`), routing key = the target queue's name: needs
    /// write permission on `amq.default`, which reaches every queue of the virtual host.
    #[default]
    DefaultExchange,
    /// The handler's exchange, routing key = the target queue's name: each target queue is
    /// bound to the exchange under its own name, and write permission on that exchange is
    /// enough.
    Exchange,
}

impl PublishVia {
    /// The name used in configuration.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DefaultExchange => "default_exchange",
            Self::Exchange => "exchange",
        }
    }
}

impl fmt::Display for PublishVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PublishVia {
    type Err = ParseVariantError;

    /// Accepts `default_exchange` or `exchange`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "default_exchange" => Ok(Self::DefaultExchange),
            "exchange" => Ok(Self::Exchange),
            _ => Err(ParseVariantError::new(
                "`default_exchange` or `exchange`",
                s,
            )),
        }
    }
}

/// What the engine does with a request's `reply_to` property (the `reply_to` key).
///
/// In TOML: `"honour"` (the default), `"ignore"`, or an array of prefixes; in the environment
/// the same words or the prefixes separated by commas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyToPolicy {
    /// Results go where `reply_to` names (through the default exchange), else to `reply_key`.
    #[default]
    Honour,
    /// `reply_to` is ignored: results go to `reply_key` only.
    Ignore,
    /// Only a `reply_to` starting with one of these prefixes is honoured (e.g.
    /// `amq.rabbitmq.reply-to`, `rpc.`); any other is ignored.
    Prefixes(Vec<String>),
}

impl ReplyToPolicy {
    /// Whether a request's `reply_to` may name where its result goes.
    #[must_use]
    pub fn allows(&self, reply_to: &str) -> bool {
        match self {
            Self::Honour => true,
            Self::Ignore => false,
            Self::Prefixes(prefixes) => prefixes.iter().any(|p| reply_to.starts_with(p.as_str())),
        }
    }

    fn from_words(text: &str) -> Result<Self, String> {
        match text.trim() {
            "honour" | "honor" => Ok(Self::Honour),
            "ignore" => Ok(Self::Ignore),
            _ => Err(format!(
                "expected \"honour\", \"ignore\" or a list of prefixes, got `{}`",
                shown(text)
            )),
        }
    }

    fn prefixes<'a>(items: impl Iterator<Item = &'a str>) -> Result<Self, String> {
        let prefixes: Vec<String> = items.map(str::trim).map(str::to_owned).collect();
        if prefixes.iter().any(String::is_empty) {
            return Err("a reply_to prefix must not be empty".to_owned());
        }
        Ok(Self::Prefixes(prefixes))
    }
}

/// The output format of log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name used in configuration.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = ParseVariantError;

    /// Accepts `human` or `json`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "human" => Ok(Self::Human),
            "json" => Ok(Self::Json),
            _ => Err(ParseVariantError::new("`human` or `json`", s)),
        }
    }
}

/// A string that names none of an enum's variants.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected}, got `{got}`")]
pub struct ParseVariantError {
    expected: &'static str,
    got: String,
}

impl ParseVariantError {
    fn new(expected: &'static str, got: &str) -> Self {
        Self {
            expected,
            got: shown(got),
        }
    }
}

/// Logging settings: flat `log_*` keys or a `[log]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// An `EnvFilter` directive string such as `"info"` or `"info,lapin=warn"`; `RUST_LOG`
    /// overrides it. Default [`DEFAULT_LOG_LEVEL`].
    pub level: String,
    /// Line format, console and files alike. Default [`LogFormat::Human`].
    pub format: LogFormat,
    /// Directory of daily-rotated log files; `None` (the default) logs to stderr only.
    pub dir: Option<PathBuf>,
    /// File name prefix: `<prefix>.log` and `<prefix>.error.log`. Default
    /// [`DEFAULT_LOG_FILE_PREFIX`].
    pub file_prefix: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: DEFAULT_LOG_LEVEL.to_owned(),
            format: LogFormat::Human,
            dir: None,
            file_prefix: DEFAULT_LOG_FILE_PREFIX.to_owned(),
        }
    }
}

/// A URL that may carry a password. `Debug` and `Display` print it masked
/// (`amqp://guest:****@127.0.0.1:5672/%2f`); [`expose`](Self::expose) gives the real text.
///
/// The userinfo is the text between `://` and the *last* `@`, so a password containing
/// unencoded `@`, `:`, `/`, `#` or `?` is still masked whole; the password is what follows the
/// first `:` of the userinfo. A URL without `@` has nothing to mask.
///
/// ```
/// use rmq_consumer::config::SecretUrl;
///
/// let url = SecretUrl::new("amqps://app:p@ss:w/rd@rabbit:5671/prod");
/// assert_eq!(url.to_string(), "amqps://app:****@rabbit:5671/prod");
/// assert_eq!(url.expose(), "amqps://app:p@ss:w/rd@rabbit:5671/prod");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    #[must_use]
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    /// The URL as given, password included: only for connecting, never for printing.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password replaced by `****`.
    #[must_use]
    pub fn masked(&self) -> String {
        mask_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.masked()).finish()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl From<String> for SecretUrl {
    fn from(raw: String) -> Self {
        Self(raw)
    }
}

impl From<&str> for SecretUrl {
    fn from(raw: &str) -> Self {
        Self(raw.to_owned())
    }
}

/// A password given on its own (`password`, `RMQ_CONSUMER_PASSWORD`, `--password-file`):
/// `Debug` and `Display` print `****`.
///
/// ```
/// use rmq_consumer::config::Password;
///
/// let password = Password::new("s3cret");
/// assert_eq!(format!("{password} {password:?}"), "**** ****");
/// assert_eq!(password.expose(), "s3cret");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    #[must_use]
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    /// The password itself: only for connecting, never for printing.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// The default URL without its password, for a configuration that gives `password` but no
/// `url`.
const DEFAULT_URL_WITHOUT_PASSWORD: &str = "amqp://guest@127.0.0.1:5672/%2f";

/// Puts `password` into the user info of every URL (percent-encoded; the user defaults to
/// `guest`, as in lapin).
///
/// ```
/// use rmq_consumer::config::{Password, SecretUrl, with_password};
///
/// let urls = [SecretUrl::new("amqps://app@rabbit:5671/prod")];
/// let with = with_password(&urls, &Password::new("p@ss")).unwrap();
/// assert_eq!(with[0].expose(), "amqps://app:p%40ss@rabbit:5671/prod");
/// ```
///
/// # Errors
///
/// The masked URL of the first URL that already has a password: a password given in two
/// places is a configuration problem, not something to choose between silently.
pub fn with_password(urls: &[SecretUrl], password: &Password) -> Result<Vec<SecretUrl>, String> {
    urls.iter()
        .map(|url| {
            let raw = url.expose();
            let start = raw.find("://").map_or(0, |i| i + 3);
            let (user, rest_from) = match raw.rfind('@').filter(|&at| at >= start) {
                Some(at) => {
                    let userinfo = raw.get(start..at).unwrap_or_default();
                    if userinfo.contains(':') {
                        return Err(url.masked());
                    }
                    (userinfo, at + 1)
                }
                None => ("", start),
            };
            let user = if user.is_empty() { "guest" } else { user };
            Ok(SecretUrl::new(format!(
                "{}{user}:{}@{}",
                raw.get(..start).unwrap_or_default(),
                percent_encode_userinfo(password.expose()),
                raw.get(rest_from..).unwrap_or_default()
            )))
        })
        .collect()
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Whether the URL's user info carries a password (`user:password@`).
#[must_use]
pub fn url_has_password(url: &str) -> bool {
    let start = url.find("://").map_or(0, |i| i + 3);
    url.rfind('@')
        .filter(|&at| at >= start)
        .and_then(|at| url.get(start..at))
        .is_some_and(|userinfo| userinfo.contains(':'))
}

/// Query parameters of other AMQP clients' TLS settings, with the key that replaces each.
/// lapin ignores them; accepting them silently would leave verification other than the
/// operator meant.
const TLS_QUERY_KEYS: &[(&str, &str)] = &[
    ("cacertfile", "use the `tls_ca_file` key"),
    ("certfile", "use the `tls_cert_file` key"),
    ("keyfile", "use the `tls_key_file` key"),
    (
        "verify",
        "verification is always on; set `tls_ca_file` to the CA that issued the broker's certificate",
    ),
    (
        "fail_if_no_peer_cert",
        "a server-side setting; for a client certificate set `tls_cert_file` and `tls_key_file`",
    ),
    (
        "server_name_indication",
        "the server name is always the URL's host; connect by the name in the broker's certificate",
    ),
    (
        "depth",
        "the chain is verified against `tls_ca_file` (or the system roots) without a depth limit to set",
    ),
];

/// Query parameters whose values are never secret (RabbitMQ's URI spec and lapin's); every
/// other parameter's value is masked, since some clients accept e.g. `?password=` or tokens.
const PUBLIC_QUERY_KEYS: &[&str] = &[
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
    "verify",
    "fail_if_no_peer_cert",
    "server_name_indication",
    "cacertfile",
    "certfile",
    "keyfile",
    "depth",
];

fn mask_url(raw: &str) -> String {
    let start = raw.find("://").map_or(0, |i| i + 3);
    let (mut masked, rest_from) = match raw.rfind('@').filter(|&at| at >= start) {
        Some(at) => match raw.get(start..at).and_then(|userinfo| userinfo.find(':')) {
            Some(colon) => (
                format!("{}****", raw.get(..start + colon + 1).unwrap_or_default()),
                at,
            ),
            None => (String::new(), 0),
        },
        None => (String::new(), 0),
    };
    let rest = raw.get(rest_from..).unwrap_or_default();
    match rest.split_once('?') {
        Some((before, query)) => {
            masked.push_str(before);
            masked.push('?');
            masked.push_str(&mask_query(query));
        }
        None => masked.push_str(rest),
    }
    masked
}

/// `a=1&password=x` → `a=1&password=****`: values of parameters not known to be public.
fn mask_query(query: &str) -> String {
    let (query, fragment) = query
        .split_once('#')
        .map_or((query, None), |(q, f)| (q, Some(f)));
    let mut out = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if !PUBLIC_QUERY_KEYS.contains(&key.to_ascii_lowercase().as_str()) => {
                format!("{key}=****")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    if fragment.is_some() {
        out.push_str("#****");
    }
    out
}

/// Splits a comma-separated list of URLs (`RMQ_CONSUMER_URL`): a comma separates two URLs
/// only when the next one starts with a scheme (`amqp://`, `amqps://`, ...), so a password
/// containing a comma stays inside its URL (and masked) instead of becoming a "URL" of its
/// own that an error would print.
fn split_urls(text: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut start = 0;
    for (comma, _) in text.match_indices(',') {
        let next = text.get(comma + 1..).unwrap_or_default().trim_start();
        if next.is_empty() || next.starts_with(',') || starts_with_scheme(next) {
            urls.push(text.get(start..comma).unwrap_or_default());
            start = comma + 1;
        }
    }
    urls.push(text.get(start..).unwrap_or_default());
    urls.into_iter()
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// `scheme://` at the start of `text` (RFC 3986 scheme characters).
fn starts_with_scheme(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Some keys are bad, unknown or conflicting; every problem is listed.
    #[error("{}", describe_problems(problems))]
    Invalid {
        /// Every problem found, in a stable order.
        problems: Vec<ConfigProblem>,
    },
}

fn describe_problems(problems: &[ConfigProblem]) -> String {
    let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
    format!(
        "invalid configuration ({} problem{}): {}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        list.join("; ")
    )
}

/// One bad, unknown or conflicting configuration key. `Display`: `` `key`: message ``.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key as written: `prefetch_count`, `consumers.resize.timeout`, `log.level`, or an
    /// environment variable such as `RMQ_CONSUMER_PREFETCH_COUNT`.
    pub key: String,
    /// What is wrong, in lower case; never contains a password.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

impl Config {
    /// Loads the configuration the way the runtime does.
    ///
    /// Reads the file named by `$RMQ_CONSUMER_CONFIG`, or `./rmq-consumer.toml` if that
    /// variable is unset and the file exists (no file at all means defaults), applies the
    /// `RMQ_CONSUMER_*` environment variables over it, then validates.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] if `$RMQ_CONSUMER_CONFIG` names a file that cannot be read (a
    /// missing file included) or `./rmq-consumer.toml` exists but cannot be read;
    /// [`ConfigError::Invalid`] listing every problem of the file and the environment.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_with(Vec::new())
    }

    /// [`Config::load`] with some `RMQ_CONSUMER_*` variables replaced (the CLI's
    /// `--password-file` becomes `RMQ_CONSUMER_PASSWORD`).
    pub(crate) fn load_with(overrides: Vec<(String, String)>) -> Result<Config, ConfigError> {
        let explicit = std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from);
        let path = match explicit {
            Some(path) => Some(path),
            None => {
                let default = PathBuf::from(DEFAULT_CONFIG_FILE);
                default.exists().then_some(default)
            }
        };
        let text = match &path {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let mut env = Vec::new();
        let mut problems = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().map(str::to_owned) else {
                continue;
            };
            if !name.starts_with(ENV_PREFIX) || overrides.iter().any(|(n, _)| *n == name) {
                continue;
            }
            match value.into_string() {
                Ok(value) => env.push((name, value)),
                Err(_) => problems.push(ConfigProblem {
                    key: name,
                    message: "value is not valid UTF-8".to_owned(),
                }),
            }
        }
        env.extend(overrides);
        let origin = path.as_deref().map(Path::display).map(|p| p.to_string());
        build(
            text.as_deref()
                .map(|text| (text, origin.as_deref().unwrap_or("toml"))),
            env,
            problems,
        )
    }

    /// Parses a TOML document, without looking at the environment.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] listing every problem, TOML syntax errors included.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        build(Some((text, "toml")), Vec::new(), Vec::new())
    }

    /// Builds a configuration from an optional TOML document and environment variables (full
    /// names such as `("RMQ_CONSUMER_URL", "amqp://...")`), the variables winning over the
    /// document. Variables not starting with `RMQ_CONSUMER_`, and `RMQ_CONSUMER_CONFIG`, are
    /// ignored.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] listing every problem of the document and the variables.
    pub fn from_sources(
        toml: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        build(toml.map(|text| (text, "toml")), env, Vec::new())
    }

    /// The `[consumers.<name>]` section of handler `name`, or an empty one.
    #[must_use]
    pub fn consumer(&self, name: &str) -> ConsumerConfig {
        self.consumers.get(name).cloned().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Every top-level setting: its name, then its other spellings (aliases, `[log]` keys).
const URL: &[&str] = &["url", "conn_iddress"];
const EXCHANGE: &[&str] = &["exchange", "exchange_iddress"];
const QUEUE: &[&str] = &["queue", "b2m_queue_iddress"];
const REPLY_QUEUE: &[&str] = &["reply_queue", "m2b_queue_iddress"];
const REPLY_KEY: &[&str] = &["reply_key", "m2b_routing_key"];
const LOG_LEVEL: &[&str] = &["log_level", "log.level"];
const LOG_FORMAT: &[&str] = &["log_format", "log.format"];
const LOG_DIR: &[&str] = &["log_dir", "log.dir"];
const LOG_FILE_PREFIX: &[&str] = &["log_file_prefix", "log.file_prefix"];

const TOP_LEVEL_KEYS: &[&str] = &[
    "url",
    "conn_iddress",
    "password",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "management_allow_http",
    "exchange",
    "exchange_iddress",
    "prefetch_count",
    "concurrency",
    "read_ahead",
    "retry_connect_interval",
    "retry_connect_max",
    "heartbeat_interval",
    "message_timeout",
    "max_retry_count",
    "max_redeliveries",
    "delivery_limit",
    "retry_delays",
    "queue_stuck_threshold",
    "max_consecutive_failures",
    "enable_result_cache",
    "result_cache_size",
    "result_cache_bytes",
    "queue_type",
    "reply_to",
    "bind_reply_queue",
    "dead_letter",
    "declare",
    "publish_via",
    "shutdown_timeout",
    "confirm_timeout",
    "result_publish_retry",
    "max_body_size",
    "max_in_flight_bytes",
    "log_level",
    "log_format",
    "log_dir",
    "log_file_prefix",
    "http_addr",
    "management_url",
    "queue",
    "b2m_queue_iddress",
    "reply_queue",
    "m2b_queue_iddress",
    "reply_key",
    "m2b_routing_key",
    "log",
    "consumers",
];

const LOG_TABLE_KEYS: &[&str] = &["level", "format", "dir", "file_prefix"];

const CONSUMER_KEYS: &[&str] = &[
    "queue",
    "reply_key",
    "reply_queue",
    "prefetch",
    "concurrency",
    "read_ahead",
    "timeout",
    "max_retries",
    "max_redeliveries",
    "delivery_limit",
    "max_in_flight_bytes",
    "retry_delays",
    "queue_type",
    "reply_to",
    "bind_reply_queue",
    "dead_letter",
    "declare",
    "publish_via",
    "dead_letter_queue",
    "enabled",
];

const CONSUMERS_ENV: &str = "CONSUMERS__";

fn build(
    toml: Option<(&str, &str)>,
    env: impl IntoIterator<Item = (String, String)>,
    mut problems: Vec<ConfigProblem>,
) -> Result<Config, ConfigError> {
    let table = match toml {
        Some((text, origin)) => match text.parse::<toml::Table>() {
            Ok(table) => table,
            Err(error) => {
                problems.push(syntax_problem(text, origin, &error));
                toml::Table::new()
            }
        },
        None => toml::Table::new(),
    };

    // Split the environment into top-level keys and per-consumer keys.
    let mut top_env = BTreeMap::new();
    let mut consumer_env: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, value) in env {
        let Some(suffix) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if name == CONFIG_PATH_ENV {
            continue;
        }
        if let Some(rest) = suffix.strip_prefix(CONSUMERS_ENV) {
            match rest.split_once("__") {
                Some((handler, key)) if !handler.is_empty() && !key.is_empty() => {
                    consumer_env
                        .entry(handler.to_ascii_lowercase())
                        .or_default()
                        .insert(key.to_ascii_uppercase(), value);
                }
                _ => problems.push(ConfigProblem {
                    key: name.clone(),
                    message: format!(
                        "expected {ENV_PREFIX}{CONSUMERS_ENV}<HANDLER>__<KEY>, e.g. \
                         {ENV_PREFIX}{CONSUMERS_ENV}MY_HANDLER__QUEUE"
                    ),
                }),
            }
        } else {
            top_env.insert(suffix.to_owned(), value);
        }
    }

    let mut scope = Scope {
        toml_prefix: String::new(),
        env_prefix: ENV_PREFIX.to_owned(),
        table,
        env: top_env,
        problems,
    };
    let config = scope.config(consumer_env);
    scope.report_unknown(TOP_LEVEL_KEYS);
    if scope.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            problems: scope.problems,
        })
    }
}

fn syntax_problem(text: &str, origin: &str, error: &toml::de::Error) -> ConfigProblem {
    let location = error.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .map_or(0, |line| line.chars().count())
            + 1;
        format!(" at line {line}, column {column}")
    });
    // Only the parser's message, never the source excerpt `Display` adds: the offending
    // line may hold a password.
    let message = error.message().trim().replace('\n', ", ");
    ConfigProblem {
        key: origin.to_owned(),
        message: format!(
            "TOML syntax error{}: {message}",
            location.unwrap_or_default()
        ),
    }
}

/// A raw value before conversion to its key's type.
enum Raw {
    Toml(toml::Value),
    Env(String),
}

/// One table of settings (the top level or a `[consumers.x]` section) and its environment
/// variables. Keys are removed as they are read, so what remains is unknown.
struct Scope {
    /// Prefix of TOML keys in messages: `""` or `"consumers.<name>."`.
    toml_prefix: String,
    /// Prefix of environment variable names: `"RMQ_CONSUMER_"` or
    /// `"RMQ_CONSUMER_CONSUMERS__<NAME>__"`.
    env_prefix: String,
    table: toml::Table,
    /// Upper-cased key → value.
    env: BTreeMap<String, String>,
    problems: Vec<ConfigProblem>,
}

impl Scope {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn config(&mut self, consumer_env: BTreeMap<String, BTreeMap<String, String>>) -> Config {
        let defaults = Config::default();
        let urls_read = match self.get_keyed::<Vec<SecretUrl>>(URL) {
            Some((key, urls)) => {
                if urls.is_empty() {
                    self.problem(key.clone(), "must list at least one URL");
                }
                for url in &urls {
                    if let Some(message) = amqp_url_problem(url) {
                        self.problem(key.clone(), message);
                    }
                }
                Some(urls)
            }
            None => None,
        };
        // A `url` that did not parse is reported; `password` then goes to the default URL.
        let url_given = urls_read.is_some();
        let urls = urls_read.unwrap_or(defaults.urls);
        let exchange = self.name(EXCHANGE).unwrap_or(defaults.exchange);
        let prefetch_count = self
            .int(&["prefetch_count"], 1, u16::MAX)
            .unwrap_or(defaults.prefetch_count);
        let concurrency = self.int(&["concurrency"], 1, u16::MAX);
        let read_ahead = self.int(&["read_ahead"], 0, u16::MAX);
        let retry_connect_interval = self
            .positive_duration(&["retry_connect_interval"])
            .unwrap_or(defaults.retry_connect_interval);
        let retry_connect_max = match self.get_keyed::<Duration>(&["retry_connect_max"]) {
            Some((key, max)) if max < retry_connect_interval => {
                self.problem(
                    key,
                    format!(
                        "must be at least retry_connect_interval ({}), got {}",
                        humantime::format_duration(retry_connect_interval),
                        humantime::format_duration(max)
                    ),
                );
                retry_connect_interval
            }
            Some((_, max)) => max,
            None => retry_connect_interval,
        };
        let heartbeat_interval = self
            .int(&["heartbeat_interval"], 0, u16::MAX)
            .unwrap_or(defaults.heartbeat_interval);
        let message_timeout = self
            .positive_duration(&["message_timeout"])
            .unwrap_or(defaults.message_timeout);
        let max_retry_count = self
            .int(&["max_retry_count"], 0, u32::MAX)
            .unwrap_or(defaults.max_retry_count);
        let max_redeliveries = self
            .int(&["max_redeliveries"], 0, u32::MAX)
            .unwrap_or(defaults.max_redeliveries);
        let delivery_limit = self
            .int(&["delivery_limit"], 1, u32::MAX)
            .unwrap_or(defaults.delivery_limit);
        let retry_delays = self
            .retry_delays(&["retry_delays"])
            .unwrap_or(defaults.retry_delays);
        let queue_stuck_threshold = self
            .positive_duration(&["queue_stuck_threshold"])
            .unwrap_or(defaults.queue_stuck_threshold);
        let max_consecutive_failures = self
            .int(&["max_consecutive_failures"], 1, u32::MAX)
            .unwrap_or(defaults.max_consecutive_failures);
        let enable_result_cache = self
            .get(&["enable_result_cache"])
            .unwrap_or(defaults.enable_result_cache);
        let result_cache_size = self
            .size(&["result_cache_size"], MAX_RESULT_CACHE_SIZE)
            .unwrap_or(defaults.result_cache_size);
        let result_cache_bytes = self
            .size(&["result_cache_bytes"], usize::MAX)
            .unwrap_or(defaults.result_cache_bytes);
        let queue_type = self.get(&["queue_type"]).unwrap_or(defaults.queue_type);
        let reply_to = self.get(&["reply_to"]).unwrap_or(defaults.reply_to);
        let bind_reply_queue = self
            .get(&["bind_reply_queue"])
            .unwrap_or(defaults.bind_reply_queue);
        let dead_letter = self.get(&["dead_letter"]).unwrap_or(defaults.dead_letter);
        let declare = self.get(&["declare"]).unwrap_or(defaults.declare);
        let publish_via = self.get(&["publish_via"]).unwrap_or(defaults.publish_via);
        let shutdown_timeout = self
            .get(&["shutdown_timeout"])
            .unwrap_or(defaults.shutdown_timeout);
        let confirm_timeout = self
            .positive_duration(&["confirm_timeout"])
            .unwrap_or(defaults.confirm_timeout);
        let result_publish_retry = self
            .get(&["result_publish_retry"])
            .unwrap_or(defaults.result_publish_retry);
        let max_body_size = self
            .size(&["max_body_size"], MAX_BODY_SIZE_LIMIT)
            .unwrap_or(defaults.max_body_size);
        let max_in_flight_bytes = self
            .int(&["max_in_flight_bytes"], 1, u64::MAX)
            .unwrap_or(defaults.max_in_flight_bytes);
        let log = self.log_config();
        let http_addr = self.get(&["http_addr"]);
        let management_url = match self.get_keyed::<SecretUrl>(&["management_url"]) {
            Some((key, url)) => {
                if let Some(message) = http_url_problem(&url) {
                    self.problem(key, message);
                }
                Some(url)
            }
            None => None,
        };
        let management_allow_http = self
            .get(&["management_allow_http"])
            .unwrap_or(defaults.management_allow_http);
        let tls = self.tls_files();
        let (urls, password) = self.password(urls, url_given);
        let queue = self.name(QUEUE);
        let reply_queue = self.name(REPLY_QUEUE);
        let reply_key = self.get(REPLY_KEY);
        let consumers = self.consumers(consumer_env);

        Config {
            urls,
            exchange,
            prefetch_count,
            concurrency,
            read_ahead,
            retry_connect_interval,
            retry_connect_max,
            heartbeat_interval,
            message_timeout,
            max_retry_count,
            max_redeliveries,
            delivery_limit,
            retry_delays,
            queue_stuck_threshold,
            max_consecutive_failures,
            enable_result_cache,
            result_cache_size,
            result_cache_bytes,
            queue_type,
            reply_to,
            bind_reply_queue,
            dead_letter,
            declare,
            publish_via,
            shutdown_timeout,
            confirm_timeout,
            result_publish_retry,
            max_body_size,
            max_in_flight_bytes,
            log,
            http_addr,
            management_url,
            management_allow_http,
            tls,
            password,
            queue,
            reply_queue,
            reply_key,
            consumers,
        }
    }

    /// `tls_ca_file`, `tls_cert_file`, `tls_key_file`, checked: readable, PEM, the key
    /// matches the certificate. Problems name the key as written and the path.
    fn tls_files(&mut self) -> crate::tls::TlsFiles {
        let ca = self.get_keyed::<PathBuf>(&["tls_ca_file"]);
        let cert = self.get_keyed::<PathBuf>(&["tls_cert_file"]);
        let key = self.get_keyed::<PathBuf>(&["tls_key_file"]);
        // A problem names the key as written (`tls_ca_file` or `RMQ_CONSUMER_TLS_CA_FILE`);
        // a key that is missing, by its name.
        let spelled = |name: &'static str| {
            let given = match name {
                "tls_ca_file" => ca.as_ref(),
                "tls_cert_file" => cert.as_ref(),
                _ => key.as_ref(),
            };
            given.map_or_else(|| name.to_owned(), |(written, _)| written.clone())
        };
        let files = crate::tls::TlsFiles {
            ca_file: ca.as_ref().map(|(_, path)| path.clone()),
            cert_file: cert.as_ref().map(|(_, path)| path.clone()),
            key_file: key.as_ref().map(|(_, path)| path.clone()),
        };
        for problem in files.problems() {
            self.problem(spelled(problem.key()), problem.message());
        }
        files
    }

    /// `password` (`RMQ_CONSUMER_PASSWORD`), put into every URL; a URL that has its own
    /// password as well is a problem.
    fn password(
        &mut self,
        urls: Vec<SecretUrl>,
        url_given: bool,
    ) -> (Vec<SecretUrl>, Option<Password>) {
        let Some((key, password)) = self.get_keyed::<Password>(&["password"]) else {
            return (urls, None);
        };
        let urls = if url_given {
            urls
        } else {
            vec![SecretUrl::new(DEFAULT_URL_WITHOUT_PASSWORD)]
        };
        match with_password(&urls, &password) {
            Ok(with) => (with, Some(password)),
            Err(masked) => {
                self.problem(
                    key,
                    format!(
                        "URL `{masked}` has a password of its own; give the password in one \
                         place (remove it from the URL, or unset this key)"
                    ),
                );
                (urls, Some(password))
            }
        }
    }

    fn log_config(&mut self) -> LogConfig {
        let defaults = LogConfig::default();
        let level = match self.get_keyed::<String>(LOG_LEVEL) {
            Some((key, level)) => {
                if let Err(error) = tracing_subscriber::EnvFilter::try_new(&level) {
                    self.problem(key, format!("invalid filter `{}` ({error})", shown(&level)));
                }
                level
            }
            None => defaults.level,
        };
        let format = self.get(LOG_FORMAT).unwrap_or(defaults.format);
        let dir = self.get::<PathBuf>(LOG_DIR);
        let file_prefix = match self.get_keyed::<String>(LOG_FILE_PREFIX) {
            Some((key, prefix)) => {
                if prefix.is_empty() || prefix.contains(['/', '\\']) {
                    self.problem(key, "must be a non-empty file name without `/` or `\\`");
                }
                prefix
            }
            None => defaults.file_prefix,
        };
        // Whatever is left in `[log]` is unknown.
        match self.table.remove("log") {
            Some(toml::Value::Table(rest)) => {
                for key in rest.keys() {
                    let message = unknown_message(key, LOG_TABLE_KEYS, "");
                    self.problem(format!("{}log.{key}", self.toml_prefix), message);
                }
            }
            Some(other) => self.problem(
                "log",
                format!("expected a table, got {}", toml_type(&other)),
            ),
            None => {}
        }
        LogConfig {
            level,
            format,
            dir,
            file_prefix,
        }
    }

    fn consumers(
        &mut self,
        mut env: BTreeMap<String, BTreeMap<String, String>>,
    ) -> BTreeMap<String, ConsumerConfig> {
        let mut sections = toml::Table::new();
        match self.table.remove("consumers") {
            Some(toml::Value::Table(table)) => sections = table,
            Some(other) => self.problem(
                "consumers",
                format!(
                    "expected a table of [consumers.<handler>] sections, got {}",
                    toml_type(&other)
                ),
            ),
            None => {}
        }
        let mut names: Vec<String> = sections.keys().cloned().collect();
        names.extend(env.keys().filter(|n| !sections.contains_key(*n)).cloned());

        let mut consumers = BTreeMap::new();
        for name in names {
            let table = match sections.remove(&name) {
                Some(toml::Value::Table(table)) => table,
                Some(other) => {
                    self.problem(
                        format!("consumers.{name}"),
                        format!("expected a table, got {}", toml_type(&other)),
                    );
                    toml::Table::new()
                }
                None => toml::Table::new(),
            };
            let mut scope = Scope {
                toml_prefix: format!("consumers.{name}."),
                env_prefix: format!("{ENV_PREFIX}{CONSUMERS_ENV}{}__", name.to_ascii_uppercase()),
                table,
                env: env.remove(&name).unwrap_or_default(),
                problems: Vec::new(),
            };
            let consumer = scope.consumer();
            scope.report_unknown(CONSUMER_KEYS);
            self.problems.append(&mut scope.problems);
            consumers.insert(name, consumer);
        }
        consumers
    }

    fn consumer(&mut self) -> ConsumerConfig {
        ConsumerConfig {
            queue: self.name(&["queue"]),
            reply_key: self.get(&["reply_key"]),
            reply_queue: self.name(&["reply_queue"]),
            prefetch: self.int(&["prefetch"], 1, u16::MAX),
            concurrency: self.int(&["concurrency"], 1, u16::MAX),
            read_ahead: self.int(&["read_ahead"], 0, u16::MAX),
            timeout: self.positive_duration(&["timeout"]),
            max_retries: self.int(&["max_retries"], 0, u32::MAX),
            max_redeliveries: self.int(&["max_redeliveries"], 0, u32::MAX),
            delivery_limit: self.int(&["delivery_limit"], 1, u32::MAX),
            max_in_flight_bytes: self.int(&["max_in_flight_bytes"], 1, u64::MAX),
            retry_delays: self.retry_delays(&["retry_delays"]),
            queue_type: self.get(&["queue_type"]),
            reply_to: self.get(&["reply_to"]),
            bind_reply_queue: self.get(&["bind_reply_queue"]),
            dead_letter: self.get(&["dead_letter"]),
            dead_letter_queue: self.name(&["dead_letter_queue"]),
            declare: self.get(&["declare"]),
            publish_via: self.get(&["publish_via"]),
            enabled: self.get(&["enabled"]),
        }
    }

    fn report_unknown(&mut self, known: &[&str]) {
        let keys: Vec<String> = self.table.keys().cloned().collect();
        for key in keys {
            let message = unknown_message(&key, known, "");
            self.problem(format!("{}{key}", self.toml_prefix), message);
        }
        let known_env: Vec<String> = known
            .iter()
            .filter(|k| !matches!(**k, "log" | "consumers"))
            .map(|k| k.to_ascii_uppercase())
            .collect();
        let known_env: Vec<&str> = known_env.iter().map(String::as_str).collect();
        let vars: Vec<String> = self.env.keys().cloned().collect();
        for var in vars {
            let message = unknown_message(&var, &known_env, &self.env_prefix);
            self.problem(format!("{}{var}", self.env_prefix), message);
        }
        self.table.clear();
        self.env.clear();
    }

    /// Removes every spelling of one setting and returns the effective one (the environment
    /// wins over the file), reporting spellings given twice.
    fn take(&mut self, names: &[&str]) -> Option<(String, Raw)> {
        let mut from_toml: Option<(String, toml::Value)> = None;
        for name in names {
            let value = match name.split_once('.') {
                Some((table, key)) => match self.table.get_mut(table) {
                    Some(toml::Value::Table(table)) => table.remove(key),
                    _ => None,
                },
                None => self.table.remove(*name),
            };
            if let Some(value) = value {
                let key = format!("{}{name}", self.toml_prefix);
                match &from_toml {
                    Some((first, _)) => {
                        let message = format!("`{first}` is also set; keep only one of them");
                        self.problem(key, message);
                    }
                    None => from_toml = Some((key, value)),
                }
            }
        }
        let mut from_env: Option<(String, String)> = None;
        for name in names.iter().filter(|name| !name.contains('.')) {
            let upper = name.to_ascii_uppercase();
            if let Some(value) = self.env.remove(&upper) {
                let key = format!("{}{upper}", self.env_prefix);
                match &from_env {
                    Some((first, _)) => {
                        let message = format!("`{first}` is also set; keep only one of them");
                        self.problem(key, message);
                    }
                    None => from_env = Some((key, value)),
                }
            }
        }
        match (from_env, from_toml) {
            (Some((key, value)), _) => Some((key, Raw::Env(value))),
            (None, Some((key, value))) => Some((key, Raw::Toml(value))),
            (None, None) => None,
        }
    }

    fn get_keyed<T: FromConfigValue>(&mut self, names: &[&str]) -> Option<(String, T)> {
        let (key, raw) = self.take(names)?;
        let parsed = match &raw {
            Raw::Toml(value) => T::from_toml(value),
            Raw::Env(text) => T::from_env(text),
        };
        match parsed {
            Ok(value) => Some((key, value)),
            Err(message) => {
                self.problem(key, message);
                None
            }
        }
    }

    fn get<T: FromConfigValue>(&mut self, names: &[&str]) -> Option<T> {
        self.get_keyed(names).map(|(_, value)| value)
    }

    /// A queue or exchange name: must not be empty.
    fn name(&mut self, names: &[&str]) -> Option<String> {
        let (key, name) = self.get_keyed::<String>(names)?;
        if name.is_empty() {
            self.problem(key, "must not be empty");
            return None;
        }
        Some(name)
    }

    fn positive_duration(&mut self, names: &[&str]) -> Option<Duration> {
        let (key, duration) = self.get_keyed::<Duration>(names)?;
        if duration.is_zero() {
            self.problem(key, "must be greater than zero");
            return None;
        }
        Some(duration)
    }

    /// Retry delays: each becomes a queue's message TTL in milliseconds, so at least 1 ms.
    fn retry_delays(&mut self, names: &[&str]) -> Option<Vec<Duration>> {
        let (key, delays) = self.get_keyed::<Vec<Duration>>(names)?;
        if delays.iter().any(|delay| delay.as_millis() == 0) {
            self.problem(key, "every delay must be at least 1ms");
            return None;
        }
        Some(delays)
    }

    fn int<T>(&mut self, names: &[&str], min: T, max: T) -> Option<T>
    where
        T: Copy + fmt::Display + Into<i128> + TryFrom<i128>,
    {
        let (key, value) = self.get_keyed::<i128>(names)?;
        let converted = T::try_from(value)
            .ok()
            .filter(|v| (min.into()..=max.into()).contains(&(*v).into()));
        if converted.is_none() {
            self.problem(key, range_message(value, min.into(), max.into()));
        }
        converted
    }

    /// A positive `usize` up to `max`.
    fn size(&mut self, names: &[&str], max: usize) -> Option<usize> {
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        self.int(names, 1, max)
            .and_then(|value| usize::try_from(value).ok())
    }
}

fn range_message(value: i128, min: i128, max: i128) -> String {
    if max == i128::from(u32::MAX) || max == i128::from(u64::MAX) {
        format!("must be at least {min}, got {value}")
    } else {
        format!("must be between {min} and {max}, got {value}")
    }
}

fn unknown_message(key: &str, known: &[&str], prefix: &str) -> String {
    let noun = if prefix.is_empty() {
        "unknown key"
    } else {
        "unknown variable"
    };
    let suggestion = known
        .iter()
        .map(|candidate| {
            (
                levenshtein(&key.to_ascii_lowercase(), &candidate.to_ascii_lowercase()),
                candidate,
            )
        })
        // At most two edits, and not more than half the candidate (`foo` is not `log`).
        .filter(|(distance, candidate)| *distance <= 2 && 2 * *distance <= candidate.len())
        .min_by_key(|(distance, _)| *distance);
    match suggestion {
        Some((_, candidate)) => format!("{noun} (did you mean `{prefix}{candidate}`?)"),
        None => noun.to_owned(),
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// A value for a message: truncated, and masked if it looks like a URL with credentials.
fn shown(text: &str) -> String {
    let text = if text.contains('@') || text.contains("://") {
        mask_url(text)
    } else {
        text.to_owned()
    };
    if text.chars().count() > 60 {
        let mut short: String = text.chars().take(57).collect();
        short.push_str("...");
        short
    } else {
        text
    }
}

fn toml_type(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn amqp_url_problem(url: &SecretUrl) -> Option<String> {
    let raw = url.expose();
    let lower = raw.to_ascii_lowercase();
    if !(lower.starts_with("amqp://") || lower.starts_with("amqps://")) {
        return Some(format!(
            "must be an amqp:// or amqps:// URL, got `{}`",
            url.masked()
        ));
    }
    if let Err(error) = lapin::uri::AMQPUri::from_str(raw) {
        // The parser's messages may quote the URL; keep only ones that cannot.
        let reason = if error.contains(raw) || error.contains('@') || error.contains("://") {
            "cannot be parsed".to_owned()
        } else {
            error.to_lowercase()
        };
        return Some(format!(
            "is not a valid AMQP URL ({reason}): `{}`",
            url.masked()
        ));
    }
    if let Some((_, query)) = raw.split_once('?') {
        for pair in query.split('#').next().unwrap_or_default().split('&') {
            let name = pair
                .split('=')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if let Some((param, instead)) = TLS_QUERY_KEYS.iter().find(|(param, _)| *param == name)
            {
                return Some(format!(
                    "query parameter `{param}` is not supported ({instead}): `{}`",
                    url.masked()
                ));
            }
        }
    }
    let host_start = raw
        .rfind('@')
        .map_or_else(|| raw.find("://").map_or(0, |i| i + 3), |at| at + 1);
    if raw[host_start..].starts_with('[') {
        return Some(format!(
            "IPv6 address hosts are not supported (lapin's URL parser would connect to \
             localhost); use a host name: `{}`",
            url.masked()
        ));
    }
    None
}

fn http_url_problem(url: &SecretUrl) -> Option<String> {
    let lower = url.expose().to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => None,
        _ => Some(format!(
            "must be an http:// or https:// URL with a host, got `{}`",
            url.masked()
        )),
    }
}

/// Conversion of a raw value to a key's type; the error is the problem's message.
trait FromConfigValue: Sized {
    fn from_toml(value: &toml::Value) -> Result<Self, String>;
    fn from_env(text: &str) -> Result<Self, String>;
}

fn expected(what: &str, value: &toml::Value) -> String {
    format!("expected {what}, got {}", toml_type(value))
}

impl FromConfigValue for i128 {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(n) => Ok(i128::from(*n)),
            other => Err(expected("an integer", other)),
        }
    }

    fn from_env(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("expected an integer, got `{}`", shown(text)))
    }
}

impl FromConfigValue for bool {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Boolean(b) => Ok(*b),
            other => Err(expected("a boolean", other)),
        }
    }

    fn from_env(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(format!(
                "expected `true`, `false`, `1` or `0`, got `{}`",
                shown(text)
            )),
        }
    }
}

impl FromConfigValue for String {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => Ok(s.clone()),
            other => Err(expected("a string", other)),
        }
    }

    fn from_env(text: &str) -> Result<Self, String> {
        Ok(text.to_owned())
    }
}

impl FromConfigValue for PathBuf {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        String::from_toml(value).and_then(|s| Self::from_env(&s))
    }

    fn from_env(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(PathBuf::from(text))
        }
    }
}

impl FromConfigValue for Password {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => Self::from_env(s),
            other => Err(expected("a string", other)),
        }
    }

    fn from_env(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(Password::new(text))
        }
    }
}

impl FromConfigValue for SecretUrl {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        String::from_toml(value).map(SecretUrl)
    }

    fn from_env(text: &str) -> Result<Self, String> {
        Ok(SecretUrl::new(text.trim()))
    }
}

impl FromConfigValue for Vec<SecretUrl> {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        let what = "a URL string or an array of URL strings";
        match value {
            toml::Value::String(s) => Ok(vec![SecretUrl::new(s.clone())]),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok(SecretUrl::new(s.clone())),
                    other => Err(format!(
                        "expected {what}, got an array containing {}",
                        toml_type(other)
                    )),
                })
                .collect(),
            other => Err(expected(what, other)),
        }
    }

    fn from_env(text: &str) -> Result<Self, String> {
        Ok(split_urls(text).into_iter().map(SecretUrl::new).collect())
    }
}

/// The longest duration any key accepts: longer ones are mistakes, and would overflow the
/// clock arithmetic (`Instant + duration`) at run time.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// `duration` if it is at most [`MAX_DURATION`].
fn at_most_a_year(duration: Duration) -> Result<Duration, String> {
    if duration > MAX_DURATION {
        Err(format!(
            "must be at most 366 days, got {}",
            humantime::format_duration(duration)
        ))
    } else {
        Ok(duration)
    }
}

impl FromConfigValue for Duration {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        Self::from_toml_unbounded(value).and_then(at_most_a_year)
    }

    fn from_env(text: &str) -> Result<Self, String> {
        Self::from_env_unbounded(text).and_then(at_most_a_year)
    }
}

/// Duration parsing before the bound.
trait UnboundedDuration: Sized {
    fn from_toml_unbounded(value: &toml::Value) -> Result<Self, String>;
    fn from_env_unbounded(text: &str) -> Result<Self, String>;
}

impl UnboundedDuration for Duration {
    fn from_toml_unbounded(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(n) => u64::try_from(*n)
                .map(Duration::from_secs)
                .map_err(|_| format!("must not be negative, got {n}")),
            toml::Value::Float(secs) => float_seconds(*secs),
            toml::Value::String(s) => Self::from_env_unbounded(s),
            other => Err(expected(
                "a duration (seconds, or a string like \"500ms\" or \"2m\")",
                other,
            )),
        }
    }

    fn from_env_unbounded(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(secs) = text.parse::<u64>() {
            return Ok(Duration::from_secs(secs));
        }
        if let Ok(secs) = text.parse::<f64>() {
            return float_seconds(secs);
        }
        humantime::parse_duration(text).map_err(|error| {
            format!(
                "expected a duration like \"30s\", \"500ms\" or \"2m\", got `{}` ({error})",
                shown(text)
            )
        })
    }
}

fn float_seconds(secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("expected a non-negative number of seconds, got {secs}"))
}

impl FromConfigValue for Vec<Duration> {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Array(items) => items.iter().map(Duration::from_toml).collect(),
            toml::Value::String(s) => Self::from_env(s),
            other => Err(expected("an array of durations", other)),
        }
    }

    fn from_env(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Duration::from_env)
            .collect()
    }
}

impl FromConfigValue for ReplyToPolicy {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => Self::from_words(s),
            toml::Value::Array(items) => Self::prefixes(
                items
                    .iter()
                    .map(|item| item.as_str().ok_or_else(|| expected("a string", item)))
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter(),
            ),
            other => Err(expected(
                "\"honour\", \"ignore\" or an array of prefixes",
                other,
            )),
        }
    }

    fn from_env(text: &str) -> Result<Self, String> {
        Self::from_words(text).or_else(|_| Self::prefixes(text.split(',')))
    }
}

impl FromConfigValue for QueueType {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        String::from_toml(value).and_then(|s| Self::from_env(&s))
    }

    fn from_env(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|error: ParseVariantError| error.to_string())
    }
}

impl FromConfigValue for PublishVia {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        String::from_toml(value).and_then(|s| Self::from_env(&s))
    }

    fn from_env(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|error: ParseVariantError| error.to_string())
    }
}

impl FromConfigValue for LogFormat {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        String::from_toml(value).and_then(|s| Self::from_env(&s))
    }

    fn from_env(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|error: ParseVariantError| error.to_string())
    }
}

impl FromConfigValue for SocketAddr {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        String::from_toml(value).and_then(|s| Self::from_env(&s))
    }

    fn from_env(text: &str) -> Result<Self, String> {
        text.trim().parse().map_err(|_| {
            format!(
                "expected an address like `127.0.0.1:9090`, got `{}`",
                shown(text)
            )
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn problems(result: Result<Config, ConfigError>) -> Vec<ConfigProblem> {
        match result {
            Err(ConfigError::Invalid { problems }) => problems,
            Err(other) => panic!("unexpected error: {other}"),
            Ok(config) => panic!("expected problems, got {config:?}"),
        }
    }

    fn problem_for<'a>(problems: &'a [ConfigProblem], key: &str) -> &'a ConfigProblem {
        problems
            .iter()
            .find(|p| p.key == key)
            .unwrap_or_else(|| panic!("no problem for `{key}` in {problems:?}"))
    }

    #[test]
    fn defaults() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(Config::from_sources(None, Vec::new()).unwrap(), config);
        assert_eq!(config.urls, vec![SecretUrl::new(DEFAULT_URL)]);
        assert_eq!(config.exchange, "rmq-consumer");
        assert_eq!(config.prefetch_count, 4);
        assert_eq!(config.concurrency, None);
        assert_eq!(config.read_ahead, None);
        assert_eq!(config.retry_connect_interval, Duration::from_secs(30));
        assert_eq!(config.retry_connect_max, Duration::from_secs(30));
        assert_eq!(config.heartbeat_interval, 30);
        assert_eq!(config.message_timeout, Duration::from_secs(300));
        assert_eq!(config.max_retry_count, 3);
        assert!(config.retry_delays.is_empty());
        assert_eq!(config.queue_stuck_threshold, Duration::from_secs(90));
        assert_eq!(config.max_consecutive_failures, 3);
        assert!(!config.enable_result_cache);
        assert_eq!(config.result_cache_size, 1000);
        assert_eq!(config.queue_type, QueueType::Classic);
        assert!(config.bind_reply_queue);
        assert!(config.dead_letter);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.confirm_timeout, Duration::from_secs(30));
        assert_eq!(config.max_body_size, 4 * 1024 * 1024);
        assert_eq!(config.max_in_flight_bytes, 256 * 1024 * 1024);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.log.format, LogFormat::Human);
        assert_eq!(config.log.dir, None);
        assert_eq!(config.log.file_prefix, "rmq-consumer");
        assert_eq!(config.http_addr, None);
        assert_eq!(config.management_url, None);
        assert_eq!(config.queue, None);
        assert!(config.consumers.is_empty());
        assert_eq!(config.consumer("anything"), ConsumerConfig::default());
    }

    #[test]
    fn full_toml() {
        let config = Config::from_toml_str(
            r#"
            url = ["amqp://a:pa@rabbit-1:5672/%2f", "amqps://a:pa@rabbit-2:5671/prod"]
            exchange = "media"
            prefetch_count = 16
            concurrency = 8
            read_ahead = 0
            retry_connect_interval = "2s"
            retry_connect_max = "1m"
            heartbeat_interval = 0
            message_timeout = 60
            max_retry_count = 5
            retry_delays = ["1s", 10, 60.5]
            queue_stuck_threshold = "3m"
            max_consecutive_failures = 2
            enable_result_cache = true
            result_cache_size = 50
            queue_type = "Quorum"
            bind_reply_queue = false
            dead_letter = false
            shutdown_timeout = "0s"
            confirm_timeout = "5s"
            result_publish_retry = "0s"
            max_body_size = 1024
            log_level = "debug,lapin=info"
            log_format = "json"
            log_dir = "/var/log/app"
            log_file_prefix = "media"
            http_addr = "0.0.0.0:9090"
            management_url = "http://a:pa@rabbit-1:15672"
            queue = "in"
            reply_queue = "out"
            reply_key = "out.key"

            [consumers.resize]
            queue = "media.resize"
            reply_key = "media.resized"
            reply_queue = "media.resized"
            prefetch = 2
            concurrency = 1
            read_ahead = 3
            timeout = "30s"
            max_retries = 0
            retry_delays = []
            queue_type = "classic"
            bind_reply_queue = true
            dead_letter = true
            dead_letter_queue = "media.resize.dlq"
            enabled = false
            "#,
        )
        .unwrap();
        assert_eq!(
            config.urls,
            vec![
                SecretUrl::new("amqp://a:pa@rabbit-1:5672/%2f"),
                SecretUrl::new("amqps://a:pa@rabbit-2:5671/prod"),
            ]
        );
        assert_eq!(config.exchange, "media");
        assert_eq!(config.prefetch_count, 16);
        assert_eq!(config.concurrency, Some(8));
        assert_eq!(config.read_ahead, Some(0));
        assert_eq!(config.retry_connect_interval, Duration::from_secs(2));
        assert_eq!(config.retry_connect_max, Duration::from_secs(60));
        assert_eq!(config.heartbeat_interval, 0);
        assert_eq!(config.message_timeout, Duration::from_secs(60));
        assert_eq!(config.max_retry_count, 5);
        assert_eq!(
            config.retry_delays,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_millis(60_500)
            ]
        );
        assert_eq!(config.queue_stuck_threshold, Duration::from_secs(180));
        assert_eq!(config.max_consecutive_failures, 2);
        assert!(config.enable_result_cache);
        assert_eq!(config.result_cache_size, 50);
        assert_eq!(config.queue_type, QueueType::Quorum);
        assert!(!config.bind_reply_queue);
        assert!(!config.dead_letter);
        assert_eq!(config.shutdown_timeout, Duration::ZERO);
        assert_eq!(config.confirm_timeout, Duration::from_secs(5));
        assert_eq!(config.result_publish_retry, Duration::ZERO);
        assert_eq!(config.max_body_size, 1024);
        assert_eq!(
            config.log,
            LogConfig {
                level: "debug,lapin=info".to_owned(),
                format: LogFormat::Json,
                dir: Some(PathBuf::from("/var/log/app")),
                file_prefix: "media".to_owned(),
            }
        );
        assert_eq!(config.http_addr, Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(
            config.management_url,
            Some(SecretUrl::new("http://a:pa@rabbit-1:15672"))
        );
        assert_eq!(config.queue.as_deref(), Some("in"));
        assert_eq!(config.reply_queue.as_deref(), Some("out"));
        assert_eq!(config.reply_key.as_deref(), Some("out.key"));
        assert_eq!(
            config.consumer("resize"),
            ConsumerConfig {
                queue: Some("media.resize".to_owned()),
                reply_key: Some("media.resized".to_owned()),
                reply_queue: Some("media.resized".to_owned()),
                prefetch: Some(2),
                concurrency: Some(1),
                read_ahead: Some(3),
                timeout: Some(Duration::from_secs(30)),
                max_retries: Some(0),
                max_redeliveries: None,
                delivery_limit: None,
                max_in_flight_bytes: None,
                retry_delays: Some(Vec::new()),
                queue_type: Some(QueueType::Classic),
                reply_to: None,
                bind_reply_queue: Some(true),
                dead_letter: Some(true),
                dead_letter_queue: Some("media.resize.dlq".to_owned()),
                declare: None,
                publish_via: None,
                enabled: Some(false),
            }
        );
    }

    #[test]
    fn declare_and_publish_via_globally_and_per_handler() {
        let config = Config::from_sources(None, []).unwrap();
        assert!(config.declare);
        assert_eq!(config.publish_via, PublishVia::DefaultExchange);
        let config = Config::from_sources(
            Some(
                r#"
            declare = false
            publish_via = "exchange"
            [consumers.a]
            declare = true
            publish_via = "default_exchange"
            "#,
            ),
            [(
                "RMQ_CONSUMER_CONSUMERS__B__PUBLISH_VIA".to_owned(),
                "Exchange".to_owned(),
            )],
        )
        .unwrap();
        assert!(!config.declare);
        assert_eq!(config.publish_via, PublishVia::Exchange);
        assert_eq!(config.consumer("a").declare, Some(true));
        assert_eq!(
            config.consumer("a").publish_via,
            Some(PublishVia::DefaultExchange)
        );
        assert_eq!(config.consumer("b").publish_via, Some(PublishVia::Exchange));
        let error = Config::from_sources(Some(r#"publish_via = "amq.default""#), [])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("publish_via") && error.contains("`default_exchange` or `exchange`"),
            "{error}"
        );
    }

    #[test]
    fn reply_to_policies_parse() {
        let config = Config::from_toml_str(
            r#"
            reply_to = ["amq.rabbitmq.reply-to", "rpc."]
            [consumers.a]
            reply_to = "ignore"
            [consumers.b]
            reply_to = "honour"
            "#,
        )
        .unwrap();
        let prefixes =
            ReplyToPolicy::Prefixes(vec!["amq.rabbitmq.reply-to".to_owned(), "rpc.".to_owned()]);
        assert_eq!(config.reply_to, prefixes);
        assert!(prefixes.allows("rpc.client-7") && !prefixes.allows("tasks.other"));
        assert_eq!(config.consumer("a").reply_to, Some(ReplyToPolicy::Ignore));
        assert_eq!(config.consumer("b").reply_to, Some(ReplyToPolicy::Honour));
        assert!(!ReplyToPolicy::Ignore.allows("anything"));
        assert_eq!(
            ReplyToPolicy::from_env("rpc., amq.rabbitmq.reply-to"),
            Ok(ReplyToPolicy::Prefixes(vec![
                "rpc.".to_owned(),
                "amq.rabbitmq.reply-to".to_owned()
            ]))
        );
        for bad in [
            "reply_to = 3",
            "reply_to = [\"\"]",
            "reply_to = \"sometimes\"",
        ] {
            assert!(Config::from_toml_str(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn python_template_keys_load() {
        let config = Config::from_toml_str(
            r#"
            conn_iddress = "amqp://username:password@rabbit:5672/vhost"
            exchange_iddress = "your.exchange.name"
            b2m_queue_iddress = "your.consumer.queue"
            m2b_queue_iddress = "your.response.queue"
            m2b_routing_key = "your.response.routing.key"
            prefetch_count = 4
            retry_connect_interval = 30
            heartbeat_interval = 30
            message_timeout = 300
            max_retry_count = 3
            queue_stuck_threshold = 90
            max_consecutive_failures = 3
            enable_result_cache = false
            result_cache_size = 1000
            "#,
        )
        .unwrap();
        assert_eq!(
            config.urls,
            vec![SecretUrl::new("amqp://username:password@rabbit:5672/vhost")]
        );
        assert_eq!(config.exchange, "your.exchange.name");
        assert_eq!(config.queue.as_deref(), Some("your.consumer.queue"));
        assert_eq!(config.reply_queue.as_deref(), Some("your.response.queue"));
        assert_eq!(
            config.reply_key.as_deref(),
            Some("your.response.routing.key")
        );
        assert_eq!(config.retry_connect_interval, Duration::from_secs(30));
        assert_eq!(config.message_timeout, Duration::from_secs(300));
    }

    #[test]
    fn aliases_and_names_are_equivalent() {
        let by_alias = Config::from_toml_str(
            r#"
            conn_iddress = "amqp://u:p@h/v"
            exchange_iddress = "x"
            b2m_queue_iddress = "q"
            m2b_queue_iddress = "rq"
            m2b_routing_key = "rk"
            "#,
        )
        .unwrap();
        let by_name = Config::from_toml_str(
            r#"
            url = "amqp://u:p@h/v"
            exchange = "x"
            queue = "q"
            reply_queue = "rq"
            reply_key = "rk"
            "#,
        )
        .unwrap();
        assert_eq!(by_alias, by_name);
        let by_env = Config::from_sources(
            None,
            env(&[
                ("RMQ_CONSUMER_CONN_IDDRESS", "amqp://u:p@h/v"),
                ("RMQ_CONSUMER_EXCHANGE_IDDRESS", "x"),
                ("RMQ_CONSUMER_B2M_QUEUE_IDDRESS", "q"),
                ("RMQ_CONSUMER_M2B_QUEUE_IDDRESS", "rq"),
                ("RMQ_CONSUMER_M2B_ROUTING_KEY", "rk"),
            ]),
        )
        .unwrap();
        assert_eq!(by_env, by_name);
    }

    #[test]
    fn alias_and_name_together_is_a_problem() {
        let problems = problems(Config::from_sources(
            Some(
                r#"
                url = "amqp://u:p@h/v"
                conn_iddress = "amqp://u:p@h/v"
                log_level = "info"
                [log]
                level = "debug"
                "#,
            ),
            env(&[
                ("RMQ_CONSUMER_QUEUE", "a"),
                ("RMQ_CONSUMER_B2M_QUEUE_IDDRESS", "b"),
            ]),
        ));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(
            problem_for(&problems, "conn_iddress").message,
            "`url` is also set; keep only one of them"
        );
        assert_eq!(
            problem_for(&problems, "log.level").message,
            "`log_level` is also set; keep only one of them"
        );
        problem_for(&problems, "RMQ_CONSUMER_B2M_QUEUE_IDDRESS");
    }

    #[test]
    fn env_overrides_file() {
        let config = Config::from_sources(
            Some(
                r#"
                conn_iddress = "amqp://file:file@file-host/v"
                prefetch_count = 2
                enable_result_cache = true
                log_format = "json"
                [log]
                dir = "/file/logs"
                [consumers.resize]
                queue = "file.queue"
                prefetch = 3
                "#,
            ),
            env(&[
                ("RMQ_CONSUMER_URL", "amqp://a:b@env-1/v, amqp://a:b@env-2/v"),
                ("RMQ_CONSUMER_PREFETCH_COUNT", "9"),
                ("RMQ_CONSUMER_ENABLE_RESULT_CACHE", "0"),
                ("RMQ_CONSUMER_LOG_FORMAT", "HUMAN"),
                ("RMQ_CONSUMER_LOG_DIR", "/env/logs"),
                ("RMQ_CONSUMER_LOG_LEVEL", "warn"),
                ("RMQ_CONSUMER_HTTP_ADDR", "127.0.0.1:9000"),
                ("RMQ_CONSUMER_MANAGEMENT_URL", "https://a:b@env-1:15671"),
                ("RMQ_CONSUMER_RETRY_DELAYS", "1s, 2.5, 3"),
                ("RMQ_CONSUMER_QUEUE_TYPE", "quorum"),
                ("RMQ_CONSUMER_CONSUMERS__RESIZE__QUEUE", "env.queue"),
                ("RMQ_CONSUMER_CONFIG", "/ignored/here.toml"),
                ("PATH", "/usr/bin"),
                ("rmq_consumer_prefetch_count", "not ours"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.urls,
            vec![
                SecretUrl::new("amqp://a:b@env-1/v"),
                SecretUrl::new("amqp://a:b@env-2/v")
            ]
        );
        assert_eq!(config.prefetch_count, 9);
        assert!(!config.enable_result_cache);
        assert_eq!(config.log.format, LogFormat::Human);
        assert_eq!(config.log.dir, Some(PathBuf::from("/env/logs")));
        assert_eq!(config.log.level, "warn");
        assert_eq!(config.http_addr, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(
            config.management_url,
            Some(SecretUrl::new("https://a:b@env-1:15671"))
        );
        assert_eq!(
            config.retry_delays,
            vec![
                Duration::from_secs(1),
                Duration::from_millis(2500),
                Duration::from_secs(3)
            ]
        );
        assert_eq!(config.queue_type, QueueType::Quorum);
        let resize = config.consumer("resize");
        assert_eq!(resize.queue.as_deref(), Some("env.queue"));
        assert_eq!(resize.prefetch, Some(3));
    }

    #[test]
    fn every_problem_is_reported() {
        let result = Config::from_sources(
            Some(
                r#"
                prefetch_count = 0
                heartbeat_interval = 70000
                result_cache_size = 0
                message_timeout = "soon"
                queue_type = "lazy"
                log_format = "xml"
                http_addr = "localhost"
                exchange = 5
                url = "http://u:p@h/"
                retry_connect_interval = -1
                retry_delays = ["1s", true]
                colour = "blue"
                [consumers.resize]
                prefetch = 0
                frobnicate = true
                "#,
            ),
            env(&[
                ("RMQ_CONSUMER_MAX_RETRY_COUNT", "many"),
                ("RMQ_CONSUMER_DEAD_LETTER", "yes"),
                ("RMQ_CONSUMER_BOGUS", "1"),
            ]),
        );
        let error = result.unwrap_err();
        let text = error.to_string();
        let ConfigError::Invalid { problems } = error else {
            panic!("expected Invalid");
        };
        let expected: &[(&str, &str)] = &[
            ("prefetch_count", "must be between 1 and 65535, got 0"),
            (
                "heartbeat_interval",
                "must be between 0 and 65535, got 70000",
            ),
            ("result_cache_size", "must be between 1 and 10000000, got 0"),
            ("queue_type", "expected `classic` or `quorum`, got `lazy`"),
            ("log_format", "expected `human` or `json`, got `xml`"),
            (
                "http_addr",
                "expected an address like `127.0.0.1:9090`, got `localhost`",
            ),
            ("exchange", "expected a string, got an integer"),
            (
                "url",
                "must be an amqp:// or amqps:// URL, got `http://u:****@h/`",
            ),
            ("retry_connect_interval", "must not be negative, got -1"),
            (
                "retry_delays",
                "expected a duration (seconds, or a string like \"500ms\" or \"2m\"), got a boolean",
            ),
            ("colour", "unknown key"),
            (
                "consumers.resize.prefetch",
                "must be between 1 and 65535, got 0",
            ),
            ("consumers.resize.frobnicate", "unknown key"),
            (
                "RMQ_CONSUMER_MAX_RETRY_COUNT",
                "expected an integer, got `many`",
            ),
            (
                "RMQ_CONSUMER_DEAD_LETTER",
                "expected `true`, `false`, `1` or `0`, got `yes`",
            ),
            ("RMQ_CONSUMER_BOGUS", "unknown variable"),
        ];
        for (key, message) in expected {
            assert_eq!(problem_for(&problems, key).message, *message);
        }
        assert!(
            problem_for(&problems, "message_timeout")
                .message
                .starts_with("expected a duration like \"30s\", \"500ms\" or \"2m\", got `soon`")
        );
        assert_eq!(problems.len(), expected.len() + 1, "{problems:#?}");
        assert!(text.starts_with(&format!(
            "invalid configuration ({} problems): `",
            problems.len()
        )));
        assert!(text.contains("`prefetch_count`: must be between 1 and 65535, got 0; "));
        assert!(text.contains("`colour`: unknown key"));
    }

    #[test]
    fn invalid_display_format() {
        let error = Config::from_toml_str("prefetch_count = 0").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid configuration (1 problem): `prefetch_count`: must be between 1 and 65535, got 0"
        );
        let error = Config::from_toml_str("prefetch_count = 0\nfoo = 1").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid configuration (2 problems): `prefetch_count`: must be between 1 and 65535, \
             got 0; `foo`: unknown key"
        );
    }

    #[test]
    fn unknown_keys_get_suggestions() {
        let problems = problems(Config::from_sources(
            Some(
                r#"
                prefetch_cont = 3
                conn_idress = "amqp://u:p@h/v"
                totally_unrelated = 1
                [log]
                levle = "info"
                [consumers.resize]
                queu = "q"
                "#,
            ),
            env(&[
                ("RMQ_CONSUMER_PREFECH_COUNT", "3"),
                ("RMQ_CONSUMER_CONSUMERS__RESIZE__TIMOUT", "3"),
                ("RMQ_CONSUMER_CONSUMERS__BROKEN", "3"),
            ]),
        ));
        assert_eq!(
            problem_for(&problems, "prefetch_cont").message,
            "unknown key (did you mean `prefetch_count`?)"
        );
        assert_eq!(
            problem_for(&problems, "conn_idress").message,
            "unknown key (did you mean `conn_iddress`?)"
        );
        assert_eq!(
            problem_for(&problems, "totally_unrelated").message,
            "unknown key"
        );
        assert_eq!(
            problem_for(&problems, "log.levle").message,
            "unknown key (did you mean `level`?)"
        );
        assert_eq!(
            problem_for(&problems, "consumers.resize.queu").message,
            "unknown key (did you mean `queue`?)"
        );
        assert_eq!(
            problem_for(&problems, "RMQ_CONSUMER_PREFECH_COUNT").message,
            "unknown variable (did you mean `RMQ_CONSUMER_PREFETCH_COUNT`?)"
        );
        assert_eq!(
            problem_for(&problems, "RMQ_CONSUMER_CONSUMERS__RESIZE__TIMOUT").message,
            "unknown variable (did you mean `RMQ_CONSUMER_CONSUMERS__RESIZE__TIMEOUT`?)"
        );
        problem_for(&problems, "RMQ_CONSUMER_CONSUMERS__BROKEN");
        assert_eq!(problems.len(), 8, "{problems:#?}");
    }

    #[test]
    fn consumer_sections_and_env() {
        let config = Config::from_sources(
            Some(
                r#"
                [consumers.resize]
                queue = "media.resize"
                timeout = "45s"
                [consumers.thumbnail]
                enabled = false
                "#,
            ),
            env(&[
                ("RMQ_CONSUMER_CONSUMERS__RESIZE__PREFETCH", "2"),
                ("RMQ_CONSUMER_CONSUMERS__RESIZE__RETRY_DELAYS", "1s,5s"),
                ("RMQ_CONSUMER_CONSUMERS__OCR__QUEUE", "ocr.in"),
                ("RMQ_CONSUMER_CONSUMERS__OCR__ENABLED", "true"),
                ("RMQ_CONSUMER_CONSUMERS__OCR__QUEUE_TYPE", "QUORUM"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.consumers.keys().collect::<Vec<_>>(),
            ["ocr", "resize", "thumbnail"]
        );
        let resize = config.consumer("resize");
        assert_eq!(resize.queue.as_deref(), Some("media.resize"));
        assert_eq!(resize.timeout, Some(Duration::from_secs(45)));
        assert_eq!(resize.prefetch, Some(2));
        assert_eq!(
            resize.retry_delays,
            Some(vec![Duration::from_secs(1), Duration::from_secs(5)])
        );
        assert_eq!(config.consumer("thumbnail").enabled, Some(false));
        let ocr = config.consumer("ocr");
        assert_eq!(ocr.queue.as_deref(), Some("ocr.in"));
        assert_eq!(ocr.enabled, Some(true));
        assert_eq!(ocr.queue_type, Some(QueueType::Quorum));
        assert_eq!(config.consumer("missing"), ConsumerConfig::default());

        let problems = problems(Config::from_toml_str(
            "[consumers]\nresize = 3\n[consumers.ocr]\ntimeout = 0",
        ));
        assert_eq!(
            problem_for(&problems, "consumers.resize").message,
            "expected a table, got an integer"
        );
        assert_eq!(
            problem_for(&problems, "consumers.ocr.timeout").message,
            "must be greater than zero"
        );
    }

    #[test]
    fn durations_in_all_forms() {
        let config = Config::from_sources(
            Some(
                r#"
                message_timeout = 45
                queue_stuck_threshold = 1.5
                shutdown_timeout = "500ms"
                confirm_timeout = "2m"
                retry_connect_interval = "1h 30m"
                retry_delays = [1, 0.25, "3s", "1m"]
                "#,
            ),
            env(&[("RMQ_CONSUMER_RETRY_CONNECT_MAX", "2h")]),
        )
        .unwrap();
        assert_eq!(config.message_timeout, Duration::from_secs(45));
        assert_eq!(config.queue_stuck_threshold, Duration::from_millis(1500));
        assert_eq!(config.shutdown_timeout, Duration::from_millis(500));
        assert_eq!(config.confirm_timeout, Duration::from_secs(120));
        assert_eq!(config.retry_connect_interval, Duration::from_secs(5400));
        assert_eq!(config.retry_connect_max, Duration::from_secs(7200));
        assert_eq!(
            config.retry_delays,
            vec![
                Duration::from_secs(1),
                Duration::from_millis(250),
                Duration::from_secs(3),
                Duration::from_secs(60)
            ]
        );

        let from_env = Config::from_sources(
            None,
            env(&[
                ("RMQ_CONSUMER_MESSAGE_TIMEOUT", "45"),
                ("RMQ_CONSUMER_QUEUE_STUCK_THRESHOLD", "1.5"),
                ("RMQ_CONSUMER_SHUTDOWN_TIMEOUT", "500ms"),
                ("RMQ_CONSUMER_RETRY_DELAYS", ""),
            ]),
        )
        .unwrap();
        assert_eq!(from_env.message_timeout, Duration::from_secs(45));
        assert_eq!(from_env.queue_stuck_threshold, Duration::from_millis(1500));
        assert_eq!(from_env.shutdown_timeout, Duration::from_millis(500));
        assert!(from_env.retry_delays.is_empty());

        let problems = problems(Config::from_toml_str(
            r#"
            message_timeout = 0
            confirm_timeout = -0.5
            retry_connect_interval = "10s"
            retry_connect_max = "5s"
            queue_stuck_threshold = true
            retry_delays = ["1s", "0s"]
            "#,
        ));
        assert_eq!(
            problem_for(&problems, "message_timeout").message,
            "must be greater than zero"
        );
        assert_eq!(
            problem_for(&problems, "confirm_timeout").message,
            "expected a non-negative number of seconds, got -0.5"
        );
        assert_eq!(
            problem_for(&problems, "retry_connect_max").message,
            "must be at least retry_connect_interval (10s), got 5s"
        );
        assert_eq!(
            problem_for(&problems, "queue_stuck_threshold").message,
            "expected a duration (seconds, or a string like \"500ms\" or \"2m\"), got a boolean"
        );
        assert_eq!(
            problem_for(&problems, "retry_delays").message,
            "every delay must be at least 1ms"
        );
        assert_eq!(problems.len(), 5);
    }

    #[test]
    fn enums_parse_case_insensitively() {
        assert_eq!("Quorum".parse::<QueueType>(), Ok(QueueType::Quorum));
        assert_eq!("CLASSIC".parse::<QueueType>(), Ok(QueueType::Classic));
        assert_eq!(QueueType::Quorum.as_str(), "quorum");
        assert_eq!(
            "stream".parse::<QueueType>().unwrap_err().to_string(),
            "expected `classic` or `quorum`, got `stream`"
        );
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(LogFormat::Human.to_string(), "human");
    }

    #[test]
    fn log_table_and_validation() {
        let config = Config::from_toml_str(
            r#"
            [log]
            level = "warn,my_app=trace"
            format = "json"
            dir = "logs"
            file_prefix = "worker"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.log,
            LogConfig {
                level: "warn,my_app=trace".to_owned(),
                format: LogFormat::Json,
                dir: Some(PathBuf::from("logs")),
                file_prefix: "worker".to_owned(),
            }
        );
        let problems = problems(Config::from_toml_str(
            "log_level = \"info,=[bad\"\nlog_file_prefix = \"a/b\"\nlog = 3",
        ));
        assert!(
            problem_for(&problems, "log_level")
                .message
                .starts_with("invalid filter `info,=[bad` (")
        );
        problem_for(&problems, "log_file_prefix");
        assert_eq!(
            problem_for(&problems, "log").message,
            "expected a table, got an integer"
        );
    }

    #[test]
    fn syntax_error_reports_line_without_secrets() {
        let problems = problems(Config::from_toml_str(
            "prefetch_count = 4\nurl = \"amqp://u:hunter2-secret@h/v\nexchange = \"x\"\n",
        ));
        assert_eq!(problems.len(), 1);
        let problem = &problems[0];
        assert_eq!(problem.key, "toml");
        assert!(
            problem
                .message
                .starts_with("TOML syntax error at line 2, column"),
            "{problem}"
        );
        assert!(!problem.to_string().contains("hunter2"), "{problem}");
    }

    #[test]
    fn bad_urls_are_reported_masked() {
        let problems = problems(Config::from_toml_str(
            r#"
            url = ["amqp://u:p@h:99999/v", "amqp://u:p@[::1]:5672/v", "amqp:opaque", "amqp://u:p@ok/v"]
            management_url = "ftp://u:p@h"
            "#,
        ));
        let url_problems: Vec<&str> = problems
            .iter()
            .filter(|p| p.key == "url")
            .map(|p| p.message.as_str())
            .collect();
        assert_eq!(
            url_problems,
            [
                "is not a valid AMQP URL (invalid port number): `amqp://u:****@h:99999/v`",
                "IPv6 address hosts are not supported (lapin's URL parser would connect to \
                 localhost); use a host name: `amqp://u:****@[::1]:5672/v`",
                "must be an amqp:// or amqps:// URL, got `amqp:opaque`",
            ]
        );
        assert_eq!(
            problem_for(&problems, "management_url").message,
            "must be an http:// or https:// URL with a host, got `ftp://u:****@h`"
        );
        let problems = problems_of_empty_url();
        assert_eq!(problems[0].message, "must list at least one URL");
    }

    fn problems_of_empty_url() -> Vec<ConfigProblem> {
        problems(Config::from_toml_str("url = []"))
    }

    #[test]
    fn absurd_values_are_problems_naming_the_key() {
        let problems = problems(Config::from_sources(
            Some(
                r#"
                message_timeout = "1000years"
                shutdown_timeout = 99999999999
                retry_delays = ["1s", "400d"]
                result_cache_size = 1000000000000
                max_body_size = 1099511627776
                max_in_flight_bytes = 0
                [consumers.a]
                timeout = "500d"
                max_in_flight_bytes = -1
                "#,
            ),
            env(&[("RMQ_CONSUMER_QUEUE_STUCK_THRESHOLD", "18446744073709551615")]),
        ));
        for key in [
            "message_timeout",
            "shutdown_timeout",
            "retry_delays",
            "consumers.a.timeout",
            "RMQ_CONSUMER_QUEUE_STUCK_THRESHOLD",
        ] {
            let message = &problem_for(&problems, key).message;
            assert!(
                message.starts_with("must be at most 366 days"),
                "{key}: {message}"
            );
        }
        assert_eq!(
            problem_for(&problems, "result_cache_size").message,
            "must be between 1 and 10000000, got 1000000000000"
        );
        assert_eq!(
            problem_for(&problems, "max_body_size").message,
            "must be between 1 and 536870912, got 1099511627776"
        );
        assert_eq!(
            problem_for(&problems, "max_in_flight_bytes").message,
            "must be at least 1, got 0"
        );
        assert_eq!(
            problem_for(&problems, "consumers.a.max_in_flight_bytes").message,
            "must be at least 1, got -1"
        );
        assert_eq!(problems.len(), 9, "{problems:#?}");
    }

    #[test]
    fn passwords_with_commas_stay_in_their_url() {
        let canary = "Can,ary,amqp:x";
        let one = format!("amqp://u:{canary}@rabbit:5672/%2f");
        assert_eq!(split_urls(&one), [one.as_str()]);
        let two = format!("{one}, amqps://v:{canary}@other/%2f ,");
        let urls = split_urls(&two);
        assert_eq!(urls.len(), 2, "{urls:?}");
        assert_eq!(urls[1], format!("amqps://v:{canary}@other/%2f"));
        // An unusable list: every problem printed without the password.
        let result = Config::from_sources(
            None,
            env(&[(
                "RMQ_CONSUMER_URL",
                "amqp://u:Can,ary@rabbit:5672/%2f,http://w:Can,ary@x/",
            )]),
        );
        let text = format!(
            "{:?} {}",
            result,
            match &result {
                Ok(_) => String::new(),
                Err(error) => error.to_string(),
            }
        );
        assert!(result.is_err(), "the http URL is a problem");
        assert!(
            !text.contains("Can,ary") && !text.contains("ary@"),
            "{text}"
        );
    }

    #[test]
    fn query_secrets_are_masked() {
        let cases = [
            (
                "amqps://u:p@h/v?heartbeat=10&password=hunter2&token=abc#frag",
                "amqps://u:****@h/v?heartbeat=10&password=****&token=****#****",
            ),
            (
                "amqp://h/v?auth_mechanism=external&secret=s&cacertfile=/ca.pem",
                "amqp://h/v?auth_mechanism=external&secret=****&cacertfile=/ca.pem",
            ),
            ("http://h:15672/?api_key=k", "http://h:15672/?api_key=****"),
        ];
        for (raw, masked) in cases {
            assert_eq!(SecretUrl::new(raw).masked(), masked);
        }
    }

    #[test]
    fn secret_url_masking() {
        let cases = [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:****@127.0.0.1:5672/%2f",
            ),
            ("amqp://u:c@n:a/r#y%?密@h:5672/v", "amqp://u:****@h:5672/v"),
            ("amqps://user@h/v", "amqps://user@h/v"),
            ("amqp://h:5672/v", "amqp://h:5672/v"),
            ("amqp://u:@h/v", "amqp://u:****@h/v"),
            ("u:secret@h", "u:****@h"),
            ("", ""),
        ];
        for (raw, masked) in cases {
            let url = SecretUrl::new(raw);
            assert_eq!(url.masked(), masked);
            assert_eq!(url.to_string(), masked);
            assert_eq!(format!("{url:?}"), format!("SecretUrl({masked:?})"));
            assert_eq!(url.expose(), raw);
            assert_eq!(raw.parse::<SecretUrl>(), Ok(url));
        }
    }

    /// `u` / `c@n:a/r#y%?密`, percent-encoded.
    const CANARY_URL: &str = "amqp://u:c%40n%3Aa%2Fr%23y%25%3F%E5%AF%86@rabbit:5672/%2f";
    const CANARY_FRAGMENTS: &[&str] = &[
        "c@n",
        "c%40n",
        "%40n",
        "%3Aa",
        "a/r",
        "%2Fr",
        "r#y",
        "%23y",
        "y%?",
        "%25%3F",
        "密",
        "%E5%AF%86",
        "%e5%af%86",
        "canary",
    ];

    fn assert_no_canary(text: &str) {
        for fragment in CANARY_FRAGMENTS {
            assert!(!text.contains(fragment), "`{fragment}` leaked in {text}");
        }
    }

    #[test]
    fn passwords_never_printed() {
        let config = Config::from_sources(
            Some(&format!("url = \"{CANARY_URL}\"")),
            env(&[(
                "RMQ_CONSUMER_MANAGEMENT_URL",
                "http://u:c%40n%3Aa@rabbit:15672",
            )]),
        )
        .unwrap();
        assert_eq!(config.urls[0].expose(), CANARY_URL);
        assert_no_canary(&format!("{config:?}"));
        assert_no_canary(&format!("{config:#?}"));
        assert_no_canary(&format!("{:?} {}", config.urls[0], config.urls[0]));
        assert!(format!("{config:?}").contains("amqp://u:****@rabbit:5672/%2f"));

        // Bad URLs carrying the canary, through the file and the environment.
        let bad_port = CANARY_URL.replace(":5672", ":99999");
        let bad_utf8 = CANARY_URL.replace("%E5%AF%86", "%FF");
        let bad_scheme = CANARY_URL.replace("amqp://", "http://");
        let raw_password = "amqp://u:c@n:a/r#y%?密@rabbit:5672/%2f";
        let errors = [
            Config::from_toml_str(&format!("url = [\"{bad_port}\", \"{bad_utf8}\"]")).unwrap_err(),
            Config::from_toml_str(&format!("url = \"{raw_password}\"")).unwrap_err(),
            Config::from_sources(
                None,
                env(&[
                    ("RMQ_CONSUMER_URL", &format!("{bad_scheme},{bad_port}")),
                    ("RMQ_CONSUMER_PREFETCH_COUNT", &bad_port),
                    ("RMQ_CONSUMER_HTTP_ADDR", CANARY_URL),
                    ("RMQ_CONSUMER_QUEUE_TYPE", CANARY_URL),
                    (
                        "RMQ_CONSUMER_MANAGEMENT_URL",
                        &bad_scheme.replace("http", "ftp"),
                    ),
                ]),
            )
            .unwrap_err(),
        ];
        for error in errors {
            let ConfigError::Invalid { problems } = &error else {
                panic!("expected Invalid");
            };
            assert!(!problems.is_empty());
            assert_no_canary(&error.to_string());
            assert_no_canary(&format!("{error:?}"));
            for problem in problems {
                assert_no_canary(&problem.to_string());
                assert_no_canary(&format!("{problem:?}"));
            }
        }
    }

    #[test]
    fn the_password_key_goes_into_every_url() {
        let config = Config::from_toml_str(
            r#"
            url = ["amqp://app@a:5672/%2f", "amqps://b:5671/prod"]
            password = "p@ss w,rd"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.urls[0].expose(),
            "amqp://app:p%40ss%20w%2Crd@a:5672/%2f"
        );
        assert_eq!(
            config.urls[1].expose(),
            "amqps://guest:p%40ss%20w%2Crd@b:5671/prod"
        );
        assert_eq!(config.password, Some(Password::new("p@ss w,rd")));
        // Without `url`: the default URL, with this password instead of guest's.
        let config =
            Config::from_sources(None, env(&[("RMQ_CONSUMER_PASSWORD", "s3cret")])).unwrap();
        assert_eq!(
            config.urls[0].expose(),
            "amqp://guest:s3cret@127.0.0.1:5672/%2f"
        );
        // A URL with its own password beside the key: a problem naming the key, no password.
        let found = problems(Config::from_sources(
            Some("url = \"amqp://app:hunter2@a:5672/%2f\""),
            env(&[("RMQ_CONSUMER_PASSWORD", "hunter3")]),
        ));
        let problem = problem_for(&found, "RMQ_CONSUMER_PASSWORD");
        assert!(problem.message.contains("amqp://app:****@a"), "{problem}");
        assert!(!format!("{found:?}").contains("hunter"), "{found:?}");
        let found = problems(Config::from_toml_str("password = \"\""));
        assert_eq!(problem_for(&found, "password").message, "must not be empty");
    }

    #[test]
    fn tls_query_parameters_are_rejected_naming_the_key() {
        for (param, key) in [
            ("cacertfile", "tls_ca_file"),
            ("certfile", "tls_cert_file"),
            ("keyfile", "tls_key_file"),
            ("verify", "tls_ca_file"),
            ("fail_if_no_peer_cert", "tls_cert_file"),
            ("server_name_indication", "host"),
            ("depth", "tls_ca_file"),
        ] {
            let found = problems(Config::from_toml_str(&format!(
                "url = \"amqps://u:hunter2@h:5671/%2f?heartbeat=5&{param}=x\""
            )));
            let problem = problem_for(&found, "url");
            assert!(problem.message.contains(&format!("`{param}`")), "{problem}");
            assert!(problem.message.contains(key), "{problem}");
            assert!(!problem.message.contains("hunter2"), "{problem}");
        }
        assert!(Config::from_toml_str("url = \"amqps://h:5671/%2f?heartbeat=5\"").is_ok());
    }

    #[test]
    fn tls_key_problems_name_the_variable_as_written() {
        let found = problems(Config::from_sources(
            None,
            env(&[("RMQ_CONSUMER_TLS_CA_FILE", "/nonexistent/ca.pem")]),
        ));
        let problem = problem_for(&found, "RMQ_CONSUMER_TLS_CA_FILE");
        assert!(problem.message.contains("/nonexistent/ca.pem"), "{problem}");
        let found = problems(Config::from_toml_str("tls_key_file = \"/nonexistent/k\""));
        assert!(found.iter().any(|p| p.key == "tls_cert_file"), "{found:?}");
    }

    #[test]
    fn levenshtein_distances() {
        assert_eq!(levenshtein("", ""), 0);
        assert_eq!(levenshtein("abc", ""), 3);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("queu", "queue"), 1);
        assert_eq!(levenshtein("ab", "ba"), 2);
    }
}

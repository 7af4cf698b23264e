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
//! Connection URLs (the broker's, `management_url`, and `result_store`, the shared result
//! store's Redis URL) are held as [`SecretUrl`], whose `Debug` and `Display` mask the password;
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

mod error;
mod read;
mod secret;
mod value;

pub use error::{ConfigError, ConfigProblem};
pub use secret::{Password, SecretUrl, url_has_password, with_password};
pub use value::MAX_DURATION;
pub(crate) use value::written;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use read::build;
use value::shown;

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
/// Default `result_ttl`: how long a result stays in the shared store (24 h).
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Default `result_store_timeout`: the longest any call to the shared store may take.
pub const DEFAULT_RESULT_STORE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default `result_store_lease`: how long a task's lease lives without being renewed.
pub const DEFAULT_RESULT_STORE_LEASE: Duration = Duration::from_secs(10);
/// Default `result_store_prefix`: the start of every key the engine writes to the store.
pub const DEFAULT_RESULT_STORE_PREFIX: &str = "rmq-consumer:";
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
/// `Debug` is safe to log: URLs print with their password masked. `Serialize` writes the
/// values as the file spells them (durations as humantime text, enums by their names, `url`
/// for [`urls`](Self::urls)), URLs and the password masked: what `rmq-consumer check-config`
/// prints.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    /// Broker URLs (`url`, alias `conn_iddress`): one string or an array, tried in turn.
    /// Default [`DEFAULT_URL`].
    #[serde(rename = "url")]
    pub urls: Vec<SecretUrl>,
    /// The broker password (`password`, or `RMQ_CONSUMER_PASSWORD`, or the CLI's
    /// `--password-file`), already put into every URL of [`urls`](Self::urls); `None` when
    /// the URLs carry their own.
    pub password: Option<Password>,
    /// TLS files for `amqps://` URLs and the management API over HTTPS (`tls_ca_file`,
    /// `tls_cert_file`, `tls_key_file`), checked at load.
    #[serde(flatten)]
    pub tls: crate::tls::TlsFiles,
    /// The direct exchange results are published to (`exchange`, alias `exchange_iddress`).
    /// Default [`DEFAULT_EXCHANGE`].
    pub exchange: String,
    /// The queue of the only handler (`queue`, alias `b2m_queue_iddress`).
    pub queue: Option<String>,
    /// The reply queue of the only handler (`reply_queue`, alias `m2b_queue_iddress`).
    pub reply_queue: Option<String>,
    /// The reply routing key of the only handler (`reply_key`, alias `m2b_routing_key`).
    pub reply_key: Option<String>,
    /// Base URL of the RabbitMQ management API; `None` (the default) lets the CLI derive it
    /// (`https://<host>:15671` for an `amqps://` broker URL, else `http://<host>:15672`).
    pub management_url: Option<SecretUrl>,
    /// Whether the CLI may send the management login over plain `http://` to a host that is
    /// not loopback (`management_allow_http`). Default `false`.
    pub management_allow_http: bool,
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
    /// Time allowed for one handler invocation. Default [`DEFAULT_MESSAGE_TIMEOUT`].
    #[serde(serialize_with = "written")]
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
    #[serde(serialize_with = "written")]
    pub retry_delays: Vec<Duration>,
    /// Whether exhausted or unrecoverable messages go to a dead-letter queue. Default `true`.
    pub dead_letter: bool,
    /// Whether the reply queue is bound to the exchange with the reply key. Default `true`.
    pub bind_reply_queue: bool,
    /// Whether the engine declares its exchange, queues and bindings. `false` declares
    /// nothing: every object must exist (an administrator creates them), which the engine
    /// checks with passive declares at startup. Default `true`.
    pub declare: bool,
    /// Which exchange retry, delay, dead-letter and suspect copies are published to. Default
    /// [`PublishVia::DefaultExchange`].
    pub publish_via: PublishVia,
    /// The type of declared queues. Default [`QueueType::Classic`].
    pub queue_type: QueueType,
    /// What a request's `reply_to` may do. Default [`ReplyToPolicy::Honour`].
    pub reply_to: ReplyToPolicy,
    /// The first delay between connection attempts. Default
    /// [`DEFAULT_RETRY_CONNECT_INTERVAL`].
    #[serde(serialize_with = "written")]
    pub retry_connect_interval: Duration,
    /// The cap of the exponential reconnect backoff; defaults to `retry_connect_interval`,
    /// i.e. a fixed interval as in the Python template. Never below `retry_connect_interval`.
    #[serde(serialize_with = "written")]
    pub retry_connect_max: Duration,
    /// AMQP heartbeat in seconds (0 disables it). Default [`DEFAULT_HEARTBEAT_INTERVAL`].
    pub heartbeat_interval: u16,
    /// Time with messages waiting but none processed before the queue counts as stuck.
    /// Default [`DEFAULT_QUEUE_STUCK_THRESHOLD`].
    #[serde(serialize_with = "written")]
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
    /// The result store shared by every replica (`result_store`): a `redis://` or
    /// `rediss://` URL (TLS with [`tls`](Self::tls), the broker connection's files), masked
    /// like the broker URLs. `None` (the default): no shared store; a handler with
    /// `cache = "shared"` is then a configuration error. See the README, "Shared result store".
    pub result_store: Option<SecretUrl>,
    /// How long a result stays in the shared store (`result_ttl`). Default
    /// [`DEFAULT_RESULT_TTL`].
    #[serde(serialize_with = "written")]
    pub result_ttl: Duration,
    /// The longest any call to the shared store may take (`result_store_timeout`); a slower
    /// call counts as a store failure and the delivery goes on without the store. Default
    /// [`DEFAULT_RESULT_STORE_TIMEOUT`].
    #[serde(serialize_with = "written")]
    pub result_store_timeout: Duration,
    /// How long a task's lease lives in the store unless renewed (`result_store_lease`); the
    /// owner renews it every third of this while the handler runs, and another replica takes
    /// the task over once it expires. At least 3 × `result_store_timeout`. Default
    /// [`DEFAULT_RESULT_STORE_LEASE`].
    #[serde(serialize_with = "written")]
    pub result_store_lease: Duration,
    /// Whether `/readyz` reports not ready while the store is unreachable
    /// (`result_store_required`). Default `false`: the engine works on without it.
    pub result_store_required: bool,
    /// The start of every key written to the store (`result_store_prefix`), so several
    /// deployments can share one Redis. Default [`DEFAULT_RESULT_STORE_PREFIX`].
    pub result_store_prefix: String,
    /// Time allowed for in-flight handlers to finish on shutdown. Default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`].
    #[serde(serialize_with = "written")]
    pub shutdown_timeout: Duration,
    /// Time to wait for a publisher confirm. Default [`DEFAULT_CONFIRM_TIMEOUT`].
    #[serde(serialize_with = "written")]
    pub confirm_timeout: Duration,
    /// How long a result the broker nacked (e.g. while a quorum queue elects a new leader), or
    /// refused because the result exchange does not exist (deleted, not yet declared again),
    /// is published again, with backoff, before the attempt counts as failed and the message
    /// is retried; the handler does not run again meanwhile (the delivery keeps its slot).
    /// `0` retries no publish. Default [`DEFAULT_RESULT_PUBLISH_RETRY`].
    #[serde(serialize_with = "written")]
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
    /// Address of the health/metrics HTTP endpoint; `None` (the default) serves none.
    pub http_addr: Option<SocketAddr>,
    /// Logging.
    pub log: LogConfig,
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
            result_store: None,
            result_ttl: DEFAULT_RESULT_TTL,
            result_store_timeout: DEFAULT_RESULT_STORE_TIMEOUT,
            result_store_lease: DEFAULT_RESULT_STORE_LEASE,
            result_store_required: false,
            result_store_prefix: DEFAULT_RESULT_STORE_PREFIX.to_owned(),
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
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
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
    #[serde(serialize_with = "written")]
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
    #[serde(serialize_with = "written")]
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
    /// A batch handler's most items per call, at least 1 (overrides `batch = N` on its
    /// `#[consumer]`; only for handlers declared with `batch`).
    pub batch: Option<u16>,
    /// How long the first item of a batch may wait for more before the batch is handed to
    /// the handler (overrides `batch_wait` on its `#[consumer]`).
    #[serde(serialize_with = "written")]
    pub batch_wait: Option<Duration>,
    /// Which result cache this handler uses (`cache`): `"none"`, `"local"` (this process's
    /// LRU) or `"shared"` (the LRU in front of [`Config::result_store`]). `None` means
    /// `"local"` when [`Config::enable_result_cache`] is on, else `"none"`.
    pub cache: Option<CacheMode>,
}

/// Which result cache a handler uses (`[consumers.<name>] cache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheMode {
    /// No cache: every delivery runs the handler.
    #[default]
    None,
    /// This process's LRU (`result_cache_size`, `result_cache_bytes`): concurrent and later
    /// deliveries of a task in this process reuse its result.
    Local,
    /// The LRU in front of the store every replica shares (`result_store`): a task runs once
    /// across the fleet while the store is up (see the README, "Shared result store").
    Shared,
}

impl CacheMode {
    /// The name used in configuration.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Local => "local",
            Self::Shared => "shared",
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CacheMode {
    type Err = ParseVariantError;

    /// Accepts `none`, `local` or `shared`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "local" => Ok(Self::Local),
            "shared" => Ok(Self::Shared),
            _ => Err(ParseVariantError::new("`none`, `local` or `shared`", s)),
        }
    }
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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogConfig {
    /// An `EnvFilter` directive string such as `"info"` or `"info,lapin=warn"`; `RUST_LOG`
    /// overrides it. Default [`DEFAULT_LOG_LEVEL`].
    pub level: String,
    /// Line format, console and files alike. Default [`LogFormat::Human`].
    pub format: LogFormat,
    /// Directory of daily-rotated log files; `None` (the default) logs to stderr only.
    #[serde(serialize_with = "written")]
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
        Self::load_from(None, Vec::new())
    }

    /// [`Config::load`] from the file `given` (the CLI's `--config`) if there is one, else
    /// from the file [`ConfigFile::find`] finds, with some `RMQ_CONSUMER_*` variables replaced
    /// (the CLI's `--password-file` becomes `RMQ_CONSUMER_PASSWORD`). The engine and the CLI
    /// both load through here.
    pub(crate) fn load_from(
        given: Option<&Path>,
        overrides: Vec<(String, String)>,
    ) -> Result<Config, ConfigError> {
        let path = ConfigFile::find(given).path().map(Path::to_path_buf);
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

    /// The result cache handler `name` uses: its section's `cache`, else `local` when
    /// `enable_result_cache` is on, else `none`.
    #[must_use]
    pub fn cache_mode(&self, name: &str) -> CacheMode {
        match self.consumers.get(name).and_then(|section| section.cache) {
            Some(mode) => mode,
            None if self.enable_result_cache => CacheMode::Local,
            None => CacheMode::None,
        }
    }

    /// The `[consumers.<name>]` section of handler `name`, or an empty one.
    #[must_use]
    pub fn consumer(&self, name: &str) -> ConsumerConfig {
        self.consumers.get(name).cloned().unwrap_or_default()
    }
}

/// Where the configuration file comes from; the one place that looks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ConfigFile {
    /// Named by the caller (the CLI's `--config`).
    Given(PathBuf),
    /// Named by [`CONFIG_PATH_ENV`].
    Env(PathBuf),
    /// [`DEFAULT_CONFIG_FILE`] in the working directory, which exists.
    Default(PathBuf),
    /// No file: defaults and the environment only.
    None,
}

impl ConfigFile {
    /// `given` if any, else `$RMQ_CONSUMER_CONFIG` if set, else `./rmq-consumer.toml` if it
    /// exists.
    pub(crate) fn find(given: Option<&Path>) -> Self {
        if let Some(path) = given {
            return Self::Given(path.to_path_buf());
        }
        if let Some(path) = std::env::var_os(CONFIG_PATH_ENV) {
            return Self::Env(PathBuf::from(path));
        }
        let default = PathBuf::from(DEFAULT_CONFIG_FILE);
        if default.exists() {
            Self::Default(default)
        } else {
            Self::None
        }
    }

    /// The file to read, if any.
    pub(crate) fn path(&self) -> Option<&Path> {
        match self {
            Self::Given(path) | Self::Env(path) | Self::Default(path) => Some(path),
            Self::None => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests fail loudly")]
mod tests;

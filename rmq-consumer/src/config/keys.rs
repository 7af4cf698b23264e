//! Every configuration key, declared once: its field (with its docs and how `check-config`
//! prints it), its default and its read, in one entry of a [`config_keys!`] struct below,
//! and its `DEFAULT_*` constant (and limit) when its default has a name. The reader
//! ([`super::read`]) records the names each read asks for, so unknown-key hints and
//! `check-config` follow from these entries: a new key is its entry here, plus its constant.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::read::Scope;
use super::value::written;
use super::*;

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

/// Declares a configuration struct whose fields are the keys of one table, each field one
/// entry: its docs and serde attributes, `pub name: Type = default,` (no `= default` for an
/// `Option` field: `None`), then `|s| read;`, the key's read from the [`Scope`] `s`, an
/// `Option<Type>` that is `None` when the key is not given or invalid (the default then
/// applies) — for a field without a default, the field itself.
///
/// Gives the struct, its `Default` (the defaults) and `read_from`, which reads the keys in
/// the order of the fields (the order of the problems): a read may use the fields read
/// before it by name (`retry_connect_max` uses `retry_connect_interval`).
macro_rules! config_keys {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $ty:ty $(= $default:expr)?,
                    |$s:ident| $read:expr;
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $($field: config_keys!(@default $($default)?),)*
                }
            }
        }

        impl $name {
            /// Reads every key of the table, in the order of the fields; the problems go to
            /// `scope`.
            #[allow(
                unused_mut,
                reason = "a read may change a field read before it (`password` goes into `urls`)"
            )]
            pub(super) fn read_from(scope: &mut Scope) -> Self {
                $(
                    let mut $field: $ty = {
                        let $s = &mut *scope;
                        config_keys!(@value $read $(, $default)?)
                    };
                )*
                Self { $($field,)* }
            }
        }
    };
    (@default) => { None };
    (@default $default:expr) => { $default };
    (@value $read:expr) => { $read };
    (@value $read:expr, $default:expr) => {
        match $read {
            Some(value) => value,
            None => $default,
        }
    };
}

config_keys! {
/// The whole runtime configuration. See the [module docs](super) for the file format.
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
    pub urls: Vec<SecretUrl> = vec![SecretUrl::new(DEFAULT_URL)],
        |s| s.urls();
    /// The broker password (`password`, or `RMQ_CONSUMER_PASSWORD`, or the CLI's
    /// `--password-file`), already put into every URL of [`urls`](Self::urls); `None` when
    /// the URLs carry their own.
    pub password: Option<Password>,
        |s| s.password(&mut urls);
    /// TLS files for `amqps://` URLs and the management API over HTTPS (`tls_ca_file`,
    /// `tls_cert_file`, `tls_key_file`), checked at load.
    #[serde(flatten)]
    pub tls: crate::tls::TlsFiles = crate::tls::TlsFiles::default(),
        |s| Some(s.tls_files());
    /// The direct exchange results are published to (`exchange`, alias `exchange_iddress`).
    /// Default [`DEFAULT_EXCHANGE`].
    pub exchange: String = DEFAULT_EXCHANGE.to_owned(),
        |s| s.name(&["exchange", "exchange_iddress"]);
    /// The queue of the only handler (`queue`, alias `b2m_queue_iddress`).
    pub queue: Option<String>,
        |s| s.name(&["queue", "b2m_queue_iddress"]);
    /// The reply queue of the only handler (`reply_queue`, alias `m2b_queue_iddress`).
    pub reply_queue: Option<String>,
        |s| s.name(&["reply_queue", "m2b_queue_iddress"]);
    /// The reply routing key of the only handler (`reply_key`, alias `m2b_routing_key`).
    pub reply_key: Option<String>,
        |s| s.get(&["reply_key", "m2b_routing_key"]);
    /// Base URL of the RabbitMQ management API; `None` (the default) lets the CLI derive it
    /// (`https://<host>:15671` for an `amqps://` broker URL, else `http://<host>:15672`).
    pub management_url: Option<SecretUrl>,
        |s| s.management_url();
    /// Whether the CLI may send the management login over plain `http://` to a host that is
    /// not loopback (`management_allow_http`). Default `false`.
    pub management_allow_http: bool = false,
        |s| s.get(&["management_allow_http"]);
    /// Deliveries per handler worked on at once, 1 to 65535 (the channel's `basic.qos` adds
    /// [`read_ahead`](Self::read_ahead)). Default [`DEFAULT_PREFETCH_COUNT`].
    pub prefetch_count: u16 = DEFAULT_PREFETCH_COUNT,
        |s| s.int(&["prefetch_count"], 1, u16::MAX);
    /// Handler invocations in flight at once; `None` (the default) means `prefetch_count`.
    pub concurrency: Option<u16>,
        |s| s.int(&["concurrency"], 1, u16::MAX);
    /// Deliveries the broker may send beyond `prefetch_count`, so a handler slot that frees
    /// up finds its next message already here (the channel's `basic.qos` is
    /// `prefetch_count + read_ahead`). `None` (the default) means `prefetch_count / 2`: none
    /// at a prefetch of 1, so a one-task-at-a-time worker keeps strict fair dispatch.
    pub read_ahead: Option<u16>,
        |s| s.int(&["read_ahead"], 0, u16::MAX);
    /// Time allowed for one handler invocation. Default [`DEFAULT_MESSAGE_TIMEOUT`].
    #[serde(serialize_with = "written")]
    pub message_timeout: Duration = DEFAULT_MESSAGE_TIMEOUT,
        |s| s.positive_duration(&["message_timeout"]);
    /// Retries of a failed message before it is dead-lettered. Default
    /// [`DEFAULT_MAX_RETRY_COUNT`].
    pub max_retry_count: u32 = DEFAULT_MAX_RETRY_COUNT,
        |s| s.int(&["max_retry_count"], 0, u32::MAX);
    /// Deliveries of one task that may end without a settlement (the worker process died,
    /// or its connection was lost) before the task is dead-lettered as `worker_lost` instead
    /// of running again. Default [`DEFAULT_MAX_REDELIVERIES`].
    pub max_redeliveries: u32 = DEFAULT_MAX_REDELIVERIES,
        |s| s.int(&["max_redeliveries"], 0, u32::MAX);
    /// The `x-delivery-limit` of quorum work and suspect queues: the broker dead-letters a
    /// message returned more often than this (a backstop behind `max_redeliveries`).
    /// Default [`DEFAULT_DELIVERY_LIMIT`].
    pub delivery_limit: u32 = DEFAULT_DELIVERY_LIMIT,
        |s| s.int(&["delivery_limit"], 1, u32::MAX);
    /// Delay before each retry (the last one repeats), each at least 1 ms; empty (the
    /// default) retries at once.
    #[serde(serialize_with = "written")]
    pub retry_delays: Vec<Duration> = Vec::new(),
        |s| s.retry_delays(&["retry_delays"]);
    /// Whether exhausted or unrecoverable messages go to a dead-letter queue. Default `true`.
    pub dead_letter: bool = true,
        |s| s.get(&["dead_letter"]);
    /// Whether the reply queue is bound to the exchange with the reply key. Default `true`.
    pub bind_reply_queue: bool = true,
        |s| s.get(&["bind_reply_queue"]);
    /// Whether the engine declares its exchange, queues and bindings. `false` declares
    /// nothing: every object must exist (an administrator creates them), which the engine
    /// checks with passive declares at startup. Default `true`.
    pub declare: bool = true,
        |s| s.get(&["declare"]);
    /// Which exchange retry, delay, dead-letter and suspect copies are published to. Default
    /// [`PublishVia::DefaultExchange`].
    pub publish_via: PublishVia = PublishVia::DefaultExchange,
        |s| s.get(&["publish_via"]);
    /// The type of declared queues. Default [`QueueType::Classic`].
    pub queue_type: QueueType = QueueType::Classic,
        |s| s.get(&["queue_type"]);
    /// What a request's `reply_to` may do. Default [`ReplyToPolicy::Honour`].
    pub reply_to: ReplyToPolicy = ReplyToPolicy::Honour,
        |s| s.get(&["reply_to"]);
    /// The first delay between connection attempts. Default
    /// [`DEFAULT_RETRY_CONNECT_INTERVAL`].
    #[serde(serialize_with = "written")]
    pub retry_connect_interval: Duration = DEFAULT_RETRY_CONNECT_INTERVAL,
        |s| s.positive_duration(&["retry_connect_interval"]);
    /// The cap of the exponential reconnect backoff; defaults to `retry_connect_interval`,
    /// i.e. a fixed interval as in the Python template. Never below `retry_connect_interval`.
    #[serde(serialize_with = "written")]
    pub retry_connect_max: Duration = DEFAULT_RETRY_CONNECT_INTERVAL,
        |s| Some(s.retry_connect_max(retry_connect_interval));
    /// AMQP heartbeat in seconds (0 disables it). Default [`DEFAULT_HEARTBEAT_INTERVAL`].
    pub heartbeat_interval: u16 = DEFAULT_HEARTBEAT_INTERVAL,
        |s| s.int(&["heartbeat_interval"], 0, u16::MAX);
    /// Time with messages waiting but none processed before the queue counts as stuck.
    /// Default [`DEFAULT_QUEUE_STUCK_THRESHOLD`].
    #[serde(serialize_with = "written")]
    pub queue_stuck_threshold: Duration = DEFAULT_QUEUE_STUCK_THRESHOLD,
        |s| s.positive_duration(&["queue_stuck_threshold"]);
    /// Consecutive stuck-queue checks before the watchdog acts (re-subscribes, then
    /// reconnects). Default [`DEFAULT_MAX_CONSECUTIVE_FAILURES`].
    pub max_consecutive_failures: u32 = DEFAULT_MAX_CONSECUTIVE_FAILURES,
        |s| s.int(&["max_consecutive_failures"], 1, u32::MAX);
    /// Whether results are cached by task uuid. Default `false`.
    pub enable_result_cache: bool = false,
        |s| s.get(&["enable_result_cache"]);
    /// Result cache capacity, at least 1. Default [`DEFAULT_RESULT_CACHE_SIZE`].
    pub result_cache_size: usize = DEFAULT_RESULT_CACHE_SIZE,
        |s| s.size(&["result_cache_size"], MAX_RESULT_CACHE_SIZE);
    /// Bytes of JSON the cached results of one handler may take; the least recently used go
    /// first, a larger result is not kept. Default [`DEFAULT_RESULT_CACHE_BYTES`].
    pub result_cache_bytes: usize = DEFAULT_RESULT_CACHE_BYTES,
        |s| s.size(&["result_cache_bytes"], usize::MAX);
    /// The result store shared by every replica (`result_store`): a `redis://` or
    /// `rediss://` URL (TLS with [`tls`](Self::tls), the broker connection's files), masked
    /// like the broker URLs. `None` (the default): no shared store; a handler with
    /// `cache = "shared"` is then a configuration error. See the README, "Shared result store".
    pub result_store: Option<SecretUrl>,
        |s| s.result_store();
    /// How long a result stays in the shared store (`result_ttl`). Default
    /// [`DEFAULT_RESULT_TTL`].
    #[serde(serialize_with = "written")]
    pub result_ttl: Duration = DEFAULT_RESULT_TTL,
        |s| s.positive_duration(&["result_ttl"]);
    /// The longest any call to the shared store may take (`result_store_timeout`); a slower
    /// call counts as a store failure and the delivery goes on without the store. Default
    /// [`DEFAULT_RESULT_STORE_TIMEOUT`].
    #[serde(serialize_with = "written")]
    pub result_store_timeout: Duration = DEFAULT_RESULT_STORE_TIMEOUT,
        |s| s.positive_duration(&["result_store_timeout"]);
    /// How long a task's lease lives in the store unless renewed (`result_store_lease`); the
    /// owner renews it every third of this while the handler runs, and another replica takes
    /// the task over once it expires. At least 3 × `result_store_timeout`. Default
    /// [`DEFAULT_RESULT_STORE_LEASE`].
    #[serde(serialize_with = "written")]
    pub result_store_lease: Duration = DEFAULT_RESULT_STORE_LEASE,
        |s| s.positive_duration(&["result_store_lease"]);
    /// Whether `/readyz` reports not ready while the store is unreachable
    /// (`result_store_required`). Default `false`: the engine works on without it.
    pub result_store_required: bool = false,
        |s| s.get(&["result_store_required"]);
    /// The start of every key written to the store (`result_store_prefix`), so several
    /// deployments can share one Redis. Default [`DEFAULT_RESULT_STORE_PREFIX`].
    pub result_store_prefix: String = DEFAULT_RESULT_STORE_PREFIX.to_owned(),
        |s| s.get(&["result_store_prefix"]);
    /// Time allowed for in-flight handlers to finish on shutdown. Default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`].
    #[serde(serialize_with = "written")]
    pub shutdown_timeout: Duration = DEFAULT_SHUTDOWN_TIMEOUT,
        |s| s.get(&["shutdown_timeout"]);
    /// Time to wait for a publisher confirm. Default [`DEFAULT_CONFIRM_TIMEOUT`].
    #[serde(serialize_with = "written")]
    pub confirm_timeout: Duration = DEFAULT_CONFIRM_TIMEOUT,
        |s| s.positive_duration(&["confirm_timeout"]);
    /// How long a result the broker nacked (e.g. while a quorum queue elects a new leader), or
    /// refused because the result exchange does not exist (deleted, not yet declared again),
    /// is published again, with backoff, before the attempt counts as failed and the message
    /// is retried; the handler does not run again meanwhile (the delivery keeps its slot).
    /// `0` retries no publish. Default [`DEFAULT_RESULT_PUBLISH_RETRY`].
    #[serde(serialize_with = "written")]
    pub result_publish_retry: Duration = DEFAULT_RESULT_PUBLISH_RETRY,
        |s| s.get(&["result_publish_retry"]);
    /// Largest accepted message body in bytes (at most [`MAX_BODY_SIZE_LIMIT`]); a larger one
    /// is dead-lettered (`body_too_large`) without being decoded. Default
    /// [`DEFAULT_MAX_BODY_SIZE`].
    pub max_body_size: usize = DEFAULT_MAX_BODY_SIZE,
        |s| s.size(&["max_body_size"], MAX_BODY_SIZE_LIMIT);
    /// Memory, in bytes, the messages a handler works on at once may take: each body's length
    /// plus an upper estimate of its decoded size (a `serde_json::Value` of small objects takes
    /// ~100 times the body). A message waits for room before it is decoded; one that alone
    /// needs more is dead-lettered (`body_too_large`). Default [`DEFAULT_MAX_IN_FLIGHT_BYTES`].
    pub max_in_flight_bytes: u64 = DEFAULT_MAX_IN_FLIGHT_BYTES,
        |s| s.int(&["max_in_flight_bytes"], 1, u64::MAX);
    /// Address of the health/metrics HTTP endpoint; `None` (the default) serves none.
    pub http_addr: Option<SocketAddr>,
        |s| s.get(&["http_addr"]);
    /// Logging.
    pub log: LogConfig = LogConfig::default(),
        |s| Some(s.log_config());
    /// Per-handler settings, `[consumers.<handler name>]`.
    pub consumers: BTreeMap<String, ConsumerConfig> = BTreeMap::new(),
        |s| Some(s.consumers());
}
}

config_keys! {
/// Settings of one handler, `[consumers.<handler name>]`; `None` falls back to the
/// handler's attribute, then to the top-level setting.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerConfig {
    /// The queue consumed.
    pub queue: Option<String>,
        |s| s.name(&["queue"]);
    /// The routing key results are published with.
    pub reply_key: Option<String>,
        |s| s.get(&["reply_key"]);
    /// The queue results are routed to.
    pub reply_queue: Option<String>,
        |s| s.name(&["reply_queue"]);
    /// Deliveries this handler works on at once, 1 to 65535 (see [`Config::prefetch_count`]).
    pub prefetch: Option<u16>,
        |s| s.int(&["prefetch"], 1, u16::MAX);
    /// Invocations in flight at once, at least 1.
    pub concurrency: Option<u16>,
        |s| s.int(&["concurrency"], 1, u16::MAX);
    /// Deliveries read ahead beyond `prefetch` (see [`Config::read_ahead`]).
    pub read_ahead: Option<u16>,
        |s| s.int(&["read_ahead"], 0, u16::MAX);
    /// Time allowed for one invocation.
    #[serde(serialize_with = "written")]
    pub timeout: Option<Duration>,
        |s| s.positive_duration(&["timeout"]);
    /// Retries before dead-lettering.
    pub max_retries: Option<u32>,
        |s| s.int(&["max_retries"], 0, u32::MAX);
    /// Unsettled deliveries before dead-lettering (see [`Config::max_redeliveries`]).
    pub max_redeliveries: Option<u32>,
        |s| s.int(&["max_redeliveries"], 0, u32::MAX);
    /// The quorum queues' `x-delivery-limit` (see [`Config::delivery_limit`]).
    pub delivery_limit: Option<u32>,
        |s| s.int(&["delivery_limit"], 1, u32::MAX);
    /// Memory the messages in flight may take (see [`Config::max_in_flight_bytes`]).
    pub max_in_flight_bytes: Option<u64>,
        |s| s.int(&["max_in_flight_bytes"], 1, u64::MAX);
    /// Delays before each retry.
    #[serde(serialize_with = "written")]
    pub retry_delays: Option<Vec<Duration>>,
        |s| s.retry_delays(&["retry_delays"]);
    /// The type of this handler's queues.
    pub queue_type: Option<QueueType>,
        |s| s.get(&["queue_type"]);
    /// What a request's `reply_to` may do for this handler.
    pub reply_to: Option<ReplyToPolicy>,
        |s| s.get(&["reply_to"]);
    /// Whether the reply queue is bound to the exchange.
    pub bind_reply_queue: Option<bool>,
        |s| s.get(&["bind_reply_queue"]);
    /// Whether failed messages go to a dead-letter queue.
    pub dead_letter: Option<bool>,
        |s| s.get(&["dead_letter"]);
    /// The dead-letter queue's name.
    pub dead_letter_queue: Option<String>,
        |s| s.name(&["dead_letter_queue"]);
    /// Whether the engine declares this handler's queues and bindings (see
    /// [`Config::declare`]).
    pub declare: Option<bool>,
        |s| s.get(&["declare"]);
    /// Which exchange this handler's copies are published to (see [`Config::publish_via`]).
    pub publish_via: Option<PublishVia>,
        |s| s.get(&["publish_via"]);
    /// Whether the handler runs at all.
    pub enabled: Option<bool>,
        |s| s.get(&["enabled"]);
    /// A batch handler's most items per call, at least 1 (overrides `batch = N` on its
    /// `#[consumer]`; only for handlers declared with `batch`).
    pub batch: Option<u16>,
        |s| s.int(&["batch"], 1, u16::MAX);
    /// How long the first item of a batch may wait for more before the batch is handed to
    /// the handler (overrides `batch_wait` on its `#[consumer]`).
    #[serde(serialize_with = "written")]
    pub batch_wait: Option<Duration>,
        |s| s.get(&["batch_wait"]);
    /// Which result cache this handler uses (`cache`): `"none"`, `"local"` (this process's
    /// LRU) or `"shared"` (the LRU in front of [`Config::result_store`]). `None` means
    /// `"local"` when [`Config::enable_result_cache`] is on, else `"none"`.
    pub cache: Option<CacheMode>,
        |s| s.get(&["cache"]);
}
}

config_keys! {
/// Logging settings: flat `log_*` keys or a `[log]` table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogConfig {
    /// An `EnvFilter` directive string such as `"info"` or `"info,lapin=warn"`; `RUST_LOG`
    /// overrides it. Default [`DEFAULT_LOG_LEVEL`].
    pub level: String = DEFAULT_LOG_LEVEL.to_owned(),
        |s| s.log_filter(&["log_level", "log.level"]);
    /// Line format, console and files alike. Default [`LogFormat::Human`].
    pub format: LogFormat = LogFormat::Human,
        |s| s.get(&["log_format", "log.format"]);
    /// Directory of daily-rotated log files; `None` (the default) logs to stderr only.
    #[serde(serialize_with = "written")]
    pub dir: Option<PathBuf>,
        |s| s.get(&["log_dir", "log.dir"]);
    /// File name prefix: `<prefix>.log` and `<prefix>.error.log`. Default
    /// [`DEFAULT_LOG_FILE_PREFIX`].
    pub file_prefix: String = DEFAULT_LOG_FILE_PREFIX.to_owned(),
        |s| s.file_name(&["log_file_prefix", "log.file_prefix"]);
}
}

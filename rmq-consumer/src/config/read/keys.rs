//! Every configuration key, read: [`Scope::config`] reads the top-level keys and
//! [`Scope::consumer`] a `[consumers.<name>]` section. Each key is spelled here only (its
//! aliases in the constants below); the reader ([`super`]) records what was asked for, so
//! unknown-key hints and `check-config` follow from these reads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::super::secret::{
    DEFAULT_URL_WITHOUT_PASSWORD, amqp_url_problem, http_url_problem, redis_url_problem,
    with_password,
};
use super::super::value::{shown, toml_type};
use super::super::{
    CacheMode, Config, ConsumerConfig, ENV_PREFIX, LogConfig, MAX_BODY_SIZE_LIMIT,
    MAX_RESULT_CACHE_SIZE, Password, SecretUrl,
};
use super::*;

/// Top-level settings with other spellings: the name, then its aliases or `[log]` keys.
const URL: &[&str] = &["url", "conn_iddress"];
const EXCHANGE: &[&str] = &["exchange", "exchange_iddress"];
const QUEUE: &[&str] = &["queue", "b2m_queue_iddress"];
const REPLY_QUEUE: &[&str] = &["reply_queue", "m2b_queue_iddress"];
const REPLY_KEY: &[&str] = &["reply_key", "m2b_routing_key"];
const LOG_LEVEL: &[&str] = &["log_level", "log.level"];
const LOG_FORMAT: &[&str] = &["log_format", "log.format"];
const LOG_DIR: &[&str] = &["log_dir", "log.dir"];
const LOG_FILE_PREFIX: &[&str] = &["log_file_prefix", "log.file_prefix"];

impl Scope {
    /// Reads every top-level key; each is spelled here only (the order is the order of the
    /// problems).
    pub(super) fn config(
        &mut self,
        consumer_env: BTreeMap<String, BTreeMap<String, String>>,
    ) -> Config {
        let defaults = Config::default();
        let urls_read = self.urls();
        // A `url` that did not parse is reported; `password` then goes to the default URL.
        let url_given = urls_read.is_some();
        let mut urls = urls_read.unwrap_or(defaults.urls);
        let mut retry_connect_interval = defaults.retry_connect_interval;
        Config {
            exchange: self.name(EXCHANGE).unwrap_or(defaults.exchange),
            prefetch_count: self
                .int(&["prefetch_count"], 1, u16::MAX)
                .unwrap_or(defaults.prefetch_count),
            concurrency: self.int(&["concurrency"], 1, u16::MAX),
            read_ahead: self.int(&["read_ahead"], 0, u16::MAX),
            retry_connect_interval: {
                if let Some(interval) = self.positive_duration(&["retry_connect_interval"]) {
                    retry_connect_interval = interval;
                }
                retry_connect_interval
            },
            retry_connect_max: self.retry_connect_max(retry_connect_interval),
            heartbeat_interval: self
                .int(&["heartbeat_interval"], 0, u16::MAX)
                .unwrap_or(defaults.heartbeat_interval),
            message_timeout: self
                .positive_duration(&["message_timeout"])
                .unwrap_or(defaults.message_timeout),
            max_retry_count: self
                .int(&["max_retry_count"], 0, u32::MAX)
                .unwrap_or(defaults.max_retry_count),
            max_redeliveries: self
                .int(&["max_redeliveries"], 0, u32::MAX)
                .unwrap_or(defaults.max_redeliveries),
            delivery_limit: self
                .int(&["delivery_limit"], 1, u32::MAX)
                .unwrap_or(defaults.delivery_limit),
            retry_delays: self
                .retry_delays(&["retry_delays"])
                .unwrap_or(defaults.retry_delays),
            queue_stuck_threshold: self
                .positive_duration(&["queue_stuck_threshold"])
                .unwrap_or(defaults.queue_stuck_threshold),
            max_consecutive_failures: self
                .int(&["max_consecutive_failures"], 1, u32::MAX)
                .unwrap_or(defaults.max_consecutive_failures),
            enable_result_cache: self
                .get(&["enable_result_cache"])
                .unwrap_or(defaults.enable_result_cache),
            result_cache_size: self
                .size(&["result_cache_size"], MAX_RESULT_CACHE_SIZE)
                .unwrap_or(defaults.result_cache_size),
            result_cache_bytes: self
                .size(&["result_cache_bytes"], usize::MAX)
                .unwrap_or(defaults.result_cache_bytes),
            result_store: self.result_store(),
            result_ttl: self
                .positive_duration(&["result_ttl"])
                .unwrap_or(defaults.result_ttl),
            result_store_timeout: self
                .positive_duration(&["result_store_timeout"])
                .unwrap_or(defaults.result_store_timeout),
            result_store_lease: self
                .positive_duration(&["result_store_lease"])
                .unwrap_or(defaults.result_store_lease),
            result_store_required: self
                .get(&["result_store_required"])
                .unwrap_or(defaults.result_store_required),
            result_store_prefix: self
                .get(&["result_store_prefix"])
                .unwrap_or(defaults.result_store_prefix),
            queue_type: self.get(&["queue_type"]).unwrap_or(defaults.queue_type),
            reply_to: self.get(&["reply_to"]).unwrap_or(defaults.reply_to),
            bind_reply_queue: self
                .get(&["bind_reply_queue"])
                .unwrap_or(defaults.bind_reply_queue),
            dead_letter: self.get(&["dead_letter"]).unwrap_or(defaults.dead_letter),
            declare: self.get(&["declare"]).unwrap_or(defaults.declare),
            publish_via: self.get(&["publish_via"]).unwrap_or(defaults.publish_via),
            shutdown_timeout: self
                .get(&["shutdown_timeout"])
                .unwrap_or(defaults.shutdown_timeout),
            confirm_timeout: self
                .positive_duration(&["confirm_timeout"])
                .unwrap_or(defaults.confirm_timeout),
            result_publish_retry: self
                .get(&["result_publish_retry"])
                .unwrap_or(defaults.result_publish_retry),
            max_body_size: self
                .size(&["max_body_size"], MAX_BODY_SIZE_LIMIT)
                .unwrap_or(defaults.max_body_size),
            max_in_flight_bytes: self
                .int(&["max_in_flight_bytes"], 1, u64::MAX)
                .unwrap_or(defaults.max_in_flight_bytes),
            log: self.log_config(),
            http_addr: self.get(&["http_addr"]),
            management_url: self.management_url(),
            management_allow_http: self
                .get(&["management_allow_http"])
                .unwrap_or(defaults.management_allow_http),
            tls: self.tls_files(),
            // Puts the password into `urls`, which is why `urls` comes last.
            password: self.password(&mut urls, url_given),
            queue: self.name(QUEUE),
            reply_queue: self.name(REPLY_QUEUE),
            reply_key: self.get(REPLY_KEY),
            consumers: self.consumers(consumer_env),
            urls,
        }
    }

    /// `url`: at least one, each an AMQP URL.
    pub(super) fn urls(&mut self) -> Option<Vec<SecretUrl>> {
        let (key, urls) = self.get_keyed::<Vec<SecretUrl>>(URL)?;
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

    /// `result_store`: a Redis URL.
    fn result_store(&mut self) -> Option<SecretUrl> {
        let (key, url) = self.get_keyed::<SecretUrl>(&["result_store"])?;
        if let Some(message) = redis_url_problem(&url) {
            self.problem(key, message);
        }
        Some(url)
    }

    /// What the result store keys require of each other and of the handlers: a lease that
    /// outlives a few store calls, and a store for every `cache = "shared"`.
    pub(super) fn check_result_store(&mut self, config: &Config) {
        if config.result_store_lease < config.result_store_timeout.saturating_mul(3) {
            self.problem(
                "result_store_lease",
                format!(
                    "must be at least 3 × result_store_timeout ({}): the lease is renewed every \
                     third of it, each renewal taking up to result_store_timeout; got {}",
                    humantime::format_duration(config.result_store_timeout),
                    humantime::format_duration(config.result_store_lease)
                ),
            );
        }
        if config.result_store.is_some() {
            return;
        }
        for (name, section) in &config.consumers {
            if section.cache == Some(CacheMode::Shared) {
                self.problem(
                    format!("consumers.{name}.cache"),
                    "is \"shared\" but `result_store` is not set: set result_store = \
                     \"redis://host:6379/0\", or use cache = \"local\"",
                );
            }
        }
    }

    /// `retry_connect_max`: at least `retry_connect_interval`, which it defaults to.
    pub(super) fn retry_connect_max(&mut self, interval: Duration) -> Duration {
        match self.get_keyed::<Duration>(&["retry_connect_max"]) {
            Some((key, max)) if max < interval => {
                self.problem(
                    key,
                    format!(
                        "must be at least retry_connect_interval ({}), got {}",
                        humantime::format_duration(interval),
                        humantime::format_duration(max)
                    ),
                );
                interval
            }
            Some((_, max)) => max,
            None => interval,
        }
    }

    /// `management_url`: an HTTP(S) URL.
    pub(super) fn management_url(&mut self) -> Option<SecretUrl> {
        let (key, url) = self.get_keyed::<SecretUrl>(&["management_url"])?;
        if let Some(message) = http_url_problem(&url) {
            self.problem(key, message);
        }
        Some(url)
    }

    /// `tls_ca_file`, `tls_cert_file`, `tls_key_file`, checked: readable, PEM, the key
    /// matches the certificate. Problems name the key as written and the path.
    pub(super) fn tls_files(&mut self) -> crate::tls::TlsFiles {
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
    pub(super) fn password(
        &mut self,
        urls: &mut Vec<SecretUrl>,
        url_given: bool,
    ) -> Option<Password> {
        let (key, password) = self.get_keyed::<Password>(&["password"])?;
        if !url_given {
            *urls = vec![SecretUrl::new(DEFAULT_URL_WITHOUT_PASSWORD)];
        }
        match with_password(urls, &password) {
            Ok(with) => {
                *urls = with;
                Some(password)
            }
            Err(masked) => {
                self.problem(
                    key,
                    format!(
                        "URL `{masked}` has a password of its own; give the password in one \
                         place (remove it from the URL, or unset this key)"
                    ),
                );
                Some(password)
            }
        }
    }

    pub(super) fn log_config(&mut self) -> LogConfig {
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
        match self.take_table("log") {
            Some(toml::Value::Table(rest)) => {
                let known: Vec<&str> = (self.known.iter())
                    .filter_map(|name| name.strip_prefix("log."))
                    .collect();
                for key in rest.keys() {
                    let message = unknown_message(key, &known, "");
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

    pub(super) fn consumers(
        &mut self,
        mut env: BTreeMap<String, BTreeMap<String, String>>,
    ) -> BTreeMap<String, ConsumerConfig> {
        let mut sections = toml::Table::new();
        match self.take_table("consumers") {
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
            let mut scope = Scope::new(
                format!("consumers.{name}."),
                format!("{ENV_PREFIX}{CONSUMERS_ENV}{}__", name.to_ascii_uppercase()),
                table,
                env.remove(&name).unwrap_or_default(),
            );
            let consumer = scope.consumer();
            scope.report_unknown();
            self.problems.append(&mut scope.problems);
            consumers.insert(name, consumer);
        }
        consumers
    }

    /// Reads every key of a `[consumers.<name>]` section; each is spelled here only.
    pub(super) fn consumer(&mut self) -> ConsumerConfig {
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
            batch: self.int(&["batch"], 1, u16::MAX),
            batch_wait: self.get(&["batch_wait"]),
            cache: self.get(&["cache"]),
        }
    }
}

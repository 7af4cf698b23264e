//! The reader: one [`Scope`] per table with its environment variables, and the unknown-key
//! hints.
//!
//! Every key is spelled once, where it is read: the scope records the names it is asked for,
//! and whatever is left over is unknown, with a hint among the names recorded.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::error::syntax_problem;
use super::secret::{
    DEFAULT_URL_WITHOUT_PASSWORD, amqp_url_problem, http_url_problem, redis_url_problem,
    with_password,
};
use super::value::{FromConfigValue, range_message, shown, toml_type};
use super::{
    CONFIG_PATH_ENV, CacheMode, Config, ConfigError, ConfigProblem, ConsumerConfig, ENV_PREFIX,
    LogConfig, MAX_BODY_SIZE_LIMIT, MAX_RESULT_CACHE_SIZE, Password, SecretUrl,
};

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

const CONSUMERS_ENV: &str = "CONSUMERS__";

pub(crate) fn build(
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

    let mut scope = Scope::new(String::new(), ENV_PREFIX.to_owned(), table, top_env);
    scope.problems = problems;
    let config = scope.config(consumer_env);
    scope.report_unknown();
    scope.check_result_store(&config);
    if scope.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            problems: scope.problems,
        })
    }
}

/// A raw value before conversion to its key's type.
enum Raw {
    Toml(toml::Value),
    Env(String),
}

/// One table of settings (the top level or a `[consumers.x]` section) and its environment
/// variables. Keys are removed as they are read, so what remains is unknown; the names asked
/// for are recorded, for the hints.
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
    /// Every spelling asked for so far, in order (`log.level` for a key of a sub-table).
    known: Vec<&'static str>,
    /// The sub-tables asked for (`log`, `consumers`): keys in the file, not in the
    /// environment.
    tables: Vec<&'static str>,
}

impl Scope {
    fn new(
        toml_prefix: String,
        env_prefix: String,
        table: toml::Table,
        env: BTreeMap<String, String>,
    ) -> Self {
        Self {
            toml_prefix,
            env_prefix,
            table,
            env,
            problems: Vec::new(),
            known: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Removes the sub-table `name` (`log`, `consumers`), recording the name.
    fn take_table(&mut self, name: &'static str) -> Option<toml::Value> {
        self.tables.push(name);
        self.table.remove(name)
    }

    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Reads every top-level key; each is spelled here only (the order is the order of the
    /// problems).
    fn config(&mut self, consumer_env: BTreeMap<String, BTreeMap<String, String>>) -> Config {
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
    fn urls(&mut self) -> Option<Vec<SecretUrl>> {
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
    fn check_result_store(&mut self, config: &Config) {
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
    fn retry_connect_max(&mut self, interval: Duration) -> Duration {
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
    fn management_url(&mut self) -> Option<SecretUrl> {
        let (key, url) = self.get_keyed::<SecretUrl>(&["management_url"])?;
        if let Some(message) = http_url_problem(&url) {
            self.problem(key, message);
        }
        Some(url)
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
    fn password(&mut self, urls: &mut Vec<SecretUrl>, url_given: bool) -> Option<Password> {
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

    fn consumers(
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
            batch: self.int(&["batch"], 1, u16::MAX),
            batch_wait: self.get(&["batch_wait"]),
            cache: self.get(&["cache"]),
        }
    }

    /// Reports what is left, with hints among the names asked for: in the file, the keys and
    /// sub-tables of this table (not `log.level`); in the environment, the keys.
    fn report_unknown(&mut self) {
        let known: Vec<&str> = (self.known.iter())
            .copied()
            .filter(|name| !name.contains('.'))
            .collect();
        let known_toml: Vec<&str> = known.iter().chain(&self.tables).copied().collect();
        let keys: Vec<String> = self.table.keys().cloned().collect();
        for key in keys {
            let message = unknown_message(&key, &known_toml, "");
            self.problem(format!("{}{key}", self.toml_prefix), message);
        }
        let known_env: Vec<String> = known.iter().map(|name| name.to_ascii_uppercase()).collect();
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
    /// wins over the file), reporting spellings given twice. Records the names.
    fn take(&mut self, names: &'static [&'static str]) -> Option<(String, Raw)> {
        self.known.extend_from_slice(names);
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

    fn get_keyed<T: FromConfigValue>(
        &mut self,
        names: &'static [&'static str],
    ) -> Option<(String, T)> {
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

    fn get<T: FromConfigValue>(&mut self, names: &'static [&'static str]) -> Option<T> {
        self.get_keyed(names).map(|(_, value)| value)
    }

    /// A queue or exchange name: must not be empty.
    fn name(&mut self, names: &'static [&'static str]) -> Option<String> {
        let (key, name) = self.get_keyed::<String>(names)?;
        if name.is_empty() {
            self.problem(key, "must not be empty");
            return None;
        }
        Some(name)
    }

    fn positive_duration(&mut self, names: &'static [&'static str]) -> Option<Duration> {
        let (key, duration) = self.get_keyed::<Duration>(names)?;
        if duration.is_zero() {
            self.problem(key, "must be greater than zero");
            return None;
        }
        Some(duration)
    }

    /// Retry delays: each becomes a queue's message TTL in milliseconds, so at least 1 ms.
    fn retry_delays(&mut self, names: &'static [&'static str]) -> Option<Vec<Duration>> {
        let (key, delays) = self.get_keyed::<Vec<Duration>>(names)?;
        if delays.iter().any(|delay| delay.as_millis() == 0) {
            self.problem(key, "every delay must be at least 1ms");
            return None;
        }
        Some(delays)
    }

    fn int<T>(&mut self, names: &'static [&'static str], min: T, max: T) -> Option<T>
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
    fn size(&mut self, names: &'static [&'static str], max: usize) -> Option<usize> {
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        self.int(names, 1, max)
            .and_then(|value| usize::try_from(value).ok())
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests fail loudly")]
#[path = "tests/read.rs"]
mod tests;

//! The reads that are more than a type and a range, called from the key entries of
//! [`super::super::keys`]: URLs, the password (which goes into them), TLS files, the `[log]`
//! table, the `[consumers.<name>]` sections, and the checks between keys.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::super::secret::{
    DEFAULT_URL_WITHOUT_PASSWORD, amqp_url_problem, http_url_problem, redis_url_problem,
    with_password,
};
use super::super::value::{shown, toml_type};
use super::super::{CacheMode, Config, ConsumerConfig, ENV_PREFIX, LogConfig, Password, SecretUrl};
use super::*;

impl Scope {
    /// `url`: at least one, each an AMQP URL.
    pub(in crate::config) fn urls(&mut self) -> Option<Vec<SecretUrl>> {
        let (key, urls) = self.get_keyed::<Vec<SecretUrl>>(&["url", "conn_iddress"])?;
        self.url_given = true;
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
    pub(in crate::config) fn result_store(&mut self) -> Option<SecretUrl> {
        let (key, url) = self.get_keyed::<SecretUrl>(&["result_store"])?;
        if let Some(message) = redis_url_problem(&url) {
            self.problem(key, message);
        }
        Some(url)
    }

    /// What the result store keys require of each other and of the handlers: a lease that
    /// outlives a few store calls, and a store for every `cache = "shared"`.
    pub(in crate::config) fn check_result_store(&mut self, config: &Config) {
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
    pub(in crate::config) fn retry_connect_max(&mut self, interval: Duration) -> Duration {
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
    pub(in crate::config) fn management_url(&mut self) -> Option<SecretUrl> {
        let (key, url) = self.get_keyed::<SecretUrl>(&["management_url"])?;
        if let Some(message) = http_url_problem(&url) {
            self.problem(key, message);
        }
        Some(url)
    }

    /// `tls_ca_file`, `tls_cert_file`, `tls_key_file`, checked: readable, PEM, the key
    /// matches the certificate. Problems name the key as written and the path.
    pub(in crate::config) fn tls_files(&mut self) -> crate::tls::TlsFiles {
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
    pub(in crate::config) fn password(&mut self, urls: &mut Vec<SecretUrl>) -> Option<Password> {
        let (key, password) = self.get_keyed::<Password>(&["password"])?;
        if !self.url_given {
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

    /// The `[log]` table's keys (or their flat `log_*` spellings); whatever else is in the
    /// table is unknown.
    pub(in crate::config) fn log_config(&mut self) -> LogConfig {
        let log = LogConfig::read_from(self);
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
        log
    }

    /// A tracing filter (`log_level`): reported when it does not parse, kept as given.
    pub(in crate::config) fn log_filter(
        &mut self,
        names: &'static [&'static str],
    ) -> Option<String> {
        let (key, level) = self.get_keyed::<String>(names)?;
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&level) {
            self.problem(key, format!("invalid filter `{}` ({error})", shown(&level)));
        }
        Some(level)
    }

    /// A file name (`log_file_prefix`): reported when empty or holding a path separator, kept
    /// as given.
    pub(in crate::config) fn file_name(
        &mut self,
        names: &'static [&'static str],
    ) -> Option<String> {
        let (key, name) = self.get_keyed::<String>(names)?;
        if name.is_empty() || name.contains(['/', '\\']) {
            self.problem(key, "must be a non-empty file name without `/` or `\\`");
        }
        Some(name)
    }

    pub(in crate::config) fn consumers(&mut self) -> BTreeMap<String, ConsumerConfig> {
        let mut env = std::mem::take(&mut self.consumer_env);
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
            let consumer = ConsumerConfig::read_from(&mut scope);
            scope.report_unknown();
            self.problems.append(&mut scope.problems);
            consumers.insert(name, consumer);
        }
        consumers
    }
}

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
mod keys;
mod read;
mod secret;
mod value;
mod variants;

pub use error::{ConfigError, ConfigProblem};
pub use keys::*;
pub use secret::{Password, SecretUrl, url_has_password, with_password};
pub use value::MAX_DURATION;
pub(crate) use value::written;
pub use variants::{CacheMode, LogFormat, ParseVariantError, PublishVia, QueueType, ReplyToPolicy};

use std::path::{Path, PathBuf};

use read::build;

/// The environment variable naming the configuration file.
pub const CONFIG_PATH_ENV: &str = "RMQ_CONSUMER_CONFIG";
/// The configuration file read when [`CONFIG_PATH_ENV`] is not set, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "rmq-consumer.toml";
/// The prefix of environment variables overriding configuration keys.
pub const ENV_PREFIX: &str = "RMQ_CONSUMER_";

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

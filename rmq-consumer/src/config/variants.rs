//! The configuration's enumerated values (`queue_type`, `publish_via`, `reply_to`,
//! `log_format`, `cache`): their names, parsing and display, and the error of a value that is none of
//! them. Re-exported from [`crate::config`].

use std::fmt;
use std::str::FromStr;

use super::value::shown;

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

    pub(super) fn from_words(text: &str) -> Result<Self, String> {
        match text.trim() {
            "honour" | "honor" => Ok(Self::Honour),
            "ignore" => Ok(Self::Ignore),
            _ => Err(format!(
                "expected \"honour\", \"ignore\" or a list of prefixes, got `{}`",
                shown(text)
            )),
        }
    }

    pub(super) fn prefixes<'a>(items: impl Iterator<Item = &'a str>) -> Result<Self, String> {
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
    pub(super) fn new(expected: &'static str, got: &str) -> Self {
        Self {
            expected,
            got: shown(got),
        }
    }
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

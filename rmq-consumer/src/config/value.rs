//! Conversions of raw values (TOML or environment text) to each key's type, and their
//! limits; and back, as the configuration writes them ([`written`], the `Serialize` of the
//! enums).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::secret::{mask_url, split_urls};
use super::{
    CacheMode, LogFormat, ParseVariantError, Password, PublishVia, QueueType, ReplyToPolicy,
    SecretUrl,
};

pub(crate) fn range_message(value: i128, min: i128, max: i128) -> String {
    if max == i128::from(u32::MAX) || max == i128::from(u64::MAX) {
        format!("must be at least {min}, got {value}")
    } else {
        format!("must be between {min} and {max}, got {value}")
    }
}

/// A value for a message: truncated, and masked if it looks like a URL with credentials.
pub(crate) fn shown(text: &str) -> String {
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

pub(crate) fn toml_type(value: &toml::Value) -> &'static str {
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

/// Serializes a value the way the configuration writes it, for the fields whose type serde
/// would write otherwise: durations as humantime text (`"1m 30s"`), paths as text (lossy, never
/// an error), and options and lists of those. Use it as
/// `#[serde(serialize_with = "crate::config::written")]`.
pub(crate) fn written<T: Written + ?Sized, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    value.write(serializer)
}

/// A type [`written`] knows.
pub(crate) trait Written {
    fn write<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
}

/// One [`Written`] value as a `Serialize`, for options and lists.
struct AsWritten<'a, T: ?Sized>(&'a T);

impl<T: Written + ?Sized> serde::Serialize for AsWritten<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.write(serializer)
    }
}

impl Written for Duration {
    fn write<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*self))
    }
}

impl Written for PathBuf {
    fn write<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.display())
    }
}

impl<T: Written> Written for Option<T> {
    fn write<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Some(value) => serializer.serialize_some(&AsWritten(value)),
            None => serializer.serialize_none(),
        }
    }
}

impl<T: Written> Written for Vec<T> {
    fn write<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter().map(AsWritten))
    }
}

/// The enums of the configuration serialize as their names in it (`as_str`).
macro_rules! serialize_as_str {
    ($($name:ty),*) => {$(
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }
    )*};
}

serialize_as_str!(QueueType, PublishVia, LogFormat, CacheMode);

/// `"honour"`, `"ignore"`, or the list of prefixes.
impl serde::Serialize for ReplyToPolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Honour => serializer.serialize_str("honour"),
            Self::Ignore => serializer.serialize_str("ignore"),
            Self::Prefixes(prefixes) => serde::Serialize::serialize(prefixes, serializer),
        }
    }
}

/// Conversion of a raw value to a key's type; the error is the problem's message.
pub(crate) trait FromConfigValue: Sized {
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
        String::from_toml(value).map(SecretUrl::new)
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

impl FromConfigValue for CacheMode {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        String::from_toml(value).and_then(|s| Self::from_env(&s))
    }

    fn from_env(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|error: ParseVariantError| error.to_string())
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
#[path = "tests/value.rs"]
mod tests;

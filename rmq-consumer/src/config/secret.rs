//! Secrets: [`SecretUrl`] and [`Password`], masking, URL splitting, [`with_password`], and
//! the rejection of other clients' TLS query parameters.

use std::fmt;
use std::str::FromStr;

/// A URL that may carry a password. `Debug`, `Display` and `Serialize` print it masked
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

/// Masked, like `Display`: a serialized configuration never carries the password.
impl serde::Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.masked())
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
/// `Debug`, `Display` and `Serialize` print `****`.
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

/// `****`, like `Display`: a serialized configuration never carries the password.
impl serde::Serialize for Password {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("****")
    }
}

/// The default URL without its password, for a configuration that gives `password` but no
/// `url`.
pub(crate) const DEFAULT_URL_WITHOUT_PASSWORD: &str = "amqp://guest@127.0.0.1:5672/%2f";

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

pub(crate) fn mask_url(raw: &str) -> String {
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
pub(crate) fn split_urls(text: &str) -> Vec<&str> {
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

pub(crate) fn amqp_url_problem(url: &SecretUrl) -> Option<String> {
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

/// A `result_store` URL: `redis://` or `rediss://` with a host, which the Redis client
/// accepts. Messages show the URL masked, never the client's own text (it may quote it).
pub(crate) fn redis_url_problem(url: &SecretUrl) -> Option<String> {
    let raw = url.expose();
    let lower = raw.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("redis://")
        .or_else(|| lower.strip_prefix("rediss://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {}
        _ => {
            return Some(format!(
                "must be a redis:// or rediss:// URL with a host, got `{}`",
                url.masked()
            ));
        }
    }
    match redis::IntoConnectionInfo::into_connection_info(raw) {
        Ok(_) => None,
        Err(_) => Some(format!(
            "is not a valid Redis URL (expected redis://[user:password@]host[:port][/db]): `{}`",
            url.masked()
        )),
    }
}

pub(crate) fn http_url_problem(url: &SecretUrl) -> Option<String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests fail loudly")]
#[path = "tests/secret.rs"]
mod tests;

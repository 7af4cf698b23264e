//! A read-only client for the RabbitMQ management HTTP API: GET requests only, run on tokio's
//! blocking pool (ureq is a small blocking client; the CLI makes a handful of requests).
//!
//! Address and credentials: the configured `management_url` (its userinfo, when present, is
//! the login), else `https://<broker host>:15671` for an `amqps://` broker URL and
//! `http://<broker host>:15672` otherwise; the login defaults to the broker URL's user and
//! password, percent-decoded. The password only ever goes into the `Authorization` header,
//! never into a URL that could be printed.
//!
//! HTTPS uses the broker's TLS settings: `tls_ca_file` (replacing the system roots) and the
//! client certificate. The login is never sent over plain `http://` to a host that is not
//! loopback unless `management_allow_http = true`.

use std::{str::FromStr, time::Duration};

use base64::Engine as _;
use lapin::uri::AMQPUri;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::Value;

use crate::config::{Config, SecretUrl};

/// The management API's default port.
pub(crate) const DEFAULT_MANAGEMENT_PORT: u16 = 15672;
/// The management API's default HTTPS port, used for an `amqps://` broker.
pub(crate) const DEFAULT_MANAGEMENT_TLS_PORT: u16 = 15671;
/// How long one management request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Characters escaped in one path segment: everything but RFC 3986's unreserved set.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why the management API could not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ManagementError {
    /// The configured management URL does not parse.
    #[error("invalid management URL {url}")]
    InvalidUrl { url: String },
    /// The broker URL does not parse, so no management address can be derived from it.
    #[error("cannot derive the management URL from broker URL {url}")]
    NoBrokerUrl { url: String },
    /// The login would go over plain http to a host that is not loopback.
    #[error(
        "refusing to send the management login to {base} over plain http (not a loopback \
         host): use an https:// management_url, or set management_allow_http = true"
    )]
    PlainHttp { base: String },
    /// The TLS settings cannot be used for the management API.
    #[error("the TLS settings cannot be used for the management API")]
    TlsSettings(#[source] crate::tls::TlsError),
    /// The TLS handshake failed; `problem` says why in words.
    #[error("management API at {base}: {problem}")]
    Tls {
        base: String,
        problem: String,
        #[source]
        source: ureq::Error,
    },
    /// The request failed (connection refused, timeout).
    #[error("management API at {base} is unreachable")]
    Unreachable {
        base: String,
        #[source]
        source: ureq::Error,
    },
    /// The API refused the login.
    #[error("management API at {base} refused the login of user `{user}` (HTTP {status})")]
    Unauthorized {
        base: String,
        user: String,
        status: u16,
    },
    /// Any other unexpected HTTP status.
    #[error("management API at {base} answered HTTP {status} for {path}")]
    Status {
        base: String,
        path: String,
        status: u16,
    },
    /// The answer was not the expected JSON.
    #[error("management API at {base} sent an unreadable answer for {path}")]
    Decode {
        base: String,
        path: String,
        #[source]
        source: ureq::Error,
    },
    /// The blocking request task died.
    #[error("management request task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// A read-only management API client for one vhost.
#[derive(Clone)]
pub(crate) struct Management {
    agent: ureq::Agent,
    /// Base URL without userinfo and without a trailing slash; safe to print.
    base: String,
    user: String,
    authorization: String,
    vhost: String,
    /// Whether a client certificate is configured (for the words of a TLS failure).
    client_cert: bool,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base", &self.base)
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// The client for `config`'s management API, for the vhost of `broker`.
    pub(crate) fn new(config: &Config, broker: &SecretUrl) -> Result<Self, ManagementError> {
        let amqp = AMQPUri::from_str(broker.expose()).ok();
        let (mut base, mut user, mut password) = match &config.management_url {
            Some(url) => from_management_url(url)?,
            None => {
                let uri = amqp.as_ref().ok_or_else(|| ManagementError::NoBrokerUrl {
                    url: broker.masked(),
                })?;
                let host = if uri.authority.host.contains(':') {
                    format!("[{}]", uri.authority.host)
                } else {
                    uri.authority.host.clone()
                };
                let base = if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
                    format!("https://{host}:{DEFAULT_MANAGEMENT_TLS_PORT}")
                } else {
                    format!("http://{host}:{DEFAULT_MANAGEMENT_PORT}")
                };
                (base, None, None)
            }
        };
        if user.is_none()
            && let Some(uri) = &amqp
        {
            user = Some(uri.authority.userinfo.username.clone());
            password = Some(uri.authority.userinfo.password.clone());
        }
        while base.ends_with('/') {
            base.pop();
        }
        let user = user.unwrap_or_else(|| "guest".to_owned());
        let password = password.unwrap_or_default();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        if !config.management_allow_http && !loopback_or_https(&base) {
            return Err(ManagementError::PlainHttp { base });
        }
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .max_redirects(0);
        if config.tls.is_set() {
            builder = builder.tls_config(tls_config(&config.tls)?);
        }
        let agent = ureq::Agent::new_with_config(builder.build());
        Ok(Self {
            agent,
            base,
            user,
            authorization: format!("Basic {token}"),
            vhost: amqp.map_or_else(|| "/".to_owned(), |uri| uri.vhost),
            client_cert: config.tls.cert_file.is_some(),
        })
    }

    /// The base URL, safe to print.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `GET /api/overview`: checks the API answers and the login works.
    pub(crate) async fn overview(&self) -> Result<Value, ManagementError> {
        let path = "/api/overview".to_owned();
        self.get(path.clone())
            .await?
            .ok_or(ManagementError::Status {
                base: self.base.clone(),
                path,
                status: 404,
            })
    }

    /// `GET /api/queues/<vhost>/<name>`; `None` when the queue does not exist.
    pub(crate) async fn queue(&self, name: &str) -> Result<Option<QueueInfo>, ManagementError> {
        let found = self
            .get(format!(
                "/api/queues/{}/{}",
                segment(&self.vhost),
                segment(name)
            ))
            .await?;
        Ok(found.map(typed))
    }

    /// `GET /api/queues/<vhost>/<name>/bindings`; `None` when the queue does not exist (or
    /// the answer is no list).
    pub(crate) async fn queue_bindings(
        &self,
        name: &str,
    ) -> Result<Option<Vec<BindingInfo>>, ManagementError> {
        let found = self
            .get(format!(
                "/api/queues/{}/{}/bindings",
                segment(&self.vhost),
                segment(name)
            ))
            .await?;
        Ok(found.and_then(|value| serde_json::from_value(value).ok()))
    }

    /// `GET /api/exchanges/<vhost>/<name>`; `None` when the exchange does not exist.
    pub(crate) async fn exchange(
        &self,
        name: &str,
    ) -> Result<Option<ExchangeInfo>, ManagementError> {
        let name = if name.is_empty() { "amq.default" } else { name };
        let found = self
            .get(format!(
                "/api/exchanges/{}/{}",
                segment(&self.vhost),
                segment(name)
            ))
            .await?;
        Ok(found.map(typed))
    }

    /// One GET; `Ok(None)` on 404.
    async fn get(&self, path: String) -> Result<Option<Value>, ManagementError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.get_blocking(&path))
            .await
            .map_err(ManagementError::Task)?
    }

    fn get_blocking(&self, path: &str) -> Result<Option<Value>, ManagementError> {
        let url = format!("{}{path}", self.base);
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .call()
            .map_err(|source| {
                let problem = match &source {
                    ureq::Error::Io(error) => crate::tls::describe(error, self.client_cert),
                    ureq::Error::Rustls(error) => crate::tls::describe(error, self.client_cert),
                    _ => None,
                };
                match problem {
                    Some(problem) => ManagementError::Tls {
                        base: self.base.clone(),
                        problem,
                        source,
                    },
                    None => ManagementError::Unreachable {
                        base: self.base.clone(),
                        source,
                    },
                }
            })?;
        let status = response.status().as_u16();
        match status {
            200 => response
                .body_mut()
                .read_json::<Value>()
                .map(Some)
                .map_err(|source| ManagementError::Decode {
                    base: self.base.clone(),
                    path: path.to_owned(),
                    source,
                }),
            404 => Ok(None),
            401 | 403 => Err(ManagementError::Unauthorized {
                base: self.base.clone(),
                user: self.user.clone(),
                status,
            }),
            _ => Err(ManagementError::Status {
                base: self.base.clone(),
                path: path.to_owned(),
                status,
            }),
        }
    }
}

/// Splits a configured management URL into a printable base and its optional login.
fn from_management_url(
    url: &SecretUrl,
) -> Result<(String, Option<String>, Option<String>), ManagementError> {
    let invalid = || ManagementError::InvalidUrl { url: url.masked() };
    let mut parsed = url::Url::parse(url.expose()).map_err(|_| invalid())?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(invalid());
    }
    let decode = |text: &str| percent_decode_str(text).decode_utf8_lossy().into_owned();
    let user = (!parsed.username().is_empty()).then(|| decode(parsed.username()));
    let password = parsed.password().map(decode);
    parsed.set_username("").map_err(|()| invalid())?;
    parsed.set_password(None).map_err(|()| invalid())?;
    parsed.set_query(None);
    parsed.set_fragment(None);
    let password = password.or_else(|| user.as_ref().map(|_| String::new()));
    Ok((parsed.to_string(), user, password))
}

/// Whether `base` is https, or http to a loopback host (`localhost`, 127.0.0.0/8, `::1`).
fn loopback_or_https(base: &str) -> bool {
    let Ok(url) = url::Url::parse(base) else {
        return false;
    };
    if url.scheme() == "https" {
        return true;
    }
    match url.host() {
        Some(url::Host::Domain(host)) => host.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// ureq's TLS settings from ours: the CA bundle replaces the roots, the client certificate
/// is presented.
fn tls_config(files: &crate::tls::TlsFiles) -> Result<ureq::tls::TlsConfig, ManagementError> {
    let (roots, identity) = files.material().map_err(ManagementError::TlsSettings)?;
    let mut builder = ureq::tls::TlsConfig::builder();
    if let Some(roots) = roots {
        let certs: Vec<ureq::tls::Certificate<'static>> = roots
            .iter()
            .map(|cert| ureq::tls::Certificate::from_der(cert.as_ref()).to_owned())
            .collect();
        builder = builder.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    if let Some((chain, key)) = identity {
        let certs: Vec<ureq::tls::Certificate<'static>> = chain
            .iter()
            .map(|cert| ureq::tls::Certificate::from_der(cert.as_ref()).to_owned())
            .collect();
        // ureq takes the key as PEM (its key kinds are private): read the checked file again.
        let _ = key;
        let path = files.key_file.clone().unwrap_or_default();
        let unreadable = |what| {
            ManagementError::TlsSettings(crate::tls::TlsError::Pem {
                key: "tls_key_file",
                path: path.clone(),
                what,
            })
        };
        let pem = std::fs::read(&path).map_err(|_| unreadable("cannot be read again"))?;
        let key = ureq::tls::PrivateKey::from_pem(&pem)
            .map_err(|_| unreadable("holds no PEM private key"))?;
        builder = builder.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&certs, key)));
    }
    Ok(builder.build())
}

/// One URL path segment, percent-encoded (`/` → `%2F`).
fn segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

/// What `status` reads of `GET /api/queues/<vhost>/<name>`. Every field is optional and
/// lenient: a field that is missing or of another type than expected reads as `None` (the
/// API differs between broker versions and with the statistics settings).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct QueueInfo {
    #[serde(deserialize_with = "lenient")]
    pub(crate) messages_ready: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) messages_unacknowledged: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) consumers: Option<u64>,
    /// `classic`, `quorum`, `stream`.
    #[serde(rename = "type", deserialize_with = "lenient")]
    pub(crate) kind: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) durable: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) state: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) policy: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) arguments: Option<std::collections::BTreeMap<String, Value>>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) effective_policy_definition: Option<std::collections::BTreeMap<String, Value>>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) consumer_details: Option<Vec<ConsumerDetail>>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) messages_details: Option<RateDetails>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) message_stats: Option<MessageStats>,
}

/// One consumer of a queue, in [`QueueInfo::consumer_details`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ConsumerDetail {
    #[serde(deserialize_with = "lenient")]
    pub(crate) consumer_tag: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) prefetch_count: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) ack_required: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) channel_details: Option<ChannelDetails>,
}

/// The channel of a [`ConsumerDetail`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ChannelDetails {
    #[serde(deserialize_with = "lenient")]
    pub(crate) name: Option<String>,
}

/// A queue's message statistics (present when statistics are collected).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct MessageStats {
    #[serde(deserialize_with = "lenient")]
    pub(crate) publish_details: Option<RateDetails>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) deliver_get_details: Option<RateDetails>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) ack_details: Option<RateDetails>,
}

/// One `*_details` object: its `rate` per second.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RateDetails {
    #[serde(deserialize_with = "lenient")]
    pub(crate) rate: Option<f64>,
}

/// What `status` reads of `GET /api/exchanges/<vhost>/<name>`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ExchangeInfo {
    /// `direct`, `topic`, ...
    #[serde(rename = "type", deserialize_with = "lenient")]
    pub(crate) kind: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) durable: Option<bool>,
}

/// One binding of `GET /api/queues/<vhost>/<name>/bindings`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct BindingInfo {
    /// The exchange (empty: the default exchange).
    #[serde(deserialize_with = "lenient")]
    pub(crate) source: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(crate) routing_key: Option<String>,
}

/// An answer as `T`; one that is no object reads as `T::default()` (every field `None`).
fn typed<T: DeserializeOwned + Default>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_default()
}

/// A field as `T`, or `None` when it is of another type.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let value = Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn management_answers_are_read_leniently() {
        let queue: QueueInfo = typed(serde_json::json!({
            "messages_ready": 3,
            "consumers": "two",
            "type": "quorum",
            "arguments": {"x-queue-type": "quorum"},
            "consumer_details": [{"consumer_tag": "ctag", "prefetch_count": 5,
                "channel_details": {"name": "127.0.0.1:1 (1)"}}],
            "message_stats": {"publish_details": {"rate": 2}},
        }));
        assert_eq!(queue.messages_ready, Some(3));
        assert_eq!(
            queue.consumers, None,
            "a field of another type reads as None"
        );
        assert_eq!(queue.kind.as_deref(), Some("quorum"));
        assert_eq!(queue.arguments.map(|a| a.len()), Some(1));
        let consumers = queue.consumer_details.unwrap_or_default();
        assert_eq!(consumers.len(), 1);
        assert_eq!(consumers[0].prefetch_count, Some(5));
        assert_eq!(consumers[0].ack_required, None);
        let rate = queue
            .message_stats
            .and_then(|s| s.publish_details)
            .and_then(|d| d.rate);
        assert_eq!(rate, Some(2.0));
        let not_an_object: ExchangeInfo = typed(serde_json::json!([1, 2]));
        assert!(not_an_object.kind.is_none() && not_an_object.durable.is_none());
    }

    fn config(management: Option<&str>) -> Config {
        Config {
            management_url: management.map(SecretUrl::new),
            management_allow_http: true,
            ..Config::default()
        }
    }

    #[test]
    fn an_amqps_broker_means_https_on_15671() {
        let broker = SecretUrl::new("amqps://app:secret@rabbit.local:5671/prod");
        let m = Management::new(&config(None), &broker).unwrap();
        assert_eq!(m.base(), "https://rabbit.local:15671");
    }

    #[test]
    fn no_login_over_plain_http_to_another_host() {
        let strict = |management: Option<&str>, broker: &str| {
            let config = Config {
                management_allow_http: false,
                ..config(management)
            };
            Management::new(&config, &SecretUrl::new(broker))
        };
        let error = strict(None, "amqp://app:secret@rabbit.local:5672/%2f").unwrap_err();
        assert!(
            matches!(error, ManagementError::PlainHttp { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("management_allow_http"),
            "{error}"
        );
        assert!(!error.to_string().contains("secret"), "{error}");
        assert!(strict(Some("http://ops:x@10.0.0.1:15672"), "amqp://a@h/%2f").is_err());
        for fine in [
            "http://localhost:15672",
            "http://127.0.0.2:15672",
            "http://[::1]:15672",
            "https://mgmt.example:443",
        ] {
            assert!(strict(Some(fine), "amqp://a:b@h/%2f").is_ok(), "{fine}");
        }
    }

    #[test]
    fn derives_the_address_and_login_from_the_broker_url() {
        let broker = SecretUrl::new("amqp://app:p%40ss@rabbit.local:5672/prod");
        let m = Management::new(&config(None), &broker).unwrap();
        assert_eq!(m.base(), "http://rabbit.local:15672");
        assert_eq!(m.user, "app");
        assert_eq!(m.vhost, "prod");
        let expected = base64::engine::general_purpose::STANDARD.encode("app:p@ss");
        assert_eq!(m.authorization, format!("Basic {expected}"));
        assert!(!format!("{m:?}").contains("p@ss"));
    }

    #[test]
    fn a_configured_management_url_wins_and_is_stripped_of_its_login() {
        let broker = SecretUrl::new("amqp://app:secret@rabbit:5672/%2f");
        let m =
            Management::new(&config(Some("https://ops:t%3Ak@mgmt:443/rabbit/")), &broker).unwrap();
        assert_eq!(m.base(), "https://mgmt/rabbit");
        assert_eq!(m.user, "ops");
        let expected = base64::engine::general_purpose::STANDARD.encode("ops:t:k");
        assert_eq!(m.authorization, format!("Basic {expected}"));
        assert_eq!(m.vhost, "/");

        let m = Management::new(&config(Some("http://mgmt:15672")), &broker).unwrap();
        assert_eq!(m.base(), "http://mgmt:15672");
        assert_eq!(m.user, "app");
    }

    #[test]
    fn invalid_management_urls_are_masked() {
        let broker = SecretUrl::new("amqp://app:secret@rabbit:5672/%2f");
        let error = Management::new(&config(Some("ftp://u:hunter2@x")), &broker).unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn segments_escape_slashes() {
        assert_eq!(segment("/"), "%2F");
        assert_eq!(segment("a.b-c_d~e"), "a.b-c_d~e");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }
}

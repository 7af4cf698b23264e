//! Connecting: the broker URLs are tried in turn; the delay between rounds grows from
//! `retry_connect_interval` to `retry_connect_max`, with a little jitter.

use std::{str::FromStr, sync::Arc, time::Duration};

use lapin::{
    Connection, ConnectionProperties,
    tcp::{AMQPUriTcpExt, RustlsConnector},
    uri::{AMQPScheme, AMQPUri},
};

use crate::{config::SecretUrl, error::ConnectError, tls::TlsFiles};

/// How long one connection attempt may take before the next URL is tried.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a connection to the first URL that answers, starting at `start`; returns it with its
/// index. `amqps://` URLs use `tls` (the engine and the CLI connect alike).
pub(crate) async fn connect_any(
    urls: &[SecretUrl],
    tls: &TlsFiles,
    start: usize,
    heartbeat: u16,
    name: &str,
) -> Result<(Connection, usize), Vec<ConnectError>> {
    let mut errors = Vec::new();
    // Built once per round: the files are read again on the next round (a renewed
    // certificate is picked up on reconnect).
    let mut client_config = None;
    for offset in 0..urls.len() {
        let index = (start + offset) % urls.len();
        let Some(url) = urls.get(index) else {
            continue;
        };
        match connect(url, tls, &mut client_config, heartbeat, name).await {
            Ok(connection) => return Ok((connection, index)),
            Err(error) => errors.push(error),
        }
    }
    Err(errors)
}

/// Opens one connection with the given heartbeat.
async fn connect(
    url: &SecretUrl,
    tls: &TlsFiles,
    client_config: &mut Option<Arc<rustls::ClientConfig>>,
    heartbeat: u16,
    name: &str,
) -> Result<Connection, ConnectError> {
    let mut uri = AMQPUri::from_str(url.expose())
        .map_err(|_| ConnectError::InvalidUrl { url: url.masked() })?;
    uri.query.heartbeat = Some(heartbeat);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let attempt = async {
        match uri.scheme {
            AMQPScheme::AMQP => Connection::connect_uri(uri, properties).await,
            AMQPScheme::AMQPS => {
                let config = match client_config {
                    Some(config) => Arc::clone(config),
                    None => {
                        let config = tls
                            .client_config()
                            .map_err(|source| ConnectError::TlsSettings { source })?;
                        *client_config = Some(Arc::clone(&config));
                        config
                    }
                };
                connect_tls(uri, config, properties).await
            }
        }
        .map_err(
            |source| match crate::tls::describe(&source, tls.cert_file.is_some()) {
                Some(problem) => ConnectError::Tls {
                    url: url.masked(),
                    problem,
                    source,
                },
                None => ConnectError::Failed {
                    url: url.masked(),
                    source,
                },
            },
        )
    };
    match tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::TimedOut {
            url: url.masked(),
            after: DEFAULT_CONNECT_TIMEOUT,
        }),
    }
}

/// AMQP over TLS with our own rustls configuration: lapin's TLS options can only add CAs to
/// the system roots, so the TCP stream is opened by lapin's helper and wrapped here.
async fn connect_tls(
    uri: AMQPUri,
    config: Arc<rustls::ClientConfig>,
    properties: ConnectionProperties,
) -> lapin::Result<Connection> {
    let connector = RustlsConnector::from(Arc::unwrap_or_clone(config));
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri.authority.host.clone();
            let mut plain = uri;
            plain.scheme = AMQPScheme::AMQP;
            let stream = plain.connect_async(&runtime).await?;
            Ok(stream.into_rustls(&connector, &host).await?)
        },
        properties,
    )
    .await
}

/// The wait before connection round `attempt` (0-based): `interval * 2^attempt`, capped at
/// `max`, then ±10 % jitter so a fleet does not reconnect in lockstep.
pub(crate) fn backoff(attempt: u32, interval: Duration, max: Duration) -> Duration {
    let max = max.max(interval);
    let base = interval
        .checked_mul(1_u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = f64::from(nanos % 2001) / 10_000.0 - 0.1; // -0.1 ..= 0.1
    base.mul_f64(1.0 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_bounded_jitter() {
        let s = Duration::from_secs;
        for (attempt, expected) in [(0, 1), (1, 2), (2, 4), (3, 8), (10, 8), (40, 8)] {
            let d = backoff(attempt, s(1), s(8));
            let e = s(expected);
            assert!(
                d >= e.mul_f64(0.89) && d <= e.mul_f64(1.11),
                "{attempt}: {d:?}"
            );
        }
        let fixed = backoff(5, s(30), s(30));
        assert!(fixed >= s(26) && fixed <= s(34));
    }
}

//! Connecting: the broker URLs are tried in turn; the delay between rounds grows from
//! `retry_connect_interval` to `retry_connect_max`, with a little jitter.

use std::{str::FromStr, time::Duration};

use lapin::{Connection, ConnectionProperties, uri::AMQPUri};

use crate::{config::SecretUrl, error::ConnectError};

/// How long one connection attempt may take before the next URL is tried.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a connection to the first URL that answers, starting at `start`; returns it with its
/// index.
pub(crate) async fn connect_any(
    urls: &[SecretUrl],
    start: usize,
    heartbeat: u16,
    name: &str,
) -> Result<(Connection, usize), Vec<ConnectError>> {
    let mut errors = Vec::new();
    for offset in 0..urls.len() {
        let index = (start + offset) % urls.len();
        match connect(&urls[index], heartbeat, name).await {
            Ok(connection) => return Ok((connection, index)),
            Err(error) => errors.push(error),
        }
    }
    Err(errors)
}

/// Opens one connection with the given heartbeat.
pub(crate) async fn connect(
    url: &SecretUrl,
    heartbeat: u16,
    name: &str,
) -> Result<Connection, ConnectError> {
    let mut uri = AMQPUri::from_str(url.expose())
        .map_err(|_| ConnectError::InvalidUrl { url: url.masked() })?;
    uri.query.heartbeat = Some(heartbeat);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(
        DEFAULT_CONNECT_TIMEOUT,
        Connection::connect_uri(uri, properties),
    )
    .await
    {
        Ok(result) => result.map_err(|source| ConnectError::Failed {
            url: url.masked(),
            source,
        }),
        Err(_) => Err(ConnectError::TimedOut {
            url: url.masked(),
            after: DEFAULT_CONNECT_TIMEOUT,
        }),
    }
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

//! The store's values: the task key, the lease value and the stored envelope (and telling
//! them apart), and the lease tokens.

use super::*;

/// Uuids longer than this (bytes) are hashed in keys.
pub(crate) const MAX_KEY_UUID: usize = 256;

/// The version of the stored envelope.
pub(super) const ENVELOPE_VERSION: u64 = 1;

/// What a lease's value starts with; the rest is the holder's token. A stored result (an
/// envelope, JSON) starts with `{`.
pub(super) const LEASE_PREFIX: &[u8] = b"lease:";

/// The store's key of task `uuid` of handler `handler` under `prefix`: `<prefix><handler>:<uuid>`,
/// the uuid hashed when it is longer than [`MAX_KEY_UUID`] bytes.
pub(crate) fn task_key(prefix: &str, handler: &str, uuid: &str) -> String {
    if uuid.len() > MAX_KEY_UUID {
        let digest = Md5::digest(uuid.as_bytes());
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("{prefix}{handler}:md5:{hex}")
    } else {
        // Not `format!`: this runs for every task, and the formatting machinery costs more
        // than the copies.
        let size = prefix
            .len()
            .saturating_add(handler.len())
            .saturating_add(uuid.len());
        let mut key = String::with_capacity(size.saturating_add(1));
        key.push_str(prefix);
        key.push_str(handler);
        key.push(':');
        key.push_str(uuid);
        key
    }
}

/// A lease's value: [`LEASE_PREFIX`] and the holder's token, `<base>:<id>` (`base` this
/// process's part, `id` the lease's number in it).
pub(super) fn lease_value(base: &str, id: u64) -> String {
    use std::fmt::Write as _;
    // One allocation, sized for the longest id (20 digits).
    let mut value = String::with_capacity(base.len().saturating_add(LEASE_PREFIX.len() + 21));
    value.push_str("lease:");
    value.push_str(base);
    let _ = write!(value, ":{id}");
    value
}

/// What a task's key holds, read from its value.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Entry<'a> {
    /// A lease: the holder's token.
    Lease(&'a [u8]),
    /// Anything else: a stored result (an envelope, if this version wrote it).
    Result(&'a [u8]),
}

impl<'a> Entry<'a> {
    pub(super) fn of(value: &'a [u8]) -> Self {
        match value.strip_prefix(LEASE_PREFIX) {
            Some(token) => Self::Lease(token),
            None => Self::Result(value),
        }
    }
}

/// A stored result: what the handler returned (`None`: nothing to publish).
pub(crate) type Stored = Option<Value>;

/// The stored form of a handler's successful output.
pub(crate) fn encode(output: &Stored) -> Result<Vec<u8>, serde_json::Error> {
    /// The envelope's fields, borrowed (no copy of the result).
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        v: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a Value>,
    }
    serde_json::to_vec(&Envelope {
        v: ENVELOPE_VERSION,
        result: output.as_ref(),
    })
}

/// A handler's output from its stored form; `None` when it is not an envelope this version
/// wrote.
pub(crate) fn decode(bytes: &[u8]) -> Option<Stored> {
    match serde_json::from_slice::<Value>(bytes).ok()? {
        Value::Object(mut envelope) => {
            if envelope.get("v").and_then(Value::as_u64) != Some(ENVELOPE_VERSION) {
                return None;
            }
            Some(envelope.remove("result"))
        }
        _ => None,
    }
}

/// Milliseconds for Redis, at least 1.
pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// This process's part of lease tokens: the host (when known), the pid and a random number,
/// so an operator can tell who holds a lease and two processes never share a token.
pub(super) fn token_base() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    format!("{host}:{}:{:016x}", std::process::id(), hasher.finish())
}

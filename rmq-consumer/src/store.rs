//! The result store shared by every replica (`result_store`, Redis): a task runs once across
//! the fleet while the store is up, its result survives restarts, and a dead worker's task is
//! taken over once its lease expires.
//!
//! # Keys
//!
//! For handler `H` and task uuid `U` (prefix `P`, `result_store_prefix`):
//!
//! - `P H:U:result` (no spaces): the result as published, in an envelope that says whether the
//!   handler returned one (`{"v":1,"result":<json>}` or `{"v":1}`), kept `result_ttl`. Only
//!   successes are stored.
//! - `P H:U:lease`: the token of the replica running the task, expiring after
//!   `result_store_lease` unless renewed.
//!
//! A handler name never holds `:` (it is a Rust fn name), so two handlers never share a key.
//! A uuid longer than [`MAX_KEY_UUID`] bytes is replaced by `md5:<hex digest>` in the keys
//! (a custom uuid fn cannot make keys of any size); the CLI computes the same keys.
//!
//! # Calls
//!
//! Each operation is one round trip, atomic on the server (a Lua script):
//! [`Store::claim`] returns the stored result, or takes the lease (`SET NX PX`), or says who
//! holds it; [`Store::finish`] stores a success (unless one is stored already: the first
//! stays) and deletes the lease only while the lease is ours or gone (a takeover's owner
//! stores its own), and a failure only deletes our lease.
//! One renewer task per store renews every lease this process holds in one script call every
//! third of the lease or every second (whichever is shorter); a lease that expired, was
//! flushed or was taken by another replica is reported lost (the task may then run twice).
//!
//! # Failures
//!
//! Every call is bounded by `result_store_timeout`. A failed or slow call starts an
//! *episode*: one warning with the error (never the URL's password), the connection dropped
//! (a fresh one is built for the next attempt: the reconnecting manager alone kept failing
//! after an outage), and until a call succeeds again at most one call per second reaches
//! Redis; the others fail at once. Every failure is counted (`store_errors`) and the caller
//! goes on without the store: the handler runs (at-least-once, duplicates allowed). The first
//! success ends the episode with one info line.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use md5::{Digest, Md5};
use redis::{
    Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use serde_json::Value;
use tracing::{info, warn};

use crate::{
    config::{Config, SecretUrl},
    error::StoreError,
};

/// Uuids longer than this (bytes) are hashed in keys.
pub(crate) const MAX_KEY_UUID: usize = 256;
/// While the store is down, at most one call per this period reaches it.
const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// The renewer's longest period (it also probes a store that is down).
const RENEW_PERIOD_MAX: Duration = Duration::from_secs(1);
/// Leases renewed per script call.
const RENEW_CHUNK: usize = 500;
/// The version of the stored envelope.
const ENVELOPE_VERSION: u64 = 1;

/// `KEYS[1]` result, `KEYS[2]` lease; `ARGV[1]` token, `ARGV[2]` lease ms. Returns `{0,
/// result}` (stored), `{1, ''}` (claimed) or `{2, holder}` (held by another).
const CLAIM: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored then return {0, stored} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, ''} end
return {2, redis.call('GET', KEYS[2]) or ''}
";

/// `KEYS[1]` result, `KEYS[2]` lease; `ARGV[1]` token, `ARGV[2]` result ttl ms, `ARGV[3]`
/// envelope. Unless another replica holds the lease, stores the result if none is stored yet
/// (the first stored result stays) and deletes the lease. Returns 1 (stored) or 0 (another
/// replica holds the lease, or a result was stored already).
const FINISH: &str = r"
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
local stored = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[2])
if holder then redis.call('DEL', KEYS[2]) end
if stored then return 1 end
return 0
";

/// `KEYS[1]` lease; `ARGV[1]` token. Deletes the lease if it is ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// `KEYS` leases; `ARGV[1]` lease ms, `ARGV[i+1]` the token of `KEYS[i]`. Renews each lease
/// that is ours and returns the indexes (1-based) of the others: gone (expired, flushed, or
/// just released by a run that ended while this call was on its way) or held by another
/// replica. A gone lease is not taken back: a run that just ended would leave it behind,
/// holding the task's next delivery for a whole lease.
const RENEW: &str = r"
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  else
    table.insert(lost, i)
  end
end
return lost
";

/// The store's keys for one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Keys {
    pub(crate) result: String,
    pub(crate) lease: String,
}

impl Keys {
    /// The keys of task `uuid` of handler `handler` under `prefix`.
    pub(crate) fn new(prefix: &str, handler: &str, uuid: &str) -> Self {
        let uuid = if uuid.len() > MAX_KEY_UUID {
            let digest = Md5::digest(uuid.as_bytes());
            let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("md5:{hex}")
        } else {
            uuid.to_owned()
        };
        Self {
            result: format!("{prefix}{handler}:{uuid}:result"),
            lease: format!("{prefix}{handler}:{uuid}:lease"),
        }
    }
}

/// A stored result: what the handler returned (`None`: nothing to publish).
pub(crate) type Stored = Option<Value>;

/// The stored form of a handler's successful output.
pub(crate) fn encode(output: &Stored) -> Result<Vec<u8>, serde_json::Error> {
    let mut envelope = serde_json::Map::new();
    envelope.insert("v".to_owned(), Value::from(ENVELOPE_VERSION));
    if let Some(result) = output {
        envelope.insert("result".to_owned(), result.clone());
    }
    serde_json::to_vec(&Value::Object(envelope))
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

/// A task's entry, as [`Store::inspect`] found it.
#[derive(Debug)]
#[cfg_attr(
    not(feature = "cli"),
    expect(dead_code, reason = "the CLI's `cache get`")
)]
pub(crate) struct Inspected {
    /// The stored result, if any.
    pub(crate) stored: Option<Stored>,
    /// Milliseconds the stored result lives on (`None`: no result, or no expiry).
    pub(crate) ttl_ms: Option<u64>,
    /// The token of the replica holding the lease.
    pub(crate) lease_holder: Option<String>,
}

/// What [`Store::claim`] found.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The task's result is stored: publish it without running the handler.
    Stored(Stored),
    /// This replica holds the lease: run the handler, then [`Store::finish`].
    Claimed(Lease),
    /// Another replica holds the lease (its token).
    Held(String),
}

/// What `/metrics` and `/readyz` read of the store: whether it answers, and which handlers
/// use it (their counters are lines of [`crate::health`]'s `handler_counters!`, recorded by
/// [`crate::cache`]).
#[derive(Debug)]
pub(crate) struct Monitor {
    up: AtomicBool,
    required: bool,
    /// The names of the handlers that use the store.
    handlers: Vec<String>,
}

impl Monitor {
    /// Whether handler `name` uses the store.
    pub(crate) fn serves(&self, name: &str) -> bool {
        self.handlers.iter().any(|handler| handler == name)
    }

    /// Whether the store answers (false during an outage episode).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Why the worker is not ready because of the store (empty: ready).
    pub(crate) fn readiness(&self) -> Vec<String> {
        if self.required && !self.up.load(Relaxed) {
            vec!["the result store is unreachable (result_store_required = true)".to_owned()]
        } else {
            Vec::new()
        }
    }
}

/// The connection to the store and the episode state.
#[derive(Debug, Default)]
struct Link {
    connection: Option<ConnectionManager>,
    /// Bumped whenever the connection is dropped, so a late failure of an old connection
    /// does not drop a fresh one.
    generation: u64,
    /// While down: when the next call may reach the store.
    next_probe: Option<Instant>,
}

/// A lease this process holds, registered with the renewer.
#[derive(Debug)]
struct Held {
    key: String,
    token: String,
    /// Set by the renewer when another replica holds the lease now.
    lost: Arc<AtomicBool>,
}

struct Inner {
    client: redis::Client,
    /// The URL, masked, for messages.
    shown: String,
    /// The password, to scrub from any error text.
    password: Option<String>,
    timeout: Duration,
    ttl: Duration,
    lease: Duration,
    prefix: String,
    monitor: Arc<Monitor>,
    link: Mutex<Link>,
    held: Mutex<HashMap<u64, Held>>,
    next_lease: AtomicU64,
    /// This process's part of every lease token.
    token_base: String,
    renewer_started: AtomicBool,
    claim: Script,
    finish: Script,
    release: Script,
    renew: Script,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.shown)
            .field("prefix", &self.prefix)
            .field("up", &self.monitor.up.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// The shared result store: one per engine (or CLI command), cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

/// The right to run one task across the fleet: renewed in the background until it is
/// finished or dropped (dropped unfinished, it is released).
#[derive(Debug)]
pub(crate) struct Lease {
    store: Weak<Inner>,
    id: u64,
    keys: Keys,
    token: String,
    done: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(inner) = self.store.upgrade() else {
            return;
        };
        inner.held().remove(&self.id);
        if self.done {
            return;
        }
        // Dropped unfinished (the run was abandoned): free the task for another replica now
        // rather than when the lease expires, if a runtime is there to do it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = Store { inner };
            let (key, token) = (self.keys.lease.clone(), self.token.clone());
            runtime.spawn(async move { store.release_lease(&key, &token).await });
        }
    }
}

impl Store {
    /// A store for `url` with the configuration's timeouts, prefix and TLS files (for
    /// `rediss://`), serving `handlers` (name, queue). Connects lazily.
    ///
    /// # Errors
    ///
    /// The URL does not parse, or a TLS file cannot be read.
    pub(crate) fn new(
        config: &Config,
        url: &SecretUrl,
        handlers: Vec<(String, String)>,
    ) -> Result<Self, StoreError> {
        let raw = url.expose();
        let shown = url.masked();
        let info = redis::IntoConnectionInfo::into_connection_info(raw)
            .map_err(|_| StoreError::InvalidUrl { url: shown.clone() })?;
        let password = info.redis_settings().password().map(str::to_owned);
        let tls = raw.to_ascii_lowercase().starts_with("rediss://");
        let client = if tls && config.tls.is_set() {
            // The process-wide rustls provider the Redis client builds its TLS with; an
            // error means one is installed already, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|source| StoreError::TlsFile {
                    path: path.to_path_buf(),
                    source,
                })
            };
            let root_cert = config.tls.ca_file.as_deref().map(read).transpose()?;
            let client_tls = match (&config.tls.cert_file, &config.tls.key_file) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                }),
                _ => None,
            };
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        } else {
            if tls {
                let _ = rustls::crypto::ring::default_provider().install_default();
            }
            redis::Client::open(info)
        }
        .map_err(|_| StoreError::InvalidUrl { url: shown.clone() })?;
        let monitor = Arc::new(Monitor {
            up: AtomicBool::new(true),
            required: config.result_store_required,
            handlers: handlers.into_iter().map(|(name, _queue)| name).collect(),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                shown,
                password,
                timeout: config.result_store_timeout,
                ttl: config.result_ttl,
                lease: config.result_store_lease,
                prefix: config.result_store_prefix.clone(),
                monitor,
                link: Mutex::default(),
                held: Mutex::default(),
                next_lease: AtomicU64::new(0),
                token_base: token_base(),
                renewer_started: AtomicBool::new(false),
                claim: Script::new(CLAIM),
                finish: Script::new(FINISH),
                release: Script::new(RELEASE),
                renew: Script::new(RENEW),
            }),
        })
    }

    /// What `/metrics` and `/readyz` read.
    pub(crate) fn monitor(&self) -> Arc<Monitor> {
        Arc::clone(&self.inner.monitor)
    }

    /// The keys of a task.
    pub(crate) fn keys(&self, handler: &str, uuid: &str) -> Keys {
        Keys::new(&self.inner.prefix, handler, uuid)
    }

    /// The URL, password masked.
    #[cfg_attr(
        not(feature = "cli"),
        expect(dead_code, reason = "the CLI's `cache get`")
    )]
    pub(crate) fn shown(&self) -> &str {
        &self.inner.shown
    }

    /// Starts the renewer (once per store): it renews the leases this process holds and
    /// probes the store while it is down or required. It ends when the store is dropped.
    pub(crate) fn start(&self) {
        if self.inner.renewer_started.swap(true, Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.renewer_started.store(false, Relaxed);
            return;
        };
        info!(store = %self.inner.shown, prefix = %self.inner.prefix,
            "using the shared result store");
        let weak = Arc::downgrade(&self.inner);
        let period = (self.inner.lease / 3).min(RENEW_PERIOD_MAX);
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                Store { inner }.renew_all().await;
            }
        });
    }

    /// Looks task `uuid` of `handler` up: its stored result, or its lease for this replica,
    /// or the holder of the lease.
    ///
    /// # Errors
    ///
    /// The store failed, timed out, is down, or holds a value this version cannot read.
    pub(crate) async fn claim(&self, handler: &str, uuid: &str) -> Result<Claim, StoreError> {
        self.start();
        let keys = self.keys(handler, uuid);
        let id = self.inner.next_lease.fetch_add(1, Relaxed);
        let token = format!("{}:{id}", self.inner.token_base);
        let lease_ms = millis(self.inner.lease);
        let script = &self.inner.claim;
        let (code, data): (i64, Vec<u8>) = self
            .call(|mut connection| {
                let mut invocation = script.key(&keys.result);
                invocation.key(&keys.lease).arg(&token).arg(lease_ms);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        match code {
            0 => decode(&data)
                .map(Claim::Stored)
                .ok_or(StoreError::Undecodable {
                    key: keys.result.clone(),
                }),
            1 => {
                self.inner.held().insert(
                    id,
                    Held {
                        key: keys.lease.clone(),
                        token: token.clone(),
                        lost: Arc::new(AtomicBool::new(false)),
                    },
                );
                Ok(Claim::Claimed(Lease {
                    store: Arc::downgrade(&self.inner),
                    id,
                    keys,
                    token,
                    done: false,
                }))
            }
            _ => Ok(Claim::Held(String::from_utf8_lossy(&data).into_owned())),
        }
    }

    /// Ends a run: a success is stored (with `result_ttl`) and the lease deleted, unless
    /// another replica holds the lease now; a failure (`None`) only releases the lease.
    /// Returns whether the result was stored.
    ///
    /// # Errors
    ///
    /// The store failed, timed out or is down; or the result cannot be serialized.
    pub(crate) async fn finish(
        &self,
        mut lease: Lease,
        output: Option<&Stored>,
    ) -> Result<bool, StoreError> {
        lease.done = true;
        // No more renewals: this call ends the lease (a renewal racing it would report it lost).
        self.inner.held().remove(&lease.id);
        let Some(output) = output else {
            self.release_lease(&lease.keys.lease, &lease.token).await?;
            return Ok(false);
        };
        let Ok(envelope) = encode(output) else {
            self.release_lease(&lease.keys.lease, &lease.token).await?;
            return Err(StoreError::Unserializable);
        };
        let ttl_ms = millis(self.inner.ttl);
        let script = &self.inner.finish;
        let stored: i64 = self
            .call(|mut connection| {
                let mut invocation = script.key(&lease.keys.result);
                invocation
                    .key(&lease.keys.lease)
                    .arg(&lease.token)
                    .arg(ttl_ms)
                    .arg(envelope);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        Ok(stored == 1)
    }

    /// A task's entry (the CLI's `cache get`): its stored result, that result's time to live,
    /// and the holder of its lease, in one round trip.
    ///
    /// # Errors
    ///
    /// The store failed or timed out, or holds a value this version cannot read.
    #[cfg_attr(
        not(feature = "cli"),
        expect(dead_code, reason = "the CLI's `cache get`")
    )]
    pub(crate) async fn inspect(&self, handler: &str, uuid: &str) -> Result<Inspected, StoreError> {
        let keys = self.keys(handler, uuid);
        let (data, ttl, holder): (Option<Vec<u8>>, i64, Option<Vec<u8>>) = self
            .call(|mut connection| {
                let mut pipe = redis::pipe();
                pipe.cmd("GET")
                    .arg(&keys.result)
                    .cmd("PTTL")
                    .arg(&keys.result)
                    .cmd("GET")
                    .arg(&keys.lease);
                async move { pipe.query_async(&mut connection).await }
            })
            .await?;
        let stored = match data {
            None => None,
            Some(data) => Some(decode(&data).ok_or(StoreError::Undecodable {
                key: keys.result.clone(),
            })?),
        };
        Ok(Inspected {
            stored,
            ttl_ms: u64::try_from(ttl).ok(),
            lease_holder: holder.map(|h| String::from_utf8_lossy(&h).into_owned()),
        })
    }

    /// Deletes a task's stored result and lease (the CLI's `cache forget`); returns how
    /// many keys existed.
    ///
    /// # Errors
    ///
    /// The store failed or timed out.
    #[cfg_attr(
        not(feature = "cli"),
        expect(dead_code, reason = "the CLI's `cache forget`")
    )]
    pub(crate) async fn forget(&self, handler: &str, uuid: &str) -> Result<u64, StoreError> {
        let keys = self.keys(handler, uuid);
        self.call(|mut connection| {
            let keys = keys.clone();
            async move {
                redis::cmd("DEL")
                    .arg(keys.result)
                    .arg(keys.lease)
                    .query_async(&mut connection)
                    .await
            }
        })
        .await
    }

    async fn release_lease(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let script = &self.inner.release;
        let _released: i64 = self
            .call(|mut connection| {
                let mut invocation = script.key(key);
                invocation.arg(token);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        Ok(())
    }

    /// One renewer tick: renews every held lease (which also probes the store); with none,
    /// probes a store that is down or required.
    async fn renew_all(&self) {
        let held: Vec<(u64, String, String, Arc<AtomicBool>)> = self
            .inner
            .held()
            .iter()
            .map(|(id, held)| {
                let lost = Arc::clone(&held.lost);
                (*id, held.key.clone(), held.token.clone(), lost)
            })
            .collect();
        if held.is_empty() {
            if self.inner.monitor.required || !self.inner.monitor.up.load(Relaxed) {
                let _ = self
                    .call(|mut connection| async move {
                        redis::cmd("PING").query_async::<()>(&mut connection).await
                    })
                    .await;
            }
            return;
        }
        let lease_ms = millis(self.inner.lease);
        for chunk in held.chunks(RENEW_CHUNK) {
            let script = &self.inner.renew;
            let lost: Result<Vec<usize>, StoreError> = self
                .call(|mut connection| {
                    let mut invocation = script.prepare_invoke();
                    invocation.arg(lease_ms);
                    for (_, key, token, _) in chunk {
                        invocation.key(key).arg(token);
                    }
                    async move { invocation.invoke_async(&mut connection).await }
                })
                .await;
            let Ok(lost) = lost else {
                // The episode is logged and counted; the leases live on until they expire.
                return;
            };
            for index in lost {
                let Some((id, key, _, flag)) = index.checked_sub(1).and_then(|i| chunk.get(i))
                else {
                    continue;
                };
                // A run that ended meanwhile released its lease: nothing was lost.
                if self.inner.held().contains_key(id) && !flag.swap(true, Relaxed) {
                    warn!(lease = %key,
                        "this task's lease expired or was removed while its handler still runs here: another replica may run it too");
                }
            }
        }
    }

    /// Runs one call to the store, bounded by `result_store_timeout`, and keeps the episode
    /// state: while the store is down, at most one call per [`PROBE_PERIOD`] reaches it.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        let (connection, generation) = {
            let mut link = inner.link();
            if let Some(next) = link.next_probe {
                let now = Instant::now();
                if now < next {
                    return Err(StoreError::Down {
                        url: inner.shown.clone(),
                    });
                }
                link.next_probe = Some(now.checked_add(PROBE_PERIOD).unwrap_or(now));
            }
            let connection = match &link.connection {
                Some(connection) => connection.clone(),
                None => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(inner.timeout))
                        .set_response_timeout(Some(inner.timeout))
                        .set_number_of_retries(1)
                        .set_max_delay(inner.timeout);
                    match ConnectionManager::new_lazy_with_config(inner.client.clone(), config) {
                        Ok(connection) => {
                            link.connection = Some(connection.clone());
                            connection
                        }
                        Err(error) => {
                            let message = inner.scrub(&error.to_string());
                            drop(link);
                            inner.failed(None, &message);
                            return Err(StoreError::Failed {
                                url: inner.shown.clone(),
                                message,
                            });
                        }
                    }
                }
            };
            (connection, link.generation)
        };
        match tokio::time::timeout(inner.timeout, op(connection)).await {
            Ok(Ok(value)) => {
                inner.succeeded();
                Ok(value)
            }
            Ok(Err(error)) => {
                let message = inner.scrub(&error.to_string());
                inner.failed(Some(generation), &message);
                Err(StoreError::Failed {
                    url: inner.shown.clone(),
                    message,
                })
            }
            Err(_elapsed) => {
                let message = format!(
                    "no answer within {:?} (result_store_timeout)",
                    inner.timeout
                );
                inner.failed(Some(generation), &message);
                Err(StoreError::TimedOut {
                    url: inner.shown.clone(),
                    after: inner.timeout,
                })
            }
        }
    }
}

impl Inner {
    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A call failed: drop its connection (unless a newer one replaced it), start an episode
    /// (logged once) or go on with it.
    fn failed(&self, generation: Option<u64>, message: &str) {
        {
            let mut link = self.link();
            if generation.is_none_or(|generation| generation == link.generation) {
                link.connection = None;
                link.generation = link.generation.wrapping_add(1);
            }
            if link.next_probe.is_none() {
                let now = Instant::now();
                link.next_probe = Some(now.checked_add(PROBE_PERIOD).unwrap_or(now));
            }
        }
        if self.monitor.up.swap(false, Relaxed) {
            warn!(store = %self.shown, error = %message,
                "the result store is unreachable; deliveries go on without it (handlers run, duplicates possible) until it answers again");
        }
    }

    /// A call succeeded: end the episode, if any (logged once).
    fn succeeded(&self) {
        if self.monitor.up.load(Relaxed) {
            return;
        }
        self.link().next_probe = None;
        if !self.monitor.up.swap(true, Relaxed) {
            info!(store = %self.shown, "the result store answers again");
        }
    }

    /// `text` without the password (a client error could quote it).
    fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(password) if !password.is_empty() => text.replace(password.as_str(), "****"),
            _ => text.to_owned(),
        }
    }
}

/// Milliseconds for Redis, at least 1.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// This process's part of lease tokens: the host (when known), the pid and a random number,
/// so an operator can tell who holds a lease and two processes never share a token.
fn token_base() -> String {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_name_prefix_handler_and_uuid() {
        let keys = Keys::new("rmq-consumer:", "resize", "abc-1");
        assert_eq!(keys.result, "rmq-consumer:resize:abc-1:result");
        assert_eq!(keys.lease, "rmq-consumer:resize:abc-1:lease");
    }

    #[test]
    fn long_uuids_are_hashed_in_keys() {
        let long = "x".repeat(MAX_KEY_UUID + 1);
        let keys = Keys::new("p:", "h", &long);
        assert!(keys.result.starts_with("p:h:md5:"), "{}", keys.result);
        assert!(keys.result.len() < 64, "{}", keys.result);
        assert_eq!(keys, Keys::new("p:", "h", &long));
        assert_ne!(keys, Keys::new("p:", "h", &"y".repeat(MAX_KEY_UUID + 1)));
        let edge = "x".repeat(MAX_KEY_UUID);
        assert_eq!(
            Keys::new("p:", "h", &edge).result,
            format!("p:h:{edge}:result")
        );
    }

    #[test]
    fn envelopes_tell_a_null_result_from_none() {
        for output in [None, Some(Value::Null), Some(json!({"a": [1, 2.5, "x"]}))] {
            let bytes = encode(&output).unwrap_or_default();
            assert_eq!(decode(&bytes), Some(output));
        }
        assert_eq!(encode(&None).unwrap_or_default(), br#"{"v":1}"#);
    }

    #[test]
    fn foreign_values_do_not_decode() {
        for bytes in [&b"\"x\""[..], b"{}", br#"{"v":2,"result":1}"#, b"\xff", b""] {
            assert_eq!(decode(bytes), None, "{bytes:?}");
        }
    }

    #[test]
    fn metrics_and_readiness_per_handler() {
        let config = Config {
            result_store_required: true,
            ..Config::default()
        };
        let url = SecretUrl::new("redis://127.0.0.1:1/0");
        let handlers = vec![("echo".to_owned(), "q.echo".to_owned())];
        let store = Store::new(&config, &url, handlers).unwrap_or_else(|e| panic!("{e}"));
        let health = Arc::new(crate::health::Health::new([(
            "echo".to_owned(),
            "q.echo".to_owned(),
        )]));
        assert!(health.store.set(store.monitor()).is_ok());
        let stats = &health.handlers[0];
        stats.add(crate::health::Counter::StoreHits, 2);
        stats.count(crate::health::Counter::StoreTakeovers);
        let text = crate::metrics::render(&health);
        for line in [
            r#"rmq_consumer_store_hits_total{handler="echo",queue="q.echo"} 2"#,
            r#"rmq_consumer_store_misses_total{handler="echo",queue="q.echo"} 0"#,
            r#"rmq_consumer_store_lease_waits_total{handler="echo",queue="q.echo"} 0"#,
            r#"rmq_consumer_store_takeovers_total{handler="echo",queue="q.echo"} 1"#,
            r#"rmq_consumer_store_errors_total{handler="echo",queue="q.echo"} 0"#,
            "rmq_consumer_store_up 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(store.monitor().readiness().is_empty());
        store.inner.failed(None, "down");
        assert_eq!(store.monitor().readiness().len(), 1);
        assert!(crate::metrics::render(&health).contains("rmq_consumer_store_up 0"));
        store.inner.succeeded();
        assert!(store.monitor().readiness().is_empty());
        // Not required: never a readiness problem.
        let relaxed =
            Store::new(&Config::default(), &url, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        relaxed.inner.failed(None, "down");
        assert!(relaxed.monitor().readiness().is_empty());
    }

    #[test]
    fn tokens_differ_between_stores() {
        assert_ne!(token_base(), token_base());
    }

    #[test]
    fn millis_is_at_least_one() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }

    #[test]
    fn errors_and_debug_never_show_the_password() {
        let config = Config::default();
        let url = SecretUrl::new("redis://:s3cret@127.0.0.1:1/0");
        let store = Store::new(&config, &url, vec![("h".to_owned(), "q".to_owned())]);
        let store = store.unwrap_or_else(|error| panic!("{error}"));
        let shown = format!("{store:?} {}", store.shown());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(
            store.inner.scrub("NOAUTH s3cret is wrong"),
            "NOAUTH **** is wrong"
        );
        let bad = Store::new(
            &config,
            &SecretUrl::new("redis://:s3cret@[zz/0"),
            Vec::new(),
        );
        let text = bad.err().map(|e| format!("{e} {e:?}")).unwrap_or_default();
        assert!(!text.is_empty() && !text.contains("s3cret"), "{text}");
    }

    #[tokio::test]
    async fn an_unreachable_store_fails_fast_and_probes_once_a_second() {
        let config = Config {
            result_store_timeout: Duration::from_millis(200),
            ..Config::default()
        };
        // Nothing listens on port 1.
        let url = SecretUrl::new("redis://127.0.0.1:1/0");
        let store = Store::new(&config, &url, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        let first = store.claim("h", "u").await;
        assert!(first.is_err());
        assert!(!store.inner.monitor.up.load(Relaxed));
        let started = Instant::now();
        let second = store.claim("h", "u").await;
        assert!(matches!(second, Err(StoreError::Down { .. })), "{second:?}");
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}

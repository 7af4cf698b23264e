//! The result store shared by every replica (`result_store`, Redis): a task runs once across
//! the fleet while the store is up, its result survives restarts, and a dead worker's task is
//! taken over once its lease expires.
//!
//! # Keys
//!
//! For handler `H` and task uuid `U` (prefix `P`, `result_store_prefix`), one key per task,
//! `P H:U` (no spaces), holding either
//!
//! - the result as published, in an envelope that says whether the handler returned one
//!   (`{"v":1,"result":<json>}` or `{"v":1}`), kept `result_ttl` (only successes are stored),
//! - or `lease:<token>`: the replica running the task, expiring after `result_store_lease`
//!   unless renewed.
//!
//! The two are told apart by the value ([`Entry`]: an envelope starts with `{`). One key instead of
//! a result key and a lease key is less work for Redis per task (a claim is one plain command, a
//! finish reads and writes one key) and one key per task. A handler name never holds `:` (it is a
//! Rust fn name), so two handlers never share a key. A uuid longer than [`MAX_KEY_UUID`] bytes is
//! replaced by `md5:<hex digest>` in the key (a custom uuid fn cannot make keys of any size); the
//! CLI computes the same key.
//!
//! # Calls
//!
//! Each task's step is atomic on the server. [`Store::claim`] is one
//! `SET key lease:<token> NX PX <lease> GET` (Redis >= 7.0): no answer means the lease is
//! ours; a lease is another holder's; anything else is the stored result, left as it is.
//! [`Store::finish`] (a Lua script, [`FINISH`]) replaces our lease, or nothing (our lease
//! expired and nobody took it), by the result; a stored result stays (the first stays) and
//! so does another replica's lease (a takeover's owner stores its own); a failure only
//! deletes our lease. [`RENEW`] extends the key's expiry only while it holds our lease.
//!
//! Concurrent calls share their round trip (`batcher.rs`): while the store is up, a claim
//! waits in the claim queue, and a finish or release in the finish queue; one batcher task
//! per queue takes every request waiting (up to 500) and sends them together: the claims as
//! one pipeline of one `SET` per task (answered per command), the finishes in one script
//! call looping over its tasks in order (so each task's step stays atomic); then it answers
//! each caller. One batch per queue is on its way at a time: the requests that arrive
//! meanwhile make the next one, so batches grow with the load (in bench R, ~12 requests per
//! call; README). Two claims of one task in one batch: the first takes the lease, the second
//! finds it held. A key holding another type fails its own task (its command's error in the
//! pipeline, `pcall` in the script), not the batch, and starts no episode. A caller waits for
//! its answer at most `result_store_timeout`; a lease whose caller gave up is released when
//! its answer is dropped. While the store is down, calls skip the queues and go alone, as
//! one-task batches, so that they fail at once (or are that second's one probe). The batchers
//! end when the store is dropped. A script call is one `EVALSHA` command buffer (loading the
//! script when Redis answers `NOSCRIPT`), not a `ScriptInvocation`, which copies every key
//! apart.
//!
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

mod batcher;

use batcher::Queue;

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

/// What a lease's value starts with; the rest is the holder's token. A stored result (an
/// envelope, JSON) starts with `{`.
const LEASE_PREFIX: &[u8] = b"lease:";

/// Ends runs: `KEYS[i]` the key of run `i`; `ARGV[1]` result ttl ms, `ARGV[2i]` run `i`'s
/// lease (`lease:<token>`), `ARGV[2i+1]` its envelope (empty: the run failed). A success
/// replaces our lease, or nothing (our lease expired and nobody took it), by the envelope;
/// a key holding a result (the first stored result stays) or another replica's lease is left
/// alone. A failure only deletes our lease. Returns one `{code, error}` per run, in order:
/// code 1 (stored; for a failure: released), 0 (a result was stored already, or another
/// replica holds the lease; for a failure: the lease was not ours) or 3 (the key holds
/// something else).
const FINISH: &str = r"
local out = {}
for i = 1, #KEYS do
  local key, mine, envelope = KEYS[i], ARGV[2 * i], ARGV[2 * i + 1]
  local held = redis.pcall('GET', key)
  if type(held) == 'table' then
    out[i] = {3, held.err or ''}
  elseif envelope == '' then
    if held == mine then
      redis.call('DEL', key)
      out[i] = {1, ''}
    else
      out[i] = {0, ''}
    end
  elseif held == false or held == mine then
    redis.call('SET', key, envelope, 'PX', ARGV[1])
    out[i] = {1, ''}
  else
    out[i] = {0, ''}
  end
end
return out
";

/// `KEYS` task keys; `ARGV[1]` lease ms, `ARGV[i+1]` our lease of `KEYS[i]` (`lease:<token>`).
/// Renews each key that holds our lease and returns the indexes (1-based) of the others: gone
/// (expired, flushed, or just released by a run that ended while this call was on its way), holding
/// that run's result, or held by another replica. A gone lease is not taken back: a run that just
/// ended would leave it behind, holding the task's next delivery for a whole lease.
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

/// The store's key of task `uuid` of handler `handler` under `prefix`: `<prefix><handler>:<uuid>`,
/// the uuid hashed when it is longer than [`MAX_KEY_UUID`] bytes.
pub(crate) fn task_key(prefix: &str, handler: &str, uuid: &str) -> String {
    if uuid.len() > MAX_KEY_UUID {
        let digest = Md5::digest(uuid.as_bytes());
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("{prefix}{handler}:md5:{hex}")
    } else {
        format!("{prefix}{handler}:{uuid}")
    }
}

/// A lease's value: [`LEASE_PREFIX`] and the holder's token.
fn lease_value(token: &str) -> String {
    let mut value = String::with_capacity(LEASE_PREFIX.len() + token.len());
    value.push_str("lease:");
    value.push_str(token);
    value
}

/// What a task's key holds, read from its value.
#[derive(Debug, PartialEq, Eq)]
enum Entry<'a> {
    /// A lease: the holder's token.
    Lease(&'a [u8]),
    /// Anything else: a stored result (an envelope, if this version wrote it).
    Result(&'a [u8]),
}

impl<'a> Entry<'a> {
    fn of(value: &'a [u8]) -> Self {
        match value.strip_prefix(LEASE_PREFIX) {
            Some(token) => Self::Lease(token),
            None => Self::Result(value),
        }
    }
}

/// A claim on its way to the store.
#[derive(Debug)]
struct Claiming {
    key: String,
    /// Our lease's value (`lease:<token>`).
    lease: String,
    /// The lease's id in `Inner::held`, if it is taken.
    id: u64,
}

/// A finish (or, without an envelope, a release) on its way to the store.
#[derive(Debug)]
struct Ending {
    key: String,
    /// Our lease's value (`lease:<token>`).
    lease: String,
    /// The stored form of the result; `None`: only release the lease.
    envelope: Option<Vec<u8>>,
}

/// `count` copies of the failure of a call made for `count` requests.
fn every<T>(error: &StoreError, count: usize) -> Vec<Result<T, StoreError>> {
    (0..count).map(|_| Err(again(error))).collect()
}

/// The same failure again, for another caller of the same call.
fn again(error: &StoreError) -> StoreError {
    match error {
        StoreError::Down { url } => StoreError::Down { url: url.clone() },
        StoreError::TimedOut { url, after } => StoreError::TimedOut {
            url: url.clone(),
            after: *after,
        },
        StoreError::Failed { url, message } => StoreError::Failed {
            url: url.clone(),
            message: message.clone(),
        },
        StoreError::Undecodable { key } => StoreError::Undecodable { key: key.clone() },
        StoreError::Unserializable => StoreError::Unserializable,
        StoreError::InvalidUrl { url } => StoreError::InvalidUrl { url: url.clone() },
        // Never the outcome of a call; its text holds no password.
        StoreError::TlsFile { .. } => StoreError::Failed {
            url: String::new(),
            message: error.to_string(),
        },
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
    /// Our lease's value (`lease:<token>`).
    lease: String,
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
    /// Whether a refused command was logged (once per store: see [`Store::refused`]).
    refusal_logged: AtomicBool,
    finish: Script,
    renew: Script,
    /// Claims waiting for the claim batcher.
    claims: Queue<Claiming, Claim>,
    /// Finishes and releases waiting for the finish batcher.
    ends: Queue<Ending, bool>,
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
    key: String,
    /// Our lease's value (`lease:<token>`).
    lease: String,
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
            let ending = Ending {
                key: self.key.clone(),
                lease: self.lease.clone(),
                envelope: None,
            };
            runtime.spawn(async move { store.end(ending).await });
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
                refusal_logged: AtomicBool::new(false),
                token_base: token_base(),
                renewer_started: AtomicBool::new(false),
                finish: Script::new(FINISH),
                renew: Script::new(RENEW),
                claims: Queue::default(),
                ends: Queue::default(),
            }),
        })
    }

    /// What `/metrics` and `/readyz` read.
    pub(crate) fn monitor(&self) -> Arc<Monitor> {
        Arc::clone(&self.inner.monitor)
    }

    /// The key of a task.
    pub(crate) fn key(&self, handler: &str, uuid: &str) -> String {
        task_key(&self.inner.prefix, handler, uuid)
    }

    /// The URL, password masked.
    #[cfg_attr(
        not(feature = "cli"),
        expect(dead_code, reason = "the CLI's `cache get`")
    )]
    pub(crate) fn shown(&self) -> &str {
        &self.inner.shown
    }

    /// Starts the renewer and the two batchers (once per store): the renewer renews the
    /// leases this process holds and probes the store while it is down or required; the
    /// batchers send the claims and the finishes. They end when the store is dropped.
    pub(crate) fn start(&self) {
        if self.inner.renewer_started.load(Relaxed)
            || self.inner.renewer_started.swap(true, Relaxed)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.renewer_started.store(false, Relaxed);
            return;
        };
        info!(store = %self.inner.shown, prefix = %self.inner.prefix,
            "using the shared result store");
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .claims
            .start(&runtime, weak.clone(), |store: Store, items| async move {
                store.claim_many(items).await
            });
        self.inner
            .ends
            .start(&runtime, weak.clone(), |store: Store, items| async move {
                store.finish_many(items).await
            });
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
        let id = self.inner.next_lease.fetch_add(1, Relaxed);
        let claiming = Claiming {
            key: self.key(handler, uuid),
            lease: lease_value(&format!("{}:{id}", self.inner.token_base)),
            id,
        };
        match self.batched(&self.inner.claims, claiming) {
            Ok(answer) => self.answer(answer).await,
            Err(claiming) => self.alone(self.claim_many(vec![claiming]).await),
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
        let (envelope, unserializable) = match output.map(encode) {
            None => (None, false),
            Some(Ok(envelope)) => (Some(envelope), false),
            Some(Err(_)) => (None, true),
        };
        let stored = self
            .end(Ending {
                key: std::mem::take(&mut lease.key),
                lease: std::mem::take(&mut lease.lease),
                envelope,
            })
            .await?;
        if unserializable {
            return Err(StoreError::Unserializable);
        }
        Ok(stored && output.is_some())
    }

    /// Sends one finish or release, through the finish batcher while the store is up.
    async fn end(&self, ending: Ending) -> Result<bool, StoreError> {
        match self.batched(&self.inner.ends, ending) {
            Ok(answer) => self.answer(answer).await,
            Err(ending) => self.alone(self.finish_many(vec![ending]).await),
        }
    }

    /// Queues `item` for its batcher while the store is up; gives it back (to be sent alone)
    /// while the store is down, so that a call fails at once or is the second's one probe, as
    /// without the batcher, or when no batcher runs.
    fn batched<T, R>(&self, queue: &Queue<T, R>, item: T) -> Result<batcher::Answer<R>, T>
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        if self.inner.monitor.up.load(Relaxed) {
            queue.ask(item)
        } else {
            Err(item)
        }
    }

    /// Waits for a batcher's answer, at most `result_store_timeout` (the batch's own call is
    /// bounded too, and starts the episode when it fails).
    async fn answer<R>(&self, answer: batcher::Answer<R>) -> Result<R, StoreError> {
        match tokio::time::timeout(self.inner.timeout, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_dropped)) => Err(StoreError::Failed {
                url: self.inner.shown.clone(),
                message: "the store's batcher stopped".to_owned(),
            }),
            Err(_elapsed) => Err(StoreError::TimedOut {
                url: self.inner.shown.clone(),
                after: self.inner.timeout,
            }),
        }
    }

    /// The one answer of a call made for one request.
    fn alone<R>(&self, answers: Vec<Result<R, StoreError>>) -> Result<R, StoreError> {
        answers
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(self.short_answer()))
    }

    fn short_answer(&self) -> StoreError {
        StoreError::Failed {
            url: self.inner.shown.clone(),
            message: "the store answered a batch with the wrong number of results".to_owned(),
        }
    }

    /// Claims `items` in one pipeline of `SET key lease:<token> NX PX <lease> GET`, one
    /// command per item; one answer per item, in order. A failed call fails every item; a key
    /// holding something else fails its item only (the pipeline answers per command).
    async fn claim_many(&self, items: Vec<Claiming>) -> Vec<Result<Claim, StoreError>> {
        let lease_ms = millis(self.inner.lease);
        let answers: Result<Vec<redis::RedisResult<Option<Vec<u8>>>>, StoreError> = self
            .call(|mut connection| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for item in &items {
                    pipe.cmd("SET")
                        .arg(&item.key)
                        .arg(&item.lease)
                        .arg("NX")
                        .arg("PX")
                        .arg(lease_ms)
                        .arg("GET");
                }
                async move { pipe.query_async(&mut connection).await }
            })
            .await;
        let answers = match answers {
            Ok(answers) if answers.len() == items.len() => answers,
            Ok(_) => return items.iter().map(|_| Err(self.short_answer())).collect(),
            Err(error) => return every(&error, items.len()),
        };
        let mut claimed = Vec::new();
        let answers: Vec<_> = items
            .into_iter()
            .zip(answers)
            .map(|(item, answer)| match answer {
                Ok(None) => {
                    claimed.push((item.id, item.key.clone(), item.lease.clone()));
                    Ok(Claim::Claimed(Lease {
                        store: Arc::downgrade(&self.inner),
                        id: item.id,
                        key: item.key,
                        lease: item.lease,
                        done: false,
                    }))
                }
                Ok(Some(value)) => match Entry::of(&value) {
                    Entry::Lease(holder) => {
                        Ok(Claim::Held(String::from_utf8_lossy(holder).into_owned()))
                    }
                    Entry::Result(data) => decode(data)
                        .map(Claim::Stored)
                        .ok_or(StoreError::Undecodable { key: item.key }),
                },
                Err(error) => Err(self.refused(error.to_string().as_bytes())),
            })
            .collect();
        if !claimed.is_empty() {
            let mut held = self.inner.held();
            for (id, key, lease) in claimed {
                let lost = Arc::new(AtomicBool::new(false));
                held.insert(id, Held { key, lease, lost });
            }
        }
        answers
    }

    /// Finishes or releases `items` in one script call ([`FINISH`]); one answer per item, in
    /// order (whether it stored or released). A failed call fails every item; a key holding
    /// something else fails its item only.
    async fn finish_many(&self, items: Vec<Ending>) -> Vec<Result<bool, StoreError>> {
        let ttl_ms = millis(self.inner.ttl);
        let script = &self.inner.finish;
        let answers: Result<Vec<(i64, Vec<u8>)>, StoreError> = self
            .call(|connection| {
                let mut command = evalsha(script, items.len());
                for item in &items {
                    command.arg(&item.key);
                }
                command.arg(ttl_ms);
                for item in &items {
                    command
                        .arg(&item.lease)
                        .arg(item.envelope.as_deref().unwrap_or_default());
                }
                invoke(connection, script, command)
            })
            .await;
        match answers {
            Ok(answers) if answers.len() == items.len() => answers
                .into_iter()
                .map(|(code, data)| match code {
                    0 | 1 => Ok(code == 1),
                    _ => Err(self.refused(&data)),
                })
                .collect(),
            Ok(_) => items.iter().map(|_| Err(self.short_answer())).collect(),
            Err(error) => every(&error, items.len()),
        }
    }

    /// The store refused one item of a batch (a key holding another type, or a Redis older
    /// than 7.0, which refuses `SET NX GET`): that item fails, without an episode (the store
    /// answered). The first refusal is logged (once per store: every refusal is counted in
    /// `store_errors`, and a Redis too old refuses every claim).
    fn refused(&self, message: &[u8]) -> StoreError {
        let message = self.inner.scrub(&String::from_utf8_lossy(message));
        if !self.inner.refusal_logged.swap(true, Relaxed) {
            warn!(store = %self.inner.shown, error = %message,
                "the result store refused a command (a key of another type under result_store_prefix, or a Redis older than 7.0); such tasks run without the store (counted in store_errors, logged once)");
        }
        StoreError::Failed {
            url: self.inner.shown.clone(),
            message,
        }
    }

    /// A task's entry (the CLI's `cache get`): its stored result and that result's time to
    /// live, or the holder of its lease, in one round trip (`GET` and `PTTL` of its key).
    ///
    /// # Errors
    ///
    /// The store failed or timed out, or holds a value this version cannot read.
    #[cfg_attr(
        not(feature = "cli"),
        expect(dead_code, reason = "the CLI's `cache get`")
    )]
    pub(crate) async fn inspect(&self, handler: &str, uuid: &str) -> Result<Inspected, StoreError> {
        let key = self.key(handler, uuid);
        let (value, ttl): (Option<Vec<u8>>, i64) = self
            .call(|mut connection| {
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
                async move { pipe.query_async(&mut connection).await }
            })
            .await?;
        let nothing = Inspected {
            stored: None,
            ttl_ms: None,
            lease_holder: None,
        };
        Ok(match value.as_deref().map(Entry::of) {
            None => nothing,
            Some(Entry::Lease(holder)) => Inspected {
                lease_holder: Some(String::from_utf8_lossy(holder).into_owned()),
                ..nothing
            },
            Some(Entry::Result(data)) => Inspected {
                stored: Some(decode(data).ok_or(StoreError::Undecodable { key })?),
                ttl_ms: u64::try_from(ttl).ok(),
                lease_holder: None,
            },
        })
    }

    /// Deletes a task's key, its stored result or its lease (the CLI's `cache forget`);
    /// returns how many keys existed (0 or 1).
    ///
    /// # Errors
    ///
    /// The store failed or timed out.
    #[cfg_attr(
        not(feature = "cli"),
        expect(dead_code, reason = "the CLI's `cache forget`")
    )]
    pub(crate) async fn forget(&self, handler: &str, uuid: &str) -> Result<u64, StoreError> {
        let key = self.key(handler, uuid);
        self.call(|mut connection| async move {
            redis::cmd("DEL")
                .arg(key)
                .query_async(&mut connection)
                .await
        })
        .await
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
                (*id, held.key.clone(), held.lease.clone(), lost)
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
                    for (_, key, lease, _) in chunk {
                        invocation.key(key).arg(lease);
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

/// `EVALSHA` of `script` with `keys` keys, to which the keys and then the arguments are
/// added: one buffer for the whole command (a `ScriptInvocation` allocates every key and
/// argument apart, then copies them into the command).
fn evalsha(script: &Script, keys: usize) -> redis::Cmd {
    let mut command = redis::cmd("EVALSHA");
    command.arg(script.get_hash()).arg(keys);
    command
}

/// Runs `command`, an [`evalsha`] of `script`; loads the script and runs it again when Redis
/// does not know it (first use, restart, flush), as `ScriptInvocation::invoke_async` does.
async fn invoke<T: redis::FromRedisValue>(
    mut connection: ConnectionManager,
    script: &Script,
    command: redis::Cmd,
) -> redis::RedisResult<T> {
    match command.query_async(&mut connection).await {
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            script.load_async(&mut connection).await?;
            command.query_async(&mut connection).await
        }
        answer => answer,
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
        let key = task_key("rmq-consumer:", "resize", "abc-1");
        assert_eq!(key, "rmq-consumer:resize:abc-1");
    }

    #[test]
    fn long_uuids_are_hashed_in_keys() {
        let long = "x".repeat(MAX_KEY_UUID + 1);
        let key = task_key("p:", "h", &long);
        assert!(key.starts_with("p:h:md5:"), "{key}");
        assert!(key.len() < 64, "{key}");
        assert_eq!(key, task_key("p:", "h", &long));
        assert_ne!(key, task_key("p:", "h", &"y".repeat(MAX_KEY_UUID + 1)));
        let edge = "x".repeat(MAX_KEY_UUID);
        assert_eq!(task_key("p:", "h", &edge), format!("p:h:{edge}"));
    }

    #[test]
    fn a_value_is_a_lease_or_a_result_by_its_prefix() {
        let lease = lease_value("host:1:ab:7");
        assert_eq!(lease, "lease:host:1:ab:7");
        assert_eq!(Entry::of(lease.as_bytes()), Entry::Lease(b"host:1:ab:7"));
        let envelope = encode(&Some(json!("lease:x"))).unwrap_or_default();
        assert_eq!(Entry::of(&envelope), Entry::Result(&envelope));
        assert_eq!(Entry::of(b"lease"), Entry::Result(b"lease"));
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

    /// The shared Redis of the test suite (`tests/scripts/redis.sh`).
    const REDIS: &str = "redis://127.0.0.1:6379/0";

    /// A store on the shared Redis under a prefix of its own, and a plain connection to it;
    /// [`Scratch::clean`] deletes the prefix's keys.
    struct Scratch {
        store: Store,
        prefix: String,
        redis: redis::aio::MultiplexedConnection,
    }

    impl Scratch {
        async fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let prefix = format!("rmq-consumer.unit.{name}.{}.{nanos}:", std::process::id());
            let config = Config {
                result_store_prefix: prefix.clone(),
                ..Config::default()
            };
            let store = Store::new(&config, &SecretUrl::new(REDIS), Vec::new())
                .unwrap_or_else(|e| panic!("{e}"));
            let client = redis::Client::open(REDIS).unwrap_or_else(|e| panic!("{e}"));
            let redis = client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("Redis must run on {REDIS}: {e}"));
            Self {
                store,
                prefix,
                redis,
            }
        }

        async fn set(&mut self, key: &str, value: &str) {
            let () = redis::cmd("SET")
                .arg(key)
                .arg(value)
                .query_async(&mut self.redis)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }

        async fn get(&mut self, key: &str) -> Option<String> {
            redis::cmd("GET")
                .arg(key)
                .query_async(&mut self.redis)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }

        fn claiming(&self, uuid: &str) -> Claiming {
            let id = self.store.inner.next_lease.fetch_add(1, Relaxed);
            Claiming {
                key: self.store.key("h", uuid),
                lease: lease_value(&format!("{}:{id}", self.store.inner.token_base)),
                id,
            }
        }

        async fn clean(mut self) {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.prefix))
                .query_async(&mut self.redis)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            if !keys.is_empty() {
                let _: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut self.redis)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    #[tokio::test]
    async fn one_batch_claims_a_task_once_however_often_it_holds_it() {
        let scratch = Scratch::new("same").await;
        let items = (0..4).map(|_| scratch.claiming("u")).collect();
        let answers = scratch.store.claim_many(items).await;
        let mut claimed = Vec::new();
        let mut held = Vec::new();
        for answer in answers {
            match answer {
                Ok(Claim::Claimed(lease)) => claimed.push(lease),
                Ok(Claim::Held(holder)) => held.push(holder),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(claimed.len(), 1, "{held:?}");
        assert_eq!(held.len(), 3);
        let lease = claimed.first().map(|lease| lease.lease.clone());
        assert!(
            held.iter().all(|holder| Some(lease_value(holder)) == lease),
            "{held:?}"
        );
        // Through the batcher: many callers at once, one lease.
        scratch.store.start();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let store = scratch.store.clone();
            calls.spawn(async move { store.claim("h", "v").await });
        }
        let mut leases = Vec::new();
        while let Some(answer) = calls.join_next().await {
            match answer {
                Ok(Ok(Claim::Claimed(lease))) => leases.push(lease),
                Ok(Ok(Claim::Held(_))) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(leases.len(), 1);
        for lease in claimed.into_iter().chain(leases) {
            let finished = scratch.store.finish(lease, Some(&Some(json!(1)))).await;
            assert!(matches!(finished, Ok(true)), "{finished:?}");
        }
        scratch.clean().await;
    }

    #[tokio::test]
    async fn a_batch_answers_each_task_for_itself() {
        let mut scratch = Scratch::new("mixed").await;
        let store = scratch.store.clone();
        // `stored`: a result is stored; `held`: another replica holds the lease; `bad`: its
        // key is a list; `new`: nothing.
        let done = store.key("h", "stored");
        let envelope = String::from_utf8(encode(&Some(json!("r"))).unwrap_or_default());
        scratch.set(&done, &envelope.unwrap_or_default()).await;
        let held_key = store.key("h", "held");
        scratch.set(&held_key, "lease:other:1:2").await;
        let bad = store.key("h", "bad");
        let _: u64 = redis::cmd("RPUSH")
            .arg(&bad)
            .arg("x")
            .query_async(&mut scratch.redis)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let items = ["stored", "held", "bad", "new"].map(|uuid| scratch.claiming(uuid));
        let mut answers = store.claim_many(items.into()).await.into_iter();
        let stored = answers.next();
        assert!(
            matches!(&stored, Some(Ok(Claim::Stored(Some(value)))) if *value == json!("r")),
            "{stored:?}"
        );
        let held = answers.next();
        assert!(
            matches!(&held, Some(Ok(Claim::Held(holder))) if holder == "other:1:2"),
            "{held:?}"
        );
        let bad_answer = answers.next();
        assert!(
            matches!(&bad_answer, Some(Err(StoreError::Failed { message, .. })) if message.contains("WRONGTYPE")),
            "{bad_answer:?}"
        );
        let Some(Ok(Claim::Claimed(lease))) = answers.next() else {
            panic!("`new` is not claimed");
        };
        // One refused key is no outage.
        assert!(store.inner.monitor.up.load(Relaxed));
        // Finishes in one batch: `new` stores; a run that lost its lease to another replica
        // stores nothing; a failed run releases its lease; a run whose lease expired (nothing
        // left) stores; a key that is a list fails its run alone; a result stored already
        // stays.
        let new_key = lease.key.clone();
        let new_lease = lease.lease.clone();
        let stolen = scratch.claiming("stolen");
        let failed = scratch.claiming("failed");
        scratch.set(&failed.key, &failed.lease).await;
        let expired = scratch.claiming("expired");
        let second = scratch.claiming("stored");
        let envelope = encode(&Some(json!(7))).unwrap_or_default();
        let ends = vec![
            Ending {
                key: new_key.clone(),
                lease: new_lease,
                envelope: Some(envelope.clone()),
            },
            Ending {
                key: held_key.clone(),
                lease: stolen.lease,
                envelope: Some(envelope.clone()),
            },
            Ending {
                key: failed.key.clone(),
                lease: failed.lease,
                envelope: None,
            },
            Ending {
                key: expired.key.clone(),
                lease: expired.lease,
                envelope: Some(envelope.clone()),
            },
            Ending {
                key: bad.clone(),
                lease: "lease:t".to_owned(),
                envelope: Some(envelope.clone()),
            },
            Ending {
                key: done.clone(),
                lease: second.lease,
                envelope: Some(envelope),
            },
        ];
        let answers: Vec<_> = store.finish_many(ends).await;
        assert!(matches!(answers.first(), Some(Ok(true))), "{answers:?}");
        assert!(matches!(answers.get(1), Some(Ok(false))), "{answers:?}");
        assert!(matches!(answers.get(2), Some(Ok(true))), "{answers:?}");
        assert!(matches!(answers.get(3), Some(Ok(true))), "{answers:?}");
        assert!(
            matches!(answers.get(4), Some(Err(StoreError::Failed { message, .. })) if message.contains("WRONGTYPE")),
            "{answers:?}"
        );
        assert!(matches!(answers.get(5), Some(Ok(false))), "{answers:?}");
        assert!(store.inner.monitor.up.load(Relaxed));
        for key in [&new_key, &expired.key] {
            let result = scratch.get(key).await;
            assert_eq!(
                result.as_deref().map(str::as_bytes).and_then(decode),
                Some(Some(json!(7))),
                "{key}"
            );
        }
        let first = scratch.get(&done).await;
        assert_eq!(
            first.as_deref().map(str::as_bytes).and_then(decode),
            Some(Some(json!("r"))),
            "the first stored result stays"
        );
        let held_lease = scratch.get(&held_key).await;
        assert_eq!(held_lease.as_deref(), Some("lease:other:1:2"));
        assert_eq!(scratch.get(&failed.key).await, None);
        // Released after it stored: the key holds the result, which stays.
        let released = store.finish(lease, None).await;
        assert!(matches!(released, Ok(false)), "{released:?}");
        assert!(scratch.get(&new_key).await.is_some());
        scratch.clean().await;
    }

    /// Log lines written by a test's subscriber.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
                .into_owned()
        }
    }

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl tracing_subscriber::fmt::MakeWriter<'_> for Lines {
        type Writer = Self;

        fn make_writer(&self) -> Self {
            self.clone()
        }
    }

    #[tokio::test]
    async fn a_key_of_another_type_fails_its_task_and_no_other() {
        let mut scratch = Scratch::new("wrongtype").await;
        let store = scratch.store.clone();
        let bad = store.key("h", "bad");
        let _: u64 = redis::cmd("RPUSH")
            .arg(&bad)
            .arg("x")
            .query_async(&mut scratch.redis)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let lines = Lines::default();
        let subscriber =
            crate::logging::subscriber(&crate::config::LogConfig::default(), lines.clone())
                .unwrap_or_else(|e| panic!("{e}"));
        let logging = tracing::subscriber::set_default(subscriber);
        let first = store.claim("h", "bad").await;
        assert!(first.is_err(), "{first:?}");
        let again = store.claim("h", "bad").await;
        assert!(again.is_err(), "{again:?}");
        drop(logging);
        // Said once, with the reason (an operator on a Redis older than 7.0 would see every
        // claim refused with a syntax error and nothing else), not once per task.
        let log = lines.text();
        assert_eq!(log.matches("the result store refused").count(), 1, "{log}");
        assert!(log.contains("WRONGTYPE"), "{log}");
        // The store answered: no outage, the next task is claimed.
        let next = store.claim("h", "good").await;
        let Ok(Claim::Claimed(lease)) = next else {
            panic!("{next:?}");
        };
        let finished = store.finish(lease, None).await;
        assert!(matches!(finished, Ok(false)), "{finished:?}");
        scratch.clean().await;
    }

    #[tokio::test]
    async fn a_claim_whose_caller_gave_up_is_released() {
        let mut scratch = Scratch::new("gaveup").await;
        let store = scratch.store.clone();
        store.start();
        let key = store.key("h", "u");
        // A caller gives up at once (its future dropped): the answer it leaves is a lease,
        // which its drop releases.
        let claim = store.claim("h", "u");
        let _ = tokio::time::timeout(Duration::ZERO, claim).await;
        // A later claim's answer comes after that caller's (the queue is in order).
        let later = store.claim("h", "later").await;
        let Ok(Claim::Claimed(later)) = later else {
            panic!("{later:?}");
        };
        let mut left = Some(String::new());
        for _ in 0..100 {
            left = scratch.get(&key).await;
            if left.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(left, None, "the lease was not released");
        let next = store.claim("h", "u").await;
        let Ok(Claim::Claimed(next)) = next else {
            panic!("{next:?}");
        };
        for lease in [later, next] {
            let released = store.finish(lease, None).await;
            assert!(released.is_ok(), "{released:?}");
        }
        scratch.clean().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_batchers_and_the_renewer_end_with_the_store() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let url = SecretUrl::new("redis://127.0.0.1:1/0");
        let store = Store::new(&Config::default(), &url, Vec::new());
        let store = store.unwrap_or_else(|e| panic!("{e}"));
        store.start();
        assert_eq!(metrics.num_alive_tasks(), before + 3);
        drop(store);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(metrics.num_alive_tasks(), before);
    }

    #[tokio::test]
    async fn a_store_that_never_answers_holds_a_caller_at_most_its_timeout() {
        let timeout = Duration::from_millis(200);
        let config = Config {
            result_store_timeout: timeout,
            ..Config::default()
        };
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
        let listener = listener.unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let silent = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let url = SecretUrl::new(format!("redis://127.0.0.1:{port}/0"));
        let store = Store::new(&config, &url, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        store.start();
        let started = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for uuid in 0..10 {
            let store = store.clone();
            calls.spawn(async move { store.claim("h", &uuid.to_string()).await });
        }
        while let Some(answer) = calls.join_next().await {
            let answer = answer.unwrap_or_else(|e| panic!("{e}"));
            assert!(answer.is_err(), "{answer:?}");
        }
        // Each waited for its answer at most the timeout (plus scheduling).
        assert!(started.elapsed() < timeout * 5, "{:?}", started.elapsed());
        tokio::time::sleep(timeout).await;
        assert!(!store.inner.monitor.up.load(Relaxed));
        let down = store.claim("h", "x").await;
        assert!(matches!(down, Err(StoreError::Down { .. })), "{down:?}");
        silent.abort();
    }

    #[tokio::test]
    async fn a_script_redis_does_not_know_is_loaded_and_run() {
        let scratch = Scratch::new("noscript").await;
        // A body no Redis has seen (its cache keeps this one small script).
        let script = Script::new(&format!("return {{'{}', ARGV[1]}}", scratch.prefix));
        let connection = ConnectionManager::new(scratch.store.inner.client.clone()).await;
        let connection = connection.unwrap_or_else(|e| panic!("{e}"));
        let mut command = evalsha(&script, 0);
        command.arg("x");
        let answer: Vec<String> = invoke(connection, &script, command)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer, [scratch.prefix.clone(), "x".to_owned()]);
        scratch.clean().await;
    }
}

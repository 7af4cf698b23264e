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
//! a result key and a lease key is less work for Redis per task (a claim and a finish are one
//! plain command each) and one key per task. A handler name never holds `:` (it is a Rust fn
//! name), so two handlers never share a key. A uuid longer than [`MAX_KEY_UUID`] bytes is
//! replaced by `md5:<hex digest>` in the key (a custom uuid fn cannot make keys of any size); the
//! CLI computes the same key.
//!
//! # Calls
//!
//! Each is one command on the task's key, atomic on the server. [`Store::claim`] is
//! `SET key lease:<token> NX PX <lease> GET` (Redis >= 7.0): no answer means the lease is
//! ours; a lease is another holder's; anything else is the stored result, left as it is.
//! [`Store::finish`] of a success is `SET key <envelope> PX <ttl> GET`: it replaces our lease,
//! or nothing (our lease expired and nobody took it), or another replica's lease (a takeover
//! of a task whose lease this replica lost: its waiters get this result at once) by the
//! result. When the old value it answers is a result (the task ran twice, and the other run
//! stored first), that result is put back with a fresh `result_ttl` (the first stays; a claim
//! in between reads the second, a result of the task too). A Lua script would keep that
//! instant out, at about three times Redis's work per finish (bench R, README). A failure only
//! deletes our lease ([`RELEASE`], a script: only while the key holds our lease). [`RENEW`]
//! extends the key's expiry only while it holds our lease.
//!
//! Concurrent calls share their round trip (`batcher.rs`): while the store is up, a claim,
//! finish or release waits in the store's queue; one batcher task takes every request waiting
//! (up to 500) and sends them together, in one pipeline (answered per command): the releases
//! as one script call looping over its tasks in order, then the finishes' commands, then the
//! claims', so a claim of a task finished or released in the same batch finds its result or
//! takes it; then it answers each caller. One batch is on its way at a time: the requests that
//! arrive meanwhile make the next one, so batches grow with the load (README, bench R). Two
//! claims of one task in one batch: the first takes the lease, the second finds it held. A key
//! holding another type fails its own task (its command's error in the pipeline, `pcall` in the
//! script), not the batch, and starts no episode. When Redis does not know the release script
//! (first use, restart, `SCRIPT FLUSH`), the rest of that pipeline is answered, and the script
//! is loaded and called again alone. A caller waits for its answer at most
//! `result_store_timeout`; a lease whose caller gave up is released when its answer is
//! dropped. While the store is down, calls skip the queue and go alone, as one-task batches,
//! so that they fail at once (or are that second's one probe). The batcher ends when the store
//! is dropped. A script call is one `EVALSHA` command buffer (loading the script when Redis
//! answers `NOSCRIPT`), not a `ScriptInvocation`, which copies every key apart.
//!
//! At start, the store asks its server's version once (`INFO server`, on a connection of its
//! own) and warns when it is older than 7.0, which refuses every claim.
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
//!
//! # Files
//!
//! This file: the types and the operations (`claim`, `finish`, `inspect`, `forget`);
//! `value.rs`: the key and the values (lease, envelope) and telling them apart; `wire.rs`:
//! the batched calls, the release script, the bound on every call and the episodes;
//! `renew.rs`: the renewer; `batcher.rs`: the coalescing of concurrent calls; `tests.rs`.

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
mod renew;
#[cfg(test)]
mod tests;
mod value;
mod wire;

use batcher::Queue;
use renew::RENEW;
use value::{Entry, lease_value, millis, task_key, token_base};
pub(crate) use value::{Stored, decode, encode};
use wire::{Claiming, Ending, RELEASE, Reply, Request};

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
    /// Set by the renewer when the lease is no longer ours (logged once).
    lost: bool,
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
    release: Script,
    renew: Script,
    /// Claims, finishes and releases waiting for the batcher.
    requests: Queue<Request, Reply>,
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
    /// Its entry in `Inner::held`, which holds its key and value.
    id: u64,
    done: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(inner) = self.store.upgrade() else {
            return;
        };
        let held = inner.held().remove(&self.id);
        let Some(held) = held.filter(|_| !self.done) else {
            return;
        };
        // Dropped unfinished (the run was abandoned): free the task for another replica now
        // rather than when the lease expires, if a runtime is there to do it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = Store { inner };
            let ending = Ending {
                key: held.key,
                lease: held.lease,
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
                release: Script::new(RELEASE),
                renew: Script::new(RENEW),
                requests: Queue::default(),
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
            lease: lease_value(&self.inner.token_base, id),
            id,
        };
        match self.request(Request::Claim(claiming)).await? {
            Reply::Claim(claim) => Ok(claim),
            Reply::End(_) => Err(self.short_answer()),
        }
    }

    /// Ends a run: a success is stored (with `result_ttl`) in place of the lease, unless a
    /// result is stored already (the first stays); a failure (`None`) only releases the
    /// lease. Returns whether the result was stored.
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
        let held = self.inner.held().remove(&lease.id);
        let Some(Held { key, lease, .. }) = held else {
            // Not held: never the case for a lease this store gave out.
            return Err(StoreError::Failed {
                url: self.inner.shown.clone(),
                message: "the lease is not held by this store".to_owned(),
            });
        };
        let (envelope, unserializable) = match output.map(encode) {
            None => (None, false),
            Some(Ok(envelope)) => (Some(envelope), false),
            Some(Err(_)) => (None, true),
        };
        let stored = self
            .end(Ending {
                key,
                lease,
                envelope,
            })
            .await?;
        if unserializable {
            return Err(StoreError::Unserializable);
        }
        Ok(stored && output.is_some())
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
}

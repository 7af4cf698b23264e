//! The result cache: an LRU of successful results keyed by task uuid, with single flight (one
//! handler run for concurrent deliveries of the same uuid).
//!
//! Concurrent deliveries of one task share one run and its outcome, failures included: when
//! the run fails, every delivery that waited for it fails with the same error (each is then
//! retried or dead-lettered on its own count) instead of running the handler again one after
//! another, and none waits longer than `message_timeout` (issue 14, A12: N waiting
//! deliveries of a failing task took N × `message_timeout`, past the broker's delivery-ack
//! timeout). Only successes are kept, bounded by count (`result_cache_size`) and by the bytes
//! of their JSON (`result_cache_bytes`): the least recently used go first, and a result larger
//! than the whole budget is not kept.
//!
//! With `cache = "shared"` the LRU stays in front of the store every replica shares
//! ([`crate::store`]), and the single flight extends across the fleet: the delivery that runs
//! a task in this process first claims it in the store. A stored result is answered without
//! running ([`Source::Stored`]); a lease held by another replica is waited for, polling every
//! 5 ms doubling to 200 ms, at most `message_timeout` (then the delivery fails with a timeout
//! and is retried the normal way); a lease that expires meanwhile (its owner died) is taken
//! over by the first waiter whose claim finds it free, which runs the handler. A store that
//! fails or is down is skipped: the handler runs (at-least-once, as without the store).

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lru::LruCache;
use serde_json::Value;
use tokio::sync::watch;

use crate::config::{CacheMode, Config};
use crate::handler::{FailureAction, HandlerError, HandlerOutput};
use crate::health::{Counter, HandlerStats, Health};
use crate::store::{self, Store};

/// The first pause between two looks at a task another replica runs.
const POLL_FIRST: Duration = Duration::from_millis(5);
/// The longest pause between two looks at a task another replica runs.
const POLL_MAX: Duration = Duration::from_millis(200);

/// A handler's view of the store: the store, the handler's name and its counters (the
/// `store_*` lines of [`crate::health`]'s `handler_counters!`).
#[derive(Debug, Clone)]
pub(crate) struct HandlerStore {
    pub(crate) store: Store,
    pub(crate) handler: String,
    pub(crate) stats: Arc<HandlerStats>,
}

/// What a run ended with, as its waiters see it (a [`HandlerError`] is not `Clone`).
type Shared = Result<Option<Value>, (FailureAction, &'static str, String)>;

/// One task uuid's entry.
#[derive(Debug)]
enum Entry {
    /// A successful result and the bytes of its JSON.
    Done(Option<Value>, usize),
    /// A run in progress: its outcome arrives here (`None` until then). A closed channel
    /// means the run was dropped unfinished.
    Running(watch::Receiver<Option<Shared>>),
}

/// An in-process cache of handler results. It lives as long as the process; replicas do not
/// share it.
#[derive(Debug)]
pub(crate) struct ResultCache {
    entries: Mutex<Entries>,
    /// The shared store behind the LRU (`cache = "shared"`).
    shared: Option<HandlerStore>,
}

/// The entries and the bytes their results take.
#[derive(Debug)]
struct Entries {
    lru: LruCache<String, Entry>,
    bytes: usize,
    max_bytes: usize,
}

impl Entries {
    /// Inserts `entry`, keeping count of the bytes of what it replaces or pushes out.
    fn put(&mut self, key: String, entry: Entry) {
        if let Entry::Done(_, size) = &entry {
            self.bytes = self.bytes.saturating_add(*size);
        }
        if let Some((_, Entry::Done(_, size))) = self.lru.push(key, entry) {
            self.bytes = self.bytes.saturating_sub(size);
        }
        self.shrink();
    }

    /// Turns `key`'s run in progress into its result, in place (no new key), and marks it
    /// recently used.
    fn complete(&mut self, key: &str, value: Option<Value>, size: usize) {
        match self.lru.get_mut(key) {
            Some(slot) => {
                if let Entry::Done(_, old) = std::mem::replace(slot, Entry::Done(value, size)) {
                    self.bytes = self.bytes.saturating_sub(old);
                }
                self.bytes = self.bytes.saturating_add(size);
                self.shrink();
            }
            None => self.put(key.to_owned(), Entry::Done(value, size)),
        }
    }

    /// Over the byte budget, drops the least recently used results.
    fn shrink(&mut self) {
        // Over the byte budget: the least recently used results go (runs in progress stay).
        let mut left = self.lru.len();
        while self.bytes > self.max_bytes && left > 0 {
            left -= 1;
            match self.lru.pop_lru() {
                Some((_, Entry::Done(_, size))) => self.bytes = self.bytes.saturating_sub(size),
                Some((key, running)) => {
                    self.lru.push(key, running);
                }
                None => break,
            }
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(Entry::Done(_, size)) = self.lru.pop(key) {
            self.bytes = self.bytes.saturating_sub(size);
        }
    }
}

/// Whether a result came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The handler ran for this delivery.
    Ran,
    /// Another delivery's result was reused.
    Cached,
    /// The result came from the shared store (another replica's run, or an earlier one).
    Stored,
    /// Another delivery's run failed (or did not end in time), and so does this delivery.
    SharedFailure,
}

/// What a caller does for a key.
enum Claim {
    Done(Option<Value>),
    Wait(watch::Receiver<Option<Shared>>),
    Run(watch::Sender<Option<Shared>>),
}

impl ResultCache {
    /// At most `capacity` results, taking at most `max_bytes` bytes of JSON.
    pub(crate) fn new(capacity: NonZeroUsize, max_bytes: usize) -> Self {
        Self {
            entries: Mutex::new(Entries {
                lru: LruCache::new(capacity),
                bytes: 0,
                max_bytes,
            }),
            shared: None,
        }
    }

    /// Whether the shared store is behind the LRU.
    #[cfg(test)]
    pub(crate) fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Puts the shared store behind the LRU.
    pub(crate) fn with_store(mut self, store: HandlerStore) -> Self {
        self.shared = Some(store);
        self
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim(&self, key: &str) -> Claim {
        let mut entries = self.entries();
        match entries.lru.get(key) {
            Some(Entry::Done(value, _)) => return Claim::Done(value.clone()),
            // A run whose owner was dropped unfinished is no run: take it over.
            Some(Entry::Running(outcome)) if outcome.has_changed().is_ok() => {
                return Claim::Wait(outcome.clone());
            }
            _ => {}
        }
        let (sender, receiver) = watch::channel(None);
        entries.put(key.to_owned(), Entry::Running(receiver));
        Claim::Run(sender)
    }

    /// Records the outcome of the run `sender` announced, and hands it to its waiters.
    fn finish(&self, key: &str, sender: &watch::Sender<Option<Shared>>, output: &HandlerOutput) {
        {
            let mut entries = self.entries();
            let ours = matches!(entries.lru.peek(key),
                Some(Entry::Running(outcome)) if outcome.same_channel(&sender.subscribe()));
            if ours {
                match output {
                    Ok(value) => {
                        // The bytes of its JSON: what the result costs, near enough.
                        let size = value.as_ref().map_or(0, json_len);
                        if size <= entries.max_bytes {
                            entries.complete(key, value.clone(), size);
                        } else {
                            entries.remove(key);
                        }
                    }
                    Err(_) => entries.remove(key),
                }
            }
        }
        // The entry no longer holds a receiver: the ones left are waiters. Without any, the
        // outcome is not copied (a result's `Value` is a tree of allocations).
        if sender.receiver_count() == 0 {
            return;
        }
        let shared = match output {
            Ok(value) => Ok(value.clone()),
            Err(error) => Err((error.action(), error.kind(), error.message().to_owned())),
        };
        sender.send_replace(Some(shared));
    }

    /// Starts the work for `key`: its cached result, another run's outcome (waited for, at
    /// most `wait`), or the right to run it ([`Started::Run`]), whose holder must
    /// [`Run::finish`] it (dropping it unfinished lets the next caller take over).
    pub(crate) async fn start(&self, key: &str, wait: Duration) -> Started<'_> {
        loop {
            match self.claim(key) {
                Claim::Done(value) => return Started::Answered(Ok(value), Source::Cached),
                Claim::Run(sender) => {
                    return Started::Run(Run {
                        cache: self,
                        key: key.to_owned(),
                        sender,
                    });
                }
                Claim::Wait(mut outcome) => {
                    match tokio::time::timeout(wait, outcome.wait_for(Option::is_some)).await {
                        Ok(Ok(seen)) => match seen.as_ref() {
                            Some(Ok(value)) => {
                                return Started::Answered(Ok(value.clone()), Source::Cached);
                            }
                            Some(Err((action, kind, message))) => {
                                let error = HandlerError::with_kind(
                                    *action,
                                    kind,
                                    format_args!(
                                        "a concurrent delivery of this task failed: {message}"
                                    ),
                                );
                                return Started::Answered(Err(error), Source::SharedFailure);
                            }
                            None => {}
                        },
                        // The run was dropped unfinished: claim again.
                        Ok(Err(_closed)) => {}
                        Err(_elapsed) => {
                            let error = HandlerError::with_kind(
                                FailureAction::Retry,
                                "timeout",
                                format_args!(
                                    "waited {wait:?} (message_timeout) for a concurrent delivery of this task"
                                ),
                            );
                            return Started::Answered(Err(error), Source::SharedFailure);
                        }
                    }
                }
            }
        }
    }

    /// Returns the cached result for `key`, or runs `run` once: concurrent callers with the
    /// same key wait (at most `wait`) for that run and share its outcome, failures included.
    pub(crate) async fn get_or_run<F, Fut>(
        &self,
        key: &str,
        wait: Duration,
        run: F,
    ) -> (HandlerOutput, Source)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = HandlerOutput>,
    {
        match self.start(key, wait).await {
            Started::Answered(output, source) => (output, source),
            Started::Run(claimed) => {
                let (output, source) = match &self.shared {
                    Some(shared) => across_the_fleet(shared, key, wait, run).await,
                    None => (run().await, Source::Ran),
                };
                claimed.finish(&output);
                (output, source)
            }
        }
    }
}

/// Runs `run` for task `key` once across the fleet, or answers with the stored result, or
/// waits (at most `wait`) for another replica's run; without the store, runs it.
async fn across_the_fleet<F, Fut>(
    shared: &HandlerStore,
    key: &str,
    wait: Duration,
    run: F,
) -> (HandlerOutput, Source)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = HandlerOutput>,
{
    let stats = &shared.stats;
    let started = tokio::time::Instant::now();
    let mut pause = POLL_FIRST;
    let mut waited = false;
    loop {
        match shared.store.claim(&shared.handler, key).await {
            Ok(store::Claim::Stored(value)) => {
                stats.count(Counter::StoreHits);
                return (Ok(value), Source::Stored);
            }
            Ok(store::Claim::Claimed(lease)) => {
                if waited {
                    stats.count(Counter::StoreTakeovers);
                    tracing::info!("took the task over: another replica's lease on it expired");
                } else {
                    stats.count(Counter::StoreMisses);
                }
                let output = run().await;
                let stored = output.as_ref().ok();
                match shared.store.finish(lease, stored).await {
                    Ok(false) if stored.is_some() => tracing::debug!(
                        "a result of this task was stored first (another run of it); that one is kept"
                    ),
                    Ok(_) => {}
                    Err(error) => {
                        stats.count(Counter::StoreErrors);
                        tracing::debug!(error = %error, "the outcome was not written to the result store");
                    }
                }
                return (output, Source::Ran);
            }
            Ok(store::Claim::Held(holder)) => {
                if !waited {
                    waited = true;
                    stats.count(Counter::StoreLeaseWaits);
                    tracing::debug!(%holder, "another replica runs this task; waiting for its result");
                }
                let left = wait.saturating_sub(started.elapsed());
                if left.is_zero() {
                    let error = HandlerError::with_kind(
                        FailureAction::Retry,
                        "timeout",
                        format_args!(
                            "waited {wait:?} (message_timeout) for another replica's run of this task"
                        ),
                    );
                    return (Err(error), Source::SharedFailure);
                }
                tokio::time::sleep(pause.min(left)).await;
                pause = pause.saturating_mul(2).min(POLL_MAX);
            }
            Err(error) => {
                stats.count(Counter::StoreErrors);
                tracing::debug!(error = %error, "running without the result store");
                return (run().await, Source::Ran);
            }
        }
    }
}

/// What [`ResultCache::start`] found for a key.
#[derive(Debug)]
pub(crate) enum Started<'a> {
    /// A result (or another run's failure) to answer with, without running.
    Answered(HandlerOutput, Source),
    /// This caller runs the task and then finishes the run.
    Run(Run<'a>),
}

/// The length of `value`'s JSON, counted without building it; `usize::MAX` when it cannot be
/// serialized.
fn json_len(value: &Value) -> usize {
    /// Counts the bytes written to it.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(bytes.len());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// The right to run one key's task: other callers of that key wait for [`Run::finish`].
/// Dropped unfinished, the run is abandoned and the next caller runs the task.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    cache: &'a ResultCache,
    key: String,
    sender: watch::Sender<Option<Shared>>,
}

impl Run<'_> {
    /// Records the run's outcome (a success is kept) and hands it to the waiting callers.
    pub(crate) fn finish(self, output: &HandlerOutput) {
        self.cache.finish(&self.key, &self.sender, output);
    }
}

/// The engine's store: one for every handler with `cache = "shared"` (none without such a
/// handler), its monitor given to `health` for `/metrics` and `/readyz`.
///
/// # Errors
///
/// The store cannot be set up (its URL, its TLS files).
pub(crate) fn for_engine(
    config: &Config,
    handlers: &[crate::settings::Settings],
    health: &Health,
) -> Result<Option<Store>, crate::error::StoreError> {
    let shared: Vec<(String, String)> = handlers
        .iter()
        .filter(|settings| config.cache_mode(&settings.name) == CacheMode::Shared)
        .map(|settings| (settings.name.clone(), settings.queue.clone()))
        .collect();
    let Some(url) = config.result_store.as_ref().filter(|_| !shared.is_empty()) else {
        return Ok(None);
    };
    let store = Store::new(config, url, shared)?;
    let _ = health.store.set(store.monitor());
    Ok(Some(store))
}

/// The result cache of handler `name` (`cache`): an `lru` alone, an `lru` in front of
/// `store` (counting in the handler's stats in `health`), or none.
pub(crate) fn cache_for(
    config: &Config,
    name: &str,
    store: Option<&Store>,
    health: &Health,
    lru: impl FnOnce() -> ResultCache,
) -> Option<ResultCache> {
    match (config.cache_mode(name), store) {
        (CacheMode::None, _) => None,
        (CacheMode::Shared, Some(store)) => {
            let stats = health
                .handler(name)
                .unwrap_or_else(|| Arc::new(HandlerStats::new(name.to_owned(), String::new())));
            Some(lru().with_store(HandlerStore {
                store: store.clone(),
                handler: name.to_owned(),
                stats,
            }))
        }
        // `shared` without a store is a configuration error, caught at load.
        (CacheMode::Local | CacheMode::Shared, _) => Some(lru()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use serde_json::json;

    use super::*;

    const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

    fn cache(size: usize) -> ResultCache {
        ResultCache::new(
            NonZeroUsize::new(size).unwrap_or(NonZeroUsize::MIN),
            usize::MAX,
        )
    }

    #[tokio::test]
    async fn second_lookup_is_a_hit() {
        let cache = cache(2);
        let (first, source) = cache
            .get_or_run("a", WAIT, || async { Ok(Some(json!(1))) })
            .await;
        assert_eq!(source, Source::Ran);
        assert_eq!(first.ok().flatten(), Some(json!(1)));
        let (second, source) = cache
            .get_or_run("a", WAIT, || async { Ok(Some(json!(2))) })
            .await;
        assert_eq!(source, Source::Cached);
        assert_eq!(second.ok().flatten(), Some(json!(1)));
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = cache(2);
        let (first, _) = cache
            .get_or_run("a", WAIT, || async { Err(HandlerError::retry("boom")) })
            .await;
        assert!(first.is_err());
        let (second, source) = cache.get_or_run("a", WAIT, || async { Ok(None) }).await;
        assert_eq!(source, Source::Ran);
        assert!(matches!(second, Ok(None)));
    }

    #[tokio::test]
    async fn concurrent_same_key_runs_once() {
        let cache = Arc::new(cache(8));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, runs) = (Arc::clone(&cache), Arc::clone(&runs));
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_run("k", WAIT, || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(Some(json!("r")))
                    })
                    .await
            }));
        }
        for task in tasks {
            let (result, _) = task.await.unwrap_or((Ok(None), Source::Ran));
            assert_eq!(result.ok().flatten(), Some(json!("r")));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn lru_evicts_the_oldest() {
        let cache = cache(1);
        let _ = cache.get_or_run("a", WAIT, || async { Ok(None) }).await;
        let _ = cache.get_or_run("b", WAIT, || async { Ok(None) }).await;
        let (_, source) = cache.get_or_run("a", WAIT, || async { Ok(None) }).await;
        assert_eq!(source, Source::Ran);
    }

    #[tokio::test]
    async fn concurrent_same_key_share_a_failure() {
        let cache = Arc::new(cache(8));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (cache, runs) = (Arc::clone(&cache), Arc::clone(&runs));
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_run("k", WAIT, || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        Err(HandlerError::retry("boom"))
                    })
                    .await
            }));
        }
        let mut shared = 0;
        for task in tasks {
            let (result, source) = task.await.unwrap_or((Ok(None), Source::Ran));
            let error = result
                .err()
                .map(|e| e.message().to_owned())
                .unwrap_or_default();
            assert!(error.contains("boom"), "{error}");
            shared += usize::from(source == Source::SharedFailure);
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "one run for the four deliveries"
        );
        assert_eq!(shared, 3);
        // Failures are not kept: the next delivery runs again.
        let (_, source) = cache.get_or_run("k", WAIT, || async { Ok(None) }).await;
        assert_eq!(source, Source::Ran);
    }

    #[tokio::test]
    async fn a_waiter_waits_at_most_its_timeout() {
        let cache = Arc::new(cache(8));
        let slow = Arc::clone(&cache);
        let lead = tokio::spawn(async move {
            slow.get_or_run("k", WAIT, || async {
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                Ok(None)
            })
            .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (result, source) = cache
            .get_or_run("k", std::time::Duration::from_millis(50), || async {
                Ok(None)
            })
            .await;
        assert_eq!(source, Source::SharedFailure);
        assert_eq!(result.err().map(|e| e.kind()), Some("timeout"));
        lead.abort();
        // The aborted run is no run: the next caller takes over.
        let _ = lead.await;
        let (_, source) = cache.get_or_run("k", WAIT, || async { Ok(None) }).await;
        assert_eq!(source, Source::Ran);
    }

    #[tokio::test]
    async fn results_are_bounded_by_bytes_too() {
        // Each result is `"xxxxxxxx"`: 10 bytes of JSON; room for two.
        let cache = ResultCache::new(NonZeroUsize::new(100).unwrap_or(NonZeroUsize::MIN), 25);
        let ten = || async { Ok(Some(json!("xxxxxxxx"))) };
        for key in ["a", "b", "c"] {
            let (_, source) = cache.get_or_run(key, WAIT, ten).await;
            assert_eq!(source, Source::Ran);
        }
        assert_eq!(cache.entries().bytes, 20);
        // "a" went first; "b" and "c" are kept.
        assert_eq!(cache.get_or_run("a", WAIT, ten).await.1, Source::Ran);
        assert_eq!(cache.get_or_run("c", WAIT, ten).await.1, Source::Cached);
        // A result larger than the whole budget is not kept.
        let big = || async { Ok(Some(json!("x".repeat(40)))) };
        assert_eq!(cache.get_or_run("big", WAIT, big).await.1, Source::Ran);
        assert_eq!(cache.get_or_run("big", WAIT, big).await.1, Source::Ran);
        assert!(cache.entries().bytes <= 25);
    }

    #[tokio::test]
    async fn a_store_that_is_down_lets_the_handler_run() {
        let config = crate::config::Config {
            result_store_timeout: std::time::Duration::from_millis(200),
            ..crate::config::Config::default()
        };
        // Nothing listens on port 1.
        let url = crate::config::SecretUrl::new("redis://127.0.0.1:1/0");
        let store = crate::store::Store::new(&config, &url, vec![("h".to_owned(), "q".to_owned())])
            .unwrap_or_else(|error| panic!("{error}"));
        let stats = Arc::new(HandlerStats::new("h".to_owned(), "q".to_owned()));
        let cache = cache(8).with_store(HandlerStore {
            store,
            handler: "h".to_owned(),
            stats: Arc::clone(&stats),
        });
        let (first, source) = cache
            .get_or_run("k", WAIT, || async { Ok(Some(json!(1))) })
            .await;
        assert_eq!(
            (first.ok().flatten(), source),
            (Some(json!(1)), Source::Ran)
        );
        // The LRU in front still answers.
        let (_, source) = cache.get_or_run("k", WAIT, || async { Ok(None) }).await;
        assert_eq!(source, Source::Cached);
        // Down: the next task runs at once, without waiting for the store.
        let started = std::time::Instant::now();
        let (_, source) = cache.get_or_run("j", WAIT, || async { Ok(None) }).await;
        assert_eq!(source, Source::Ran);
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        assert_eq!(stats.get(Counter::StoreErrors), 2);
        assert_eq!(stats.get(Counter::StoreHits), 0);
    }

    #[test]
    fn each_handler_gets_the_cache_it_asks_for() {
        let config = Config::from_toml_str(
            r#"
            result_store = "redis://127.0.0.1:1/0"
            enable_result_cache = true
            [consumers.none]
            cache = "none"
            [consumers.shared]
            cache = "shared"
            "#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let url = crate::config::SecretUrl::new("redis://127.0.0.1:1/0");
        let handlers = vec![("shared".to_owned(), "q".to_owned())];
        let store = Store::new(&config, &url, handlers).unwrap_or_else(|e| panic!("{e}"));
        let health = Health::new([("shared".to_owned(), "q".to_owned())]);
        let lru = || ResultCache::new(std::num::NonZeroUsize::MIN, usize::MAX);
        assert!(cache_for(&config, "none", Some(&store), &health, lru).is_none());
        let local = cache_for(&config, "other", Some(&store), &health, lru);
        assert!(local.is_some_and(|cache| !cache.is_shared()));
        let shared = cache_for(&config, "shared", Some(&store), &health, lru);
        assert!(shared.is_some_and(|cache| cache.is_shared()));
    }
}

//! The result cache: an LRU of successful results keyed by task uuid, with single flight (one
//! handler run for concurrent deliveries of the same uuid).

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex, PoisonError},
};

use lru::LruCache;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::handler::{HandlerError, HandlerOutput};

type Slot = Arc<OnceCell<Option<Value>>>;

/// An in-process cache of handler results. It lives as long as the process; replicas do not
/// share it.
#[derive(Debug)]
pub(crate) struct ResultCache {
    entries: Mutex<LruCache<String, Slot>>,
}

/// Whether a result came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The handler ran for this delivery.
    Ran,
    /// Another delivery's result was reused.
    Cached,
}

impl ResultCache {
    pub(crate) fn new(capacity: NonZeroUsize) -> Self {
        Self {
            entries: Mutex::new(LruCache::new(capacity)),
        }
    }

    fn slot(&self, key: &str) -> Slot {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = entries.get(key) {
            return Arc::clone(slot);
        }
        let slot = Slot::default();
        entries.put(key.to_owned(), Arc::clone(&slot));
        slot
    }

    /// Returns the cached result for `key`, or runs `run` once (concurrent callers with the
    /// same key wait for it); only successes are kept.
    pub(crate) async fn get_or_run<F, Fut>(&self, key: &str, run: F) -> (HandlerOutput, Source)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = HandlerOutput>,
    {
        let slot = self.slot(key);
        let mut source = Source::Cached;
        let result = slot
            .get_or_try_init(|| {
                source = Source::Ran;
                run()
            })
            .await;
        match result {
            Ok(value) => (Ok(value.clone()), source),
            Err(error) => (Err::<_, HandlerError>(error), source),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;

    fn cache(size: usize) -> ResultCache {
        ResultCache::new(NonZeroUsize::new(size).unwrap_or(NonZeroUsize::MIN))
    }

    #[tokio::test]
    async fn second_lookup_is_a_hit() {
        let cache = cache(2);
        let (first, source) = cache.get_or_run("a", || async { Ok(Some(json!(1))) }).await;
        assert_eq!(source, Source::Ran);
        assert_eq!(first.ok().flatten(), Some(json!(1)));
        let (second, source) = cache.get_or_run("a", || async { Ok(Some(json!(2))) }).await;
        assert_eq!(source, Source::Cached);
        assert_eq!(second.ok().flatten(), Some(json!(1)));
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = cache(2);
        let (first, _) = cache
            .get_or_run("a", || async { Err(HandlerError::retry("boom")) })
            .await;
        assert!(first.is_err());
        let (second, source) = cache.get_or_run("a", || async { Ok(None) }).await;
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
                    .get_or_run("k", || async {
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
        let _ = cache.get_or_run("a", || async { Ok(None) }).await;
        let _ = cache.get_or_run("b", || async { Ok(None) }).await;
        let (_, source) = cache.get_or_run("a", || async { Ok(None) }).await;
        assert_eq!(source, Source::Ran);
    }
}

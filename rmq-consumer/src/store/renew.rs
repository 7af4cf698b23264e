//! The renewer: one task per store renewing every lease this process holds.

use super::*;

/// The renewer's longest period (it also probes a store that is down).
pub(super) const RENEW_PERIOD_MAX: Duration = Duration::from_secs(1);

/// Leases renewed per script call.
pub(super) const RENEW_CHUNK: usize = 500;

/// `KEYS` task keys; `ARGV[1]` lease ms, `ARGV[i+1]` our lease of `KEYS[i]` (`lease:<token>`).
/// Renews each key that holds our lease and returns the indexes (1-based) of the others: gone
/// (expired, flushed, or just released by a run that ended while this call was on its way), holding
/// that run's result, or held by another replica. A gone lease is not taken back: a run that just
/// ended would leave it behind, holding the task's next delivery for a whole lease.
pub(super) const RENEW: &str = r"
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

impl Store {
    /// Starts the renewer and the batcher (once per store): the renewer renews the
    /// leases this process holds and probes the store while it is down or required; the
    /// batcher sends the claims, finishes and releases. They end when the store is dropped.
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
            .requests
            .start(&runtime, weak.clone(), |store: Store, items| async move {
                store.exchange(items).await
            });
        runtime.spawn(super::wire::check_version(
            self.inner.client.clone(),
            self.inner.timeout,
            self.inner.shown.clone(),
        ));
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

    /// One renewer tick: renews every held lease (which also probes the store); with none,
    /// probes a store that is down or required.
    pub(super) async fn renew_all(&self) {
        let held: Vec<(u64, String, String)> = self
            .inner
            .held()
            .iter()
            .map(|(id, held)| (*id, held.key.clone(), held.lease.clone()))
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
                    for (_, key, lease) in chunk {
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
                let Some((id, key, _)) = index.checked_sub(1).and_then(|i| chunk.get(i)) else {
                    continue;
                };
                // A run that ended meanwhile released its lease: nothing was lost. Logged once
                // per lease.
                let first = self
                    .inner
                    .held()
                    .get_mut(id)
                    .is_some_and(|held| !std::mem::replace(&mut held.lost, true));
                if first {
                    warn!(lease = %key,
                        "this task's lease expired or was removed while its handler still runs here: another replica may run it too");
                }
            }
        }
    }
}

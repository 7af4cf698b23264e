//! How calls reach Redis: the batches of claims, finishes and releases (one pipeline for many
//! tasks), the bound on every call and the outage episodes it keeps.

use super::*;

/// While the store is down, at most one call per this period reaches it.
pub(super) const PROBE_PERIOD: Duration = Duration::from_secs(1);

/// Releases the leases of runs that failed or were abandoned: `KEYS[i]` the key of run `i`,
/// `ARGV[i]` its lease (`lease:<token>`). Deletes each key that still holds our lease. Returns
/// one answer per run, in order: 1 (released), 0 (not our lease: it expired, another replica
/// holds it, or a result is stored), or the error's text (the key holds something else). Flat,
/// not one `{code, error}` pair per run: the client parses less.
pub(super) const RELEASE: &str = r"
local out = {}
for i = 1, #KEYS do
  local held = redis.pcall('GET', KEYS[i])
  if type(held) == 'table' then
    out[i] = held.err or 'refused'
  elseif held == ARGV[i] then
    redis.call('DEL', KEYS[i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

/// A claim on its way to the store.
#[derive(Debug)]
pub(super) struct Claiming {
    pub(super) key: String,
    /// Our lease's value (`lease:<token>`).
    pub(super) lease: String,
    /// The lease's id in `Inner::held`, if it is taken.
    pub(super) id: u64,
}

/// A finish (or, without an envelope, a release) on its way to the store.
#[derive(Debug)]
pub(super) struct Ending {
    pub(super) key: String,
    /// Our lease's value (`lease:<token>`).
    pub(super) lease: String,
    /// The stored form of the result; `None`: only release the lease.
    pub(super) envelope: Option<Vec<u8>>,
}

/// A request for the batcher.
#[derive(Debug)]
pub(super) enum Request {
    /// A claim ([`Store::claim`]).
    Claim(Claiming),
    /// A finish or a release ([`Store::finish`], a dropped lease).
    End(Ending),
}

/// The batcher's answer to a [`Request`], of its kind.
#[derive(Debug)]
pub(super) enum Reply {
    /// What the claim found.
    Claim(Claim),
    /// Whether the finish stored (the release released).
    End(bool),
}

/// Where a request's answer is in a batch's pipeline.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Claim,
    Store,
    Release,
}

/// The script call releasing `items` (key, our lease) ([`RELEASE`]).
fn release_command(script: &Script, items: &[(String, String)]) -> redis::Cmd {
    let size = items.iter().fold(64, |size: usize, (key, lease)| {
        size.saturating_add(key.len())
            .saturating_add(lease.len())
            .saturating_add(32)
    });
    let args = items.len().saturating_mul(2).saturating_add(3);
    let mut command = evalsha(script, items.len(), args, size);
    for (key, _) in items {
        command.arg(key);
    }
    for (_, lease) in items {
        command.arg(lease);
    }
    command
}

/// Puts back the results that finishes' `SET ... GET` replaced (`answers`, one per item of
/// `stores`: key, envelope), in one pipeline, with a full `result_ttl`: the first
/// stored result stays. Rare: a task that ran twice (a lease lost, a flush, an outage). A
/// result that cannot be put back is logged; the later one stays stored (a result of the
/// task too).
async fn restore(
    connection: &mut ConnectionManager,
    answers: &[redis::Value],
    stores: &[(String, Vec<u8>)],
    ttl_ms: u64,
) {
    let mut replaced = Vec::new();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (answer, (key, _)) in answers.iter().zip(stores) {
        if let redis::Value::BulkString(old) = answer
            && matches!(Entry::of(old), Entry::Result(_))
        {
            pipe.cmd("SET").arg(key).arg(old).arg("PX").arg(ttl_ms);
            replaced.push(key);
        }
    }
    if replaced.is_empty() {
        return;
    }
    let put = pipe.query_async::<Vec<redis::Value>>(connection).await;
    let put = put.unwrap_or_default();
    for (index, key) in replaced.into_iter().enumerate() {
        if put.get(index) != Some(&redis::Value::Okay) {
            warn!(key = %key, "a stored result that a finish replaced could not be put back: the later result stays stored");
        }
    }
}

/// `count` copies of the failure of a call made for `count` requests.
pub(super) fn every<T>(error: &StoreError, count: usize) -> Vec<Result<T, StoreError>> {
    (0..count).map(|_| Err(again(error))).collect()
}

/// The same failure again, for another caller of the same call.
pub(super) fn again(error: &StoreError) -> StoreError {
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

impl Store {
    /// Sends one claim, finish or release: through the batcher while the store is up, alone
    /// otherwise.
    pub(super) async fn request(&self, request: Request) -> Result<Reply, StoreError> {
        match self.batched(&self.inner.requests, request) {
            Ok(answer) => self.answer(answer).await,
            Err(request) => self.alone(self.exchange(vec![request]).await),
        }
    }

    /// Sends one finish or release.
    pub(super) async fn end(&self, ending: Ending) -> Result<bool, StoreError> {
        match self.request(Request::End(ending)).await? {
            Reply::End(stored) => Ok(stored),
            Reply::Claim(_) => Err(self.short_answer()),
        }
    }

    /// Serves a batch of requests in one round trip, one pipeline: the releases as one
    /// script call ([`RELEASE`]), then one `SET key result PX ttl GET` per finish, then one
    /// `SET key lease NX PX lease GET` per claim (so a claim of a task finished or released in
    /// the same batch finds its result, or takes it). A finish that replaced a stored result
    /// puts it back (the first stays; [`Store::finish`]). When Redis does not know the script
    /// (first use, restart, `SCRIPT FLUSH`), the rest of the pipeline is answered, and the
    /// script is loaded and called again alone. One answer per request, in order. A failed
    /// call fails every request; a key holding something else fails its request only.
    pub(super) async fn exchange(&self, requests: Vec<Request>) -> Vec<Result<Reply, StoreError>> {
        let mut claims = Vec::new();
        let mut stores = Vec::new();
        let mut releases = Vec::new();
        let slots: Vec<Slot> = requests
            .into_iter()
            .map(|request| match request {
                Request::Claim(claiming) => {
                    claims.push(claiming);
                    Slot::Claim
                }
                Request::End(ending) => match ending.envelope {
                    Some(envelope) => {
                        // A finish replaces whatever lease is there: ours is not needed.
                        stores.push((ending.key, envelope));
                        Slot::Store
                    }
                    None => {
                        releases.push((ending.key, ending.lease));
                        Slot::Release
                    }
                },
            })
            .collect();
        let ttl_ms = millis(self.inner.ttl);
        let script = &self.inner.release;
        // The pipeline's commands: the releases' one script call, if any, then one per
        // finish and one per claim.
        let expected = claims
            .len()
            .saturating_add(stores.len())
            .saturating_add(usize::from(!releases.is_empty()));
        let sent = self
            .call(|mut connection| {
                let mut pipe = redis::Pipeline::with_capacity(expected);
                pipe.ignore_errors();
                if !releases.is_empty() {
                    pipe.add_command(release_command(script, &releases));
                }
                for (key, envelope) in &stores {
                    let size = key.len().saturating_add(envelope.len());
                    let mut set = redis::Cmd::with_capacity(6, size.saturating_add(32));
                    set.arg("SET")
                        .arg(key)
                        .arg(envelope)
                        .arg("PX")
                        .arg(ttl_ms)
                        .arg("GET");
                    pipe.add_command(set);
                }
                self.claim_commands(&mut pipe, &claims);
                let (releases, stores) = (&releases, &stores);
                async move {
                    let answers: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
                    let again = match answers.first() {
                        Some(redis::Value::ServerError(error))
                            if !releases.is_empty()
                                && error.kind() == Some(redis::ServerErrorKind::NoScript) =>
                        {
                            let command = release_command(script, releases);
                            Some(invoke(connection.clone(), script, command).await)
                        }
                        _ => None,
                    };
                    let skip = usize::from(!releases.is_empty());
                    let stored = answers.get(skip..).unwrap_or_default();
                    restore(&mut connection, stored, stores, ttl_ms).await;
                    Ok((answers, again))
                }
            })
            .await;
        let (answers, again) = match sent {
            Ok(sent) => sent,
            Err(error) => return every(&error, slots.len()),
        };
        if answers.len() != expected {
            return self.short(slots.len());
        }
        let mut answers = answers.into_iter();
        let released = if releases.is_empty() {
            Vec::new()
        } else {
            match (again, answers.next()) {
                (Some(Ok(answer)), _) | (None, Some(answer)) => {
                    self.released(releases.len(), answer)
                }
                (Some(Err(error)), _) => {
                    let error = StoreError::Failed {
                        url: self.inner.shown.clone(),
                        message: self.inner.scrub(&error.to_string()),
                    };
                    every(&error, releases.len())
                }
                (None, None) => self.short(releases.len()),
            }
        };
        let stored: Vec<_> = answers
            .by_ref()
            .take(stores.len())
            .map(|answer| self.stored(answer))
            .collect();
        let claimed = self.claimed(claims, answers.collect());
        let (mut claimed, mut stored, mut released) = (
            claimed.into_iter(),
            stored.into_iter(),
            released.into_iter(),
        );
        slots
            .into_iter()
            .map(|slot| {
                let answer = match slot {
                    Slot::Claim => claimed.next().map(|answer| answer.map(Reply::Claim)),
                    Slot::Store => stored.next().map(|answer| answer.map(Reply::End)),
                    Slot::Release => released.next().map(|answer| answer.map(Reply::End)),
                };
                answer.unwrap_or_else(|| Err(self.short_answer()))
            })
            .collect()
    }

    /// Queues `item` for its batcher while the store is up; gives it back (to be sent alone)
    /// while the store is down, so that a call fails at once or is the second's one probe, as
    /// without the batcher, or when no batcher runs.
    pub(super) fn batched<T, R>(
        &self,
        queue: &Queue<T, R>,
        item: T,
    ) -> Result<batcher::Answer<R>, T>
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
    pub(super) async fn answer<R>(&self, answer: batcher::Answer<R>) -> Result<R, StoreError> {
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
    pub(super) fn alone<R>(&self, answers: Vec<Result<R, StoreError>>) -> Result<R, StoreError> {
        answers
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(self.short_answer()))
    }

    /// `count` failures of a batch answered with the wrong number of results.
    pub(super) fn short<T>(&self, count: usize) -> Vec<Result<T, StoreError>> {
        (0..count).map(|_| Err(self.short_answer())).collect()
    }

    pub(super) fn short_answer(&self) -> StoreError {
        StoreError::Failed {
            url: self.inner.shown.clone(),
            message: "the store answered a batch with the wrong number of results".to_owned(),
        }
    }

    /// Adds one `SET key lease:<token> NX PX <lease> GET` per claim to `pipe`.
    fn claim_commands(&self, pipe: &mut redis::Pipeline, items: &[Claiming]) {
        let lease_ms = millis(self.inner.lease);
        for item in items {
            // Sized up front: the command's buffers do not grow arg by arg.
            let size = item.key.len().saturating_add(item.lease.len());
            let mut set = redis::Cmd::with_capacity(7, size.saturating_add(32));
            set.arg("SET")
                .arg(&item.key)
                .arg(&item.lease)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .arg("GET");
            pipe.add_command(set);
        }
    }

    /// What the claims' `SET`s answered, one answer per item, in order; the leases taken
    /// are registered with the renewer.
    fn claimed(
        &self,
        items: Vec<Claiming>,
        answers: Vec<redis::Value>,
    ) -> Vec<Result<Claim, StoreError>> {
        if answers.len() != items.len() {
            return self.short(items.len());
        }
        // The leases taken: the held map owns their key and value (the renewer reads them,
        // the finish or the drop takes them out).
        let mut claimed = Vec::new();
        let answers: Vec<_> = items
            .into_iter()
            .zip(answers)
            .map(|(item, answer)| match answer {
                redis::Value::Nil => {
                    let lease = Lease {
                        store: Arc::downgrade(&self.inner),
                        id: item.id,
                        done: false,
                    };
                    claimed.push((
                        item.id,
                        Held {
                            key: item.key,
                            lease: item.lease,
                            lost: false,
                        },
                    ));
                    Ok(Claim::Claimed(lease))
                }
                redis::Value::BulkString(value) => match Entry::of(&value) {
                    Entry::Lease(holder) => {
                        Ok(Claim::Held(String::from_utf8_lossy(holder).into_owned()))
                    }
                    Entry::Result(data) => decode(data)
                        .map(Claim::Stored)
                        .ok_or(StoreError::Undecodable { key: item.key }),
                },
                other => Err(self.refused_value(&other)),
            })
            .collect();
        if !claimed.is_empty() {
            self.inner.held().extend(claimed);
        }
        answers
    }

    /// What a finish's `SET ... GET` answered: stored (nothing was there, or a lease, ours or
    /// another replica's, which the result replaces), or not (a result was stored already:
    /// [`restore`] puts it back).
    fn stored(&self, answer: redis::Value) -> Result<bool, StoreError> {
        match answer {
            redis::Value::Nil => Ok(true),
            redis::Value::BulkString(old) => Ok(matches!(Entry::of(&old), Entry::Lease(_))),
            other => Err(self.refused_value(&other)),
        }
    }

    /// What the release script answered for `count` items: one answer per item, in order.
    fn released(&self, count: usize, answer: redis::Value) -> Vec<Result<bool, StoreError>> {
        match answer {
            redis::Value::Array(answers) if answers.len() == count => answers
                .into_iter()
                .map(|answer| match answer {
                    redis::Value::Int(code @ (0 | 1)) => Ok(code == 1),
                    redis::Value::BulkString(error) => Err(self.refused(&error)),
                    other => Err(self.refused_value(&other)),
                })
                .collect(),
            // The script call itself failed inside the pipeline (as `redis.call` does when
            // Redis is out of memory): its tasks fail, without an episode (the store answered).
            redis::Value::ServerError(_) => {
                let error = self.refused_value(&answer);
                every(&error, count)
            }
            _ => self.short(count),
        }
    }

    /// [`Self::refused`] for a reply that is not one of the expected ones.
    fn refused_value(&self, value: &redis::Value) -> StoreError {
        match value {
            redis::Value::ServerError(error) => self.refused(error.to_string().as_bytes()),
            other => self.refused(format!("{other:?}").as_bytes()),
        }
    }

    /// The store refused one item of a batch (a key holding another type, or a Redis older
    /// than 7.0, which refuses `SET NX GET`): that item fails, without an episode (the store
    /// answered). The first refusal is logged (once per store: every refusal is counted in
    /// `store_errors`, and a Redis too old refuses every claim).
    pub(super) fn refused(&self, message: &[u8]) -> StoreError {
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

    /// Runs one call to the store, bounded by `result_store_timeout`, and keeps the episode
    /// state: while the store is down, at most one call per [`PROBE_PERIOD`] reaches it.
    pub(super) async fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
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
    pub(super) fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A call failed: drop its connection (unless a newer one replaced it), start an episode
    /// (logged once) or go on with it.
    pub(super) fn failed(&self, generation: Option<u64>, message: &str) {
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
    pub(super) fn succeeded(&self) {
        if self.monitor.up.load(Relaxed) {
            return;
        }
        self.link().next_probe = None;
        if !self.monitor.up.swap(true, Relaxed) {
            info!(store = %self.shown, "the result store answers again");
        }
    }

    /// `text` without the password (a client error could quote it).
    pub(super) fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(password) if !password.is_empty() => text.replace(password.as_str(), "****"),
            _ => text.to_owned(),
        }
    }
}

/// The oldest Redis the store works with: a claim is `SET ... NX GET` (Redis 7.0).
pub(super) const REDIS_MIN: (u64, u64) = (7, 0);

/// Asks the store's server for its version once, on a connection of its own, and warns when it
/// is older than [`REDIS_MIN`]: such a server refuses every claim (each task then runs without
/// the store). Silent when the server cannot be asked (down: the calls' episode says so; `INFO`
/// denied by an ACL; no version in the answer): it is a hint, not a gate.
pub(super) async fn check_version(client: redis::Client, timeout: Duration, shown: String) {
    let asked = tokio::time::timeout(timeout, async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut connection)
            .await
    })
    .await;
    let Ok(Ok(info)) = asked else {
        return;
    };
    if let Some((version, parsed)) = redis_version(&info)
        && parsed < REDIS_MIN
    {
        warn!(store = %shown, version,
            "the result store's Redis is older than 7.0: it refuses every claim (SET NX GET), so every task runs without the store; upgrade Redis (or Valkey) to 7.0 or later");
    }
}

/// The `redis_version` line of an `INFO server` answer: the text and its (major, minor).
pub(super) fn redis_version(info: &str) -> Option<(&str, (u64, u64))> {
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))?
        .trim();
    let mut parts = version.split('.').map(str::parse::<u64>);
    let major = parts.next()?.ok()?;
    let minor = parts.next().and_then(Result::ok).unwrap_or(0);
    Some((version, (major, minor)))
}

/// The most bytes a command's buffer is sized for up front.
const PREALLOCATED_MAX: usize = 1 << 20;

/// `EVALSHA` of `script` with `keys` keys, to which the keys and then the arguments are
/// added: one buffer for the whole command, of `args` arguments and about `size` bytes (a
/// `ScriptInvocation` allocates every key and argument apart, then copies them into the
/// command).
pub(super) fn evalsha(script: &Script, keys: usize, args: usize, size: usize) -> redis::Cmd {
    // A hint: beyond [`PREALLOCATED_MAX`] the buffer grows as the arguments come.
    let mut command = redis::Cmd::with_capacity(args, size.min(PREALLOCATED_MAX));
    command.arg("EVALSHA");
    command.arg(script.get_hash()).arg(keys);
    command
}

/// Runs `command`, an [`evalsha`] of `script`; loads the script and runs it again when Redis
/// does not know it (first use, restart, flush), as `ScriptInvocation::invoke_async` does.
pub(super) async fn invoke<T: redis::FromRedisValue>(
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

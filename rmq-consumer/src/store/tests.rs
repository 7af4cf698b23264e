//! The store's unit tests (real Redis on 127.0.0.1:6379, each under its own prefix).

use serde_json::json;

use super::*;
use super::{
    value::MAX_KEY_UUID,
    wire::{REDIS_MIN, RELEASE, Reply, Request, check_version, evalsha, invoke, redis_version},
};

impl Store {
    /// Sends `requests` as one batch; `pick` takes each answer's value (`None`: an answer
    /// of the other kind, which fails the test).
    async fn batch<T>(
        &self,
        requests: Vec<Request>,
        pick: fn(Reply) -> Option<T>,
    ) -> Vec<Result<T, StoreError>> {
        let answers = self.exchange(requests).await.into_iter();
        answers
            .map(|answer| answer.map(|reply| pick(reply).unwrap_or_else(|| panic!("wrong kind"))))
            .collect()
    }

    /// Claims `items` in one batch.
    async fn claim_many(&self, items: Vec<Claiming>) -> Vec<Result<Claim, StoreError>> {
        let requests = items.into_iter().map(Request::Claim).collect();
        self.batch(requests, |reply| match reply {
            Reply::Claim(claim) => Some(claim),
            Reply::End(_) => None,
        })
        .await
    }

    /// Finishes or releases `items` in one batch.
    async fn finish_many(&self, items: Vec<Ending>) -> Vec<Result<bool, StoreError>> {
        let requests = items.into_iter().map(Request::End).collect();
        self.batch(requests, |reply| match reply {
            Reply::End(stored) => Some(stored),
            Reply::Claim(_) => None,
        })
        .await
    }
}

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
    let lease = lease_value("host:1:ab", 7);
    assert_eq!(lease, "lease:host:1:ab:7");
    assert_eq!(lease_value("b", u64::MAX), format!("lease:b:{}", u64::MAX));
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
fn the_redis_version_is_read_from_info() {
    let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
    assert_eq!(redis_version(info), Some(("7.0.15", (7, 0))));
    assert!(redis_version("redis_version:6.2.14\r\n").is_some_and(|(_, v)| v < REDIS_MIN));
    assert!(redis_version("redis_version:7.2\r\n").is_some_and(|(_, v)| v >= REDIS_MIN));
    assert_eq!(redis_version("redis_version:8\n"), Some(("8", (8, 0))));
    for foreign in [
        "",
        "redis_version:\r\n",
        "redis_version:x.1\r\n",
        "# Server\r\n",
    ] {
        assert_eq!(redis_version(foreign), None, "{foreign:?}");
    }
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

/// The key and the value of a lease `store` holds.
fn lease_of(store: &Store, lease: &Lease) -> (String, String) {
    let held = store.inner.held();
    let held = held.get(&lease.id);
    held.map(|held| (held.key.clone(), held.lease.clone()))
        .unwrap_or_else(|| panic!("lease {} is not held", lease.id))
}

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
            lease: lease_value(&self.store.inner.token_base, id),
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
    let lease = claimed
        .first()
        .map(|lease| lease_of(&scratch.store, lease).1);
    assert!(
        held.iter()
            .all(|holder| Some(format!("lease:{holder}")) == lease),
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
    // stores its result in place of that lease (waiters need not wait for the second run);
    // a failed run releases its lease; a run whose lease expired (nothing left) stores; a
    // key that is a list fails its run alone; a result stored already stays (put back).
    let (new_key, new_lease) = lease_of(&store, &lease);
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
    assert!(matches!(answers.get(1), Some(Ok(true))), "{answers:?}");
    assert!(matches!(answers.get(2), Some(Ok(true))), "{answers:?}");
    assert!(matches!(answers.get(3), Some(Ok(true))), "{answers:?}");
    assert!(
        matches!(answers.get(4), Some(Err(StoreError::Failed { message, .. })) if message.contains("WRONGTYPE")),
        "{answers:?}"
    );
    assert!(matches!(answers.get(5), Some(Ok(false))), "{answers:?}");
    assert!(store.inner.monitor.up.load(Relaxed));
    for key in [&new_key, &held_key, &expired.key] {
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
    /// Captures this thread's log lines (the engine's own format) until the guard is dropped.
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let lines = Self::default();
        let subscriber =
            crate::logging::subscriber(&crate::config::LogConfig::default(), lines.clone())
                .unwrap_or_else(|e| panic!("{e}"));
        (lines, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
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
async fn the_version_check_reads_the_running_redis_and_stays_quiet_on_it() {
    // What the check parses is what this Redis answers (7.0 or later here).
    let client = redis::Client::open(REDIS).unwrap_or_else(|e| panic!("{e}"));
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis must run on {REDIS}: {e}"));
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let parsed = redis_version(&info);
    assert!(parsed.is_some_and(|(_, v)| v >= REDIS_MIN), "{parsed:?}");
    // No warning for it, nor for a server that cannot be asked (which returns within the
    // timeout).
    let (lines, logging) = Lines::capture();
    check_version(client, Duration::from_secs(2), "shown".to_owned()).await;
    let down = redis::Client::open("redis://127.0.0.1:1/0").unwrap_or_else(|e| panic!("{e}"));
    let asked = tokio::time::timeout(
        Duration::from_secs(5),
        check_version(down, Duration::from_millis(300), "down".to_owned()),
    )
    .await;
    drop(logging);
    assert!(asked.is_ok(), "the check outlived its timeout");
    let log = lines.text();
    assert!(!log.contains("older than 7.0"), "{log}");
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
    let (lines, logging) = Lines::capture();
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
async fn the_batcher_the_renewer_and_the_version_check_end_with_the_store() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let url = SecretUrl::new("redis://127.0.0.1:1/0");
    let store = Store::new(&Config::default(), &url, Vec::new());
    let store = store.unwrap_or_else(|e| panic!("{e}"));
    store.start();
    // The renewer, the batcher and the version check (which ends by itself).
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
    let mut command = evalsha(&script, 0, 3, 64);
    command.arg("x");
    let answer: Vec<String> = invoke(connection, &script, command)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer, [scratch.prefix.clone(), "x".to_owned()]);
    scratch.clean().await;
}

#[tokio::test]
async fn claims_finishes_and_releases_of_one_batch_share_a_round_trip() {
    let mut scratch = Scratch::new("both").await;
    // A release script no Redis has seen (a comment of its own), so the first batch's
    // releases are answered NOSCRIPT and sent again once it is loaded.
    let body = format!("-- {}\n{RELEASE}", scratch.prefix);
    let Some(inner) = Arc::get_mut(&mut scratch.store.inner) else {
        panic!("the scratch store is shared");
    };
    inner.release = Script::new(&body);
    let store = scratch.store.clone();
    let items = ["first", "second", "failed"].map(|uuid| scratch.claiming(uuid));
    let mut leases = Vec::new();
    for answer in store.claim_many(items.into()).await {
        let Ok(Claim::Claimed(lease)) = answer else {
            panic!("{answer:?}");
        };
        let (key, lease_value) = lease_of(&store, &lease);
        leases.push((lease, key, lease_value));
    }
    let [
        (_, first, first_lease),
        (_, second, second_lease),
        (_, failed, failed_lease),
    ] = &leases[..]
    else {
        panic!("three leases");
    };
    let end = |key: &String, lease: &String, value: Option<u64>| {
        Request::End(Ending {
            key: key.clone(),
            lease: lease.clone(),
            envelope: value.map(|value| encode(&Some(json!(value))).unwrap_or_default()),
        })
    };
    let stored = |answer: Option<Result<Reply, StoreError>>, expected: u64| {
        assert!(
            matches!(&answer, Some(Ok(Reply::Claim(Claim::Stored(Some(value))))) if *value == json!(expected)),
            "{answer:?}"
        );
    };
    // Unknown script: the claim and the finish are answered, the release is sent again.
    let batch = vec![
        Request::Claim(scratch.claiming("new")),
        end(first, first_lease, Some(1)),
        end(failed, failed_lease, None),
    ];
    let mut answers = store.exchange(batch).await.into_iter();
    let new = answers.next();
    assert!(
        matches!(new, Some(Ok(Reply::Claim(Claim::Claimed(_))))),
        "{new:?}"
    );
    let finished = answers.next();
    assert!(
        matches!(finished, Some(Ok(Reply::End(true)))),
        "{finished:?}"
    );
    let released = answers.next();
    assert!(
        matches!(released, Some(Ok(Reply::End(true)))),
        "{released:?}"
    );
    assert!(answers.next().is_none());
    assert_eq!(scratch.get(failed).await, None);
    // Known script: the finishes and releases go first, so a claim of a task finished in the
    // same batch finds its result even when it was asked before the finish; a second finish
    // of a task does not replace its result (put back after the batch, with a fresh
    // result_ttl: a claim in that batch could see the second, a result of the task too).
    let batch = vec![
        Request::Claim(scratch.claiming("second")),
        end(second, second_lease, Some(2)),
        end(first, first_lease, Some(3)),
        end(first, first_lease, None),
    ];
    let mut answers = store.exchange(batch).await.into_iter();
    stored(answers.next(), 2);
    assert!(matches!(answers.next(), Some(Ok(Reply::End(true)))));
    let again = answers.next();
    assert!(matches!(again, Some(Ok(Reply::End(false)))), "{again:?}");
    let released = answers.next();
    assert!(
        matches!(released, Some(Ok(Reply::End(false)))),
        "{released:?}"
    );
    assert!(answers.next().is_none());
    let mut answers = store
        .exchange(vec![Request::Claim(scratch.claiming("first"))])
        .await;
    stored(answers.pop(), 1);
    let kept = scratch.get(first).await;
    assert_eq!(
        kept.as_deref().map(str::as_bytes).and_then(decode),
        Some(Some(json!(1)))
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(first)
        .query_async(&mut scratch.redis)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ttl > 0, "{ttl}");
    assert!(store.inner.monitor.up.load(Relaxed));
    for lease in leases {
        drop(lease);
    }
    scratch.clean().await;
}

//! The result store shared by every replica (issue 17), against the real Redis and the real
//! broker: worker processes (`fault-worker`, `cache = "shared"`) on one queue, handler runs
//! counted outside the workers (`FAULT_WORKER_RUNS_FILE`), the ledger of
//! tests/RELIABILITY.md. S1 runs once across the fleet, S2 a restart reuses stored results,
//! S3 a killed worker's lease is taken over, S4 Redis stopped and started, S5 Redis never
//! answering, S6 the `cache` CLI and password masking, S7 `rediss://`, S8 Redis flushed.
//!
//! The shared Redis is the machine's (127.0.0.1:6379, `tests/scripts/redis.sh start`); each
//! test has its own key prefix ([`RedisKeys`], deleted on drop, also on failure). The tests
//! that stop Redis or make it hang use a server or listener of their own ([`PrivateRedis`],
//! [`SilentRedis`]), never the shared one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "tests"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::SocketAddr,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    time::Duration,
};

use rmq_consumer_tests::{
    Broker, CleanupOnPanic, Ledger, PrivateRedis, Received, RedisKeys, RedisTls, Route,
    SilentRedis, WorkerProcess, broker_name, broker_url, eventually, eventually_async, id_of, pki,
    redis_url, task, test_config, unique,
};
use serde_json::{Value, json};

/// The shutdown timeout the workers are given.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The file the workers append one line per handler run to (the task uuid); removed on drop
/// unless the test failed.
struct RunsFile(PathBuf);

impl RunsFile {
    fn new() -> Self {
        Self(std::env::temp_dir().join(unique("runs")))
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }

    /// Handler runs per task uuid so far.
    fn runs(&self) -> BTreeMap<String, usize> {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        let mut runs = BTreeMap::new();
        for line in text.lines() {
            *runs.entry(line.to_owned()).or_default() += 1;
        }
        runs
    }

    /// Handler runs so far.
    fn total(&self) -> usize {
        self.runs().values().sum()
    }
}

impl Drop for RunsFile {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("[runs] kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// One test's topology: an exchange, the `work` handler's route (its work queue declared
/// now), the test's broker connection and its cleanup guard.
struct Setup {
    broker: Broker,
    exchange: String,
    route: Route,
    _cleanup: CleanupOnPanic,
}

async fn setup() -> Setup {
    let mut broker = Broker::connect().await;
    let exchange = unique("ex");
    broker.track_exchange(&exchange);
    let mut config = test_config(&exchange);
    let route = Route::new(&mut config, "work", &mut broker);
    // Declared as the workers declare it (durable classic, no arguments), so tasks can wait.
    broker.declare_queue(&route.queue).await;
    let cleanup = broker.cleanup_on_panic();
    Setup {
        broker,
        exchange,
        route,
        _cleanup: cleanup,
    }
}

/// A worker's store settings.
struct Store<'a> {
    url: &'a str,
    prefix: &'a str,
    runs: &'a RunsFile,
}

/// A free port of 127.0.0.1 for a worker's `/metrics`.
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Starts a `fault-worker` for `setup`'s route with `cache = "shared"` on `store`, its
/// `/metrics` on `http`, and `extra` on top.
fn spawn_worker(
    setup: &Setup,
    store: &Store<'_>,
    http: SocketAddr,
    extra: &[(&str, String)],
) -> WorkerProcess {
    let mut env = vec![
        ("RMQ_CONSUMER_RESULT_STORE", store.url.to_owned()),
        ("RMQ_CONSUMER_RESULT_STORE_PREFIX", store.prefix.to_owned()),
        ("RMQ_CONSUMER_CONSUMERS__WORK__CACHE", "shared".to_owned()),
        ("FAULT_WORKER_RUNS_FILE", store.runs.path()),
        ("RMQ_CONSUMER_HTTP_ADDR", http.to_string()),
        (
            "RMQ_CONSUMER_SHUTDOWN_TIMEOUT",
            format!("{}s", SHUTDOWN_TIMEOUT.as_secs()),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    WorkerProcess::spawn(
        env!("CARGO_BIN_EXE_fault-worker"),
        &broker_url(),
        &setup.exchange,
        &setup.route,
        &env,
    )
}

/// `GET path` on a worker's HTTP endpoint: the body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The status code of `GET path` on a worker's HTTP endpoint.
fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// The value of metric `name` of the `work` handler (`name{handler="work",...} value`), 0 when
/// the line is missing.
fn metric(text: &str, name: &str) -> u64 {
    let start = format!("{name}{{handler=\"work\"");
    text.lines()
        .filter(|line| line.starts_with(&start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// A worker's store metrics now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct StoreMetrics {
    hits: u64,
    misses: u64,
    lease_waits: u64,
    takeovers: u64,
    errors: u64,
}

impl std::ops::Add for StoreMetrics {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
            lease_waits: self.lease_waits + other.lease_waits,
            takeovers: self.takeovers + other.takeovers,
            errors: self.errors + other.errors,
        }
    }
}

fn store_metrics(http: SocketAddr) -> StoreMetrics {
    let text = http_get(http, "/metrics");
    StoreMetrics {
        hits: metric(&text, "rmq_consumer_store_hits_total"),
        misses: metric(&text, "rmq_consumer_store_misses_total"),
        lease_waits: metric(&text, "rmq_consumer_store_lease_waits_total"),
        takeovers: metric(&text, "rmq_consumer_store_takeovers_total"),
        errors: metric(&text, "rmq_consumer_store_errors_total"),
    }
}

/// `n` copies of an empty task per id, each id's copies side by side (a task published `n`
/// times).
fn copies(ids: &[String], n: usize) -> Vec<Value> {
    ids.iter()
        .flat_map(|id| std::iter::repeat_n(task(id, json!({})), n))
        .collect()
}

/// Publishes `tasks` (ids may repeat) to the work queue, recording them in `ledger`; asserts
/// every publish was confirmed.
async fn publish(setup: &Setup, ledger: &mut Ledger, tasks: &[Value]) {
    let confirmed = ledger
        .publish(&setup.broker, "", &setup.route.queue, tasks)
        .await;
    assert_eq!(confirmed, tasks.len(), "every publish confirmed");
}

/// Reads `count` results (failing with the workers' logs when fewer come within `timeout`),
/// then makes sure no more arrive for a quiet second; records them in `ledger`.
async fn collect_results(
    setup: &Setup,
    ledger: &mut Ledger,
    count: usize,
    timeout: Duration,
    workers: &[&WorkerProcess],
) -> Vec<Received> {
    let mut results = setup
        .broker
        .collect(&setup.route.reply_queue, count, timeout)
        .await;
    let logs = || {
        workers
            .iter()
            .map(|w| w.log())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    };
    assert_eq!(
        results.len(),
        count,
        "results within {timeout:?}; worker logs:\n{}",
        logs()
    );
    let extra = setup
        .broker
        .collect(&setup.route.reply_queue, 1, Duration::from_secs(1))
        .await;
    results.extend(extra);
    assert_eq!(results.len(), count, "more results than deliveries");
    ledger.record_results(&results);
    results
}

/// Result bodies per task id; asserts every result has an id.
fn bodies(results: &[Received]) -> BTreeMap<String, BTreeSet<Vec<u8>>> {
    let mut bodies: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for result in results {
        let id = id_of(result).expect("a result carries its task id");
        bodies.entry(id).or_default().insert(result.body.clone());
    }
    bodies
}

/// Asserts that every task's results are byte for byte the same: one run's result, served to
/// every copy.
fn assert_identical(bodies: &BTreeMap<String, BTreeSet<Vec<u8>>>) {
    let differing: Vec<_> = bodies.iter().filter(|(_, b)| b.len() > 1).collect();
    assert!(
        differing.is_empty(),
        "{} task(s) answered with different results, e.g. {:?}",
        differing.len(),
        differing
            .iter()
            .take(3)
            .map(|(id, b)| (
                id,
                b.iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
    );
}

/// Checks the ledger (nothing lost, nothing left, nothing dead-lettered) without waiting for
/// results again: they were collected already.
async fn assert_ledger(setup: &Setup, ledger: &mut Ledger) -> rmq_consumer_tests::LedgerReport {
    ledger
        .drain_route(
            &setup.broker,
            &setup.route,
            Duration::from_millis(500),
            Duration::from_secs(10),
        )
        .await;
    let report = ledger.assert_nothing_lost();
    assert_eq!(report.dead_lettered, 0, "nothing dead-lettered");
    report
}

/// S1: three worker processes on one queue, 1,000 distinct tasks each published three times
/// (the copies back to back, so they reach different replicas at once): exactly 1,000 handler
/// runs across the fleet, 3,000 results, identical per task uuid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_three_replicas_run_each_task_once() {
    const TASKS: usize = 1000;
    const COPIES: usize = 3;
    let setup = setup().await;
    let keys = RedisKeys::new("s1").await;
    let runs = RunsFile::new();
    let store_url = redis_url();
    let store = Store {
        url: &store_url,
        prefix: keys.prefix(),
        runs: &runs,
    };
    let http: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let mut workers: Vec<WorkerProcess> = http
        .iter()
        .map(|addr| {
            spawn_worker(
                &setup,
                &store,
                *addr,
                &[
                    ("RMQ_CONSUMER_PREFETCH_COUNT", "32".to_owned()),
                    ("FAULT_WORKER_SLEEP_MS", "10".to_owned()),
                ],
            )
        })
        .collect();
    workers[0]
        .wait_consumers(&setup.broker, &setup.route.queue, 3)
        .await;

    let mut ledger = Ledger::new("S1");
    let ids = ledger.ids(TASKS);
    let tasks = copies(&ids, COPIES);
    publish(&setup, &mut ledger, &tasks).await;
    let worker_refs: Vec<&WorkerProcess> = workers.iter().collect();
    let results = collect_results(
        &setup,
        &mut ledger,
        TASKS * COPIES,
        Duration::from_secs(120),
        &worker_refs,
    )
    .await;

    let bodies = bodies(&results);
    assert_eq!(bodies.len(), TASKS, "every task answered");
    assert_identical(&bodies);
    let per_task = runs.runs();
    let twice: Vec<_> = per_task.iter().filter(|(_, n)| **n > 1).collect();
    let metrics = http
        .iter()
        .map(|addr| store_metrics(*addr))
        .fold(StoreMetrics::default(), |a, b| a + b);
    let pids: BTreeSet<_> = results
        .iter()
        .filter_map(|r| r.json.as_ref()?["pid"].as_u64())
        .collect();
    let report = assert_ledger(&setup, &mut ledger).await;
    println!(
        "[S1 {}] runs={} results={} duplicates={} tasks run by {} replicas; {metrics:?}",
        broker_name(),
        runs.total(),
        report.results_total,
        report.duplicates,
        pids.len()
    );
    assert!(
        twice.is_empty(),
        "{} task(s) ran more than once, e.g. {:?}",
        twice.len(),
        twice.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(runs.total(), TASKS, "exactly one handler run per task");
    let known: BTreeSet<&String> = ids.iter().collect();
    assert!(
        per_task.keys().all(|id| known.contains(id)),
        "every line of the runs file is a whole task uuid"
    );
    assert_eq!(report.results_total, TASKS * COPIES, "every copy answered");
    assert_eq!(report.duplicates, TASKS * (COPIES - 1));
    assert_eq!(pids.len(), 3, "the work was shared by the three replicas");
    assert_eq!(metrics.errors, 0, "no store errors: {metrics:?}");
    assert_eq!(
        keys.results().await.len(),
        TASKS,
        "one stored result per task"
    );
    let leases = keys.leases().await;
    let mut left = Vec::new();
    for lease in leases.iter().take(5) {
        left.push((lease.clone(), keys.pttl(lease).await, keys.get(lease).await));
    }
    assert!(
        leases.is_empty(),
        "every lease released when its task ended: {} left, e.g. (key, pttl ms, value) \
         {left:?}",
        leases.len()
    );
    for mut worker in workers {
        let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
        assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
    }
    setup.broker.cleanup().await;
}

/// S2: a worker restarted mid-run (SIGTERM, then a new process with an empty local cache)
/// finishes the run; every task published again afterwards is answered from the store without
/// running, with the very result of its one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_a_restarted_worker_reuses_stored_results() {
    const TASKS: usize = 400;
    let setup = setup().await;
    let keys = RedisKeys::new("s2").await;
    let runs = RunsFile::new();
    let store_url = redis_url();
    let store = Store {
        url: &store_url,
        prefix: keys.prefix(),
        runs: &runs,
    };
    let extra = [
        ("RMQ_CONSUMER_PREFETCH_COUNT", "8".to_owned()),
        ("FAULT_WORKER_SLEEP_MS", "20".to_owned()),
    ];
    let mut ledger = Ledger::new("S2");
    let ids = ledger.ids(TASKS);
    let tasks: Vec<Value> = ids.iter().map(|id| task(id, json!({}))).collect();
    publish(&setup, &mut ledger, &tasks).await;

    let http = free_addr();
    let mut first = spawn_worker(&setup, &store, http, &extra);
    first
        .wait_consumers(&setup.broker, &setup.route.queue, 1)
        .await;
    eventually(
        "a quarter of the tasks run",
        Duration::from_secs(60),
        || runs.total() >= TASKS / 4,
    )
    .await;
    let (status, _) = first.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", first.log());
    let runs_at_restart = runs.total();
    assert!(runs_at_restart < TASKS, "the run ended before the restart");

    let http = free_addr();
    let mut second = spawn_worker(&setup, &store, http, &extra);
    second
        .wait_consumers(&setup.broker, &setup.route.queue, 1)
        .await;
    let before = collect_results(
        &setup,
        &mut ledger,
        TASKS,
        Duration::from_secs(60),
        &[&first, &second],
    )
    .await;
    assert_eq!(runs.total(), TASKS, "one run per task across the restart");

    // Everything again: answered from the store, no handler runs.
    let misses_before = store_metrics(http).misses;
    publish(&setup, &mut ledger, &tasks).await;
    let after = collect_results(
        &setup,
        &mut ledger,
        TASKS,
        Duration::from_secs(60),
        &[&second],
    )
    .await;
    let metrics = store_metrics(http);
    let mut all = before;
    all.extend(after);
    let bodies = bodies(&all);
    assert_identical(&bodies);
    let report = assert_ledger(&setup, &mut ledger).await;
    println!(
        "[S2 {}] restart after {runs_at_restart} runs; runs={} results={} duplicates={}; \
         second worker {metrics:?}",
        broker_name(),
        runs.total(),
        report.results_total,
        report.duplicates
    );
    assert_eq!(runs.total(), TASKS, "no run for a task published again");
    assert_eq!(report.results_total, 2 * TASKS);
    assert_eq!(
        metrics.misses, misses_before,
        "the second round never missed the store"
    );
    // Served by the LRU for the tasks the second worker ran, by the store for the others.
    assert!(
        metrics.hits >= runs_at_restart as u64,
        "the first worker's results came from the store: {metrics:?}"
    );
    let (status, _) = second.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", second.log());
    setup.broker.cleanup().await;
}

/// S3: a worker is killed (SIGKILL) while it runs three long tasks. Their leases expire
/// (`result_store_lease` 3 s: the first redelivery finds its lease still held even on a slow
/// machine); the other replica, which gets the redeliveries (through its suspect queue, one
/// at a time) and waits on the leases, takes them over and runs each once: the killed runs
/// plus exactly one more each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_killed_workers_tasks_are_taken_over_once() {
    const TASKS: usize = 3;
    let setup = setup().await;
    let keys = RedisKeys::new("s3").await;
    let runs = RunsFile::new();
    let store_url = redis_url();
    let store = Store {
        url: &store_url,
        prefix: keys.prefix(),
        runs: &runs,
    };
    let extra = [
        ("RMQ_CONSUMER_PREFETCH_COUNT", TASKS.to_string()),
        ("RMQ_CONSUMER_RESULT_STORE_LEASE", "3s".to_owned()),
        ("RMQ_CONSUMER_MESSAGE_TIMEOUT", "60s".to_owned()),
    ];
    let mut ledger = Ledger::new("S3");
    let ids = ledger.ids(TASKS);
    let tasks: Vec<Value> = ids
        .iter()
        .map(|id| task(id, json!({"sleep_ms": 3000})))
        .collect();

    let mut doomed = spawn_worker(&setup, &store, free_addr(), &extra);
    doomed
        .wait_consumers(&setup.broker, &setup.route.queue, 1)
        .await;
    publish(&setup, &mut ledger, &tasks).await;
    eventually(
        "the doomed worker runs every task",
        Duration::from_secs(20),
        || runs.total() == TASKS,
    )
    .await;
    assert_eq!(keys.leases().await.len(), TASKS, "a lease per running task");
    let http = free_addr();
    let mut survivor = spawn_worker(&setup, &store, http, &extra);
    survivor
        .wait_consumers(&setup.broker, &setup.route.queue, 2)
        .await;
    let status = doomed.kill9().await;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    assert_eq!(runs.total(), TASKS, "killed mid-task");

    let results = collect_results(
        &setup,
        &mut ledger,
        TASKS,
        Duration::from_secs(60),
        &[&survivor],
    )
    .await;
    let metrics = store_metrics(http);
    let survivor_pid = u64::from(survivor.pid());
    // The same tasks again: served from the store.
    publish(&setup, &mut ledger, &tasks).await;
    let again = collect_results(
        &setup,
        &mut ledger,
        TASKS,
        Duration::from_secs(30),
        &[&survivor],
    )
    .await;
    let mut all = results.clone();
    all.extend(again);
    assert_identical(&bodies(&all));
    let report = assert_ledger(&setup, &mut ledger).await;
    println!(
        "[S3 {}] runs={:?} results={} duplicates={}; survivor {metrics:?}",
        broker_name(),
        runs.runs().values().collect::<Vec<_>>(),
        report.results_total,
        report.duplicates
    );
    for id in &ids {
        assert_eq!(
            runs.runs().get(id),
            Some(&2),
            "{id}: the killed run and exactly one more"
        );
    }
    assert!(
        results
            .iter()
            .all(|r| r.json.as_ref().unwrap()["pid"].as_u64() == Some(survivor_pid)),
        "the survivor answered"
    );
    // The redeliveries of a dead worker's tasks run one at a time (the suspect queue): the
    // first waits on its lease and takes it over; later ones may find their lease expired
    // already (a miss). Either way the survivor ran each once.
    assert!(
        metrics.takeovers >= 1 && metrics.lease_waits >= metrics.takeovers,
        "{metrics:?}"
    );
    assert_eq!(
        metrics.takeovers + metrics.misses,
        TASKS as u64,
        "{metrics:?}"
    );
    assert_eq!(report.results_total, 2 * TASKS);
    let (status, _) = survivor.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", survivor.log());
    setup.broker.cleanup().await;
}

/// Occurrences of `needle` in `haystack`.
fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// The store's log lines: one warning when an outage starts, one info line when it ends.
const OUTAGE_LINE: &str = "the result store is unreachable";
const RECOVERY_LINE: &str = "the result store answers again";

/// S4: the store's Redis (a private server) is killed and started again (empty) while two
/// replicas work through 800 tasks published twice. Nothing is lost, every delivery is
/// answered, runs stay between one and two per task; each worker logs the outage once and the
/// recovery once, and after it tasks run once across the fleet again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_redis_stopped_and_started_mid_run_loses_nothing() {
    const TASKS: usize = 800;
    const AFTER: usize = 100;
    let setup = setup().await;
    let mut redis = PrivateRedis::start().await;
    let redis_url = redis.url();
    let keys = RedisKeys::on(&redis_url, "s4").await;
    let runs = RunsFile::new();
    let store = Store {
        url: &redis_url,
        prefix: keys.prefix(),
        runs: &runs,
    };
    let extra = [
        ("RMQ_CONSUMER_PREFETCH_COUNT", "4".to_owned()),
        ("FAULT_WORKER_SLEEP_MS", "20".to_owned()),
        ("RMQ_CONSUMER_RESULT_STORE_TIMEOUT", "200ms".to_owned()),
        ("RMQ_CONSUMER_RESULT_STORE_LEASE", "1s".to_owned()),
    ];
    let http = [free_addr(), free_addr()];
    let mut workers = [
        spawn_worker(&setup, &store, http[0], &extra),
        spawn_worker(&setup, &store, http[1], &extra),
    ];
    workers[0]
        .wait_consumers(&setup.broker, &setup.route.queue, 2)
        .await;

    let mut ledger = Ledger::new("S4");
    let ids = ledger.ids(TASKS);
    let tasks = copies(&ids, 2);
    publish(&setup, &mut ledger, &tasks).await;
    eventually(
        "a quarter of the tasks run",
        Duration::from_secs(60),
        || runs.total() >= TASKS / 4,
    )
    .await;
    redis.stop();
    let runs_at_stop = runs.total();
    eventually_async(
        "both workers notice the outage",
        Duration::from_secs(20),
        || {
            let logs = [workers[0].log(), workers[1].log()];
            async move { logs.iter().all(|log| log.contains(OUTAGE_LINE)) }
        },
    )
    .await;
    // Work goes on without the store.
    let during = runs.total();
    eventually(
        "handlers run while Redis is down",
        Duration::from_secs(20),
        || runs.total() >= during + 50,
    )
    .await;
    redis.restart().await;
    let runs_at_restart = runs.total();
    assert!(
        runs_at_restart < 2 * TASKS,
        "the run ended before Redis came back"
    );
    let worker_refs: Vec<&WorkerProcess> = workers.iter().collect();
    let results = collect_results(
        &setup,
        &mut ledger,
        2 * TASKS,
        Duration::from_secs(120),
        &worker_refs,
    )
    .await;
    let per_task = runs.runs();
    let total_runs = runs.total();

    // Recovered: tasks published twice now run once across the fleet.
    eventually_async(
        "both workers notice the recovery",
        Duration::from_secs(20),
        || {
            let logs = [workers[0].log(), workers[1].log()];
            async move { logs.iter().all(|log| log.contains(RECOVERY_LINE)) }
        },
    )
    .await;
    let later = ledger.ids(AFTER);
    let later_tasks = copies(&later, 2);
    publish(&setup, &mut ledger, &later_tasks).await;
    let later_results = collect_results(
        &setup,
        &mut ledger,
        2 * AFTER,
        Duration::from_secs(60),
        &worker_refs,
    )
    .await;
    assert_identical(&bodies(&later_results));
    let later_runs: usize = runs
        .runs()
        .iter()
        .filter(|(id, _)| later.contains(id))
        .map(|(_, n)| n)
        .sum();
    let metrics = http
        .iter()
        .map(|addr| store_metrics(*addr))
        .fold(StoreMetrics::default(), |a, b| a + b);
    let report = assert_ledger(&setup, &mut ledger).await;
    let ran_twice = per_task.values().filter(|n| **n > 1).count();
    println!(
        "[S4 {}] stop at {runs_at_stop} runs, restart at {runs_at_restart}; runs={total_runs} \
         for {TASKS} tasks ({ran_twice} ran twice), results={} duplicates={}; after recovery \
         {later_runs} runs for {AFTER} tasks; {metrics:?}",
        broker_name(),
        report.results_total,
        report.duplicates
    );
    assert_eq!(bodies(&results).len(), TASKS, "every task answered");
    assert_eq!(
        report.results_total,
        2 * (TASKS + AFTER),
        "every copy answered"
    );
    assert!(
        per_task.values().all(|n| (1..=2).contains(n)),
        "one or two runs per task (two copies each)"
    );
    assert!(
        ran_twice <= total_runs - runs_at_stop,
        "only tasks run during the outage ran twice"
    );
    assert!(metrics.errors > 0, "the outage was counted: {metrics:?}");
    assert_eq!(later_runs, AFTER, "once Redis is back, each task runs once");
    for worker in &workers {
        let log = worker.log();
        assert_eq!(count(&log, OUTAGE_LINE), 1, "one outage line; log:\n{log}");
        assert_eq!(
            count(&log, RECOVERY_LINE),
            1,
            "one recovery line; log:\n{log}"
        );
    }
    for mut worker in workers {
        let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
        assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
    }
    drop(keys);
    drop(redis);
    setup.broker.cleanup().await;
}

/// S8: the store's Redis (a private server) is flushed (`FLUSHALL`: results and leases gone)
/// while two replicas work through 600 tasks published twice. Nothing is lost, every copy is
/// answered, no task runs more than twice (once per copy), the flush is no outage (no store
/// errors logged), and tasks published afterwards run once across the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_redis_flushed_mid_run_loses_nothing() {
    const TASKS: usize = 600;
    const AFTER: usize = 100;
    let setup = setup().await;
    let redis = PrivateRedis::start().await;
    let redis_url = redis.url();
    let keys = RedisKeys::on(&redis_url, "s8").await;
    let runs = RunsFile::new();
    let store = Store {
        url: &redis_url,
        prefix: keys.prefix(),
        runs: &runs,
    };
    let extra = [
        ("RMQ_CONSUMER_PREFETCH_COUNT", "4".to_owned()),
        ("FAULT_WORKER_SLEEP_MS", "20".to_owned()),
    ];
    let http = [free_addr(), free_addr()];
    let mut workers = [
        spawn_worker(&setup, &store, http[0], &extra),
        spawn_worker(&setup, &store, http[1], &extra),
    ];
    workers[0]
        .wait_consumers(&setup.broker, &setup.route.queue, 2)
        .await;
    let mut ledger = Ledger::new("S8");
    let ids = ledger.ids(TASKS);
    let tasks = copies(&ids, 2);
    publish(&setup, &mut ledger, &tasks).await;
    eventually("a third of the tasks run", Duration::from_secs(60), || {
        runs.total() >= TASKS / 3
    })
    .await;
    // The private server only: the shared one is never flushed.
    let mut connection = rmq_consumer_tests::redis_connect(&redis_url).await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut connection)
        .await
        .unwrap();
    let runs_at_flush = runs.total();
    assert!(runs_at_flush < TASKS, "the run ended before the flush");
    let worker_refs: Vec<&WorkerProcess> = workers.iter().collect();
    let results = collect_results(
        &setup,
        &mut ledger,
        2 * TASKS,
        Duration::from_secs(120),
        &worker_refs,
    )
    .await;
    let per_task = runs.runs();
    let total_runs = runs.total();
    let later = ledger.ids(AFTER);
    let later_tasks = copies(&later, 2);
    publish(&setup, &mut ledger, &later_tasks).await;
    let later_results = collect_results(
        &setup,
        &mut ledger,
        2 * AFTER,
        Duration::from_secs(60),
        &worker_refs,
    )
    .await;
    assert_identical(&bodies(&later_results));
    let later_runs: usize = runs
        .runs()
        .iter()
        .filter(|(id, _)| later.contains(id))
        .map(|(_, n)| n)
        .sum();
    let metrics = http
        .iter()
        .map(|addr| store_metrics(*addr))
        .fold(StoreMetrics::default(), |a, b| a + b);
    let report = assert_ledger(&setup, &mut ledger).await;
    let ran_twice = per_task.values().filter(|n| **n > 1).count();
    println!(
        "[S8 {}] flush at {runs_at_flush} runs; runs={total_runs} for {TASKS} tasks \
         ({ran_twice} ran twice), results={} duplicates={}; after it {later_runs} runs for \
         {AFTER} tasks; {metrics:?}",
        broker_name(),
        report.results_total,
        report.duplicates
    );
    assert_eq!(bodies(&results).len(), TASKS, "every task answered");
    assert_eq!(
        report.results_total,
        2 * (TASKS + AFTER),
        "every copy answered"
    );
    assert!(
        per_task.values().all(|n| (1..=2).contains(n)),
        "one or two runs per task (two copies each)"
    );
    assert_eq!(later_runs, AFTER, "after the flush, each task runs once");
    assert_eq!(metrics.errors, 0, "a flush is not an outage: {metrics:?}");
    for worker in &workers {
        let log = worker.log();
        assert_eq!(count(&log, OUTAGE_LINE), 0, "log:\n{log}");
    }
    for mut worker in workers {
        let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
        assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
    }
    drop(keys);
    drop(redis);
    setup.broker.cleanup().await;
}

/// S5: the store never answers (a listener that accepts and stays silent). The worker keeps
/// consuming: each call gives up after `result_store_timeout`, every task is answered, the
/// errors are counted on `/metrics` and the outage is logged once; `/readyz` stays ready
/// unless `result_store_required = true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_a_redis_that_never_answers_costs_no_message() {
    const TASKS: usize = 200;
    let setup = setup().await;
    let silent = SilentRedis::start().await;
    let silent_url = silent.url();
    let runs = RunsFile::new();
    let prefix = format!("{}:", unique("s5"));
    let store = Store {
        url: &silent_url,
        prefix: &prefix,
        runs: &runs,
    };
    let http = free_addr();
    let mut worker = spawn_worker(
        &setup,
        &store,
        http,
        &[
            ("RMQ_CONSUMER_PREFETCH_COUNT", "16".to_owned()),
            ("RMQ_CONSUMER_RESULT_STORE_TIMEOUT", "200ms".to_owned()),
            ("RMQ_CONSUMER_RESULT_STORE_LEASE", "1s".to_owned()),
        ],
    );
    worker
        .wait_consumers(&setup.broker, &setup.route.queue, 1)
        .await;
    let mut ledger = Ledger::new("S5");
    let ids = ledger.ids(TASKS);
    let tasks: Vec<Value> = ids.iter().map(|id| task(id, json!({}))).collect();
    publish(&setup, &mut ledger, &tasks).await;
    let results = collect_results(
        &setup,
        &mut ledger,
        TASKS,
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    let text = http_get(http, "/metrics");
    let metrics = store_metrics(http);
    let report = assert_ledger(&setup, &mut ledger).await;
    println!(
        "[S5 {}] runs={} results={} duplicates={}; {metrics:?}",
        broker_name(),
        runs.total(),
        report.results_total,
        report.duplicates
    );
    assert_eq!(bodies(&results).len(), TASKS);
    assert_eq!(runs.total(), TASKS, "each task ran (once: one copy each)");
    assert!(metrics.errors > 0, "store errors counted: {metrics:?}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("rmq_consumer_store_up") && l.ends_with(" 0")),
        "the store reported down:\n{text}"
    );
    let log = worker.log();
    assert_eq!(count(&log, OUTAGE_LINE), 1, "one outage line; log:\n{log}");
    assert_eq!(
        http_status(http, "/readyz"),
        200,
        "a store that is down does not make the worker unready"
    );
    // With `result_store_required`, it does.
    let required_http = free_addr();
    let mut required = spawn_worker(
        &setup,
        &store,
        required_http,
        &[
            ("RMQ_CONSUMER_RESULT_STORE_TIMEOUT", "200ms".to_owned()),
            ("RMQ_CONSUMER_RESULT_STORE_LEASE", "1s".to_owned()),
            ("RMQ_CONSUMER_RESULT_STORE_REQUIRED", "true".to_owned()),
        ],
    );
    required
        .wait_consumers(&setup.broker, &setup.route.queue, 2)
        .await;
    eventually(
        "a worker that requires the store is not ready while it is down",
        Duration::from_secs(20),
        || http_status(required_http, "/readyz") == 503,
    )
    .await;
    assert_eq!(http_status(http, "/readyz"), 200);
    let (status, _) = required.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", required.log());
    let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
    setup.broker.cleanup().await;
}

/// What one run of the CLI binary printed.
struct CliRun {
    code: i32,
    out: String,
    err: String,
}

/// Runs the `embedded-cli` binary (the operator CLI, as a process) with `env` set.
fn cli(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let dir = std::env::temp_dir().join(unique("cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_embedded-cli"));
    for (name, _) in std::env::vars() {
        if name.starts_with("RMQ_CONSUMER_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    let output = command
        .current_dir(&dir)
        .args(args)
        .env("RMQ_CONSUMER_URL", broker_url())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    CliRun {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// S6: `cache get` and `cache forget` through the CLI binary against a real stored result
/// (exit 0 stored, 1 nothing stored, 2 store failure or no store), a forgotten task runs
/// again; and the Redis password never appears in the worker's log, `check-config` or the
/// CLI's errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_cache_cli_and_password_masking() {
    const PASSWORD: &str = "s6-redis-secret-Pw";
    let setup = setup().await;
    let redis = PrivateRedis::start_with(Some(PASSWORD), None).await;
    let url = redis.url();
    assert!(url.contains(PASSWORD));
    let keys = RedisKeys::on(&url, "s6").await;
    let runs = RunsFile::new();
    let store = Store {
        url: &url,
        prefix: keys.prefix(),
        runs: &runs,
    };
    let mut worker = spawn_worker(&setup, &store, free_addr(), &[]);
    worker
        .wait_consumers(&setup.broker, &setup.route.queue, 1)
        .await;
    let mut ledger = Ledger::new("S6");
    let id = ledger.ids(1).remove(0);
    let one = [task(&id, json!({}))];
    publish(&setup, &mut ledger, &one).await;
    let first = collect_results(&setup, &mut ledger, 1, Duration::from_secs(30), &[&worker]).await;
    let env = [
        ("RMQ_CONSUMER_RESULT_STORE", url.as_str()),
        ("RMQ_CONSUMER_RESULT_STORE_PREFIX", keys.prefix()),
    ];

    // get: the stored result, exit 0.
    let got = cli(&["cache", "get", "--handler", "work", &id, "--json"], &env);
    assert_eq!(got.code, 0, "stdout:\n{}\nstderr:\n{}", got.out, got.err);
    let report: Value = serde_json::from_str(&got.out).unwrap();
    assert_eq!(report["stored"], true, "{report}");
    assert_eq!(
        report["result"],
        first[0].json.clone().unwrap(),
        "the published result"
    );
    let plain = cli(&["cache", "get", "--handler", "work", &id], &env);
    assert_eq!(plain.code, 0, "{}\n{}", plain.out, plain.err);
    assert!(plain.out.contains(&id), "{}", plain.out);
    // Nothing stored for another uuid or another handler: exit 1.
    let missing = cli(&["cache", "get", "--handler", "work", "no-such-task"], &env);
    assert_eq!(missing.code, 1, "{}\n{}", missing.out, missing.err);
    let other = cli(&["cache", "get", "--handler", "other", &id], &env);
    assert_eq!(other.code, 1, "{}\n{}", other.out, other.err);

    // forget: exit 0; then nothing is stored, and the next delivery runs the handler again.
    let forgot = cli(&["cache", "forget", "--handler", "work", &id], &env);
    assert_eq!(forgot.code, 0, "{}\n{}", forgot.out, forgot.err);
    let gone = cli(&["cache", "get", "--handler", "work", &id], &env);
    assert_eq!(gone.code, 1, "{}\n{}", gone.out, gone.err);
    assert!(keys.keys().await.is_empty(), "forget deletes the keys");
    // A replica that did not run it (an empty local LRU; the one that ran it may still answer
    // from its LRU) runs it again.
    let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
    let first_log = worker.log();
    let mut worker = spawn_worker(&setup, &store, free_addr(), &[]);
    worker
        .wait_consumers(&setup.broker, &setup.route.queue, 1)
        .await;
    publish(&setup, &mut ledger, &one).await;
    collect_results(&setup, &mut ledger, 1, Duration::from_secs(30), &[&worker]).await;
    assert_eq!(runs.total(), 2, "a forgotten task runs again");

    // The store failing: exit 2 (a wrong password, and a store that is not there); no
    // store configured: exit 2. The password never shows.
    let wrong_password = url.replace(PASSWORD, "wrong-Pw-s6");
    let refused = cli(
        &["cache", "get", "--handler", "work", &id],
        &[("RMQ_CONSUMER_RESULT_STORE", &wrong_password)],
    );
    assert_eq!(refused.code, 2, "{}\n{}", refused.out, refused.err);
    assert!(!refused.err.contains("wrong-Pw-s6"), "{}", refused.err);
    let down_url = format!("redis://:{PASSWORD}@127.0.0.1:1/0");
    let down = cli(
        &["cache", "forget", "--handler", "work", &id],
        &[("RMQ_CONSUMER_RESULT_STORE", &down_url)],
    );
    assert_eq!(down.code, 2, "{}\n{}", down.out, down.err);
    let unset = cli(&["cache", "get", "--handler", "work", &id], &[]);
    assert_eq!(unset.code, 2, "{}\n{}", unset.out, unset.err);

    let checked = cli(&["check-config"], &env);
    let checked_json = cli(&["check-config", "--json"], &env);
    for (what, text) in [
        ("cache get", format!("{}{}", got.out, got.err)),
        ("cache get (plain)", format!("{}{}", plain.out, plain.err)),
        ("cache forget", format!("{}{}", forgot.out, forgot.err)),
        ("store down", format!("{}{}", down.out, down.err)),
        ("check-config", format!("{}{}", checked.out, checked.err)),
        (
            "check-config --json",
            format!("{}{}", checked_json.out, checked_json.err),
        ),
        ("first worker's log", first_log.clone()),
        ("worker log", worker.log()),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "{what} shows the password:\n{text}"
        );
    }
    assert!(
        checked.out.contains("127.0.0.1") || checked_json.out.contains("127.0.0.1"),
        "check-config shows the store (masked):\n{}\n{}",
        checked.out,
        checked_json.out
    );
    assert!(
        worker.log().contains("using the shared result store"),
        "the worker logs its store (masked):\n{}",
        worker.log()
    );
    let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());

    // A worker whose store refuses it (a wrong password) answers anyway, and its log of the
    // refusal is masked too.
    let runs_wrong = RunsFile::new();
    let wrong_store = Store {
        url: &wrong_password,
        prefix: keys.prefix(),
        runs: &runs_wrong,
    };
    let mut refused_worker = spawn_worker(&setup, &wrong_store, free_addr(), &[]);
    refused_worker
        .wait_consumers(&setup.broker, &setup.route.queue, 1)
        .await;
    let two = [task(&format!("{id}-2"), json!({}))];
    publish(&setup, &mut ledger, &two).await;
    publish(&setup, &mut ledger, &two).await;
    collect_results(
        &setup,
        &mut ledger,
        2,
        Duration::from_secs(30),
        &[&refused_worker],
    )
    .await;
    let (status, _) = refused_worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0));
    let log = refused_worker.log();
    assert!(log.contains(OUTAGE_LINE), "the refusal is logged:\n{log}");
    assert!(!log.contains("wrong-Pw-s6"), "worker log:\n{log}");
    assert_ledger(&setup, &mut ledger).await;
    drop(keys);
    setup.broker.cleanup().await;
}

/// S7: `rediss://`: a private redis-server with TLS only (the test PKI), the worker trusting
/// the test CA through the `tls_*` settings it shares with the broker connection. Tasks
/// published twice run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_rediss_with_the_test_ca() {
    const TASKS: usize = 20;
    let setup = setup().await;
    let redis = PrivateRedis::start_with(
        None,
        Some(RedisTls {
            cert: pki("server.pem"),
            key: pki("server.key"),
            ca: pki("ca.pem"),
        }),
    )
    .await;
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    let runs = RunsFile::new();
    let prefix = format!("{}:", unique("s7"));
    let store = Store {
        url: &url,
        prefix: &prefix,
        runs: &runs,
    };
    let http = free_addr();
    let mut worker = spawn_worker(
        &setup,
        &store,
        http,
        &[("RMQ_CONSUMER_TLS_CA_FILE", pki("ca.pem"))],
    );
    worker
        .wait_consumers(&setup.broker, &setup.route.queue, 1)
        .await;
    let mut ledger = Ledger::new("S7");
    let ids = ledger.ids(TASKS);
    let tasks = copies(&ids, 2);
    publish(&setup, &mut ledger, &tasks).await;
    let results = collect_results(
        &setup,
        &mut ledger,
        2 * TASKS,
        Duration::from_secs(30),
        &[&worker],
    )
    .await;
    assert_identical(&bodies(&results));
    let metrics = store_metrics(http);
    let report = assert_ledger(&setup, &mut ledger).await;
    println!(
        "[S7 {}] runs={} results={} duplicates={}; {metrics:?}",
        broker_name(),
        runs.total(),
        report.results_total,
        report.duplicates
    );
    assert_eq!(metrics.errors, 0, "TLS store works: {metrics:?}");
    assert_eq!(runs.total(), TASKS, "once per task");
    let log = worker.log();
    assert!(!log.contains(OUTAGE_LINE), "log:\n{log}");
    let (status, _) = worker.terminate(SHUTDOWN_TIMEOUT * 2).await;
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    setup.broker.cleanup().await;
}

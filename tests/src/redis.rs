//! Redis for the shared result store tests (`tests/tests/shared_store.rs`): the machine's
//! Redis on 127.0.0.1:6379 (`tests/scripts/redis.sh start`), a key guard that removes a test's
//! keys, a private `redis-server` a test may stop and start, and a listener that never answers.
//!
//! - [`redis_url`]: the shared Redis (`$RMQ_TEST_REDIS_URL`, default
//!   `redis://127.0.0.1:6379/0`); [`redis_connect`] fails loudly when nothing answers there.
//! - [`RedisKeys`]: a unique key prefix for one test; every key under it is deleted when the
//!   guard drops, also when the test panics. Never `FLUSHALL`/`FLUSHDB`: other helpers and
//!   tests share the server.
//! - [`PrivateRedis`]: a `redis-server` of the test's own on a free port (optionally with a
//!   password or TLS), for the outage tests: stop it and start it again on the same port. The
//!   shared server on 6379 is never stopped.
//! - [`SilentRedis`]: a TCP listener that accepts connections and never answers, the "Redis
//!   slow" case.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

use crate::env::unique;

/// The shared Redis of the machine (`tests/scripts/redis.sh`).
pub const SHARED_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// The shared Redis the tests use: `$RMQ_TEST_REDIS_URL`, else [`SHARED_REDIS_URL`].
pub fn redis_url() -> String {
    std::env::var("RMQ_TEST_REDIS_URL").unwrap_or_else(|_| SHARED_REDIS_URL.to_owned())
}

/// An async connection to the Redis at `url`; panics with how to start it when it does not
/// answer within 5 s.
pub async fn redis_connect(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url)
        .unwrap_or_else(|e| panic!("bad Redis URL for the tests ({}): {e}", masked(url)));
    let connect = client.get_multiplexed_async_connection();
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(mut connection)) => {
            let pong: redis::RedisResult<String> =
                redis::cmd("PING").query_async(&mut connection).await;
            match pong {
                Ok(_) => connection,
                Err(e) => panic!("Redis at {} does not answer PING: {e}", masked(url)),
            }
        }
        Ok(Err(e)) => panic!(
            "these tests need a running Redis at {} (tests/scripts/redis.sh start): {e}",
            masked(url)
        ),
        Err(_) => panic!(
            "these tests need a running Redis at {} (tests/scripts/redis.sh start): no \
             connection within 5 s",
            masked(url)
        ),
    }
}

/// `url` with its password replaced by `***`, for panic messages.
fn masked(url: &str) -> String {
    rmq_consumer::config::SecretUrl::new(url).to_string()
}

/// A test's own key prefix in a Redis; every key under it is deleted on drop (also when the
/// test panics). Give its [`RedisKeys::prefix`] to the workers as `result_store_prefix`.
#[derive(Debug)]
pub struct RedisKeys {
    url: String,
    prefix: String,
}

impl RedisKeys {
    /// A fresh prefix (`test.<name>.<pid>.<n>.<nanos>:`) in the shared Redis
    /// ([`redis_url`]); fails loudly when Redis is missing.
    pub async fn new(name: &str) -> Self {
        Self::on(&redis_url(), name).await
    }

    /// Like [`RedisKeys::new`], in the Redis at `url` (a [`PrivateRedis`]).
    pub async fn on(url: &str, name: &str) -> Self {
        drop(redis_connect(url).await);
        Self {
            url: url.to_owned(),
            prefix: format!("{}:", unique(name)),
        }
    }

    /// The prefix, ending in `:`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every key under the prefix now.
    pub async fn keys(&self) -> Vec<String> {
        let mut connection = redis_connect(&self.url).await;
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = scan(&self.prefix, cursor)
                .query_async(&mut connection)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }

    /// The task keys under the prefix that hold a stored result (a value that is not a
    /// lease).
    pub async fn results(&self) -> Vec<String> {
        self.keys_holding(false).await
    }

    /// The task keys under the prefix that hold a lease (a value starting with `lease:`).
    pub async fn leases(&self) -> Vec<String> {
        self.keys_holding(true).await
    }

    /// The keys under the prefix whose value is (`lease`) or is not a lease; a key gone
    /// between the scan and its read counts as neither.
    async fn keys_holding(&self, lease: bool) -> Vec<String> {
        let keys = self.keys().await;
        let mut connection = redis_connect(&self.url).await;
        let mut found = Vec::new();
        for chunk in keys.chunks(500) {
            let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(chunk)
                .query_async(&mut connection)
                .await
                .unwrap();
            for (key, value) in chunk.iter().zip(values) {
                if value.is_some_and(|value| value.starts_with(b"lease:") == lease) {
                    found.push(key.clone());
                }
            }
        }
        found
    }

    /// The string value of `key` (a full key, prefix included), `None` when it is missing.
    pub async fn get(&self, key: &str) -> Option<String> {
        let mut connection = redis_connect(&self.url).await;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap()
    }

    /// The time to live of `key` in milliseconds (`PTTL`: -2 missing, -1 no expiry).
    pub async fn pttl(&self, key: &str) -> i64 {
        let mut connection = redis_connect(&self.url).await;
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap()
    }

    /// Deletes every key under the prefix; returns how many there were.
    pub async fn clear(&self) -> usize {
        let keys = self.keys().await;
        if keys.is_empty() {
            return 0;
        }
        let mut connection = redis_connect(&self.url).await;
        for chunk in keys.chunks(500) {
            let _: usize = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
        keys.len()
    }

    /// Deletes every key under the prefix with a blocking connection (for `Drop`).
    fn clear_blocking(&self) -> redis::RedisResult<()> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        connection.set_read_timeout(Some(Duration::from_secs(5)))?;
        connection.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) =
                scan(&self.prefix, cursor).query(&mut connection)?;
            if !batch.is_empty() {
                let _: usize = redis::cmd("DEL").arg(&batch).query(&mut connection)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

impl Drop for RedisKeys {
    /// Deletes the test's keys; a Redis that is gone (a stopped [`PrivateRedis`]) has none
    /// left to delete.
    fn drop(&mut self) {
        if let Err(e) = self.clear_blocking() {
            eprintln!(
                "[redis] could not delete the keys under {} in {}: {e}",
                self.prefix,
                masked(&self.url)
            );
        }
    }
}

/// TLS files for a [`PrivateRedis`] that listens with TLS only.
#[derive(Debug, Clone)]
pub struct RedisTls {
    /// The server's certificate (PEM).
    pub cert: String,
    /// The server's private key (PEM).
    pub key: String,
    /// The CA that signs client certificates (PEM).
    pub ca: String,
}

/// A `redis-server` of the test's own on a free port of 127.0.0.1, in memory only; stopped
/// (SIGKILL) when dropped. Never the shared server on 6379.
#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    password: Option<String>,
    tls: Option<RedisTls>,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server on a free port and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None, None).await
    }

    /// Starts a server that requires `password` (`requirepass`) and/or listens with TLS only
    /// (`--tls-port`, client certificates optional).
    pub async fn start_with(password: Option<&str>, tls: Option<RedisTls>) -> Self {
        let dir = std::env::temp_dir().join(unique("redis"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port: free_port(),
            password: password.map(str::to_owned),
            tls,
            dir,
            child: None,
        };
        server.up().await;
        server
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL (`redis://` or `rediss://localhost` with TLS, the password in it when set).
    pub fn url(&self) -> String {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        if self.tls.is_some() {
            format!("rediss://{auth}localhost:{}/0", self.port)
        } else {
            format!("redis://{auth}127.0.0.1:{}/0", self.port)
        }
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Whether the server process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Stops the server (SIGKILL, as a crash: nothing is saved) and waits for its exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again on the same port (empty: it keeps nothing).
    pub async fn restart(&mut self) {
        self.stop();
        self.up().await;
    }

    /// Spawns the server and waits until its port accepts connections.
    async fn up(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .unwrap();
        let mut command = Command::new("redis-server");
        command.args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]);
        command.arg("--dir").arg(&self.dir);
        match &self.tls {
            None => {
                command.args(["--port", &self.port.to_string()]);
            }
            Some(tls) => {
                command.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &self.port.to_string(),
                    "--tls-cert-file",
                    &tls.cert,
                    "--tls-key-file",
                    &tls.key,
                    "--tls-ca-cert-file",
                    &tls.ca,
                    "--tls-auth-clients",
                    "optional",
                ]);
            }
        }
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server (tests/scripts/redis.sh start installs it): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                self.running() && Instant::now() < deadline,
                "the private redis-server on port {} did not come up; its log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A listener on a free port of 127.0.0.1 that accepts connections and never answers (nor
/// closes them): a Redis that hangs. Stops when dropped.
#[derive(Debug)]
pub struct SilentRedis {
    port: u16,
    task: JoinHandle<()>,
}

impl SilentRedis {
    /// Starts listening.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Self { port, task }
    }

    /// Its `redis://` URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for SilentRedis {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port of 127.0.0.1 nothing listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// One `SCAN` step over the keys under `prefix`, from `cursor`.
fn scan(prefix: &str, cursor: u64) -> redis::Cmd {
    let mut command = redis::cmd("SCAN");
    command
        .arg(cursor)
        .arg("MATCH")
        .arg(format!("{prefix}*"))
        .arg("COUNT")
        .arg(1000);
    command
}

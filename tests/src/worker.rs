//! A worker process: the `fault-worker` binary (`tests/src/bin/fault-worker.rs`) or the
//! `batch-worker` binary (`tests/src/bin/batch-worker.rs`), configured with `RMQ_CONSUMER_*`
//! variables like a deployed worker, which a test can SIGTERM or kill.

use std::{
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{broker::Broker, env::unique, route::Route};

/// A running worker process; killed if the test drops it, its log kept when the test fails.
#[derive(Debug)]
pub struct WorkerProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts `binary` (a test passes `env!("CARGO_BIN_EXE_fault-worker")` or
    /// `env!("CARGO_BIN_EXE_batch-worker")`, which only test binaries know) as a worker for
    /// `route`'s `work` handler on `url`, with `env` on top of the defaults (retry interval
    /// 500 ms, human logs at info, 5 ms of work per task).
    pub fn spawn(
        binary: &str,
        url: &str,
        exchange: &str,
        route: &Route,
        env: &[(&str, String)],
    ) -> Self {
        let dir = std::env::temp_dir().join(unique("worker"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("worker.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut command = tokio::process::Command::new(binary);
        for (name, _) in std::env::vars() {
            if name.starts_with("RMQ_CONSUMER_") || name == "RUST_LOG" {
                command.env_remove(name);
            }
        }
        command
            // No stray `rmq-consumer.toml` is picked up from an empty working directory.
            .current_dir(&dir)
            .env("RMQ_CONSUMER_URL", url)
            .env("RMQ_CONSUMER_EXCHANGE", exchange)
            .env("RMQ_CONSUMER_RETRY_CONNECT_INTERVAL", "500ms")
            .env("RMQ_CONSUMER_LOG_LEVEL", "info")
            .env("RMQ_CONSUMER_LOG_FORMAT", "human")
            .env("RMQ_CONSUMER_CONSUMERS__WORK__QUEUE", &route.queue)
            .env("RMQ_CONSUMER_CONSUMERS__WORK__REPLY_KEY", &route.reply_key)
            .env(
                "RMQ_CONSUMER_CONSUMERS__WORK__REPLY_QUEUE",
                &route.reply_queue,
            )
            .env("FAULT_WORKER_SLEEP_MS", "5")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the worker binary {binary}: {e}"));
        Self { child, log }
    }

    /// The process id (the process must be running).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the worker is running")
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`-TERM`, `-INT`, ...).
    pub fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .args([name, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {name} failed");
    }

    /// Sends SIGTERM and waits for the exit, at most `within`; returns how long it took.
    pub async fn terminate(&mut self, within: Duration) -> (ExitStatus, Duration) {
        self.signal("-TERM");
        let start = Instant::now();
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the worker did not exit within {within:?} of SIGTERM; its log:\n{}",
                    self.log()
                )
            })
            .unwrap();
        (status, start.elapsed())
    }

    /// Sends SIGKILL and reaps the process (a `kill -9`).
    pub async fn kill9(&mut self) -> ExitStatus {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap()
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        self.child.wait().await.unwrap()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits until `queue` has at least `count` consumers, failing with the worker's log.
    pub async fn wait_consumers(&mut self, broker: &Broker, queue: &str, count: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while broker.consumers(queue).await.unwrap_or(0) < count {
            let exited = self.exited();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{queue} never had {count} consumer(s) (worker exit: {exited:?}); its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for WorkerProcess {
    /// The process is killed by `kill_on_drop`; its log is kept only when the test failed.
    fn drop(&mut self) {
        if !std::thread::panicking()
            && let Some(dir) = self.log.parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

//! `rabbitmqctl` on the test broker's node, and guards that restore what a fault test changed
//! on the broker when they drop, also when the test panics.

use std::time::Duration;

use crate::{
    broker::Broker,
    env::{TestBroker, broker_name, test_broker},
};

/// Runs `rabbitmqctl` against the test broker's node (async: the engine under test keeps
/// running meanwhile); panics with its output when it fails.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let broker = test_broker();
    run_rabbitmqctl(broker.rabbitmqctl(), broker.rabbitmqctl_hint(), args).await
}

/// Runs the host's `rabbitmqctl` (3.10) whatever the test broker, e.g. with `-n <node>` for
/// the nodes of `tests/scripts/cluster.sh`; panics with its output when it fails.
pub async fn host_rabbitmqctl(args: &[&str]) -> String {
    let broker = TestBroker::Rabbit3;
    run_rabbitmqctl(broker.rabbitmqctl(), broker.rabbitmqctl_hint(), args).await
}

async fn run_rabbitmqctl(command: std::process::Command, hint: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::from(command)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{hint}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} ({}) failed: {}\n{stdout}\n{}",
        broker_name(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The same, blocking: for `Drop` guards, which must restore the broker even when a test
/// panics.
pub fn rabbitmqctl_blocking(args: &[&str]) -> Result<String, String> {
    let output = test_broker()
        .rabbitmqctl()
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The broker's connections (their `pid`s, for `rabbitmqctl close_connection`) whose
/// client-provided `connection_name` is exactly `name`: an engine names its connection
/// `rmq-consumer[<handlers>] pid <process id>`, so a test reaches one worker's connection
/// without disturbing the other clients of a shared broker (as `close_all_connections`
/// would).
pub async fn connections_named(name: &str) -> Vec<String> {
    // The table output, one connection a line: its pid as `close_connection` takes it
    // (`<rabbit@host.N.N.N>`; the JSON formatter prints `#PID<...>`, which it refuses), a
    // tab, its properties, among them `{"connection_name","<name>"}`.
    let listing = rabbitmqctl(&["list_connections", "-s", "pid", "client_properties"]).await;
    let quoted = format!("\"{name}\"");
    listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, properties)| properties.contains(&quoted))
        .map(|(pid, _)| pid.trim().to_owned())
        .collect()
}

/// Closes every connection named `name` (see [`connections_named`]) with `rabbitmqctl
/// close_connection`, as an operator or the broker does; returns how many it closed.
pub async fn close_connections_named(name: &str, reason: &str) -> usize {
    let pids = connections_named(name).await;
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, reason]).await;
    }
    pids.len()
}

/// A broker policy that is cleared when the guard is dropped, whatever happens to the test.
#[derive(Debug)]
pub struct PolicyGuard {
    name: String,
    cleared: bool,
}

impl PolicyGuard {
    /// `rabbitmqctl set_policy <name> <pattern> <definition> --apply-to queues`.
    pub async fn set(name: &str, pattern: &str, definition: &str) -> Self {
        let guard = Self {
            name: name.to_owned(),
            cleared: false,
        };
        rabbitmqctl(&[
            "set_policy",
            name,
            pattern,
            definition,
            "--apply-to",
            "queues",
        ])
        .await;
        guard
    }

    /// Clears the policy now (`rabbitmqctl clear_policy`), panicking when that fails.
    pub async fn clear(mut self) {
        rabbitmqctl(&["clear_policy", &self.name]).await;
        self.cleared = true;
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        if !self.cleared
            && let Err(e) = rabbitmqctl_blocking(&["clear_policy", &self.name])
        {
            eprintln!("could not clear policy {}: {e}", self.name);
        }
    }
}

/// A stopped broker application (`rabbitmqctl stop_app`) that is started again when the
/// guard is dropped, whatever happens to the test.
#[derive(Debug)]
pub struct StoppedApp {
    started: bool,
}

impl StoppedApp {
    /// `rabbitmqctl stop_app`: every client loses its connection and cannot reconnect.
    pub async fn stop() -> Self {
        let guard = Self { started: false };
        rabbitmqctl(&["stop_app"]).await;
        guard
    }

    /// `rabbitmqctl start_app`, then waits until the broker accepts connections.
    pub async fn start(mut self) {
        rabbitmqctl(&["start_app"]).await;
        self.started = true;
        let _ = Broker::connect_patiently(Duration::from_secs(60)).await;
    }
}

impl Drop for StoppedApp {
    fn drop(&mut self) {
        if !self.started {
            eprintln!("restarting the broker application (rabbitmqctl start_app)");
            if let Err(e) = rabbitmqctl_blocking(&["start_app"]) {
                eprintln!("rabbitmqctl start_app FAILED, start the broker by hand: {e}");
            }
        }
    }
}

/// A memory alarm (`set_vm_memory_high_watermark 0`): the broker blocks every publishing
/// connection. The watermark goes back to 0.4 when the guard drops, also when the test fails.
#[derive(Debug)]
pub struct MemoryAlarm;

impl MemoryAlarm {
    /// Raises the alarm.
    pub async fn raise() -> Self {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]).await;
        Self
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl_blocking(&["set_vm_memory_high_watermark", "0.4"]) {
            eprintln!(
                "could not restore the memory watermark, run `rabbitmqctl set_vm_memory_high_watermark 0.4`: {e}"
            );
        }
    }
}

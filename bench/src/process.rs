//! The parent's handle on a measured child process: this binary re-executed with
//! [`CHILD_ARG`] and a [`Spec`], read for its ready line and its [`Report`].

use std::time::Duration;

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};

use crate::{
    error::{BoxError, Res},
    protocol::{CHILD_ARG, READY_LINE, REPORT_PREFIX, Report, Spec},
};

/// A child process running one measured consumer.
pub(crate) struct Child {
    pub(crate) process: tokio::process::Child,
    events: mpsc::UnboundedReceiver<Event>,
}

enum Event {
    Ready,
    Report(Report),
}

impl Child {
    pub(crate) fn spawn(spec: &Spec, url: &str) -> Res<Self> {
        let exe = std::env::current_exe()?;
        // `BENCH_WRAP="valgrind --tool=callgrind"` runs each child under a profiler.
        let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
        let mut command = match wrap.split_whitespace().collect::<Vec<_>>().split_first() {
            Some((program, args)) => {
                let mut command = tokio::process::Command::new(program);
                command.args(args).arg(exe);
                command
            }
            None => tokio::process::Command::new(exe),
        };
        let mut process = command
            .arg(CHILD_ARG)
            .arg(serde_json::to_string(spec)?)
            .env("RMQ_CONSUMER_URL", url)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = process.stdout.take().ok_or("the child has no stdout")?;
        let (events, receiver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line == READY_LINE {
                    let _ = events.send(Event::Ready);
                } else if let Some(json) = line.strip_prefix(REPORT_PREFIX) {
                    match serde_json::from_str(json) {
                        Ok(report) => {
                            let _ = events.send(Event::Report(report));
                        }
                        Err(error) => eprintln!("  child: bad report `{json}`: {error}"),
                    }
                } else {
                    eprintln!("  child: {line}");
                }
            }
        });
        Ok(Self {
            process,
            events: receiver,
        })
    }

    pub(crate) async fn ready(&mut self, timeout: Duration) -> Res<()> {
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Ok(Some(Event::Ready)) => Ok(()),
            Ok(Some(Event::Report(_))) => Err("the child ended before it was ready".into()),
            Ok(None) => Err(self.failure().await),
            Err(_) => Err("the child did not start consuming".into()),
        }
    }

    pub(crate) async fn report(&mut self, timeout: Duration) -> Res<Report> {
        loop {
            match tokio::time::timeout(timeout, self.events.recv()).await {
                Ok(Some(Event::Ready)) => {}
                Ok(Some(Event::Report(report))) => {
                    let status = self.process.wait().await?;
                    if !status.success() {
                        return Err(format!("the child exited with {status}").into());
                    }
                    return Ok(report);
                }
                Ok(None) => return Err(self.failure().await),
                Err(_) => {
                    let _ = self.process.kill().await;
                    return Err("the child timed out".into());
                }
            }
        }
    }

    async fn failure(&mut self) -> BoxError {
        match self.process.wait().await {
            Ok(status) => format!("the child exited without a report ({status})").into(),
            Err(error) => error.into(),
        }
    }
}

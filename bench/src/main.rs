//! Throughput, latency and memory of the framework next to a hand-written lapin consumer,
//! measured in one run against the local broker.
//!
//! Run it with `cargo run --release -p bench` (every scenario, about nine minutes), or pick
//! scenarios and sizes: `-- S1 S2 --quick --runs 1`. Scenarios: `S1` drain-ack, `S2`
//! request-result, `S3` io-bound (a timerfd wait, plus a row with `tokio::time::sleep` for
//! comparison), `L` latency, `M` memory, `H` hostile bodies (peak RSS receiving
//! `[{"":0},...]` at the default limits, and without the memory budget), `B` batch handlers
//! in front of a simulated model (framework only: throughput at batch 1, 8 and 32 against the
//! ideal, and latency at a steady rate). `R`, only when named, measures S2 with the shared
//! result store (Redis, `$BENCH_REDIS_URL` or `redis://127.0.0.1:6379/0`) beside without it and
//! raw lapin, and a run with every task published twice. The broker is `$RMQ_CONSUMER_URL` or
//! `amqp://guest:guest@127.0.0.1:5672/%2f`.
//!
//! Each measurement drains a fresh, prefilled, durable queue in a child process (this binary
//! re-executed), so CPU time (`/proc/self/stat`) and peak RSS (`VmHWM`) belong to that consumer
//! alone. The framework and the raw consumer alternate on identical queues; each cell is the
//! median of `--runs` runs (default 9 at prefetch 64 and 256, 1 for the slow prefetch-4 drains;
//! an explicit `--runs N` applies to every cell). Throughput is counted from the first delivery
//! to the last ack.
//!
//! For profiling: `--only framework|raw` and `--prefetch N` narrow the run, and
//! `BENCH_WRAP="valgrind --tool=callgrind"` starts each measured child under that command.
//!
//! The modules, in layers (each uses only those above it in this list):
//!
//! - shared by both processes: [`error`] (the one error type), [`protocol`] (what the parent
//!   and a child exchange: the [`Spec`](protocol::Spec), the [`Report`](protocol::Report), the
//!   task and result bodies), [`numbers`] (medians, number formats, verdicts), [`procfs`] (CPU
//!   time and RSS from `/proc`), [`args`] (the command line);
//! - the measured child: [`probe`] (what its consumers share: the waits and the records its
//!   report is built from), [`model`] (B's simulated model and its handlers), [`raw`] (the
//!   hand-written lapin consumer), [`child`](mod@child) (the child's entry: the framework's
//!   consumer and its handlers);
//! - the parent: [`process`] (its handle on a child), [`bodies`] (what it publishes),
//!   [`measure`] (its broker connection: prefills, runs a child, measures latency), then the
//!   scenarios [`batching`] (B) and [`store`] (R), [`scenarios`] (S1 S2 S3 L M H, and B and R
//!   when asked), and [`report`] (the tables);
//! - this file wires them: the child's entry or the parent's run.

mod args;
mod batching;
mod bodies;
mod child;
mod error;
mod measure;
mod model;
mod numbers;
mod probe;
mod process;
mod procfs;
mod protocol;
mod raw;
mod report;
mod scenarios;
mod store;

use std::time::Instant;

use rmq_consumer::config::SecretUrl;

use crate::{
    args::parse_args,
    child::child,
    error::Res,
    measure::Bench,
    procfs::load_average,
    protocol::{CHILD_ARG, DEFAULT_URL},
    report::print_outcome,
    scenarios::run_all,
};

/// Runs the scenarios `args` pick and prints their tables.
async fn parent(args: &[String]) -> Res<()> {
    let args = parse_args(args)?;
    let url = std::env::var("RMQ_CONSUMER_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let started = Instant::now();
    eprintln!(
        "bench against {} ({} CPUs), scenarios {}",
        SecretUrl::new(url.clone()),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        args.scenarios.join(" ")
    );
    let load_before = load_average();
    let mut bench = Bench::connect(url).await?;
    // Ctrl-C stops the measurement (children die with their handles) but not the cleanup.
    let outcome = tokio::select! {
        outcome = run_all(&mut bench, &args) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    let load_after = load_average();
    let cleaned = bench.cleanup().await;
    let outcome = outcome?;
    cleaned?;
    print_outcome(&outcome, &args, started.elapsed());
    println!("load average (1 min) before {load_before}, after {load_after}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(CHILD_ARG) => child(args.get(1).map_or("", String::as_str)).await,
        _ => parent(&args).await,
    }
}

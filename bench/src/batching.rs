//! Scenario B: batch handlers in front of a simulated model ([`crate::model`]), framework only.
//!
//! Throughput drains a prefilled queue at `batch = 1` (a normal one-message handler,
//! concurrency 1), 8 and 32 (concurrency 1, prefetch `2 × batch`: the next batch fills while
//! one runs), each result published with confirms; each is set against its ideal, `batch /
//! (20 ms + 0.3 ms × batch)`. Latency publishes a steady rate to a `batch = 32, batch_wait =
//! 15ms` handler and times request → result at the result queue.

use crate::{
    args::Args,
    error::Res,
    measure::{Bench, Latency},
    model::{forward_cost, ideal_rate},
    numbers::{median, thousands, verdict},
    protocol::{Imp, Passes, Report, Work},
};

/// The batch sizes measured; the first is the one-message handler.
const SIZES: [u16; 3] = [1, 8, 32];
/// `batch_wait` of the batch handlers, in ms.
const WAIT_MS: u16 = 15;
/// The latency run's batch size.
const LATENCY_BATCH: u16 = 32;
/// Slack the p99 target allows on top of one full forward pass and `batch_wait`.
const LATENCY_SLACK_MS: f64 = 10.0;

/// One throughput row of B.
pub(crate) struct BatchRow {
    pub(crate) batch: u16,
    pub(crate) tasks: u64,
    pub(crate) prefetch: u16,
    pub(crate) runs: usize,
    /// Medians of the runs.
    pub(crate) rate: f64,
    pub(crate) cpu_per_10k: f64,
    pub(crate) rss_mib: f64,
    pub(crate) mean_batch: f64,
    pub(crate) busy: f64,
    pub(crate) overshoot_ms: f64,
}

impl BatchRow {
    fn ideal(&self) -> f64 {
        ideal_rate(self.batch)
    }
}

/// What B measured.
pub(crate) struct BatchOutcome {
    pub(crate) rows: Vec<BatchRow>,
    /// `(rate, secs, result)` of the latency run.
    pub(crate) latency: (u64, u64, Latency),
}

/// The work of a cell: the one-message handler at 1, the batch handler above.
fn work(batch: u16) -> Work {
    if batch <= 1 {
        Work::Model
    } else {
        Work::Batch {
            size: batch,
            wait_ms: WAIT_MS,
        }
    }
}

fn medians(reports: &[Report], value: impl Fn(&Report) -> Option<f64>) -> f64 {
    median(reports.iter().filter_map(value).collect())
}

/// Runs B's cells and its latency run; appends the verdicts to `verdicts`.
pub(crate) async fn run_batch(
    bench: &mut Bench,
    args: &Args,
    verdicts: &mut Vec<String>,
) -> Res<BatchOutcome> {
    let sizes = args.sizes;
    // Timer-bound: single runs are steady, unless `--runs` asks for more.
    let runs = args.runs_low;
    eprintln!(
        "B batch: batch 1 over {} tasks, 8 and 32 over {}, {runs} run(s) each; then {} tasks/s \
         for {} s at batch {LATENCY_BATCH}, batch_wait {WAIT_MS} ms",
        thousands(sizes.b_single as f64),
        thousands(sizes.b_tasks as f64),
        thousands(sizes.b_rate as f64),
        sizes.b_secs,
    );
    let mut rows = Vec::with_capacity(SIZES.len());
    for batch in SIZES {
        let tasks = if batch <= 1 {
            sizes.b_single
        } else {
            sizes.b_tasks
        };
        let prefetch = batch.saturating_mul(2);
        let mut reports = Vec::with_capacity(runs);
        for _ in 0..runs {
            reports.push(
                bench
                    .measure("b", Imp::Framework, work(batch), prefetch, tasks)
                    .await?,
            );
        }
        let passes = |f: fn(&Passes, &Report) -> f64| {
            medians(&reports, |r| r.passes.as_ref().map(|p| f(p, r)))
        };
        rows.push(BatchRow {
            batch,
            tasks,
            prefetch,
            runs,
            rate: medians(&reports, |r| Some(r.rate())),
            cpu_per_10k: medians(&reports, |r| Some(r.cpu_per_10k())),
            rss_mib: medians(&reports, |r| Some(r.rss_mib())),
            mean_batch: passes(|p, _| p.mean_batch()),
            busy: passes(|p, r| p.busy(r.secs)),
            overshoot_ms: passes(|p, _| p.overshoot_ms()),
        });
    }
    let single = rows.first().map_or(f64::NAN, |row| row.rate);
    if let Some(row) = rows.iter().find(|row| row.batch == LATENCY_BATCH) {
        let share = row.rate / row.ideal();
        verdicts.push(format!(
            "B batch {}: {share:.2}x of ideal ({}/s) (target >= 0.90): {}",
            row.batch,
            thousands(row.ideal()),
            verdict(share >= 0.9)
        ));
        let speedup = row.rate / single;
        verdicts.push(format!(
            "B batch {}: {speedup:.1}x batch 1 (target >= 20x): {}",
            row.batch,
            verdict(speedup >= 20.0)
        ));
    }
    let latency = bench
        .latency(
            Some(Imp::Framework),
            work(LATENCY_BATCH),
            LATENCY_BATCH.saturating_mul(2),
            sizes.b_rate,
            sizes.b_secs,
        )
        .await?;
    let target = latency_target_ms();
    verdicts.push(format!(
        "B latency at {} tasks/s, batch {LATENCY_BATCH}, batch_wait {WAIT_MS} ms: p99 {:.1} ms \
         (target <= forward pass {:.1} + batch_wait {WAIT_MS} + {LATENCY_SLACK_MS:.0} = \
         {target:.1} ms), {}/{} results: {}",
        thousands(sizes.b_rate as f64),
        latency.p99_ms,
        forward_cost(usize::from(LATENCY_BATCH)).as_secs_f64() * 1e3,
        latency.received,
        latency.sent,
        verdict(latency.p99_ms <= target && latency.received == latency.sent)
    ));
    Ok(BatchOutcome {
        rows,
        latency: (sizes.b_rate, sizes.b_secs, latency),
    })
}

/// B's p99 target: one full forward pass, plus `batch_wait`, plus the slack.
fn latency_target_ms() -> f64 {
    forward_cost(usize::from(LATENCY_BATCH)).as_secs_f64() * 1e3
        + f64::from(WAIT_MS)
        + LATENCY_SLACK_MS
}

/// A rate with one decimal below 100/s (batch 1 runs near 49/s), else in thousands.
fn rate_text(rate: f64) -> String {
    if rate < 100.0 {
        format!("{rate:.1}")
    } else {
        thousands(rate)
    }
}

/// Prints B's tables.
pub(crate) fn print_batch(out: &BatchOutcome) {
    println!();
    println!(
        "Batch handlers (B: framework; a simulated model, forward pass 20 ms + 0.3 ms per item \
         on a timerfd, one pass at a time; results published with confirms; ideal = batch / \
         (20 ms + 0.3 ms x batch); batch 1 is a one-message handler at concurrency 1, measured \
         over fewer tasks since it runs near 49/s; model busy: the share of the drain spent in \
         forward passes; pass overshoot: how much longer a pass took than its cost)"
    );
    println!();
    println!(
        "| batch | tasks | prefetch | runs | msg/s | ideal msg/s | of ideal | x batch 1 \
         | items per pass | model busy | pass overshoot | CPU s/10k | peak RSS |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let single = out.rows.first().map_or(f64::NAN, |row| row.rate);
    for row in &out.rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} % | {:.2} ms | {:.3} \
             | {:.1} MiB |",
            row.batch,
            thousands(row.tasks as f64),
            row.prefetch,
            row.runs,
            rate_text(row.rate),
            rate_text(row.ideal()),
            row.rate / row.ideal(),
            row.rate / single,
            row.mean_batch,
            row.busy * 100.0,
            row.overshoot_ms,
            row.cpu_per_10k,
            row.rss_mib,
        );
    }
    let (rate, secs, l) = &out.latency;
    let passes = l.report.and_then(|r| r.passes);
    println!();
    println!(
        "Latency, request → result (B: {} tasks/s for {secs} s, batch {LATENCY_BATCH}, \
         batch_wait {WAIT_MS} ms, prefetch {})",
        thousands(*rate as f64),
        LATENCY_BATCH.saturating_mul(2)
    );
    println!();
    println!(
        "| p50 | p99 | max | p99 target | results | items per pass | task confirm p99 / max \
         | CPU s/10k |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {}/{} | {} | {:.1} / {:.1} ms | {} |",
        l.p50_ms,
        l.p99_ms,
        l.max_ms,
        latency_target_ms(),
        l.received,
        l.sent,
        passes.map_or("-".to_owned(), |p| format!("{:.1}", p.mean_batch())),
        l.confirm_p99_ms,
        l.confirm_max_ms,
        l.report
            .map_or("-".to_owned(), |r| format!("{:.3}", r.cpu_per_10k())),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latency_target_is_a_pass_plus_the_wait_plus_slack() {
        assert!((latency_target_ms() - 54.6).abs() < 1e-9);
    }

    #[test]
    fn batch_one_is_the_one_message_handler() {
        assert_eq!(work(1), Work::Model);
        assert_eq!(
            work(8),
            Work::Batch {
                size: 8,
                wait_ms: WAIT_MS
            }
        );
    }
}

//! Scenario R: S2 with the shared result store (`cache = "shared"`, Redis) beside the same
//! framework without it and beside raw lapin, and a duplicate-heavy run.
//!
//! - Cost: S2's request-result drain at prefetch 256, the three measured back to back in
//!   rotating order; the cost is `1 − store / no store`, the median of each triplet's ratio.
//! - Duplicates: every task published twice (the whole set, then the whole set again, so a
//!   task's second copy arrives after its first has finished), store against no store; the
//!   handler runs are counted in the worker. Once with S2's handler, which costs nothing to
//!   run again, and once with a handler that waits 10 ms first (S3's wait, prefetch 64), for a
//!   task whose run costs something. The in-process LRU in front of the store keeps
//!   its default 1,000 results, fewer than the tasks, so the second copies are answered by
//!   Redis, as on another replica or after a restart.
//!
//! Every measurement has its own `result_store_prefix`; its keys are deleted afterwards (by
//! [`crate::measure`], never a flush). Redis is `$BENCH_REDIS_URL` or [`DEFAULT_REDIS_URL`].

use crate::{
    args::Args,
    error::Res,
    measure::{Bench, Variant},
    numbers::{median, thousands, verdict},
    protocol::{Imp, Report, StoreSpec, Work},
};

/// Redis when `BENCH_REDIS_URL` is not set.
pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// R's prefetch: S2's target cell.
const PREFETCH: u16 = 256;
/// The costed duplicate run's prefetch: S3's.
const IO_PREFETCH: u16 = 64;
/// What R measured.
pub(crate) struct StoreOutcome {
    pub(crate) tasks: u64,
    pub(crate) runs: usize,
    /// Medians: no store, store, raw lapin.
    pub(crate) off: Report,
    pub(crate) on: Report,
    pub(crate) raw: Report,
    /// Store / no store per triplet.
    pub(crate) cost_ratios: Vec<f64>,
    pub(crate) dup_runs: usize,
    pub(crate) dups: Vec<Dup>,
}

/// One duplicate-heavy comparison: every task published twice, no store against the store.
pub(crate) struct Dup {
    pub(crate) label: &'static str,
    pub(crate) prefetch: u16,
    pub(crate) tasks: u64,
    /// The runs with the median rate.
    pub(crate) off: Report,
    pub(crate) on: Report,
    /// Store / no store per pair.
    pub(crate) ratios: Vec<f64>,
}

/// `runs` back-to-back pairs (no store, store; the order alternates) of `load` = (work,
/// prefetch, tasks) with every task published twice.
async fn duplicates(
    bench: &mut Bench,
    load: (Work, u16, u64),
    runs: usize,
    store: &mut impl FnMut() -> Option<StoreSpec>,
) -> Res<Dup> {
    let (work, prefetch, tasks) = load;
    let (mut off, mut on, mut ratios) = (vec![], vec![], vec![]);
    for run in 0..runs {
        let mut rates = [0.0; 2];
        let order = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_store in order {
            let variant = Variant {
                copies: 2,
                store: if with_store { store() } else { None },
            };
            let report = bench
                .measure_with("rd", Imp::Framework, work, prefetch, tasks, variant)
                .await?;
            rates[usize::from(with_store)] = report.rate();
            if with_store {
                on.push(report);
            } else {
                off.push(report);
            }
        }
        ratios.push(rates[1] / rates[0]);
    }
    Ok(Dup {
        label: "",
        prefetch,
        tasks,
        off: median_run(&off)?,
        on: median_run(&on)?,
        ratios,
    })
}

/// The three consumers of R's cost rows.
#[derive(Debug, Clone, Copy)]
enum Who {
    Off,
    On,
    Raw,
}

/// Picks the run whose rate is the median (the runs are odd in number by default; with an
/// even number, the higher middle one), so a row's columns come from one run.
fn median_run(reports: &[Report]) -> Res<Report> {
    let mut sorted = reports.to_vec();
    sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    sorted
        .get(sorted.len() / 2)
        .copied()
        .ok_or_else(|| "no run".into())
}

fn spread(ratios: &[f64]) -> String {
    let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = ratios.iter().copied().fold(0.0, f64::max);
    format!("{lowest:.2}-{highest:.2}")
}

/// Runs R; appends its verdicts to `verdicts`.
pub(crate) async fn run_store(
    bench: &mut Bench,
    args: &Args,
    verdicts: &mut Vec<String>,
) -> Res<StoreOutcome> {
    let url = std::env::var("BENCH_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned());
    let tasks = args.sizes.s2;
    let runs = args.runs_for(PREFETCH);
    let dup_tasks = tasks / 2;
    let dup_runs = args.runs.min(5);
    eprintln!(
        "R shared store ({url}): S2 at prefetch {PREFETCH}, {} tasks, {runs} triplets (no \
         store, store, raw); then every task published twice, {dup_runs} pairs each: S2 \
         ({} tasks) and a 10 ms handler at prefetch {IO_PREFETCH} ({} tasks)",
        thousands(tasks as f64),
        thousands(dup_tasks as f64),
        thousands(args.sizes.s3 as f64),
    );
    let run_id = bench.run_id.clone();
    let mut seq = 0_u32;
    let mut store = || {
        seq += 1;
        Some(StoreSpec {
            url: url.clone(),
            prefix: format!("rmq-consumer.bench.{run_id}.{seq}:"),
        })
    };
    let mut plan = Vec::new();
    for run in 0..runs {
        let mut order = [Who::Off, Who::On, Who::Raw];
        order.rotate_left(run % 3);
        plan.push(order);
    }
    let (mut off, mut on, mut raw, mut cost_ratios) = (vec![], vec![], vec![], vec![]);
    for order in plan {
        let (mut pair_off, mut pair_on) = (None, None);
        for who in order {
            let (imp, store) = match who {
                Who::Off => (Imp::Framework, None),
                Who::On => (Imp::Framework, store()),
                Who::Raw => (Imp::Raw, None),
            };
            let variant = Variant { copies: 1, store };
            let report = bench
                .measure_with("r", imp, Work::Request, PREFETCH, tasks, variant)
                .await?;
            match who {
                Who::Off => pair_off = Some(report.rate()),
                Who::On => pair_on = Some(report.rate()),
                Who::Raw => {}
            }
            match who {
                Who::Off => off.push(report),
                Who::On => on.push(report),
                Who::Raw => raw.push(report),
            }
        }
        if let (Some(off), Some(on)) = (pair_off, pair_on) {
            cost_ratios.push(on / off);
        }
    }
    let mut dups = Vec::with_capacity(2);
    for (label, work, prefetch, tasks) in [
        ("S2", Work::Request, PREFETCH, dup_tasks),
        ("10 ms handler", Work::IoRequest, IO_PREFETCH, args.sizes.s3),
    ] {
        let dup = duplicates(bench, (work, prefetch, tasks), dup_runs, &mut store).await?;
        let ratio = median(dup.ratios.clone());
        verdicts.push(format!(
            "R: every task twice, {label} at prefetch {prefetch}: the store at {ratio:.2}x the \
             rate without it ({} pairs, {}), handler runs {} vs {} for {} tasks (target: the \
             store beats no store): {}",
            dup.ratios.len(),
            spread(&dup.ratios),
            thousands(dup.on.runs as f64),
            thousands(dup.off.runs as f64),
            thousands(tasks as f64),
            verdict(ratio > 1.0 && dup.on.runs < dup.off.runs)
        ));
        dups.push(Dup {
            label,
            prefetch,
            tasks,
            ..dup
        });
    }
    let ratio = median(cost_ratios.clone());
    let loss = 1.0 - ratio;
    verdicts.push(format!(
        "R: S2 prefetch {PREFETCH} with the shared store at {ratio:.2}x of without it ({:.0} % \
         loss, median of {} back-to-back triplets, {}; target <= 15 % loss): {}",
        loss * 100.0,
        cost_ratios.len(),
        spread(&cost_ratios),
        verdict(loss <= 0.15)
    ));
    Ok(StoreOutcome {
        tasks,
        runs,
        off: median_run(&off)?,
        on: median_run(&on)?,
        raw: median_run(&raw)?,
        cost_ratios,
        dup_runs,
        dups,
    })
}

/// Prints R's table.
pub(crate) fn print_store(out: &StoreOutcome) {
    println!();
    println!(
        "Shared result store (R: S2's request-result path, and the same with a 10 ms wait in \
         the handler; Redis on this host; each row is the run with the median rate; ratio: the \
         median of the per-run ratios to `no store`, each set measured back to back, with \
         their range)"
    );
    println!();
    println!(
        "| run | consumer | tasks | deliveries | runs | msg/s | ratio to no store | ratio range \
         | handler runs | CPU s/10k | broker CPU s/10k | peak RSS |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cost = median(out.cost_ratios.clone());
    let raw_ratio = out.raw.rate() / out.off.rate();
    let s2 = format!("S2, prefetch {PREFETCH}");
    let mut rows: Vec<(String, &str, u64, usize, &Report, String, String)> = vec![
        (
            s2.clone(),
            "framework, no store",
            out.tasks,
            out.runs,
            &out.off,
            "1.00".to_owned(),
            "-".to_owned(),
        ),
        (
            s2.clone(),
            "framework, shared store",
            out.tasks,
            out.runs,
            &out.on,
            format!("{cost:.2}"),
            spread(&out.cost_ratios),
        ),
        (
            s2,
            "raw lapin",
            out.tasks,
            out.runs,
            &out.raw,
            format!("{raw_ratio:.2} (medians)"),
            "-".to_owned(),
        ),
    ];
    for dup in &out.dups {
        let run = format!("every task twice, {}, prefetch {}", dup.label, dup.prefetch);
        let ratio = median(dup.ratios.clone());
        rows.push((
            run.clone(),
            "framework, no store",
            dup.tasks,
            out.dup_runs,
            &dup.off,
            "1.00".to_owned(),
            "-".to_owned(),
        ));
        rows.push((
            run,
            "framework, shared store",
            dup.tasks,
            out.dup_runs,
            &dup.on,
            format!("{ratio:.2}"),
            spread(&dup.ratios),
        ));
    }
    for (run, who, tasks, runs, report, ratio, range) in rows {
        println!(
            "| {run} | {who} | {} | {} | {runs} | {} | {ratio} | {range} | {} | {:.3} | {:.3} \
             | {:.1} MiB |",
            thousands(tasks as f64),
            thousands(report.processed as f64),
            thousands(report.rate()),
            thousands(report.runs as f64),
            report.cpu_per_10k(),
            report.broker_cpu_per_10k(),
            report.rss_mib(),
        );
    }
}

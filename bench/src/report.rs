//! The tables printed at the end: the throughput rows, L, M and H here, B's and R's from
//! [`crate::batching`] and [`crate::store`], then the verdicts.

use std::time::Duration;

use crate::{
    args::Args,
    batching::print_batch,
    numbers::{decimals, thousands},
    scenarios::{Cell, Outcome},
    store::print_store,
};

/// The throughput table (S1 S2 S3).
fn print_rows(out: &Outcome) {
    println!();
    println!(
        "Throughput: medians of `runs` alternating runs; ratio: the median of the per-run \
         framework/raw ratios (each pair measured back to back), with their range; CPU time and \
         peak RSS of the consumer process"
    );
    println!();
    println!(
        "| scenario | prefetch | runs | framework msg/s | raw lapin msg/s | ratio | ratio range \
         | CPU s/10k framework / raw | broker CPU s/10k framework / raw | peak RSS framework / raw \
         | note |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in &out.rows {
        let (fw, raw) = (&row.framework, row.raw.as_ref());
        let or_dash = |f: &dyn Fn(&Cell) -> String| raw.map_or("-".to_owned(), f);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.3} / {} | {} / {} | {:.1} / {} MiB | {} |",
            row.scenario,
            row.prefetch,
            row.runs,
            thousands(fw.rate),
            or_dash(&|c| thousands(c.rate)),
            or_dash(&|_| format!("{:.2}", row.ratio)),
            or_dash(&|_| row.spread.clone()),
            fw.cpu_per_10k,
            or_dash(&|c| format!("{:.3}", c.cpu_per_10k)),
            decimals(fw.broker_cpu_per_10k, 3),
            or_dash(&|c| decimals(c.broker_cpu_per_10k, 3)),
            fw.rss_mib,
            or_dash(&|c| format!("{:.1}", c.rss_mib)),
            row.note
        );
    }
}

/// Prints every table `out` has, the verdicts, and the run's time.
pub(crate) fn print_outcome(out: &Outcome, args: &Args, elapsed: Duration) {
    if !out.rows.is_empty() {
        print_rows(out);
    }
    if !out.latency.is_empty() {
        let sizes = args.sizes;
        println!();
        println!(
            "Latency, request → result (L: {} tasks/s for {} s through S2's path)",
            thousands(sizes.latency_rate as f64),
            sizes.latency_secs
        );
        println!();
        println!(
            "| consumer | prefetch | p50 | p99 | max | over 20 ms | results | task confirm p99 / max \
             | CPU s/10k | peak RSS |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (imp, prefetch, l) in &out.latency {
            let (who, prefetch) = match imp {
                Some(imp) => (imp.label(), prefetch.to_string()),
                None => ("no consumer (broker floor)", "-".to_owned()),
            };
            println!(
                "| {who} | {prefetch} | {:.2} ms | {:.2} ms | {:.1} ms | {} | {}/{} | {:.1} / {:.1} ms \
                 | {} | {} |",
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                l.over_20ms,
                l.received,
                l.sent,
                l.confirm_p99_ms,
                l.confirm_max_ms,
                l.report
                    .map_or("-".to_owned(), |r| format!("{:.3}", r.cpu_per_10k())),
                l.report
                    .map_or("-".to_owned(), |r| format!("{:.1} MiB", r.rss_mib())),
            );
        }
    }
    if !out.memory.is_empty() {
        println!();
        println!("Memory (M: framework, drain-ack, prefetch 256)");
        println!();
        println!("| backlog | msg/s | CPU s/10k | peak RSS |");
        println!("|---:|---:|---:|---:|");
        for (backlog, report) in &out.memory {
            println!(
                "| {} | {} | {:.3} | {:.1} MiB |",
                thousands(*backlog as f64),
                thousands(report.rate()),
                report.cpu_per_10k(),
                report.rss_mib()
            );
        }
    }
    if !out.hostile.is_empty() {
        println!();
        println!(
            "Hostile bodies (H: framework, `[{{\"\":0}},...]` decoded as a `Value`, prefetch 4, \
             8 bodies, default max_body_size {} MiB)",
            rmq_consumer::config::DEFAULT_MAX_BODY_SIZE / 1_048_576
        );
        println!();
        println!("| body | max_in_flight_bytes | decoded / dead-lettered | peak RSS |");
        println!("|---:|---|---:|---:|");
        for (bytes, label, report) in &out.hostile {
            println!(
                "| {:.2} MiB | {label} | {} / {} | {:.1} MiB |",
                *bytes as f64 / 1_048_576.0,
                report.processed.saturating_sub(report.dead_lettered),
                report.dead_lettered,
                report.rss_mib()
            );
        }
    }
    if let Some(batch) = &out.batch {
        print_batch(batch);
    }
    if let Some(store) = &out.store {
        print_store(store);
    }
    if !out.verdicts.is_empty() {
        println!();
        println!("Targets:");
        for line in &out.verdicts {
            println!("- {line}");
        }
    }
    println!();
    println!("total time {:.0?}", elapsed);
}

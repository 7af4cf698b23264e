//! The scenarios (S1 S2 S3 L M H; B in [`crate::batching`], R in [`crate::store`]): which
//! cells each measures, the medians of a row, and their verdicts.

use crate::{
    args::Args,
    batching::{BatchOutcome, run_batch},
    error::Res,
    measure::{Bench, Latency},
    numbers::{median, thousands, verdict},
    protocol::{Imp, Report, SLEEP, Slots, Work},
    store::{StoreOutcome, run_store},
};

/// The medians of one table row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cell {
    pub(crate) rate: f64,
    pub(crate) cpu_per_10k: f64,
    pub(crate) broker_cpu_per_10k: f64,
    pub(crate) rss_mib: f64,
    /// Medians of the runs' [`Slots`] (S3).
    pub(crate) wait_ms: f64,
    pub(crate) busy: f64,
    pub(crate) gap_ms: f64,
}

/// The medians of `reports`.
fn cell(reports: &[Report]) -> Cell {
    let of = |value: fn(&Report) -> f64| median(reports.iter().map(value).collect());
    let of_slots = |value: fn(&Slots) -> f64| {
        median(
            reports
                .iter()
                .filter_map(|r| r.slots.as_ref())
                .map(value)
                .collect(),
        )
    };
    Cell {
        rate: of(Report::rate),
        cpu_per_10k: of(Report::cpu_per_10k),
        broker_cpu_per_10k: of(Report::broker_cpu_per_10k),
        rss_mib: of(Report::rss_mib),
        wait_ms: of_slots(|s| s.wait_ms),
        busy: of_slots(|s| s.busy),
        gap_ms: of_slots(|s| s.gap_ms),
    }
}

/// S3's wait, slot use and gap between handlers, framework / raw.
fn slots_note(framework: &Cell, raw: &Cell) -> String {
    format!(
        "wait {:.2} / {:.2} ms, slots busy {:.1} / {:.1} %, gap between handlers {:.2} / {:.2} ms",
        framework.wait_ms,
        raw.wait_ms,
        framework.busy * 100.0,
        raw.busy * 100.0,
        framework.gap_ms,
        raw.gap_ms,
    )
}

/// One row of the throughput table.
pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) prefetch: u16,
    pub(crate) runs: usize,
    pub(crate) framework: Cell,
    /// `None` for framework-only variants.
    pub(crate) raw: Option<Cell>,
    /// Framework / raw throughput: the median of the pairs' ratios.
    pub(crate) ratio: f64,
    /// The lowest and highest pair ratio.
    pub(crate) spread: String,
    pub(crate) note: String,
}

/// The two cells of a comparison, and the framework/raw throughput ratio of each run's pair
/// (the two measured back to back, so a drift of the machine's speed hits both alike).
struct Comparison {
    framework: Cell,
    raw: Cell,
    pair_ratios: Vec<f64>,
}

impl Comparison {
    /// The median of the pairs' ratios (the ratio of the medians without pairs).
    fn ratio(&self) -> f64 {
        if self.pair_ratios.is_empty() {
            self.framework.rate / self.raw.rate
        } else {
            median(self.pair_ratios.clone())
        }
    }

    /// `min-max` of the pairs' ratios, when there are several.
    fn spread(&self) -> String {
        let lowest = self
            .pair_ratios
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let highest = self.pair_ratios.iter().copied().fold(0.0, f64::max);
        if self.pair_ratios.len() > 1 {
            format!("{lowest:.2}-{highest:.2}")
        } else {
            "-".to_owned()
        }
    }
}

/// Runs the framework and the raw consumer alternately, `runs` times each.
async fn compare(
    bench: &mut Bench,
    args: &Args,
    tag: &str,
    work: Work,
    prefetch: u16,
    count: u64,
) -> Res<Comparison> {
    let runs = args.runs_for(prefetch);
    let mut framework = Vec::with_capacity(runs);
    let mut raw = Vec::with_capacity(runs);
    for run in 0..runs {
        let order = if run % 2 == 0 {
            [Imp::Framework, Imp::Raw]
        } else {
            [Imp::Raw, Imp::Framework]
        };
        for imp in order {
            if args.only.is_some_and(|only| only != imp) {
                continue;
            }
            let report = bench.measure(tag, imp, work, prefetch, count).await?;
            match imp {
                Imp::Framework => framework.push(report),
                Imp::Raw => raw.push(report),
            }
        }
    }
    let pair_ratios = framework
        .iter()
        .zip(&raw)
        .map(|(framework, raw)| framework.rate() / raw.rate())
        .collect();
    Ok(Comparison {
        framework: cell(&framework),
        raw: cell(&raw),
        pair_ratios,
    })
}

pub(crate) struct Outcome {
    pub(crate) rows: Vec<Row>,
    pub(crate) latency: Vec<(Option<Imp>, u16, Latency)>,
    pub(crate) memory: Vec<(u64, Report)>,
    /// H: (body size, budget label, report).
    pub(crate) hostile: Vec<(usize, String, Report)>,
    /// B: batch handlers.
    pub(crate) batch: Option<BatchOutcome>,
    /// R: the shared result store.
    pub(crate) store: Option<StoreOutcome>,
    pub(crate) verdicts: Vec<String>,
}

pub(crate) async fn run_all(bench: &mut Bench, args: &Args) -> Res<Outcome> {
    let sizes = args.sizes;
    let mut out = Outcome {
        rows: Vec::new(),
        latency: Vec::new(),
        memory: Vec::new(),
        hostile: Vec::new(),
        batch: None,
        store: None,
        verdicts: Vec::new(),
    };
    let wants = |name: &str| args.scenarios.iter().any(|s| s == name);
    let plan: [(&str, &str, Work, u64, &[u16]); 4] = [
        ("S1", "drain-ack", Work::Drain, sizes.s1, &[4, 256]),
        ("S2", "request-result", Work::Request, sizes.s2, &[4, 256]),
        ("S3", "io-bound 10 ms", Work::Sleep, sizes.s3, &[4, 64]),
        (
            "S3",
            "io-bound, tokio::time::sleep",
            Work::TokioSleep,
            sizes.s3,
            &[64],
        ),
    ];
    for (name, label, work, count, prefetches) in plan {
        if !wants(name) {
            continue;
        }
        let cells: Vec<String> = prefetches
            .iter()
            .map(|&prefetch| format!("{} at prefetch {prefetch}", args.runs_for(prefetch)))
            .collect();
        eprintln!(
            "{name} {label}: {} tasks, run(s) per cell: {}",
            thousands(count as f64),
            cells.join(", ")
        );
        for &prefetch in prefetches {
            if args.prefetch.is_some_and(|p| p != prefetch) {
                continue;
            }
            let tag = name.to_lowercase();
            let runs = args.runs_for(prefetch);
            let comparison = compare(bench, args, &tag, work, prefetch, count).await?;
            let (framework, raw) = (comparison.framework, comparison.raw);
            let ratio = comparison.ratio();
            let ideal = f64::from(prefetch) / SLEEP.as_secs_f64();
            let of_ideal = |rate: f64| format!("{:.2}x", rate / ideal);
            let note = match work {
                Work::TokioSleep => format!(
                    "ideal {}/s: framework {}, raw {}; {} (tokio's 1 ms timer wheel)",
                    thousands(ideal),
                    of_ideal(framework.rate),
                    of_ideal(raw.rate),
                    slots_note(&framework, &raw),
                ),
                Work::Sleep => {
                    let share = framework.rate / ideal;
                    out.verdicts.push(format!(
                        "{name} prefetch {prefetch}: framework {share:.2}x of ideal ({} msg/s) \
                         (target >= 0.90): {}",
                        thousands(ideal),
                        verdict(share >= 0.9)
                    ));
                    format!(
                        "ideal {}/s: framework {share:.2}x, raw {}; {}",
                        thousands(ideal),
                        of_ideal(raw.rate),
                        slots_note(&framework, &raw),
                    )
                }
                _ if prefetch == 256 => {
                    out.verdicts.push(format!(
                        "{name} prefetch {prefetch}: framework {ratio:.2}x raw (median of {} \
                         pairs, {}; target >= 0.90): {}",
                        comparison.pair_ratios.len(),
                        comparison.spread(),
                        verdict(ratio >= 0.9)
                    ));
                    String::new()
                }
                _ => String::new(),
            };
            out.rows.push(Row {
                scenario: format!("{name} {label}"),
                prefetch,
                runs,
                framework,
                raw: Some(raw),
                ratio,
                spread: comparison.spread(),
                note,
            });
        }
    }
    if wants("L") {
        let prefetch = 256;
        eprintln!(
            "L latency: {} tasks/s for {} s, prefetch {prefetch}",
            thousands(sizes.latency_rate as f64),
            sizes.latency_secs
        );
        for imp in [Some(Imp::Framework), Some(Imp::Raw), None] {
            let latency = bench
                .latency(
                    imp,
                    Work::Request,
                    prefetch,
                    sizes.latency_rate,
                    sizes.latency_secs,
                )
                .await?;
            if imp == Some(Imp::Framework) {
                out.verdicts.push(format!(
                    "L: framework p99 {:.2} ms (target < 20 ms), {}/{} results: {}",
                    latency.p99_ms,
                    latency.received,
                    latency.sent,
                    verdict(latency.p99_ms < 20.0 && latency.received == latency.sent)
                ));
            }
            out.latency.push((imp, prefetch, latency));
        }
    }
    if wants("M") {
        eprintln!("M memory: framework, prefetch 256, growing backlog");
        for backlog in [sizes.m_small, sizes.m_large] {
            let report = bench
                .measure("m", Imp::Framework, Work::Drain, 256, backlog)
                .await?;
            out.memory.push((backlog, report));
        }
        if let [(_, small), (large_n, large)] = out.memory.as_slice() {
            let growth = large.rss_mib() - small.rss_mib();
            out.verdicts.push(format!(
                "M: framework peak RSS {:.1} MiB at {} tasks vs {:.1} MiB at {} (target < 64 MiB, \
                 no growth with the backlog: {:+.1} MiB): {}",
                large.rss_mib(),
                thousands(*large_n as f64),
                small.rss_mib(),
                thousands(sizes.m_small as f64),
                growth,
                verdict(large.rss_mib() < 64.0 && growth < 0.25 * small.rss_mib().max(4.0))
            ));
        }
    }
    if wants("H") {
        let limit = rmq_consumer::config::DEFAULT_MAX_BODY_SIZE;
        eprintln!("H hostile bodies: framework, prefetch 4, 8 bodies per row");
        let big = limit - 1024;
        let cases: [(usize, Option<u64>, &str); 3] = [
            (big, Some(u64::MAX), "none (as before this change)"),
            (big, None, "default"),
            (limit * 3 / 8, None, "default"),
        ];
        for (bytes, budget, label) in cases {
            let report = bench.measure_bombs(bytes, budget, 8).await?;
            if budget.is_none() {
                out.verdicts.push(format!(
                    "H: {:.1} MiB hostile bodies at the default limits: peak RSS {:.1} MiB \
                     (target < 512 MiB): {}",
                    bytes as f64 / 1_048_576.0,
                    report.rss_mib(),
                    verdict(report.rss_mib() < 512.0)
                ));
            }
            out.hostile.push((bytes, label.to_owned(), report));
        }
    }
    if wants("B") {
        out.batch = Some(run_batch(bench, args, &mut out.verdicts).await?);
    }
    if wants("R") {
        out.store = Some(run_store(bench, args, &mut out.verdicts).await?);
    }
    Ok(out)
}

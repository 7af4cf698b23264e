//! The command line: which scenarios, at which sizes, how many runs.

use crate::{error::Res, protocol::Imp};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) s1: u64,
    pub(crate) s2: u64,
    pub(crate) s3: u64,
    pub(crate) latency_secs: u64,
    pub(crate) latency_rate: u64,
    pub(crate) m_small: u64,
    pub(crate) m_large: u64,
    /// B: tasks per cell at `batch = 8` and `32`.
    pub(crate) b_tasks: u64,
    /// B: tasks at `batch = 1` (~49/s: 1,000 take 20 s).
    pub(crate) b_single: u64,
    /// B: the latency run's tasks per second and seconds.
    pub(crate) b_rate: u64,
    pub(crate) b_secs: u64,
}

const FULL: Sizes = Sizes {
    s1: 50_000,
    s2: 30_000,
    s3: 5_000,
    latency_secs: 30,
    latency_rate: 1_000,
    m_small: 10_000,
    m_large: 100_000,
    b_tasks: 10_000,
    b_single: 1_000,
    b_rate: 500,
    b_secs: 20,
};

const QUICK: Sizes = Sizes {
    s1: 10_000,
    s2: 6_000,
    s3: 1_000,
    latency_secs: 10,
    latency_rate: 1_000,
    m_small: 10_000,
    m_large: 50_000,
    b_tasks: 2_000,
    b_single: 200,
    b_rate: 500,
    b_secs: 6,
};

#[derive(Debug)]
pub(crate) struct Args {
    pub(crate) scenarios: Vec<String>,
    pub(crate) sizes: Sizes,
    /// Runs per cell at prefetch 64 and 256 (the targets). Single runs move by ±10 % on a 2-core
    /// machine that also runs the broker; 9 back-to-back pairs keep the median steady.
    pub(crate) runs: usize,
    /// Runs per cell at prefetch 4, whose drains are long: latency-bound at a few hundred to a
    /// few thousand msg/s; and per cell of B, which is timer-bound.
    pub(crate) runs_low: usize,
    /// Measure only this implementation (for profiling).
    pub(crate) only: Option<Imp>,
    /// Measure only the cells at this prefetch (for profiling).
    pub(crate) prefetch: Option<u16>,
}

impl Args {
    pub(crate) fn runs_for(&self, prefetch: u16) -> usize {
        if prefetch < 64 {
            self.runs_low
        } else {
            self.runs
        }
    }
}

const USAGE: &str = "usage: bench [S1] [S2] [S3] [L] [M] [H] [B] [R] [--quick] [--runs N] \
                     [--only framework|raw] [--prefetch N]";

/// Every scenario a full run measures, in its order.
const ALL: [&str; 7] = ["S1", "S2", "S3", "L", "M", "H", "B"];
/// Scenarios measured only when named: R needs Redis.
const ON_REQUEST: [&str; 1] = ["R"];

pub(crate) fn parse_args(args: &[String]) -> Res<Args> {
    let mut scenarios = Vec::new();
    let mut quick = false;
    let mut runs = None;
    let mut only = None;
    let mut prefetch = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--runs" => {
                let n: usize = iter.next().ok_or("--runs needs a number")?.parse()?;
                runs = Some(n.max(1));
            }
            "--only" => {
                only = match iter.next().map(String::as_str) {
                    Some("framework") => Some(Imp::Framework),
                    Some("raw") => Some(Imp::Raw),
                    _ => return Err("--only needs `framework` or `raw`".into()),
                };
            }
            "--prefetch" => {
                prefetch = Some(iter.next().ok_or("--prefetch needs a number")?.parse()?);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => {
                let name = other.to_uppercase();
                if !ALL.contains(&name.as_str()) && !ON_REQUEST.contains(&name.as_str()) {
                    return Err(format!("unknown argument `{other}`; {USAGE}").into());
                }
                scenarios.push(name);
            }
        }
    }
    if scenarios.is_empty() {
        scenarios = ALL.map(str::to_owned).to_vec();
    }
    Ok(Args {
        scenarios,
        sizes: if quick { QUICK } else { FULL },
        runs: runs.unwrap_or(if quick { 1 } else { 9 }),
        // An explicit `--runs` applies to every cell; by default the long prefetch-4 drains
        // and B's timer-bound cells run once, to keep the full run near nine minutes.
        runs_low: runs.unwrap_or(1),
        only,
        prefetch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Res<Args> {
        parse_args(&args.iter().map(|&a| a.to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn no_scenario_means_all_at_full_size() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.scenarios, ["S1", "S2", "S3", "L", "M", "H", "B"]);
        assert_eq!(args.sizes.s1, FULL.s1);
        assert_eq!((args.runs, args.runs_low), (9, 1));
    }

    #[test]
    fn quick_runs_and_filters_are_read() {
        let args = parse(&[
            "s1",
            "S2",
            "--quick",
            "--runs",
            "3",
            "--only",
            "raw",
            "--prefetch",
            "256",
        ])
        .unwrap();
        assert_eq!(args.scenarios, ["S1", "S2"]);
        assert_eq!(args.sizes.s1, QUICK.s1);
        assert_eq!((args.runs_for(4), args.runs_for(256)), (3, 3));
        assert_eq!(args.only, Some(Imp::Raw));
        assert_eq!(args.prefetch, Some(256));
    }

    #[test]
    fn unknown_arguments_are_refused() {
        assert!(parse(&["S4"]).is_err());
        assert!(parse(&["--only", "both"]).is_err());
        assert!(parse(&["--runs"]).is_err());
    }
}

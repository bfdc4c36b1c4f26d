//! The benchmark's post-copy case: a guest that cannot converge under pre-copy (the
//! high dirty rate without auto-converge), under a policy that allows the switch. Raw
//! QEMU over TLS takes the same decisions (`policy::decide`) and resumes the target at
//! the switch; Ferry (managed, TLS, the default transport) does it through its phases:
//! Perform ends at the switch, Finish resumes the guest on the target, Confirm waits for
//! the last pages. What it shows: the guest's downtime is the switch-over pause, within
//! the policy's maximum, not the post-copy transfer.

use std::time::Duration;

use ferry_crds::{MigrationPolicy, PostCopy, PostCopyMode};
use serde_json::{Value, json};

use super::ferry::FerryRun;
use super::raw::RawRun;
use super::{median, ms};

/// The case's policy: Balanced's, without auto-converge (so pre-copy does not converge
/// on the high-dirty guest) and with post-copy allowed (the switch once it is judged
/// not to converge).
pub fn spec() -> MigrationPolicy {
    MigrationPolicy {
        auto_converge: Some(false),
        post_copy: Some(PostCopy {
            mode: PostCopyMode::Allowed,
            after_seconds: None,
        }),
        ..Default::default()
    }
}

/// What the case measured, raw QEMU over TLS and Ferry.
#[derive(Debug, Clone, Default)]
pub struct Case {
    pub raw_tls: Vec<RawRun>,
    pub ferry: Vec<FerryRun>,
}

/// The medians of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub total: Duration,
    pub downtime: Duration,
    /// The longest downtime of the runs.
    pub worst_downtime: Duration,
    /// How many runs switched to post-copy.
    pub switched: usize,
    pub runs: usize,
}

impl Side {
    fn of(runs: &[(Duration, u64, bool)]) -> Side {
        let downtimes: Vec<Duration> = runs.iter().map(|r| Duration::from_millis(r.1)).collect();
        Side {
            total: median(&runs.iter().map(|r| r.0).collect::<Vec<_>>()),
            downtime: median(&downtimes),
            worst_downtime: downtimes.iter().max().copied().unwrap_or_default(),
            switched: runs.iter().filter(|r| r.2).count(),
            runs: runs.len(),
        }
    }

    pub fn raw(runs: &[RawRun]) -> Side {
        let v: Vec<_> = runs
            .iter()
            .map(|r| (r.total, r.downtime_ms, r.post_copy))
            .collect();
        Side::of(&v)
    }

    pub fn ferry(runs: &[FerryRun]) -> Side {
        let v: Vec<_> = runs
            .iter()
            .map(|r| (r.total, r.downtime_ms, r.post_copy))
            .collect();
        Side::of(&v)
    }
}

/// Prints the case's table and returns its JSON; `max_downtime_ms` is the policy's.
pub fn report(case: &Case, max_downtime_ms: u64) -> Value {
    let raw = Side::raw(&case.raw_tls);
    let ferry = Side::ferry(&case.ferry);
    println!(
        "\nPost-copy case — high-dirty guest, no auto-converge, postCopy Allowed, TLS; medians (max downtime {max_downtime_ms} ms)\n"
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "side", "total ms", "dt ms", "worst dt", "switched", "ratio"
    );
    let ratio = ferry.total.as_secs_f64() / raw.total.as_secs_f64().max(1e-9);
    for (name, s, r) in [
        ("raw tls", raw, String::from("1.00")),
        ("ferry tls", ferry, format!("{ratio:.2}")),
    ] {
        println!(
            "{name:<10} {:>10} {:>10} {:>10} {:>10} {r:>10}",
            ms(s.total),
            ms(s.downtime),
            ms(s.worst_downtime),
            format!("{}/{}", s.switched, s.runs),
        );
    }
    let over: Vec<u64> = case
        .ferry
        .iter()
        .map(|r| r.downtime_ms)
        .filter(|d| *d > max_downtime_ms)
        .collect();
    if over.is_empty() {
        println!("no Ferry run paused the guest longer than the policy's maximum");
    } else {
        println!("Ferry runs over the policy's maximum (a failure of the policy): {over:?} ms");
    }
    let side = |s: Side| {
        json!({
            "total_ms": s.total.as_millis() as u64,
            "downtime_ms": s.downtime.as_millis() as u64,
            "worst_downtime_ms": s.worst_downtime.as_millis() as u64,
            "switched": s.switched,
            "runs": s.runs,
        })
    };
    json!({
        "policy": serde_json::to_value(spec()).unwrap_or_default(),
        "max_downtime_ms": max_downtime_ms,
        "raw_tls": side(raw),
        "ferry_tls": side(ferry),
        "ferry_over_raw_tls": ratio,
        "ferry_runs_over_max_downtime": over,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_counts_the_switches_and_the_worst_pause() {
        let d = Duration::from_millis;
        let s = Side::of(&[
            (d(10_000), 200, true),
            (d(12_000), 700, true),
            (d(9_000), 100, false),
        ]);
        assert_eq!(s.total, d(10_000));
        assert_eq!(s.downtime, d(200));
        assert_eq!(s.worst_downtime, d(700));
        assert_eq!((s.switched, s.runs), (2, 3));
        let policy = ferry_agent::policy::resolve(&spec()).unwrap();
        assert!(!policy.auto_converge);
        assert_eq!(policy.post_copy, ferry_agent::policy::PostCopy::Allowed);
    }
}

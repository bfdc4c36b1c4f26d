//! The benchmark's report: the tables `make bench` prints and the JSON it writes, from
//! the runs `ferry-bench` measured (raw QEMU, Ferry per variant, at once, RSS, the
//! apiserver's requests).

use std::time::Duration;

use serde_json::{Value, json};

use super::apiserver::Requests;
use super::ferry::{FerryRun, Medians};
use super::raw::RawRun;
use super::{median, ms};

/// Requests per second, by kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerSecond {
    pub reads: f64,
    pub writes: f64,
    pub watches: f64,
}

impl PerSecond {
    pub fn of(r: &Requests, over: Duration) -> PerSecond {
        let s = over.as_secs_f64().max(1e-3);
        PerSecond {
            reads: (r.reads() / s).max(0.0),
            writes: (r.writes() / s).max(0.0),
            watches: (r.watches() / s).max(0.0),
        }
    }
}

/// One migration's apiserver requests: what the apiserver served while it ran, less the
/// benchmark's own (its creation and polls) and the rate at rest over the same time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiCount {
    pub reads: f64,
    pub writes: f64,
    pub watches: f64,
}

impl ApiCount {
    pub fn of(served: &Requests, own: u64, rest: &PerSecond, over: Duration) -> ApiCount {
        let s = over.as_secs_f64();
        // The benchmark made one creation (a write) and `own - 1` reads.
        ApiCount {
            reads: (served.reads() - own.saturating_sub(1) as f64 - rest.reads * s).max(0.0),
            writes: (served.writes() - 1.0 - rest.writes * s).max(0.0),
            watches: (served.watches() - rest.watches * s).max(0.0),
        }
    }

    pub fn total(&self) -> f64 {
        self.reads + self.writes + self.watches
    }
}

/// The apiserver's figures for the report.
pub struct ApiFigures<'a> {
    pub at_rest: PerSecond,
    /// Per case, the managed TLS runs.
    pub per_migration: &'a [Vec<ApiCount>],
}

/// The median by total of `counts`.
pub fn median_count(counts: &[ApiCount]) -> ApiCount {
    let mut v = counts.to_vec();
    v.sort_by(|a, b| a.total().total_cmp(&b.total()));
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// One table row: the first column left-aligned, the rest right-aligned.
pub fn row(cells: &[&str]) {
    let mut line = format!("{:<5}", cells[0]);
    for c in &cells[1..] {
        line.push_str(&format!(" {c:>10}"));
    }
    println!("{line}");
}

/// The raw QEMU runs of each case, plain and over TLS.
pub struct RawSides<'a> {
    pub plain: &'a [Vec<RawRun>],
    pub tls: &'a [Vec<RawRun>],
}

/// The median total and downtime of raw runs.
pub fn raw_medians(runs: &[RawRun]) -> (Duration, Duration) {
    (
        median(&runs.iter().map(|r| r.total).collect::<Vec<_>>()),
        median(
            &runs
                .iter()
                .map(|r| Duration::from_millis(r.downtime_ms))
                .collect::<Vec<_>>(),
        ),
    )
}

/// The Ferry runs of each case, per variant.
pub struct FerrySides<'a> {
    pub tls: &'a [Vec<FerryRun>],
    pub plain: &'a [Vec<FerryRun>],
    pub p2p: &'a [Vec<FerryRun>],
    pub tunnelled: &'a [Vec<FerryRun>],
}

pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

pub fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Phase durations as JSON.
pub fn phases_json(p: &[Duration; 5]) -> Value {
    json!({"begin": ms_f(p[0]), "prepare": ms_f(p[1]), "perform": ms_f(p[2]),
           "finish": ms_f(p[3]), "confirm": ms_f(p[4])})
}

/// Prints the tables of a run of `runs` migrations per cell, on a `memory_mib` guest,
/// for the cases named `names`, and returns the same as JSON.
#[allow(clippy::too_many_arguments)] // each is one part of the report
pub fn report(
    memory_mib: u32,
    names: &[&str],
    runs: usize,
    policy: &ferry_agent::policy::Policy,
    raw_sides: &RawSides,
    ferry: &FerrySides,
    concurrency: &[(usize, Vec<FerryRun>, Duration)],
    rss: &[(String, u64)],
    api: &ApiFigures,
) -> Value {
    println!(
        "\nFerry vs raw QEMU over QMP — {memory_mib} MiB guest rewriting 400 MiB, medians of {runs} runs, policy {policy:?}\n"
    );
    row(&[
        "case",
        "dirty MiB/s",
        "raw ms",
        "raw tls ms",
        "ferry ms",
        "ratio",
        "tls ratio",
        "plain ms",
        "plain ratio",
        "p2p ms",
        "p2p ratio",
        "tunnel ms",
        "tun/raw tls",
        "qemu raw",
        "qemu ferry",
        "dt raw",
        "dt raw tls",
        "dt ferry",
        "overhead",
        "Begin",
        "Prepare",
        "Perform",
        "Finish",
        "Confirm",
    ]);
    let mut cases = Vec::new();
    let mut compared = Vec::new();
    for (c, (case, raw)) in names.iter().zip(raw_sides.plain).enumerate() {
        let (tls, plain, p2p) = (&ferry.tls[c], &ferry.plain[c], &ferry.p2p[c]);
        let (raw_total, dt_raw) = raw_medians(raw);
        let (raw_tls_total, dt_raw_tls) = raw_medians(&raw_sides.tls[c]);
        let (m, pl, pp) = (Medians::of(tls), Medians::of(plain), Medians::of(p2p));
        let tunnelled = &ferry.tunnelled[c];
        let tn = Medians::of(tunnelled);
        let ratio_tunnel_raw_tls = ratio(tn.total, raw_tls_total);
        let dirty = median(
            &raw.iter()
                .map(|r| Duration::from_millis(r.dirty_rate_bytes_per_second >> 20))
                .collect::<Vec<_>>(),
        )
        .as_millis();
        let qemu_raw = median(
            &raw.iter()
                .map(|r| Duration::from_millis(r.migration_ms))
                .collect::<Vec<_>>(),
        );
        let ratio_raw_tls = ratio(m.total, raw_tls_total);
        let (ratio_tls, ratio_plain, ratio_p2p) = (
            ratio(m.total, raw_total),
            ratio(pl.total, raw_total),
            ratio(pp.total, raw_total),
        );
        row(&[
            *case,
            &dirty.to_string(),
            &ms(raw_total),
            &ms(raw_tls_total),
            &ms(m.total),
            &format!("{ratio_tls:.2}"),
            &format!("{ratio_raw_tls:.2}"),
            &ms(pl.total),
            &format!("{ratio_plain:.2}"),
            &ms(pp.total),
            &format!("{ratio_p2p:.2}"),
            &ms(tn.total),
            &format!("{ratio_tunnel_raw_tls:.2}"),
            &ms(qemu_raw),
            &ms(m.migration),
            &ms(dt_raw),
            &ms(dt_raw_tls),
            &ms(m.downtime),
            &ms(m.overhead),
            &ms(m.phases[0]),
            &ms(m.phases[1]),
            &ms(m.phases[2]),
            &ms(m.phases[3]),
            &ms(m.phases[4]),
        ]);
        compared.push((*case, m, pp));
        let totals = |runs: &[FerryRun]| runs.iter().map(|r| ms_f(r.total)).collect::<Vec<_>>();
        cases.push(json!({
            "case": *case, "runs": runs, "dirty_rate_mib_s": dirty,
            "raw_total_ms": ms_f(raw_total), "raw_tls_total_ms": ms_f(raw_tls_total),
            "ferry_total_ms": ms_f(m.total),
            "ratio": ratio_tls, "ratio_vs_raw_tls": ratio_raw_tls,
            "raw_tls_downtime_ms": dt_raw_tls.as_millis(), "ferry_plain_total_ms": ms_f(pl.total), "plain_ratio": ratio_plain,
            "ferry_p2p_total_ms": ms_f(pp.total), "p2p_ratio": ratio_p2p,
            "raw_qemu_migration_ms": qemu_raw.as_millis(),
            "ferry_qemu_migration_ms": m.migration.as_millis(), "raw_downtime_ms": dt_raw.as_millis(),
            "ferry_downtime_ms": m.downtime.as_millis(),
            "control_plane_overhead_ms": ms_f(m.overhead),
            "phase_ms": phases_json(&m.phases),
            "p2p": {"total_ms": ms_f(pp.total), "control_plane_overhead_ms": ms_f(pp.overhead),
                    "downtime_ms": pp.downtime.as_millis(), "qemu_migration_ms": pp.migration.as_millis(),
                    "phase_ms": phases_json(&pp.phases),
                    "total_vs_managed": ratio(pp.total, m.total),
                    "overhead_vs_managed_ms": ms_f(pp.overhead) - ms_f(m.overhead)},
            "raw_runs_ms": raw.iter().map(|r| ms_f(r.total)).collect::<Vec<_>>(),
            "raw_tls_runs_ms": raw_sides.tls[c].iter().map(|r| ms_f(r.total)).collect::<Vec<_>>(),
            "ferry_runs_ms": totals(tls),
            "ferry_plain_runs_ms": totals(plain),
            "ferry_p2p_runs_ms": totals(p2p),
            "tunnelled": {"total_ms": ms_f(tn.total), "vs_raw_tls": ratio_tunnel_raw_tls,
                          "vs_raw": ratio(tn.total, raw_total),
                          "control_plane_overhead_ms": ms_f(tn.overhead),
                          "downtime_ms": tn.downtime.as_millis(),
                          "qemu_migration_ms": tn.migration.as_millis(),
                          "runs_ms": totals(tunnelled)},
        }));
    }
    println!("\nmanaged vs peer-to-peer, both TLS (overhead: creation → Perform start)\n");
    row(&[
        "case",
        "mgd ms",
        "p2p ms",
        "p2p/mgd",
        "mgd ovh",
        "p2p ovh",
        "ovh diff",
        "dt p2p",
        "p2p Begin",
        "p2p Prep",
        "p2p Perf",
        "p2p Fin",
        "p2p Conf",
    ]);
    for (name, m, pp) in &compared {
        let diff = ms_f(pp.overhead) - ms_f(m.overhead);
        row(&[
            name,
            &ms(m.total),
            &ms(pp.total),
            &format!("{:.2}", ratio(pp.total, m.total)),
            &ms(m.overhead),
            &ms(pp.overhead),
            &format!("{diff:+.1}"),
            &ms(pp.downtime),
            &ms(pp.phases[0]),
            &ms(pp.phases[1]),
            &ms(pp.phases[2]),
            &ms(pp.phases[3]),
            &ms(pp.phases[4]),
        ]);
    }
    println!(
        "\n{:<8} {:>12} {:>14} {:>15} {:>13}",
        "at once", "all done ms", "median ms", "median overhead", "max downtime"
    );
    let mut conc = Vec::new();
    for (k, results, makespan) in concurrency {
        let total = median(&results.iter().map(|r| r.total).collect::<Vec<_>>());
        let overhead = median(&results.iter().map(|r| r.overhead).collect::<Vec<_>>());
        let downtime = results.iter().map(|r| r.downtime_ms).max().unwrap_or(0);
        println!(
            "{:<8} {:>12} {:>14} {:>15} {:>13}",
            k,
            ms(*makespan),
            ms(total),
            ms(overhead),
            downtime
        );
        conc.push(json!({"at_once": k, "makespan_ms": makespan.as_secs_f64() * 1e3,
                         "median_total_ms": total.as_secs_f64() * 1e3,
                         "median_overhead_ms": overhead.as_secs_f64() * 1e3, "max_downtime_ms": downtime}));
    }
    let r = api.at_rest;
    println!(
        "\napiserver requests at rest: {:.1}/s (reads {:.1}, writes {:.1}, watches {:.1})",
        r.reads + r.writes + r.watches,
        r.reads,
        r.writes,
        r.watches
    );
    let mut api_json = Vec::new();
    for (case, counts) in names.iter().zip(api.per_migration) {
        let c = median_count(counts);
        println!(
            "apiserver requests per migration, {} (managed, TLS; the bench's own and the rate at rest taken off): {:.0} (reads {:.0}, writes {:.0}, watches {:.0})",
            *case,
            c.total(),
            c.reads,
            c.writes,
            c.watches
        );
        api_json.push(json!({"case": *case, "total": c.total(), "reads": c.reads,
                             "writes": c.writes, "watches": c.watches}));
    }
    println!(
        "\npeak RSS: {}",
        rss.iter()
            .map(|(n, k)| format!("{n} {:.1} MiB", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    json!({
        "guest": {"memory_mib": memory_mib, "dirtied_mib": 400},
        "policy": format!("{policy:?}"),
        "cases": cases,
        "concurrency": conc,
        "apiserver": {"at_rest_per_s": {"reads": r.reads, "writes": r.writes, "watches": r.watches},
                      "per_migration": api_json},
        "peak_rss_kib": rss.iter().map(|(n, k)| (n.clone(), json!(k))).collect::<serde_json::Map<_, _>>(),
    })
}

//! `make bench`: Ferry against raw QEMU, on the same guest and parameters, in one run.
//!
//! Usage: ferry-bench [--runs N] [--json PATH]
//!
//! Cases: a 512 MiB test guest rewriting 400 MiB, at a low and at a high dirty rate.
//! For each, N raw migrations (two QEMUs driven over QMP, the baseline) in plain TCP and
//! N over TLS (QEMU's TLS with node certificates, as Ferry's default), N
//! Ferry migrations with TLS on the stream (the default; object created → Succeeded
//! through the control plane, operator and agents), N Ferry migrations in plain TCP
//! (`transport.tls: false`), N Ferry migrations with TLS in peer-to-peer mode
//! (`mode: PeerToPeer`: the source agent drives the phases, calling the target agent)
//! and N tunnelled through the agents (`transport.mode: Tunnelled`, compared with raw
//! QEMU over TLS: the same encryption strength, done by the agents); then the post-copy
//! case (the high-dirty guest under a policy without auto-converge that allows
//! post-copy: raw QEMU over TLS and Ferry, each switching when the policy decides,
//! `bench/postcopy.rs`); then 1, 4 and 8 Ferry migrations at once (managed, TLS); then the peak RSS of the
//! operator and the agents. Medians are printed as tables (the second compares managed
//! with peer-to-peer) and written as JSON.

use std::path::Path;
use std::time::Duration;

use ferry_agent::domain::Domain;
use ferry_agent::testguest::{self, Params};
use ferry_crds::{ControlMode, MigrationPolicy, VirtualMachine, VirtualMachineMigration};
use ferry_tests::Cluster;
use ferry_tests::bench::apiserver::Requests;
use ferry_tests::bench::ferry::{self as ferry_side, FerryRun, Medians, Variant};
use ferry_tests::bench::postcopy;
use ferry_tests::bench::raw::{self, Error, RawRun};
use ferry_tests::bench::{median, ms, peak_rss_kib};
use ferry_tests::cluster::Heartbeat;
use kube::Api;
use serde_json::{Value, json};

const MEMORY_MIB: u32 = 512;

struct Case {
    name: &'static str,
    params: Params,
}

const CASES: [Case; 2] = [
    // About 4 s a pass under TCG: some tens of MiB/s dirtied.
    Case {
        name: "low",
        params: Params {
            region_start_mib: 1,
            region_end_mib: 401,
            delay: 1_500_000_000,
        },
    },
    // As fast as the guest can: hundreds of MiB/s dirtied.
    Case {
        name: "high",
        params: Params {
            region_start_mib: 1,
            region_end_mib: 401,
            delay: 0,
        },
    },
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut runs = 5usize;
    let mut json_path = std::path::PathBuf::from("target/bench.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).unwrap_or(runs),
            "--json" => json_path = args.next().map(Into::into).unwrap_or(json_path),
            other => {
                eprintln!("unknown argument {other}; usage: ferry-bench [--runs N] [--json PATH]");
                std::process::exit(2);
            }
        }
    }
    match run(runs.max(1)).await {
        Ok(report) => {
            if let Some(dir) = json_path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
            println!("\nJSON: {}", json_path.display());
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{:012x}", 0xbe0000 + i)
}

async fn run(runs: usize) -> Result<Value, Error> {
    let policy = ferry_agent::policy::resolve(&MigrationPolicy::default())?;
    let work = tempfile::Builder::new().prefix("ferry-bench-").tempdir()?;
    // Namespace default's directory of the clusters' read-write storage root.
    let images = &Path::new(ferry_tests::cluster::DISKS_ROOT).join("default");
    std::fs::create_dir_all(images)?;
    for case in &CASES {
        std::fs::write(
            images.join(format!("bench-{}.img", case.name)),
            testguest::image(case.params)?,
        )?;
    }

    // The baseline, in plain TCP and over TLS (the same encryption as Ferry's default).
    let node_tls = raw::NodeTls::generate()?;
    let mut raw_runs: Vec<Vec<RawRun>> = Vec::new();
    let mut raw_tls_runs: Vec<Vec<RawRun>> = Vec::new();
    for (c, case) in CASES.iter().enumerate() {
        let disk = work.path().join(format!("raw-{}.img", case.name));
        std::fs::write(&disk, testguest::image(case.params)?)?;
        let vm = ferry_side::vm(
            &format!("raw-{}", case.name),
            &uuid(c),
            MEMORY_MIB,
            &disk.display().to_string(),
            "-",
        );
        let domain = Domain::parse(&vm.spec.domain_xml)?;
        for tls in [None, Some(&node_tls)] {
            let label = if tls.is_some() { "tls" } else { "plain" };
            let results = raw::chain(
                &domain,
                &work.path().join(format!("raw-{}-{label}", case.name)),
                &policy,
                tls,
                runs,
                case.params.region_end_mib - case.params.region_start_mib,
            )
            .await?;
            for (i, r) in results.iter().enumerate() {
                eprintln!(
                    "raw   {:<4} {label:<5} run {i}: {} ms, downtime {} ms",
                    case.name,
                    ms(r.total),
                    r.downtime_ms
                );
            }
            match tls {
                Some(_) => raw_tls_runs.push(results),
                None => raw_runs.push(results),
            }
        }
    }

    // The post-copy case's baseline: the high-dirty guest over TLS, same policy.
    let pc_policy = ferry_agent::policy::resolve(&postcopy::spec())?;
    let mut pc = postcopy::Case::default();
    {
        let case = &CASES[1];
        let disk = work.path().join("raw-pc.img");
        std::fs::write(&disk, testguest::image(case.params)?)?;
        let vm = ferry_side::vm(
            "raw-pc",
            &uuid(2),
            MEMORY_MIB,
            &disk.display().to_string(),
            "-",
        );
        let domain = Domain::parse(&vm.spec.domain_xml)?;
        pc.raw_tls = raw::chain(
            &domain,
            &work.path().join("raw-pc-tls"),
            &pc_policy,
            Some(&node_tls),
            runs,
            case.params.region_end_mib - case.params.region_start_mib,
        )
        .await?;
        for (i, r) in pc.raw_tls.iter().enumerate() {
            eprintln!(
                "raw   pc   tls   run {i}: {} ms, downtime {} ms, post-copy {}",
                ms(r.total),
                r.downtime_ms,
                r.post_copy
            );
        }
    }

    // Ferry, with the chart's limits raised so that 8 migrations really run at once, and
    // the agents' own heartbeat (not the tests' 5 s Lease). Its files stay in
    // target/bench-cluster (the components' logs), replaced by the next run.
    let keep = std::env::current_dir()?.join("target/bench-cluster");
    let _ = std::fs::remove_dir_all(&keep);
    let mut cluster = Cluster::up_with_heartbeat(
        &["node-a", "node-b"],
        Some(&keep),
        &[
            "migrations.maxParallel=8",
            "migrations.maxOutboundPerNode=8",
        ],
        Heartbeat::DEFAULTS,
    )
    .await?;
    let client = cluster.client().await?;
    // The apiserver's requests at rest (heartbeats, leader election), over a while.
    let rest_started = std::time::Instant::now();
    let rest_before = Requests::scrape(&client).await?;
    tokio::time::sleep(REST_WINDOW).await;
    let at_rest = PerSecond::of(
        &Requests::scrape(&client).await?.since(&rest_before),
        rest_started.elapsed(),
    );
    eprintln!("apiserver at rest: {at_rest:?} requests/s");
    let mut api_counts: Vec<Vec<ApiCount>> = Vec::new();
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let mut ferry_runs: Vec<Vec<FerryRun>> = Vec::new();
    let mut plain_runs: Vec<Vec<FerryRun>> = Vec::new();
    let mut p2p_runs: Vec<Vec<FerryRun>> = Vec::new();
    let mut tunnelled_runs: Vec<Vec<FerryRun>> = Vec::new();
    for (c, case) in CASES.iter().enumerate() {
        let name = format!("bench-{}", case.name);
        let disk = images.join(format!("{name}.img")).display().to_string();
        ferry_side::start_vm(
            &vms,
            &ferry_side::vm(&name, &uuid(10 + c), MEMORY_MIB, &disk, "node-a"),
        )
        .await?;
        wait_passes(&cluster, "node-a", &name, 2).await?;
        let mut results = Vec::new();
        let mut plain = Vec::new();
        let mut p2p = Vec::new();
        let mut tunnelled = Vec::new();
        let mut counts = Vec::new();
        // One unmeasured migration first, as for the baseline; then TLS (the default),
        // plain TCP, peer-to-peer with TLS, and tunnelled; the guest goes back and forth
        // throughout.
        for i in 0..=Variant::ALL.len() * runs {
            let variant = Variant::of(i, runs);
            let (transport, mode) = Variant::spec(variant);
            let target = if i % 2 == 0 { "node-b" } else { "node-a" };
            let m = ferry_side::migration(&format!("{name}-{i}"), &name, target, &transport, mode);
            let counted_from = std::time::Instant::now();
            let before = Requests::scrape(&client).await?;
            let (mut r, _, own) = ferry_side::migrate_all_counted(&vmms, &[m]).await?;
            // The operator's last writes (the VM released, Events) come just after.
            tokio::time::sleep(SETTLE).await;
            let served = Requests::scrape(&client).await?.since(&before);
            let count = ApiCount::of(&served, own, &at_rest, counted_from.elapsed());
            let r = r.remove(0);
            let Some(variant) = variant else { continue };
            if variant == Variant::Tls {
                eprintln!(
                    "ferry {:<4} run {i}: apiserver requests {count:?}",
                    case.name
                );
                counts.push(count);
            }
            eprintln!(
                "ferry {:<4} {variant:?} run {i}: {} ms, overhead {} ms, downtime {} ms",
                case.name,
                ms(r.total),
                ms(r.overhead),
                r.downtime_ms
            );
            match variant {
                Variant::Tls => results.push(r),
                Variant::Plain => plain.push(r),
                Variant::PeerToPeer => p2p.push(r),
                Variant::Tunnelled => tunnelled.push(r),
            }
        }
        vms.delete(&name, &Default::default()).await?;
        ferry_runs.push(results);
        plain_runs.push(plain);
        p2p_runs.push(p2p);
        tunnelled_runs.push(tunnelled);
        api_counts.push(counts);
    }

    // The post-copy case through Ferry: managed, TLS, the case's policy; one unmeasured
    // migration first.
    {
        let name = "bench-pc";
        let disk = images.join("bench-pc.img");
        std::fs::write(&disk, testguest::image(CASES[1].params)?)?;
        let disk = disk.display().to_string();
        ferry_side::start_vm(
            &vms,
            &ferry_side::vm(name, &uuid(12), MEMORY_MIB, &disk, "node-a"),
        )
        .await?;
        wait_passes(&cluster, "node-a", name, 2).await?;
        for i in 0..=runs {
            let target = if i % 2 == 0 { "node-b" } else { "node-a" };
            let m = ferry_side::migration(
                &format!("{name}-{i}"),
                name,
                target,
                &Default::default(),
                ControlMode::Managed,
            );
            let m = ferry_side::with_policy(m, postcopy::spec());
            let (mut r, _) = ferry_side::migrate_all(&vmms, &[m]).await?;
            let r = r.remove(0);
            eprintln!(
                "ferry pc   run {i}: {} ms, downtime {} ms, post-copy {}",
                ms(r.total),
                r.downtime_ms,
                r.post_copy
            );
            if i > 0 {
                pc.ferry.push(r);
            }
        }
        vms.delete(name, &Default::default()).await?;
    }

    // 1, 4 and 8 at once (the low dirty rate guest).
    let mut concurrency = Vec::new();
    let mut at = ["node-a"; 8];
    for i in 0..8 {
        // A disk each: QEMU locks its image.
        let name = format!("conc-{i}");
        let disk = images.join(format!("bench-{name}.img"));
        std::fs::write(&disk, testguest::image(CASES[0].params)?)?;
        let disk = disk.display().to_string();
        ferry_side::start_vm(
            &vms,
            &ferry_side::vm(&name, &uuid(20 + i), MEMORY_MIB, &disk, "node-a"),
        )
        .await?;
    }
    for i in 0..8 {
        wait_passes(&cluster, "node-a", &format!("conc-{i}"), 1).await?;
    }
    for k in [1usize, 4, 8] {
        let ms_: Vec<VirtualMachineMigration> = (0..k)
            .map(|i| {
                let to = if at[i] == "node-a" {
                    "node-b"
                } else {
                    "node-a"
                };
                at[i] = to;
                ferry_side::migration(
                    &format!("conc-{k}-{i}"),
                    &format!("conc-{i}"),
                    to,
                    &Default::default(),
                    ControlMode::Managed,
                )
            })
            .collect();
        let (results, makespan) = ferry_side::migrate_all(&vmms, &ms_).await?;
        eprintln!("ferry {k} at once: all done in {} ms", ms(makespan));
        concurrency.push((k, results, makespan));
    }
    let rss: Vec<(String, u64)> = cluster
        .component_pids()
        .into_iter()
        .filter_map(|(name, pid)| Some((name, peak_rss_kib(pid)?)))
        .collect();
    cluster.kill_operator();
    drop(cluster);

    let pc_report = postcopy::report(&pc, pc_policy.max_downtime_ms);
    let mut report = report(
        runs,
        &policy,
        &RawSides {
            plain: &raw_runs,
            tls: &raw_tls_runs,
        },
        &FerrySides {
            tls: &ferry_runs,
            plain: &plain_runs,
            p2p: &p2p_runs,
            tunnelled: &tunnelled_runs,
        },
        &concurrency,
        &rss,
        &ApiFigures {
            at_rest,
            per_migration: &api_counts,
        },
    );
    report["post_copy"] = pc_report;
    Ok(report)
}

/// How long the apiserver's requests at rest are counted.
const REST_WINDOW: Duration = Duration::from_secs(10);
/// How long after a migration succeeded its requests are still counted.
const SETTLE: Duration = Duration::from_secs(1);

/// Requests per second, by kind.
#[derive(Debug, Clone, Copy, Default)]
struct PerSecond {
    reads: f64,
    writes: f64,
    watches: f64,
}

impl PerSecond {
    fn of(r: &Requests, over: Duration) -> PerSecond {
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
struct ApiCount {
    reads: f64,
    writes: f64,
    watches: f64,
}

impl ApiCount {
    fn of(served: &Requests, own: u64, rest: &PerSecond, over: Duration) -> ApiCount {
        let s = over.as_secs_f64();
        // The benchmark made one creation (a write) and `own - 1` reads.
        ApiCount {
            reads: (served.reads() - own.saturating_sub(1) as f64 - rest.reads * s).max(0.0),
            writes: (served.writes() - 1.0 - rest.writes * s).max(0.0),
            watches: (served.watches() - rest.watches * s).max(0.0),
        }
    }

    fn total(&self) -> f64 {
        self.reads + self.writes + self.watches
    }
}

/// The apiserver's figures for the report.
struct ApiFigures<'a> {
    at_rest: PerSecond,
    /// Per case, the managed TLS runs.
    per_migration: &'a [Vec<ApiCount>],
}

/// The median by total of `counts`.
fn median_count(counts: &[ApiCount]) -> ApiCount {
    let mut v = counts.to_vec();
    v.sort_by(|a, b| a.total().total_cmp(&b.total()));
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// One table row: the first column left-aligned, the rest right-aligned.
fn row(cells: &[&str]) {
    let mut line = format!("{:<5}", cells[0]);
    for c in &cells[1..] {
        line.push_str(&format!(" {c:>10}"));
    }
    println!("{line}");
}

async fn wait_passes(cluster: &Cluster, node: &str, vm: &str, n: usize) -> Result<(), Error> {
    let dir = cluster.serial_log(node, vm);
    let dir = dir.parent().expect("a VM dir");
    for _ in 0..1200 {
        if raw::passes(dir) >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{vm} did not start counting").into())
}

/// The raw QEMU runs of each case, plain and over TLS.
struct RawSides<'a> {
    plain: &'a [Vec<RawRun>],
    tls: &'a [Vec<RawRun>],
}

/// The median total and downtime of raw runs.
fn raw_medians(runs: &[RawRun]) -> (Duration, Duration) {
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
struct FerrySides<'a> {
    tls: &'a [Vec<FerryRun>],
    plain: &'a [Vec<FerryRun>],
    p2p: &'a [Vec<FerryRun>],
    tunnelled: &'a [Vec<FerryRun>],
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Phase durations as JSON.
fn phases_json(p: &[Duration; 5]) -> Value {
    json!({"begin": ms_f(p[0]), "prepare": ms_f(p[1]), "perform": ms_f(p[2]),
           "finish": ms_f(p[3]), "confirm": ms_f(p[4])})
}

fn report(
    runs: usize,
    policy: &ferry_agent::policy::Policy,
    raw_sides: &RawSides,
    ferry: &FerrySides,
    concurrency: &[(usize, Vec<FerryRun>, Duration)],
    rss: &[(String, u64)],
    api: &ApiFigures,
) -> Value {
    println!(
        "\nFerry vs raw QEMU over QMP — {MEMORY_MIB} MiB guest rewriting 400 MiB, medians of {runs} runs, policy {policy:?}\n"
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
    for (c, (case, raw)) in CASES.iter().zip(raw_sides.plain).enumerate() {
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
            case.name,
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
        compared.push((case.name, m, pp));
        let totals = |runs: &[FerryRun]| runs.iter().map(|r| ms_f(r.total)).collect::<Vec<_>>();
        cases.push(json!({
            "case": case.name, "runs": runs, "dirty_rate_mib_s": dirty,
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
    for (case, counts) in CASES.iter().zip(api.per_migration) {
        let c = median_count(counts);
        println!(
            "apiserver requests per migration, {} (managed, TLS; the bench's own and the rate at rest taken off): {:.0} (reads {:.0}, writes {:.0}, watches {:.0})",
            case.name,
            c.total(),
            c.reads,
            c.writes,
            c.watches
        );
        api_json.push(
            json!({"case": case.name, "total": c.total(), "reads": c.reads,
                             "writes": c.writes, "watches": c.watches}),
        );
    }
    println!(
        "\npeak RSS: {}",
        rss.iter()
            .map(|(n, k)| format!("{n} {:.1} MiB", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    json!({
        "guest": {"memory_mib": MEMORY_MIB, "dirtied_mib": 400},
        "policy": format!("{policy:?}"),
        "cases": cases,
        "concurrency": conc,
        "apiserver": {"at_rest_per_s": {"reads": r.reads, "writes": r.writes, "watches": r.watches},
                      "per_migration": api_json},
        "peak_rss_kib": rss.iter().map(|(n, k)| (n.clone(), json!(k))).collect::<serde_json::Map<_, _>>(),
    })
}

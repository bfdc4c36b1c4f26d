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
use ferry_tests::bench::ferry::{self as ferry_side, FerryRun, Variant};
use ferry_tests::bench::postcopy;
use ferry_tests::bench::raw::{self, Error, RawRun};
use ferry_tests::bench::report::{self, ApiCount, ApiFigures, FerrySides, PerSecond, RawSides};
use ferry_tests::bench::{ms, peak_rss_kib};
use ferry_tests::cluster::Heartbeat;
use kube::Api;
use serde_json::Value;

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
    let mut report = report::report(
        MEMORY_MIB,
        &CASES.map(|c| c.name),
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

//! The soak: 100 back-to-back migrations of one guest between two nodes, with no
//! failure, and the resident memory (VmRSS) of the operator and the agents sampled at
//! the start and every 10 migrations; it prints the samples, and the growth from the
//! end of a 10-migration warm-up to the end. The chart's history limit
//! (`migrations.historyLimit`, 10) keeps the number of migration objects — and so the
//! watch caches — bounded; the test checks it. `make soak` runs it; it is not part of
//! `make test`.

use std::time::{Duration, Instant};

use ferry_crds::{MigrationPhase, VirtualMachineMigration};
use ferry_tests::e2e_support::*;
use kube::Api;
use kube::api::ListParams;

/// Migrations in a row (`FERRY_SOAK_MIGRATIONS` overrides it, e.g. to run past the 6
/// minutes kube's Event recorder keeps each Event it published in its cache).
const MIGRATIONS: usize = 100;
/// RSS is sampled every this many migrations; the first sample after it ends the warm-up.
const EVERY: usize = 10;
/// The chart's default `migrations.historyLimit`.
const HISTORY_LIMIT: usize = 10;

#[tokio::test]
#[ignore = "100 migrations take several minutes; `make soak` runs it"]
async fn a_hundred_back_to_back_migrations() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let rss = || {
        cluster
            .component_pids()
            .into_iter()
            .map(|(who, pid)| (who, vm_rss_kib(pid).unwrap_or(0)))
            .collect::<Vec<_>>()
    };
    let migrations = std::env::var("FERRY_SOAK_MIGRATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(MIGRATIONS);
    let mut samples = vec![(0, rss())];
    let begun = Instant::now();
    let mut at = "node-a";
    for i in 0..migrations {
        let to = if at == "node-a" { "node-b" } else { "node-a" };
        let before = last_pass(&cluster, at, "demo").unwrap_or(0);
        let name = format!("soak-{i}");
        apply_yaml(&cluster, &migration_yaml(&name, to, UNLIMITED)).await;
        wait_phase(
            &vmms,
            &name,
            MigrationPhase::Succeeded,
            Duration::from_secs(180),
        )
        .await;
        runs_once_on(&cluster, &vms, to).await;
        let first = eventually("the guest to print", Duration::from_secs(60), || async {
            last_pass(&cluster, to, "demo")
        })
        .await;
        assert!(
            first > before,
            "the counter went back: {first} after {before}"
        );
        at = to;
        if (i + 1) % EVERY == 0 {
            samples.push((i + 1, rss()));
        }
    }
    guest_goes_on(&cluster, at, 0).await;
    // The history limit: the operator deleted all but the newest finished migrations.
    let kept = eventually(
        "the history limit to delete old migrations",
        Duration::from_secs(30),
        || async {
            let n = vmms.list(&ListParams::default()).await.ok()?.items.len();
            (n <= HISTORY_LIMIT).then_some(n)
        },
    )
    .await;
    println!(
        "\nsoak: {migrations} migrations, 0 failures, {:.0} s; {kept} migration objects kept (history limit {HISTORY_LIMIT})",
        begun.elapsed().as_secs_f64()
    );
    let names: Vec<&String> = samples[0].1.iter().map(|(who, _)| who).collect();
    println!(
        "| migrations | {} |",
        names
            .iter()
            .map(|n| format!("{n:>13}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for (n, sample) in &samples {
        println!(
            "| {n:>10} | {} |",
            sample
                .iter()
                .map(|(_, kib)| format!("{kib:>9} KiB"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let warm = &samples[1].1;
    let end = &samples[samples.len() - 1].1;
    for ((who, w), (_, e)) in warm.iter().zip(end) {
        println!(
            "{who}: VmRSS {:.1} MiB after the {EVERY}-migration warm-up, {:.1} MiB at the end ({:+.1} MiB)",
            *w as f64 / 1024.0,
            *e as f64 / 1024.0,
            (*e as f64 - *w as f64) / 1024.0
        );
    }
}

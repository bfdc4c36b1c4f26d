//! The soak: 100 back-to-back migrations of one guest between two nodes, with no
//! failure, and the resident memory of the operator and the agents sampled (VmRSS) at
//! the start and the end. `make soak` runs it; it is not part of `make test`.

use std::time::{Duration, Instant};

use ferry_crds::{MigrationPhase, VirtualMachineMigration};
use ferry_tests::e2e_support::*;
use kube::Api;

const MIGRATIONS: usize = 100;

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
    let start_rss = rss();
    let begun = Instant::now();
    let mut at = "node-a";
    for i in 0..MIGRATIONS {
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
    }
    guest_goes_on(&cluster, at, 0).await;
    let end_rss = rss();
    println!(
        "\nsoak: {MIGRATIONS} migrations, 0 failures, {:.0} s",
        begun.elapsed().as_secs_f64()
    );
    println!("| component    | VmRSS start | VmRSS end |");
    for ((who, start), (_, end)) in start_rss.iter().zip(&end_rss) {
        println!("| {who:<12} | {start:>8} KiB | {end:>6} KiB |");
    }
}

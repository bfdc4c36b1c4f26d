//! The `kubectl ferry` plugin as a real binary, found by kubectl on PATH, against the
//! real control plane, operator and agents with real QEMU: migrate --wait, watch,
//! cancel, evacuate, save and restore. One test at a time.

use std::process::Output;
use std::time::Duration;

use ferry_crds::{MigrationPhase, VirtualMachineMigration};
use ferry_tests::e2e_support::*;
use ferry_tests::{Cluster, printed, tool};
use kube::Api;

/// `kubectl ferry <args>` with the plugin on PATH and the admin kubeconfig.
async fn ferry(cluster: &Cluster, args: &[&str]) -> Output {
    let plugin = cluster.bin_dir().join("kubectl-ferry");
    assert!(
        plugin.is_file(),
        "{} (cargo build --bins)",
        plugin.display()
    );
    let path = format!(
        "{}:{}",
        cluster.bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    tokio::process::Command::new(tool("kubectl"))
        .arg("ferry")
        .args(args)
        .env("KUBECONFIG", &cluster.cp.kubeconfig)
        .env("PATH", path)
        .output()
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The name in "virtualmachinemigration.ferry.dev/<name> created".
fn created(out: &Output) -> String {
    stdout(out)
        .lines()
        .find_map(|l| {
            l.strip_prefix("virtualmachinemigration.ferry.dev/")?
                .strip_suffix(" created")
        })
        .unwrap_or_else(|| panic!("no name in {}", printed(out)))
        .to_string()
}

#[tokio::test]
async fn the_plugin_migrates_watches_cancels_evacuates_saves_and_restores() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    // A guest with its own disk: the example's image may be locked by another test's
    // QEMU on this host.
    let vms = guests_running(&cluster, &client, "node-a", &["demo"]).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");

    // migrate --wait: progress until the end, then the outcome and the downtime.
    let out = ferry(&cluster, &["migrate", "demo", "--to", "node-b", "--wait"]).await;
    assert!(out.status.success(), "{}", printed(&out));
    let name = created(&out);
    assert!(name.starts_with("demo-"), "{name}");
    assert!(
        stdout(&out).contains(&format!(
            "{name}: Succeeded: demo moved from node-a to node-b"
        )) && stdout(&out).contains("downtime"),
        "{}",
        printed(&out)
    );
    assert!(
        stderr(&out).contains(&format!("{name}: ")),
        "{}",
        printed(&out)
    );
    runs_once_on(&cluster, &vms, "node-b").await;

    // watch, by the VM's name: the transfer's progress, then the outcome; this one
    // peer-to-peer (the source agent drives it).
    let out = ferry(
        &cluster,
        &[
            "migrate",
            "demo",
            "--bandwidth=2",
            "--max-downtime=10000",
            "--peer-to-peer",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", printed(&out));
    let slow = created(&out);
    assert_eq!(
        vmms.get(&slow).await.unwrap().spec.mode,
        ferry_crds::ControlMode::PeerToPeer
    );
    let out = ferry(&cluster, &["watch", "demo"]).await;
    assert!(out.status.success(), "{}", printed(&out));
    let progress = stderr(&out);
    assert!(
        progress
            .lines()
            .any(|l| l.contains("Perform node-b → node-a") && l.contains("MiB/s pass ")),
        "no transfer progress in:\n{progress}"
    );
    assert!(
        stdout(&out).contains(&format!(
            "{slow}: Succeeded: demo moved from node-b to node-a"
        )) && stdout(&out).contains("downtime"),
        "{}",
        printed(&out)
    );
    runs_once_on(&cluster, &vms, "node-a").await;

    // cancel, by the VM's name, a migration that never converges: it ends Cancelled and
    // the guest stays.
    let out = ferry(&cluster, &["migrate", "demo", "--bandwidth=2"]).await;
    assert!(out.status.success(), "{}", printed(&out));
    let endless = created(&out);
    wait_phase(
        &vmms,
        &endless,
        MigrationPhase::Perform,
        Duration::from_secs(60),
    )
    .await;
    let out = ferry(&cluster, &["cancel", "demo"]).await;
    assert!(out.status.success(), "{}", printed(&out));
    assert!(
        stdout(&out).contains(&format!("{endless} cancel requested")),
        "{}",
        printed(&out)
    );
    let out = ferry(&cluster, &["watch", &endless]).await;
    assert!(
        !out.status.success(),
        "a cancelled watch exits 1: {}",
        printed(&out)
    );
    assert!(
        stdout(&out).contains(&format!("{endless}: Cancelled")),
        "{}",
        printed(&out)
    );
    assert_eq!(
        phase_of(&vmms, &endless).await,
        Some(MigrationPhase::Cancelled)
    );
    runs_once_on(&cluster, &vms, "node-a").await;
    let out = ferry(&cluster, &["cancel", "demo"]).await;
    assert!(
        !out.status.success(),
        "nothing left to cancel: {}",
        printed(&out)
    );

    // evacuate: cordons the node and follows the guest out.
    let out = ferry(&cluster, &["evacuate", "node-a"]).await;
    assert!(out.status.success(), "{}", printed(&out));
    let said = stdout(&out);
    assert!(said.contains("node/node-a cordoned"), "{said}");
    assert!(
        said.contains("evacuate-demo-node-a-1: Succeeded: demo moved from node-a to node-b"),
        "{said}"
    );
    assert!(said.contains("node-a evacuated"), "{said}");
    runs_once_on(&cluster, &vms, "node-b").await;
    let node = kubectl_ok(
        &cluster,
        &[
            "get",
            "node",
            "node-a",
            "-o",
            "jsonpath={.spec.unschedulable}",
        ],
    )
    .await;
    assert_eq!(node, "true");

    // save, on node-b, then restore on node-a (uncordoned): the guest goes on.
    kubectl_ok(&cluster, &["uncordon", "node-a"]).await;
    let before = eventually(
        "the guest to count on node-b",
        Duration::from_secs(60),
        || async { last_pass(&cluster, "node-b", "demo") },
    )
    .await;
    // Namespace default's directory of a read-write storage root of the cluster.
    let file = cluster.save_dir("default").join("demo.fsav");
    let file = file.display().to_string();
    let out = ferry(
        &cluster,
        &[
            "save",
            "demo",
            "--path",
            &file,
            "--compression",
            "gzip",
            "--wait",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", printed(&out));
    let said = stdout(&out);
    assert!(
        said.contains(&format!("Succeeded: demo saved on node-b to {file} (Gzip"))
            && said.contains("the VM is stopped"),
        "{said}"
    );
    assert!(
        cluster.qemu_pids("demo").is_empty(),
        "a QEMU runs after the save"
    );
    let out = ferry(
        &cluster,
        &["restore", "demo", "--from", &file, "--node", "node-a"],
    )
    .await;
    assert!(out.status.success(), "{}", printed(&out));
    assert!(
        stdout(&out).contains(&format!(
            "virtualmachine.ferry.dev/demo restores from {file}"
        )),
        "{}",
        printed(&out)
    );
    eventually(
        "the restored VM to run on node-a",
        Duration::from_secs(60),
        || async {
            let s = vms.get("demo").await.ok()?.status?;
            (s.phase == Some(ferry_crds::VmPhase::Running)
                && s.node_name.as_deref() == Some("node-a"))
            .then_some(())
        },
    )
    .await;
    guest_goes_on(&cluster, "node-a", before).await;
    runs_once_on(&cluster, &vms, "node-a").await;
}

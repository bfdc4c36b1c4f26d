//! Tunnelled migrations (`transport.mode: Tunnelled`): the stream goes through the
//! agents' peer API, one mutually authenticated TLS connection per QEMU channel, and
//! neither QEMU touches the network. On the real control plane with real QEMU, in both
//! control modes.

use std::path::Path;
use std::time::Duration;

use ferry_agent::domain::Domain;
use ferry_agent::storage::image_lock_name;
use ferry_crds::{ControlMode, MigrationPhase, VirtualMachineMigration};
use ferry_tests::Cluster;
use ferry_tests::e2e_support::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

/// Two multifd channels and a few seconds of transfer: three tunnel connections (the
/// main stream and one per channel), and time to look at the sockets meanwhile.
const TWO_CHANNELS: &str =
    "    parallelConnections: 2\n    bandwidthMiBps: 8\n    maxDowntimeMs: 10000\n";

/// The value of the agent metric `name` with label `side` on `node` (0 if absent).
async fn tunnel_metric(cluster: &Cluster, node: &str, name: &str, side: &str) -> u64 {
    let n = cluster.node(node);
    let url = format!("http://{}:{}/metrics", n.address, n.metrics_port);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", &url])
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("ferry_agent_{name}_total{{side=\"{side}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// The TCP sockets processes named `process` hold (`ss`), as its lines.
async fn tcp_sockets_of(process: &str) -> Vec<String> {
    let out = tokio::process::Command::new("ss")
        .args(["-tanpH"])
        .output()
        .await
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("((\"{process}")))
        .map(str::to_string)
        .collect()
}

/// One tunnelled migration of the demo VM to `to` in `mode`: while it runs no QEMU has a
/// TCP socket; it ends with the guest once on `to`, its counter going on, the URI and
/// the step messages saying tunnelled, and `connections` tunnel connections carried on
/// each side.
async fn tunnelled_hop(
    cluster: &Cluster,
    vmms: &Api<VirtualMachineMigration>,
    vms: &Api<ferry_crds::VirtualMachine>,
    (mode, name, from, to): (ControlMode, &str, &str, &str),
    connections: u64,
) {
    let before = last_pass(cluster, from, "demo").unwrap_or(0);
    let out_before = tunnel_metric(cluster, from, "tunnel_connections", "source").await;
    let in_before = tunnel_metric(cluster, to, "tunnel_connections", "target").await;
    apply_yaml(
        cluster,
        &tunnelled_migration_yaml(mode, name, to, TWO_CHANNELS),
    )
    .await;
    // While the memory moves, only the agents hold TCP sockets.
    eventually("the transfer", Duration::from_secs(120), || async {
        let p = vmms.get(name).await.ok()?.status?.progress?;
        (p.bytes_transferred > 0).then_some(())
    })
    .await;
    let sockets = tcp_sockets_of("qemu-system").await;
    assert!(
        sockets.is_empty(),
        "a tunnelled QEMU has TCP sockets: {sockets:#?}"
    );
    // (`ss` names the processes: the agents' peer connections show.)
    assert!(
        !tcp_sockets_of("ferry-agent").await.is_empty(),
        "ss shows no agent socket"
    );
    wait_phase(
        vmms,
        name,
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    runs_once_on(cluster, vms, to).await;
    guest_goes_on(cluster, to, before).await;

    let status = vmms.get(name).await.unwrap().status.unwrap();
    let uri = status.migration_uri.clone().unwrap_or_default();
    assert!(uri.starts_with("tunnel:127.0.0."), "migrationURI {uri}");
    let steps = status.steps.clone().unwrap();
    assert_stream(&steps, Some((from, to)));
    for phase in [MigrationPhase::Prepare, MigrationPhase::Perform] {
        let message = steps
            .get(phase)
            .and_then(|s| s.message.clone())
            .unwrap_or_default();
        assert!(
            message.contains("tunnelled through the agents"),
            "{phase:?}: {message}"
        );
    }
    assert_guest_downtime(&status);
    // As in direct mode: the console follows the guest and the disk lock moved with it.
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    let graphics = vm.graphics.expect("the VM reports its console");
    assert!(
        Path::new(&graphics.socket).starts_with(&cluster.node(to).state_dir),
        "{graphics:?}"
    );
    let image = Domain::parse(&vm.domain_xml.unwrap())
        .unwrap()
        .disks()
        .map(|d| d.source.clone())
        .next()
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(vms.clone().into_client(), "ferry-system");
    let lock = leases.get(&image_lock_name(&image)).await.unwrap();
    assert_eq!(lock.spec.unwrap().holder_identity.as_deref(), Some(to));
    let out = tunnel_metric(cluster, from, "tunnel_connections", "source").await - out_before;
    let inn = tunnel_metric(cluster, to, "tunnel_connections", "target").await - in_before;
    assert_eq!(
        (out, inn),
        (connections, connections),
        "tunnel connections (source, target)"
    );
    let bytes = tunnel_metric(cluster, to, "tunnel_bytes", "target").await;
    assert!(
        bytes > 32 << 20,
        "the target carried only {bytes} bytes of a 256 MiB guest"
    );
    println!(
        "{mode:?} tunnelled {from} -> {to}: {connections} connections each side, {} MiB carried \
         into {to} so far, guest downtime {} ms",
        bytes >> 20,
        status.downtime_ms.unwrap_or_default()
    );
}

/// There and back: managed to node-b, peer-to-peer back to node-a, both tunnelled with
/// two multifd channels.
#[tokio::test]
async fn a_tunnelled_migration_goes_through_the_agents_in_both_control_modes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    for hop in [
        (ControlMode::Managed, "tunnel-there", "node-a", "node-b"),
        (ControlMode::PeerToPeer, "tunnel-back", "node-b", "node-a"),
    ] {
        tunnelled_hop(&cluster, &vmms, &vms, hop, 3).await;
    }
}

/// A tunnelled migration asked for in plain TCP is refused at admission, naming the
/// field, and the guest stays where it runs.
#[tokio::test]
async fn a_plain_tcp_tunnel_is_refused_and_the_guest_stays() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let before = last_pass(&cluster, "node-a", "demo").unwrap_or(0);
    let yaml = format!(
        "{}    tls: false\n",
        tunnelled_migration_yaml(test_mode(), "plain-tunnel", "node-b", UNLIMITED)
    );
    apply_yaml(&cluster, &yaml).await;
    wait_phase(
        &vmms,
        "plain-tunnel",
        MigrationPhase::Failed,
        Duration::from_secs(60),
    )
    .await;
    let status = vmms.get("plain-tunnel").await.unwrap().status.unwrap();
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert!(
        failed.message.contains("spec.transport.tls: false")
            && failed.message.contains("transport.mode Tunnelled"),
        "{failed:?}"
    );
    runs_once_on(&cluster, &vms, "node-a").await;
    guest_goes_on(&cluster, "node-a", before).await;
}

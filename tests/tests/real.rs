//! Ferry as deployed (issue 16), on REAL nodes: a kubelet, containerd and kube-proxy per
//! node (tests/src/real), kube-scheduler and kube-controller-manager, the images `make
//! images` built imported into each node's containerd, and the chart installed with
//! `helm install`, unchanged. The operator and the agents run as the chart's Deployment
//! and DaemonSet; their probes decide their readiness.
//!
//! Shown: the Pods Ready; a VM started and migrated with TLS between the two real nodes,
//! its guest intact; the agent DaemonSet restarted (`kubectl rollout restart`), an agent
//! Pod force-deleted, and `helm upgrade` to a new image tag, each while the guest runs:
//! the same QEMU process keeps running, exactly one guest.
//!
//! `make test-real` (needs `make tools-real` and `make images`), the last step of `make test`;
//! the workspace run of `make test` skips it.

use std::path::PathBuf;
use std::time::Duration;

use ferry_crds::{MigrationPhase, VirtualMachine, VmPhase};
use ferry_tests::cluster::{guest_dirs, install_example_disk, qemu_pid};
use ferry_tests::e2e_support::{
    LONG, ONE_AT_A_TIME, assert_stream, eventually, migration_yaml, passes, wait_phase,
};
use ferry_tests::real::{RealCluster, ferry_images};
use ferry_tests::repo_root;
use kube::{Api, Client};

/// QEMU pids of VM `vm`, per node.
fn qemu_pids(cluster: &RealCluster, vm: &str) -> Vec<(String, i32)> {
    cluster
        .nodes
        .iter()
        .filter_map(|n| {
            guest_dirs(&n.state_dir(), vm)
                .iter()
                .find_map(|d| qemu_pid(d))
                .map(|p| (n.name.clone(), p))
        })
        .collect()
}

/// The guest's last pass on `node` (its serial log in the node's state dir).
fn last_pass(cluster: &RealCluster, node: &str, vm: &str) -> Option<u64> {
    let n = cluster.nodes.iter().find(|n| n.name == node)?;
    guest_dirs(&n.state_dir(), vm)
        .iter()
        .filter_map(|d| passes(&d.join("serial0.log")).0.last().copied())
        .max()
}

/// Exactly one QEMU of `demo`, on `node`, the VM Running there, and the guest counting
/// on past what it had counted; returns the pid.
async fn runs_once_and_counts(cluster: &RealCluster, vms: &Api<VirtualMachine>, node: &str) -> i32 {
    let pids = qemu_pids(cluster, "demo");
    assert_eq!(pids.len(), 1, "QEMUs of demo: {pids:?}");
    assert_eq!(pids[0].0, node, "QEMUs of demo: {pids:?}");
    let vm = vms.get("demo").await.unwrap();
    let status = vm.status.unwrap_or_default();
    assert_eq!(status.node_name.as_deref(), Some(node));
    assert_eq!(status.phase, Some(VmPhase::Running));
    let now = last_pass(cluster, node, "demo").unwrap_or(0);
    eventually(
        &format!("the guest to count past {now} on {node}"),
        Duration::from_secs(90),
        || async { (last_pass(cluster, node, "demo")? >= now + 2).then_some(()) },
    )
    .await;
    for n in &cluster.nodes {
        for d in guest_dirs(&n.state_dir(), "demo") {
            assert!(
                !passes(&d.join("serial0.log")).1,
                "a bad page on {}",
                n.name
            );
        }
    }
    pids[0].1
}

async fn kubectl(cluster: &RealCluster, args: &[&str]) -> String {
    let out = cluster.cp.kubectl().args(args).output().await.unwrap();
    let said = ferry_tests::printed(&out);
    assert!(out.status.success(), "kubectl {}: {said}", args.join(" "));
    said
}

async fn helm(cluster: &RealCluster, args: &[&str]) -> String {
    let out = cluster.cp.helm().args(args).output().await.unwrap();
    let said = ferry_tests::printed(&out);
    assert!(out.status.success(), "helm {}: {said}", args.join(" "));
    said
}

/// The agent Pod on `node`.
async fn agent_pod(cluster: &RealCluster, node: &str) -> String {
    kubectl(
        cluster,
        &[
            "-n",
            "ferry-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=agent",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    )
    .await
    .trim()
    .to_string()
}

/// The first bytes the guest's console sends through the console API, if it opens.
async fn console_greeting(client: &Client, ns: &str, vm: &str) -> Option<String> {
    use futures::StreamExt;
    let request = http::Request::get(ferry_crds::console::path(ns, vm))
        .body(vec![])
        .unwrap();
    let mut ws = client.connect(request).await.ok()?.into_stream();
    let read = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(m)))) = read else {
        return None;
    };
    let (channel, data) = ferry_crds::console::unframe(&m)?;
    (channel == ferry_crds::console::DATA_OUT).then(|| String::from_utf8_lossy(data).into_owned())
}

#[tokio::test]
async fn ferry_runs_as_the_charts_pods_on_real_nodes_and_guests_outlive_the_agents() {
    let _one = ONE_AT_A_TIME.lock().await;
    let images = std::env::var_os("FERRY_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/images"));
    let archives = ferry_images(&images).unwrap();
    let cluster = RealCluster::up(&["node-a", "node-b"], None).await.unwrap();
    let _logs = ferry_tests::e2e_support::LogsOnFailure(cluster.cp.dir().to_path_buf());
    install_example_disk().unwrap();
    let parent = format!("agent.guestCgroups.parent={}", cluster.guest_cgroup_value());
    cluster
        .install_ferry(&archives, &["image.pullPolicy=Never", &parent])
        .await
        .unwrap();
    cluster
        .wait_ferry_ready(Duration::from_secs(300))
        .await
        .unwrap();
    println!(
        "{}",
        kubectl(
            &cluster,
            &["-n", "ferry-system", "get", "pods", "-o", "wide"]
        )
        .await
    );
    let client: Client = cluster.cp.admin_client().await.unwrap();
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");

    // A VM on node-a, migrated to node-b with TLS (the example's default).
    kubectl(
        &cluster,
        &[
            "apply",
            "-f",
            &repo_root()
                .join("examples/virtualmachine.yaml")
                .display()
                .to_string(),
        ],
    )
    .await;
    eventually(
        "demo to run on node-a",
        Duration::from_secs(120),
        || async {
            let s = vms.get("demo").await.ok()?.status?;
            (s.phase == Some(VmPhase::Running) && s.node_name.as_deref() == Some("node-a"))
                .then_some(())
        },
    )
    .await;
    let pid = runs_once_and_counts(&cluster, &vms, "node-a").await;
    println!("demo runs on node-a: QEMU pid {pid}");
    // The console through the chart's APIService and Service, as on any cluster: the
    // apiserver's aggregator reaches the operator's Pod, which reaches the agent.
    let greeting = eventually("the console API", Duration::from_secs(120), || async {
        console_greeting(&client, "default", "demo").await
    })
    .await;
    println!("console of default/demo through the apiserver: {greeting:?}");
    // Both agents have their node certificates (TLS on the stream) before the migration.
    for node in ["node-a", "node-b"] {
        let pod = agent_pod(&cluster, node).await;
        eventually(
            &format!("{node}'s migration certificate"),
            Duration::from_secs(120),
            || async {
                let out = cluster
                    .cp
                    .kubectl()
                    .args(["-n", "ferry-system", "logs", &pod])
                    .output()
                    .await
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .contains("migration certificate issued")
                    .then_some(())
            },
        )
        .await;
    }
    kubectl(
        &cluster,
        &[
            "apply",
            "-f",
            &repo_root()
                .join("examples/migration.yaml")
                .display()
                .to_string(),
        ],
    )
    .await;
    let vmms = Api::namespaced(client.clone(), "default");
    wait_phase(
        &vmms,
        "demo-to-node-b",
        MigrationPhase::Succeeded,
        Duration::from_secs(300),
    )
    .await;
    let m: ferry_crds::VirtualMachineMigration = vmms.get("demo-to-node-b").await.unwrap();
    let status = m.status.unwrap_or_default();
    assert_stream(
        &status.steps.clone().unwrap_or_default(),
        Some(("node-a", "node-b")),
    );
    let pid = runs_once_and_counts(&cluster, &vms, "node-b").await;
    println!(
        "demo migrated to node-b with TLS (peer certificates verified), downtime {:?} ms: QEMU pid {pid}",
        status.downtime_ms
    );

    // The agents restarted by a rollout: the guest's QEMU is untouched.
    kubectl(
        &cluster,
        &[
            "-n",
            "ferry-system",
            "rollout",
            "restart",
            "daemonset/ferry-agent",
        ],
    )
    .await;
    kubectl(
        &cluster,
        &[
            "-n",
            "ferry-system",
            "rollout",
            "status",
            "daemonset/ferry-agent",
            "--timeout=300s",
        ],
    )
    .await;
    assert_eq!(runs_once_and_counts(&cluster, &vms, "node-b").await, pid);
    println!("rollout restart daemonset/ferry-agent: QEMU pid {pid} still runs, one guest");

    // Again during a migration (back to node-a, slow enough to be in Perform): it ends
    // by the existing rules, with exactly one guest, where the VM says.
    let yaml = migration_yaml("demo-back", "node-a", LONG);
    let (ok, said) = cluster.cp.apply(&yaml).await;
    assert!(ok, "{said}");
    wait_phase(
        &vmms,
        "demo-back",
        MigrationPhase::Perform,
        Duration::from_secs(120),
    )
    .await;
    kubectl(
        &cluster,
        &[
            "-n",
            "ferry-system",
            "rollout",
            "restart",
            "daemonset/ferry-agent",
        ],
    )
    .await;
    kubectl(
        &cluster,
        &[
            "-n",
            "ferry-system",
            "rollout",
            "status",
            "daemonset/ferry-agent",
            "--timeout=300s",
        ],
    )
    .await;
    let ended = eventually("demo-back to end", Duration::from_secs(300), || async {
        let p = vmms.get("demo-back").await.ok()?.status?.phase?;
        p.is_terminal().then_some(p)
    })
    .await;
    let node = vms
        .get("demo")
        .await
        .unwrap()
        .status
        .unwrap_or_default()
        .node_name
        .unwrap_or_default();
    let pid = runs_once_and_counts(&cluster, &vms, &node).await;
    println!(
        "rollout restart during Perform: the migration ended {ended:?}; one guest, on {node} (QEMU pid {pid})"
    );

    // The agent Pod of the guest's node deleted at once: the guest is untouched.
    let pod = agent_pod(&cluster, &node).await;
    kubectl(
        &cluster,
        &[
            "-n",
            "ferry-system",
            "delete",
            "pod",
            &pod,
            "--grace-period=0",
            "--force",
        ],
    )
    .await;
    kubectl(
        &cluster,
        &[
            "-n",
            "ferry-system",
            "rollout",
            "status",
            "daemonset/ferry-agent",
            "--timeout=300s",
        ],
    )
    .await;
    assert_eq!(runs_once_and_counts(&cluster, &vms, &node).await, pid);
    println!("agent Pod {pod} deleted with --grace-period=0 --force: QEMU pid {pid} still runs");

    // helm upgrade to a new image tag (the same images under another tag).
    for node in &cluster.nodes {
        for image in ["ferry-operator", "ferry-agent"] {
            let from = format!("ghcr.io/ferry-dev/{image}:0.1.0");
            node.tag(&from, &format!("ghcr.io/ferry-dev/{image}:0.1.0-upgrade"))
                .unwrap();
        }
    }
    helm(
        &cluster,
        &[
            "upgrade",
            "ferry",
            &repo_root().join("charts/ferry").display().to_string(),
            "-n",
            "ferry-system",
            "--reuse-values",
            "--set",
            "image.tag=0.1.0-upgrade",
        ],
    )
    .await;
    cluster
        .wait_ferry_ready(Duration::from_secs(300))
        .await
        .unwrap();
    let image = kubectl(
        &cluster,
        &[
            "-n",
            "ferry-system",
            "get",
            "daemonset/ferry-agent",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ],
    )
    .await;
    assert!(image.trim().ends_with(":0.1.0-upgrade"), "{image}");
    assert_eq!(runs_once_and_counts(&cluster, &vms, &node).await, pid);
    println!(
        "helm upgrade to {}: QEMU pid {pid} still runs",
        image.trim()
    );
}

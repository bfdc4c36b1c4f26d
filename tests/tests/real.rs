//! Ferry as deployed (issue 16), on REAL nodes: a kubelet, containerd and kube-proxy per
//! node (tests/src/real), kube-scheduler and kube-controller-manager, the images `make
//! images` built imported into each node's containerd, and the chart installed with
//! `helm install`, unchanged. The operator and the agents run as the chart's Deployment
//! and DaemonSet; their probes decide their readiness.
//!
//! Shown: the Pods Ready; a VM started and migrated with TLS between the two real nodes,
//! its guest intact; the agent DaemonSet restarted (`kubectl rollout restart`), an agent
//! Pod force-deleted, and `helm upgrade` to a new image tag, each while the guest runs:
//! the same QEMU process keeps running, exactly one guest. The guest's reservation (a
//! placeholder Pod with its memory) is bound to its node, and a migration to a node an
//! ordinary Pod filled is refused before Begin, with the scheduler's reason.
//!
//! `make test-real` (needs `make tools-real` and `make images`), the last step of `make test`;
//! the workspace run of `make test` skips it.

use std::path::PathBuf;
use std::time::Duration;

use ferry_crds::{MigrationPhase, VirtualMachine, VmPhase};
use ferry_tests::cluster::{guest_dirs, install_example_disk, qemu_pid};
use ferry_tests::e2e_support::{
    LONG, ONE_AT_A_TIME, UNLIMITED, assert_stream, eventually, migration_yaml, passes, wait_phase,
};
use ferry_tests::real::config::PAUSE_IMAGE;
use ferry_tests::real::{RealCluster, ferry_images};
use ferry_tests::repo_root;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
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

/// The agents' DaemonSet.
const AGENTS: &str = "daemonset/ferry-agent";

/// Waits until every agent Pod is the DaemonSet's current one and Ready.
async fn agents_rolled_out(cluster: &RealCluster) {
    kubectl(
        cluster,
        &[
            "-n",
            "ferry-system",
            "rollout",
            "status",
            AGENTS,
            "--timeout=300s",
        ],
    )
    .await;
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
    let values = cluster.chart_values();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    cluster.install_ferry(&archives, &values).await.unwrap();
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
        &["-n", "ferry-system", "rollout", "restart", AGENTS],
    )
    .await;
    agents_rolled_out(&cluster).await;
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
        &["-n", "ferry-system", "rollout", "restart", AGENTS],
    )
    .await;
    agents_rolled_out(&cluster).await;
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
    agents_rolled_out(&cluster).await;
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

    // The scheduler sees the guest: its reservation is bound to its node.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ferry-system");
    let reservations = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=guest-reservation"))
        .await
        .unwrap()
        .items;
    let on: Vec<(String, String)> = reservations
        .iter()
        .map(|p| {
            let spec = p.spec.clone().unwrap_or_default();
            let memory = spec.containers[0]
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("memory"))
                .map(|q| q.0.clone())
                .unwrap_or_default();
            (spec.node_name.unwrap_or_default(), memory)
        })
        .collect();
    assert_eq!(on.len(), 1, "reservations: {on:?}");
    assert_eq!(on[0].0, node);
    assert_eq!(on[0].1, ((256u64 + 512) << 20).to_string());
    println!(
        "the guest's reservation: a Pod on {node} requesting {} bytes",
        on[0].1
    );
    // ... with a disruption budget of its own that allows no eviction.
    let budgets: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(client.clone(), "ferry-system");
    let pod_name = reservations[0].metadata.name.clone().unwrap_or_default();
    let budget = eventually(
        "the reservation's budget",
        Duration::from_secs(30),
        || async {
            let b = budgets.get_opt(&pod_name).await.ok()??;
            let allowed = b.status.as_ref()?.disruptions_allowed;
            (b.status.as_ref()?.current_healthy == Some(1)).then_some((b, allowed))
        },
    )
    .await;
    assert_eq!(budget.1, Some(0), "{:?}", budget.0.status);
    println!("its disruption budget {pod_name}: minAvailable 1, 0 disruptions allowed");

    // kubectl drain of the guest's node: it waits (the reservation may not be evicted)
    // while the operator evacuates the cordoned node, and completes once the guest left.
    let drain = cluster
        .cp
        .kubectl()
        .args(["drain", &node, "--ignore-daemonsets", "--timeout=300s"])
        .output()
        .await
        .unwrap();
    let said = ferry_tests::printed(&drain);
    let waited = said
        .lines()
        .filter(|l| l.contains("disruption budget"))
        .count();
    let last = said
        .lines()
        .find(|l| l.contains("drained"))
        .unwrap_or_default()
        .to_string();
    println!(
        "kubectl drain {node}: {waited} evictions refused by the guests' budget, then: {last}"
    );
    assert!(drain.status.success(), "kubectl drain {node}: {said}");
    let drained = node.clone();
    let node = vms
        .get("demo")
        .await
        .unwrap()
        .status
        .unwrap_or_default()
        .node_name
        .unwrap_or_default();
    assert_ne!(node, drained, "the guest left the drained node");
    let pid = runs_once_and_counts(&cluster, &vms, &node).await;
    println!("the guest moved to {node} (QEMU pid {pid}); {drained} drained");
    kubectl(&cluster, &["uncordon", &drained]).await;

    // A migration to a node without room is refused before Begin, with the reason: the
    // other node filled up by an ordinary Pod.
    let other = if node == "node-a" { "node-b" } else { "node-a" };
    let free = free_memory(&client, other).await;
    let filler: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "filler"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": other},
            "containers": [{"name": "pause", "image": PAUSE_IMAGE,
                "resources": {"requests": {"memory": (free - (200 << 20)).to_string()}}}],
        },
    }))
    .unwrap();
    let default_pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    default_pods
        .create(&PostParams::default(), &filler)
        .await
        .unwrap();
    kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/filler",
            "--timeout=120s",
        ],
    )
    .await;
    let (ok, said) = cluster
        .cp
        .apply(&migration_yaml("demo-no-room", other, UNLIMITED))
        .await;
    assert!(ok, "{said}");
    let ended = eventually("demo-no-room to end", Duration::from_secs(120), || async {
        let s = vmms.get("demo-no-room").await.ok()?.status?;
        s.phase?.is_terminal().then_some(s)
    })
    .await;
    let refused = ended
        .conditions
        .iter()
        .find(|c| c.reason == "InsufficientResources")
        .cloned();
    println!(
        "migration to {other} without room: {:?}, {:?}; conditions {:?}",
        ended.phase,
        refused
            .as_ref()
            .map(|c| format!("{}: {}", c.reason, c.message)),
        ended
            .conditions
            .iter()
            .map(|c| (&c.type_, &c.status, &c.reason))
            .collect::<Vec<_>>()
    );
    assert_eq!(ended.phase, Some(MigrationPhase::Failed));
    let refused = refused.expect("a condition with reason InsufficientResources");
    assert!(
        refused.message.contains("Insufficient memory"),
        "{refused:?}"
    );
    assert!(
        ended
            .steps
            .as_ref()
            .is_none_or(|s| s.get(MigrationPhase::Begin).is_none()),
        "no Begin"
    );
    // With no target named, the operator tries each open node; none has room either.
    let anywhere = "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachineMigration\n\
        metadata:\n  name: demo-anywhere\nspec:\n  vmName: demo\n";
    let (ok, said) = cluster.cp.apply(anywhere).await;
    assert!(ok, "{said}");
    let ended = eventually("demo-anywhere to end", Duration::from_secs(120), || async {
        let s = vmms.get("demo-anywhere").await.ok()?.status?;
        s.phase?.is_terminal().then_some(s)
    })
    .await;
    let why = ended
        .conditions
        .iter()
        .find(|c| c.reason == "InsufficientResources")
        .map(|c| c.message.clone());
    println!(
        "migration with no target, no room anywhere: {:?}, {why:?}",
        ended.phase
    );
    assert_eq!(ended.phase, Some(MigrationPhase::Failed));
    assert!(why.is_some_and(|m| m.contains(other) && m.contains("Insufficient memory")));
    assert_eq!(runs_once_and_counts(&cluster, &vms, &node).await, pid);
}

/// Bytes of `node`'s allocatable memory no Pod requests.
async fn free_memory(client: &Client, node: &str) -> u64 {
    let n = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get(node)
        .await
        .unwrap();
    let allocatable = n.status.unwrap().allocatable.unwrap()["memory"].0.clone();
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .unwrap();
    let requested: u64 = pods
        .items
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_none_or(|ph| ph != "Succeeded" && ph != "Failed")
        })
        .flat_map(|p| p.spec.clone().unwrap_or_default().containers)
        .filter_map(|c| c.resources?.requests?.get("memory").map(|q| bytes(&q.0)))
        .sum();
    bytes(&allocatable) - requested
}

/// A memory quantity in bytes (plain, or with a binary or decimal suffix).
fn bytes(q: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, unit) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * unit;
        }
    }
    q.parse().unwrap()
}

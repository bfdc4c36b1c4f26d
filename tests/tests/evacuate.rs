//! Node evacuation end to end: `kubectl cordon` moves every guest off a node through the
//! real control plane, operator and agents with real QEMU, within the per-node limit;
//! a guest with nowhere to go is reported and keeps running. One test at a time.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_crds::{MigrationPhase, VirtualMachineMigration, VmPhase};
use ferry_tests::Cluster;
use ferry_tests::e2e_support::*;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube::{Client, ResourceExt};

const GUESTS: [&str; 3] = ["guest-1", "guest-2", "guest-3"];

async fn evacuation_migrations(
    vmms: &Api<VirtualMachineMigration>,
    node: &str,
) -> Vec<VirtualMachineMigration> {
    vmms.list(&ListParams::default().labels(&format!("ferry.dev/evacuation={node}")))
        .await
        .unwrap()
        .items
}

fn phase(m: &VirtualMachineMigration) -> Option<MigrationPhase> {
    m.status.as_ref().and_then(|s| s.phase)
}

/// Past admission and not ended: counts against the per-node limit.
fn active(m: &VirtualMachineMigration) -> bool {
    phase(m).is_some_and(|p| p != MigrationPhase::Pending && !p.is_terminal())
}

async fn up(nodes: &[&str], values: &[&str]) -> (Cluster, Client) {
    let cluster = Cluster::up_with(nodes, None, values)
        .await
        .unwrap_or_else(|e| panic!("cluster: {e}"));
    let client = cluster.client().await.unwrap();
    (cluster, client)
}

#[tokio::test]
async fn cordon_moves_every_guest_within_the_limit_and_uncordon_changes_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up(
        &["node-a", "node-b", "node-c"],
        &["migrations.maxOutboundPerNode=1"],
    )
    .await;
    let vms = guests_running(&cluster, &client, "node-a", &GUESTS).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");

    kubectl_ok(&cluster, &["cordon", "node-a"]).await;

    // Sample the migrations while they run: never more than one leaves node-a at once.
    let most_at_once = std::cell::Cell::new(0);
    let done = eventually(
        "the three evacuation migrations to succeed",
        Duration::from_secs(400),
        || async {
            let ms = evacuation_migrations(&vmms, "node-a").await;
            most_at_once.set(
                most_at_once
                    .get()
                    .max(ms.iter().filter(|m| active(m)).count()),
            );
            for m in &ms {
                if let Some(p @ (MigrationPhase::Failed | MigrationPhase::Cancelled)) = phase(m) {
                    panic!("{} ended {p:?}: {:#?}", m.name_any(), m.status);
                }
            }
            let ok = ms
                .iter()
                .filter(|m| phase(m) == Some(MigrationPhase::Succeeded))
                .count();
            (ok == GUESTS.len()).then_some(ms)
        },
    )
    .await;
    let most_at_once = most_at_once.get();
    assert!(most_at_once <= 1, "{most_at_once} ran at once (limit 1)");
    let mut names: Vec<String> = done.iter().map(|m| m.name_any()).collect();
    names.sort();
    assert_eq!(
        names,
        GUESTS.map(|g| format!("evacuate-{g}-node-a-1")),
        "one migration per guest, named after it"
    );

    // The agents' own records say the same: the phases of the three never overlapped.
    let mut spans: Vec<_> = done
        .iter()
        .map(|m| {
            let steps = m.status.as_ref().unwrap().steps.clone().unwrap();
            let start = steps.get(MigrationPhase::Begin).unwrap().start.0;
            let end = steps
                .get(MigrationPhase::Confirm)
                .unwrap()
                .end
                .as_ref()
                .unwrap()
                .0;
            (start, end, m.name_any())
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "{} and {} overlapped: {pair:?}",
            pair[0].2,
            pair[1].2
        );
    }

    // Every guest runs once, elsewhere, and goes on counting.
    let mut placed = BTreeMap::new();
    for g in GUESTS {
        let s = vms.get(g).await.unwrap().status.unwrap();
        let node = s.node_name.unwrap();
        assert_ne!(node, "node-a", "{g} is still on node-a");
        assert_eq!(s.phase, Some(VmPhase::Running), "{g}");
        let pids = cluster.qemu_pids(g);
        assert_eq!(pids.keys().collect::<Vec<_>>(), [&node], "{g}: {pids:?}");
        placed.insert(g, node);
    }
    for (g, node) in &placed {
        let now = last_pass(&cluster, node, g).unwrap_or(0);
        eventually(
            &format!("{g} to count on {node}"),
            Duration::from_secs(60),
            || async { (last_pass(&cluster, node, g)? > now).then_some(()) },
        )
        .await;
    }

    // Progress as Events on the Node.
    let reasons = eventually(
        "the evacuation's Events on node-a",
        Duration::from_secs(30),
        || async {
            let events = events_about(&cluster, "node-a").await;
            events
                .iter()
                .any(|(_, r, _)| r == "EvacuationDone")
                .then_some(events)
        },
    )
    .await;
    let started = reasons
        .iter()
        .find(|(_, r, _)| r == "EvacuationStarted")
        .unwrap_or_else(|| panic!("no EvacuationStarted in {reasons:?}"));
    assert!(started.2.contains("evacuating 3 guest"), "{started:?}");
    for g in GUESTS {
        assert!(
            reasons
                .iter()
                .any(|(_, r, m)| r == "EvacuationMoved" && m.contains(&format!("default/{g} "))),
            "no EvacuationMoved for {g} in {reasons:?}"
        );
    }
    assert!(
        !reasons.iter().any(|(t, _, _)| t == "Warning"),
        "{reasons:?}"
    );

    // Uncordon: node-a takes guests again (a migration with no target now goes there,
    // the least loaded open node), and the evacuation creates nothing.
    kubectl_ok(&cluster, &["uncordon", "node-a"]).await;
    let back: VirtualMachineMigration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "guest-1-anywhere"},
        "spec": {"vmName": "guest-1", "transport": {"tls": false}}
    }))
    .unwrap();
    vmms.create(&PostParams::default(), &back).await.unwrap();
    wait_phase(
        &vmms,
        "guest-1-anywhere",
        MigrationPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    let m = vmms.get("guest-1-anywhere").await.unwrap();
    assert_eq!(
        m.status.unwrap().target_node.as_deref(),
        Some("node-a"),
        "the least loaded open node"
    );
    let after = evacuation_migrations(&vmms, "node-a").await;
    assert_eq!(after.len(), 3, "uncordon created migrations: {after:#?}");
    for g in &GUESTS[1..] {
        let s = vms.get(g).await.unwrap().status.unwrap();
        assert_eq!(s.node_name.as_ref(), Some(&placed[g]), "{g} moved");
    }
    let events = events_about(&cluster, "node-a").await;
    assert!(
        !events.iter().any(|(_, r, _)| r == "EvacuationStopped"),
        "nothing was left to stop: {events:?}"
    );
}

#[tokio::test]
async fn a_guest_with_nowhere_to_go_is_reported_and_keeps_running() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up(&["node-a", "node-b"], &[]).await;
    let vms = guests_running(&cluster, &client, "node-a", &["lonely"]).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");

    kubectl_ok(&cluster, &["cordon", "node-b"]).await;
    kubectl_ok(&cluster, &["cordon", "node-a"]).await;

    for object in ["node-a", "lonely"] {
        let (kind, _, message) = eventually(
            &format!("a Warning Event on {object}"),
            Duration::from_secs(60),
            || async {
                events_about(&cluster, object)
                    .await
                    .into_iter()
                    .find(|(_, r, _)| r == "EvacuationStuck")
            },
        )
        .await;
        assert_eq!(kind, "Warning");
        assert!(
            message.contains("NoTarget") && message.contains("keeps running"),
            "{message}"
        );
    }
    // Still running, once, on node-a; nothing was created for it.
    let s = vms.get("lonely").await.unwrap().status.unwrap();
    assert_eq!(s.phase, Some(VmPhase::Running));
    assert_eq!(s.node_name.as_deref(), Some("node-a"));
    assert_eq!(
        cluster.qemu_pids("lonely").keys().collect::<Vec<_>>(),
        ["node-a"]
    );
    let before = last_pass(&cluster, "node-a", "lonely").unwrap();
    eventually(
        "lonely to go on counting",
        Duration::from_secs(60),
        || async { (last_pass(&cluster, "node-a", "lonely")? > before).then_some(()) },
    )
    .await;
    assert!(evacuation_migrations(&vmms, "node-a").await.is_empty());

    // Once a node opens, the evacuation goes on there.
    kubectl_ok(&cluster, &["uncordon", "node-b"]).await;
    wait_phase(
        &vmms,
        "evacuate-lonely-node-a-1",
        MigrationPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    let s = vms.get("lonely").await.unwrap().status.unwrap();
    assert_eq!(s.node_name.as_deref(), Some("node-b"));
    assert_eq!(
        cluster.qemu_pids("lonely").keys().collect::<Vec<_>>(),
        ["node-b"]
    );
}

#[tokio::test]
async fn uncordon_mid_evacuation_cancels_what_has_not_started_and_lets_the_rest_finish() {
    let _one = ONE_AT_A_TIME.lock().await;
    // One guest leaves at a time, slowly enough (2 MiB/s) to uncordon while it does.
    let (cluster, client) = up(
        &["node-a", "node-b"],
        &[
            "migrations.maxOutboundPerNode=1",
            "migrations.defaultPolicy.bandwidthMiBps=2",
            "migrations.defaultPolicy.maxDowntimeMs=10000",
        ],
    )
    .await;
    let vms = guests_running(&cluster, &client, "node-a", &GUESTS).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");

    kubectl_ok(&cluster, &["cordon", "node-a"]).await;
    let moving = eventually(
        "one evacuation migration running, two waiting",
        Duration::from_secs(120),
        || async {
            let ms = evacuation_migrations(&vmms, "node-a").await;
            let waiting = ms
                .iter()
                .filter(|m| phase(m) == Some(MigrationPhase::Pending))
                .count();
            let running: Vec<_> = ms.iter().filter(|m| active(m)).collect();
            (ms.len() == 3 && waiting == 2 && running.len() == 1).then(|| running[0].name_any())
        },
    )
    .await;
    kubectl_ok(&cluster, &["uncordon", "node-a"]).await;

    wait_phase(
        &vmms,
        &moving,
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    let ms = eventually(
        "the waiting two to be cancelled",
        Duration::from_secs(60),
        || async {
            let ms = evacuation_migrations(&vmms, "node-a").await;
            ms.iter()
                .filter(|m| m.name_any() != moving)
                .all(|m| phase(m) == Some(MigrationPhase::Cancelled))
                .then_some(ms)
        },
    )
    .await;
    assert_eq!(ms.len(), 3, "nothing new: {ms:#?}");
    for m in ms.iter().filter(|m| m.name_any() != moving) {
        let s = m.status.as_ref().unwrap();
        assert!(
            s.source_node.is_none() && s.steps.is_none(),
            "{} was cancelled before it started: {s:#?}",
            m.name_any()
        );
        let vm = vms.get(&m.spec.vm_name).await.unwrap().status.unwrap();
        assert_eq!(
            vm.node_name.as_deref(),
            Some("node-a"),
            "{}",
            m.spec.vm_name
        );
        assert_eq!(vm.phase, Some(VmPhase::Running), "{}", m.spec.vm_name);
    }
    let stopped = eventually(
        "an EvacuationStopped Event",
        Duration::from_secs(30),
        || async {
            events_about(&cluster, "node-a")
                .await
                .into_iter()
                .find(|(_, r, _)| r == "EvacuationStopped")
        },
    )
    .await;
    assert!(
        stopped.2.contains("3 guest(s) still on it")
            && stopped
                .2
                .contains("2 migration(s) not yet started were cancelled"),
        "{stopped:?}"
    );
}

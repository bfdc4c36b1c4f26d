//! Peer-to-peer migrations (`spec.mode: PeerToPeer`) end to end: the source agent
//! drives the phases and calls the target agent's peer API (mutual TLS with the nodes'
//! migration certificates) for Prepare and Finish, on the real control plane with real
//! QEMU. One test at a time: each runs a cluster and TCG guests on two cores.

use std::time::Duration;

use ferry_crds::ControlMode::PeerToPeer;
use ferry_crds::{MigrationPhase, StepOutcome, VirtualMachineMigration, VmPhase};
use ferry_tests::Cluster;
use ferry_tests::e2e_support::*;
use ferry_tests::peer_client::{self, PeerClient};
use kube::Api;
use serde_json::json;

use ferry_crds::sequence::PHASES;

#[tokio::test]
async fn a_peer_to_peer_migration_moves_the_guest_and_records_every_step() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    // Each agent publishes where its peer API listens, on its migration address.
    for n in cluster.nodes() {
        let at = eventually(
            &format!("{}'s peer endpoint", n.name),
            Duration::from_secs(30),
            || peer_client::endpoint(&client, &n.name),
        )
        .await;
        assert_eq!(at.ip(), n.address, "{}'s peer endpoint {at}", n.name);
    }
    let before = last_pass(&cluster, "node-a", "demo").unwrap();
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(
        &cluster,
        &migration_yaml_in(PeerToPeer, "p2p", "node-b", UNLIMITED),
    )
    .await;
    wait_phase(
        &vmms,
        "p2p",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;

    runs_once_on(&cluster, &vms, "node-b").await;
    let first_on_b = first_pass_on(&cluster, "node-b", Duration::from_secs(30)).await;
    assert!(
        first_on_b > before,
        "the counter restarted on node-b: {first_on_b} after {before}"
    );
    guest_goes_on(&cluster, "node-b", first_on_b).await;

    let m = vmms.get("p2p").await.unwrap();
    assert_eq!(m.spec.mode, PeerToPeer);
    let status = m.status.unwrap();
    let cookies = status.cookies.clone().unwrap();
    for (phase, cookie) in [
        ("begin", cookies.begin),
        ("prepare", cookies.prepare),
        ("perform", cookies.perform),
        ("finish", cookies.finish),
    ] {
        let cookie = cookie.unwrap_or_else(|| panic!("no {phase} cookie"));
        assert!(
            cookie.starts_with("<ferry-migration"),
            "{phase} cookie: {cookie}"
        );
    }
    let steps = status.steps.clone().unwrap();
    for phase in PHASES {
        let step = steps
            .get(phase)
            .unwrap_or_else(|| panic!("no {phase:?} step"));
        assert_eq!(
            step.outcome,
            Some(StepOutcome::Succeeded),
            "{phase:?}: {step:?}"
        );
        assert!(step.end.is_some(), "{phase:?} has no end");
        let node = if phase.runs_on_source() {
            "node-a"
        } else {
            "node-b"
        };
        assert_eq!(step.node, node, "{phase:?} ran on the wrong node");
    }
    // The stream is TLS with each end's peer verified, as in managed mode.
    assert_stream(&steps, Some(("node-a", "node-b")));
    let complete = status.conditions.iter().find(|c| c.type_ == "Complete");
    assert_eq!(
        complete.map(|c| c.status.as_str()),
        Some("True"),
        "{:?}",
        status.conditions
    );
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    assert_eq!(vm.phase, Some(VmPhase::Running));
    assert_eq!(vm.migration, None);
}

#[tokio::test]
async fn a_peer_to_peer_migration_cancelled_during_perform_leaves_the_guest_on_the_source() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let yaml = migration_yaml_in(PeerToPeer, "slow-p2p", "node-b", NEVER_ENDING);
    cancel_during_perform(&cluster, &vms, &vmms, "slow-p2p", &yaml).await;
    let status = vmms.get("slow-p2p").await.unwrap().status.unwrap();
    // The rollback went through the target's peer API (Finish, cancelled) and ended
    // with the source's Confirm resuming the guest.
    assert!(status.cancelled, "{status:#?}");
    let steps = status.steps.unwrap_or_default();
    let prepare = steps.prepare.expect("Prepare ran on the target");
    assert_eq!(prepare.node, "node-b");
    assert_eq!(prepare.outcome, Some(StepOutcome::Succeeded));
    assert_eq!(steps.finish.expect("the target rolled back").node, "node-b");
    let confirm = steps.confirm.expect("the source confirmed the rollback");
    assert_eq!(confirm.node, "node-a");
    assert_eq!(confirm.outcome, Some(StepOutcome::Succeeded));
    assert!(
        vms.get("demo")
            .await
            .unwrap()
            .status
            .unwrap()
            .migration
            .is_none(),
        "the VM is still held by the migration"
    );
}

#[tokio::test]
async fn a_peer_to_peer_target_definition_that_changes_the_abi_fails_in_begin() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    // The example VM with twice the memory: the guest would notice.
    let example =
        std::fs::read_to_string(ferry_tests::repo_root().join("examples/virtualmachine.yaml"))
            .unwrap();
    let (_, xml) = example.split_once("domainXML: |\n").unwrap();
    let xml = xml.replace(
        "<memory unit='MiB'>256</memory>",
        "<memory unit='MiB'>512</memory>",
    );
    assert!(xml.contains("512"), "the example's memory line changed");
    let yaml = format!(
        "{}  targetDomainXML: |\n{}",
        migration_yaml_in(PeerToPeer, "bigger", "node-b", UNLIMITED),
        xml.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    let before = last_pass(&cluster, "node-a", "demo").unwrap();
    apply_yaml(&cluster, &yaml).await;
    wait_phase(
        &vmms,
        "bigger",
        MigrationPhase::Failed,
        Duration::from_secs(60),
    )
    .await;
    let status = vmms.get("bigger").await.unwrap().status.unwrap();
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap_or_else(|| panic!("no Failed condition: {:?}", status.conditions));
    assert_eq!(failed.status, "True");
    assert_eq!(failed.reason, "BeginFailed", "{}", failed.message);
    assert!(failed.message.contains("memory"), "{}", failed.message);
    let steps = status.steps.unwrap_or_default();
    let begin = steps.begin.expect("Begin ran");
    assert_eq!(begin.outcome, Some(StepOutcome::Failed));
    assert_eq!(begin.node, "node-a");
    assert!(steps.prepare.is_none(), "Prepare ran: {:?}", steps.prepare);
    // Nothing was started on node-b, and the guest went on as it was.
    runs_once_on(&cluster, &vms, "node-a").await;
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    assert_eq!(vm.phase, Some(VmPhase::Running));
    assert_eq!(vm.migration, None);
    guest_goes_on(&cluster, "node-a", before).await;
}

#[tokio::test]
async fn the_peer_api_answers_only_the_source_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::up(&["node-a", "node-b", "node-c"], None)
        .await
        .unwrap_or_else(|e| panic!("cluster: {e}"));
    let client = cluster.client().await.unwrap();
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let b = eventually("node-b's peer endpoint", Duration::from_secs(30), || {
        peer_client::endpoint(&client, "node-b")
    })
    .await;
    for node in ["node-a", "node-c"] {
        let crt = cluster.node(node).state_dir.join("tls/node.crt");
        eventually(
            &format!("{node}'s certificate"),
            Duration::from_secs(60),
            || async { crt.exists().then_some(()) },
        )
        .await;
    }
    let source = PeerClient::for_node(&cluster.node("node-a").state_dir, true).unwrap();
    let intruder = PeerClient::for_node(&cluster.node("node-c").state_dir, true).unwrap();
    let anonymous = PeerClient::for_node(&cluster.node("node-c").state_dir, false).unwrap();

    apply_yaml(
        &cluster,
        &migration_yaml_in(PeerToPeer, "guarded", "node-b", LONG),
    )
    .await;
    wait_phase(
        &vmms,
        "guarded",
        MigrationPhase::Perform,
        Duration::from_secs(60),
    )
    .await;
    let uid = vmms.get("guarded").await.unwrap().metadata.uid.unwrap();
    let call = |name: &str| {
        json!({"namespace": "default", "name": name, "uid": uid, "cancelled": false,
               "beginCookie": "<ferry-migration/>"})
    };

    // node-c holds a valid certificate from the same CA, but it is not the source.
    let (code, body) = intruder
        .post(b, "node-b", "/v1/prepare", &call("guarded"))
        .await
        .unwrap();
    assert_eq!(code, 403, "node-c's Prepare: {body}");
    assert!(
        body.contains("node-c") && body.contains("node-a"),
        "the refusal names neither node: {body}"
    );
    let (code, body) = intruder
        .post(b, "node-b", "/v1/finish", &call("guarded"))
        .await
        .unwrap();
    assert_eq!(code, 403, "node-c's Finish: {body}");
    // Without a certificate there is no answer at all.
    let refused = anonymous
        .post(b, "node-b", "/v1/prepare", &call("guarded"))
        .await;
    let refused = refused.expect_err("a caller without a certificate got an answer");
    assert!(
        refused.to_string().contains("CertificateRequired"),
        "without a certificate: {refused}"
    );
    // The source itself is told what is wrong, and nothing runs: the migration is in
    // Perform, and there is no migration "absent".
    let (code, body) = source
        .post(b, "node-b", "/v1/prepare", &call("guarded"))
        .await
        .unwrap();
    assert_eq!(code, 409, "a Prepare out of phase: {body}");
    let (code, body) = source
        .post(b, "node-b", "/v1/prepare", &call("absent"))
        .await
        .unwrap();
    assert_eq!(code, 404, "a Prepare of no migration: {body}");

    // None of it disturbed the migration.
    wait_phase(
        &vmms,
        "guarded",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    runs_once_on(&cluster, &vms, "node-b").await;
    guest_goes_on(&cluster, "node-b", 0).await;
    let steps = vmms
        .get("guarded")
        .await
        .unwrap()
        .status
        .unwrap()
        .steps
        .unwrap();
    for phase in PHASES {
        let step = steps.get(phase).unwrap();
        assert_eq!(step.outcome, Some(StepOutcome::Succeeded), "{phase:?}");
    }
}

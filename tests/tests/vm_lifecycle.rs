//! A VirtualMachine's lifecycle on its node (issue 14, "Never lose a guest"), end to end
//! with the real control plane, operator, two agents and TCG guests: edits of the spec
//! never touch a running guest (they are reported, and apply at the next start), and a
//! deleted VM powers its guest off and leaves nothing behind — QEMU, state dir, disk
//! locks — before its object goes, also when a migration holds it. One cluster serves
//! every case, in order, to keep the file's run time small.

use std::time::Duration;

use ferry_crds::conditions::vm::{DOMAIN_REFUSED, READY, RESTART_REQUIRED, SHUTTING_DOWN};
use ferry_crds::{Condition, MigrationPhase, VirtualMachine, VirtualMachineMigration, VmPhase};
use ferry_tests::Cluster;
use ferry_tests::e2e_support::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// Longer than two sweep periods (5 s each; a stray is removed on its second sighting).
const TWO_SWEEPS: Duration = Duration::from_secs(16);
const LIMIT: Duration = Duration::from_secs(90);

fn condition(vm: &VirtualMachine, type_: &str) -> Option<Condition> {
    vm.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

fn is_true(vm: &VirtualMachine, type_: &str) -> bool {
    condition(vm, type_).is_some_and(|c| c.status == "True")
}

fn phase(vm: &VirtualMachine) -> Option<VmPhase> {
    vm.status.as_ref()?.phase
}

async fn merge(vms: &Api<VirtualMachine>, name: &str, body: serde_json::Value) {
    vms.patch(name, &PatchParams::default(), &Patch::Merge(body))
        .await
        .unwrap_or_else(|e| panic!("patching VirtualMachine {name}: {e}"));
}

/// Rewrites the VM's `spec.domainXML` with `edit`; returns the definition it had.
async fn edit_domain(
    vms: &Api<VirtualMachine>,
    name: &str,
    edit: impl Fn(&str) -> String,
) -> String {
    let xml = vms.get(name).await.unwrap().spec.domain_xml;
    merge(vms, name, json!({"spec": {"domainXML": edit(&xml)}})).await;
    xml
}

/// Waits until the VM's condition `type_` is True with `reason`; returns it.
async fn wait_condition(
    vms: &Api<VirtualMachine>,
    name: &str,
    type_: &str,
    reason: &str,
) -> Condition {
    eventually(
        &format!("{name}: {type_} True ({reason})"),
        LIMIT,
        || async {
            let vm = vms.get(name).await.ok()?;
            condition(&vm, type_).filter(|c| c.status == "True" && c.reason == reason)
        },
    )
    .await
}

async fn wait_phase_of(vms: &Api<VirtualMachine>, name: &str, want: VmPhase) -> VirtualMachine {
    eventually(&format!("{name} to be {want:?}"), LIMIT, || async {
        let vm = vms.get(name).await.ok()?;
        (phase(&vm) == Some(want)).then_some(vm)
    })
    .await
}

fn pid_on(cluster: &Cluster, vm: &str, node: &str) -> Option<i32> {
    cluster.qemu_pids(vm).get(node).copied()
}

fn cmdline(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

fn state_dir(cluster: &Cluster, node: &str, vm: &str) -> std::path::PathBuf {
    cluster.guest_dir(node, vm)
}

async fn disk_locks(client: &Client, vm: &str) -> Vec<String> {
    Api::<Lease>::namespaced(client.clone(), "ferry-system")
        .list(&ListParams::default().labels(&format!("ferry.dev/vm=default.{vm}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|l| l.metadata.name)
        .collect()
}

/// Waits until the VM object is gone, then checks nothing of it is left on any node.
async fn gone_without_a_trace(
    cluster: &Cluster,
    client: &Client,
    vms: &Api<VirtualMachine>,
    name: &str,
    dirs: &[&str],
) {
    eventually(&format!("VirtualMachine {name} to go"), LIMIT, || async {
        vms.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
    for dir in dirs {
        assert_eq!(
            cluster.qemu_pids(dir),
            Default::default(),
            "a QEMU of {dir} is left"
        );
        for n in cluster.nodes() {
            let path = state_dir(cluster, &n.name, dir);
            assert!(!path.exists(), "{} is left", path.display());
        }
    }
    assert_eq!(
        disk_locks(client, name).await,
        Vec::<String>::new(),
        "disk locks of {name} are left"
    );
}

#[tokio::test]
async fn spec_edits_never_touch_a_running_guest_and_deletion_leaves_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = guests_running(
        &cluster,
        &client,
        "node-a",
        &["unsupported", "typo", "renamed", "resized"],
    )
    .await;
    edits_are_reported_and_the_guests_keep_running(&cluster, &vms).await;
    a_valid_edit_applies_at_the_next_start(&cluster, &vms).await;
    an_invalid_spec_stops_from_the_running_definition(&cluster, &vms).await;
    deletion_powers_off_and_leaves_nothing(&cluster, &client, &vms).await;
    deleting_a_vm_held_by_a_migration_cancels_it_first(&cluster, &client).await;
}

/// An unsupported element, a typo, a rename: each is reported on a VM that stays
/// Running and Ready, and its QEMU (the same pid) outlives two sweeps.
async fn edits_are_reported_and_the_guests_keep_running(
    cluster: &Cluster,
    vms: &Api<VirtualMachine>,
) {
    let names = ["unsupported", "typo", "renamed", "resized"];
    let pids: Vec<i32> = names
        .iter()
        .map(|n| pid_on(cluster, n, "node-a").unwrap_or_else(|| panic!("{n} has no QEMU")))
        .collect();
    edit_domain(vms, "unsupported", |x| {
        x.replace("<vcpu>", "<hugepages/><vcpu>")
    })
    .await;
    edit_domain(vms, "typo", |x| {
        x.replace(
            "<memory unit='MiB'>64</memory>",
            "<memroy unit='MiB'>64</memroy>",
        )
    })
    .await;
    edit_domain(vms, "renamed", |x| {
        x.replace("<name>renamed</name>", "<name>renamed-2</name>")
    })
    .await;
    edit_domain(vms, "resized", |x| {
        x.replace(
            "<memory unit='MiB'>64</memory>",
            "<memory unit='MiB'>96</memory>",
        )
    })
    .await;

    let c = wait_condition(vms, "unsupported", DOMAIN_REFUSED, "InvalidDomain").await;
    assert!(
        c.message
            .contains("unsupported element <hugepages> in <domain>"),
        "{}",
        c.message
    );
    let c = wait_condition(vms, "typo", DOMAIN_REFUSED, "InvalidDomain").await;
    assert!(c.message.contains("<memroy>"), "{}", c.message);
    let c = wait_condition(vms, "renamed", DOMAIN_REFUSED, "IdentityChanged").await;
    assert!(
        c.message.contains("name 'renamed' → 'renamed-2'"),
        "{}",
        c.message
    );
    let c = wait_condition(vms, "resized", RESTART_REQUIRED, "DomainChanged").await;
    assert!(
        c.message.contains("memory '65536 KiB' → '98304 KiB'"),
        "{}",
        c.message
    );

    tokio::time::sleep(TWO_SWEEPS).await;
    for (name, pid) in names.iter().zip(&pids) {
        assert_eq!(
            pid_on(cluster, name, "node-a"),
            Some(*pid),
            "{name}'s QEMU changed or went"
        );
        let vm = vms.get(name).await.unwrap();
        assert_eq!(
            phase(&vm),
            Some(VmPhase::Running),
            "{name}: {:?}",
            vm.status
        );
        assert!(is_true(&vm, READY), "{name}: {:?}", vm.status);
        let running = vm
            .status
            .as_ref()
            .and_then(|s| s.domain_xml.clone())
            .unwrap_or_default();
        assert!(
            running.contains(&format!("<name>{name}</name>")),
            "{name}: status.domainXML {running}"
        );
        assert!(
            running.contains("<memory unit='MiB'>64</memory>"),
            "{name}: status.domainXML {running}"
        );
        let noted = is_true(&vm, DOMAIN_REFUSED) || is_true(&vm, RESTART_REQUIRED);
        assert!(
            noted,
            "{name}: the edit is no longer reported: {:?}",
            vm.status
        );
        assert!(
            last_pass(cluster, "node-a", name).is_some(),
            "{name} does not count"
        );
    }
}

/// `resized` (64 → 96 MiB): stopped and started again, it runs the new definition and
/// RestartRequired is gone.
async fn a_valid_edit_applies_at_the_next_start(cluster: &Cluster, vms: &Api<VirtualMachine>) {
    let before = pid_on(cluster, "resized", "node-a").unwrap();
    assert!(cmdline(before).contains("65536k"), "{}", cmdline(before));
    merge(
        vms,
        "resized",
        json!({"spec": {"running": false, "terminationGracePeriodSeconds": 1}}),
    )
    .await;
    let vm = wait_phase_of(vms, "resized", VmPhase::Stopped).await;
    assert_eq!(pid_on(cluster, "resized", "node-a"), None);
    assert!(!is_true(&vm, RESTART_REQUIRED), "{:?}", vm.status);
    merge(vms, "resized", json!({"spec": {"running": true}})).await;
    let vm = eventually("resized to run again", LIMIT, || async {
        let vm = vms.get("resized").await.ok()?;
        (phase(&vm) == Some(VmPhase::Running) && is_true(&vm, READY)).then_some(vm)
    })
    .await;
    let after = pid_on(cluster, "resized", "node-a").expect("resized runs again");
    assert_ne!(after, before);
    assert!(cmdline(after).contains("98304k"), "{}", cmdline(after));
    assert!(
        condition(&vm, RESTART_REQUIRED).is_none(),
        "{:?}",
        vm.status
    );
    let running = vm.status.unwrap().domain_xml.unwrap_or_default();
    assert!(
        running.contains("<memory unit='MiB'>96</memory>"),
        "{running}"
    );
}

/// `unsupported`: spec.running false stops its guest although the spec does not parse;
/// started again, the spec it has now is what counts: Failed, InvalidDomain.
async fn an_invalid_spec_stops_from_the_running_definition(
    cluster: &Cluster,
    vms: &Api<VirtualMachine>,
) {
    merge(
        vms,
        "unsupported",
        json!({"spec": {"running": false, "terminationGracePeriodSeconds": 1}}),
    )
    .await;
    let vm = wait_phase_of(vms, "unsupported", VmPhase::Stopped).await;
    assert_eq!(pid_on(cluster, "unsupported", "node-a"), None);
    assert!(condition(&vm, DOMAIN_REFUSED).is_none(), "{:?}", vm.status);
    merge(vms, "unsupported", json!({"spec": {"running": true}})).await;
    let vm = wait_phase_of(vms, "unsupported", VmPhase::Failed).await;
    let ready = condition(&vm, READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidDomain")
    );
    assert!(ready.message.contains("<hugepages>"), "{}", ready.message);
    assert_eq!(pid_on(cluster, "unsupported", "node-a"), None);
}

/// `typo` and `renamed` (whose specs no longer describe the guests they run) are deleted:
/// each guest is asked to power off, then its QEMU, state dir and disk locks go, then the
/// object. `typo` re-created to start on node-b starts there.
async fn deletion_powers_off_and_leaves_nothing(
    cluster: &Cluster,
    client: &Client,
    vms: &Api<VirtualMachine>,
) {
    for name in ["typo", "renamed"] {
        let vm = vms.get(name).await.unwrap();
        assert!(
            vm.metadata
                .finalizers
                .unwrap_or_default()
                .contains(&ferry_crds::GUEST_FINALIZER.to_string()),
            "{name} has no finalizer"
        );
        assert!(
            !disk_locks(client, name).await.is_empty(),
            "{name} holds no disk lock"
        );
        merge(
            vms,
            name,
            json!({"spec": {"terminationGracePeriodSeconds": 4}}),
        )
        .await;
    }
    let typo_xml = vms
        .get("typo")
        .await
        .unwrap()
        .status
        .unwrap()
        .domain_xml
        .unwrap();
    for name in ["typo", "renamed"] {
        vms.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["typo", "renamed"] {
        let c = wait_condition(vms, name, SHUTTING_DOWN, "Deleting").await;
        assert!(c.message.contains("asked to power off"), "{}", c.message);
    }
    gone_without_a_trace(cluster, client, vms, "typo", &["typo"]).await;
    gone_without_a_trace(cluster, client, vms, "renamed", &["renamed"]).await;

    // The same VM again, to start on node-b: its disk is free.
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "typo"},
        "spec": {"domainXML": typo_xml, "nodeName": "node-b"}
    }))
    .unwrap();
    vms.create(&PostParams::default(), &vm).await.unwrap();
    let vm = eventually("typo to run on node-b", LIMIT, || async {
        let vm = vms.get("typo").await.ok()?;
        if phase(&vm) == Some(VmPhase::Failed) {
            panic!("typo failed on node-b: {:?}", vm.status);
        }
        (phase(&vm) == Some(VmPhase::Running)).then_some(vm)
    })
    .await;
    assert_eq!(vm.status.unwrap().node_name.as_deref(), Some("node-b"));
    assert!(pid_on(cluster, "typo", "node-b").is_some());
    // One lock, named by the image it locks.
    let typo_disk = ferry_agent::domain::Domain::parse(&typo_xml)
        .unwrap()
        .disks()
        .map(|d| d.source.clone())
        .collect::<Vec<_>>();
    assert_eq!(
        disk_locks(client, "typo").await,
        vec![ferry_agent::storage::image_lock_name(&typo_disk[0])]
    );

    // No grace period: the guest is stopped at once.
    merge(
        vms,
        "resized",
        json!({"spec": {"terminationGracePeriodSeconds": 0}}),
    )
    .await;
    vms.delete("resized", &DeleteParams::default())
        .await
        .unwrap();
    gone_without_a_trace(cluster, client, vms, "resized", &["resized"]).await;
}

/// The example VM, deleted while a migration that never converges moves it: the
/// operator cancels the migration, which rolls back (one guest, on node-a), then the
/// guest is powered off and everything of it goes (no guest).
async fn deleting_a_vm_held_by_a_migration_cancels_it_first(cluster: &Cluster, client: &Client) {
    let vms = example_vm_running(cluster, client).await;
    merge(
        &vms,
        "demo",
        json!({"spec": {"terminationGracePeriodSeconds": 4}}),
    )
    .await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(
        cluster,
        &migration_yaml("demo-away", "node-b", NEVER_ENDING),
    )
    .await;
    eventually("Perform to send bytes", LIMIT, || async {
        let s = vmms.get("demo-away").await.ok()?.status?;
        (s.phase == Some(MigrationPhase::Perform) && s.progress?.bytes_transferred > 0)
            .then_some(())
    })
    .await;
    vms.delete("demo", &DeleteParams::default()).await.unwrap();
    wait_phase(&vmms, "demo-away", MigrationPhase::Cancelled, LIMIT).await;
    let m = vmms.get("demo-away").await.unwrap();
    assert!(m.spec.cancel, "the operator did not cancel the migration");
    // The VM is still there (its finalizer), and so is exactly one guest: on node-a.
    let vm = vms.get("demo").await.expect("the VM waits for its guest");
    assert!(vm.metadata.deletion_timestamp.is_some());
    assert_eq!(
        cluster.qemu_pids("demo").keys().collect::<Vec<_>>(),
        vec!["node-a"],
        "one guest, on the source"
    );
    gone_without_a_trace(cluster, client, &vms, "demo", &["demo"]).await;
}

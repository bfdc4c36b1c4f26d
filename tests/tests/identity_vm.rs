//! Agent identity bound to its node, the VM side (issue 7, item 2; issue 14): against the
//! real apiserver with the chart installed, the chart's admission policies let an agent
//! write a VirtualMachine's status only as the node that runs it (or is to start it), and
//! change the VirtualMachine itself only for its `ferry.dev/guest` finalizer.

use ferry_crds::VirtualMachine;
use ferry_tests::policy_check::*;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

fn vms(client: &Client) -> Api<VirtualMachine> {
    Api::namespaced(client.clone(), VMS)
}

async fn patch_vm(client: &Client, status: Value) -> kube::Result<VirtualMachine> {
    vms(client)
        .patch_status(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
}

#[tokio::test]
async fn only_the_vms_node_writes_its_status() {
    let env = env().await;
    let (a, b, c) = (
        agent_on(&env, "node-a").await,
        agent_on(&env, "node-b").await,
        agent_on(&env, "node-c").await,
    );

    // First start: only the agent of spec.nodeName (node-a) claims status.nodeName.
    denied(
        "node-b claims a VM meant for node-a",
        "nodename-first-start",
        patch_vm(&b, json!({"nodeName": "node-b", "phase": "Running"})).await,
    );
    denied(
        "node-a claims it for node-b",
        "nodename-own",
        patch_vm(&a, json!({"nodeName": "node-b"})).await,
    );
    denied(
        "node-b reports a VM meant for node-a",
        "own-vm",
        patch_vm(&b, json!({"phase": "Starting"})).await,
    );
    allowed(
        "node-a starts the guest",
        patch_vm(&a, json!({"nodeName": "node-a", "phase": "Running"})).await,
    );

    // Outside a migration, nobody moves it, not even to itself.
    denied(
        "node-b takes the VM without a migration",
        "own-vm",
        patch_vm(&b, json!({"phase": "Running"})).await,
    );
    denied(
        "node-b takes status.nodeName without a migration",
        "nodename-migration",
        patch_vm(&b, json!({"nodeName": "node-b"})).await,
    );
    denied(
        "node-a gives up status.nodeName without a migration",
        "nodename-own",
        patch_vm(&a, json!({"nodeName": null})).await,
    );
    denied(
        "node-a names a migration on its own",
        "migration-fence",
        patch_vm(&a, json!({"migration": MIGRATION})).await,
    );

    // The operator admits the migration and marks the VM as held, with its record.
    admit(&env, MIGRATION).await;
    allowed(
        "the operator marks the VM as held",
        patch_vm(&env.admin, held(MIGRATION, Some("node-b"), false)).await,
    );
    denied(
        "node-c takes status.nodeName to itself",
        "nodename-migration",
        patch_vm(&c, json!({"nodeName": "node-c", "migration": null})).await,
    );
    denied(
        "the target clears status.migration (only the source fences)",
        "own-vm",
        patch_vm(&b, json!({"migration": null})).await,
    );
    denied(
        "node-a hands the VM to node-b",
        "nodename-own",
        patch_vm(&a, json!({"nodeName": "node-b"})).await,
    );
    denied(
        "node-b clears node-a's status.nodeName",
        "own-vm",
        patch_vm(&b, json!({"nodeName": null})).await,
    );
    // Only a migration to a file lets the source give the VM up.
    denied(
        "the source clears status.nodeName in a migration to node-b",
        "nodename-save",
        patch_vm(&a, json!({"nodeName": null, "phase": "Stopped"})).await,
    );
    // A migration to a file: once saved, the source gives the VM up (no QEMU runs).
    allowed(
        "the operator's record of a save (no target)",
        patch_vm(&env.admin, held(MIGRATION, None, false)).await,
    );
    allowed(
        "the source clears status.nodeName of the saved guest",
        patch_vm(&a, json!({"nodeName": null, "phase": "Stopped"})).await,
    );
    allowed(
        "the admin puts it back for the rest of the test",
        patch_vm(
            &env.admin,
            json!({"nodeName": "node-a", "phase": "Running",
                   "holder": held(MIGRATION, Some("node-b"), false)["holder"]}),
        )
        .await,
    );

    // Cancelled Confirm: the source fences the target out, then the operator retries.
    allowed(
        "the source clears status.migration",
        patch_vm(&a, json!({"migration": null})).await,
    );
    denied(
        "the target takes a VM no migration holds",
        "nodename-migration",
        patch_vm(&b, json!({"nodeName": "node-b"})).await,
    );
    allowed(
        "the operator marks the VM as held again",
        patch_vm(&env.admin, json!({"migration": MIGRATION})).await,
    );

    // Before Finish, the target does not take it.
    denied(
        "the target takes status.nodeName before Finish",
        "nodename-finish",
        patch_vm(&b, json!({"nodeName": "node-b"})).await,
    );
    allowed(
        "the operator lets the migration enter Finish",
        patch_vm(&env.admin, held(MIGRATION, Some("node-b"), true)).await,
    );
    denied(
        "node-c takes status.nodeName in node-b's Finish",
        "nodename-target",
        patch_vm(&c, json!({"nodeName": "node-c"})).await,
    );

    // Finish: the target takes status.nodeName (guarded by resourceVersion, as the agent
    // does it); from then on the source no longer writes the VM's status.
    let rv = vms(&env.admin)
        .get("demo")
        .await
        .unwrap()
        .metadata
        .resource_version;
    allowed(
        "the target takes status.nodeName in Finish",
        vms(&b)
            .patch_status(
                "demo",
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "metadata": {"resourceVersion": rv},
                    "status": {"nodeName": "node-b"},
                })),
            )
            .await,
    );
    denied(
        "the old source reports the VM",
        "own-vm",
        patch_vm(&a, json!({"phase": "Running"})).await,
    );
    allowed(
        "the new node reports the VM",
        patch_vm(&b, json!({"phase": "Running"})).await,
    );
    let vm = vms(&env.admin).get("demo").await.unwrap();
    assert_eq!(vm.status.unwrap().node_name.as_deref(), Some("node-b"));
}

/// The operator's hold of the VM by `migration` towards `target` (`None`: to a file),
/// with `handOver` as given: `status.migration` and `status.holder`.
fn held(migration: &str, target: Option<&str>, hand_over: bool) -> Value {
    json!({"migration": migration, "holder": {"migration": migration, "source": "node-a",
        "target": target, "handOver": hand_over}})
}

/// Issue 15: `status.nodeName` moves only as the operator's record of the migration that
/// holds the VM (`status.holder`) allows — to its target, by that target, in Finish;
/// back to the source, by the source, after that — and no agent writes the record.
#[tokio::test]
async fn nodename_moves_only_to_the_recorded_target_in_finish() {
    let env = env().await;
    let (a, b, c) = (
        agent_on(&env, "node-a").await,
        agent_on(&env, "node-b").await,
        agent_on(&env, "node-c").await,
    );
    allowed(
        "node-a starts the guest",
        patch_vm(&a, json!({"nodeName": "node-a", "phase": "Running"})).await,
    );
    admit(&env, MIGRATION).await;
    allowed(
        "the operator holds the VM for the migration to node-b",
        patch_vm(&env.admin, held(MIGRATION, Some("node-b"), false)).await,
    );

    // No agent writes the record: not the source, not the target, not to open Finish.
    denied(
        "the target opens the hand-over itself, taking status.nodeName with it",
        "holder-fields",
        patch_vm(
            &b,
            json!({"nodeName": "node-b", "holder": {"handOver": true}}),
        )
        .await,
    );
    denied(
        "the source opens the hand-over",
        "holder-fields",
        patch_vm(&a, json!({"holder": {"handOver": true}})).await,
    );
    denied(
        "the source names node-c the target",
        "holder-fields",
        patch_vm(&a, json!({"holder": {"target": "node-c"}})).await,
    );
    denied(
        "the source drops the record",
        "holder-fields",
        patch_vm(&a, json!({"holder": null})).await,
    );
    denied(
        "the source fences and drops the record in one write",
        "holder-fields",
        patch_vm(&a, json!({"migration": null, "holder": null})).await,
    );
    denied(
        "the target takes status.nodeName outside Finish",
        "nodename-finish",
        patch_vm(&b, json!({"nodeName": "node-b"})).await,
    );
    allowed(
        "the operator opens the hand-over (Finish)",
        patch_vm(&env.admin, held(MIGRATION, Some("node-b"), true)).await,
    );
    denied(
        "node-c, not the target, takes status.nodeName in Finish",
        "nodename-target",
        patch_vm(&c, json!({"nodeName": "node-c"})).await,
    );
    denied(
        "the source moves it to node-c",
        "nodename-own",
        patch_vm(&a, json!({"nodeName": "node-c"})).await,
    );
    // The record must name the migration that holds the VM.
    allowed(
        "a record left from another migration",
        patch_vm(
            &env.admin,
            json!({"holder": {"migration": "other", "source": "node-a", "target": "node-b",
                   "handOver": true}}),
        )
        .await,
    );
    denied(
        "the target takes status.nodeName on a record of another migration",
        "nodename-migration",
        patch_vm(&b, json!({"nodeName": "node-b"})).await,
    );
    // The operator's record says node-c; node-b, the migration's spec target, is not it.
    allowed(
        "the operator's record names node-c",
        patch_vm(&env.admin, held(MIGRATION, Some("node-c"), true)).await,
    );
    denied(
        "node-b moves status.nodeName to itself, not the recorded target",
        "nodename-target",
        patch_vm(&b, json!({"nodeName": "node-b"})).await,
    );
    allowed(
        "the operator's record names node-b again",
        patch_vm(&env.admin, held(MIGRATION, Some("node-b"), true)).await,
    );
    allowed(
        "the target takes status.nodeName in Finish",
        patch_vm(&b, json!({"nodeName": "node-b", "domainXML": "<domain/>"})).await,
    );
    denied(
        "node-c takes it from the target",
        "nodename-target",
        patch_vm(&c, json!({"nodeName": "node-c"})).await,
    );
    // TargetNeverRan: the source takes it back, guarded like the target's write.
    allowed(
        "the source takes status.nodeName back after its target never ran the guest",
        patch_vm(&a, json!({"nodeName": "node-a"})).await,
    );
    // Released, nothing moves.
    allowed(
        "the operator releases the VM",
        patch_vm(&env.admin, json!({"migration": null, "holder": null})).await,
    );
    denied(
        "the target takes a released VM",
        "nodename-migration",
        patch_vm(&b, json!({"nodeName": "node-b"})).await,
    );
    let vm = vms(&env.admin).get("demo").await.unwrap();
    assert_eq!(vm.status.unwrap().node_name.as_deref(), Some("node-a"));
}

async fn patch_vm_object(client: &Client, body: Value) -> kube::Result<VirtualMachine> {
    vms(client)
        .patch("demo", &PatchParams::default(), &Patch::Merge(body))
        .await
}

#[tokio::test]
async fn only_the_vms_node_adds_or_removes_its_finalizer_and_nothing_else() {
    let env = env().await;
    let (a, b) = (
        agent_on(&env, "node-a").await,
        agent_on(&env, "node-b").await,
    );
    let finalizers = |f: &[&str]| json!({"metadata": {"finalizers": f}});

    // Before the first start, the node the spec names adds it.
    denied(
        "node-b adds the finalizer to a VM meant for node-a",
        "own-vm",
        patch_vm_object(&b, finalizers(&["ferry.dev/guest"])).await,
    );
    allowed(
        "node-a adds the finalizer before it starts the guest",
        patch_vm_object(&a, finalizers(&["ferry.dev/guest"])).await,
    );
    // Nothing but that finalizer.
    denied(
        "node-a changes the spec",
        "finalizer-only",
        patch_vm_object(&a, json!({"spec": {"running": false}})).await,
    );
    denied(
        "node-a labels the VM",
        "finalizer-only",
        patch_vm_object(&a, json!({"metadata": {"labels": {"x": "y"}}})).await,
    );
    denied(
        "node-a adds another finalizer",
        "finalizer-only",
        patch_vm_object(&a, finalizers(&["ferry.dev/guest", "example.com/other"])).await,
    );
    allowed(
        "the admin adds another finalizer",
        patch_vm_object(
            &env.admin,
            finalizers(&["ferry.dev/guest", "example.com/other"]),
        )
        .await,
    );
    denied(
        "node-a drops the admin's finalizer with its own",
        "finalizer-only",
        patch_vm_object(&a, finalizers(&[])).await,
    );

    // Once the guest runs on node-b (status.nodeName), node-b owns the VM, node-a no more.
    allowed(
        "the admin moves the VM to node-b",
        patch_vm(
            &env.admin,
            json!({"nodeName": "node-b", "phase": "Running"}),
        )
        .await,
    );
    denied(
        "node-a removes the finalizer of a VM that runs on node-b",
        "own-vm",
        patch_vm_object(&a, finalizers(&["example.com/other"])).await,
    );
    allowed(
        "node-b removes its finalizer once the deleted VM's guest is gone",
        patch_vm_object(&b, finalizers(&["example.com/other"])).await,
    );
    let vm = vms(&env.admin).get("demo").await.unwrap();
    assert_eq!(
        vm.metadata.finalizers,
        Some(vec!["example.com/other".into()])
    );
}

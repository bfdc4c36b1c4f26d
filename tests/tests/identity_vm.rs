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

    // The operator admits the migration and marks the VM as held.
    admit(&env, MIGRATION).await;
    allowed(
        "the operator marks the VM as held",
        patch_vm(&env.admin, json!({"migration": MIGRATION})).await,
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
    // A migration to a file: once saved, the source gives the VM up (no QEMU runs).
    allowed(
        "the source clears status.nodeName of the saved guest",
        patch_vm(&a, json!({"nodeName": null, "phase": "Stopped"})).await,
    );
    allowed(
        "the admin puts it back for the rest of the test",
        patch_vm(
            &env.admin,
            json!({"nodeName": "node-a", "phase": "Running"}),
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

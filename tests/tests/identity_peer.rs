//! The admission policy for peer-to-peer migrations (`spec.mode: PeerToPeer`), against
//! the real apiserver with the chart installed: the source agent drives, so it may enter
//! phases and record the target's steps and cookies — only in such a migration, only
//! the phases between Begin and the end, never taking a rollback back — and nobody
//! else gains anything.

use ferry_crds::VirtualMachineMigration;
use ferry_tests::policy_check::*;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

const PEER: &str = "peer-to-peer";

/// Creates the peer-to-peer migration and admits both it and the example's managed one
/// as the operator would: Begin, node-a to node-b.
async fn admit_both(env: &Env) {
    let api = Api::<VirtualMachineMigration>::namespaced(env.admin.clone(), VMS);
    let m: VirtualMachineMigration = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
        "metadata": {"name": PEER},
        "spec": {"vmName": "demo", "targetNode": "node-b", "mode": "PeerToPeer"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &m).await.unwrap();
    for name in [PEER, MIGRATION] {
        admit(env, name).await;
    }
}

async fn patch(
    client: &Client,
    name: &str,
    status: Value,
) -> kube::Result<VirtualMachineMigration> {
    Api::<VirtualMachineMigration>::namespaced(client.clone(), VMS)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
}

fn ended(node: &str) -> Value {
    json!({"node": node, "start": "2026-01-01T00:00:00.000000Z",
           "end": "2026-01-01T00:00:01.000000Z", "outcome": "Succeeded", "message": "ok"})
}

#[tokio::test]
async fn the_source_drives_only_a_peer_to_peer_migration() {
    let env = env().await;
    admit_both(&env).await;
    let (a, b, c) = (
        agent_on(&env, "node-a").await,
        agent_on(&env, "node-b").await,
        agent_on(&env, "node-c").await,
    );

    // What the driver writes: Begin's step with the phase it enters, then the target's
    // Prepare step and outputs as the target answered them, then Perform.
    allowed(
        "the driver records Begin and enters Prepare",
        patch(
            &a,
            PEER,
            json!({"steps": {"begin": ended("node-a")}, "cookies": {"begin": "<ferry-migration/>"},
                   "targetDomainXML": "<domain/>", "phase": "Prepare", "cancelled": false,
                   "phaseTransitionTime": "2026-01-01T00:00:01Z"}),
        )
        .await,
    );
    allowed(
        "the driver records the target's Prepare and enters Perform",
        patch(
            &a,
            PEER,
            json!({"steps": {"prepare": ended("node-b")}, "cookies": {"prepare": "<ferry-migration/>"},
                   "migrationURI": "tcp:127.0.0.3:49152", "phase": "Perform"}),
        )
        .await,
    );

    // Not in a managed migration: there the operator enters phases and the target
    // writes its own steps.
    denied(
        "a managed migration's source enters Prepare",
        "operator-fields",
        patch(&a, MIGRATION, json!({"phase": "Prepare"})).await,
    );
    denied(
        "a managed migration's source records the target's Prepare",
        "target-fields",
        patch(
            &a,
            MIGRATION,
            json!({"cookies": {"prepare": "<ferry-migration/>"}}),
        )
        .await,
    );
    denied(
        "a managed migration's source writes a step naming the target",
        "target-fields",
        patch(
            &a,
            MIGRATION,
            json!({"steps": {"prepare": ended("node-b")}}),
        )
        .await,
    );

    // The driver starts and ends nothing, and takes no rollback back.
    for phase in ["Succeeded", "Failed", "Cancelled", "Pending", "Begin"] {
        denied(
            &format!("the driver enters {phase}"),
            "driver-phase",
            patch(&a, PEER, json!({"phase": phase})).await,
        );
    }
    denied(
        "the driver writes the operator's conditions",
        "operator-fields",
        patch(
            &a,
            PEER,
            json!({"conditions": [{"type": "Complete", "status": "True", "reason": "Migrated",
                    "message": "forged", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        )
        .await,
    );
    allowed(
        "the driver starts a rollback",
        patch(&a, PEER, json!({"phase": "Finish", "cancelled": true})).await,
    );
    denied(
        "the driver takes the rollback back",
        "keep-cancelled",
        patch(&a, PEER, json!({"cancelled": false})).await,
    );
    denied(
        "the driver records a Finish step naming a third node",
        "step-node",
        patch(&a, PEER, json!({"steps": {"finish": ended("node-c")}})).await,
    );
    denied(
        "the driver publishes a recovery URI (the target's to write)",
        "target-fields",
        patch(&a, PEER, json!({"recoveryURI": "tcp:127.0.0.9:1"})).await,
    );
    denied(
        "the driver says the target lost the guest (the target's to write)",
        "target-fields",
        patch(&a, PEER, json!({"targetLost": "made up"})).await,
    );

    // The target gains nothing from the mode; a third node writes nothing.
    denied(
        "the target of a peer-to-peer migration enters a phase",
        "operator-fields",
        patch(&b, PEER, json!({"phase": "Confirm"})).await,
    );
    denied(
        "the target writes the source's Perform step",
        "source-fields",
        patch(&b, PEER, json!({"steps": {"perform": ended("node-b")}})).await,
    );
    denied(
        "node-c enters a phase",
        "own-migration",
        patch(&c, PEER, json!({"phase": "Confirm"})).await,
    );
}

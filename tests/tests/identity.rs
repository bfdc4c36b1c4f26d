//! Agent identity bound to its node (issue 7, item 2): against the real apiserver with the
//! chart installed, tokens bound to Nodes carry the node's name, and the chart's admission
//! policy lets an agent write only the status fields its node's phases own.

use ferry_crds::VirtualMachineMigration;
use ferry_tests::identity::{NODE_NAME_EXTRA, node_of, whoami};
use ferry_tests::policy_check::*;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

fn migrations(client: &Client) -> Api<VirtualMachineMigration> {
    Api::namespaced(client.clone(), VMS)
}

async fn patch_migration(client: &Client, status: Value) -> kube::Result<VirtualMachineMigration> {
    migrations(client)
        .patch_status(
            MIGRATION,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
}

#[tokio::test]
async fn bound_tokens_carry_their_node() {
    let env = env().await;

    // A token bound to a Node names it.
    let user = whoami(&agent_on(&env, "node-a").await).await.unwrap();
    println!("node-bound token: {user:?}");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:ferry-system:ferry-agent")
    );
    assert_eq!(
        node_of(&user),
        Some("node-a"),
        "{NODE_NAME_EXTRA} of {user:?}"
    );

    // A plain token names none.
    let user = whoami(&agent_unbound(&env).await).await.unwrap();
    assert_eq!(node_of(&user), None, "{user:?}");

    // A token bound to a Pod (what the kubelet projects into the agent's DaemonSet Pod)
    // names the Pod's node too.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "agent-x"},
        "spec": {"nodeName": "node-c", "serviceAccountName": AGENT,
                 "containers": [{"name": "agent", "image": "ferry-agent"}]}
    }))
    .unwrap();
    let pod = Api::<Pod>::namespaced(env.admin.clone(), NS)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let token = agent_token(
        &env,
        json!({
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "agent-x",
                               "uid": pod.metadata.uid}
        }),
    )
    .await;
    let path = env.cp.dir().join("agent-pod.kubeconfig");
    let client = env
        .cp
        .client_for_token("agent-pod", &token, &path)
        .await
        .unwrap();
    let user = whoami(&client).await.unwrap();
    println!("pod-bound token: {user:?}");
    assert_eq!(node_of(&user), Some("node-c"), "{user:?}");
}

#[tokio::test]
async fn only_the_migrations_own_agents_write_its_status() {
    let env = env().await;
    admit(&env, MIGRATION).await;
    let (a, b, c) = (
        agent_on(&env, "node-a").await,
        agent_on(&env, "node-b").await,
        agent_on(&env, "node-c").await,
    );

    // A node that is neither source nor target writes nothing.
    denied(
        "node-c writes Begin's cookie",
        "own-migration",
        patch_migration(&c, json!({"cookies": {"begin": "<ferry-migration/>"}})).await,
    );
    denied(
        "node-c writes Prepare's step",
        "own-migration",
        patch_migration(&c, json!({"steps": {"prepare": step("node-c")}})).await,
    );
    // An agent token bound to no node writes nothing.
    denied(
        "an unbound agent token writes Begin's cookie",
        "node-bound",
        patch_migration(
            &agent_unbound(&env).await,
            json!({"cookies": {"begin": "<ferry-migration/>"}}),
        )
        .await,
    );

    // The target cannot write the source's phases.
    denied(
        "the target writes Begin's step",
        "source-fields",
        patch_migration(&b, json!({"steps": {"begin": step("node-b")}})).await,
    );
    denied(
        "the target writes Begin's cookie",
        "source-fields",
        patch_migration(&b, json!({"cookies": {"begin": "<ferry-migration/>"}})).await,
    );
    denied(
        "the target writes the progress",
        "source-fields",
        patch_migration(
            &b,
            json!({"progress": {"bytesTotal": 1, "bytesTransferred": 1,
            "bytesRemaining": 0, "dirtyRateBytesPerSecond": 0, "throughputBytesPerSecond": 0,
            "iteration": 1, "expectedDowntimeMs": 0}}),
        )
        .await,
    );

    // The source writes its own step and cookie, as the runner does.
    allowed(
        "the source starts Begin",
        patch_migration(&a, json!({"steps": {"begin": step("node-a")}})).await,
    );
    allowed(
        "the source ends Begin with its cookie and the target's XML",
        patch_migration(
            &a,
            json!({
                "steps": {"begin": {"node": "node-a", "start": "2026-01-01T00:00:00.000000Z",
                    "end": "2026-01-01T00:00:01.000000Z", "outcome": "Succeeded", "message": "ok"}},
                "cookies": {"begin": "<ferry-migration/>"},
                "targetDomainXML": "<domain/>",
            }),
        )
        .await,
    );
    // ... but not the target's, nor the operator's fields, nor a step naming another node.
    denied(
        "the source writes Prepare's cookie",
        "target-fields",
        patch_migration(&a, json!({"cookies": {"prepare": "<ferry-migration/>"}})).await,
    );
    denied(
        "the source writes the migration URI",
        "target-fields",
        patch_migration(&a, json!({"migrationURI": "tcp:127.0.0.9:1"})).await,
    );
    denied(
        "the source writes the recovery URI",
        "target-fields",
        patch_migration(&a, json!({"recoveryURI": "tcp:127.0.0.9:1"})).await,
    );
    allowed(
        "the target publishes where it listens again after a post-copy cut",
        patch_migration(&b, json!({"recoveryURI": "tcp:127.0.0.3:49153"})).await,
    );
    denied(
        "the source says the target lost the guest",
        "target-fields",
        patch_migration(&a, json!({"targetLost": "made up"})).await,
    );
    denied(
        "the source moves the phase on",
        "operator-fields",
        patch_migration(&a, json!({"phase": "Prepare"})).await,
    );
    denied(
        "the source makes node-c the target",
        "operator-fields",
        patch_migration(&a, json!({"targetNode": "node-c"})).await,
    );
    denied(
        "the target sets cancelled",
        "operator-fields",
        patch_migration(&b, json!({"cancelled": true})).await,
    );
    denied(
        "the source writes Perform's step in node-b's name",
        "step-node",
        patch_migration(&a, json!({"steps": {"perform": step("node-b")}})).await,
    );

    // The target writes Prepare's outputs and Finish's.
    allowed(
        "the target ends Prepare",
        patch_migration(
            &b,
            json!({
                "steps": {"prepare": step("node-b")},
                "cookies": {"prepare": "<ferry-migration/>"},
                "migrationURI": "tcp:127.0.0.3:49152",
            }),
        )
        .await,
    );
    allowed(
        "the target writes Finish's cookie",
        patch_migration(&b, json!({"cookies": {"finish": "<ferry-migration/>"}})).await,
    );

    // The operator (here the admin) is not an agent and not bound by the policy.
    allowed(
        "the operator moves the phase on",
        patch_migration(&env.admin, json!({"phase": "Prepare"})).await,
    );
    let m = migrations(&env.admin).get(MIGRATION).await.unwrap();
    let status = m.status.unwrap();
    let cookies = status.cookies.unwrap();
    assert_eq!(cookies.begin.as_deref(), Some("<ferry-migration/>"));
    assert_eq!(status.migration_uri.as_deref(), Some("tcp:127.0.0.3:49152"));
    assert_eq!(status.target_node.as_deref(), Some("node-b"));
}

#[tokio::test]
async fn a_spec_editor_cannot_forge_status() {
    let env = env().await;
    admit(&env, MIGRATION).await;
    // A user who may edit migrations (the main resource) but not their status.
    Api::<ServiceAccount>::namespaced(env.admin.clone(), VMS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "editor"}})).unwrap(),
        )
        .await
        .unwrap();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "migration-editor"},
        "rules": [{"apiGroups": ["ferry.dev"], "resources": ["virtualmachinemigrations"],
                   "verbs": ["get", "list", "watch", "create", "update", "patch"]}]
    }))
    .unwrap();
    Api::<Role>::namespaced(env.admin.clone(), VMS)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "migration-editor"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "migration-editor"},
        "subjects": [{"kind": "ServiceAccount", "name": "editor", "namespace": VMS}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(env.admin.clone(), VMS)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let req: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"]}
    }))
    .unwrap();
    let token = Api::<ServiceAccount>::namespaced(env.admin.clone(), VMS)
        .create_token_request("editor", &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .unwrap();
    let path = env.cp.dir().join("editor.kubeconfig");
    let editor = env
        .cp
        .client_for_token("editor", &token, &path)
        .await
        .unwrap();
    let forged = json!({"cookies": {"begin": "<ferry-migration>forged</ferry-migration>"},
                        "steps": {"begin": {"node": "node-a", "start": "2026-01-01T00:00:00.000000Z",
                                            "outcome": "Succeeded"}}});

    // The status subresource: RBAC refuses.
    match patch_migration(&editor, forged.clone()).await {
        Err(kube::Error::Api(s)) if s.code == 403 => println!("status patch: {}", s.message),
        other => panic!("a status write by a spec editor should be 403, got {other:?}"),
    }

    // The main resource: the apiserver accepts the request but drops every status change
    // (the CRD has a status subresource), so the spec change lands and the cookie does not.
    let after = migrations(&editor)
        .patch(
            MIGRATION,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cancel": true}, "status": forged})),
        )
        .await
        .expect("a spec patch by a spec editor is accepted");
    let status = after.status.unwrap_or_default();
    assert!(after.spec.cancel, "the spec change lands");
    assert_eq!(status.cookies, None, "no cookie was forged: {status:?}");
    assert_eq!(status.steps, None, "no step was forged: {status:?}");

    // A full update (PUT) with a status: the same.
    let mut m = migrations(&editor).get(MIGRATION).await.unwrap();
    let mut s = m.status.clone().unwrap_or_default();
    s.cookies =
        serde_json::from_value(json!({"begin": "<ferry-migration>forged</ferry-migration>"}))
            .unwrap();
    s.phase = None;
    m.status = Some(s);
    let after = migrations(&editor)
        .replace(MIGRATION, &PostParams::default(), &m)
        .await
        .expect("a PUT by a spec editor is accepted");
    let status = after.status.unwrap_or_default();
    assert_eq!(
        status.cookies, None,
        "no cookie was forged by PUT: {status:?}"
    );
    assert!(status.phase.is_some(), "the phase was not cleared by PUT");

    // Creating a migration with a status: the status is dropped.
    let created = migrations(&editor)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
                "metadata": {"name": "forged"},
                "spec": {"vmName": "demo", "transport": {"mode": "Direct"}},
                "status": {"phase": "Finish", "sourceNode": "node-a", "targetNode": "node-c",
                           "cookies": {"perform": "<ferry-migration/>"}}
            }))
            .unwrap(),
        )
        .await
        .expect("a spec editor creates a migration");
    assert_eq!(created.status.and_then(|s| s.phase), None);
}

#[tokio::test]
async fn an_agent_writes_only_its_own_leases() {
    let env = env().await;
    let a = Api::<Lease>::namespaced(agent_on(&env, "node-a").await, NS);
    let c = Api::<Lease>::namespaced(agent_on(&env, "node-c").await, NS);
    let lease = |name: &str, holder: &str| -> Lease {
        serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 10}}))
        .unwrap()
    };
    let (pp, disk) = (PostParams::default(), "ferry-disk-vms.demo.vda");
    allowed(
        "node-a's heartbeat",
        a.create(&pp, &lease("ferry-node-node-a", "node-a")).await,
    );
    allowed(
        "node-a takes a disk lock",
        a.create(&pp, &lease(disk, "node-a")).await,
    );
    let renew = Patch::Merge(json!({"spec": {"leaseDurationSeconds": 20}}));
    denied(
        "node-c renews node-a's heartbeat",
        "lease-name",
        c.patch("ferry-node-node-a", &PatchParams::default(), &renew)
            .await,
    );
    denied(
        "node-c takes the operator's leader Lease",
        "lease-name",
        c.create(&pp, &lease("ferry-operator-leader", "node-c"))
            .await,
    );
    denied(
        "node-c writes a heartbeat for node-a",
        "lease-holder",
        c.create(&pp, &lease("ferry-node-node-c", "node-a")).await,
    );
    let give = Patch::Merge(json!({"spec": {"holderIdentity": "node-b"}}));
    denied(
        "node-c hands node-a's disk lock to node-b",
        "lease-holder",
        c.patch(disk, &PatchParams::default(), &give).await,
    );
    denied(
        "node-c drops node-a's disk lock",
        "lease-holder",
        c.delete(disk, &DeleteParams::default()).await,
    );
    allowed(
        "node-a drops its lock",
        a.delete(disk, &DeleteParams::default()).await,
    );
}

/// Issue 15: a node takes a disk lock another node holds only in the hand-over the
/// operator stamped on it (`ferry.dev/hand-over*` annotations: from the holder, to the
/// writer), and no agent writes the stamp.
#[tokio::test]
async fn a_disk_lock_is_taken_only_in_the_stamped_hand_over() {
    let env = env().await;
    let a = Api::<Lease>::namespaced(agent_on(&env, "node-a").await, NS);
    let b = Api::<Lease>::namespaced(agent_on(&env, "node-b").await, NS);
    let c = Api::<Lease>::namespaced(agent_on(&env, "node-c").await, NS);
    let admin = Api::<Lease>::namespaced(env.admin.clone(), NS);
    let (pp, disk) = (PatchParams::default(), "ferry-disk-vms.demo.vda");
    let lock = |holder: &str, stamp: Option<(&str, &str)>| -> Lease {
        let annotations = stamp.map(|(from, to)| {
            json!({"ferry.dev/hand-over": MIGRATION, "ferry.dev/hand-over-from": from,
                   "ferry.dev/hand-over-to": to})
        });
        serde_json::from_value(json!({"metadata": {"name": disk,
            "labels": {"ferry.dev/vm": "vms.demo"}, "annotations": annotations},
            "spec": {"holderIdentity": holder}}))
        .unwrap()
    };
    let take = |node: &str| Patch::Merge(json!({"spec": {"holderIdentity": node}}));
    let stamp = |from: Option<&str>, to: Option<&str>| {
        Patch::Merge(json!({"metadata": {"annotations": {
            "ferry.dev/hand-over": from.map(|_| MIGRATION), "ferry.dev/hand-over-from": from,
            "ferry.dev/hand-over-to": to}}}))
    };

    denied(
        "node-a creates its lock already stamped for a hand-over",
        "lease-stamp",
        a.create(
            &PostParams::default(),
            &lock("node-a", Some(("node-c", "node-a"))),
        )
        .await,
    );
    allowed(
        "node-a takes its disk lock at the first start",
        a.create(&PostParams::default(), &lock("node-a", None))
            .await,
    );
    denied(
        "node-b, the target, takes the lock before Finish (no stamp)",
        "lease-take-over",
        b.patch(disk, &pp, &take("node-b")).await,
    );
    denied(
        "node-a stamps its lock for node-b itself",
        "lease-stamp",
        a.patch(disk, &pp, &stamp(Some("node-a"), Some("node-b")))
            .await,
    );
    denied(
        "node-b stamps the lock for itself while taking it",
        "lease-stamp",
        b.patch(
            disk,
            &pp,
            &Patch::Merge(json!({"metadata": {"annotations": {
                "ferry.dev/hand-over": MIGRATION, "ferry.dev/hand-over-from": "node-a",
                "ferry.dev/hand-over-to": "node-b"}},
                "spec": {"holderIdentity": "node-b"}})),
        )
        .await,
    );

    // Finish: the operator stamps the hand-over from node-a to node-b.
    allowed(
        "the operator stamps the hand-over",
        admin
            .patch(disk, &pp, &stamp(Some("node-a"), Some("node-b")))
            .await,
    );
    denied(
        "node-c, neither holder nor the stamp's target, takes the lock",
        "lease-take-over",
        c.patch(disk, &pp, &take("node-c")).await,
    );
    denied(
        "node-a, the holder, hands the lock to node-b",
        "lease-holder",
        a.patch(disk, &pp, &take("node-b")).await,
    );
    denied(
        "node-b takes the lock and drops the stamp",
        "lease-stamp",
        b.patch(
            disk,
            &pp,
            &Patch::Merge(
                json!({"metadata": {"annotations": {"ferry.dev/hand-over-to": null}},
                "spec": {"holderIdentity": "node-b"}}),
            ),
        )
        .await,
    );
    let rv = admin.get(disk).await.unwrap().metadata.resource_version;
    allowed(
        "node-b takes the lock in the stamped hand-over (over the version read)",
        b.patch(
            disk,
            &pp,
            &Patch::Merge(json!({"metadata": {"resourceVersion": rv},
                "spec": {"holderIdentity": "node-b"}})),
        )
        .await,
    );
    denied(
        "node-a takes it back while the stamp says node-a to node-b",
        "lease-take-over",
        a.patch(disk, &pp, &take("node-a")).await,
    );
    // A cancelled Confirm after the hand-over: stamped back, the source takes it back.
    allowed(
        "the operator stamps the way back",
        admin
            .patch(disk, &pp, &stamp(Some("node-b"), Some("node-a")))
            .await,
    );
    denied(
        "node-c takes the lock on the way back",
        "lease-take-over",
        c.patch(disk, &pp, &take("node-c")).await,
    );
    allowed(
        "node-a takes its lock back",
        a.patch(disk, &pp, &take("node-a")).await,
    );
    allowed(
        "node-a renews the lock it holds",
        a.patch(
            disk,
            &pp,
            &Patch::Merge(json!({"spec": {"leaseDurationSeconds": 20}})),
        )
        .await,
    );
    // The migration ended: no stamp, no take-over.
    allowed(
        "the operator removes the stamp",
        admin.patch(disk, &pp, &stamp(None, None)).await,
    );
    denied(
        "node-b takes the lock after the migration",
        "lease-take-over",
        b.patch(disk, &pp, &take("node-b")).await,
    );
    allowed(
        "node-a drops its lock",
        a.delete(disk, &DeleteParams::default()).await,
    );
    // The holder drops its lock even while it is stamped: its guest died during the
    // hand-over (found by the fault matrix: a refused delete leaked the lock).
    allowed(
        "the operator stamps a lock of node-b's",
        admin
            .create(
                &PostParams::default(),
                &lock("node-b", Some(("node-a", "node-b"))),
            )
            .await,
    );
    denied(
        "node-a drops node-b's stamped lock",
        "lease-holder",
        a.delete(disk, &DeleteParams::default()).await,
    );
    allowed(
        "node-b drops the stamped lock it holds",
        b.delete(disk, &DeleteParams::default()).await,
    );
}

/// Issue 15: an agent mints no token, for its own node or another one: its
/// ServiceAccount may not create `serviceaccounts/token` (TokenRequest) at all. Its
/// credential is the Pod-bound token the kubelet projects into its Pod.
#[tokio::test]
async fn an_agent_mints_no_tokens() {
    let env = env().await;
    let a = agent_on(&env, "node-a").await;
    let sas = Api::<ServiceAccount>::namespaced(a.clone(), NS);
    let node_b = ferry_tests::identity::ensure_node(&env.admin, "node-b")
        .await
        .unwrap();
    let node_a = ferry_tests::identity::ensure_node(&env.admin, "node-a")
        .await
        .unwrap();
    let request = |node: Option<(&str, &str)>| -> TokenRequest {
        let bound = node.map(
            |(name, uid)| json!({"kind": "Node", "apiVersion": "v1", "name": name, "uid": uid}),
        );
        serde_json::from_value(json!({"spec": {
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
            "expirationSeconds": 3600,
            "boundObjectRef": bound,
        }}))
        .unwrap()
    };
    let refused = |what: &str, result: kube::Result<TokenRequest>| match result {
        Err(kube::Error::Api(s))
            if s.code == 403
                && s.message
                    .contains("cannot create resource \"serviceaccounts/token\"") =>
        {
            println!("{what}: refused: {}", s.message);
        }
        other => panic!("{what} should be refused by RBAC, got: {other:?}"),
    };
    refused(
        "node-a's agent mints an agent token bound to node-b",
        sas.create_token_request(
            AGENT,
            &PostParams::default(),
            &request(Some(("node-b", &node_b))),
        )
        .await,
    );
    refused(
        "node-a's agent mints an agent token bound to its own node",
        sas.create_token_request(
            AGENT,
            &PostParams::default(),
            &request(Some(("node-a", &node_a))),
        )
        .await,
    );
    refused(
        "node-a's agent mints an agent token bound to nothing",
        sas.create_token_request(AGENT, &PostParams::default(), &request(None))
            .await,
    );
    refused(
        "node-a's agent mints an operator token",
        sas.create_token_request("ferry-operator", &PostParams::default(), &request(None))
            .await,
    );
}

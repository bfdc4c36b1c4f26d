//! The chart's ServiceAccounts, with tokens from the real TokenRequest API, can do what
//! the design needs and are refused (403) the rest.

use ferry_crds::{VirtualMachine, VirtualMachineMigration};
use ferry_tests::ControlPlane;
use ferry_tests::identity::node_bound_token;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const NS: &str = "ferry-system";
const VMS: &str = "vms";

async fn token_for(admin: &Client, sa: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
    let req: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
            "expirationSeconds": 3600
        }
    }))
    .unwrap();
    sas.create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {sa}: {e}"))
        .status
        .and_then(|s| s.token)
        .expect("a TokenRequest answer has a token")
}

#[track_caller]
fn allowed<T>(what: &str, result: kube::Result<T>) {
    if let Err(e) = result {
        panic!("{what} should be allowed, got: {e}");
    }
}

#[track_caller]
fn forbidden<T: std::fmt::Debug>(what: &str, result: kube::Result<T>) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what} should be forbidden (403), got: {other:?}"),
    }
}

fn lease(name: &str) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 10}
    }))
    .unwrap()
}

fn event(name: &str, controller: &str) -> Event {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": controller,
        "reportingInstance": "test",
        "action": "Migrate",
        "reason": "Test",
        "type": "Normal",
        "note": "rbac test",
        "regarding": {"apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
                      "namespace": VMS, "name": "demo"}
    }))
    .unwrap()
}

/// A CSR named `name` for `signer`, asking for a node certificate of `node`.
fn csr(name: &str, signer: &str, node: &str) -> CertificateSigningRequest {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![node.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "request": k8s_openapi::ByteString(pem.into_bytes()),
            "signerName": signer,
            "usages": ferry_crds::tls::USAGES,
        }
    }))
    .unwrap()
}

/// A self-signed certificate (PEM), as a signer's answer.
fn certificate_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(vec!["node-a".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem()
}

fn approval(kind: &str) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"status": {"conditions": [{
        "type": kind, "status": "True", "reason": "Test", "message": "rbac test",
        "lastUpdateTime": "2026-01-01T00:00:00Z"}]}}))
}

struct Cluster {
    cp: ControlPlane,
    admin: Client,
}

async fn cluster() -> Cluster {
    let cp = ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("control plane: {e}"));
    cp.chart_with_examples(NS, VMS)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let admin = cp.admin_client().await.unwrap();
    for ns in [NS, VMS] {
        let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}),
                )
                .unwrap(),
            )
            .await
            .unwrap();
    }
    Cluster { cp, admin }
}

async fn client_as(c: &Cluster, sa: &str) -> Client {
    let token = token_for(&c.admin, sa).await;
    let path = c.cp.dir().join(format!("{sa}.kubeconfig"));
    c.cp.client_for_token(sa, &token, &path).await.unwrap()
}

#[tokio::test]
async fn agent_reads_specs_writes_status_and_nothing_more() {
    let c = cluster().await;
    // The chart's admission policy only lets an agent whose token names its node write
    // status, and only where that node takes part (tests/tests/identity.rs): the agent of
    // node-a, source of the example migration as the operator admitted it.
    Api::<VirtualMachineMigration>::namespaced(c.admin.clone(), VMS)
        .patch_status(
            "demo-to-node-b",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"sourceNode": "node-a", "targetNode": "node-b"}})),
        )
        .await
        .unwrap();
    let token = node_bound_token(&c.admin, NS, "ferry-agent", "node-a", 3600)
        .await
        .unwrap();
    let path = c.cp.dir().join("ferry-agent.kubeconfig");
    let agent =
        c.cp.client_for_token("ferry-agent", &token, &path)
            .await
            .unwrap();
    let vms: Api<VirtualMachine> = Api::namespaced(agent.clone(), VMS);
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(agent.clone(), VMS);
    let pp = PatchParams::default();

    // What the design needs.
    allowed(
        "list VMs in all namespaces",
        Api::<VirtualMachine>::all(agent.clone())
            .list(&ListParams::default())
            .await,
    );
    allowed(
        "watch-list migrations by node label",
        Api::<VirtualMachineMigration>::all(agent.clone())
            .list(&ListParams::default().labels("ferry.dev/source-node=node-a"))
            .await,
    );
    allowed(
        "write a step into migration status",
        vmms.patch_status(
            "demo-to-node-b",
            &pp,
            &Patch::Merge(json!({"status": {"cookies": {"begin": "<ferry-migration/>"}}})),
        )
        .await,
    );
    allowed(
        "claim VM status.nodeName at the first start",
        vms.patch_status(
            "demo",
            &pp,
            &Patch::Merge(json!({"status": {"nodeName": "node-a"}})),
        )
        .await,
    );
    allowed(
        "add its finalizer to a VM of its node (the admission policy allows nothing else)",
        vms.patch(
            "demo",
            &pp,
            &Patch::Merge(json!({"metadata": {"finalizers": ["ferry.dev/guest"]}})),
        )
        .await,
    );
    let leases: Api<Lease> = Api::namespaced(agent.clone(), NS);
    allowed(
        "create its heartbeat Lease",
        leases
            .create(&PostParams::default(), &lease("ferry-node-node-a"))
            .await,
    );
    allowed(
        "renew its heartbeat Lease",
        leases
            .patch(
                "ferry-node-node-a",
                &pp,
                &Patch::Merge(json!({"spec": {"holderIdentity": "node-a"}})),
            )
            .await,
    );
    allowed(
        "record an Event",
        Api::<Event>::namespaced(agent.clone(), VMS)
            .create(
                &PostParams::default(),
                &event("agent-event", "ferry.dev/agent"),
            )
            .await,
    );
    let csrs: Api<CertificateSigningRequest> = Api::all(agent.clone());
    allowed(
        "ask for its migration certificate",
        csrs.create(
            &PostParams::default(),
            &csr("ferry-node-a-1", "ferry.dev/migration", "node-a"),
        )
        .await,
    );
    allowed(
        "read the answer to its request",
        csrs.get("ferry-node-a-1").await,
    );
    Api::<ConfigMap>::namespaced(c.admin.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "ferry-ca"}, "data": {"ca.crt": "x"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    allowed(
        "read the migration CA's certificate",
        Api::<ConfigMap>::namespaced(agent.clone(), NS)
            .get("ferry-ca")
            .await,
    );
    Api::<Secret>::namespaced(c.admin.clone(), NS)
        .create(
            &PostParams::default(),
            &ferry_operator::state_key::secret([7; 32]),
        )
        .await
        .unwrap();
    allowed(
        "read the state key",
        Api::<Secret>::namespaced(agent.clone(), NS)
            .get("ferry-state-key")
            .await,
    );

    // And no more.
    forbidden(
        "approve its own certificate request",
        csrs.patch_approval("ferry-node-a-1", &pp, &approval("Approved"))
            .await,
    );
    forbidden(
        "sign its own certificate request",
        csrs.patch_status(
            "ferry-node-a-1",
            &pp,
            &Patch::Merge(json!({"status": {"certificate":
                k8s_openapi::ByteString(certificate_pem().into_bytes())}})),
        )
        .await,
    );
    forbidden(
        "list other nodes' certificate requests",
        csrs.list(&ListParams::default()).await,
    );
    forbidden(
        "read the migration CA's key",
        Api::<Secret>::namespaced(agent.clone(), NS)
            .get("ferry-ca")
            .await,
    );
    forbidden(
        "read other ConfigMaps",
        Api::<ConfigMap>::namespaced(agent.clone(), NS)
            .get("kube-root-ca.crt")
            .await,
    );
    let agent_secrets = Api::<Secret>::namespaced(agent.clone(), NS);
    forbidden(
        "replace the state key",
        agent_secrets
            .patch(
                "ferry-state-key",
                &pp,
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
    );
    forbidden(
        "delete the state key",
        agent_secrets
            .delete("ferry-state-key", &DeleteParams::default())
            .await,
    );
    forbidden(
        "change a migration's spec",
        vmms.patch(
            "demo-to-node-b",
            &pp,
            &Patch::Merge(json!({"spec": {"targetNode": "node-c"}})),
        )
        .await,
    );
    forbidden(
        "create a migration",
        vmms.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"vmName": "demo"}}))
                .unwrap(),
        )
        .await,
    );
    forbidden(
        "delete a migration",
        vmms.delete("demo-to-node-b", &DeleteParams::default())
            .await,
    );
    forbidden(
        "change a VM's spec (RBAC lets it patch a VM for its finalizer; the policy refuses the rest)",
        vms.patch(
            "demo",
            &pp,
            &Patch::Merge(json!({"spec": {"running": false}})),
        )
        .await,
    );
    forbidden(
        "delete a VM",
        vms.delete("demo", &DeleteParams::default()).await,
    );
    forbidden(
        "read Secrets in its own namespace",
        Api::<Secret>::namespaced(agent.clone(), NS).get("s").await,
    );
    forbidden(
        "read Secrets elsewhere",
        Api::<Secret>::namespaced(agent.clone(), VMS)
            .list(&ListParams::default())
            .await,
    );
    forbidden(
        "write Leases outside its namespace",
        Api::<Lease>::namespaced(agent.clone(), VMS)
            .create(&PostParams::default(), &lease("x"))
            .await,
    );
    forbidden(
        "list Pods",
        Api::<Pod>::all(agent.clone())
            .list(&ListParams::default())
            .await,
    );
}

#[tokio::test]
async fn operator_drives_migrations_and_cannot_touch_vms_or_secrets() {
    let c = cluster().await;
    let op = client_as(&c, "ferry-operator").await;
    let vms: Api<VirtualMachine> = Api::namespaced(op.clone(), VMS);
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(op.clone(), VMS);
    let pp = PatchParams::default();

    allowed(
        "list migrations in all namespaces",
        Api::<VirtualMachineMigration>::all(op.clone())
            .list(&ListParams::default())
            .await,
    );
    allowed(
        "label a migration and add its finalizer",
        vmms.patch(
            "demo-to-node-b",
            &pp,
            &Patch::Merge(json!({"metadata": {
            "labels": {"ferry.dev/source-node": "node-a", "ferry.dev/target-node": "node-b"},
            "finalizers": ["ferry.dev/rollback"]}})),
        )
        .await,
    );
    allowed(
        "set a migration's phase",
        vmms.patch_status(
            "demo-to-node-b",
            &pp,
            &Patch::Merge(json!({"status": {"phase": "Begin"}})),
        )
        .await,
    );
    allowed("read the VM", vms.get("demo").await);
    allowed(
        "watch-list Nodes (cordoned ones are evacuated and get no guests)",
        Api::<Node>::all(op.clone())
            .list(&ListParams::default())
            .await,
    );
    allowed(
        "create an evacuation migration",
        vmms.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "evacuate-demo-node-a-1",
                             "labels": {"ferry.dev/evacuation": "node-a"}},
                "spec": {"vmName": "demo", "transport": {"tls": false}}
            }))
            .unwrap(),
        )
        .await,
    );
    allowed(
        "cancel a migration",
        vmms.patch(
            "evacuate-demo-node-a-1",
            &pp,
            &Patch::Merge(json!({"spec": {"cancel": true}})),
        )
        .await,
    );
    allowed(
        "record an Event on a Node (in default)",
        Api::<Event>::namespaced(op.clone(), "default")
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "node-event"},
                    "eventTime": "2026-01-01T00:00:00.000000Z",
                    "reportingController": "ferry.dev/operator",
                    "reportingInstance": "test",
                    "action": "Evacuate",
                    "reason": "EvacuationStarted",
                    "type": "Normal",
                    "note": "rbac test",
                    "regarding": {"apiVersion": "v1", "kind": "Node", "name": "node-a"}
                }))
                .unwrap(),
            )
            .await,
    );
    allowed(
        "mark the VM as held",
        vms.patch_status(
            "demo",
            &pp,
            &Patch::Merge(json!({"status": {"migration": "demo-to-node-b"}})),
        )
        .await,
    );
    let leases: Api<Lease> = Api::namespaced(op.clone(), NS);
    allowed(
        "take the leader Lease",
        leases
            .create(&PostParams::default(), &lease("ferry-operator-leader"))
            .await,
    );
    allowed(
        "read agent heartbeats",
        leases.list(&ListParams::default()).await,
    );
    allowed(
        "record an Event",
        Api::<Event>::namespaced(op.clone(), VMS)
            .create(
                &PostParams::default(),
                &event("operator-event", "ferry.dev/operator"),
            )
            .await,
    );

    // The migration CA and the node certificates.
    let secrets: Api<Secret> = Api::namespaced(op.clone(), NS);
    allowed(
        "create the CA Secret",
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": "ferry-ca"}, "stringData": {"tls.key": "k"}}),
                )
                .unwrap(),
            )
            .await,
    );
    allowed("read the CA Secret", secrets.get("ferry-ca").await);
    allowed(
        "create the state key",
        secrets
            .create(
                &PostParams::default(),
                &ferry_operator::state_key::secret([7; 32]),
            )
            .await,
    );
    forbidden(
        "read the state key (only the agents need it)",
        secrets.get("ferry-state-key").await,
    );
    let maps: Api<ConfigMap> = Api::namespaced(op.clone(), NS);
    allowed(
        "publish the CA certificate",
        maps.create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "ferry-ca"}, "data": {"ca.crt": "x"}}),
            )
            .unwrap(),
        )
        .await,
    );
    allowed(
        "update the CA certificate",
        maps.patch(
            "ferry-ca",
            &pp,
            &Patch::Merge(json!({"data": {"ca.crt": "y"}})),
        )
        .await,
    );
    let admin_csrs: Api<CertificateSigningRequest> = Api::all(c.admin.clone());
    for (name, signer) in [
        ("ferry-node-a-1", "ferry.dev/migration"),
        ("other-signer", "example.com/other"),
    ] {
        admin_csrs
            .create(&PostParams::default(), &csr(name, signer, "node-a"))
            .await
            .unwrap();
    }
    let csrs: Api<CertificateSigningRequest> = Api::all(op.clone());
    allowed(
        "watch-list certificate requests",
        csrs.list(&ListParams::default()).await,
    );
    allowed(
        "approve a request for Ferry's signer",
        csrs.patch_approval("ferry-node-a-1", &pp, &approval("Approved"))
            .await,
    );
    allowed(
        "sign a request for Ferry's signer",
        csrs.patch_status(
            "ferry-node-a-1",
            &pp,
            &Patch::Merge(json!({"status": {"certificate":
                k8s_openapi::ByteString(certificate_pem().into_bytes())}})),
        )
        .await,
    );
    forbidden(
        "approve a request for another signer",
        csrs.patch_approval("other-signer", &pp, &approval("Approved"))
            .await,
    );
    forbidden("read other ConfigMaps", maps.get("kube-root-ca.crt").await);
    forbidden(
        "change other ConfigMaps",
        maps.patch(
            "kube-root-ca.crt",
            &pp,
            &Patch::Merge(json!({"data": {"x": "y"}})),
        )
        .await,
    );

    forbidden(
        "change a VM's spec",
        vms.patch(
            "demo",
            &pp,
            &Patch::Merge(json!({"spec": {"nodeName": "node-b"}})),
        )
        .await,
    );
    forbidden(
        "delete a VM",
        vms.delete("demo", &DeleteParams::default()).await,
    );
    forbidden(
        "read Secrets",
        Api::<Secret>::namespaced(op.clone(), NS).get("s").await,
    );
    // Last: the history limit deletes finished migrations beyond the newest N per VM.
    allowed(
        "delete a migration",
        vmms.delete("demo-to-node-b", &DeleteParams::default())
            .await,
    );
    forbidden(
        "cordon a node (that is the user's act)",
        Api::<Node>::all(op.clone())
            .patch(
                "node-a",
                &pp,
                &Patch::Merge(json!({"spec": {"unschedulable": true}})),
            )
            .await,
    );
    forbidden(
        "list Pods",
        Api::<Pod>::all(op.clone())
            .list(&ListParams::default())
            .await,
    );
    // The guests' reservations: Pods in Ferry's namespace only.
    allowed(
        "list the reservation Pods in its namespace",
        Api::<Pod>::namespaced(op.clone(), NS)
            .list(&ListParams::default())
            .await,
    );
    let reservation: Pod = serde_json::from_value(json!({
        "metadata": {"name": "ferry-guest-x"},
        "spec": {"containers": [{"name": "reservation", "image": "registry.k8s.io/pause:3.10"}]},
    }))
    .unwrap();
    forbidden(
        "create Pods outside its namespace",
        Api::<Pod>::namespaced(op.clone(), VMS)
            .create(&PostParams::default(), &reservation)
            .await,
    );
    forbidden(
        "write Leases outside its namespace",
        Api::<Lease>::namespaced(op.clone(), VMS)
            .create(&PostParams::default(), &lease("x"))
            .await,
    );
}

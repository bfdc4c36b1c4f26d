//! Checking the chart's admission policy from the agents' side: a control plane with
//! the chart, clients of the agent ServiceAccount bound to a node, and assertions that
//! a write is allowed or refused by a named rule.

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::ControlPlane;
use crate::identity::{ensure_node, node_bound_token};

/// Ferry's namespace in these tests.
pub const NS: &str = "ferry-system";
/// The namespace of the example VM and migration.
pub const VMS: &str = "vms";
/// The chart's agent ServiceAccount.
pub const AGENT: &str = "ferry-agent";
/// The example's migration (examples/migration.yaml), which [`env`] creates.
pub const MIGRATION: &str = "demo-to-node-b";

/// A control plane with the chart, the example VM and migration, and three Nodes.
pub struct Env {
    pub cp: ControlPlane,
    pub admin: Client,
}

/// The chart, the example VM and migration, and Nodes node-a, node-b, node-c.
pub async fn env() -> Env {
    let cp = ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("control plane: {e}"));
    cp.chart_with_examples(NS, VMS)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let admin = cp.admin_client().await.unwrap();
    for node in ["node-a", "node-b", "node-c"] {
        ensure_node(&admin, node).await.unwrap();
    }
    Env { cp, admin }
}

/// Admits migration `name` as the operator would: Begin, node-a to node-b.
pub async fn admit(env: &Env, name: &str) {
    Api::<ferry_crds::VirtualMachineMigration>::namespaced(env.admin.clone(), VMS)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Begin", "sourceNode": "node-a", "targetNode": "node-b",
            }})),
        )
        .await
        .unwrap();
}

/// A client of the agent ServiceAccount whose token is bound to `node`.
pub async fn agent_on(env: &Env, node: &str) -> Client {
    let token = node_bound_token(&env.admin, NS, AGENT, node, 3600)
        .await
        .unwrap();
    let path = env.cp.dir().join(format!("agent-{node}.kubeconfig"));
    env.cp
        .client_for_token(&format!("agent-{node}"), &token, &path)
        .await
        .unwrap()
}

/// A token of the agent ServiceAccount from a TokenRequest with `spec`.
pub async fn agent_token(env: &Env, spec: Value) -> String {
    let req: TokenRequest = serde_json::from_value(json!({ "spec": spec })).unwrap();
    Api::<ServiceAccount>::namespaced(env.admin.clone(), NS)
        .create_token_request(AGENT, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .unwrap()
}

/// A client of the agent ServiceAccount with a plain token (bound to nothing).
pub async fn agent_unbound(env: &Env) -> Client {
    let token = agent_token(
        env,
        json!({"audiences": ["https://kubernetes.default.svc.cluster.local"]}),
    )
    .await;
    let path = env.cp.dir().join("agent-unbound.kubeconfig");
    env.cp
        .client_for_token("agent-unbound", &token, &path)
        .await
        .unwrap()
}

#[track_caller]
pub fn allowed<T>(what: &str, result: kube::Result<T>) {
    if let Err(e) = result {
        panic!("{what} should be allowed, got: {e}");
    }
}

/// Refused with 403 by the admission policy, naming `rule`.
#[track_caller]
pub fn denied<T: std::fmt::Debug>(what: &str, rule: &str, result: kube::Result<T>) {
    match result {
        Err(kube::Error::Api(status))
            if status.code == 403
                && status.message.contains("ValidatingAdmissionPolicy")
                && status.message.contains(&format!("rule {rule}:")) =>
        {
            println!("{what}: refused: {}", status.message);
        }
        other => panic!("{what} should be refused by rule {rule}, got: {other:?}"),
    }
}

pub fn step(node: &str) -> Value {
    json!({"node": node, "start": "2026-01-01T00:00:00.000000Z"})
}

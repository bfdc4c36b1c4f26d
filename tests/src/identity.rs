//! Node identity for simulated agents: Node objects (the apiserver takes them without a
//! kubelet) and ServiceAccount tokens bound to them, which carry the node's name in the
//! user extra `authentication.kubernetes.io/node-name` — what the chart's admission
//! policy (charts/ferry/templates/admission-policy.yaml) checks an agent's writes against.
//! On a real cluster the agent Pod's projected token carries its node the same way.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, UserInfo};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::HarnessError;

/// The user extra key the apiserver fills from a node- or pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Creates the Node `name` (no kubelet behind it) unless it exists; returns its uid.
pub async fn ensure_node(admin: &Client, name: &str) -> Result<String, HarnessError> {
    let nodes: Api<Node> = Api::all(admin.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}
    }))
    .expect("a valid Node");
    let node = match nodes.create(&PostParams::default(), &node).await {
        Ok(node) => node,
        Err(kube::Error::Api(e)) if e.code == 409 => nodes
            .get(name)
            .await
            .map_err(|e| HarnessError::Setup(format!("reading Node {name}: {e}")))?,
        Err(e) => return Err(HarnessError::Setup(format!("creating Node {name}: {e}"))),
    };
    node.uid()
        .ok_or_else(|| HarnessError::Setup(format!("Node {name} has no uid")))
}

/// A token of ServiceAccount `namespace/sa` bound to the Node `node` (created if missing):
/// valid for `expiration_seconds` or until the Node is deleted, and naming the node in
/// the user extra [`NODE_NAME_EXTRA`].
pub async fn node_bound_token(
    admin: &Client,
    namespace: &str,
    sa: &str,
    node: &str,
    expiration_seconds: i64,
) -> Result<String, HarnessError> {
    let uid = ensure_node(admin, node).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let req: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
            "expirationSeconds": expiration_seconds,
            "boundObjectRef": {"kind": "Node", "apiVersion": "v1", "name": node, "uid": uid}
        }
    }))
    .expect("a valid TokenRequest");
    sas.create_token_request(sa, &PostParams::default(), &req)
        .await
        .map_err(|e| HarnessError::Setup(format!("TokenRequest for {sa} bound to {node}: {e}")))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| HarnessError::Setup(format!("TokenRequest for {sa} returned no token")))
}

/// Who the apiserver says `client` is (a SelfSubjectReview, which every authenticated
/// user may create).
pub async fn whoami(client: &Client) -> Result<UserInfo, HarnessError> {
    let reviews: Api<SelfSubjectReview> = Api::all(client.clone());
    let review: SelfSubjectReview =
        serde_json::from_value(json!({"metadata": {}})).expect("a valid SelfSubjectReview");
    reviews
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| HarnessError::Setup(format!("SelfSubjectReview: {e}")))?
        .status
        .and_then(|s| s.user_info)
        .ok_or_else(|| HarnessError::Setup("SelfSubjectReview returned no user".into()))
}

/// The node a user's token names, if any.
pub fn node_of(user: &UserInfo) -> Option<&str> {
    user.extra
        .as_ref()
        .and_then(|extra: &BTreeMap<String, Vec<String>>| extra.get(NODE_NAME_EXTRA))
        .and_then(|v| v.first())
        .map(String::as_str)
}

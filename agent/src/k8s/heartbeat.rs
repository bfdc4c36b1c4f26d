//! The node heartbeat: a Lease `ferry-node-<node>` in Ferry's namespace, renewed every
//! few seconds. The operator counts a node as a migration target only while it is fresh.

use std::time::Duration;

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tracing::warn;

/// The label the operator finds heartbeat Leases by; its value is the node name.
pub const NODE_LABEL: &str = "ferry.dev/node";

/// What the heartbeat Lease tells about this agent, as annotations.
#[derive(Debug, Clone)]
pub struct Published {
    /// Where the peer API listens.
    pub peer_endpoint: String,
    /// The node's QEMU: its version and migration capabilities.
    pub qemu: ferry_agent::qemu::QemuFeatures,
}

impl Published {
    fn annotations(&self) -> BTreeMap<String, String> {
        use ferry_crds::sequence::{
            MIGRATION_CAPABILITIES_ANNOTATION, PEER_ENDPOINT_ANNOTATION, QEMU_VERSION_ANNOTATION,
        };
        BTreeMap::from([
            (
                PEER_ENDPOINT_ANNOTATION.to_string(),
                self.peer_endpoint.clone(),
            ),
            (
                QEMU_VERSION_ANNOTATION.to_string(),
                self.qemu.version.clone(),
            ),
            (
                MIGRATION_CAPABILITIES_ANNOTATION.to_string(),
                self.qemu.capabilities_line(),
            ),
        ])
    }
}

/// Renews the heartbeat forever, publishing `published`; `ready` turns true after the
/// first renewal.
pub async fn run(
    client: kube::Client,
    namespace: String,
    node: String,
    every: Duration,
    lasts: Duration,
    published: Published,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let name = ferry_crds::node_lease_name(&node);
    let params = PatchParams::apply(&format!("ferry-agent-{node}")).force();
    let attempt = (lasts / 2).max(every);
    loop {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(NODE_LABEL.to_string(), node.clone())])),
                annotations: Some(published.annotations()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.clone()),
                lease_duration_seconds: Some(lasts.as_secs() as i32),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        // A renewal that hangs (a stalled connection) must not hold up the next one until
        // the Lease has run out: past half its validity it is dropped and the loop tries
        // again at once, with a fresh renewTime.
        let patch = Patch::Apply(&lease);
        let renewal = leases.patch(&name, &params, &patch);
        match tokio::time::timeout(attempt, renewal).await {
            Ok(Ok(_)) => ready.store(true, std::sync::atomic::Ordering::Relaxed),
            Ok(Err(e)) => warn!(%node, error = %e, "could not renew the heartbeat Lease"),
            Err(_) => {
                warn!(%node, after = ?attempt, "renewing the heartbeat Lease timed out; trying again");
                continue;
            }
        }
        tokio::time::sleep(every).await;
    }
}

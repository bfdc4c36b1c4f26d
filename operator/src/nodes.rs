//! Which nodes have a live agent: each agent renews a Lease `ferry-node-<node>` in
//! Ferry's namespace, labelled `ferry.dev/node`.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::Store;

/// The label every heartbeat Lease carries; its value is the node name.
pub const NODE_LABEL: &str = "ferry.dev/node";

/// The node a heartbeat Lease belongs to, if it is still being renewed at `now`.
pub fn live_node(lease: &Lease, now: Timestamp) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds?));
    let node = lease.metadata.labels.as_ref()?.get(NODE_LABEL)?.clone();
    (renewed + duration > now).then_some(node)
}

/// The nodes whose agent is live at `now`, sorted, from the cached heartbeat Leases.
pub fn live_nodes(leases: &Store<Lease>, now: Timestamp) -> Vec<String> {
    let mut nodes: Vec<String> = leases
        .state()
        .iter()
        .filter_map(|l| live_node(l, now))
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewed: i64, duration: i32) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ferry-node-a", "labels": {NODE_LABEL: "node-a"}},
            "spec": {
                "holderIdentity": "node-a",
                "leaseDurationSeconds": duration,
                "renewTime": Timestamp::from_second(renewed).unwrap().to_string(),
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_lease_is_live_until_its_duration_runs_out() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(live_node(&lease(995, 10), now).as_deref(), Some("node-a"));
        assert_eq!(live_node(&lease(989, 10), now), None);
        let mut unlabelled = lease(999, 10);
        unlabelled.metadata.labels = None;
        assert_eq!(live_node(&unlabelled, now), None);
    }
}

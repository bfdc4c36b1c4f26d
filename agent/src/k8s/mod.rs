//! The Kubernetes side of the agent binary: the node heartbeat, the VM lifecycle on this
//! node, and the migration phases asked of it through the migrations' status
//! (docs/protocol.md). The data plane it drives is the `ferry_agent` library.

pub mod executor;
pub mod heartbeat;
pub mod locks;
pub mod metrics;
pub mod ownership;
pub mod runner;
pub mod vms;

use std::collections::HashMap;
use std::net::{IpAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;

use ferry_agent::supervisor::Supervisor;
use ferry_crds::MigrationPhase;
use tokio_util::sync::CancellationToken;

/// What the agent's tasks share.
pub struct Agent {
    pub client: kube::Client,
    /// Ferry's namespace: heartbeat and disk lock Leases.
    pub namespace: String,
    pub node: String,
    pub address: IpAddr,
    pub ports: RangeInclusive<u16>,
    pub sup: Supervisor,
    pub metrics: metrics::Metrics,
    /// Phases running now, by migration uid; Perform's token cancels the transfer.
    pub tasks: Mutex<HashMap<(String, MigrationPhase), CancellationToken>>,
}

impl Agent {
    /// A port of the migration range that is free on this node's address now.
    pub fn free_port(&self) -> Option<u16> {
        self.ports
            .clone()
            .find(|p| TcpListener::bind((self.address, *p)).is_ok())
    }
}

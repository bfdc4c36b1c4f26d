//! The Kubernetes side of the agent binary: the node heartbeat, the VM lifecycle on this
//! node, its migration certificate (CSR), the cluster's state key, and the migration
//! phases asked of it through the migrations' status
//! (docs/protocol.md). The data plane it drives is the `ferry_agent` library.

pub mod certs;
pub mod dispatch;
pub mod heartbeat;
pub mod locks;
pub mod metrics;
pub mod ownership;
pub mod peer;
pub mod phase;
pub mod recovery;
pub mod runner;
pub mod state_key;
pub mod status;
pub mod tasks;
pub mod vms;

use std::collections::HashSet;
use std::net::{IpAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;

use ferry_agent::supervisor::Supervisor;

/// What the agent's tasks share.
pub struct Agent {
    /// For requests: each answer bounded by the request timeout (ferry_runtime::api).
    pub client: kube::Client,
    /// For the watches, which may sit idle for minutes.
    pub watches: kube::Client,
    /// Ferry's namespace: heartbeat and disk lock Leases.
    pub namespace: String,
    pub node: String,
    pub address: IpAddr,
    pub ports: RangeInclusive<u16>,
    /// Where this agent serves the peer API (`host:port`): published on its heartbeat
    /// Lease, and the endpoint of a tunnelled migration URI.
    pub peer_endpoint: String,
    pub sup: Supervisor,
    pub metrics: metrics::Metrics,
    /// The work running now, by migration uid: phases, drivers, target watchers.
    pub tasks: tasks::Tasks,
    /// Migration ports handed to a Prepare whose QEMU may not listen on them yet.
    pub reserved_ports: Mutex<HashSet<u16>>,
    /// This node's migration certificate (TLS), kept current by [`certs::run`].
    pub certs: certs::Store,
    /// The cluster's state key, which signs and checks state files, kept by
    /// [`state_key::run`].
    pub state_key: state_key::KeyStore,
}

/// A migration port reserved for one Prepare; released when dropped, by which time the
/// incoming QEMU listens on it (or Prepare failed).
pub struct PortReservation<'a> {
    agent: &'a Agent,
    pub port: u16,
}

impl Drop for PortReservation<'_> {
    fn drop(&mut self) {
        self.agent
            .reserved_ports
            .lock()
            .expect("the port table is never poisoned")
            .remove(&self.port);
    }
}

impl Agent {
    /// A port of the migration range that is free on this node's address now and not
    /// promised to another Prepare running at the same time.
    pub fn reserve_port(&self) -> Option<PortReservation<'_>> {
        let mut reserved = self
            .reserved_ports
            .lock()
            .expect("the port table is never poisoned");
        let port = self
            .ports
            .clone()
            .filter(|p| !reserved.contains(p))
            .find(|p| TcpListener::bind((self.address, *p)).is_ok())?;
        reserved.insert(port);
        Some(PortReservation { agent: self, port })
    }
}

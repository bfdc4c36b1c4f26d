//! Peer-to-peer migrations (`spec.mode: PeerToPeer`, libvirt's peer-to-peer sequence).
//!
//! The source agent drives the five phases itself ([`driver`]): Begin, Perform and
//! Confirm run here, Prepare and Finish on the target agent, which it calls over the
//! agents' own API ([`client`] → [`server`]): HTTPS with mutual TLS, both ends showing
//! the node certificate the cluster's migration CA issued (docs/protocol.md, "Node
//! certificates"). The cookies go from one agent to the other in the request and the
//! answer; the source records every step and cookie in the migration's status, so the
//! status tells the same story as a managed migration's.

pub mod client;
pub mod console;
pub mod driver;
pub mod server;
pub mod tunnel;
pub mod wire;

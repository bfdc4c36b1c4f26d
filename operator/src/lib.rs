//! Ferry's operator: validates `VirtualMachineMigration`s, drives them through the five
//! phases by setting `status.phase`, times out phases whose agent is gone, rolls back on
//! failure and cancellation, and reports conditions, Events and metrics.
//!
//! - [`admission`]: may a Pending migration start, and where does it go (pure).
//! - [`transitions`]: what comes after each phase (pure).
//! - [`reconcile`]: the I/O around them.
//! - [`nodes`]: which agents are live (heartbeat Leases).
//! - [`evacuate`] (pure) and [`evacuator`] (I/O): migrations off cordoned nodes.
//! - [`history`]: which finished migrations go beyond the history limit (pure).
//! - [`signer`] (pure) and [`certs`] (I/O): the cluster CA and the node certificates
//!   for TLS on the migration stream, through CertificateSigningRequests.
//! - [`state_key`]: the cluster's state key, which signs saved-state files.
//! - [`reservation`] (pure) and [`reservations`] (I/O): placeholder Pods that show the
//!   scheduler each guest's memory and CPU; a target without room refuses a migration.
//! - [`console`]: consoles through the apiserver (an aggregated API), authorised by it.

pub mod admission;
pub mod certs;
pub mod config;
pub mod console;
pub mod error;
pub mod evacuate;
pub mod evacuator;
pub mod events;
pub mod history;
pub mod metrics;
pub mod nodes;
pub mod policy;
pub mod reconcile;
pub mod reservation;
pub mod reservations;
pub mod signer;
pub mod state_key;
pub mod transitions;

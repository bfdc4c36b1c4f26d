//! Ferry's test environment.
//!
//! [`ControlPlane`] runs a real etcd and kube-apiserver (built by `make tools` from the
//! Go module proxy) on free loopback ports in a temporary directory, with RBAC
//! authorization, ServiceAccount token signing and an admin token, and tears them down
//! when dropped — also when a test panics, and (through `PR_SET_PDEATHSIG`) when the
//! test process dies.

pub mod api_proxy;
pub mod bench;
pub mod chaos;
pub mod cluster;
mod commands;
pub mod console_route;
mod control_plane;
pub mod e2e_support;
pub mod fault_matrix;
pub mod fault_run;
pub mod identity;
pub mod inject;
pub mod leaks;
pub mod peer_client;
mod pki;
pub mod policy_check;
pub mod ports;
mod process;
pub mod real;
pub mod relay;
mod tools;

pub use cluster::Cluster;
pub use commands::printed;
pub use control_plane::{ControlPlane, HarnessError};
pub use process::ChildGuard;
pub use tools::{repo_root, tool};

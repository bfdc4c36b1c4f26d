//! `ferry-agent`: the node agent. Runs this node's guests and the migration phases the
//! operator asks of this node. See the `k8s` module and docs/protocol.md.

mod k8s;

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use ferry_agent::cgroup::GuestCgroups;
use ferry_agent::node::Node;
use ferry_agent::storage::{RootsError, StorageRoot, StorageRoots};
use ferry_agent::supervisor::Supervisor;
use tracing::{error, info, warn};

/// Ferry's node agent.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Ferry's namespace: the heartbeat and disk lock Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferry-system")]
    namespace: String,
    /// Where guests' state lives; QEMU processes outlive the agent and are found here.
    #[arg(long, default_value = "/var/lib/ferry")]
    state_dir: PathBuf,
    /// The address incoming migration streams are accepted on (the node's IP).
    #[arg(long, env = "HOST_IP")]
    migration_address: IpAddr,
    /// TCP ports incoming migration streams may use, FIRST-LAST.
    #[arg(long, default_value = "49152-49215", value_parser = parse_ports)]
    migration_ports: RangeInclusive<u16>,
    /// TCP port of the agents' peer API (peer-to-peer migrations; mutual TLS), on the
    /// migration address. 0 picks a free one. The endpoint is published on the node's
    /// heartbeat Lease.
    #[arg(long, default_value_t = 9444)]
    peer_port: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8081")]
    metrics_addr: SocketAddr,
    /// Seconds between heartbeat renewals.
    #[arg(long, default_value_t = 2)]
    heartbeat_seconds: u64,
    /// Seconds a heartbeat stays valid; after that the operator treats the node as lost.
    #[arg(long, default_value_t = 10)]
    lease_seconds: u64,
    /// Seconds an API request (not a watch) may wait for its answer before it counts as
    /// failed and is retried.
    #[arg(long, default_value_t = ferry_runtime::api::REQUEST_TIMEOUT.as_secs())]
    api_timeout_seconds: u64,
    /// A directory host paths in specs may name, and how: `<dir>=readWrite` (a
    /// namespace's guests use `<dir>/<namespace>/` only) or `<dir>=readOnly` (shared by
    /// every namespace, e.g. base images). Repeatable; the roots may not overlap. None
    /// given: no guest may name a host path.
    #[arg(long = "storage-root", value_name = "DIR=ACCESS")]
    storage_roots: Vec<StorageRoot>,
    /// The host's cgroup file system as the agent sees it (the chart mounts the host's
    /// /sys/fs/cgroup at /host/sys/fs/cgroup).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// The cgroup, relative to --cgroup-root (in each hierarchy), under which each
    /// guest's QEMU gets a cgroup of its own, e.g. ferry.slice. Empty: QEMU stays in
    /// the agent's cgroup, and so dies with the agent's container.
    #[arg(long, default_value = "")]
    guest_cgroup_parent: String,
    /// MiB a guest's QEMU may use beyond the guest's RAM (its cgroup's memory limit is
    /// the sum).
    #[arg(long, default_value_t = ferry_agent::cgroup::DEFAULT_OVERHEAD_MIB)]
    guest_memory_overhead_mib: u64,
}

fn parse_ports(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (first, last) = s
        .split_once('-')
        .ok_or("expected FIRST-LAST, e.g. 49152-49215")?;
    let first: u16 = first.parse().map_err(|e| format!("first port: {e}"))?;
    let last: u16 = last.parse().map_err(|e| format!("last port: {e}"))?;
    if first > last {
        return Err(format!("the range {first}-{last} is empty"));
    }
    Ok(first..=last)
}

/// The node's storage roots (none at all when none were given).
fn storage_roots(roots: Vec<StorageRoot>) -> Result<StorageRoots, RootsError> {
    StorageRoots::new(roots)
}

#[tokio::main]
async fn main() {
    ferry_runtime::init_tracing("info");
    let args = Args::parse();
    if let Err(e) = run(args).await {
        error!("{e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let storage = storage_roots(args.storage_roots)?;
    let node = Node::open(&args.state_dir, &args.node_name, args.migration_address)
        .map_err(|e| format!("state dir {}: {e}", args.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&node.state_dir)
        .map_err(|e| format!("state dir {}: {e}", node.state_dir.display()))?;
    storage.check_apart_from(&state_dir)?;
    if storage.is_empty() {
        warn!(
            "no --storage-root: no guest on this node may name a host path (disks, saves, restores)"
        );
    } else {
        info!(roots = %storage, "storage roots");
    }
    let mut node = node.with_storage(storage);
    if args.guest_cgroup_parent.is_empty() {
        warn!(
            "no --guest-cgroup-parent: guests run in the agent's own cgroup and die with its container"
        );
    } else {
        let cgroups = GuestCgroups::new(
            &args.cgroup_root,
            &args.guest_cgroup_parent,
            args.guest_memory_overhead_mib,
        )?;
        info!(root = %args.cgroup_root.display(), parent = %args.guest_cgroup_parent, layout = ?cgroups.layout(), "guests run in cgroups of their own");
        node = node.with_cgroups(cgroups);
    }
    let qemu = ferry_agent::qemu::probe("qemu-system-x86_64", &node.state_dir)
        .await
        .map_err(|e| format!("probing this node's QEMU: {e}"))?;
    if qemu.is_supported() {
        info!(version = %qemu.version, package = %qemu.package, capabilities = %qemu.capabilities_line(), "QEMU");
    } else {
        let (major, minor) = ferry_agent::qemu::SUPPORTED;
        warn!(version = %qemu.version, package = %qemu.package, capabilities = %qemu.capabilities_line(),
            "QEMU {} is older than {major}.{minor}, the release Ferry supports; policies are checked against its capabilities", qemu.version);
    }
    let node = node.with_qemu(qemu.clone());
    let sup = Supervisor::new(node);
    let guests = sup.attach_all().await?;
    info!(node = %args.node_name, guests = guests.len(), "re-attached to the guests already running here");
    let clients =
        ferry_runtime::api::ApiClients::infer(Duration::from_secs(args.api_timeout_seconds))
            .await?;
    let client = clients.requests.clone();
    // The metrics port first: a peer port left to the system (`--peer-port 0`) can then
    // never be the one the metrics address names.
    let metrics = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("metrics server on {}: {e}", args.metrics_addr))?;
    let peer = tokio::net::TcpListener::bind((args.migration_address, args.peer_port))
        .await
        .map_err(|e| {
            format!(
                "peer API on {}:{}: {e}",
                args.migration_address, args.peer_port
            )
        })?;
    let peer_endpoint = peer.local_addr()?.to_string();
    info!(endpoint = %peer_endpoint, "peer API listening");
    let agent = Arc::new(k8s::Agent {
        client: client.clone(),
        watches: clients.watches,
        namespace: args.namespace.clone(),
        node: args.node_name.clone(),
        address: args.migration_address,
        ports: args.migration_ports.clone(),
        peer_endpoint: peer_endpoint.clone(),
        sup,
        metrics: k8s::metrics::Metrics::default(),
        tasks: Default::default(),
        reserved_ports: Default::default(),
        certs: Default::default(),
        state_key: Default::default(),
    });
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(k8s::heartbeat::run(
        client,
        args.namespace.clone(),
        args.node_name.clone(),
        Duration::from_secs(args.heartbeat_seconds.max(1)),
        Duration::from_secs(args.lease_seconds.max(2)),
        k8s::heartbeat::Published {
            peer_endpoint,
            qemu,
        },
        ready.clone(),
    ));
    let peer = tokio::spawn(k8s::peer::server::serve(agent.clone(), peer));
    let encode: ferry_runtime::Encode = {
        let agent = agent.clone();
        Arc::new(move || agent.metrics.encode())
    };
    let http = tokio::spawn(ferry_runtime::serve_on(metrics, encode, ready));
    tokio::spawn(k8s::vms::sweep(agent.clone()));
    tokio::spawn(k8s::certs::run(agent.clone()));
    tokio::spawn(k8s::state_key::run(agent.clone()));
    let vms = tokio::spawn(k8s::vms::run(agent.clone()));
    let dispatcher = tokio::spawn(k8s::dispatch::run(agent.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; guests keep running"),
        _ = term.recv() => info!("terminated; guests keep running"),
        r = http => return Err(format!("metrics server on {}: {r:?}", args.metrics_addr).into()),
        _ = vms => return Err("the VM controller stopped".into()),
        _ = dispatcher => return Err("the migration dispatcher stopped".into()),
        _ = peer => return Err("the peer API stopped".into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = [
            "ferry-agent",
            "--node-name=a",
            "--migration-address=127.0.0.2",
        ];
        Args::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn storage_roots_from_the_command_line() {
        let args = parse(&[]).unwrap();
        assert!(storage_roots(args.storage_roots).unwrap().is_empty());

        let args = parse(&[
            "--storage-root=/srv/images=readOnly",
            "--storage-root",
            "/srv/tenants=readWrite",
        ])
        .unwrap();
        let roots = storage_roots(args.storage_roots).unwrap();
        assert_eq!(
            roots.to_string(),
            "/srv/images=readOnly, /srv/tenants=readWrite"
        );

        let err = parse(&["--storage-root=/srv/images=rw"]).unwrap_err();
        assert!(
            err.to_string().contains("expected readWrite or readOnly"),
            "{err}"
        );
        let args = parse(&[
            "--storage-root=/srv=readOnly",
            "--storage-root=/srv/tenants=readWrite",
        ])
        .unwrap();
        let err = storage_roots(args.storage_roots).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
    }
}

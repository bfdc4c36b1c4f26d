//! What a migration must not leave behind once it ended, for the fault matrices' row
//! checks (fault_run::check_row): Leases other than the nodes' heartbeats, the
//! operator's leader Lease and the disk locks of the node running the guest; migration
//! ports still listening; temporary files in the agents' state dirs.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::coordination::v1::Lease;

use crate::Cluster;
use crate::cluster::MIGRATION_PORTS;

/// The operator's leader-election Lease (operator/src/main.rs).
const LEADER_LEASE: &str = "ferry-operator-leader";
const DISK_PREFIX: &str = "ferry-disk-";
const VM_LABEL: &str = "ferry.dev/vm";

/// The Leases of Ferry's namespace that should not be there, described: anything but a
/// heartbeat of one of `nodes`, the leader Lease, and the disk locks of each of `guests`
/// (the VM's label, `<namespace>.<name>`, and the node running it: its locks must be
/// held there, and there must be none when no node runs it).
pub fn leases(nodes: &[&str], all: &[Lease], guests: &[(String, Option<&str>)]) -> Vec<String> {
    let heartbeats: BTreeSet<String> = nodes
        .iter()
        .map(|n| ferry_crds::node_lease_name(n))
        .collect();
    let mut leaked = Vec::new();
    for lease in all {
        let name = lease.metadata.name.clone().unwrap_or_default();
        if heartbeats.contains(&name) || name == LEADER_LEASE {
            continue;
        }
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        let label = lease
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(VM_LABEL).cloned());
        let whose = guests.iter().find(|(vm_label, _)| {
            name.starts_with(DISK_PREFIX) && label.as_deref() == Some(vm_label.as_str())
        });
        match whose {
            Some((_, Some(node))) if holder.as_deref() == Some(*node) => {}
            Some((_, Some(node))) => leaked.push(format!(
                "{name} held by {holder:?}, the guest runs on {node}"
            )),
            Some((_, None)) => leaked.push(format!("{name} held by {holder:?}, no guest runs")),
            None => leaked.push(format!("{name} (holder {holder:?}, label {label:?})")),
        }
    }
    leaked
}

/// The IPv4 sockets listening in `/proc/net/tcp` text: (address, port, inode).
pub fn listening(proc_net_tcp: &str) -> Vec<(Ipv4Addr, u16, u64)> {
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            if *state != "0A" {
                return None;
            }
            let (ip, port) = local.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some((Ipv4Addr::from(ip.to_le_bytes()), port, inode.parse().ok()?))
        })
        .collect()
}

/// The socket inodes process `pid` has open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            let link = link.to_str()?;
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Which process has socket `inode` open, for a message.
fn owner_of(inode: u64) -> String {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if socket_inodes(pid).contains(&inode) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            return format!("{} (pid {pid})", comm.trim());
        }
    }
    "no process".into()
}

/// Listening sockets on a node's address in the migration port range that are not its
/// agent's own (its metrics and peer API may land in that range): an incoming QEMU or a
/// recovery listener left behind.
pub fn migration_listeners(cluster: &Cluster) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let agents: BTreeSet<u64> = cluster
        .component_pids()
        .into_iter()
        .filter(|(who, _)| who.starts_with("agent "))
        .flat_map(|(_, pid)| socket_inodes(pid))
        .collect();
    let addresses: Vec<(String, Ipv4Addr)> = cluster
        .nodes()
        .filter_map(|n| match n.address {
            std::net::IpAddr::V4(ip) => Some((n.name.clone(), ip)),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    listening(&text)
        .into_iter()
        .filter(|(ip, port, inode)| {
            MIGRATION_PORTS.contains(port)
                && addresses.iter().any(|(_, a)| a == ip)
                && !agents.contains(inode)
        })
        .map(|(ip, port, inode)| {
            let node = addresses
                .iter()
                .find(|(_, a)| *a == ip)
                .map(|(n, _)| n.clone());
            format!(
                "{}:{port} on {} by {}",
                ip,
                node.unwrap_or_default(),
                owner_of(inode)
            )
        })
        .collect()
}

/// Temporary files left behind: under the nodes' state dirs `*.tmp` (the agent's atomic
/// writes) or `.tmp*` (tempfile's); under the cluster's save directories
/// (`<cluster dir>/saves/`) a save's temporary file, `.<name>.<pid>-<n>.partial`, which a
/// save that ended (done, failed or cancelled) never leaves.
pub fn temporary_files(cluster: &Cluster) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for n in cluster.nodes() {
        walk(&n.state_dir, &mut found, &|name| {
            name.ends_with(".tmp") || name.starts_with(".tmp")
        });
    }
    walk(
        &cluster.cp.dir().join("saves"),
        &mut found,
        &is_partial_save,
    );
    found
}

/// A save's temporary file (`ferry_agent::storage::create_save`).
fn is_partial_save(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".partial")
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>, temporary: &dyn Fn(&str) -> bool) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, found, temporary);
        } else if temporary(&name) {
            found.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, holder: &str, vm: Option<&str>) -> Lease {
        let mut labels = serde_json::Map::new();
        if let Some(vm) = vm {
            labels.insert(VM_LABEL.into(), vm.into());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"holderIdentity": holder}
        }))
        .unwrap()
    }

    #[test]
    fn a_saves_temporary_file_is_a_leftover() {
        assert!(is_partial_save(".demo.fsav.4242-0.partial"));
        assert!(!is_partial_save("demo.fsav"));
        assert!(!is_partial_save("demo.partial"));
    }

    #[test]
    fn only_the_guests_disk_locks_heartbeats_and_the_leader_may_stay() {
        let nodes = ["node-a", "node-b"];
        let demo_lock = ferry_agent::storage::image_lock_name("/d/default/demo.img");
        let disk = |holder| lease(&demo_lock, holder, Some("default.demo"));
        let fine = vec![
            lease("ferry-node-node-a", "node-a", None),
            lease("ferry-node-node-b", "node-b", None),
            lease(LEADER_LEASE, "op-1", None),
            disk("node-b"),
        ];
        let demo = |node: Option<&'static str>| vec![("default.demo".to_string(), node)];
        assert!(leases(&nodes, &fine, &demo(Some("node-b"))).is_empty());
        let on_a = leases(&nodes, &fine, &demo(Some("node-a")));
        assert_eq!(on_a.len(), 1, "{on_a:?}");
        assert_eq!(leases(&nodes, &fine, &demo(None)).len(), 1);
        let stray = [
            lease("ferry-node-node-z", "node-z", None),
            lease("other", "x", None),
        ];
        assert_eq!(leases(&nodes, &stray, &demo(None)).len(), 2);
        // Another guest's locks may stay where it runs, and only there.
        let two = [
            disk("node-b"),
            lease(
                &ferry_agent::storage::image_lock_name("/d/default/beta.img"),
                "node-a",
                Some("default.beta"),
            ),
        ];
        let mut both = demo(Some("node-b"));
        both.push(("default.beta".to_string(), Some("node-a")));
        assert!(leases(&nodes, &two, &both).is_empty());
        assert_eq!(leases(&nodes, &two, &demo(Some("node-b"))).len(), 1);
        both[1].1 = Some("node-b");
        assert_eq!(leases(&nodes, &two, &both).len(), 1);
    }

    #[test]
    fn proc_net_tcp_lines_give_the_listeners() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            \x20  0: 0300007F:C000 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
            \x20  1: 0300007F:C001 0200007F:D000 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(
            listening(text),
            vec![(Ipv4Addr::new(127, 0, 0, 3), 49152, 4242)]
        );
    }
}

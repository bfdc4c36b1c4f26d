//! The real nodes' network: a bridge on the host (the apiserver's address is its own),
//! and per node a network namespace with a veth to the bridge, its own address, a
//! default route through the host, and a host route to the node's Pod subnet (so the
//! apiserver reaches Pods, e.g. the console API). Removed when dropped.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::HarnessError;

/// The host's bridge.
pub const BRIDGE: &str = "ferry-real0";
/// The host's address on it: the apiserver listens there.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The Pods' range; node `i` (from 0) has `10.244.<i+1>.0/24`.
pub const POD_CIDR: &str = "10.244.0.0/16";

/// Node `i`'s address on the bridge.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, 0, 11 + i as u8)
}

/// Node `i`'s Pod subnet and its gateway (the node's end of its Pod bridge).
pub fn pod_subnet(i: usize) -> (String, Ipv4Addr) {
    let third = 1 + i as u8;
    (
        format!("10.244.{third}.0/24"),
        Ipv4Addr::new(10, 244, third, 1),
    )
}

/// The network namespace of node `name`.
pub fn netns(name: &str) -> String {
    format!("ferry-{name}")
}

/// The host's end of node `name`'s veth (at most 15 characters).
fn host_veth(name: &str) -> String {
    let mut v = format!("fv-{name}");
    v.truncate(15);
    v
}

/// Runs `ip <args>`, failing with its output.
pub fn ip(args: &[&str]) -> Result<(), HarnessError> {
    run("ip", args)
}

pub fn run(program: &str, args: &[&str]) -> Result<(), HarnessError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| HarnessError::Spawn {
            what: program.into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Setup(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The bridge and the nodes' namespaces, removed on drop.
pub struct Network {
    nodes: Vec<String>,
}

impl Network {
    /// Sets up the bridge and one namespace per node, after removing what an earlier run
    /// that died may have left.
    pub fn up(nodes: &[&str]) -> Result<Network, HarnessError> {
        Self::remove(nodes);
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        let net = Network {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        };
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        for (i, name) in nodes.iter().enumerate() {
            let ns = netns(name);
            let veth = host_veth(name);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", BRIDGE, "up"])?;
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
                all.extend_from_slice(args);
                ip(&all)
            };
            inside(&["addr", "add", &format!("{}/24", node_ip(i)), "dev", "eth0"])?;
            inside(&["link", "set", "eth0", "up"])?;
            inside(&["link", "set", "lo", "up"])?;
            inside(&["route", "add", "default", "via", &HOST_IP.to_string()])?;
            let (subnet, _) = pod_subnet(i);
            ip(&["route", "add", &subnet, "via", &node_ip(i).to_string()])?;
        }
        Ok(net)
    }

    fn remove<S: AsRef<str>>(nodes: &[S]) {
        for name in nodes {
            let _ = ip(&["netns", "del", &netns(name.as_ref())]);
            let _ = ip(&["link", "del", &host_veth(name.as_ref())]);
        }
        let _ = ip(&["link", "del", BRIDGE]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        Self::remove(&self.nodes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_are_per_node() {
        assert_eq!(node_ip(0), Ipv4Addr::new(10, 88, 0, 11));
        assert_eq!(pod_subnet(1).0, "10.244.2.0/24");
        assert_eq!(host_veth("a-very-long-node-name"), "fv-a-very-long-");
        assert_eq!(netns("node-a"), "ferry-node-a");
    }
}

//! The configuration files of a real node (containerd, the kubelet, the CNI network),
//! as text, without I/O. Settings this machine kind needs are explained where they are
//! set (../shared/notes/real-node.md has how they were found).

use std::net::Ipv4Addr;
use std::path::Path;

/// The sandbox image every node's containerd pins (tests/tools/pause-image.sh).
pub const PAUSE_IMAGE: &str = "ferry.test/pause:3.10";

/// Where a node keeps what its containerd, kubelet and CNI plugins write.
#[derive(Debug, Clone)]
pub struct NodePaths<'a> {
    /// The node's directory.
    pub dir: &'a Path,
    /// The CNI plugins' directory.
    pub cni_bin: &'a Path,
}

impl NodePaths<'_> {
    pub fn containerd_socket(&self) -> std::path::PathBuf {
        self.dir.join("containerd/containerd.sock")
    }
}

/// containerd 2.x (`version = 3`): its own root, state and socket; the CRI plugin with
/// the pinned local pause image, CNI from the node's directory, and
/// `restrict_oom_score_adj` (this machine does not grant CAP_SYS_RESOURCE: without it
/// runc fails every sandbox writing `/proc/self/oom_score_adj`).
pub fn containerd(p: &NodePaths<'_>) -> String {
    let d = p.dir.display();
    format!(
        r#"version = 3
root = "{d}/containerd/root"
state = "{d}/containerd/state"

[grpc]
  address = "{sock}"

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{PAUSE_IMAGE}"
  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["{cni}"]
      conf_dir = "{d}/cni/net.d"
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
"#,
        sock = p.containerd_socket().display(),
        cni = p.cni_bin.display(),
    )
}

/// The Pod network of one node: a bridge with its own /24 of the cluster's Pod range,
/// masqueraded when leaving the node (so other nodes need no route back), and portmap.
pub fn cni(p: &NodePaths<'_>, pod_subnet: &str, gateway: Ipv4Addr) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ferry-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": p.dir.join("cni/ipam").display().to_string(),
                    "ranges": [[{"subnet": pod_subnet, "gateway": gateway.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
    .to_string()
}

/// What a kubelet is configured with.
#[derive(Debug, Clone)]
pub struct Kubelet<'a> {
    pub paths: NodePaths<'a>,
    pub node_ip: Ipv4Addr,
    /// `cgroupRoot`: the node's own subtree of every cgroup hierarchy.
    pub cgroup_root: &'a str,
    /// The CA the apiserver's kubelet client certificate is signed by.
    pub client_ca: &'a Path,
}

/// The KubeletConfiguration. `failCgroupV1: false`: this machine has the hybrid cgroup
/// v1 layout, which the kubelet refuses since 1.35 otherwise. cgroupfs (no systemd
/// here), swap allowed, the API only for clients the apiserver authorises (its client
/// certificate, or a token it reviews), a resolv.conf of the node's own (empty: no name
/// lookup leaves the machine), and eviction thresholds low enough for a shared disk.
pub fn kubelet(k: &Kubelet<'_>) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
cgroupsPerQOS: true
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization:
  mode: Webhook
clusterDomain: cluster.local
resolvConf: {dir}/resolv.conf
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 30
"#,
        cgroup_root = k.cgroup_root,
        sock = k.paths.containerd_socket().display(),
        ip = k.node_ip,
        ca = k.client_ca.display(),
        dir = k.paths.dir.display(),
    )
}

/// A kubeconfig with a static token.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: ferry
  cluster: {{server: "{server}", certificate-authority-data: "{ca}"}}
users:
- name: "{user}"
  user: {{token: "{token}"}}
contexts:
- name: ferry
  context: {{cluster: ferry, user: "{user}"}}
current-context: ferry
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> NodePaths<'static> {
        NodePaths {
            dir: Path::new("/tmp/c/nodes/node-a"),
            cni_bin: Path::new("/opt/cni/bin"),
        }
    }

    #[test]
    fn containerd_pins_the_local_pause_image_and_restricts_oom_score_adj() {
        let c = containerd(&paths());
        assert!(c.starts_with("version = 3\n"));
        assert!(c.contains("sandbox = \"ferry.test/pause:3.10\""));
        assert!(c.contains("restrict_oom_score_adj = true"));
        assert!(c.contains("address = \"/tmp/c/nodes/node-a/containerd/containerd.sock\""));
        assert!(c.contains("conf_dir = \"/tmp/c/nodes/node-a/cni/net.d\""));
    }

    #[test]
    fn the_pod_network_is_the_nodes_subnet_masqueraded() {
        let v: serde_json::Value = serde_json::from_str(&cni(
            &paths(),
            "10.244.1.0/24",
            Ipv4Addr::new(10, 244, 1, 1),
        ))
        .unwrap();
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["ipMasq"], true);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(v["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn the_kubelet_accepts_cgroup_v1_and_trusts_only_the_apiservers_ca() {
        let k = kubelet(&Kubelet {
            paths: paths(),
            node_ip: Ipv4Addr::new(10, 88, 0, 11),
            cgroup_root: "/ferry-real/c/node-a",
            client_ca: Path::new("/tmp/c/ca.crt"),
        });
        assert!(k.contains("failCgroupV1: false"));
        assert!(k.contains("cgroupRoot: /ferry-real/c/node-a"));
        assert!(k.contains("anonymous: {enabled: false}"));
        assert!(k.contains("x509: {clientCAFile: /tmp/c/ca.crt}"));
        assert!(k.contains("address: 10.88.0.11"));
    }
}

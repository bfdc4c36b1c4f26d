//! A local cluster of REAL nodes (issue 16, "Real nodes in the local environment"):
//! etcd and kube-apiserver as for the simulated nodes, plus kube-controller-manager and
//! kube-scheduler on the host, and per node containerd with runc, a kubelet and
//! kube-proxy in a network namespace of its own ([`net`], [`node`]). Ferry is then
//! installed as a user would: its images imported into each node's containerd, the
//! chart with `helm install` ([`RealCluster::install_ferry`]); its operator and agents
//! run as the chart's Deployment and DaemonSet, under the kubelets.
//!
//! One at a time on a machine: the bridge, the addresses and the namespaces' names are
//! fixed ([`net`]); a run that died leaves them, and the next one removes them first.

pub mod config;
pub mod net;
pub mod node;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::control_plane::{Options, RealApi};
use crate::ports::free_port;
use crate::process::ChildGuard;
use crate::tools as tool;
use crate::{ControlPlane, HarnessError};
use node::RealNode;

/// The tools a real node needs beyond the control plane's (`make tools-real`).
pub const TOOLS: [&str; 6] = [
    "kubelet",
    "kube-proxy",
    "kube-scheduler",
    "kube-controller-manager",
    "containerd",
    "ctr",
];

/// Where the pause image is (tests/tools/pause-image.sh).
pub fn pause_image() -> PathBuf {
    tool::tools_dir().join("images/pause.oci.tar")
}

pub struct RealCluster {
    // Drop order: the nodes (and every Pod and guest on them), the controllers, the
    // control plane, then the network.
    pub nodes: Vec<RealNode>,
    scheduler: ChildGuard,
    controller_manager: ChildGuard,
    pub cp: ControlPlane,
    _net: net::Network,
    /// The host's mount points for the nodes' private paths that did not exist before.
    created: Vec<&'static str>,
}

impl RealCluster {
    /// Starts the control plane, the controllers and one real node per name, and waits
    /// until every Node is Ready.
    pub async fn up(names: &[&str], keep_dir: Option<&Path>) -> Result<RealCluster, HarnessError> {
        for t in TOOLS {
            let path = tool::tool(t);
            if !path.is_file() {
                return Err(HarnessError::MissingTool {
                    tool: format!("{t} (run `make tools-real`)"),
                    path,
                });
            }
        }
        for (what, path) in [
            ("the CNI plugins", tool::tools_dir().join("cni/bin/bridge")),
            ("the pause image", pause_image()),
        ] {
            if !path.is_file() {
                return Err(HarnessError::MissingTool {
                    tool: format!("{what} (run `make tools-real`)"),
                    path,
                });
            }
        }
        let created: Vec<&'static str> = node::PRIVATE
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        let network = net::Network::up(names)?;
        let tokens: Vec<(String, String, String)> = names
            .iter()
            .map(|n| {
                (
                    random_token(),
                    format!("system:node:{n}"),
                    "system:nodes".to_string(),
                )
            })
            .chain(std::iter::once((
                random_token(),
                "system:kube-proxy".to_string(),
                String::new(),
            )))
            .collect();
        let options = Options {
            real: Some(RealApi {
                address: net::HOST_IP,
                tokens: tokens.clone(),
            }),
        };
        let cp = ControlPlane::start_with(keep_dir, options).await?;
        let dir = cp.dir().to_path_buf();
        let admin_kubeconfig = cp.kubeconfig.display().to_string();

        let mut cm = std::process::Command::new(tool::tool("kube-controller-manager"));
        cm.arg(format!("--kubeconfig={admin_kubeconfig}"))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!(
                "--secure-port={}",
                free_port(std::net::Ipv4Addr::LOCALHOST)?
            ))
            .arg(format!("--root-ca-file={}", cp.pki().ca_cert.display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                cp.pki().sa_key.display()
            ))
            .arg("--controllers=*,-csrsigning")
            .arg("--node-monitor-grace-period=20s");
        let controller_manager = node::spawn(&dir, "kube-controller-manager", cm)?;
        let mut sched = std::process::Command::new(tool::tool("kube-scheduler"));
        sched
            .arg(format!("--kubeconfig={admin_kubeconfig}"))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!(
                "--secure-port={}",
                free_port(std::net::Ipv4Addr::LOCALHOST)?
            ));
        let scheduler = node::spawn(&dir, "kube-scheduler", sched)?;

        let prefix = format!(
            "ferry-real/{}",
            dir.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let guests = format!("{prefix}-guests");
        let ca_pem = std::fs::read_to_string(&cp.pki().ca_cert)?;
        let proxy_token = tokens.last().expect("kube-proxy's token").0.clone();
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let node = RealNode::start(node::Start {
                name,
                index: i,
                dir: &dir.join("nodes").join(name),
                api_url: &cp.url,
                ca_pem: &ca_pem,
                ca_cert: &cp.pki().ca_cert,
                kubelet_token: &tokens[i].0,
                proxy_token: &proxy_token,
                cgroup_prefix: &prefix,
                guest_cgroup_prefix: &guests,
            })
            .await?;
            node.import(&pause_image())?;
            nodes.push(node);
        }
        let cluster = RealCluster {
            nodes,
            scheduler,
            controller_manager,
            cp,
            _net: network,
            created,
        };
        cluster.wait_nodes_ready(Duration::from_secs(180)).await?;
        Ok(cluster)
    }

    async fn wait_nodes_ready(&self, limit: Duration) -> Result<(), HarnessError> {
        let client = self.cp.admin_client().await?;
        let api: Api<Node> = Api::all(client);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ready: Vec<String> = api
                .list(&Default::default())
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|n| node_ready(n))
                        .filter_map(|n| n.metadata.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            if self.nodes.iter().all(|n| ready.contains(&n.name)) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "nodes not Ready after {limit:?} (Ready: {ready:?}); see {}",
                    self.nodes
                        .iter()
                        .map(|n| n.log("kubelet").display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The parent of every node's guest cgroups, as the chart value
    /// `agent.guestCgroups.parent` (the kubelet expands `$(NODE_NAME)`): the nodes share
    /// the host's cgroups, so each needs its own.
    pub fn guest_cgroup_value(&self) -> String {
        let parent = &self.nodes[0].guest_cgroup_parent;
        let prefix = parent.rsplit_once('/').map_or(parent.as_str(), |(p, _)| p);
        format!("{prefix}/$(NODE_NAME)")
    }

    /// The chart values a local real cluster needs beyond the defaults: the images are
    /// imported, not pulled; each node's guests get a cgroup parent of their own (the
    /// nodes share the host's cgroups); the reservations use the nodes' pause image.
    pub fn chart_values(&self) -> Vec<String> {
        vec![
            "image.pullPolicy=Never".to_string(),
            format!("agent.guestCgroups.parent={}", self.guest_cgroup_value()),
            format!("guestReservations.image={}", config::PAUSE_IMAGE),
        ]
    }

    /// Imports the images in `archives` into every node, then installs the chart with
    /// helm, unchanged, with `values` (`key=value`).
    pub async fn install_ferry(
        &self,
        archives: &[PathBuf],
        values: &[&str],
    ) -> Result<(), HarnessError> {
        for node in &self.nodes {
            for a in archives {
                node.import(a)?;
            }
        }
        self.cp
            .install_chart_with("ferry", crate::cluster::NAMESPACE, values)
            .await
    }

    /// Waits until the operator's Deployment and the agents' DaemonSet are rolled out:
    /// every Pod Ready, its probes passing.
    pub async fn wait_ferry_ready(&self, limit: Duration) -> Result<(), HarnessError> {
        for what in ["deployment/ferry-operator", "daemonset/ferry-agent"] {
            let out = self
                .cp
                .kubectl()
                .args(["-n", crate::cluster::NAMESPACE, "rollout", "status", what])
                .arg(format!("--timeout={}s", limit.as_secs()))
                .output()
                .await?;
            if !out.status.success() {
                return Err(HarnessError::Setup(format!(
                    "{what} not rolled out: {}",
                    crate::printed(&out)
                )));
            }
        }
        Ok(())
    }

    /// The processes the cluster runs on the host (for leak checks and logs).
    pub fn controllers(&mut self) -> [(&'static str, Option<std::process::ExitStatus>); 2] {
        [
            ("kube-scheduler", self.scheduler.try_wait()),
            (
                "kube-controller-manager",
                self.controller_manager.try_wait(),
            ),
        ]
    }
}

/// The archives `make images` wrote to `dir` (`ferry-operator-*.oci.tar`,
/// `ferry-agent-*.oci.tar`).
pub fn ferry_images(dir: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    let mut found = Vec::new();
    for name in ["ferry-operator", "ferry-agent"] {
        let archive = std::fs::read_dir(dir)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&format!("{name}-")) && f.ends_with(".oci.tar"))
            })
            .ok_or_else(|| HarnessError::MissingTool {
                tool: format!("the {name} image (run `make images`)"),
                path: dir.join(format!("{name}-<tag>.oci.tar")),
            })?;
        found.push(archive);
    }
    Ok(found)
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        // The nodes first (each kills its Pods and guests and removes its cgroups), then
        // the cluster's cgroup parents, and `ferry-real` once no cluster is left.
        let parents: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| {
                [&n.cgroup_root, &format!("/{}", n.guest_cgroup_parent)]
                    .into_iter()
                    .filter_map(|p| p.rsplit_once('/').map(|(parent, _)| parent.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.nodes.clear();
        for p in parents
            .iter()
            .chain(std::iter::once(&"/ferry-real".to_string()))
        {
            node::remove_empty_cgroup(p);
        }
        for p in &self.created {
            let _ = std::fs::remove_dir(p);
        }
    }
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn random_token() -> String {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()),
    );
    (0..32)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

//! One real node: containerd (with runc and the CNI plugins), a kubelet and kube-proxy,
//! in the node's own network namespace and a mount namespace of its own, in which the
//! paths a kubelet node owns (/var/lib/kubelet, /var/log/pods, /run/containerd, ...,
//! and Ferry's state dir /var/lib/ferry) are the node directory's. Its Pods run in its
//! own subtree of every cgroup hierarchy (`cgroupRoot`). Everything it started is
//! killed and removed when dropped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::config::{self, NodePaths};
use super::net;
use crate::HarnessError;
use crate::process::ChildGuard;
use crate::tools as tool;

/// The paths of a kubelet node that are the node directory's, not the host's.
pub(crate) const PRIVATE: [&str; 10] = [
    // containerd's Pod network namespaces (files on the host's /run tmpfs otherwise).
    "/run/netns",
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/run/nri",
    "/opt/containerd",
    "/var/lib/ferry",
];

/// The host's cgroup hierarchies.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

pub struct RealNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    /// The kubelet's `cgroupRoot` (a path inside each hierarchy).
    pub cgroup_root: String,
    /// Where the agent puts this node's guests (the chart's `agent.guestCgroups.parent`
    /// expands `$(NODE_NAME)`).
    pub guest_cgroup_parent: String,
    // Drop order: the kubelet first, then kube-proxy, containerd and the namespaces'
    // holder; then [`Drop`] kills what is left.
    kubelet: Option<ChildGuard>,
    proxy: Option<ChildGuard>,
    containerd: Option<ChildGuard>,
    holder: Option<ChildGuard>,
}

/// What a node needs to start.
pub struct Start<'a> {
    pub name: &'a str,
    pub index: usize,
    pub dir: &'a Path,
    pub api_url: &'a str,
    pub ca_pem: &'a str,
    pub ca_cert: &'a Path,
    pub kubelet_token: &'a str,
    pub proxy_token: &'a str,
    pub cgroup_prefix: &'a str,
    pub guest_cgroup_prefix: &'a str,
}

impl RealNode {
    /// Starts the node and waits for its containerd socket (the caller waits for the
    /// Node to be Ready).
    pub async fn start(s: Start<'_>) -> Result<RealNode, HarnessError> {
        let dir = s.dir.to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let cni_bin = tool::tools_dir().join("cni/bin");
        let paths = NodePaths {
            dir: &dir,
            cni_bin: &cni_bin,
        };
        let ip = net::node_ip(s.index);
        let cgroup_root = format!("/{}/{}", s.cgroup_prefix, s.name);
        let mut node = RealNode {
            name: s.name.to_string(),
            ip,
            dir: dir.clone(),
            cgroup_root: cgroup_root.clone(),
            guest_cgroup_parent: format!("{}/{}", s.guest_cgroup_prefix, s.name),
            kubelet: None,
            proxy: None,
            containerd: None,
            holder: None,
        };
        make_cgroup(&cgroup_root)?;
        for d in ["containerd", "cni/net.d", "cni/ipam"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(dir.join("containerd.toml"), config::containerd(&paths))?;
        let (subnet, gateway) = net::pod_subnet(s.index);
        std::fs::write(
            dir.join("cni/net.d/10-ferry.conflist"),
            config::cni(&paths, &subnet, gateway),
        )?;
        std::fs::write(dir.join("resolv.conf"), "")?;
        std::fs::write(
            dir.join("kubelet.yaml"),
            config::kubelet(&config::Kubelet {
                paths: paths.clone(),
                node_ip: ip,
                cgroup_root: &cgroup_root,
                client_ca: s.ca_cert,
            }),
        )?;
        let kubeconfig = |user: &str, token: &str, file: &str| -> std::io::Result<PathBuf> {
            let path = dir.join(file);
            std::fs::write(&path, config::kubeconfig(s.api_url, s.ca_pem, user, token))?;
            Ok(path)
        };
        let kubelet_kubeconfig = kubeconfig(
            &format!("system:node:{}", s.name),
            s.kubelet_token,
            "kubelet.kubeconfig",
        )?;
        let proxy_kubeconfig = kubeconfig("system:kube-proxy", s.proxy_token, "proxy.kubeconfig")?;

        // The namespaces' holder: in the node's network namespace, a new mount
        // namespace (slave of the host's, shared below it, so volumes propagate into
        // the containers but nothing leaks out) with the node's private paths.
        let mut script = String::from("set -e; mount --make-rshared /; ");
        for p in PRIVATE {
            let own = private_dir(&dir, p);
            std::fs::create_dir_all(&own)?;
            std::fs::create_dir_all(p)?;
            script.push_str(&format!("mount --bind {} {p}; ", own.display()));
        }
        script.push_str("exec sleep infinity");
        let mut holder = Command::new("nsenter");
        holder
            .arg(format!("--net=/run/netns/{}", net::netns(s.name)))
            .args(["--", "unshare", "--mount", "--propagation", "slave", "--"])
            .args(["sh", "-c", &script]);
        node.holder = Some(spawn(&dir, "holder", holder)?);
        let holder_pid = node.holder.as_ref().expect("just set").pid();
        wait_for(
            "the node's mounts",
            || {
                std::fs::read_to_string(format!("/proc/{holder_pid}/mountinfo"))
                    .is_ok_and(|m| m.contains(" /var/lib/ferry "))
            },
            Duration::from_secs(10),
        )
        .await?;
        let enter = |program: PathBuf| {
            let mut c = Command::new("nsenter");
            c.arg(format!("--target={holder_pid}"))
                .args(["--mount", "--net", "--"])
                .arg(program);
            // Real nodes have runc and iptables on the PATH.
            c.env(
                "PATH",
                format!(
                    "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                    tool::tools_dir().join("bin").display()
                ),
            );
            c
        };

        let mut containerd = enter(tool::tool("containerd"));
        containerd.arg(format!(
            "--config={}",
            dir.join("containerd.toml").display()
        ));
        node.containerd = Some(spawn(&dir, "containerd", containerd)?);
        let socket = paths.containerd_socket();
        wait_for("containerd", || socket.exists(), Duration::from_secs(30)).await?;

        let mut kubelet = enter(tool::tool("kubelet"));
        kubelet
            .arg(format!("--config={}", dir.join("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", kubelet_kubeconfig.display()))
            .arg(format!("--hostname-override={}", s.name))
            .arg(format!("--node-ip={ip}"))
            .arg("--v=1");
        node.kubelet = Some(spawn(&dir, "kubelet", kubelet)?);

        let mut proxy = enter(tool::tool("kube-proxy"));
        proxy
            .arg(format!("--kubeconfig={}", proxy_kubeconfig.display()))
            .arg(format!("--hostname-override={}", s.name))
            .arg("--proxy-mode=iptables")
            .arg(format!("--cluster-cidr={}", net::POD_CIDR))
            // A network namespace has no writable conntrack table size.
            .arg("--conntrack-max-per-core=0")
            .arg("--conntrack-tcp-timeout-established=0")
            .arg("--conntrack-tcp-timeout-close-wait=0")
            .arg("--metrics-bind-address=127.0.0.1:10249")
            .arg("--healthz-bind-address=127.0.0.1:10256");
        node.proxy = Some(spawn(&dir, "kube-proxy", proxy)?);
        Ok(node)
    }

    /// Imports an OCI archive into the node's containerd (namespace `k8s.io`, the
    /// kubelet's).
    pub fn import(&self, archive: &Path) -> Result<(), HarnessError> {
        self.ctr(&["images", "import", &archive.display().to_string()])
    }

    /// Tags image `from` as `to` too in the node's containerd (a "new" image for an
    /// upgrade, without building one).
    pub fn tag(&self, from: &str, to: &str) -> Result<(), HarnessError> {
        self.ctr(&["images", "tag", "--force", from, to])
    }

    /// Runs `ctr` against the node's containerd, namespace `k8s.io`.
    fn ctr(&self, args: &[&str]) -> Result<(), HarnessError> {
        let socket = self
            .dir
            .join("containerd/containerd.sock")
            .display()
            .to_string();
        let mut all = vec!["--address", socket.as_str(), "-n", "k8s.io"];
        all.extend_from_slice(args);
        net::run(&tool::tool("ctr").display().to_string(), &all)
    }

    /// Ferry's state dir on this node (the agent's /var/lib/ferry).
    pub fn state_dir(&self) -> PathBuf {
        private_dir(&self.dir, "/var/lib/ferry")
    }

    /// The node's log of `what` (containerd, kubelet, kube-proxy).
    pub fn log(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }

    /// Every process of this node: in its network namespace (its daemons, shims and
    /// host-network Pods), in its cgroup subtree (all Pods) or in its guests' cgroups.
    fn processes(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &net::netns(&self.name)])
            .output()
        {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        for root in [&self.cgroup_root, &format!("/{}", self.guest_cgroup_parent)] {
            pids.extend(cgroup_pids(
                &Path::new(CGROUP_ROOT).join("pids").join(&root[1..]),
            ));
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        for p in [&mut self.kubelet, &mut self.proxy] {
            if let Some(mut c) = p.take() {
                c.stop(Duration::from_secs(5));
            }
        }
        // Pods, shims, QEMU: none may outlive the node.
        for _ in 0..50 {
            let pids = self.processes();
            let holder = self.holder.as_ref().map(|h| h.pid() as i32);
            let containerd = self.containerd.as_ref().map(|h| h.pid() as i32);
            let others: Vec<i32> = pids
                .into_iter()
                .filter(|p| Some(*p) != holder && Some(*p) != containerd)
                .collect();
            if others.is_empty() {
                break;
            }
            for pid in others {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in [&mut self.containerd, &mut self.holder] {
            if let Some(mut c) = p.take() {
                c.kill();
            }
        }
        remove_cgroup(&self.cgroup_root);
        remove_cgroup(&format!("/{}", self.guest_cgroup_parent));
    }
}

/// Where the node keeps its own `path` (e.g. `private/var-lib-ferry`).
fn private_dir(node_dir: &Path, path: &str) -> PathBuf {
    node_dir
        .join("private")
        .join(path.trim_start_matches('/').replace('/', "-"))
}

/// Starts `cmd` with its output in `<dir>/<what>.log`.
pub(crate) fn spawn(dir: &Path, what: &str, mut cmd: Command) -> Result<ChildGuard, HarnessError> {
    let log = std::fs::File::create(dir.join(format!("{what}.log")))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    ChildGuard::spawn(what, cmd).map_err(|source| HarnessError::Spawn {
        what: what.into(),
        source,
    })
}

async fn wait_for(
    what: &str,
    mut ready: impl FnMut() -> bool,
    limit: Duration,
) -> Result<(), HarnessError> {
    let deadline = tokio::time::Instant::now() + limit;
    while !ready() {
        if tokio::time::Instant::now() > deadline {
            return Err(HarnessError::Setup(format!(
                "{what} not ready after {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Creates `path` in every cgroup v1 hierarchy (the kubelet wants its cgroupRoot in
/// each, `systemd` and `unified` included), each cpuset level with its parent's CPUs and
/// memory nodes.
pub fn make_cgroup(path: &str) -> Result<(), HarnessError> {
    for entry in std::fs::read_dir(CGROUP_ROOT)? {
        let hierarchy = entry?.path();
        let mut dir = hierarchy.clone();
        for part in path.trim_start_matches('/').split('/') {
            let parent = dir.clone();
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)?;
            }
            if hierarchy.ends_with("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(parent.join(f))?;
                    if std::fs::read_to_string(dir.join(f))?.trim().is_empty() {
                        std::fs::write(dir.join(f), v.trim())?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Removes `path` and everything below it from every hierarchy (deepest first).
pub fn remove_cgroup(path: &str) {
    let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) else {
        return;
    };
    for h in hierarchies.flatten() {
        remove_tree(&h.path().join(path.trim_start_matches('/')));
    }
}

/// Removes `path` from every hierarchy if it is empty.
pub fn remove_empty_cgroup(path: &str) {
    let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) else {
        return;
    };
    for h in hierarchies.flatten() {
        let _ = std::fs::remove_dir(h.path().join(path.trim_start_matches('/')));
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The pids in `dir` and its descendants (`cgroup.procs`).
fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&e.path()));
            }
        }
    }
    pids
}

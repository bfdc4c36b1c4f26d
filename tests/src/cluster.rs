//! A whole local Ferry: the control plane, the chart installed, the operator and one
//! agent per simulated node as host processes, each using a token of the chart's own
//! ServiceAccount — so the chart's RBAC is what runs. Used by the end-to-end tests and by
//! `make up`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

use crate::api_proxy::ApiProxy;
use crate::ports::free_port;
use crate::process::ChildGuard;
use crate::{ControlPlane, HarnessError};

/// Ferry's namespace in the local cluster.
pub const NAMESPACE: &str = "ferry-system";
/// The ports each agent may hand its incoming QEMUs (`--migration-ports`).
pub const MIGRATION_PORTS: std::ops::RangeInclusive<u16> = 49152..=49215;
/// Where the example VM's disk is: the test guest image, written by [`Cluster::up`] into
/// namespace `default`'s directory of the read-write root [`DISKS_ROOT`].
pub const EXAMPLE_DISK: &str = "/var/lib/ferry-disks/default/test-guest.img";
/// The storage roots every agent of a local cluster has, as the chart's defaults name
/// them (`agent.storage`, and the save volume): base images (read-only, shared), the
/// tenants' disks and saved states (read-write, `<root>/<namespace>/`). Each cluster
/// has two more read-write roots of its own in its directory, `disks` and `saves`
/// ([`Cluster::disk`], [`Cluster::save_dir`]), so tests keep their files apart.
pub const IMAGES_ROOT: &str = "/var/lib/ferry-images";
pub const DISKS_ROOT: &str = "/var/lib/ferry-disks";
pub const SAVES_ROOT: &str = "/var/lib/ferry-saves";

/// One simulated node: its agent process and where it keeps things.
pub struct Node {
    pub name: String,
    /// The loopback address its migration streams use (127.0.0.2, 127.0.0.3, ...).
    pub address: IpAddr,
    pub state_dir: PathBuf,
    pub metrics_port: u16,
    kubeconfig: PathBuf,
    agent: Option<ChildGuard>,
    /// The fault proxy between this agent and the apiserver, when the cluster has them.
    proxy: Option<ApiProxy>,
    /// Environment every start of this agent gets ([`Cluster::set_agent_env`]).
    env: Vec<(String, String)>,
}

/// A running local Ferry. Dropping it stops the operator, the agents, every QEMU they
/// started, and the control plane.
pub struct Cluster {
    nodes: BTreeMap<String, Node>,
    operator: Option<ChildGuard>,
    /// A second operator replica, when a test wants one.
    standby: Option<ChildGuard>,
    operator_kubeconfig: PathBuf,
    operator_args: Vec<String>,
    /// Environment every start of the operator gets ([`Cluster::set_operator_env`]).
    operator_env: Vec<(String, String)>,
    bin_dir: PathBuf,
    heartbeat: Heartbeat,
    pub operator_metrics_port: u16,
    /// The console API port of the first operator replica, which the console APIService
    /// is routed to ([`crate::console_route`]); `None` when the chart has no console.
    pub operator_console_port: Option<u16>,
    /// The fault proxy between the operator (both replicas) and the apiserver.
    operator_proxy: Option<ApiProxy>,
    pub cp: ControlPlane,
}

/// How [`Cluster::up_with_options`] sets a cluster up.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// Files go there and stay (for `make up`); otherwise to a temp dir.
    pub keep_dir: Option<&'a Path>,
    /// Chart values (`key=value`, as `helm --set` takes them).
    pub chart_values: &'a [&'a str],
    pub heartbeat: Heartbeat,
    /// Whether each agent and the operator reach the apiserver through a fault proxy of
    /// their own ([`ApiProxy`]): their kubeconfigs then name it.
    pub api_proxies: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            keep_dir: None,
            chart_values: &[],
            heartbeat: Heartbeat::TESTS,
            api_proxies: false,
        }
    }
}

/// How often the agents renew their heartbeat Lease, and how long one lasts: past that,
/// the operator counts the node's agent as lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub every_seconds: u64,
    pub lasts_seconds: u64,
}

impl Heartbeat {
    /// The tests': a killed agent shows as lost within 5 s.
    pub const TESTS: Heartbeat = Heartbeat {
        every_seconds: 1,
        lasts_seconds: 5,
    };
    /// The agent's own defaults (the chart sets none), for measurements: with eight busy
    /// TCG guests on two cores an agent may not get to renew within 5 s.
    pub const DEFAULTS: Heartbeat = Heartbeat {
        every_seconds: 2,
        lasts_seconds: 10,
    };
}

impl Cluster {
    /// Starts everything with agents on `nodes` (e.g. `["node-a", "node-b"]`). With
    /// `keep_dir`, files go there and stay (for `make up`); otherwise to a temp dir.
    pub async fn up(nodes: &[&str], keep_dir: Option<&Path>) -> Result<Cluster, HarnessError> {
        Self::up_with(nodes, keep_dir, &[]).await
    }

    /// Like [`Cluster::up`], with chart values (`key=value`, as `helm --set` takes them).
    /// The operator runs with the arguments of the chart's Deployment, so the chart's
    /// values (limits, default policy) are what it runs with.
    pub async fn up_with(
        nodes: &[&str],
        keep_dir: Option<&Path>,
        chart_values: &[&str],
    ) -> Result<Cluster, HarnessError> {
        Self::up_with_heartbeat(nodes, keep_dir, chart_values, Heartbeat::TESTS).await
    }

    /// Like [`Cluster::up_with`], the agents renewing their heartbeat as `heartbeat` says.
    pub async fn up_with_heartbeat(
        nodes: &[&str],
        keep_dir: Option<&Path>,
        chart_values: &[&str],
        heartbeat: Heartbeat,
    ) -> Result<Cluster, HarnessError> {
        let options = Options {
            keep_dir,
            chart_values,
            heartbeat,
            api_proxies: false,
        };
        Self::up_with_options(nodes, options).await
    }

    /// Starts everything with agents on `nodes`, as `options` say.
    pub async fn up_with_options(
        nodes: &[&str],
        options: Options<'_>,
    ) -> Result<Cluster, HarnessError> {
        let Options {
            keep_dir,
            chart_values,
            heartbeat,
            api_proxies,
        } = options;
        let bin_dir = bin_dir();
        for bin in ["ferry-operator", "ferry-agent"] {
            if !bin_dir.join(bin).is_file() {
                return Err(HarnessError::MissingTool {
                    tool: format!("{bin} (run `cargo build --bins`)"),
                    path: bin_dir.join(bin),
                });
            }
        }
        install_example_disk()?;
        let cp = match keep_dir {
            Some(dir) => ControlPlane::start_in_dir(dir).await?,
            None => ControlPlane::start().await?,
        };
        // Simulated nodes have no kubelet or scheduler to place the guests'
        // reservation Pods on (tests/tests/real.rs has them).
        let mut values = vec!["guestReservations.enabled=false"];
        values.extend_from_slice(chart_values);
        cp.install_chart_with("ferry", NAMESPACE, &values).await?;
        let admin = cp.admin_client().await?;
        let operator_args = chart_operator_args(&admin).await?;
        let console_port = free_port(Ipv4Addr::LOCALHOST)?;
        let console_port = crate::console_route::route(&admin, console_port)
            .await?
            .then_some(console_port);
        let operator_kubeconfig = cp.dir().join("operator.kubeconfig");
        let token = service_account_token(&admin, "ferry-operator").await?;
        let operator_proxy = api_proxies.then(|| cp.start_api_proxy()).transpose()?;
        write_kubeconfig(
            &cp,
            operator_proxy.as_ref(),
            &operator_kubeconfig,
            "ferry-operator",
            &token,
        )?;
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            operator: None,
            standby: None,
            operator_kubeconfig,
            operator_args,
            operator_env: Vec::new(),
            bin_dir,
            heartbeat,
            operator_metrics_port: free_port(Ipv4Addr::LOCALHOST)?,
            operator_console_port: console_port,
            operator_proxy,
            cp,
        };
        for (i, name) in nodes.iter().enumerate() {
            let address = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8));
            let state_dir = cluster.cp.dir().join("nodes").join(name);
            std::fs::create_dir_all(&state_dir)?;
            let metrics_port = free_port(Ipv4Addr::new(127, 0, 0, 2 + i as u8))?;
            // Each agent acts as its node: a token of the chart's agent ServiceAccount
            // bound to a Node object, as the admission policy requires.
            let token =
                crate::identity::node_bound_token(&admin, NAMESPACE, "ferry-agent", name, 86400)
                    .await?;
            let kubeconfig = cluster.cp.dir().join(format!("agent-{name}.kubeconfig"));
            let proxy = api_proxies
                .then(|| cluster.cp.start_api_proxy())
                .transpose()?;
            let user = format!("ferry-agent@{name}");
            write_kubeconfig(&cluster.cp, proxy.as_ref(), &kubeconfig, &user, &token)?;
            cluster.nodes.insert(
                name.to_string(),
                Node {
                    name: name.to_string(),
                    address,
                    state_dir,
                    metrics_port,
                    kubeconfig,
                    agent: None,
                    proxy,
                    env: Vec::new(),
                },
            );
            cluster.start_agent(name)?;
        }
        cluster.start_operator()?;
        Ok(cluster)
    }

    /// Where the workspace's binaries are (ferry-operator, ferry-agent, kubectl-ferry).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The simulated nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// One simulated node.
    pub fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    /// The fault proxy between `node`'s agent and the apiserver, if the cluster has them.
    pub fn agent_proxy(&self, node: &str) -> Option<&ApiProxy> {
        self.nodes[node].proxy.as_ref()
    }

    /// The fault proxy between the operator and the apiserver, if the cluster has them.
    pub fn operator_proxy(&self) -> Option<&ApiProxy> {
        self.operator_proxy.as_ref()
    }

    /// Starts again the operator and every agent whose process ended by itself (as a
    /// Deployment's or DaemonSet's restart policy would), without any fault hook; returns
    /// which (`operator`, `agent <node>`).
    pub fn restart_exited(&mut self) -> Result<Vec<String>, HarnessError> {
        let mut restarted = Vec::new();
        if self
            .operator
            .as_mut()
            .is_some_and(|o| o.try_wait().is_some())
        {
            self.start_operator()?;
            restarted.push("operator".to_string());
        }
        let mut exited = Vec::new();
        for n in self.nodes.values_mut() {
            if n.agent.as_mut().is_some_and(|a| a.try_wait().is_some()) {
                exited.push(n.name.clone());
            }
        }
        for node in exited {
            self.start_agent(&node)?;
            restarted.push(format!("agent {node}"));
        }
        Ok(restarted)
    }

    /// Starts (or restarts) the operator; its log is appended to `operator.log`.
    pub fn start_operator(&mut self) -> Result<(), HarnessError> {
        self.start_operator_with_env(&[])
    }

    /// [`Cluster::start_operator`] with extra environment (the fault tests' hook).
    pub fn start_operator_with_env(&mut self, env: &[(&str, &str)]) -> Result<(), HarnessError> {
        let ports = (self.operator_metrics_port, self.operator_console_port);
        self.operator = Some(self.spawn_operator("operator", ports, env)?);
        Ok(())
    }

    /// Starts a second operator replica (log `operator-standby.log`); returns its pid,
    /// which is in its leader-election identity.
    pub fn start_second_operator(&mut self) -> Result<u32, HarnessError> {
        let port = free_port(Ipv4Addr::LOCALHOST)?;
        // Its console API listens too, on a port of its own no Service routes to.
        let console = match self.operator_console_port {
            Some(_) => Some(free_port(Ipv4Addr::LOCALHOST)?),
            None => None,
        };
        let standby = self.spawn_operator("operator-standby", (port, console), &[])?;
        let pid = standby.pid();
        self.standby = Some(standby);
        Ok(pid)
    }

    fn spawn_operator(
        &self,
        name: &str,
        (metrics_port, console_port): (u16, Option<u16>),
        env: &[(&str, &str)],
    ) -> Result<ChildGuard, HarnessError> {
        let mut cmd = Command::new(self.bin_dir.join("ferry-operator"));
        let console_addr = match console_port {
            Some(port) => format!("--console-addr=127.0.0.1:{port}"),
            None => "--console-addr=".to_string(),
        };
        cmd.arg(format!("--namespace={NAMESPACE}"))
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .arg(console_addr)
            .arg("--leader-lease-seconds=4")
            .args(&self.operator_args)
            .env("KUBECONFIG", &self.operator_kubeconfig)
            .env("RUST_LOG", log_filter())
            .envs(self.operator_env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied());
        let log = self.cp.dir().join(format!("{name}.log"));
        spawn_appending(&format!("ferry-{name}"), cmd, &log)
    }

    /// Kills the operator with SIGKILL, as a node failure would.
    pub fn kill_operator(&mut self) {
        if let Some(mut op) = self.operator.take() {
            op.kill();
        }
    }

    /// Starts (or restarts) the agent of `node`; its log is appended to
    /// `agent-<node>.log`.
    pub fn start_agent(&mut self, node: &str) -> Result<(), HarnessError> {
        self.start_agent_with_env(node, &[])
    }

    /// [`Cluster::start_agent`] with extra environment (the fault tests' hook).
    pub fn start_agent_with_env(
        &mut self,
        node: &str,
        env: &[(&str, &str)],
    ) -> Result<(), HarnessError> {
        let roots = self.storage_roots();
        let cgroup_parent = self.guest_cgroup_parent(node);
        let n = self.nodes.get_mut(node).expect("a node of this cluster");
        let mut cmd = Command::new(self.bin_dir.join("ferry-agent"));
        cmd.arg(format!("--node-name={node}"))
            .arg(format!("--namespace={NAMESPACE}"))
            .arg(format!("--state-dir={}", n.state_dir.display()))
            .arg(format!("--migration-address={}", n.address))
            .arg(format!(
                "--migration-ports={}-{}",
                MIGRATION_PORTS.start(),
                MIGRATION_PORTS.end()
            ))
            .arg(format!("--metrics-addr={}:{}", n.address, n.metrics_port))
            .arg("--peer-port=0")
            .arg(format!(
                "--heartbeat-seconds={}",
                self.heartbeat.every_seconds
            ))
            .arg(format!("--lease-seconds={}", self.heartbeat.lasts_seconds))
            .args(roots.iter().map(|r| format!("--storage-root={r}")))
            .arg(format!("--guest-cgroup-parent={cgroup_parent}"))
            .env("KUBECONFIG", &n.kubeconfig)
            .env("RUST_LOG", log_filter())
            .envs(n.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied());
        let log = self.cp.dir().join(format!("agent-{node}.log"));
        n.agent = Some(spawn_appending(&format!("ferry-agent {node}"), cmd, &log)?);
        Ok(())
    }

    /// The cgroup `node`'s guests get their own cgroups under (`--guest-cgroup-parent`,
    /// in each hierarchy of the host's /sys/fs/cgroup): one per cluster and node, since
    /// the simulated nodes share the host and a migrating guest has the same key on
    /// both.
    pub fn guest_cgroup_parent(&self, node: &str) -> String {
        format!("{}/{node}", self.cgroup_base())
    }

    /// `ferry-test/<this cluster's dir name>`.
    fn cgroup_base(&self) -> String {
        let dir = self.cp.dir().file_name().unwrap_or_default();
        format!("ferry-test/{}", dir.to_string_lossy())
    }

    /// The guest cgroups of `node` that exist now, per hierarchy: the dirs under its
    /// parent.
    pub fn guest_cgroups(&self, node: &str) -> Vec<PathBuf> {
        let Ok(layout) = ferry_agent::cgroup::Layout::detect(Path::new(CGROUP_ROOT)) else {
            return Vec::new();
        };
        let parent = self.guest_cgroup_parent(node);
        let mut found = Vec::new();
        for dir in layout.dirs(&parent, "") {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    found.push(e.path());
                }
            }
        }
        found.sort();
        found
    }

    /// Removes this cluster's cgroups (its QEMUs are gone or going), deepest first.
    fn remove_cgroups(&self) {
        let Ok(layout) = ferry_agent::cgroup::Layout::detect(Path::new(CGROUP_ROOT)) else {
            return;
        };
        let base = self.cgroup_base();
        let mut dirs = Vec::new();
        for node in self.nodes.keys() {
            dirs.extend(self.guest_cgroups(node));
            dirs.extend(layout.dirs(&self.guest_cgroup_parent(node), ""));
        }
        dirs.extend(layout.dirs(&base, ""));
        // The parent of every cluster's: goes with the last one.
        dirs.extend(layout.dirs("ferry-test", ""));
        for dir in dirs {
            // A QEMU that was just killed keeps its cgroup busy until it has exited.
            for _ in 0..50 {
                match std::fs::remove_dir(&dir) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    _ => break,
                }
            }
        }
    }

    /// The agents' `--storage-root` values (see [`IMAGES_ROOT`]).
    pub fn storage_roots(&self) -> Vec<String> {
        let own = self.cp.dir();
        vec![
            format!("{IMAGES_ROOT}=readOnly"),
            format!("{DISKS_ROOT}=readWrite"),
            format!("{SAVES_ROOT}=readWrite"),
            format!("{}=readWrite", own.join("disks").display()),
            format!("{}=readWrite", own.join("saves").display()),
        ]
    }

    /// Where this cluster's tests keep disk `file` of a guest in namespace `namespace`:
    /// `<cluster dir>/disks/<namespace>/<file>`, beneath a read-write root of every
    /// agent (the namespace's directory is created here, as an administrator would).
    pub fn disk(&self, namespace: &str, file: &str) -> PathBuf {
        let dir = self.cp.dir().join("disks").join(namespace);
        std::fs::create_dir_all(&dir).expect("creating a namespace's disk directory");
        dir.join(file)
    }

    /// This cluster's directory for saved states of namespace `namespace`
    /// (`<cluster dir>/saves/<namespace>/`, created), beneath a read-write root.
    pub fn save_dir(&self, namespace: &str) -> PathBuf {
        let dir = self.cp.dir().join("saves").join(namespace);
        std::fs::create_dir_all(&dir).expect("creating a namespace's save directory");
        dir
    }

    /// Sets the environment every later start of `node`'s agent gets, restarts after a
    /// kill and [`Cluster::restart_exited`] included (the chaos soak's re-armable fault
    /// hook); the running process keeps its own.
    pub fn set_agent_env(&mut self, node: &str, env: &[(&str, &str)]) {
        let n = self.nodes.get_mut(node).expect("a node of this cluster");
        n.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// [`Cluster::set_agent_env`] for the operator.
    pub fn set_operator_env(&mut self, env: &[(&str, &str)]) {
        self.operator_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Kills the agent of `node` with SIGKILL; its guests keep running.
    pub fn kill_agent(&mut self, node: &str) {
        if let Some(mut agent) = self.nodes.get_mut(node).and_then(|n| n.agent.take()) {
            agent.kill();
        }
    }

    /// `kubectl` as the admin.
    pub fn kubectl(&self) -> tokio::process::Command {
        self.cp.kubectl()
    }

    /// An admin client.
    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        self.cp.admin_client().await
    }

    /// The pids of the operator (`operator`) and of each node's agent (its node name).
    pub fn component_pids(&self) -> Vec<(String, u32)> {
        let mut pids: Vec<(String, u32)> = self
            .operator
            .iter()
            .map(|o| ("operator".to_string(), o.pid()))
            .collect();
        for n in self.nodes.values() {
            if let Some(a) = &n.agent {
                pids.push((format!("agent {}", n.name), a.pid()));
            }
        }
        pids
    }

    /// The pids of the QEMU processes running VM `vm`, per node.
    pub fn qemu_pids(&self, vm: &str) -> BTreeMap<String, i32> {
        self.nodes
            .values()
            .filter_map(|n| {
                guest_dirs(&n.state_dir, vm)
                    .iter()
                    .find_map(|d| qemu_pid(d))
                    .map(|p| (n.name.clone(), p))
            })
            .collect()
    }

    /// The state dir of VM `vm`'s guest on `node`: the one whose QEMU runs, else the
    /// newest; a path that does not exist when there is none.
    pub fn guest_dir(&self, node: &str, vm: &str) -> PathBuf {
        let state_dir = &self.nodes[node].state_dir;
        let mut dirs = guest_dirs(state_dir, vm);
        if let Some(running) = dirs.iter().find(|d| qemu_pid(d).is_some()) {
            return running.clone();
        }
        dirs.sort_by_key(|d| d.metadata().and_then(|m| m.modified()).ok());
        dirs.pop()
            .unwrap_or_else(|| state_dir.join("vms").join(format!("(no guest of {vm})")))
    }

    /// The serial log of VM `vm` on `node` (the test guest prints its passes there).
    pub fn serial_log(&self, node: &str, vm: &str) -> PathBuf {
        self.guest_dir(node, vm).join("serial0.log")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_operator();
        if let Some(mut standby) = self.standby.take() {
            standby.kill();
        }
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            if let Some(mut agent) = self.nodes.get_mut(&name).and_then(|n| n.agent.take()) {
                agent.stop(Duration::from_secs(5));
            }
        }
        // QEMU runs in its own session so that it outlives its agent; here nothing may.
        for node in self.nodes.values() {
            let Ok(vms) = std::fs::read_dir(node.state_dir.join("vms")) else {
                continue;
            };
            for vm in vms.flatten() {
                if let Some(pid) = qemu_pid(&vm.path()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        self.remove_cgroups();
    }
}

/// The host's cgroup file system, which the local agents get as `--cgroup-root`.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The state dirs under `state_dir` of guests of VMs named `vm`, in any namespace (the
/// agent keys them by namespace, name and uuid: `ferry_agent::node::guest_key`).
pub fn guest_dirs(state_dir: &Path, vm: &str) -> Vec<PathBuf> {
    let Ok(dirs) = std::fs::read_dir(state_dir.join("vms")) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter(|d| {
            d.file_name()
                .to_str()
                .is_some_and(|n| ferry_agent::node::key_shows_vm(n, vm))
        })
        .map(|d| d.path())
        .collect()
}

/// Writes a kubeconfig for `token` naming `proxy`, or the apiserver itself without one.
fn write_kubeconfig(
    cp: &ControlPlane,
    proxy: Option<&ApiProxy>,
    path: &Path,
    user: &str,
    token: &str,
) -> Result<(), HarnessError> {
    match proxy {
        Some(proxy) => cp.write_kubeconfig_via(path, &proxy.url(), user, token),
        None => cp.write_kubeconfig(path, user, token),
    }
}

/// The operator's arguments from the chart's Deployment, less the ones the harness sets
/// itself (its namespace, metrics and console addresses).
async fn chart_operator_args(admin: &kube::Client) -> Result<Vec<String>, HarnessError> {
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NAMESPACE);
    let d = deployments
        .get("ferry-operator")
        .await
        .map_err(|e| HarnessError::Setup(format!("reading the operator Deployment: {e}")))?;
    let d = serde_json::to_value(&d).expect("a Deployment serializes");
    let args: Vec<String> = d["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok(args
        .into_iter()
        .filter(|a| {
            !a.starts_with("--namespace=")
                && !a.starts_with("--metrics-addr=")
                && !a.starts_with("--console-addr=")
        })
        .collect())
}

/// The pid in `<vm_dir>/qemu.pid`, if that process is alive (not a zombie).
pub fn qemu_pid(vm_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(vm_dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A killed QEMU whose agent died first stays a zombie until its reaper waits for
    // it; it does not run the guest.
    ferry_agent::supervisor::alive(pid).then_some(pid)
}

fn log_filter() -> String {
    std::env::var("FERRY_LOG").unwrap_or_else(|_| "info,kube_lease_manager=warn".into())
}

/// Where the workspace's binaries are: next to this executable (or its parent, for
/// test executables in `deps/`), unless `FERRY_BIN_DIR` says otherwise.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

fn spawn_appending(what: &str, mut cmd: Command, log: &Path) -> Result<ChildGuard, HarnessError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    ChildGuard::spawn(what, cmd).map_err(|source| HarnessError::Spawn {
        what: what.to_string(),
        source,
    })
}

async fn service_account_token(admin: &kube::Client, sa: &str) -> Result<String, HarnessError> {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NAMESPACE);
    let req: TokenRequest = serde_json::from_value(serde_json::json!({
        "spec": {
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
            "expirationSeconds": 86400
        }
    }))
    .expect("a valid TokenRequest");
    sas.create_token_request(sa, &PostParams::default(), &req)
        .await
        .map_err(|e| HarnessError::Setup(format!("TokenRequest for {sa}: {e}")))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| HarnessError::Setup(format!("TokenRequest for {sa} returned no token")))
}

/// Writes the test guest image to [`EXAMPLE_DISK`], where examples/virtualmachine.yaml
/// expects it, unless it is there already, and creates the shared storage roots with
/// namespace `default`'s directories (the administrator's part on a real cluster).
pub fn install_example_disk() -> Result<(), HarnessError> {
    std::fs::create_dir_all(IMAGES_ROOT)?;
    std::fs::create_dir_all(Path::new(SAVES_ROOT).join("default"))?;
    let path = Path::new(EXAMPLE_DISK);
    let image = ferry_agent::testguest::image(ferry_agent::testguest::Params::default())
        .map_err(|e| HarnessError::Setup(format!("building the test guest: {e}")))?;
    if std::fs::read(path).ok().as_deref() == Some(image.as_slice()) {
        return Ok(());
    }
    std::fs::create_dir_all(path.parent().expect("an absolute path"))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &image)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

//! A real etcd + kube-apiserver on loopback, for tests and `make up`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::api_proxy::ApiProxy;
use crate::process::ChildGuard;
use crate::{pki, tool};

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{tool} not found at {path}: run `make tools` first")]
    MissingTool { tool: String, path: PathBuf },
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} was not ready after {waited:?}; last lines of {log}:\n{tail}")]
    NotReady {
        what: String,
        waited: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("setting up the cluster: {0}")]
    Setup(String),
    #[error("test PKI: {0}")]
    Pki(String),
    #[error("I/O in the control plane directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
}

impl HarnessError {
    /// etcd or kube-apiserver could not bind its port: someone took it first.
    fn port_taken(&self) -> bool {
        matches!(self, HarnessError::Exited { tail, .. } if tail.contains("address already in use"))
    }
}

/// How the apiserver is set up: for simulated nodes (the default: loopback, RBAC only)
/// or for real kubelet nodes ([`crate::real`]).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Set for real nodes: the apiserver listens and advertises there (the host's end of
    /// the nodes' bridge), keeps the `kubernetes` Service's endpoints, authorizes
    /// kubelets (Node, RBAC, NodeRestriction) and reaches them by their InternalIP.
    pub real: Option<RealApi>,
}

/// The apiserver's settings for real nodes.
#[derive(Clone, Debug)]
pub struct RealApi {
    pub address: std::net::Ipv4Addr,
    /// More static tokens: (token, user, groups), e.g. the kubelets' and kube-proxy's.
    pub tokens: Vec<(String, String, String)>,
}

/// The `kubernetes` Service's ClusterIP: the first address of the service range.
pub const KUBERNETES_SERVICE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 1);

/// A running etcd and kube-apiserver, stopped when dropped.
///
/// Authentication: a static admin token (group `system:masters`) and ServiceAccount
/// tokens (TokenRequest). Authorization: RBAC only, so what a ServiceAccount may do is
/// exactly what its roles grant.
///
/// Call [`ControlPlane::start`] from the test's own thread (e.g. in `#[tokio::test]`,
/// not in `spawn_blocking`): the processes are tied to the thread that starts them
/// and the kernel kills them if it dies.
pub struct ControlPlane {
    // Field order is drop order: the apiserver stops before etcd, the directory goes last.
    /// None only between [`ControlPlane::stop_apiserver`] and
    /// [`ControlPlane::start_apiserver`].
    apiserver: Option<ChildGuard>,
    etcd: ChildGuard,
    /// `https://127.0.0.1:<port>`
    pub url: String,
    /// A kubeconfig with the admin token.
    pub kubeconfig: PathBuf,
    admin_token: String,
    pki: pki::Pki,
    etcd_url: String,
    api_port: u16,
    options: Options,
    dir: Dir,
}

/// What [`ControlPlane::launch`] started.
struct Launched {
    apiserver: ChildGuard,
    etcd: ChildGuard,
    etcd_url: String,
    api_port: u16,
    kubeconfig: PathBuf,
    admin_token: String,
}

/// Where the control plane keeps its files: a temporary directory removed on drop, or a
/// directory that stays (for `make up`, so the kubeconfig path is stable).
enum Dir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver in a new temporary directory and waits until the
    /// apiserver's /readyz answers ok.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(None, Options::default()).await
    }

    /// Like [`ControlPlane::start`], in `dir` (emptied first), which is kept afterwards.
    pub async fn start_in_dir(dir: &Path) -> Result<Self, HarnessError> {
        Self::start_with(Some(dir), Options::default()).await
    }

    /// Starts it as `options` say, in `dir` (kept) or a temporary directory.
    pub async fn start_with(dir: Option<&Path>, options: Options) -> Result<Self, HarnessError> {
        let dir = match dir {
            Some(dir) => {
                if dir.exists() {
                    std::fs::remove_dir_all(dir)?;
                }
                std::fs::create_dir_all(dir)?;
                Dir::Kept(dir.to_path_buf())
            }
            None => Dir::Temp(tempfile::Builder::new().prefix("ferry-cp-").tempdir()?),
        };
        Self::start_in(dir, options).await
    }

    async fn start_in(dir: Dir, options: Options) -> Result<Self, HarnessError> {
        let root = dir.path().to_path_buf();
        let extra_ips: Vec<std::net::IpAddr> = match &options.real {
            Some(r) => vec![r.address.into(), KUBERNETES_SERVICE_IP.into()],
            None => Vec::new(),
        };
        let pki = pki::create(&root, &extra_ips).map_err(|e| HarnessError::Pki(e.to_string()))?;
        // A port found free can be taken before etcd or kube-apiserver binds it (the
        // kernel hands out the same range to outgoing connections, e.g. of other tests'
        // QEMUs and agents): then start again on other ports.
        let mut attempt = 1;
        loop {
            match Self::launch(&root, &pki, &options).await {
                Err(e) if attempt < 3 && e.port_taken() => {
                    attempt += 1;
                    let _ = std::fs::remove_dir_all(root.join("etcd"));
                }
                Err(e) => return Err(e),
                Ok(l) => {
                    return Ok(ControlPlane {
                        apiserver: Some(l.apiserver),
                        etcd: l.etcd,
                        url: format!("https://{}:{}", host(&options), l.api_port),
                        kubeconfig: l.kubeconfig,
                        admin_token: l.admin_token,
                        pki,
                        etcd_url: l.etcd_url,
                        api_port: l.api_port,
                        options,
                        dir,
                    });
                }
            }
        }
    }

    /// Starts etcd and kube-apiserver on free ports in `root`.
    async fn launch(
        root: &Path,
        pki: &pki::Pki,
        options: &Options,
    ) -> Result<Launched, HarnessError> {
        let etcd_bin = existing_tool("etcd")?;
        let (client_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_cmd = Command::new(etcd_bin);
        etcd_cmd
            .args(["--name", "ferry"])
            .arg(format!("--data-dir={}", root.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=ferry={peer_url}"))
            .args(["--log-level=warn", "--unsafe-no-fsync=true"]);
        let etcd_log = root.join("etcd.log");
        let mut etcd = spawn_logged("etcd", etcd_cmd, &etcd_log)?;
        wait_for_port(&mut etcd, "etcd", client_port, &etcd_log).await?;

        let admin_token = format!("admin-{}", std::process::id());
        let mut tokens = format!("{admin_token},ferry-admin,ferry-admin,system:masters\n");
        for (token, user, groups) in options.real.iter().flat_map(|r| &r.tokens) {
            tokens.push_str(&format!("{token},{user},{user},\"{groups}\"\n"));
        }
        std::fs::write(root.join("tokens.csv"), tokens)?;
        let url = format!("https://{}:{api_port}", host(options));
        let api_cmd = apiserver_command(root, pki, &etcd_url, api_port, options)?;
        let api_log = root.join("kube-apiserver.log");
        let mut apiserver = spawn_logged("kube-apiserver", api_cmd, &api_log)?;

        let kubeconfig = root.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &url, &pki.ca_pem, "ferry-admin", &admin_token)?;
        let client = client_from(&kubeconfig).await?;
        wait_ready(&mut apiserver, &client, &api_log).await?;
        Ok(Launched {
            apiserver,
            etcd,
            etcd_url,
            api_port,
            kubeconfig,
            admin_token,
        })
    }

    /// Stops kube-apiserver (SIGTERM, as a restart does); etcd keeps its data.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.stop(Duration::from_secs(10));
        }
    }

    /// Starts kube-apiserver again on the same port with the same certificates and
    /// etcd, and waits until it is ready (its log is appended to).
    pub async fn start_apiserver(&mut self) -> Result<(), HarnessError> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        let root = self.dir.path().to_path_buf();
        let cmd = apiserver_command(
            &root,
            &self.pki,
            &self.etcd_url,
            self.api_port,
            &self.options,
        )?;
        let log = root.join("kube-apiserver.log");
        let out = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)?;
        let mut cmd = cmd;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut apiserver =
            ChildGuard::spawn("kube-apiserver", cmd).map_err(|source| HarnessError::Spawn {
                what: "kube-apiserver".into(),
                source,
            })?;
        let client = client_from(&self.kubeconfig).await?;
        wait_ready(&mut apiserver, &client, &log).await?;
        self.apiserver = Some(apiserver);
        Ok(())
    }

    /// [`ControlPlane::stop_apiserver`], then [`ControlPlane::start_apiserver`].
    pub async fn restart_apiserver(&mut self) -> Result<(), HarnessError> {
        self.stop_apiserver();
        self.start_apiserver().await
    }

    /// A fault proxy in front of this apiserver (see [`ApiProxy`]).
    pub fn start_api_proxy(&self) -> Result<ApiProxy, HarnessError> {
        ApiProxy::start(
            &self.url,
            &self.pki.ca_pem,
            &self.pki.proxy_cert_pem,
            &self.pki.proxy_key_pem,
        )
        .map_err(|e| HarnessError::Setup(format!("the API fault proxy: {e}")))
    }

    /// The test PKI (certificate and key paths).
    pub fn pki(&self) -> &pki::Pki {
        &self.pki
    }

    /// The directory holding the control plane's files (logs, kubeconfig, PKI).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin token (group system:masters).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A client with admin rights.
    pub async fn admin_client(&self) -> Result<kube::Client, HarnessError> {
        client_from(&self.kubeconfig).await
    }

    /// Writes a kubeconfig for `token` to `path` and returns a client using it.
    pub async fn client_for_token(
        &self,
        user: &str,
        token: &str,
        path: &Path,
    ) -> Result<kube::Client, HarnessError> {
        write_kubeconfig(path, &self.url, &self.pki.ca_pem, user, token)?;
        client_from(path).await
    }

    /// Writes a kubeconfig for `token` to `path`.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        user: &str,
        token: &str,
    ) -> Result<(), HarnessError> {
        write_kubeconfig(path, &self.url, &self.pki.ca_pem, user, token)
    }

    /// [`ControlPlane::write_kubeconfig`] for a server at `url` (a fault proxy, whose
    /// certificate the same CA signed).
    pub fn write_kubeconfig_via(
        &self,
        path: &Path,
        url: &str,
        user: &str,
        token: &str,
    ) -> Result<(), HarnessError> {
        write_kubeconfig(path, url, &self.pki.ca_pem, user, token)
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(tool("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        cmd
    }

    /// `helm` with the admin kubeconfig and its state kept in the control plane's
    /// directory.
    pub fn helm(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(tool("helm"));
        let home = self.dir.path().join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Stops both processes now (dropping does the same).
    pub fn stop(mut self) {
        if let Some(apiserver) = self.apiserver.as_mut() {
            apiserver.stop(Duration::from_secs(5));
        }
        self.etcd.stop(Duration::from_secs(5));
    }
}

/// kube-apiserver's command line: on 127.0.0.1:`port`, over `etcd_url`, with the PKI
/// and the admin token file in `root`.
/// The address the apiserver listens on.
fn host(options: &Options) -> std::net::Ipv4Addr {
    options
        .real
        .as_ref()
        .map_or(std::net::Ipv4Addr::LOCALHOST, |r| r.address)
}

fn apiserver_command(
    root: &Path,
    pki: &pki::Pki,
    etcd_url: &str,
    port: u16,
    options: &Options,
) -> Result<Command, HarnessError> {
    let mut api_cmd = Command::new(existing_tool("kube-apiserver")?);
    let address = host(options);
    api_cmd
        .arg(format!("--etcd-servers={etcd_url}"))
        .arg(format!("--bind-address={address}"))
        .arg(format!("--advertise-address={address}"))
        .arg(format!("--secure-port={port}"))
        .arg(format!("--cert-dir={}", root.join("certs").display()))
        .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            pki.serving_key.display()
        ))
        .arg(format!(
            "--token-auth-file={}",
            root.join("tokens.csv").display()
        ))
        .arg(if options.real.is_some() {
            "--authorization-mode=Node,RBAC"
        } else {
            "--authorization-mode=RBAC"
        })
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!(
            "--service-account-key-file={}",
            pki.sa_pub.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            pki.sa_key.display()
        ))
        .arg("--api-audiences=https://kubernetes.default.svc.cluster.local")
        .arg("--service-cluster-ip-range=10.96.0.0/24")
        // As on real clusters: the agent DaemonSet is privileged (see the chart).
        .arg("--allow-privileged=true")
        .arg("--enable-priority-and-fairness=false")
        .arg("--profiling=false")
        // API aggregation (Ferry's console API), set up as kubeadm does.
        .arg(format!(
            "--requestheader-client-ca-file={}",
            pki.front_proxy_ca.display()
        ))
        .arg(format!(
            "--requestheader-allowed-names={}",
            pki::FRONT_PROXY_CN
        ))
        .arg("--requestheader-username-headers=X-Remote-User")
        .arg("--requestheader-group-headers=X-Remote-Group")
        .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
        .arg(format!(
            "--proxy-client-cert-file={}",
            pki.front_proxy_cert.display()
        ))
        .arg(format!(
            "--proxy-client-key-file={}",
            pki.front_proxy_key.display()
        ));
    if options.real.is_some() {
        // Real nodes: the kubelets are authorized as nodes and reached by the address
        // they register (never through DNS), pods reach the apiserver through the
        // `kubernetes` Service, and the aggregator dials the console API's Pod.
        api_cmd
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg(format!(
                "--kubelet-client-certificate={}",
                pki.kubelet_client_cert.display()
            ))
            .arg(format!(
                "--kubelet-client-key={}",
                pki.kubelet_client_key.display()
            ))
            .arg("--enable-aggregator-routing=true");
    } else {
        // No Service endpoints to reconcile on a loopback address.
        api_cmd.arg("--endpoint-reconciler-type=none");
    }
    Ok(api_cmd)
}

fn existing_tool(name: &str) -> Result<PathBuf, HarnessError> {
    let path = tool(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingTool {
            tool: name.to_string(),
            path,
        })
    }
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> std::io::Result<u16> {
    crate::ports::free_port(std::net::Ipv4Addr::LOCALHOST)
}

fn spawn_logged(what: &str, mut cmd: Command, log: &Path) -> Result<ChildGuard, HarnessError> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    ChildGuard::spawn(what, cmd).map_err(|source| HarnessError::Spawn {
        what: what.to_string(),
        source,
    })
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn check_alive(child: &mut ChildGuard, what: &str, log: &Path) -> Result<(), HarnessError> {
    match child.try_wait() {
        Some(status) => Err(HarnessError::Exited {
            what: what.to_string(),
            status,
            log: log.to_path_buf(),
            tail: tail(log),
        }),
        None => Ok(()),
    }
}

async fn wait_for_port(
    child: &mut ChildGuard,
    what: &str,
    port: u16,
    log: &Path,
) -> Result<(), HarnessError> {
    let start = Instant::now();
    let limit = Duration::from_secs(30);
    while start.elapsed() < limit {
        check_alive(child, what, log)?;
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(HarnessError::NotReady {
        what: what.to_string(),
        waited: limit,
        log: log.to_path_buf(),
        tail: tail(log),
    })
}

async fn wait_ready(
    child: &mut ChildGuard,
    client: &kube::Client,
    log: &Path,
) -> Result<(), HarnessError> {
    let start = Instant::now();
    let limit = Duration::from_secs(120);
    while start.elapsed() < limit {
        check_alive(child, "kube-apiserver", log)?;
        let req = http_get("/readyz");
        if let Ok(body) = client.request_text(req).await
            && body.trim() == "ok"
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(HarnessError::NotReady {
        what: "kube-apiserver".to_string(),
        waited: limit,
        log: log.to_path_buf(),
        tail: tail(log),
    })
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .body(Vec::new())
        .expect("a GET request with a static path is valid")
}

fn write_kubeconfig(
    path: &Path,
    url: &str,
    ca_pem: &str,
    user: &str,
    token: &str,
) -> Result<(), HarnessError> {
    // The CA sits next to the kubeconfig, so the file works for kubectl and helm too.
    let ca = path.with_extension("ca.crt");
    std::fs::write(&ca, ca_pem)?;
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferry\n  cluster:\n    server: {url}\n    \
         certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\n\
         contexts:\n- name: ferry\n  context:\n    cluster: ferry\n    user: {user}\n    \
         namespace: default\ncurrent-context: ferry\n",
        ca = ca.display()
    );
    std::fs::write(path, text)?;
    Ok(())
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client, HarnessError> {
    let kc =
        Kubeconfig::read_from(kubeconfig).map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| HarnessError::Kubeconfig(e.to_string()))
}

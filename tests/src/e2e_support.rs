//! What the end-to-end and fault tests share: a two-node cluster with the example VM,
//! migrations applied as YAML, and checks on where the guest runs and that its memory
//! and counter are intact.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_crds::{MigrationPhase, VirtualMachine, VirtualMachineMigration, VmPhase};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::{Api, Client};

use crate::{Cluster, repo_root};

/// One cluster test at a time in a test binary: each runs a control plane and TCG
/// guests on two cores.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A cluster with agents on node-a and node-b, and an admin client.
pub async fn up() -> (Cluster, Client) {
    let cluster = Cluster::up(&["node-a", "node-b"], None)
        .await
        .unwrap_or_else(|e| panic!("cluster: {e}"));
    let client = cluster.client().await.unwrap();
    (cluster, client)
}

/// Polls `check` every 200 ms until it returns Some, or panics after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The test guest's passes in a serial log: the pass numbers it printed and whether it
/// ever reported a bad page.
pub fn passes(log: &Path) -> (Vec<u64>, bool) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut passes = Vec::new();
    let mut bad = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("pass")
            && let Some(n) = words.next().and_then(|n| n.parse().ok())
        {
            match words.next() {
                Some("ok") => passes.push(n),
                Some("BAD") => bad = true,
                _ => {}
            }
        }
    }
    (passes, bad)
}

pub fn last_pass(cluster: &Cluster, node: &str, vm: &str) -> Option<u64> {
    passes(&cluster.serial_log(node, vm)).0.last().copied()
}

pub async fn apply(cluster: &Cluster, file: &Path) {
    let out = cluster
        .kubectl()
        .arg("apply")
        .arg("-f")
        .arg(file)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn apply_yaml(cluster: &Cluster, yaml: &str) {
    let (ok, said) = cluster.cp.apply(yaml).await;
    assert!(ok, "{said}");
}

/// The mode of the migrations the end-to-end tests create with [`migration_yaml`]:
/// `FERRY_TEST_MODE=PeerToPeer` runs them peer-to-peer (`make test-e2e-p2p`); Managed
/// (the API's default) otherwise.
pub fn test_mode() -> ferry_crds::ControlMode {
    match std::env::var("FERRY_TEST_MODE").as_deref() {
        Ok("PeerToPeer") => ferry_crds::ControlMode::PeerToPeer,
        Ok("Managed") | Err(_) => ferry_crds::ControlMode::Managed,
        Ok(other) => panic!("FERRY_TEST_MODE={other}: expected Managed or PeerToPeer"),
    }
}

/// A migration of the demo VM to `target` with the API's default transport (TLS), in
/// the [`test_mode`].
pub fn migration_yaml(name: &str, target: &str, policy: &str) -> String {
    migration_yaml_in(test_mode(), name, target, policy)
}

/// [`migration_yaml`] driven in `mode` (`spec.mode`; Managed is the API's default, so it
/// is left out then).
pub fn migration_yaml_in(
    mode: ferry_crds::ControlMode,
    name: &str,
    target: &str,
    policy: &str,
) -> String {
    vm_migration_yaml(mode, name, "demo", target, policy)
}

/// [`migration_yaml_in`] of VM `vm`.
pub fn vm_migration_yaml(
    mode: ferry_crds::ControlMode,
    name: &str,
    vm: &str,
    target: &str,
    policy: &str,
) -> String {
    let yaml = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachineMigration\nmetadata:\n  name: {name}\n\
         spec:\n  vmName: {vm}\n  targetNode: {target}\n  policy:\n{policy}"
    );
    match mode {
        ferry_crds::ControlMode::Managed => yaml,
        ferry_crds::ControlMode::PeerToPeer => format!("{yaml}  mode: PeerToPeer\n"),
    }
}

/// [`migration_yaml`] in plain TCP (`transport.tls: false`, explicit).
pub fn plain_migration_yaml(name: &str, target: &str, policy: &str) -> String {
    format!(
        "{}  transport:\n    tls: false\n",
        migration_yaml(name, target, policy)
    )
}

/// [`migration_yaml_in`] tunnelled through the agents (`transport.mode: Tunnelled`, TLS
/// as by default).
pub fn tunnelled_migration_yaml(
    mode: ferry_crds::ControlMode,
    name: &str,
    target: &str,
    policy: &str,
) -> String {
    format!(
        "{}  transport:\n    mode: Tunnelled\n",
        migration_yaml_in(mode, name, target, policy)
    )
}

pub const UNLIMITED: &str = "    maxDowntimeMs: 300\n";
/// Never converges: the guest dirties its 32 MiB faster than 2 MiB/s sends them.
pub const NEVER_ENDING: &str = "    bandwidthMiBps: 2\n";
/// Lasts several seconds, then converges whatever the guest does: the allowed downtime
/// covers sending the whole dirtied region at this bandwidth.
pub const LONG: &str = "    bandwidthMiBps: 8\n    maxDowntimeMs: 10000\n";

/// Applies the example VM and waits until it runs on node-a with the guest counting.
pub async fn example_vm_running(cluster: &Cluster, client: &Client) -> Api<VirtualMachine> {
    example_vm_started(cluster, client)
        .await
        .unwrap_or_else(|why| panic!("{why}"))
}

/// [`example_vm_running`], saying what it waited for in vain instead of panicking (so a
/// caller can keep the logs first).
pub async fn example_vm_started(
    cluster: &Cluster,
    client: &Client,
) -> Result<Api<VirtualMachine>, String> {
    apply(cluster, &repo_root().join("examples/virtualmachine.yaml")).await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let start = Instant::now();
    loop {
        let s = vms.get("demo").await.ok().and_then(|v| v.status);
        if s.as_ref().is_some_and(|s| {
            s.phase == Some(VmPhase::Running) && s.node_name.as_deref() == Some("node-a")
        }) {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "timed out after 60s waiting for the VM to run on node-a: {s:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start = Instant::now();
    while last_pass(cluster, "node-a", "demo").is_none_or(|n| n < 2) {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("timed out after 60s waiting for the guest to count".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(vms)
}

pub async fn phase_of(vmms: &Api<VirtualMachineMigration>, name: &str) -> Option<MigrationPhase> {
    vmms.get(name).await.ok()?.status?.phase
}

pub async fn wait_phase(
    vmms: &Api<VirtualMachineMigration>,
    name: &str,
    want: MigrationPhase,
    limit: Duration,
) {
    eventually(&format!("{name} to reach {want:?}"), limit, || async {
        let p = phase_of(vmms, name).await?;
        if p.is_terminal() && p != want {
            let m = vmms.get(name).await.ok()?;
            panic!("{name} ended {p:?}, not {want:?}: {:#?}", m.status);
        }
        (p == want).then_some(())
    })
    .await;
}

/// Exactly one QEMU runs the demo VM, on `node`, and the VM says so.
pub async fn runs_once_on(cluster: &Cluster, vms: &Api<VirtualMachine>, node: &str) {
    runs_vm_once_on(cluster, vms, "demo", node).await;
}

/// Exactly one QEMU runs VM `vm`, on `node`, and the VM says so.
pub async fn runs_vm_once_on(cluster: &Cluster, vms: &Api<VirtualMachine>, vm: &str, node: &str) {
    let pids = cluster.qemu_pids(vm);
    assert_eq!(
        pids.keys().collect::<Vec<_>>(),
        vec![node],
        "QEMUs of {vm} per node: {pids:?}"
    );
    let status = vms.get(vm).await.unwrap().status.unwrap_or_default();
    assert_eq!(status.node_name.as_deref(), Some(node), "{vm}'s node");
}

/// The first counter value the guest printed on `node` (it arrived there), within
/// `limit`.
pub async fn first_pass_on(cluster: &Cluster, node: &str, limit: Duration) -> u64 {
    eventually(&format!("the guest to print on {node}"), limit, || async {
        passes(&cluster.serial_log(node, "demo")).0.first().copied()
    })
    .await
}

/// Creates migration `name` from `yaml` (one that never converges), cancels it once
/// Perform sends bytes, and checks it ends Cancelled with the guest running on node-a
/// only, its counter going on.
pub async fn cancel_during_perform(
    cluster: &Cluster,
    vms: &Api<VirtualMachine>,
    vmms: &Api<VirtualMachineMigration>,
    name: &str,
    yaml: &str,
) {
    apply_yaml(cluster, yaml).await;
    eventually("Perform to send bytes", Duration::from_secs(60), || async {
        let s = vmms.get(name).await.ok()?.status?;
        (s.phase == Some(MigrationPhase::Perform) && s.progress?.bytes_transferred > 0)
            .then_some(())
    })
    .await;
    vmms.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await
    .unwrap();
    wait_phase(
        vmms,
        name,
        MigrationPhase::Cancelled,
        Duration::from_secs(60),
    )
    .await;
    runs_once_on(cluster, vms, "node-a").await;
    let now = last_pass(cluster, "node-a", "demo").unwrap();
    guest_goes_on(cluster, "node-a", now).await;
}

/// The demo guest goes on counting on `node` past `after`, and never saw a bad page.
pub async fn guest_goes_on(cluster: &Cluster, node: &str, after: u64) {
    vm_goes_on(cluster, node, "demo", after).await;
}

/// Guest `vm` goes on counting on `node` past `after`, and never saw a bad page.
pub async fn vm_goes_on(cluster: &Cluster, node: &str, vm: &str, after: u64) {
    eventually(
        &format!("{vm} to count past {after} on {node}"),
        Duration::from_secs(60),
        || async { (last_pass(cluster, node, vm)? >= after + 2).then_some(()) },
    )
    .await;
    for n in cluster.nodes() {
        let (_, bad) = passes(&cluster.serial_log(&n.name, vm));
        assert!(!bad, "{vm} found a bad page on {}", n.name);
    }
}

/// The resident set of process `pid` in KiB (VmRSS in /proc/<pid>/status).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Starts small test guests `names` on `node`, each with its own disk in the cluster's
/// directory (QEMU locks its image), and waits until each counts.
pub async fn guests_running(
    cluster: &Cluster,
    client: &Client,
    node: &str,
    names: &[&str],
) -> Api<VirtualMachine> {
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let image = ferry_agent::testguest::image(ferry_agent::testguest::Params {
        region_start_mib: 1,
        region_end_mib: 9,
        ..Default::default()
    })
    .expect("the test guest builds");
    for (i, name) in names.iter().enumerate() {
        let disk = cluster.disk("default", &format!("{name}.img"));
        std::fs::write(&disk, &image).unwrap();
        let uuid = format!("6f1c0b8e-5a52-4d3e-9a43-0d6f2a7c{:04x}", 0x1000 + i);
        let vm = crate::bench::ferry::vm(name, &uuid, 64, &disk.display().to_string(), node);
        vms.create(&Default::default(), &vm).await.unwrap();
    }
    for name in names {
        eventually(
            &format!("{name} to run and count on {node}"),
            Duration::from_secs(120),
            || async {
                let s = vms.get(name).await.ok()?.status?;
                (s.phase == Some(VmPhase::Running)
                    && s.node_name.as_deref() == Some(node)
                    && last_pass(cluster, node, name)? >= 1)
                    .then_some(())
            },
        )
        .await;
    }
    vms
}

/// The Events about the object named `name` (any kind, any namespace), as (type,
/// reason, message).
pub async fn events_about(cluster: &Cluster, name: &str) -> Vec<(String, String, String)> {
    let out = cluster
        .kubectl()
        .args(["get", "events", "-A", "-o", "json", "--field-selector"])
        .arg(format!("involvedObject.name={name}"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", crate::printed(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or_default().to_string();
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|e| (text(e, "type"), text(e, "reason"), text(e, "message")))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `kubectl <args>` as the admin and panics unless it succeeds; returns stdout.
pub async fn kubectl_ok(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.kubectl().args(args).output().await.unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        crate::printed(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks the Prepare and Perform step messages say how the stream went: TLS with the
/// peer each end checked (`Some((source, target))`), or plain TCP (`None`).
pub fn assert_stream(steps: &ferry_crds::Steps, tls: Option<(&str, &str)>) {
    for (phase, want) in [
        (
            MigrationPhase::Prepare,
            tls.map(|(source, _)| format!("TLS, peer certificate {source} verified")),
        ),
        (
            MigrationPhase::Perform,
            tls.map(|(_, target)| format!("TLS, peer certificate {target} verified")),
        ),
    ] {
        let want = want.unwrap_or_else(|| "plain TCP".to_string());
        let message = steps
            .get(phase)
            .and_then(|s| s.message.clone())
            .unwrap_or_default();
        assert!(message.contains(&want), "{phase:?}: {message}");
    }
}

/// Checks a succeeded migration reports the guest's downtime, not only QEMU's: the Finish
/// cookie carries the moments the source paused the guest and the target resumed it,
/// `status.downtimeMs` is the time between (at least QEMU's own figure, from the
/// Perform cookie), and the Confirm step says so.
pub fn assert_guest_downtime(status: &ferry_crds::VirtualMachineMigrationStatus) {
    let cookies = status.cookies.clone().unwrap_or_default();
    let finish = cookies.finish.unwrap_or_default();
    let perform = cookies.perform.unwrap_or_default();
    let stopped = cookie_attr(&finish, "stopped-at-ms");
    let resumed = cookie_attr(&finish, "resumed-at-ms");
    let qemu = cookie_attr(&perform, "downtime-ms").expect("Perform cookie has downtime-ms");
    let (Some(stopped), Some(resumed)) = (stopped, resumed) else {
        panic!("Finish cookie lacks stopped-at-ms or resumed-at-ms: {finish}");
    };
    let want = resumed.saturating_sub(stopped).max(qemu);
    assert_eq!(
        status.downtime_ms,
        Some(want as i64),
        "downtimeMs is not paused ({stopped}) → resumed ({resumed}), QEMU said {qemu} ms"
    );
    assert!(want > 0, "a guest handed over through the API paused 0 ms");
    eprintln!("guest downtime {want} ms (QEMU's stop-and-copy {qemu} ms)");
    let confirm = status
        .steps
        .as_ref()
        .and_then(|s| s.get(MigrationPhase::Confirm))
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    assert!(
        confirm.contains(&format!("the guest was paused {want} ms")),
        "Confirm: {confirm}"
    );
}

/// A numeric attribute of a cookie's `<statistics>` element.
fn cookie_attr(cookie: &str, name: &str) -> Option<u64> {
    let at = cookie.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &cookie[at..];
    let quote = rest.chars().next()?;
    rest[1..].split(quote).next()?.parse().ok()
}

/// Checks each node's agent filed a CSR for Ferry's signer that the operator approved
/// and signed.
pub async fn assert_node_certificates_issued(client: &Client, nodes: &[&str]) {
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let all = csrs.list(&Default::default()).await.unwrap().items;
    for node in nodes {
        let prefix = format!("ferry-{node}-");
        let csr = all
            .iter()
            .find(|c| {
                c.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&prefix))
                    && c.status
                        .as_ref()
                        .and_then(|s| s.certificate.as_ref())
                        .is_some_and(|c| !c.0.is_empty())
            })
            .unwrap_or_else(|| panic!("no issued CSR for {node}: {all:?}"));
        assert_eq!(csr.spec.signer_name, ferry_crds::tls::SIGNER_NAME);
        assert_eq!(
            csr.spec.username.as_deref(),
            Some("system:serviceaccount:ferry-system:ferry-agent")
        );
        let approved = csr
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Approved"))
            .unwrap_or_else(|| panic!("{node}'s CSR was not approved"));
        assert_eq!(approved.status, "True");
        assert_eq!(approved.reason.as_deref(), Some("AgentNodeIdentity"));
    }
}

/// A CSR `name` for Ferry's signer asking for a node certificate with subject `CN=<cn>`
/// (and SAN `DNS:<cn>`), with a fresh key.
pub fn node_csr(name: &str, cn: &str) -> CertificateSigningRequest {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![cn.to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "request": k8s_openapi::ByteString(pem.into_bytes()),
            "signerName": ferry_crds::tls::SIGNER_NAME,
            "usages": ferry_crds::tls::USAGES,
        }
    }))
    .expect("a valid CertificateSigningRequest")
}

/// Prints the tail of the agents' and the operator's logs in cluster directory `.0` when
/// the test fails.
pub struct LogsOnFailure(pub std::path::PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["agent-node-a.log", "agent-node-b.log", "operator.log"] {
                let t = std::fs::read_to_string(self.0.join(f)).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                let tail = &lines[lines.len().saturating_sub(30)..];
                eprintln!("==== {f}\n{}", tail.join("\n"));
            }
        }
    }
}

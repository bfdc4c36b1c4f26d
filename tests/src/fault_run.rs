//! What the fault matrices (tests/tests/faults.rs, tests/tests/api_faults.rs) and the
//! chaos soak (tests/tests/soak_chaos.rs) share: stopping a component at a phase point
//! through its test-only hook, waiting for the migration to end, each row's invariants
//! (exactly one guest, intact, and nothing leaked), keeping the logs, and running rows
//! into a table.
//!
//! The hook (`FERRY_FAULT_PAUSE` or `FERRY_FAULT_ARM`, runtime/src/fault.rs) makes the
//! process write `<dir>/<point>.paused` and wait for `<dir>/<point>.release`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_crds::{ControlMode, MigrationPhase, StepOutcome, VirtualMachineMigration, VmPhase};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::ListParams;

use crate::Cluster;
use crate::e2e_support::{ONE_AT_A_TIME, eventually, last_pass, passes};
use crate::e2e_support::{phase_of, runs_vm_once_on, vm_goes_on};
use crate::fault_matrix::{Pauser, Point};
use crate::leaks;

/// The most a migration may take from its creation to a terminal phase under any fault
/// of the matrices (the slowest paths wait out a 5 s heartbeat lease or a phase timeout).
pub const TERMINAL_BOUND: Duration = Duration::from_secs(300);
/// How long a killed component stays down before it is started again.
pub const RESTART_DELAY: Duration = Duration::from_secs(2);
/// How long the hook may take to pause once the migration is created.
const PAUSE_BOUND: Duration = Duration::from_secs(120);

pub const SOURCE: &str = "node-a";
pub const TARGET: &str = "node-b";
pub const MIGRATION: &str = "faulted";
pub const VM: &str = "demo";

/// What a row migrates: the VM, its migration, and the nodes it moves between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    pub vm: &'a str,
    pub migration: &'a str,
    pub source: &'a str,
    pub target: &'a str,
}

impl Subject<'static> {
    /// The matrices' rows: the demo VM from node-a to node-b.
    pub const MATRIX: Subject<'static> = Subject {
        vm: VM,
        migration: MIGRATION,
        source: SOURCE,
        target: TARGET,
    };
}

impl Subject<'_> {
    /// The node of the process that pauses as `who`, or `None` for the operator.
    pub fn node_of(&self, who: Pauser) -> Option<&str> {
        match who {
            Pauser::Source => Some(self.source),
            Pauser::Target => Some(self.target),
            Pauser::Operator => None,
        }
    }
}

/// The directory of the hooks' marker files, in the cluster's directory.
pub struct Hooks {
    pub dir: PathBuf,
}

impl Hooks {
    pub fn new(cluster: &Cluster) -> Hooks {
        let dir = cluster.cp.dir().join("faults");
        std::fs::create_dir_all(&dir).expect("the cluster's directory is writable");
        Hooks { dir }
    }

    /// The directory as the hook's variable takes it.
    pub fn dir_var(&self) -> String {
        self.dir.display().to_string()
    }

    /// Restarts the process that pauses at `point` in `mode` with the hook set; and the
    /// target agent with `FERRY_FAULT_DIR` and `target_env` when it pauses or
    /// `target_env` has anything (a relay to advertise).
    pub fn arm(
        &self,
        cluster: &mut Cluster,
        mode: ControlMode,
        point: Point,
        target_env: &[(&str, &str)],
    ) {
        let dir = self.dir_var();
        let pause = [
            ("FERRY_FAULT_PAUSE", point.hook()),
            ("FERRY_FAULT_DIR", dir.as_str()),
        ];
        let mut target = vec![("FERRY_FAULT_DIR", dir.as_str())];
        target.extend_from_slice(target_env);
        match point.pauser(mode) {
            Pauser::Source => {
                cluster.kill_agent(SOURCE);
                cluster.start_agent_with_env(SOURCE, &pause).unwrap();
            }
            Pauser::Target => target.push(pause[0]),
            Pauser::Operator => {
                cluster.kill_operator();
                cluster.start_operator_with_env(&pause).unwrap();
            }
        }
        if point.pauser(mode) == Pauser::Target || !target_env.is_empty() {
            cluster.kill_agent(TARGET);
            cluster.start_agent_with_env(TARGET, &target).unwrap();
        }
    }

    /// Waits until the hook paused at `point` (within [`PAUSE_BOUND`] of `started`);
    /// says where `migration` stood if it did not.
    pub async fn paused(
        &self,
        vmms: &Api<VirtualMachineMigration>,
        migration: &str,
        point: Point,
        started: Instant,
    ) -> Result<(), String> {
        let paused = self.dir.join(format!("{}.paused", point.hook()));
        while !paused.exists() {
            if started.elapsed() > PAUSE_BOUND {
                let status = vmms.get(migration).await.ok().and_then(|m| m.status);
                return Err(format!(
                    "the hook did not pause at {} within {PAUSE_BOUND:?}: phase {:?}, steps {:?}",
                    point.hook(),
                    status.as_ref().and_then(|s| s.phase),
                    status.and_then(|s| s.steps)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Lets the paused process go on.
    pub fn release(&self, point: Point) {
        std::fs::write(self.dir.join(format!("{}.release", point.hook())), "")
            .expect("the fault directory is writable");
    }
}

/// Polls `migration` until it is terminal or `started` is [`TERMINAL_BOUND`] old.
/// With `restart_exited`, a component whose process ended by itself meanwhile is started
/// again (as Kubernetes would); the names of those restarted are returned.
pub async fn wait_terminal(
    cluster: &mut Cluster,
    vmms: &Api<VirtualMachineMigration>,
    migration: &str,
    started: Instant,
    restart_exited: bool,
) -> (Option<MigrationPhase>, Vec<String>) {
    let mut restarted = Vec::new();
    loop {
        if restart_exited {
            restarted.extend(cluster.restart_exited().unwrap());
        }
        let phase = phase_of(vmms, migration).await;
        if let Some(p) = phase.filter(|p| p.is_terminal()) {
            return (Some(p), restarted);
        }
        if started.elapsed() > TERMINAL_BOUND {
            return (None, restarted);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Panics with where `migration` stands: it was not terminal in time.
pub async fn not_terminal(vmms: &Api<VirtualMachineMigration>, migration: &str) -> ! {
    let status = vmms.get(migration).await.ok().and_then(|m| m.status);
    panic!(
        "{migration} not terminal after {TERMINAL_BOUND:?}: phase {:?}, steps {:?}",
        status.as_ref().and_then(|s| s.phase),
        status.and_then(|s| s.steps)
    );
}

/// Which QEMU a row's fault killed: only then may the guest be gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Killed {
    Nothing,
    SourceQemu,
    TargetQemu,
}

/// The row's invariants, once the migration is terminal in `phase`: VM released, at
/// most one QEMU; exactly one guest on the node the outcome names (counter going on,
/// disk locks held there only, no state on the other node) unless `killed` allows it
/// gone (then the VM is Failed for `lost_reason` and no lock is left); no bad page ever;
/// every phase ran on its node when Succeeded; and nothing leaked ([`leaks`]). The
/// `others` (VM, node) are the cluster's other guests: each still runs there, once,
/// its disk locks held there.
#[allow(clippy::too_many_arguments)] // what a row is, what it must leave, and how it ended
pub async fn check_row(
    cluster: &Cluster,
    client: &kube::Client,
    row: Subject<'_>,
    others: &[(&str, &str)],
    label: &str,
    killed: Killed,
    phase: MigrationPhase,
    lost_reason: &str,
) {
    let Subject {
        vm,
        migration,
        source,
        target,
    } = row;
    let vms: Api<ferry_crds::VirtualMachine> = Api::namespaced(client.clone(), "default");
    eventually("the VM to be released", Duration::from_secs(30), || async {
        let s = vms.get(vm).await.ok()?.status?;
        s.migration.is_none().then_some(())
    })
    .await;
    // A rolled-back target's QEMU may wait for the sweep (two rounds of 5 s).
    let qemus = eventually("at most one QEMU", Duration::from_secs(30), || async {
        let q = cluster.qemu_pids(vm);
        (q.len() <= 1).then_some(q)
    })
    .await;
    // A killed source QEMU leaves a guest only if the guest had arrived whole on the
    // target before the kill (the migration then goes forward).
    let source_guest_died = killed == Killed::SourceQemu && phase != MigrationPhase::Succeeded;
    let guest = qemus.keys().next().cloned();
    match &guest {
        Some(node) => {
            assert!(
                !source_guest_died,
                "{label}: the killed source guest came back on {node} ({phase:?})"
            );
            runs_vm_once_on(cluster, &vms, vm, node).await;
            let expected = if phase == MigrationPhase::Succeeded {
                target
            } else {
                source
            };
            assert_eq!(node, expected, "{phase:?} but the guest runs on {node}");
            eventually("the VM to be Running", Duration::from_secs(30), || async {
                let s = vms.get(vm).await.ok()?.status?;
                (s.phase == Some(VmPhase::Running)).then_some(())
            })
            .await;
            let now = last_pass(cluster, node, vm).unwrap_or(0);
            vm_goes_on(cluster, node, vm, now).await;
        }
        None => {
            assert!(
                killed != Killed::Nothing,
                "{label} left no guest ({phase:?})"
            );
            let why = eventually(
                "the VM to be marked Failed",
                Duration::from_secs(30),
                || async {
                    let s = vms.get(vm).await.ok()?.status?;
                    let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
                    (s.phase == Some(VmPhase::Failed)).then_some(ready.reason)
                },
            )
            .await;
            assert_eq!(why, lost_reason);
        }
    }
    if source_guest_died {
        assert_eq!(phase, MigrationPhase::Failed, "the source guest died");
    }
    for n in cluster.nodes() {
        let (_, bad) = passes(&cluster.serial_log(&n.name, vm));
        assert!(!bad, "the guest found a bad page on {}", n.name);
    }
    // Nothing leaked: the disk locks (a rolled-back lock may take a moment to go), the
    // other Leases, the state dir of the node without the guest, ports, temporary files.
    let leases: Api<Lease> = Api::namespaced(client.clone(), crate::cluster::NAMESPACE);
    let nodes: Vec<&str> = cluster.nodes().map(|n| n.name.as_str()).collect();
    let leaked = until_none_left(Duration::from_secs(30), || async {
        match leases.list(&ListParams::default()).await {
            Ok(list) => {
                let mut guests = vec![(format!("default.{vm}"), guest.as_deref())];
                guests.extend(
                    others
                        .iter()
                        .map(|(v, n)| (format!("default.{v}"), Some(*n))),
                );
                leaks::leases(&nodes, &list.items, &guests)
            }
            Err(e) => vec![format!("listing the Leases: {e}")],
        }
    })
    .await;
    assert!(leaked.is_empty(), "Leases leaked: {leaked:?}");
    // The node the VM names keeps its state dir: the running guest's, or a dead one's
    // record (its serial log) while the VM stays Failed there.
    let home = match &guest {
        Some(node) => Some(node.clone()),
        None => vms.get(vm).await.ok().and_then(|v| v.status?.node_name),
    };
    for n in cluster.nodes() {
        if home.as_deref() != Some(n.name.as_str()) {
            let dirs = crate::cluster::guest_dirs(&n.state_dir, vm);
            assert!(dirs.is_empty(), "state left on {}: {dirs:?}", n.name);
        }
    }
    let ports = until_none_left(Duration::from_secs(15), || async {
        leaks::migration_listeners(cluster)
    })
    .await;
    assert!(
        ports.is_empty(),
        "migration ports still listening: {ports:?}"
    );
    let temporary = leaks::temporary_files(cluster);
    assert!(temporary.is_empty(), "temporary files left: {temporary:?}");
    for (other, node) in others {
        runs_vm_once_on(cluster, &vms, other, node).await;
        let (_, bad) = passes(&cluster.serial_log(node, other));
        assert!(!bad, "{other} found a bad page on {node}");
    }

    if phase == MigrationPhase::Succeeded {
        // Every phase ran, each on its node, whoever drove them.
        let m = Api::<VirtualMachineMigration>::namespaced(client.clone(), "default")
            .get(migration)
            .await
            .unwrap();
        let steps = m.status.and_then(|s| s.steps).unwrap_or_default();
        for p in [
            MigrationPhase::Begin,
            MigrationPhase::Prepare,
            MigrationPhase::Perform,
            MigrationPhase::Finish,
            MigrationPhase::Confirm,
        ] {
            let step = steps.get(p).unwrap_or_else(|| panic!("no {p:?} step"));
            let node = if p.runs_on_source() { source } else { target };
            assert_eq!(step.node, node, "{p:?} ran on {}", step.node);
        }
        assert_eq!(
            steps.confirm.and_then(|c| c.outcome),
            Some(StepOutcome::Succeeded)
        );
    }
}

/// Polls `find` every 200 ms until it finds nothing or `limit` passed; what it found
/// last.
async fn until_none_left<F, Fut>(limit: Duration, mut find: F) -> Vec<String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Vec<String>>,
{
    let start = Instant::now();
    loop {
        let found = find().await;
        if found.is_empty() || start.elapsed() > limit {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Copies the cluster's component logs (`*.log` of its directory) to `<root>/<name>`.
pub fn keep_logs(cluster: &Cluster, root: &Path, name: &str) {
    let to = root.join(name);
    let _ = std::fs::create_dir_all(&to);
    for entry in std::fs::read_dir(cluster.cp.dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let _ = std::fs::copy(&path, to.join(entry.file_name()));
        }
    }
}

/// Keeps the cluster's logs as [`keep_logs`] when dropped, a failed check's unwinding
/// included.
pub struct KeepLogsOnDrop<'a> {
    pub cluster: &'a Cluster,
    pub root: PathBuf,
    pub name: String,
}

impl Drop for KeepLogsOnDrop<'_> {
    fn drop(&mut self) {
        keep_logs(self.cluster, &self.root, &self.name);
    }
}

/// A matrix row as the runner names it.
pub trait RowLabel: Copy + Send + 'static {
    /// The row's name (as `FERRY_FAULT_ROWS` or `FERRY_API_FAULT_ROWS` take it).
    fn name(&self) -> String;
    /// The row's table line when it broke an invariant.
    fn failed_line(&self, why: &str) -> String;
}

/// Runs `rows` one after another (each on its own cluster, through `run`, which returns
/// the row's table line or panics with the broken invariant), prints the table under
/// `header`, and fails if any row failed.
pub async fn matrix<R, F, Fut>(header: &str, rows: &[R], run: F)
where
    R: RowLabel,
    F: Fn(R) -> Fut,
    Fut: Future<Output = String> + Send + 'static,
{
    let _one = ONE_AT_A_TIME.lock().await;
    let begun = Instant::now();
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for &row in rows {
        let line = match tokio::spawn(run(row)).await {
            Ok(line) => line,
            Err(e) => {
                let why = panic_message(e);
                failures.push(format!("{}: {why}", row.name()));
                row.failed_line(&why)
            }
        };
        eprintln!("{line}");
        lines.push(line);
    }
    println!("\n{header}");
    for l in &lines {
        println!("{l}");
    }
    println!(
        "{} rows in {:.0} s ({} failed); bound on time to terminal: {} s\n",
        rows.len(),
        begun.elapsed().as_secs_f64(),
        failures.len(),
        TERMINAL_BOUND.as_secs()
    );
    assert!(failures.is_empty(), "rows failed:\n{}", failures.join("\n"));
}

/// The first line of a panicked row's message, at most 300 characters.
pub fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect(),
        Err(e) => e.to_string(),
    }
}

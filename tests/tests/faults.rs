//! The fault matrix: a real fault (a kill, restarted after a short delay the way
//! Kubernetes would; a killed QEMU; a cut migration stream) at every phase boundary of a
//! migration, on the real control plane with real QEMU. The processes stop at the exact
//! point through their test-only fault hook (`FERRY_FAULT_PAUSE`, agent/src/fault.rs and
//! operator/src/fault.rs); the fault itself is real.
//!
//! Every row must end with the migration terminal within [`TERMINAL_BOUND`], VM
//! `status.migration` cleared, no stray QEMU, no disk-lock Lease held by a node without
//! the guest, and either exactly one running guest (on the node its VM names, memory and
//! counter intact) or — only when the fault killed the QEMU that held the guest — the VM
//! marked Failed with reason GuestDied and no QEMU at all.
//!
//! Each row runs in a control mode: `Managed` (the operator drives the phases and pauses
//! between them) or `PeerToPeer` (the source agent drives them, calling the target
//! agent's peer API, and pauses between them). The rows and who pauses where are in
//! ferry_tests::fault_matrix.
//!
//! `make test` runs [`SUBSET`] (managed: one row per fault and one per point; peer-to-
//! peer: one or two rows per fault); `make test-faults` runs all 54 rows in each mode
//! (108). `FERRY_FAULT_ROWS=[PeerToPeer/]<fault>:<point>,...` picks rows instead of the
//! subset. Both run the post-copy row: the stream cut after
//! the switch to post-copy, kept down, then restored — the migration must wait and be
//! recovered, never rolled back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_crds::{
    ControlMode, MigrationMode, MigrationPhase, StepOutcome, VirtualMachineMigration, VmPhase,
};
use ferry_tests::Cluster;
use ferry_tests::e2e_support::*;
use ferry_tests::fault_matrix::*;
use ferry_tests::relay::Relay;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::ListParams;

/// The most a migration may take from its creation to a terminal phase under any fault
/// here (the slowest paths wait out a 5 s heartbeat lease or a phase timeout).
const TERMINAL_BOUND: Duration = Duration::from_secs(300);
/// How long a killed component stays down before it is started again.
const RESTART_DELAY: Duration = Duration::from_secs(2);

const SOURCE: &str = "node-a";
const TARGET: &str = "node-b";
const MIGRATION: &str = "faulted";

/// Runs one row on a fresh cluster; panics (with the reason) when an invariant breaks.
async fn run_row(spec: RowSpec) -> Row {
    let (mode, fault, point) = spec;
    let (mut cluster, client) = up().await;
    let vms = match example_vm_started(&cluster, &client).await {
        Ok(vms) => vms,
        Err(why) => {
            keep_logs(&cluster, spec);
            panic!("before the fault: {why}");
        }
    };
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let dir = cluster.cp.dir().join("faults");
    std::fs::create_dir_all(&dir).unwrap();
    let dir_s = dir.display().to_string();
    let relay = Relay::start("127.0.0.9", dir.clone()).await.unwrap();
    let relay_addr = relay.addr.to_string();

    // The process that pauses, and the target agent when it must advertise the relay,
    // start again with the hook set.
    let mut target_env = vec![("FERRY_FAULT_DIR", dir_s.as_str())];
    if fault == Fault::CutStream {
        target_env.push(("FERRY_FAULT_ADVERTISE", relay_addr.as_str()));
    }
    let pause = [
        ("FERRY_FAULT_PAUSE", point.hook()),
        ("FERRY_FAULT_DIR", dir_s.as_str()),
    ];
    match point.pauser(mode) {
        Pauser::Source => {
            cluster.kill_agent(SOURCE);
            cluster.start_agent_with_env(SOURCE, &pause).unwrap();
        }
        Pauser::Target => target_env.push(pause[0]),
        Pauser::Operator => {
            cluster.kill_operator();
            cluster.start_operator_with_env(&pause).unwrap();
        }
    }
    if point.pauser(mode) == Pauser::Target || fault == Fault::CutStream {
        cluster.kill_agent(TARGET);
        cluster.start_agent_with_env(TARGET, &target_env).unwrap();
    }

    let started = Instant::now();
    apply_yaml(&cluster, &migration_yaml_in(mode, MIGRATION, TARGET, LONG)).await;
    let paused = dir.join(format!("{}.paused", point.hook()));
    while !paused.exists() {
        if started.elapsed() > Duration::from_secs(120) {
            keep_logs(&cluster, spec);
            let status = vmms.get(MIGRATION).await.ok().and_then(|m| m.status);
            panic!(
                "the hook did not pause at {} within 120 s: phase {:?}, steps {:?}",
                point.hook(),
                status.as_ref().and_then(|s| s.phase),
                status.and_then(|s| s.steps)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Once Perform is under way the stream must go through the relay, or cutting it
    // would prove nothing.
    if fault == Fault::CutStream
        && matches!(
            point,
            Point::PerformLate | Point::DuringFinish | Point::AfterFinish | Point::DuringConfirm
        )
    {
        assert!(relay.accepted() > 0, "the stream bypassed the relay");
    }
    inject(&mut cluster, fault, &relay).await;
    std::fs::write(dir.join(format!("{}.release", point.hook())), "").unwrap();

    // The logs are kept whether or not the migration ends in time.
    let phase = loop {
        let phase = phase_of(&vmms, MIGRATION).await;
        if let Some(p) = phase.filter(|p| p.is_terminal()) {
            break Some(p);
        }
        if started.elapsed() > TERMINAL_BOUND {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let to_terminal = started.elapsed();
    keep_logs(&cluster, spec);
    let Some(phase) = phase else {
        let status = vmms.get(MIGRATION).await.ok().and_then(|m| m.status);
        panic!(
            "not terminal after {TERMINAL_BOUND:?}: phase {:?}, steps {:?}",
            status.as_ref().and_then(|s| s.phase),
            status.and_then(|s| s.steps)
        );
    };
    check_row(&cluster, &client, spec, phase).await;
    let qemus = cluster.qemu_pids("demo");
    let guest = qemus
        .keys()
        .next()
        .cloned()
        .unwrap_or_else(|| "died (VM Failed)".into());
    let _ = vms;
    Row {
        spec,
        phase,
        guest,
        qemus: qemus.len(),
        to_terminal,
    }
}

/// The fault itself, while the hook holds the process at the point.
async fn inject(cluster: &mut Cluster, fault: Fault, relay: &Relay) {
    let restart = |cluster: &mut Cluster, who: Pauser| match who {
        Pauser::Source => cluster.start_agent(SOURCE).unwrap(),
        Pauser::Target => cluster.start_agent(TARGET).unwrap(),
        Pauser::Operator => cluster.start_operator().unwrap(),
    };
    let kill = |cluster: &mut Cluster, who: Pauser| match who {
        Pauser::Source => cluster.kill_agent(SOURCE),
        Pauser::Target => cluster.kill_agent(TARGET),
        Pauser::Operator => cluster.kill_operator(),
    };
    let component = match fault {
        Fault::KillSourceAgent => Some(Pauser::Source),
        Fault::KillTargetAgent => Some(Pauser::Target),
        Fault::KillOperator => Some(Pauser::Operator),
        _ => None,
    };
    if let Some(who) = component {
        kill(cluster, who);
        tokio::time::sleep(RESTART_DELAY).await;
        // A restarted process runs without the hook, as it would in production; the
        // process that paused, if it was not the one killed, is released afterwards.
        restart(cluster, who);
        return;
    }
    match fault {
        Fault::KillSourceQemu | Fault::KillTargetQemu => {
            let node = if fault == Fault::KillSourceQemu {
                SOURCE
            } else {
                TARGET
            };
            if let Some(pid) = cluster.qemu_pids("demo").get(node) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        Fault::CutStream => relay.cut(),
        _ => unreachable!(),
    }
}

/// The row's invariants.
async fn check_row(cluster: &Cluster, client: &kube::Client, spec: RowSpec, phase: MigrationPhase) {
    check_row_lost_as(cluster, client, spec, phase, "GuestDied").await
}

/// [`check_row`], where a guest no QEMU runs any more is marked Failed for `reason`.
async fn check_row_lost_as(
    cluster: &Cluster,
    client: &kube::Client,
    spec: RowSpec,
    phase: MigrationPhase,
    reason: &str,
) {
    let (mode, fault, point) = spec;
    let vms: Api<ferry_crds::VirtualMachine> = Api::namespaced(client.clone(), "default");
    eventually("the VM to be released", Duration::from_secs(30), || async {
        let s = vms.get("demo").await.ok()?.status?;
        s.migration.is_none().then_some(())
    })
    .await;
    // A rolled-back target's QEMU may wait for the sweep (two rounds of 5 s).
    let qemus = eventually("at most one QEMU", Duration::from_secs(30), || async {
        let q = cluster.qemu_pids("demo");
        (q.len() <= 1).then_some(q)
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ferry-system");
    let holders = || async {
        leases
            .list(&ListParams::default().labels("ferry.dev/vm=default.demo"))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|l| l.spec?.holder_identity)
            .collect::<Vec<_>>()
    };
    // A killed source QEMU leaves a guest only if the guest had arrived whole on the
    // target before the kill (the migration then goes forward).
    let source_guest_died = fault == Fault::KillSourceQemu && phase != MigrationPhase::Succeeded;
    match qemus.keys().next() {
        Some(node) => {
            assert!(
                !source_guest_died,
                "{mode:?} {fault:?} at {point:?}: the killed source guest came back on {node} ({phase:?})"
            );
            runs_once_on(cluster, &vms, node).await;
            let expected = if phase == MigrationPhase::Succeeded {
                TARGET
            } else {
                SOURCE
            };
            assert_eq!(node, expected, "{phase:?} but the guest runs on {node}");
            eventually("the VM to be Running", Duration::from_secs(30), || async {
                let s = vms.get("demo").await.ok()?.status?;
                (s.phase == Some(VmPhase::Running)).then_some(())
            })
            .await;
            let now = last_pass(cluster, node, "demo").unwrap_or(0);
            guest_goes_on(cluster, node, now).await;
            let held = holders().await;
            assert!(
                held.iter().all(|h| h == node),
                "disk locks held by {held:?}, the guest runs on {node}"
            );
            let other = if node == SOURCE { TARGET } else { SOURCE };
            let leftover = vm_dir(cluster, other);
            assert!(!leftover.exists(), "state left on {other}: {leftover:?}");
        }
        None => {
            assert!(
                matches!(fault, Fault::KillSourceQemu | Fault::KillTargetQemu),
                "{mode:?} {fault:?} at {point:?} left no guest"
            );
            let why = eventually(
                "the VM to be marked Failed",
                Duration::from_secs(30),
                || async {
                    let s = vms.get("demo").await.ok()?.status?;
                    let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
                    (s.phase == Some(VmPhase::Failed)).then_some(ready.reason)
                },
            )
            .await;
            assert_eq!(why, reason);
            let held = eventually("the disk locks to go", Duration::from_secs(30), || async {
                let held = holders().await;
                held.is_empty().then_some(held)
            })
            .await;
            assert!(held.is_empty());
        }
    }
    if source_guest_died {
        assert_eq!(phase, MigrationPhase::Failed, "the source guest died");
    }
    for n in cluster.nodes() {
        let (_, bad) = passes(&cluster.serial_log(&n.name, "demo"));
        assert!(!bad, "the guest found a bad page on {}", n.name);
    }
    let m = Api::<VirtualMachineMigration>::namespaced(client.clone(), "default")
        .get(MIGRATION)
        .await
        .unwrap();
    if phase == MigrationPhase::Succeeded {
        // Every phase ran, each on its node, whoever drove them.
        let steps = m.status.and_then(|s| s.steps).unwrap_or_default();
        for p in [
            MigrationPhase::Begin,
            MigrationPhase::Prepare,
            MigrationPhase::Perform,
            MigrationPhase::Finish,
            MigrationPhase::Confirm,
        ] {
            let step = steps.get(p).unwrap_or_else(|| panic!("no {p:?} step"));
            let node = if p.runs_on_source() { SOURCE } else { TARGET };
            assert_eq!(step.node, node, "{p:?} ran on {}", step.node);
        }
        assert_eq!(
            steps.confirm.and_then(|c| c.outcome),
            Some(StepOutcome::Succeeded)
        );
    }
}

/// Copies the row's component logs to `$CARGO_TARGET_TMPDIR/fault-logs/<fault>-<point>`
/// (managed) or `.../PeerToPeer-<fault>-<point>` (the cluster's own directory goes with
/// it).
fn keep_logs(cluster: &Cluster, (mode, fault, point): RowSpec) {
    let prefix = match mode {
        ControlMode::Managed => String::new(),
        ControlMode::PeerToPeer => "PeerToPeer-".into(),
    };
    keep_logs_named(cluster, &format!("{prefix}{fault:?}-{}", point.hook()));
}

/// Keeps the cluster's logs as [`keep_logs_named`] when dropped, a failed check's
/// unwinding included.
struct KeepLogsOnDrop<'a>(&'a Cluster, &'static str);

impl Drop for KeepLogsOnDrop<'_> {
    fn drop(&mut self) {
        keep_logs_named(self.0, self.1);
    }
}

fn keep_logs_named(cluster: &Cluster, name: &str) {
    let to = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("fault-logs")
        .join(name);
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

fn vm_dir(cluster: &Cluster, node: &str) -> PathBuf {
    cluster.node(node).state_dir.join("vms").join("demo")
}

/// Runs `rows` one after another (each on its own cluster), prints the table, and fails
/// if any row broke an invariant.
async fn matrix(rows: &[RowSpec]) {
    let _one = ONE_AT_A_TIME.lock().await;
    let begun = Instant::now();
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for &spec in rows {
        let outcome = tokio::spawn(run_row(spec)).await;
        let line = match outcome {
            Ok(r) => table_line(&r),
            Err(e) => {
                let why = panic_message(e);
                failures.push(format!("{}: {why}", row_name(spec)));
                failed_line(spec, &why)
            }
        };
        eprintln!("{line}");
        lines.push(line);
    }
    println!("\n{TABLE_HEADER}");
    for l in &lines {
        println!("{l}");
    }
    println!(
        "{} rows in {:.0} s; bound on time to terminal: {} s\n",
        rows.len(),
        begun.elapsed().as_secs_f64(),
        TERMINAL_BOUND.as_secs()
    );
    assert!(failures.is_empty(), "rows failed:\n{}", failures.join("\n"));
}

fn panic_message(e: tokio::task::JoinError) -> String {
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

/// How long a post-copy migration whose stream was cut may take to end Succeeded once
/// the path is back: the source retries its resume every 2 s, the target listens again
/// within 0.5 s of the pause, and the rest of the memory follows at the policy's 2 MiB/s.
const RECOVERY_BOUND: Duration = Duration::from_secs(90);

/// Post-copy after 2 s, at 2 MiB/s before and after the switch: the post-copy phase
/// lasts long enough (the guest dirties 32 MiB) to cut it.
const SLOW_POST_COPY: &str =
    "    bandwidthMiBps: 2\n    postCopy:\n      mode: AfterSeconds\n      afterSeconds: 2\n";

/// The stream is cut while the migration is in post-copy: the guest's memory is split
/// between the nodes, so nothing may roll back. Both QEMUs pause and stay; the migration
/// waits (not terminal, condition PostCopyPaused); once the path is back the agents
/// recover it and it ends Succeeded within [`RECOVERY_BOUND`], with one guest on the
/// target whose counter goes on and which never saw a bad page.
#[tokio::test]
async fn a_cut_post_copy_stream_is_recovered_when_the_path_is_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let dir = cluster.cp.dir().join("faults");
    std::fs::create_dir_all(&dir).unwrap();
    let mut relay = Relay::start("127.0.0.9", dir.clone()).await.unwrap();
    let relay_addr = relay.addr.to_string();
    cluster.kill_agent(TARGET);
    cluster
        .start_agent_with_env(
            TARGET,
            &[
                ("FERRY_FAULT_DIR", dir.display().to_string().as_str()),
                ("FERRY_FAULT_ADVERTISE", relay_addr.as_str()),
            ],
        )
        .unwrap();
    let before = last_pass(&cluster, SOURCE, "demo").unwrap_or(0);
    let name = "post-copy-cut";
    apply_yaml(&cluster, &migration_yaml(name, TARGET, SLOW_POST_COPY)).await;
    let status = || async { vmms.get(name).await.ok()?.status };
    let mode = || async { status().await?.progress?.mode };
    eventually(
        "the switch to post-copy",
        Duration::from_secs(120),
        || async { (mode().await? == MigrationMode::PostCopy).then_some(()) },
    )
    .await;
    relay.cut();
    eventually(
        "the source to report the pause",
        Duration::from_secs(30),
        || async { (mode().await? == MigrationMode::PostCopyPaused).then_some(()) },
    )
    .await;
    eventually(
        "the target to listen again",
        Duration::from_secs(30),
        || async { status().await?.recovery_uri },
    )
    .await;
    // The path stays down a while: nothing rolls back, nothing ends, both QEMUs stay.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = status().await.unwrap();
    assert_eq!(s.phase, Some(MigrationPhase::Perform), "{s:#?}");
    assert!(!s.cancelled, "a paused post-copy must not roll back");
    assert_eq!(
        s.progress.and_then(|p| p.mode),
        Some(MigrationMode::PostCopyPaused)
    );
    let paused = s.conditions.iter().find(|c| c.type_ == "PostCopyPaused");
    assert_eq!(
        paused.map(|c| c.status.as_str()),
        Some("True"),
        "{:?}",
        s.conditions
    );
    let qemus = cluster.qemu_pids("demo");
    assert_eq!(qemus.len(), 2, "both QEMUs live while paused: {qemus:?}");

    // The path comes back.
    relay.reopen().await.unwrap();
    let back = Instant::now();
    wait_phase(&vmms, name, MigrationPhase::Succeeded, RECOVERY_BOUND).await;
    let recovered_in = back.elapsed();
    runs_once_on(&cluster, &vms, TARGET).await;
    guest_goes_on(&cluster, TARGET, before).await;
    let s = status().await.unwrap();
    let paused = s.conditions.iter().find(|c| c.type_ == "PostCopyPaused");
    assert_eq!(
        paused.map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("False", "Recovered")),
        "{:?}",
        s.conditions
    );
    println!(
        "post-copy cut and recovered: Succeeded {:.1} s after the path came back (bound {} s)",
        recovered_in.as_secs_f64(),
        RECOVERY_BOUND.as_secs()
    );
    keep_logs_named(&cluster, "post-copy-cut");
}

/// How long a post-copy migration whose target QEMU died may take to end: the target
/// agent looks at its QEMU every 0.5 s, then the source's Perform fails and the rollback
/// runs Finish and Confirm.
const LOST_BOUND: Duration = Duration::from_secs(60);

/// The target's QEMU dies after the switch to post-copy. It held the guest's state since
/// the switch and QEMU cannot resume the guest on the source, so the guest is lost: no
/// recovery can help, and nothing may wait for one. The target agent says so
/// (`status.targetLost`), the source's Perform fails, and the rollback removes the
/// source's QEMU: the migration ends Failed within [`LOST_BOUND`], the VM is marked
/// Failed (GuestLost), and no QEMU, state dir or disk lock is left (the matrix's row
/// checks).
#[tokio::test]
async fn a_target_qemu_killed_in_post_copy_ends_failed_and_reports_the_guest_lost() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(&cluster, &migration_yaml(MIGRATION, TARGET, SLOW_POST_COPY)).await;
    let status = || async { vmms.get(MIGRATION).await.ok()?.status };
    eventually(
        "the switch to post-copy",
        Duration::from_secs(120),
        || async { (status().await?.progress?.mode? == MigrationMode::PostCopy).then_some(()) },
    )
    .await;
    let pid = cluster.qemu_pids("demo")[TARGET];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    // The components' logs are kept whatever the checks below find.
    let _keep = KeepLogsOnDrop(&cluster, "post-copy-target-lost");
    wait_phase(&vmms, MIGRATION, MigrationPhase::Failed, LOST_BOUND).await;
    let ended_in = killed.elapsed();
    let s = status().await.unwrap();
    let lost = s.target_lost.clone().unwrap_or_default();
    assert!(
        lost.contains("gone after the switch to post-copy"),
        "{s:#?}"
    );
    let confirm = s.steps.as_ref().and_then(|st| st.confirm.clone());
    let confirm = confirm.and_then(|c| c.message).unwrap_or_default();
    assert!(confirm.contains("the guest is lost"), "Confirm: {confirm}");
    let spec = (test_mode(), Fault::KillTargetQemu, Point::PerformLate);
    check_row_lost_as(&cluster, &client, spec, MigrationPhase::Failed, "GuestLost").await;
    for node in [SOURCE, TARGET] {
        let dir = vm_dir(&cluster, node);
        assert!(!dir.exists(), "state left on {node}: {dir:?}");
    }
    println!(
        "post-copy target QEMU killed: Failed {:.1} s later (bound {} s), the VM marked Failed",
        ended_in.as_secs_f64(),
        LOST_BOUND.as_secs()
    );
}

#[tokio::test]
async fn fault_matrix_subset() {
    // FERRY_FAULT_ROWS=[PeerToPeer/]<fault>:<point>,... picks rows of the full matrices
    // instead.
    if let Ok(pick) = std::env::var("FERRY_FAULT_ROWS") {
        let rows = picked(&pick);
        assert!(!rows.is_empty(), "FERRY_FAULT_ROWS={pick} names no row");
        return matrix(&rows).await;
    }
    matrix(&SUBSET).await;
}

/// All 54 rows in managed mode (`make test-faults`).
#[tokio::test]
#[ignore = "54 rows on fresh clusters; `make test-faults` runs it"]
async fn fault_matrix_full_managed() {
    matrix(&all_rows(ControlMode::Managed)).await;
}

/// All 54 rows in peer-to-peer mode (`make test-faults`).
#[tokio::test]
#[ignore = "54 rows on fresh clusters; `make test-faults` runs it"]
async fn fault_matrix_full_peer_to_peer() {
    matrix(&all_rows(ControlMode::PeerToPeer)).await;
}

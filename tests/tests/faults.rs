//! The fault matrix: a real fault (a kill, restarted after a short delay the way
//! Kubernetes would; a killed QEMU; a cut migration stream) at every phase boundary of a
//! migration, on the real control plane with real QEMU. The processes stop at the exact
//! point through their test-only fault hook (`FERRY_FAULT_PAUSE`, runtime/src/fault.rs);
//! the fault itself is real.
//!
//! Every row must end with the migration terminal within
//! [`fault_run::TERMINAL_BOUND`], VM `status.migration` cleared, no stray QEMU, and
//! either exactly one running guest (on the node its VM names, memory and counter
//! intact) or — only when the fault killed the QEMU that held the guest — the VM marked
//! Failed with reason GuestDied and no QEMU at all; and nothing leaked: no Lease but the
//! heartbeats, the leader's and the guest's node's disk locks, no state dir on the node
//! without the guest, no migration port listening, no temporary file
//! (ferry_tests::fault_run::check_row, shared with tests/tests/api_faults.rs).
//!
//! Each row runs in a control mode: `Managed` (the operator drives the phases and pauses
//! between them) or `PeerToPeer` (the source agent drives them, calling the target
//! agent's peer API, and pauses between them). The rows and who pauses where are in
//! ferry_tests::fault_matrix.
//!
//! `make test` runs [`SUBSET`] (managed: one row per fault and one per point; peer-to-
//! peer: one or two rows per fault); `make test-faults` runs all 60 rows in each mode
//! (108). `FERRY_FAULT_ROWS=[PeerToPeer/]<fault>:<point>,...` picks rows instead of the
//! subset. Both run the post-copy row: the stream cut after
//! the switch to post-copy, kept down, then restored — the migration must wait and be
//! recovered, never rolled back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_crds::{ControlMode, MigrationMode, MigrationPhase, VirtualMachineMigration};
use ferry_tests::Cluster;
use ferry_tests::e2e_support::*;
use ferry_tests::fault_matrix::*;
use ferry_tests::fault_run::{self, Hooks, KeepLogsOnDrop, Killed, Subject};
use ferry_tests::fault_run::{MIGRATION, SOURCE, TARGET, check_row, wait_terminal};
use ferry_tests::inject;
use ferry_tests::relay::Relay;
use kube::Api;

/// Runs one row on a fresh cluster and returns its table line; panics (with the reason)
/// when an invariant breaks.
async fn run_row(spec: RowSpec, tunnelled: bool) -> String {
    let (mode, fault, point) = spec;
    let (mut cluster, client) = up().await;
    if let Err(why) = example_vm_started(&cluster, &client).await {
        keep_logs(&cluster, spec, tunnelled);
        panic!("before the fault: {why}");
    }
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let hooks = Hooks::new(&cluster);
    let relay = Relay::start("127.0.0.9", hooks.dir.clone()).await.unwrap();
    let relay_addr = relay.addr.to_string();

    // The process that pauses, and the target agent when it must advertise the relay,
    // start again with the hook set.
    let advertise = [("FERRY_FAULT_ADVERTISE", relay_addr.as_str())];
    let target_env: &[(&str, &str)] = if fault == Fault::CutStream {
        &advertise
    } else {
        &[]
    };
    hooks.arm(&mut cluster, mode, point, target_env);

    let started = Instant::now();
    let yaml = if tunnelled {
        tunnelled_migration_yaml(mode, MIGRATION, TARGET, LONG)
    } else {
        migration_yaml_in(mode, MIGRATION, TARGET, LONG)
    };
    apply_yaml(&cluster, &yaml).await;
    if let Err(why) = hooks.paused(&vmms, MIGRATION, point, started).await {
        keep_logs(&cluster, spec, tunnelled);
        panic!("{why}");
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
    inject::process_fault(&mut cluster, Subject::MATRIX, fault, &relay).await;
    hooks.release(point);

    // The logs are kept whether or not the migration ends in time.
    let (phase, _) = wait_terminal(&mut cluster, &vmms, MIGRATION, started, false).await;
    let to_terminal = started.elapsed();
    keep_logs(&cluster, spec, tunnelled);
    let Some(phase) = phase else {
        fault_run::not_terminal(&vmms, MIGRATION).await
    };
    let killed = match fault {
        Fault::KillSourceQemu => Killed::SourceQemu,
        Fault::KillTargetQemu => Killed::TargetQemu,
        _ => Killed::Nothing,
    };
    // The logs again once the checks are done (or failed): what happened after the end.
    let keep = KeepLogsOnDrop {
        cluster: &cluster,
        root: logs_root(),
        name: log_name(spec, tunnelled),
    };
    check_row(
        &cluster,
        &client,
        Subject::MATRIX,
        &[],
        &row_name(spec),
        killed,
        phase,
        "GuestDied",
    )
    .await;
    drop(keep);
    let qemus = cluster.qemu_pids("demo");
    let guest = qemus
        .keys()
        .next()
        .cloned()
        .unwrap_or_else(|| "died (VM Failed)".into());
    table_line(&Row {
        spec,
        tunnelled,
        phase,
        guest,
        qemus: qemus.len(),
        to_terminal,
    })
}

/// Where the rows' component logs go: `$CARGO_TARGET_TMPDIR/fault-logs`.
fn logs_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-logs")
}

/// Copies the row's component logs to `<logs_root>/<fault>-<point>` (managed) or
/// `.../PeerToPeer-<fault>-<point>`.
fn keep_logs(cluster: &Cluster, spec: RowSpec, tunnelled: bool) {
    fault_run::keep_logs(cluster, &logs_root(), &log_name(spec, tunnelled));
}

fn log_name((mode, fault, point): RowSpec, tunnelled: bool) -> String {
    let prefix = match mode {
        ControlMode::Managed => String::new(),
        ControlMode::PeerToPeer => "PeerToPeer-".into(),
    };
    let transport = if tunnelled { "Tunnelled-" } else { "" };
    format!("{transport}{prefix}{fault:?}-{}", point.hook())
}

fn vm_dir(cluster: &Cluster, node: &str) -> PathBuf {
    cluster.guest_dir(node, "demo")
}

/// Runs `rows` one after another (each on its own cluster), prints the table, and fails
/// if any row broke an invariant. `FERRY_FAULT_TRANSPORT=Tunnelled` runs them with the
/// stream tunnelled through the agents (`make test-faults-tunnelled`).
async fn matrix(rows: &[RowSpec]) {
    match std::env::var("FERRY_FAULT_TRANSPORT").as_deref() {
        Ok("Tunnelled") => tunnelled_matrix(rows).await,
        Ok("Direct") | Err(_) => {
            fault_run::matrix(TABLE_HEADER, rows, |spec| run_row(spec, false)).await
        }
        Ok(other) => panic!("FERRY_FAULT_TRANSPORT={other}: expected Direct or Tunnelled"),
    }
}

/// [`matrix`] with the stream tunnelled through the agents.
async fn tunnelled_matrix(rows: &[RowSpec]) {
    let rows: Vec<Tunnelled> = rows.iter().copied().map(Tunnelled).collect();
    fault_run::matrix(TABLE_HEADER, &rows, |t| run_row(t.0, true)).await;
}

/// How long a post-copy migration whose stream was cut may take to end Succeeded once
/// the path is back: the source retries its resume every 2 s, the target listens again
/// within 0.5 s of the pause, and the rest of the memory follows at the policy's 2 MiB/s.
const RECOVERY_BOUND: Duration = Duration::from_secs(90);

/// Post-copy after 2 s, at 2 MiB/s before and after the switch: the post-copy phase
/// lasts long enough (the guest dirties 32 MiB) to cut it.
const SLOW_POST_COPY: &str =
    "    bandwidthMiBps: 2\n    postCopy:\n      mode: AfterSeconds\n      afterSeconds: 2\n";

/// The stream is cut while the migration is in post-copy: Perform ended at the switch,
/// and the guest runs on the target (it owns the VM since Finish) while its last pages
/// follow. Its memory is split between the nodes, so nothing may roll back. Both QEMUs
/// pause and stay; the migration waits in Confirm (not terminal, condition
/// PostCopyPaused); once the path is back the agents recover it and it ends Succeeded
/// within [`RECOVERY_BOUND`], with one guest on the target whose counter goes on and
/// which never saw a bad page, and a guest downtime of the switch alone.
#[tokio::test]
async fn a_cut_post_copy_stream_is_recovered_when_the_path_is_back() {
    post_copy_cut_is_recovered(false).await;
}

/// [`a_cut_post_copy_stream_is_recovered_when_the_path_is_back`] with the stream
/// tunnelled through the agents (`transport.mode: Tunnelled`): the relay sits between
/// the source agent's tunnel and the target agent's peer API.
#[tokio::test]
async fn a_cut_tunnelled_post_copy_stream_is_recovered_when_the_path_is_back() {
    post_copy_cut_is_recovered(true).await;
}

async fn post_copy_cut_is_recovered(tunnelled: bool) {
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
    let name = if tunnelled {
        "post-copy-cut-tunnelled"
    } else {
        "post-copy-cut"
    };
    // The components' logs are kept whatever the checks below find.
    let _keep = KeepLogsOnDrop {
        cluster: &cluster,
        root: logs_root(),
        name: name.into(),
    };
    let yaml = if tunnelled {
        tunnelled_migration_yaml(test_mode(), name, TARGET, SLOW_POST_COPY)
    } else {
        migration_yaml(name, TARGET, SLOW_POST_COPY)
    };
    apply_yaml(&cluster, &yaml).await;
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
    let listens = eventually(
        "the target to listen again",
        Duration::from_secs(30),
        || async { status().await?.recovery_uri },
    )
    .await;
    let scheme = if tunnelled { "tunnel:" } else { "tcp:" };
    assert!(listens.starts_with(scheme), "recoveryURI {listens}");
    // The path stays down a while: nothing rolls back, nothing ends, both QEMUs stay.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = status().await.unwrap();
    assert!(
        matches!(
            s.phase,
            Some(MigrationPhase::Finish | MigrationPhase::Confirm)
        ),
        "Perform ends at the switch; the tail is Confirm's: {s:#?}"
    );
    assert!(!s.cancelled, "a paused post-copy must not roll back");
    let vm = vms.get("demo").await.unwrap().status.unwrap_or_default();
    assert_eq!(
        vm.node_name.as_deref(),
        Some(TARGET),
        "the target took the guest at the switch"
    );
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
    // The guest paused for the switch alone, not for the post-copy tail: that lasted
    // longer than the 6 s the path stayed down, while the guest ran on the target.
    let downtime = s.downtime_ms.unwrap_or_default();
    assert!(
        (1..6_000).contains(&downtime),
        "guest downtime {downtime} ms: the guest was paused through the tail"
    );
    println!(
        "post-copy{} cut and recovered: Succeeded {:.1} s after the path came back (bound {} s); guest downtime {downtime} ms",
        if tunnelled { " (tunnelled)" } else { "" },
        recovered_in.as_secs_f64(),
        RECOVERY_BOUND.as_secs()
    );
}

/// Both agents are killed and restarted, one after the other, while the guest runs on
/// the target and the last pages of a post-copy migration follow (Confirm): their QEMUs
/// outlive them, nothing rolls back, the restarted source agent runs Confirm again and
/// the migration ends Succeeded with one guest on the target whose counter goes on.
#[tokio::test]
async fn agents_restarted_during_the_post_copy_tail_let_it_complete() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let before = last_pass(&cluster, SOURCE, "demo").unwrap_or(0);
    let name = "post-copy-tail-restarts";
    apply_yaml(&cluster, &migration_yaml(name, TARGET, SLOW_POST_COPY)).await;
    let status = || async { vmms.get(name).await.ok()?.status };
    post_copy_tail(&vmms, name).await;
    for node in [SOURCE, TARGET] {
        cluster.kill_agent(node);
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The guest's QEMU on the target outlives its agent (the source's too, unless a
        // Confirm restarted meanwhile saw the last pages in and removed it).
        let qemus = cluster.qemu_pids("demo");
        assert!(
            qemus.contains_key(TARGET),
            "the target QEMU outlives the {node} agent: {qemus:?}"
        );
        cluster.start_agent(node).unwrap();
    }
    let s = status().await.unwrap();
    assert!(!s.cancelled, "nothing rolls back after the switch: {s:#?}");
    wait_phase(&vmms, name, MigrationPhase::Succeeded, RECOVERY_BOUND).await;
    runs_once_on(&cluster, &vms, TARGET).await;
    guest_goes_on(&cluster, TARGET, before).await;
    let s = status().await.unwrap();
    println!(
        "post-copy tail with both agents restarted: Succeeded, guest downtime {} ms",
        s.downtime_ms.unwrap_or_default()
    );
}

/// Waits until migration `name` is in its post-copy tail: Confirm, after the switch.
async fn post_copy_tail(vmms: &Api<VirtualMachineMigration>, name: &str) {
    eventually(
        "the post-copy tail (Confirm)",
        Duration::from_secs(120),
        || async {
            let s = vmms.get(name).await.ok()?.status?;
            let tail = s.phase == Some(MigrationPhase::Confirm)
                && s.progress?.mode? == MigrationMode::PostCopy;
            tail.then_some(())
        },
    )
    .await;
}

/// How long a post-copy migration whose target QEMU died may take to end: the target
/// agent looks at its QEMU every 0.5 s and reports it, then the source's Confirm ends.
const LOST_BOUND: Duration = Duration::from_secs(60);

/// The target's QEMU dies after the switch to post-copy, while it runs the guest and
/// the last pages follow (Confirm). It held the guest's state since the switch and QEMU
/// cannot resume the guest on the source, so the guest is lost: no recovery can help,
/// and nothing may wait for one. The target agent says so (`status.targetLost`) and
/// marks the VM, its own since Finish, Failed (GuestLost); the source's Confirm removes
/// its stale QEMU: the migration ends Failed within [`LOST_BOUND`], and no QEMU, state
/// dir or disk lock is left (the matrix's row checks).
#[tokio::test]
async fn a_target_qemu_killed_in_post_copy_ends_failed_and_reports_the_guest_lost() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(&cluster, &migration_yaml(MIGRATION, TARGET, SLOW_POST_COPY)).await;
    let status = || async { vmms.get(MIGRATION).await.ok()?.status };
    post_copy_tail(&vmms, MIGRATION).await;
    let pid = cluster.qemu_pids("demo")[TARGET];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    // The components' logs are kept whatever the checks below find.
    let _keep = KeepLogsOnDrop {
        cluster: &cluster,
        root: logs_root(),
        name: "post-copy-target-lost".into(),
    };
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
    let label = format!("{:?} post-copy, target QEMU killed", test_mode());
    let failed = MigrationPhase::Failed;
    check_row(
        &cluster,
        &client,
        Subject::MATRIX,
        &[],
        &label,
        Killed::TargetQemu,
        failed,
        "GuestLost",
    )
    .await;
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

/// [`TUNNELLED_SUBSET`]: the faults that hit a stream the agents carry.
#[tokio::test]
async fn fault_matrix_tunnelled_subset() {
    tunnelled_matrix(&TUNNELLED_SUBSET).await;
}

/// All 60 rows in managed mode (`make test-faults`).
#[tokio::test]
#[ignore = "60 rows on fresh clusters; `make test-faults` runs it"]
async fn fault_matrix_full_managed() {
    matrix(&all_rows(ControlMode::Managed)).await;
}

/// All 60 rows in peer-to-peer mode (`make test-faults`).
#[tokio::test]
#[ignore = "60 rows on fresh clusters; `make test-faults` runs it"]
async fn fault_matrix_full_peer_to_peer() {
    matrix(&all_rows(ControlMode::PeerToPeer)).await;
}

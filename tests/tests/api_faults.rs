//! The API fault matrix: faults of the Kubernetes API itself at every phase point of a
//! migration, on the real control plane with real QEMU. Each agent and the operator talk
//! to kube-apiserver through a fault proxy of their own (ferry_tests::api_proxy; their
//! kubeconfigs name it). The process that runs the point stops there through its
//! test-only hook (as in tests/tests/faults.rs); while it waits, the test arms the
//! fault, then lets it go on into it:
//!
//! - 409, 500, 429 (Retry-After 1 s), a hang (30 s, then a reset) or a reset connection,
//!   on the next requests that matter at the point (ferry_tests::fault_matrix::api::
//!   targets: the status write of the phase running there, the VM status write, the
//!   disk-lock Lease writes);
//! - a 2 s partition of the component that runs the point (open connections cut,
//!   watches included; new ones reset), well inside the heartbeat Lease's 5 s;
//! - and a few more rows: the source agent partitioned during Perform, and the target
//!   right after its ownership write (after-commit), for longer than the heartbeat Lease
//!   lasts; the apiserver restarted during Perform and during Finish
//!   (etcd keeps its data; the paused process is let go while it is down); both agents
//!   killed at once at PerformLate.
//!
//! Each row must end as the fault matrix's do (ferry_tests::fault_run::check_row):
//! terminal within its bound, exactly one running guest, intact, on the node the
//! outcome names, and nothing leaked. A fault that never landed (no request met a rule)
//! fails the row: it would prove nothing. A component that exits by itself (the
//! operator does when it loses its leader Lease) is started again, as its Deployment
//! would, and the table says so.
//!
//! `make test` runs [`API_SUBSET`]; `make test-faults` runs all 65 rows of each mode.
//! `FERRY_API_FAULT_ROWS=[PeerToPeer/]<fault>:<point>,...` picks rows instead of the
//! subset.

use std::path::PathBuf;
use std::time::Instant;

use ferry_crds::{ControlMode, VirtualMachineMigration};
use ferry_tests::Cluster;
use ferry_tests::cluster::Options;
use ferry_tests::e2e_support::*;
use ferry_tests::fault_matrix::api::*;
use ferry_tests::fault_run::{self, Hooks, KeepLogsOnDrop, Killed, Subject};
use ferry_tests::fault_run::{MIGRATION, SOURCE, TARGET, check_row, wait_terminal};
use ferry_tests::inject;
use kube::{Api, Client};

/// A two-node cluster whose agents and operator reach the apiserver through proxies.
async fn up_proxied() -> (Cluster, Client) {
    let options = Options {
        api_proxies: true,
        ..Options::default()
    };
    let cluster = Cluster::up_with_options(&[SOURCE, TARGET], options)
        .await
        .unwrap_or_else(|e| panic!("cluster: {e}"));
    let client = cluster.client().await.unwrap();
    (cluster, client)
}

/// Runs one row on a fresh cluster and returns its table line; panics (with the reason)
/// when an invariant breaks.
async fn run_row(spec: ApiRowSpec) -> String {
    let (mode, _, point) = spec;
    let (mut cluster, client) = up_proxied().await;
    if let Err(why) = example_vm_started(&cluster, &client).await {
        keep_logs(&cluster, spec);
        panic!("before the fault: {why}");
    }
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let hooks = Hooks::new(&cluster);
    hooks.arm(&mut cluster, mode, point, &[]);
    let started = Instant::now();
    apply_yaml(&cluster, &migration_yaml_in(mode, MIGRATION, TARGET, LONG)).await;
    if let Err(why) = hooks.paused(&vmms, MIGRATION, point, started).await {
        keep_logs(&cluster, spec);
        panic!("{why}");
    }
    let done = inject::api_fault(&mut cluster, Subject::MATRIX, spec, &hooks).await;

    let (phase, restarted) = wait_terminal(&mut cluster, &vmms, MIGRATION, started, true).await;
    let to_terminal = started.elapsed();
    keep_logs(&cluster, spec);
    let Some(phase) = phase else {
        fault_run::not_terminal(&vmms, MIGRATION).await
    };
    let (landed, injected) = match done {
        Some(what) => (true, what),
        None => inject::what_landed(&cluster, Subject::MATRIX),
    };
    assert!(landed, "the fault never landed: {injected}");
    // The logs again once the checks are done (or failed): what happened after the end.
    let keep = KeepLogsOnDrop {
        cluster: &cluster,
        root: logs_root(),
        name: log_name(spec),
    };
    check_row(
        &cluster,
        &client,
        Subject::MATRIX,
        &[],
        &api_row_name(spec),
        Killed::Nothing,
        phase,
        "",
    )
    .await;
    drop(keep);
    let qemus = cluster.qemu_pids("demo");
    let guest = qemus.keys().next().cloned().unwrap_or_default();
    api_table_line(&ApiRow {
        spec,
        phase,
        guest,
        qemus: qemus.len(),
        injected,
        to_terminal,
        restarted,
    })
}

fn logs_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api-fault-logs")
}

/// `<fault>-<point>`, or `PeerToPeer-<fault>-<point>`.
fn log_name(spec: ApiRowSpec) -> String {
    api_row_name(spec).replace(['/', ':'], "-")
}

/// Copies the row's component logs to `$CARGO_TARGET_TMPDIR/api-fault-logs/<row>`.
fn keep_logs(cluster: &Cluster, spec: ApiRowSpec) {
    fault_run::keep_logs(cluster, &logs_root(), &log_name(spec));
}

async fn matrix(rows: &[ApiRowSpec]) {
    fault_run::matrix(API_TABLE_HEADER, rows, run_row).await;
}

#[tokio::test]
async fn api_fault_matrix_subset() {
    // FERRY_API_FAULT_ROWS=[PeerToPeer/]<fault>:<point>,... picks rows of the full
    // matrices instead.
    if let Ok(pick) = std::env::var("FERRY_API_FAULT_ROWS") {
        let rows = picked_api(&pick);
        assert!(!rows.is_empty(), "FERRY_API_FAULT_ROWS={pick} names no row");
        return matrix(&rows).await;
    }
    matrix(&API_SUBSET).await;
}

/// All 65 rows in managed mode (`make test-faults`).
#[tokio::test]
#[ignore = "65 rows on fresh clusters; `make test-faults` runs it"]
async fn api_fault_matrix_full_managed() {
    matrix(&all_api_rows(ControlMode::Managed)).await;
}

/// All 65 rows in peer-to-peer mode (`make test-faults`).
#[tokio::test]
#[ignore = "65 rows on fresh clusters; `make test-faults` runs it"]
async fn api_fault_matrix_full_peer_to_peer() {
    matrix(&all_api_rows(ControlMode::PeerToPeer)).await;
}

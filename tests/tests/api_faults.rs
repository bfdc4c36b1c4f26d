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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use ferry_crds::{ControlMode, VirtualMachineMigration};
use ferry_tests::Cluster;
use ferry_tests::api_proxy::{ApiProxy, FaultKind};
use ferry_tests::cluster::{Heartbeat, Options};
use ferry_tests::e2e_support::*;
use ferry_tests::fault_matrix::Pauser;
use ferry_tests::fault_matrix::api::*;
use ferry_tests::fault_run::{self, Hooks, KeepLogsOnDrop, Killed, RESTART_DELAY};
use ferry_tests::fault_run::{MIGRATION, SOURCE, TARGET, check_row, wait_terminal};
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

fn proxy_of(cluster: &Cluster, who: Pauser) -> &ApiProxy {
    let proxy = match who {
        Pauser::Source => cluster.agent_proxy(SOURCE),
        Pauser::Target => cluster.agent_proxy(TARGET),
        Pauser::Operator => cluster.operator_proxy(),
    };
    proxy.expect("the cluster runs behind proxies")
}

const COMPONENTS: [(Pauser, &str); 3] = [
    (Pauser::Source, "source"),
    (Pauser::Target, "target"),
    (Pauser::Operator, "operator"),
];

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
    if let Err(why) = hooks.paused(&vmms, point, started).await {
        keep_logs(&cluster, spec);
        panic!("{why}");
    }
    let done = inject(&mut cluster, spec, &hooks).await;

    let (phase, restarted) = wait_terminal(&mut cluster, &vmms, started, true).await;
    let to_terminal = started.elapsed();
    keep_logs(&cluster, spec);
    let Some(phase) = phase else {
        fault_run::not_terminal(&vmms).await
    };
    let (landed, injected) = match done {
        Some(what) => (true, what),
        None => what_landed(&cluster),
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

/// Arms the row's fault while the hook holds the process at the point, and lets it go
/// on. Says what it did for the faults that always land (a restart, kills); `None` for
/// those the proxies count.
async fn inject(
    cluster: &mut Cluster,
    (mode, fault, point): ApiRowSpec,
    hooks: &Hooks,
) -> Option<String> {
    if let Some((injection, times)) = injection(fault) {
        for (who, matcher) in targets(mode, point) {
            proxy_of(cluster, who).fail_next(times, matcher, injection);
        }
        hooks.release(point);
        return None;
    }
    match fault {
        ApiFault::Partition => {
            let who = partitioned(mode, fault, point).expect("a partition row");
            proxy_of(cluster, who).partition(PARTITION);
            hooks.release(point);
            None
        }
        ApiFault::PartitionPastLease => {
            let who = partitioned(mode, fault, point).expect("a partition row");
            proxy_of(cluster, who).partition(past_lease(Heartbeat::TESTS));
            hooks.release(point);
            None
        }
        ApiFault::RestartApiserver => {
            let down = Instant::now();
            cluster.cp.stop_apiserver();
            hooks.release(point);
            cluster.cp.start_apiserver().await.unwrap();
            Some(format!(
                "apiserver down {:.1} s",
                down.elapsed().as_secs_f64()
            ))
        }
        ApiFault::KillBothAgents => {
            cluster.kill_agent(SOURCE);
            cluster.kill_agent(TARGET);
            hooks.release(point);
            tokio::time::sleep(RESTART_DELAY).await;
            cluster.start_agent(SOURCE).unwrap();
            cluster.start_agent(TARGET).unwrap();
            Some("both agents killed".into())
        }
        _ => unreachable!("{fault:?} is a request fault"),
    }
}

/// Whether the proxies injected anything, and what, per component: the requests each
/// failed (kind × request), connections cut and refused, rules never met.
fn what_landed(cluster: &Cluster) -> (bool, String) {
    let mut parts = Vec::new();
    let mut total = 0;
    for (who, name) in COMPONENTS {
        let proxy = proxy_of(cluster, who);
        let mut hits: BTreeMap<String, usize> = BTreeMap::new();
        for hit in proxy.hits() {
            let what = format!(
                "{:?} {} {}",
                hit.kind, hit.request.verb, hit.request.resource
            );
            *hits.entry(what).or_default() += 1;
        }
        let counts = proxy.injected();
        let mut said: Vec<String> = hits.iter().map(|(w, n)| format!("{n}× {w}")).collect();
        for (kind, word) in [
            (FaultKind::PartitionCut, "connections cut"),
            (FaultKind::PartitionRefused, "refused"),
        ] {
            if let Some(n) = counts.get(&kind) {
                said.push(format!("{n} {word}"));
            }
        }
        if proxy.pending() > 0 {
            said.push(format!("{} not met", proxy.pending()));
        }
        total += proxy.injected_total();
        if !said.is_empty() {
            parts.push(format!("{name}: {}", said.join(", ")));
        }
    }
    (total > 0, parts.join("; "))
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

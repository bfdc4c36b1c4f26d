//! The API fault matrix's rows (tests/tests/api_faults.rs): a fault of the Kubernetes
//! API, as the component's fault proxy (crate::api_proxy) injects it, at each point of
//! the matrix, in each control mode; and which requests "matter" at each point — which
//! component's proxy fails which kind of request. Pure, so the choice is checked
//! without a cluster.

use std::time::Duration;

use ferry_crds::ControlMode;

use super::{POINTS, Pauser, Point};
use crate::api_proxy::{Injection, Matcher, Verb};
use crate::cluster::Heartbeat;
use crate::fault_run::RowLabel;

use ControlMode::{Managed, PeerToPeer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiFault {
    /// 409 on the requests that matter at the point.
    Conflict,
    /// 500 on them.
    ServerError,
    /// 429 with Retry-After on them.
    TooManyRequests,
    /// No answer to them for [`HANG`], then a reset.
    Hang,
    /// Their connection reset.
    Reset,
    /// The component that runs the point partitioned from the apiserver for [`PARTITION`].
    Partition,
    /// The agent that runs the point (the source in Perform, the target right after its
    /// commit) partitioned for longer than its heartbeat Lease lasts.
    PartitionPastLease,
    /// kube-apiserver restarted (etcd keeps its data): stopped at the point, the paused
    /// process released, then started again.
    RestartApiserver,
    /// Both agents killed at once, started again after the matrix's restart delay.
    KillBothAgents,
}

/// The faults every point gets.
pub const API_FAULTS: [ApiFault; 6] = [
    ApiFault::Conflict,
    ApiFault::ServerError,
    ApiFault::TooManyRequests,
    ApiFault::Hang,
    ApiFault::Reset,
    ApiFault::Partition,
];

/// The rows beyond fault × point, in each mode.
pub const EXTRA: [(ApiFault, Point); 5] = [
    (ApiFault::PartitionPastLease, Point::PerformEarly),
    // The target partitioned right after the ownership write, past its Lease.
    (ApiFault::PartitionPastLease, Point::AfterCommit),
    (ApiFault::RestartApiserver, Point::PerformEarly),
    (ApiFault::RestartApiserver, Point::DuringFinish),
    (ApiFault::KillBothAgents, Point::PerformLate),
];

/// One row: an API fault at a point of a migration driven in a mode.
pub type ApiRowSpec = (ControlMode, ApiFault, Point);

/// How often a request fault is injected: enough for a retry or two to meet it too.
pub const TIMES: usize = 3;
/// A hang outlasts every timeout the components set on an API call (the heartbeat's
/// renewal gives up after half the Lease's validity), and the tests' Lease validity.
pub const HANG: Duration = Duration::from_secs(30);
/// A short partition: well inside the heartbeat Lease's validity in the tests (5 s), so
/// nobody may count the component as lost; open watches and writes are cut all the same.
pub const PARTITION: Duration = Duration::from_secs(2);
/// The Retry-After of an injected 429.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// A partition past the heartbeat Lease's validity (`leaseDurationSeconds`,
/// agent/src/k8s/heartbeat.rs; `lasts_seconds` of the cluster's [`Heartbeat`]): twice
/// it and 2 s more, so the operator must see the Lease run out.
pub fn past_lease(heartbeat: Heartbeat) -> Duration {
    Duration::from_secs(heartbeat.lasts_seconds * 2 + 2)
}

/// What a request fault's proxy rule answers, and how many times.
pub fn injection(fault: ApiFault) -> Option<(Injection, usize)> {
    match fault {
        ApiFault::Conflict => Some((Injection::Conflict, TIMES)),
        ApiFault::ServerError => Some((Injection::ServerError, TIMES)),
        ApiFault::TooManyRequests => Some((
            Injection::TooManyRequests {
                retry_after_seconds: RETRY_AFTER_SECONDS,
            },
            TIMES,
        )),
        ApiFault::Hang => Some((Injection::Hang(HANG), 1)),
        ApiFault::Reset => Some((Injection::Reset, TIMES)),
        _ => None,
    }
}

const VMM_STATUS: &str = "virtualmachinemigrations/status";
const VM_STATUS: &str = "virtualmachines/status";

/// A migration's status writes: the step records, progress, the driver's transitions.
fn status_writes() -> Matcher {
    Matcher::verbs(&[Verb::Patch, Verb::Update], VMM_STATUS)
}

/// The VM's status writes: ownership (Finish), the fence (a rolled-back Confirm), the
/// VM reconciler's reports.
fn vm_status_writes() -> Matcher {
    Matcher::verbs(&[Verb::Patch, Verb::Update], VM_STATUS)
}

/// The disk-lock Lease writes (taken, handed over in Finish, released in Confirm); not
/// the heartbeat's.
fn disk_lock_writes() -> Matcher {
    Matcher::verbs(
        &[Verb::Create, Verb::Patch, Verb::Update, Verb::Delete],
        "leases",
    )
    .named("ferry-disk-")
}

/// The read of the target's heartbeat Lease, where the source finds its peer API.
fn peer_endpoint_reads() -> Matcher {
    Matcher::new(Verb::Get, "leases").named("ferry-node-")
}

/// The requests that matter right after `point` in `mode`: whose proxy fails which. The
/// process paused at the point is released with the rules armed, so its next requests
/// meet them: the status write of the phase running there (the step record, Perform's
/// progress; between phases the driver's transition), and where the phase writes them,
/// the VM status and the disk-lock Leases — Finish's ownership and lock hand-over run on
/// the target right after Perform, so PerformLate arms those on the target.
pub fn targets(mode: ControlMode, point: Point) -> Vec<(Pauser, Matcher)> {
    use Pauser::{Operator, Source, Target};
    let finish_writes = || vec![(Target, vm_status_writes()), (Target, disk_lock_writes())];
    let mut rules = match (mode, point) {
        (_, Point::DuringBegin | Point::PerformEarly) => vec![(Source, status_writes())],
        (Managed, Point::AfterBegin | Point::AfterPrepare | Point::AfterFinish) => {
            vec![(Operator, status_writes())]
        }
        (Managed, Point::DuringPrepare) => vec![(Target, status_writes())],
        (Managed, Point::DuringFinish) => {
            vec![(Target, status_writes()), (Target, vm_status_writes())]
        }
        // Peer-to-peer: the target answers the source's peer call, and the source records
        // the step; between phases the source calls the target, found through its Lease.
        (PeerToPeer, Point::AfterBegin) => {
            vec![(Source, status_writes()), (Source, peer_endpoint_reads())]
        }
        (PeerToPeer, Point::DuringPrepare | Point::AfterPrepare) => {
            vec![(Source, status_writes())]
        }
        (PeerToPeer, Point::DuringFinish) => {
            vec![(Source, status_writes()), (Target, vm_status_writes())]
        }
        (PeerToPeer, Point::AfterFinish) => {
            vec![(Source, status_writes()), (Source, disk_lock_writes())]
        }
        (_, Point::PerformLate) => vec![(Source, status_writes())],
        // After the commit the target only goes forward: its Finish step must land
        // (managed) or reach the source, which records it (peer-to-peer).
        (Managed, Point::AfterCommit) => {
            vec![(Target, status_writes()), (Target, vm_status_writes())]
        }
        (PeerToPeer, Point::AfterCommit) => vec![(Source, status_writes())],
        (_, Point::DuringConfirm) => vec![
            (Source, status_writes()),
            (Source, vm_status_writes()),
            (Source, disk_lock_writes()),
        ],
    };
    if point == Point::PerformLate {
        rules.extend(finish_writes());
    }
    rules
}

/// Whose proxy a partition row partitions: the process that runs the point (the
/// pauser: the source during Perform, the target right after its commit).
pub fn partitioned(mode: ControlMode, fault: ApiFault, point: Point) -> Option<Pauser> {
    match fault {
        ApiFault::Partition | ApiFault::PartitionPastLease => Some(point.pauser(mode)),
        _ => None,
    }
}

/// Every row of `mode`: each fault of [`API_FAULTS`] at each point, then [`EXTRA`] (65).
pub fn all_api_rows(mode: ControlMode) -> Vec<ApiRowSpec> {
    API_FAULTS
        .iter()
        .flat_map(|f| POINTS.iter().map(move |p| (mode, *f, *p)))
        .chain(EXTRA.iter().map(|(f, p)| (mode, *f, *p)))
        .collect()
}

/// The rows `make test` runs: one per request fault kind other than the hang (which
/// costs its 30 s), a partition of the operator and one of an agent, and an apiserver
/// restart; both modes.
pub const API_SUBSET: [ApiRowSpec; 7] = [
    (Managed, ApiFault::Conflict, Point::DuringPrepare),
    (Managed, ApiFault::ServerError, Point::AfterCommit),
    (Managed, ApiFault::ServerError, Point::DuringConfirm),
    (Managed, ApiFault::Partition, Point::AfterBegin),
    (PeerToPeer, ApiFault::TooManyRequests, Point::AfterBegin),
    (PeerToPeer, ApiFault::Reset, Point::PerformEarly),
    (PeerToPeer, ApiFault::RestartApiserver, Point::PerformEarly),
];

/// A row's name in `FERRY_API_FAULT_ROWS` and in log directories: `<fault>:<point>` in
/// managed mode, `PeerToPeer/<fault>:<point>` otherwise.
pub fn api_row_name((mode, fault, point): ApiRowSpec) -> String {
    super::name_of(mode, fault, point)
}

/// The rows `pick` names (comma-separated `[<mode>/]<fault>:<point>`), in matrix order.
pub fn picked_api(pick: &str) -> Vec<ApiRowSpec> {
    super::pick_rows(pick, all_api_rows)
}

/// One row of the table, once it ran.
pub struct ApiRow {
    pub spec: ApiRowSpec,
    pub phase: ferry_crds::MigrationPhase,
    pub guest: String,
    pub qemus: usize,
    /// What the fault did: the proxies' counts, or the restart or kills.
    pub injected: String,
    pub to_terminal: Duration,
    /// Components that exited by themselves and were started again.
    pub restarted: Vec<String>,
}

pub const API_TABLE_HEADER: &str = "| mode       | fault              | point          | phase      | guest runs on | QEMUs | to terminal | injected / restarted\n\
     |------------|--------------------|----------------|------------|---------------|-------|-------------|---------------------";

/// The row's line in the table.
pub fn api_table_line(r: &ApiRow) -> String {
    let (mode, fault, point) = r.spec;
    let restarted = if r.restarted.is_empty() {
        String::new()
    } else {
        format!("; exited and restarted: {}", r.restarted.join(", "))
    };
    format!(
        "| {:<10} | {:<18} | {:<14} | {:<10} | {:<13} | {:>5} | {:>9.1} s | {}{restarted}",
        format!("{mode:?}"),
        format!("{fault:?}"),
        point.hook(),
        format!("{:?}", r.phase),
        r.guest,
        r.qemus,
        r.to_terminal.as_secs_f64(),
        r.injected,
    )
}

impl RowLabel for ApiRowSpec {
    fn name(&self) -> String {
        api_row_name(*self)
    }

    fn failed_line(&self, why: &str) -> String {
        let (mode, fault, point) = *self;
        format!(
            "| {:<10} | {:<18} | {:<14} | FAILED: {why}",
            format!("{mode:?}"),
            format!("{fault:?}"),
            point.hook()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_proxy::ApiRequest;
    use crate::fault_matrix::MODES;

    fn write(verb: Verb, resource: &str, name: &str) -> ApiRequest {
        ApiRequest {
            verb,
            resource: resource.into(),
            namespace: Some("default".into()),
            name: Some(name.into()),
        }
    }

    #[test]
    fn every_point_of_each_mode_fails_requests_of_the_phase_there() {
        for mode in MODES {
            for point in POINTS {
                let rules = targets(mode, point);
                assert!(!rules.is_empty(), "{mode:?} {point:?}");
                // The migration's status is always among them: every point is followed by a
                // status write (a step, progress, or the driver's transition).
                assert!(
                    rules.iter().any(|(_, m)| m.matches(&write(
                        Verb::Patch,
                        VMM_STATUS,
                        "faulted"
                    ))),
                    "{mode:?} {point:?}"
                );
            }
        }
        // Managed: the operator's writes between phases, the target's in its phases.
        assert_eq!(targets(Managed, Point::AfterPrepare)[0].0, Pauser::Operator);
        assert_eq!(targets(Managed, Point::DuringPrepare)[0].0, Pauser::Target);
        // Peer-to-peer: the source records every step.
        for point in POINTS {
            assert_eq!(targets(PeerToPeer, point)[0].0, Pauser::Source, "{point:?}");
        }
    }

    #[test]
    fn finish_ownership_and_lock_hand_over_meet_the_faults_after_perform() {
        for mode in MODES {
            let rules = targets(mode, Point::PerformLate);
            let on_target = |r: &ApiRequest| {
                rules
                    .iter()
                    .any(|(who, m)| *who == Pauser::Target && m.matches(r))
            };
            assert!(on_target(&write(Verb::Patch, VM_STATUS, "demo")));
            assert!(on_target(&write(
                Verb::Patch,
                "leases",
                "ferry-disk-default.demo.vda"
            )));
            // Never the heartbeat: a Lease that must not be failed by a rule for a phase.
            assert!(!on_target(&write(
                Verb::Patch,
                "leases",
                "ferry-node-node-b"
            )));
        }
    }

    #[test]
    fn rows_faults_and_partitions() {
        for mode in MODES {
            let rows = all_api_rows(mode);
            assert_eq!(rows.len(), 65);
            assert!(rows.iter().all(|r| r.0 == mode));
        }
        for f in API_FAULTS {
            assert_eq!(
                injection(f).is_some(),
                f != ApiFault::Partition,
                "{f:?} is a request fault"
            );
        }
        assert_eq!(injection(ApiFault::Hang), Some((Injection::Hang(HANG), 1)));
        assert_eq!(
            partitioned(PeerToPeer, ApiFault::Partition, Point::DuringFinish),
            Some(Pauser::Target)
        );
        assert_eq!(
            partitioned(Managed, ApiFault::Partition, Point::AfterFinish),
            Some(Pauser::Operator)
        );
        assert_eq!(
            partitioned(Managed, ApiFault::PartitionPastLease, Point::PerformEarly),
            Some(Pauser::Source)
        );
        assert_eq!(
            partitioned(Managed, ApiFault::Reset, Point::PerformEarly),
            None
        );
        // Past the tests' 5 s Lease, and past the agent's default 10 s too.
        assert!(past_lease(Heartbeat::TESTS) > Duration::from_secs(5));
        assert!(past_lease(Heartbeat::DEFAULTS) > Duration::from_secs(10));
        assert!(PARTITION < Duration::from_secs(Heartbeat::TESTS.lasts_seconds) / 2);
        assert!(HANG > Duration::from_secs(Heartbeat::TESTS.lasts_seconds));
    }

    #[test]
    fn the_subset_is_a_handful_of_rows_of_the_matrix_in_both_modes() {
        assert!(API_SUBSET.len() <= 7);
        for row in API_SUBSET {
            assert!(all_api_rows(row.0).contains(&row), "{row:?}");
        }
        for mode in MODES {
            assert!(API_SUBSET.iter().any(|r| r.0 == mode));
        }
        assert!(API_SUBSET.iter().any(|r| r.1 == ApiFault::Partition));
        assert!(API_SUBSET.iter().any(|r| r.1 == ApiFault::RestartApiserver));
    }

    #[test]
    fn api_rows_are_picked_by_name() {
        assert_eq!(
            picked_api("Conflict:during-begin, PeerToPeer/KillBothAgents:perform-late"),
            vec![
                (Managed, ApiFault::Conflict, Point::DuringBegin),
                (PeerToPeer, ApiFault::KillBothAgents, Point::PerformLate),
            ]
        );
        assert!(picked_api("KillBothAgents:during-begin").is_empty());
        assert_eq!(
            api_row_name((Managed, ApiFault::RestartApiserver, Point::DuringFinish)),
            "RestartApiserver:during-finish"
        );
    }
}

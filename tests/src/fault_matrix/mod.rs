//! The fault matrix's rows (tests/tests/faults.rs): which fault, at which point, in
//! which control mode, and which process the test-only hook pauses there; the API fault
//! matrix's rows are in [`api`]. Pure, so that the choice of rows and pausers is checked
//! without a cluster.

pub mod api;

use std::time::Duration;

use ferry_crds::{ControlMode, MigrationPhase};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    KillSourceAgent,
    KillTargetAgent,
    KillOperator,
    KillTargetQemu,
    KillSourceQemu,
    CutStream,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Point {
    DuringBegin,
    AfterBegin,
    DuringPrepare,
    AfterPrepare,
    PerformEarly,
    PerformLate,
    /// In Finish, right after the target took ownership (the commit point), before
    /// `cont`.
    AfterCommit,
    DuringFinish,
    AfterFinish,
    DuringConfirm,
}

pub const FAULTS: [Fault; 6] = [
    Fault::KillSourceAgent,
    Fault::KillTargetAgent,
    Fault::KillOperator,
    Fault::KillTargetQemu,
    Fault::KillSourceQemu,
    Fault::CutStream,
];

pub const POINTS: [Point; 10] = [
    Point::DuringBegin,
    Point::AfterBegin,
    Point::DuringPrepare,
    Point::AfterPrepare,
    Point::PerformEarly,
    Point::PerformLate,
    Point::AfterCommit,
    Point::DuringFinish,
    Point::AfterFinish,
    Point::DuringConfirm,
];

pub const MODES: [ControlMode; 2] = [ControlMode::Managed, ControlMode::PeerToPeer];

/// One row: a fault at a point of a migration driven in a mode.
pub type RowSpec = (ControlMode, Fault, Point);

use ControlMode::{Managed, PeerToPeer};

/// The rows `make test` runs. Managed: every fault and every point at least once.
/// Peer-to-peer: every fault at least once, on the paths the source agent drives (its
/// own kill during and after phases, the target agent killed inside its peer API, the
/// operator killed while the source waits between phases, the QEMUs, the stream).
pub const SUBSET: [RowSpec; 19] = [
    (Managed, Fault::KillSourceAgent, Point::DuringBegin),
    (Managed, Fault::KillOperator, Point::AfterBegin),
    (Managed, Fault::KillTargetAgent, Point::DuringPrepare),
    (Managed, Fault::KillTargetQemu, Point::AfterPrepare),
    (Managed, Fault::CutStream, Point::PerformEarly),
    (Managed, Fault::KillSourceQemu, Point::PerformEarly),
    (Managed, Fault::KillTargetQemu, Point::PerformLate),
    (Managed, Fault::KillTargetQemu, Point::AfterCommit),
    (Managed, Fault::KillTargetAgent, Point::DuringFinish),
    (Managed, Fault::KillOperator, Point::AfterFinish),
    (Managed, Fault::KillSourceAgent, Point::DuringConfirm),
    (PeerToPeer, Fault::KillSourceAgent, Point::AfterPrepare),
    (PeerToPeer, Fault::KillSourceAgent, Point::AfterFinish),
    (PeerToPeer, Fault::KillTargetAgent, Point::DuringPrepare),
    (PeerToPeer, Fault::KillTargetAgent, Point::DuringFinish),
    (PeerToPeer, Fault::KillOperator, Point::AfterBegin),
    (PeerToPeer, Fault::KillTargetQemu, Point::PerformLate),
    (PeerToPeer, Fault::KillSourceQemu, Point::PerformEarly),
    (PeerToPeer, Fault::CutStream, Point::PerformEarly),
];

/// The rows `make test` runs again with the stream tunnelled through the agents
/// (`transport.mode: Tunnelled`): each agent killed while it carries the stream, the
/// carried stream cut, in each control mode.
pub const TUNNELLED_SUBSET: [RowSpec; 5] = [
    (Managed, Fault::KillSourceAgent, Point::PerformEarly),
    (Managed, Fault::KillTargetAgent, Point::PerformLate),
    (Managed, Fault::CutStream, Point::PerformEarly),
    (PeerToPeer, Fault::KillSourceAgent, Point::PerformLate),
    (PeerToPeer, Fault::CutStream, Point::PerformLate),
];

/// A row run with the stream tunnelled through the agents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tunnelled(pub RowSpec);

/// Which process pauses at a point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pauser {
    Source,
    Target,
    Operator,
}

impl Point {
    /// The hook's name for the point.
    pub fn hook(self) -> &'static str {
        match self {
            Point::DuringBegin => "during-begin",
            Point::AfterBegin => "after-begin",
            Point::DuringPrepare => "during-prepare",
            Point::AfterPrepare => "after-prepare",
            Point::PerformEarly => "perform-early",
            Point::PerformLate => "perform-late",
            Point::AfterCommit => "after-commit",
            Point::DuringFinish => "during-finish",
            Point::AfterFinish => "after-finish",
            Point::DuringConfirm => "during-confirm",
        }
    }

    /// Who pauses at the point: the process that runs the phase, and between phases
    /// the driver (the operator in managed mode, the source agent in peer-to-peer).
    pub fn pauser(self, mode: ControlMode) -> Pauser {
        match self {
            Point::DuringBegin | Point::PerformEarly | Point::PerformLate => Pauser::Source,
            Point::DuringConfirm => Pauser::Source,
            Point::DuringPrepare | Point::AfterCommit | Point::DuringFinish => Pauser::Target,
            Point::AfterBegin | Point::AfterPrepare | Point::AfterFinish => match mode {
                Managed => Pauser::Operator,
                PeerToPeer => Pauser::Source,
            },
        }
    }
}

/// Every row of `mode` (60).
pub fn all_rows(mode: ControlMode) -> Vec<RowSpec> {
    FAULTS
        .iter()
        .flat_map(|f| POINTS.iter().map(move |p| (mode, *f, *p)))
        .collect()
}

/// The name of a row of either matrix in `FERRY_FAULT_ROWS`, `FERRY_API_FAULT_ROWS` and
/// in log directories: `<fault>:<point>` in managed mode, `PeerToPeer/<fault>:<point>`
/// otherwise.
pub fn name_of<F: std::fmt::Debug>(mode: ControlMode, fault: F, point: Point) -> String {
    match mode {
        Managed => format!("{fault:?}:{}", point.hook()),
        PeerToPeer => format!("PeerToPeer/{fault:?}:{}", point.hook()),
    }
}

/// The rows of `all` (a matrix's rows of a mode) that `pick` names (comma-separated
/// `[<mode>/]<fault>:<point>`; no mode is Managed), in matrix order.
pub fn pick_rows<F>(
    pick: &str,
    all: fn(ControlMode) -> Vec<(ControlMode, F, Point)>,
) -> Vec<(ControlMode, F, Point)>
where
    F: std::fmt::Debug + Copy,
{
    let names: Vec<String> = pick
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| r.strip_prefix("Managed/").unwrap_or(r).to_string())
        .collect();
    MODES
        .iter()
        .flat_map(|m| all(*m))
        .filter(|(mode, fault, point)| names.contains(&name_of(*mode, *fault, *point)))
        .collect()
}

/// A row's name ([`name_of`]).
pub fn row_name((mode, fault, point): RowSpec) -> String {
    name_of(mode, fault, point)
}

/// The rows `pick` names ([`pick_rows`]).
pub fn picked(pick: &str) -> Vec<RowSpec> {
    pick_rows(pick, all_rows)
}

/// One row of the table, once it ran.
pub struct Row {
    pub spec: RowSpec,
    /// Whether the stream went through the agents (`transport.mode: Tunnelled`).
    pub tunnelled: bool,
    pub phase: MigrationPhase,
    pub guest: String,
    pub qemus: usize,
    pub to_terminal: Duration,
}

pub const TABLE_HEADER: &str = "| mode                  | fault            | point          | phase      | guest runs on    | QEMUs | to terminal |\n\
     |-----------------------|------------------|----------------|------------|------------------|-------|-------------|";

/// A row's mode column: the control mode, and the transport when it is tunnelled.
fn mode_column(mode: ControlMode, tunnelled: bool) -> String {
    if tunnelled {
        format!("{mode:?}, tunnelled")
    } else {
        format!("{mode:?}")
    }
}

/// The row's line in the table.
pub fn table_line(r: &Row) -> String {
    let (mode, fault, point) = r.spec;
    format!(
        "| {:<21} | {:<16} | {:<14} | {:<10} | {:<16} | {:>5} | {:>7.1} s |",
        mode_column(mode, r.tunnelled),
        format!("{fault:?}"),
        point.hook(),
        format!("{:?}", r.phase),
        r.guest,
        r.qemus,
        r.to_terminal.as_secs_f64()
    )
}

impl crate::fault_run::RowLabel for RowSpec {
    fn name(&self) -> String {
        row_name(*self)
    }

    /// The table line of a row that broke an invariant.
    fn failed_line(&self, why: &str) -> String {
        failed_line(*self, false, why)
    }
}

impl crate::fault_run::RowLabel for Tunnelled {
    /// `Tunnelled/` and the row's name.
    fn name(&self) -> String {
        format!("Tunnelled/{}", row_name(self.0))
    }

    fn failed_line(&self, why: &str) -> String {
        failed_line(self.0, true, why)
    }
}

fn failed_line((mode, fault, point): RowSpec, tunnelled: bool, why: &str) -> String {
    format!(
        "| {:<21} | {:<16} | {:<14} | FAILED: {why}",
        mode_column(mode, tunnelled),
        format!("{fault:?}"),
        point.hook()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_pauses_between_phases() {
        assert_eq!(Point::AfterBegin.pauser(Managed), Pauser::Operator);
        for p in [Point::AfterBegin, Point::AfterPrepare, Point::AfterFinish] {
            assert_eq!(p.pauser(PeerToPeer), Pauser::Source, "{p:?}");
        }
        for mode in MODES {
            assert_eq!(Point::DuringPrepare.pauser(mode), Pauser::Target);
            assert_eq!(Point::DuringFinish.pauser(mode), Pauser::Target);
            assert_eq!(Point::PerformLate.pauser(mode), Pauser::Source);
        }
    }

    #[test]
    fn each_mode_has_60_rows_and_the_subset_covers_every_fault_in_each() {
        for mode in MODES {
            assert_eq!(all_rows(mode).len(), 60);
            for f in FAULTS {
                assert!(
                    SUBSET.iter().any(|&(m, g, _)| m == mode && g == f),
                    "{mode:?} {f:?}"
                );
            }
        }
        for p in POINTS {
            assert!(SUBSET.iter().any(|&(m, _, q)| m == Managed && q == p));
        }
        let p2p = SUBSET.iter().filter(|r| r.0 == PeerToPeer).count();
        assert!((6..=8).contains(&p2p), "{p2p} peer-to-peer rows");
    }

    #[test]
    fn rows_are_picked_by_name_with_an_optional_mode() {
        assert_eq!(
            picked("KillOperator:after-begin, PeerToPeer/KillTargetAgent:during-prepare"),
            vec![
                (Managed, Fault::KillOperator, Point::AfterBegin),
                (PeerToPeer, Fault::KillTargetAgent, Point::DuringPrepare),
            ]
        );
        assert_eq!(
            picked("Managed/CutStream:perform-early"),
            vec![(Managed, Fault::CutStream, Point::PerformEarly)]
        );
        assert!(picked("Nonsense:during-begin").is_empty());
        assert_eq!(
            row_name((PeerToPeer, Fault::CutStream, Point::PerformLate)),
            "PeerToPeer/CutStream:perform-late"
        );
    }
}

//! The chaos soak's plan (tests/tests/soak_chaos.rs): for each migration of the soak, one
//! row of the fault matrices — a control mode, a fault and the point it lands at —
//! drawn from a seed, so that a failed run is replayed by running it again with the seed
//! it printed. Pure: the plan is checked without a cluster.

use std::collections::BTreeMap;

use ferry_crds::ControlMode;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::fault_matrix::api::{ApiFault, all_api_rows};
use crate::fault_matrix::{Fault, MODES, Point, all_rows, name_of};

/// A fault of either matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ChaosFault {
    /// A process fault (tests/tests/faults.rs): an agent or the operator killed, or the
    /// stream cut.
    Process(Fault),
    /// An API fault (tests/tests/api_faults.rs).
    Api(ApiFault),
}

impl ChaosFault {
    /// Its name, as the matrices' tables write it (`KillSourceAgent`, `Hang`).
    pub fn kind(self) -> String {
        match self {
            ChaosFault::Process(f) => format!("{f:?}"),
            ChaosFault::Api(f) => format!("{f:?}"),
        }
    }
}

/// One migration's fault.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Planned {
    pub mode: ControlMode,
    pub fault: ChaosFault,
    pub point: Point,
}

impl Planned {
    /// `[PeerToPeer/]<fault>:<point>`, as the matrices name their rows.
    pub fn name(&self) -> String {
        match self.fault {
            ChaosFault::Process(f) => name_of(self.mode, f, self.point),
            ChaosFault::Api(f) => name_of(self.mode, f, self.point),
        }
    }
}

/// The rows a migration may draw: every row of both matrices in both modes but the QEMU
/// kills, which kill the guest by design (the soak counts guests lost; the matrices
/// check what a killed QEMU leaves).
pub fn rows() -> Vec<Planned> {
    let process = MODES
        .iter()
        .flat_map(|m| all_rows(*m))
        .filter_map(|(mode, f, point)| {
            let qemu = matches!(f, Fault::KillSourceQemu | Fault::KillTargetQemu);
            (!qemu).then_some(Planned {
                mode,
                fault: ChaosFault::Process(f),
                point,
            })
        });
    let api = MODES
        .iter()
        .flat_map(|m| all_api_rows(*m))
        .map(|(mode, f, point)| Planned {
            mode,
            fault: ChaosFault::Api(f),
            point,
        });
    process.chain(api).collect()
}

/// `n` draws from [`rows`], each row equally likely, from `seed` (the same seed gives
/// the same plan with the same Cargo.lock).
pub fn plan(seed: u64, n: usize) -> Vec<Planned> {
    let rows = rows();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rows[rng.random_range(0..rows.len())])
        .collect()
}

/// How many of a kind of fault a soak planned, and how many of them landed (the
/// process paused at the point and the fault met something: a request failed, a
/// connection cut, a process killed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub planned: usize,
    pub landed: usize,
}

/// The soak's faults by kind.
#[derive(Debug, Default)]
pub struct Tallies(pub BTreeMap<String, Tally>);

impl Tallies {
    pub fn count(&mut self, fault: ChaosFault, landed: bool) {
        let t = self.0.entry(fault.kind()).or_default();
        t.planned += 1;
        t.landed += usize::from(landed);
    }

    /// A table: kind, planned, landed; then the totals.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| fault              | planned | landed |\n|--------------------|---------|--------|\n",
        );
        let (mut planned, mut landed) = (0, 0);
        for (kind, t) in &self.0 {
            out.push_str(&format!(
                "| {kind:<18} | {:>7} | {:>6} |\n",
                t.planned, t.landed
            ));
            planned += t.planned;
            landed += t.landed;
        }
        out.push_str(&format!("| {:<18} | {planned:>7} | {landed:>6} |\n", "all"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_of_both_matrices_but_the_qemu_kills() {
        let rows = rows();
        // 4 process faults × 10 points and 65 API rows, in each of 2 modes.
        assert_eq!(rows.len(), 2 * (4 * 10 + 65));
        assert!(rows.iter().all(|r| !matches!(
            r.fault,
            ChaosFault::Process(Fault::KillSourceQemu | Fault::KillTargetQemu)
        )));
        for mode in MODES {
            assert!(rows.contains(&Planned {
                mode,
                fault: ChaosFault::Api(ApiFault::RestartApiserver),
                point: Point::DuringFinish,
            }));
            assert!(rows.contains(&Planned {
                mode,
                fault: ChaosFault::Process(Fault::CutStream),
                point: Point::PerformLate,
            }));
        }
    }

    #[test]
    fn a_seed_gives_its_plan_again_and_another_seed_another() {
        let a = plan(42, 200);
        assert_eq!(a.len(), 200);
        assert_eq!(a, plan(42, 200));
        assert_ne!(a, plan(43, 200));
        // A longer plan of the same seed begins with the shorter one.
        assert_eq!(plan(42, 20)[..], a[..20]);
        // 200 draws from 210 rows reach every kind of fault and both modes.
        let kinds: std::collections::BTreeSet<String> = a.iter().map(|p| p.fault.kind()).collect();
        assert!(kinds.len() >= 10, "{kinds:?}");
        assert!(a.iter().any(|p| p.mode == ControlMode::PeerToPeer));
        assert!(a.iter().any(|p| p.mode == ControlMode::Managed));
    }

    #[test]
    fn the_tally_counts_by_kind() {
        let mut t = Tallies::default();
        t.count(ChaosFault::Api(ApiFault::Hang), true);
        t.count(ChaosFault::Api(ApiFault::Hang), false);
        t.count(ChaosFault::Process(Fault::KillOperator), true);
        assert_eq!(
            t.0["Hang"],
            Tally {
                planned: 2,
                landed: 1
            }
        );
        assert_eq!(
            t.0["KillOperator"],
            Tally {
                planned: 1,
                landed: 1
            }
        );
        let table = t.table();
        assert!(
            table.contains("| Hang               |       2 |      1 |"),
            "{table}"
        );
        assert!(
            table.contains("| all                |       3 |      2 |"),
            "{table}"
        );
    }
}

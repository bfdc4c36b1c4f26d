//! The five phases and what they share: the phase names and the pure rules that say how
//! a migration ends (no QEMU, no I/O). One file per phase ([`begin`], [`prepare`],
//! [`perform`], [`finish`], [`confirm`], and [`save`], the Perform and Confirm of a
//! migration to a file); [`record`] holds the per-migration record that makes each phase
//! idempotent, and the phase outputs it keeps.

pub mod begin;
pub mod confirm;
pub mod finish;
pub mod perform;
pub mod prepare;
pub mod record;
pub mod save;

pub use record::{MigrationRecord, RECORD_FILE};

use serde::{Deserialize, Serialize};
use std::fmt;

/// The five phases of the v3 migration protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Begin,
    Prepare,
    Perform,
    Finish,
    Confirm,
}

impl Phase {
    /// Where the phase runs.
    pub fn runs_on_source(self) -> bool {
        matches!(self, Phase::Begin | Phase::Perform | Phase::Confirm)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How a migration stands, from QEMU's `query-migrate` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    /// No migration was started (or the last one ended before this attempt).
    NotStarted,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

/// Maps QEMU's MigrationStatus to a [`TransferState`].
pub fn transfer_state(status: Option<&str>) -> TransferState {
    match status {
        None | Some("none") => TransferState::NotStarted,
        Some("completed") => TransferState::Completed,
        Some("failed") => TransferState::Failed,
        Some("cancelled") => TransferState::Cancelled,
        // setup, active, cancelling, pre-switchover, device, postcopy-*, wait-unplug, ...
        Some(_) => TransferState::InProgress,
    }
}

/// May migration `migration` begin on a guest in `run_status` with migration status
/// `migration_status`, given the VM's migration record?
pub fn may_begin(
    run_status: &str,
    migration_status: Option<&str>,
    record: Option<&MigrationRecord>,
    migration: &str,
) -> Result<(), String> {
    // A record of an earlier migration that brought the guest here and resumed it is
    // history, not a hold.
    if let Some(r) = record
        && r.migration != migration
        && !r.finish.as_ref().is_some_and(|f| f.resumed)
    {
        return Err(format!("VM is held by migration '{}'", r.migration));
    }
    if !matches!(run_status, "running" | "paused") {
        return Err(format!("VM cannot migrate in state '{run_status}'"));
    }
    if transfer_state(migration_status) == TransferState::InProgress {
        return Err("a migration of this VM is already in progress".to_string());
    }
    Ok(())
}

/// What the target guest's state says in Finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// The stream arrived whole (or, after a switch to post-copy, the devices did) and
    /// the vCPUs wait for `cont`.
    Arrived,
    /// A previous Finish already resumed the guest.
    AlreadyResumed,
    /// The stream is in (or nearly) but QEMU has not left `inmigrate` yet: look again.
    Arriving,
    NotArrived(String),
}

/// Judges the target guest from `query-status` and `query-migrate`.
pub fn arrival(run_status: &str, migration_status: Option<&str>) -> Arrival {
    if crate::postcopy::in_post_copy(migration_status) {
        // After the switch to post-copy the devices are here once QEMU left `inmigrate`
        // (the source's "run" command); the rest of the memory follows while it runs.
        return match run_status {
            "paused" => Arrival::Arrived,
            "running" => Arrival::AlreadyResumed,
            "inmigrate" => Arrival::Arriving,
            s => Arrival::NotArrived(format!(
                "incoming migration is {}, guest is '{s}'",
                migration_status.unwrap_or_default()
            )),
        };
    }
    match (transfer_state(migration_status), run_status) {
        (TransferState::Completed, "paused" | "postmigrate") => Arrival::Arrived,
        (TransferState::Completed, "running") => Arrival::AlreadyResumed,
        (TransferState::Completed | TransferState::InProgress, "inmigrate") => Arrival::Arriving,
        (o, s) => Arrival::NotArrived(format!(
            "incoming migration is {}, guest is '{s}'",
            match o {
                TransferState::NotStarted => "not started",
                TransferState::InProgress => "still in progress",
                TransferState::Completed => "completed",
                TransferState::Failed => "failed",
                TransferState::Cancelled => "cancelled",
            }
        )),
    }
}

/// Whether Confirm(cancelled) should resume the source guest.
pub fn should_resume_source(run_status: &str, was_running: Option<bool>) -> bool {
    was_running != Some(false) && run_status != "running"
}

/// Refuses guest keys that are not safe directory names.
pub(crate) fn check_vm_name(vm: &str) -> Result<(), String> {
    if crate::domain::valid_vm_name(vm) {
        Ok(())
    } else {
        Err(format!("invalid VM name '{vm}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_rules() {
        assert_eq!(may_begin("running", None, None, "m1"), Ok(()));
        assert_eq!(may_begin("paused", Some("completed"), None, "m1"), Ok(()));
        assert!(may_begin("inmigrate", None, None, "m1").is_err());
        assert!(may_begin("running", Some("active"), None, "m1").is_err());
        let held = MigrationRecord::new("m0");
        assert_eq!(
            may_begin("running", None, Some(&held), "m1"),
            Err("VM is held by migration 'm0'".into())
        );
        assert_eq!(
            may_begin("running", None, Some(&MigrationRecord::new("m1")), "m1"),
            Ok(())
        );
        // The record of the migration that brought the guest here does not hold it.
        let arrived = MigrationRecord {
            finish: Some(record::FinishOutput {
                cookie: None,
                resumed: true,
            }),
            ..MigrationRecord::new("m0")
        };
        assert_eq!(may_begin("running", None, Some(&arrived), "m1"), Ok(()));
    }

    #[test]
    fn transfer_states_and_arrival() {
        assert_eq!(transfer_state(Some("active")), TransferState::InProgress);
        assert_eq!(
            transfer_state(Some("cancelling")),
            TransferState::InProgress
        );
        assert_eq!(transfer_state(Some("completed")), TransferState::Completed);
        assert_eq!(transfer_state(None), TransferState::NotStarted);
        assert_eq!(arrival("paused", Some("completed")), Arrival::Arrived);
        assert_eq!(
            arrival("running", Some("completed")),
            Arrival::AlreadyResumed
        );
        // The source saw the stream end; this side is still loading it.
        assert_eq!(arrival("inmigrate", Some("active")), Arrival::Arriving);
        assert_eq!(arrival("inmigrate", Some("completed")), Arrival::Arriving);
        assert!(matches!(arrival("inmigrate", None), Arrival::NotArrived(_)));
        assert!(matches!(
            arrival("paused", Some("failed")),
            Arrival::NotArrived(_)
        ));
    }

    #[test]
    fn after_the_switch_to_post_copy_the_guest_arrives_with_its_devices() {
        for status in ["postcopy-active", "postcopy-paused", "postcopy-recover"] {
            assert_eq!(
                arrival("paused", Some(status)),
                Arrival::Arrived,
                "{status}"
            );
            assert_eq!(
                arrival("running", Some(status)),
                Arrival::AlreadyResumed,
                "{status}"
            );
            // The devices are still on their way: QEMU has not had the "run" command.
            assert_eq!(arrival("inmigrate", Some(status)), Arrival::Arriving);
            assert!(matches!(
                arrival("shutdown", Some(status)),
                Arrival::NotArrived(_)
            ));
        }
    }

    #[test]
    fn resume_rules() {
        assert!(should_resume_source("postmigrate", Some(true)));
        assert!(should_resume_source("paused", None));
        assert!(!should_resume_source("paused", Some(false)));
        assert!(!should_resume_source("running", Some(true)));
    }
}

//! What the five phases share: the phase names, the decisions that say how a migration
//! ends, and the per-migration record that makes each phase idempotent.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

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

/// Per-migration record in the VM's state dir: what each phase already produced, so a
/// re-run after a crash returns the same result. Its presence on the source is also the
/// migration lock on the VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub migration: String,
    /// Whether the source vCPUs ran when Begin started (Confirm(cancelled) resumes only then).
    #[serde(default)]
    pub source_was_running: Option<bool>,
    /// Whether this migration's Perform issued `migrate`. A guest that once arrived here
    /// by migration reports that incoming migration as `completed`, which says nothing
    /// about an outgoing one that was never started.
    #[serde(default)]
    pub perform_started: bool,
    pub begin: Option<crate::begin::BeginOutput>,
    pub prepare: Option<crate::prepare::PrepareOutput>,
    pub perform: Option<crate::perform::PerformOutput>,
    pub finish: Option<crate::finish::FinishOutput>,
    /// What a migration to a file saved (its Perform).
    #[serde(default)]
    pub save: Option<crate::save::SaveOutput>,
}

pub const RECORD_FILE: &str = "migration.json";

impl MigrationRecord {
    pub fn new(migration: &str) -> Self {
        MigrationRecord {
            migration: migration.to_string(),
            ..Default::default()
        }
    }

    /// The record in `vm_dir`, if any.
    pub fn load(vm_dir: &Path) -> std::io::Result<Option<MigrationRecord>> {
        match std::fs::read(vm_dir.join(RECORD_FILE)) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The record of `migration` (a record of another migration is ignored).
    pub fn load_for(vm_dir: &Path, migration: &str) -> std::io::Result<Option<MigrationRecord>> {
        Ok(Self::load(vm_dir)?.filter(|r| r.migration == migration))
    }

    pub fn save(&self, vm_dir: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::node::write_atomic(&vm_dir.join(RECORD_FILE), &data)
    }

    pub fn remove(vm_dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(vm_dir.join(RECORD_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// How a migration stands, from QEMU's `query-migrate` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No migration was started (or the last one ended before this attempt).
    NotStarted,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

/// Maps QEMU's MigrationStatus to an [`Outcome`].
pub fn outcome(status: Option<&str>) -> Outcome {
    match status {
        None | Some("none") => Outcome::NotStarted,
        Some("completed") => Outcome::Completed,
        Some("failed") => Outcome::Failed,
        Some("cancelled") => Outcome::Cancelled,
        // setup, active, cancelling, pre-switchover, device, postcopy-*, wait-unplug, ...
        Some(_) => Outcome::InProgress,
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
    if outcome(migration_status) == Outcome::InProgress {
        return Err("a migration of this VM is already in progress".to_string());
    }
    Ok(())
}

/// What the target guest's state says in Finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// The stream arrived whole and the vCPUs wait for `cont`.
    Arrived,
    /// A previous Finish already resumed the guest.
    AlreadyResumed,
    /// The stream is in (or nearly) but QEMU has not left `inmigrate` yet: look again.
    Arriving,
    NotArrived(String),
}

/// Judges the target guest from `query-status` and `query-migrate`.
pub fn arrival(run_status: &str, migration_status: Option<&str>) -> Arrival {
    match (outcome(migration_status), run_status) {
        (Outcome::Completed, "paused" | "postmigrate") => Arrival::Arrived,
        (Outcome::Completed, "running") => Arrival::AlreadyResumed,
        (Outcome::Completed | Outcome::InProgress, "inmigrate") => Arrival::Arriving,
        (o, s) => Arrival::NotArrived(format!(
            "incoming migration is {}, guest is '{s}'",
            match o {
                Outcome::NotStarted => "not started",
                Outcome::InProgress => "still in progress",
                Outcome::Completed => "completed",
                Outcome::Failed => "failed",
                Outcome::Cancelled => "cancelled",
            }
        )),
    }
}

/// Whether Confirm(cancelled) should resume the source guest.
pub fn should_resume_source(run_status: &str, was_running: Option<bool>) -> bool {
    was_running != Some(false) && run_status != "running"
}

/// Checks a migration URI: only `tcp:<host>:<port>` reaches QEMU (an `exec:` URI would
/// run a command on the source node).
pub fn check_uri(uri: &str) -> Result<(), String> {
    let bad = || format!("migration URI '{uri}' is not tcp:<host>:<port>");
    let rest = uri.strip_prefix("tcp:").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// Refuses VM names that are not safe directory names.
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
            finish: Some(crate::finish::FinishOutput {
                cookie: None,
                resumed: true,
            }),
            ..MigrationRecord::new("m0")
        };
        assert_eq!(may_begin("running", None, Some(&arrived), "m1"), Ok(()));
    }

    #[test]
    fn outcomes_and_arrival() {
        assert_eq!(outcome(Some("active")), Outcome::InProgress);
        assert_eq!(outcome(Some("cancelling")), Outcome::InProgress);
        assert_eq!(outcome(Some("completed")), Outcome::Completed);
        assert_eq!(outcome(None), Outcome::NotStarted);
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
    fn resume_and_uri_rules() {
        assert!(should_resume_source("postmigrate", Some(true)));
        assert!(should_resume_source("paused", None));
        assert!(!should_resume_source("paused", Some(false)));
        assert!(!should_resume_source("running", Some(true)));
        assert_eq!(check_uri("tcp:127.0.0.3:4444"), Ok(()));
        assert!(check_uri("exec:rm -rf /").is_err());
        assert!(check_uri("tcp:127.0.0.3:0").is_err());
        assert!(check_uri("tcp:a b:1").is_err());
    }
}

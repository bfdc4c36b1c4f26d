//! The history limit: finished migrations (Succeeded, Failed, Cancelled) of one VM beyond
//! the newest N are deleted, the way a CronJob keeps its last N Jobs. Without it every
//! migration ever made stays in etcd and in the watch caches of the operator and the
//! agents, whose memory then grows with the number of migrations. Running migrations
//! are never touched; a deleted finished migration goes at once (its rollback finalizer
//! is removed as soon as the operator sees the deletion of a terminal migration).

use ferry_crds::VirtualMachineMigration;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

/// The finished migrations of `vm` to delete so that at most `limit` remain: the
/// oldest by the time they ended (`status.phaseTransitionTime` of the terminal phase),
/// then by creation, then by name. `all` may hold other VMs' migrations and running
/// ones; those and migrations already being deleted are left alone.
pub fn beyond_limit<'a>(
    all: &'a [VirtualMachineMigration],
    vm: &str,
    limit: usize,
) -> Vec<&'a VirtualMachineMigration> {
    let mut finished: Vec<&VirtualMachineMigration> = all
        .iter()
        .filter(|m| m.spec.vm_name == vm && m.metadata.deletion_timestamp.is_none())
        .filter(|m| {
            m.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(|p| p.is_terminal())
        })
        .collect();
    let key = |m: &VirtualMachineMigration| {
        let ended = m
            .status
            .as_ref()
            .and_then(|s| s.phase_transition_time.as_ref())
            .map(|t| t.0);
        let created = m.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (
            ended.or(created).unwrap_or(Timestamp::UNIX_EPOCH),
            created.unwrap_or(Timestamp::UNIX_EPOCH),
            m.name_any(),
        )
    };
    // Newest first; everything after the first `limit` goes.
    finished.sort_by_key(|m| std::cmp::Reverse(key(m)));
    finished.split_off(limit.min(finished.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::MigrationPhase;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn m(name: &str, vm: &str, phase: MigrationPhase, ended: i64) -> VirtualMachineMigration {
        let mut m: VirtualMachineMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"vmName": vm},
            "status": {"phase": phase},
        }))
        .unwrap();
        m.status.as_mut().unwrap().phase_transition_time =
            Some(Time(Timestamp::from_second(1_800_000_000 + ended).unwrap()));
        m
    }

    fn names(v: Vec<&VirtualMachineMigration>) -> Vec<String> {
        v.into_iter().map(|m| m.name_any()).collect()
    }

    #[test]
    fn keeps_the_newest_finished_migrations_of_each_vm() {
        use MigrationPhase::*;
        let all = vec![
            m("old-ok", "demo", Succeeded, 1),
            m("running", "demo", Perform, 0),
            m("new-ok", "demo", Succeeded, 5),
            m("failed", "demo", Failed, 3),
            m("cancelled", "demo", Cancelled, 2),
            m("other-vm", "other", Succeeded, 0),
            m("pending", "demo", Pending, 0),
        ];
        assert_eq!(
            names(beyond_limit(&all, "demo", 2)),
            ["cancelled", "old-ok"]
        );
        assert_eq!(names(beyond_limit(&all, "demo", 10)), Vec::<String>::new());
        assert_eq!(
            names(beyond_limit(&all, "demo", 0)),
            ["new-ok", "failed", "cancelled", "old-ok"]
        );
        assert_eq!(names(beyond_limit(&all, "other", 0)), ["other-vm"]);
        // One already being deleted is not counted or deleted again.
        let mut deleting = all.clone();
        deleting[0].metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert_eq!(names(beyond_limit(&deleting, "demo", 2)), ["cancelled"]);
    }
}

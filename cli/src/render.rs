//! A migration's status → what the plugin prints (pure).

use ferry_crds::{MigrationMode, MigrationPhase, VirtualMachineMigration};
use kube::ResourceExt;

const MIB: f64 = 1024.0 * 1024.0;

/// The progress bar's position and length (bytes), when Perform has reported some.
pub fn bytes(m: &VirtualMachineMigration) -> Option<(u64, u64)> {
    let p = m.status.as_ref()?.progress.as_ref()?;
    (p.bytes_total > 0).then(|| {
        (
            p.bytes_transferred.clamp(0, p.bytes_total) as u64,
            p.bytes_total as u64,
        )
    })
}

/// One line about where a migration is: phase, then while it transfers the percentage,
/// throughput, pass, mode and ETA.
pub fn progress_line(m: &VirtualMachineMigration) -> String {
    let status = m.status.clone().unwrap_or_default();
    let phase = status
        .phase
        .map_or("Pending".to_string(), |p| format!("{p:?}"));
    let mut line = phase;
    if status.phase == Some(MigrationPhase::Pending)
        && let Some(c) = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Admitted" && c.status == "False")
    {
        line.push_str(&format!(" ({}: {})", c.reason, c.message));
    }
    if let (Some(src), Some(dst)) = (&status.source_node, &status.target_node) {
        line.push_str(&format!(" {src} → {dst}"));
    }
    if let Some(p) = status.progress.filter(|p| p.bytes_total > 0) {
        let percent = p.bytes_transferred as f64 * 100.0 / p.bytes_total as f64;
        line.push_str(&format!(
            " {percent:.0}% {:.1} MiB/s pass {}",
            p.throughput_bytes_per_second as f64 / MIB,
            p.iteration
        ));
        match p.mode {
            Some(MigrationMode::PostCopy) => line.push_str(" post-copy"),
            _ => line.push_str(" pre-copy"),
        }
        if let Some(eta) = p.eta_seconds {
            line.push_str(&format!(" ETA {eta}s"));
        }
    }
    line
}

/// How a migration ended, if it has: whether it succeeded, and a line saying so.
pub fn outcome(m: &VirtualMachineMigration) -> Option<(bool, String)> {
    let status = m.status.clone().unwrap_or_default();
    let phase = status.phase.filter(|p| p.is_terminal())?;
    let name = m.name_any();
    let vm = &m.spec.vm_name;
    let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned();
    Some(match phase {
        MigrationPhase::Succeeded if m.spec.to_file.is_some() => {
            let line = match &status.saved_state {
                Some(s) => format!(
                    "{name}: Succeeded: {vm} saved on {} to {} ({:?}, {} of {} bytes, {:.1} s); \
                     the VM is stopped",
                    s.node,
                    s.path,
                    s.compression,
                    s.file_bytes,
                    s.stream_bytes,
                    s.save_time_ms.max(0) as f64 / 1000.0
                ),
                None => format!("{name}: Succeeded: {vm} saved; the VM is stopped"),
            };
            (true, line)
        }
        MigrationPhase::Succeeded => {
            let mut line = format!(
                "{name}: Succeeded: {vm} moved from {} to {}",
                status.source_node.as_deref().unwrap_or("?"),
                status.target_node.as_deref().unwrap_or("?")
            );
            if let Some(ms) = status.total_time_ms {
                line.push_str(&format!(
                    ", transfer {:.1} s",
                    std::time::Duration::from_millis(ms.max(0) as u64).as_secs_f64()
                ));
            }
            match status.downtime_ms {
                Some(ms) => line.push_str(&format!(", downtime {ms} ms")),
                None => line.push_str(", downtime unknown"),
            }
            (true, line)
        }
        other => {
            let why = condition("Failed")
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_default();
            (
                false,
                format!("{name}: {other:?} ({why}); {vm} stays where it was"),
            )
        }
    })
}

/// Of `migrations` (all of one namespace), the one `name` designates: the migration of
/// that name; else, taking `name` as a VM, the one holding it (`holder`, the VM's
/// `status.migration`), else its migration that has not ended, else (when
/// `ended_too`) its newest.
pub fn designated<'a>(
    migrations: &'a [VirtualMachineMigration],
    name: &str,
    holder: Option<&str>,
    ended_too: bool,
) -> Option<&'a VirtualMachineMigration> {
    if let Some(m) = migrations.iter().find(|m| m.name_any() == name) {
        return Some(m);
    }
    if let Some(h) = holder
        && let Some(m) = migrations.iter().find(|m| m.name_any() == h)
    {
        return Some(m);
    }
    let of_vm = || migrations.iter().filter(|m| m.spec.vm_name == name);
    let ended = |m: &VirtualMachineMigration| {
        m.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(MigrationPhase::is_terminal)
    };
    if let Some(m) = of_vm()
        .filter(|m| !ended(m))
        .max_by_key(|m| m.creation_timestamp())
    {
        return Some(m);
    }
    if ended_too {
        return of_vm().max_by_key(|m| m.creation_timestamp());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(
        name: &str,
        vm: &str,
        status: serde_json::Value,
        created: &str,
    ) -> VirtualMachineMigration {
        serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"vmName": vm},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn the_line_shows_phase_nodes_and_transfer() {
        let perform = m(
            "demo-x",
            "demo",
            json!({"phase": "Perform", "sourceNode": "node-a", "targetNode": "node-b",
                   "progress": {"bytesTotal": 268435456, "bytesTransferred": 134217728,
                                "throughputBytesPerSecond": 91750400, "iteration": 2,
                                "mode": "PreCopy", "etaSeconds": 3}}),
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(
            progress_line(&perform),
            "Perform node-a → node-b 50% 87.5 MiB/s pass 2 pre-copy ETA 3s"
        );
        assert_eq!(bytes(&perform), Some((134217728, 268435456)));

        let waiting = m(
            "demo-y",
            "demo",
            json!({"phase": "Pending", "conditions": [{"type": "Admitted", "status": "False",
                   "reason": "LimitReached", "message": "2 migrations are leaving node node-a (limit 2)",
                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(
            progress_line(&waiting),
            "Pending (LimitReached: 2 migrations are leaving node node-a (limit 2))"
        );
        assert_eq!(bytes(&waiting), None);
        let fresh = m("demo-z", "demo", json!(null), "2026-01-01T00:00:00Z");
        assert_eq!(progress_line(&fresh), "Pending");
    }

    #[test]
    fn the_outcome_says_where_and_the_downtime_or_why_not() {
        let ok = m(
            "demo-x",
            "demo",
            json!({"phase": "Succeeded", "sourceNode": "node-a", "targetNode": "node-b",
                   "downtimeMs": 37, "totalTimeMs": 2500}),
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(
            outcome(&ok),
            Some((
                true,
                "demo-x: Succeeded: demo moved from node-a to node-b, transfer 2.5 s, downtime 37 ms"
                    .into()
            ))
        );
        let mut saved = m(
            "demo-s",
            "demo",
            json!({"phase": "Succeeded", "sourceNode": "node-a",
                   "savedState": {"path": "/saves/demo.fsav", "compression": "Zstd",
                                  "node": "node-a", "streamBytes": 50000000,
                                  "fileBytes": 600000, "saveTimeMs": 1500}}),
            "2026-01-01T00:00:00Z",
        );
        saved.spec.to_file =
            Some(serde_json::from_value(json!({"path": "/saves/demo.fsav"})).unwrap());
        assert_eq!(
            outcome(&saved),
            Some((
                true,
                "demo-s: Succeeded: demo saved on node-a to /saves/demo.fsav (Zstd, 600000 of \
                 50000000 bytes, 1.5 s); the VM is stopped"
                    .into()
            ))
        );
        let cancelled = m(
            "demo-y",
            "demo",
            json!({"phase": "Cancelled", "conditions": [{"type": "Failed", "status": "True",
                   "reason": "Cancelled", "message": "cancelled during Perform",
                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
            "2026-01-01T00:00:00Z",
        );
        let (success, line) = outcome(&cancelled).unwrap();
        assert!(!success);
        assert_eq!(
            line,
            "demo-y: Cancelled (Cancelled: cancelled during Perform); demo stays where it was"
        );
        let running = m(
            "demo-z",
            "demo",
            json!({"phase": "Perform"}),
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(outcome(&running), None);
    }

    #[test]
    fn a_name_designates_a_migration_or_a_vms_current_one() {
        let ms = [
            m(
                "old",
                "demo",
                json!({"phase": "Succeeded"}),
                "2026-01-01T00:00:00Z",
            ),
            m(
                "newer",
                "demo",
                json!({"phase": "Failed"}),
                "2026-01-02T00:00:00Z",
            ),
            m(
                "live",
                "web",
                json!({"phase": "Perform"}),
                "2026-01-01T00:00:00Z",
            ),
        ];
        let name = |m: Option<&VirtualMachineMigration>| m.map(|m| m.name_any());
        assert_eq!(
            name(designated(&ms, "old", None, false)).as_deref(),
            Some("old")
        );
        assert_eq!(
            name(designated(&ms, "web", None, false)).as_deref(),
            Some("live")
        );
        assert_eq!(
            name(designated(&ms, "demo", None, false)),
            None,
            "nothing active"
        );
        assert_eq!(
            name(designated(&ms, "demo", None, true)).as_deref(),
            Some("newer")
        );
        assert_eq!(
            name(designated(&ms, "demo", Some("old"), false)).as_deref(),
            Some("old"),
            "the VM's holder first"
        );
        assert_eq!(name(designated(&ms, "nothing", None, true)), None);
    }
}

//! The policy a migration runs with: the cluster-wide defaults (the chart's
//! `migrations.defaultPolicy`) overlaid with the migration's own `spec.policy`.

use ferry_crds::MigrationPolicy;

/// Each field the migration sets wins. A migration that names its own preset gets that
/// preset and its own fields only: the cluster's fields were chosen for the cluster's
/// preset and would silently change the one the user picked.
pub fn effective(defaults: &MigrationPolicy, spec: &MigrationPolicy) -> MigrationPolicy {
    if spec.preset.is_some() {
        return spec.clone();
    }
    let d = defaults.clone();
    let s = spec.clone();
    MigrationPolicy {
        preset: d.preset,
        bandwidth_mi_bps: s.bandwidth_mi_bps.or(d.bandwidth_mi_bps),
        max_downtime_ms: s.max_downtime_ms.or(d.max_downtime_ms),
        parallel_connections: s.parallel_connections.or(d.parallel_connections),
        compression: s.compression.or(d.compression),
        auto_converge: s.auto_converge.or(d.auto_converge),
        post_copy: s.post_copy.or(d.post_copy),
        completion_timeout_per_gi_b_seconds: s
            .completion_timeout_per_gi_b_seconds
            .or(d.completion_timeout_per_gi_b_seconds),
        progress_timeout_seconds: s.progress_timeout_seconds.or(d.progress_timeout_seconds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::Preset;

    fn policy(json: serde_json::Value) -> MigrationPolicy {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_migration_overrides_the_cluster_field_by_field() {
        let defaults = policy(
            serde_json::json!({"preset": "Safest", "bandwidthMiBps": 100, "maxDowntimeMs": 200}),
        );
        let spec = policy(serde_json::json!({"maxDowntimeMs": 50}));
        let e = effective(&defaults, &spec);
        assert_eq!(e.preset, Some(Preset::Safest));
        assert_eq!(e.bandwidth_mi_bps, Some(100));
        assert_eq!(e.max_downtime_ms, Some(50));
        assert_eq!(effective(&MigrationPolicy::default(), &spec), spec);
    }

    #[test]
    fn a_preset_named_by_the_migration_ignores_the_cluster_fields() {
        let defaults = policy(serde_json::json!({"preset": "Safest", "bandwidthMiBps": 100}));
        let spec = policy(serde_json::json!({"preset": "Fastest"}));
        assert_eq!(effective(&defaults, &spec), spec);
    }
}

//! Prometheus metrics: migrations by outcome, phase durations, bytes, downtime, and
//! reconcile errors by kind.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// The operator's metrics and the registry that serves them.
pub struct Metrics {
    pub registry: Registry,
    pub migrations: Family<OutcomeLabels, Counter>,
    pub phase_seconds: Family<PhaseLabels, Histogram>,
    pub downtime_seconds: Histogram,
    pub bytes_transferred: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let migrations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "migrations",
            "Migrations that ended, by outcome (Succeeded, Failed, Cancelled)",
            migrations.clone(),
        );
        let phase_seconds = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 16))
        });
        registry.register(
            "migration_phase_duration_seconds",
            "How long each migration phase took on its agent",
            phase_seconds.clone(),
        );
        let downtime_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "migration_downtime_seconds",
            "Guest downtime of successful migrations",
            downtime_seconds.clone(),
        );
        let bytes_transferred = Counter::default();
        registry.register(
            "migration_transferred_bytes",
            "Bytes of guest state sent by successful migrations",
            bytes_transferred.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by kind of error",
            reconcile_errors.clone(),
        );
        Metrics {
            registry,
            migrations,
            phase_seconds,
            downtime_seconds,
            bytes_transferred,
            reconcile_errors,
        }
    }
}

impl Metrics {
    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

//! The operator's settings, from flags (and the chart's values).

use std::time::Duration;

/// How many migrations may run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// In the whole cluster.
    pub max_parallel: usize,
    /// Leaving any one node.
    pub max_outbound_per_node: usize,
}

/// How long each phase may take before the operator gives up on it. Confirm has none:
/// it runs again until the old QEMU is gone (or the source guest resumed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub begin: Duration,
    pub prepare: Duration,
    pub perform: Duration,
    pub finish: Duration,
    /// How long a post-copy migration may stay paused (its stream cut) before the
    /// operator reports the recovery overdue. It does not end the migration then: the
    /// guest's memory is split between the two QEMUs and any end but a recovery loses it.
    pub post_copy_paused: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            begin: Duration::from_secs(60),
            prepare: Duration::from_secs(120),
            perform: Duration::from_secs(1800),
            finish: Duration::from_secs(120),
            post_copy_paused: Duration::from_secs(600),
        }
    }
}

//! A migration's policy (`spec.policy`): how the transfer behaves — a named preset and
//! the fields that override it. The agent turns it into QEMU's migration capabilities
//! and parameters and decides, pass by pass, what to do (agent/src/policy.rs).

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the transfer behaves: a named preset, and explicit fields that override what the
/// preset sets. Absent fields take the preset's value.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicy {
    /// A named set of the fields below, for users who do not want to tune; absent means
    /// Balanced. Every field set explicitly overrides the preset's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,

    /// Maximum bandwidth of the migration stream in MiB/s, before and after a switch to
    /// post-copy. 0 or absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub bandwidth_mi_bps: Option<i64>,

    /// The longest the guest may be paused for the final switch-over, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_downtime_ms: Option<i64>,

    /// Number of parallel connections (QEMU multifd channels, set on both sides). 1 is a
    /// single stream. More than 1 is not compatible with post-copy (see `compression`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub parallel_connections: Option<i32>,

    /// Compression of the stream (zstd or zlib, over multifd: it turns multifd on even
    /// with one connection). Not compatible with post-copy: set explicitly, it turns off
    /// the post-copy a preset allows; set explicitly together with post-copy, the
    /// migration is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,

    /// Throttle the guest's vCPUs when memory is dirtied faster than it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<bool>,

    /// Whether and when to switch to post-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy: Option<PostCopy>,

    /// Abort when the transfer takes longer than this many seconds per GiB of guest
    /// memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub completion_timeout_per_gi_b_seconds: Option<i64>,

    /// Abort when the remaining data has not shrunk for this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_timeout_seconds: Option<i64>,
}

/// Named migration policies. None of them limits the bandwidth (QEMU's own default of
/// 128 MiB/s is never used: the agent always sets the limit, unlimited unless
/// `bandwidthMiBps` says otherwise) or compresses the stream.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Preset {
    /// Shortest total time: 4 parallel connections (multifd), auto-converge, max
    /// downtime 1000 ms, post-copy Never (QEMU 10.0 cannot switch a multifd stream to
    /// post-copy), completion timeout 150 s per GiB, progress timeout 60 s.
    Fastest,
    /// The guest's state is never split between two hosts: one connection,
    /// auto-converge, max downtime 300 ms, post-copy Never, completion timeout 800 s
    /// per GiB, progress timeout 300 s. A guest that does not converge even with its
    /// vCPUs throttled is aborted by a timeout and keeps running on the source.
    Safest,
    /// The default: one connection, auto-converge, max downtime 500 ms, post-copy
    /// Allowed as a last resort (only when pre-copy still does not converge with the
    /// vCPUs throttled to the maximum, 99 %), completion timeout 300 s per GiB,
    /// progress timeout 150 s. Post-copy needs userfaultfd on the target node.
    #[default]
    Balanced,
}

/// Compression of the migration stream.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Compression {
    /// No compression.
    None,
    /// zstd (multifd).
    Zstd,
    /// zlib (multifd).
    Zlib,
}

/// Whether and when to switch a migration to post-copy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.mode != 'AfterSeconds' || has(self.afterSeconds)").message("afterSeconds is required when mode is AfterSeconds"))]
pub struct PostCopy {
    /// Never: pre-copy only. Allowed: switch when pre-copy does not converge (the dirty
    /// rate stayed at or above 90 % of the throughput over the last 3 passes and, with
    /// auto-converge, the vCPUs are throttled to the maximum). AfterSeconds: switch
    /// after `afterSeconds` of pre-copy. The completion and progress timeouts only
    /// apply before the switch: a post-copy migration cannot be cancelled.
    pub mode: PostCopyMode,
    /// Seconds of pre-copy before switching, with mode AfterSeconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub after_seconds: Option<i64>,
}

/// When a migration may switch to post-copy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PostCopyMode {
    /// Pre-copy only.
    Never,
    /// Switch when pre-copy does not converge.
    Allowed,
    /// Switch after a fixed time of pre-copy.
    AfterSeconds,
}

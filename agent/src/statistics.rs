//! A migration's statistics, carried by the Perform and Finish cookies: QEMU's own
//! figures from the source, and the two moments that bound what the guest lived
//! through — the source pausing it and the target resuming it.
//!
//! QEMU's `downtime` counts from the source pausing the guest to the stream's end. The
//! target starts with `-S`, so the guest stays paused until Finish resumes it there,
//! after the hand-over of ownership (docs/protocol.md, "Who owns the guest"): the
//! guest's downtime is longer. Both moments come from QEMU's event timestamps (`STOP`
//! on the source, `RESUME` on the target), each by its own host's wall clock.

use crate::qmp::MigrationInfo;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Statistics {
    pub total_time_ms: u64,
    /// QEMU's downtime: the source pausing the guest → the stream's end.
    pub downtime_ms: u64,
    pub setup_time_ms: u64,
    pub transferred_bytes: u64,
    pub total_bytes: u64,
    /// Number of RAM passes (QEMU's dirty-sync-count).
    pub passes: u64,
    /// When the source paused the guest for the switch-over (its QEMU's `STOP` event),
    /// in milliseconds since the Unix epoch by the source's clock; `None` when the
    /// source agent did not see the event (e.g. it restarted during Perform).
    pub stopped_at_ms: Option<u64>,
    /// When the target resumed the guest (its QEMU's `RESUME` event after Finish's
    /// `cont`), by the target's clock; written by Finish.
    pub resumed_at_ms: Option<u64>,
}

/// Clocks of two nodes differ by this much at most before a guest downtime computed
/// across them is not believed: a resume more than this before the pause.
pub const CLOCK_SKEW_TOLERANCE_MS: u64 = 1000;

impl Statistics {
    /// QEMU's figures of a finished outgoing migration.
    pub fn from_info(info: &MigrationInfo) -> Statistics {
        let ram = info.ram.clone().unwrap_or_default();
        Statistics {
            total_time_ms: info.total_time.unwrap_or(0),
            downtime_ms: info.downtime.unwrap_or(0),
            setup_time_ms: info.setup_time.unwrap_or(0),
            transferred_bytes: ram.transferred,
            total_bytes: ram.total,
            passes: ram.dirty_sync_count,
            stopped_at_ms: None,
            resumed_at_ms: None,
        }
    }

    /// How long the guest ran nowhere: the source pausing it → the target resuming it,
    /// never less than QEMU's own downtime (which the guest lived through too). `None`
    /// without both moments, or when the target's clock puts the resume more than
    /// [`CLOCK_SKEW_TOLERANCE_MS`] before the pause (the two clocks disagree; QEMU's
    /// figure is then all there is). A resume slightly before the pause (skew within the
    /// tolerance) counts as QEMU's figure.
    pub fn guest_downtime_ms(&self) -> Option<u64> {
        let (stopped, resumed) = (self.stopped_at_ms?, self.resumed_at_ms?);
        if resumed + CLOCK_SKEW_TOLERANCE_MS < stopped {
            return None;
        }
        Some(resumed.saturating_sub(stopped).max(self.downtime_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(downtime_ms: u64, stopped: Option<u64>, resumed: Option<u64>) -> Statistics {
        Statistics {
            downtime_ms,
            stopped_at_ms: stopped,
            resumed_at_ms: resumed,
            ..Default::default()
        }
    }

    #[test]
    fn guest_downtime_runs_from_the_pause_to_the_resume() {
        let s = stats(12, Some(1_000_000), Some(1_000_180));
        assert_eq!(s.guest_downtime_ms(), Some(180));
    }

    #[test]
    fn guest_downtime_is_never_less_than_qemus() {
        // QEMU rounds a sub-millisecond stop-and-copy down to 0; the guest still
        // waited for Finish. And a skewed clock cannot make it shorter than QEMU saw.
        assert_eq!(
            stats(0, Some(1_000_000), Some(1_000_040)).guest_downtime_ms(),
            Some(40)
        );
        assert_eq!(
            stats(25, Some(1_000_000), Some(1_000_010)).guest_downtime_ms(),
            Some(25)
        );
        assert_eq!(
            stats(25, Some(1_000_000), Some(999_500)).guest_downtime_ms(),
            Some(25)
        );
    }

    #[test]
    fn no_guest_downtime_without_both_moments_or_across_a_clock_jump() {
        assert_eq!(stats(12, None, Some(1_000_180)).guest_downtime_ms(), None);
        assert_eq!(stats(12, Some(1_000_000), None).guest_downtime_ms(), None);
        assert_eq!(
            stats(12, Some(1_000_000), Some(998_999)).guest_downtime_ms(),
            None
        );
        assert_eq!(
            stats(12, Some(1_000_000), Some(999_000)).guest_downtime_ms(),
            Some(12)
        );
    }
}

//! The condition types of a migration, named in one place: the operator sets each of
//! them through these constants, and a reader can look them up by the same names.

/// False while the migration waits in Pending (the reason says for what); True once
/// the operator admitted it.
pub const ADMITTED: &str = "Admitted";
/// Why a rollback started.
pub const ROLLING_BACK: &str = "RollingBack";
/// The guest runs on the target (False when the migration ended otherwise).
pub const COMPLETE: &str = "Complete";
/// The migration ended without moving the guest; the reason and message say why.
pub const FAILED: &str = "Failed";
/// Whether pre-copy converges, as the source agent judges it.
pub const CONVERGING: &str = "Converging";
/// A cut stream paused a post-copy migration (False once recovered).
pub const POST_COPY_PAUSED: &str = "PostCopyPaused";

/// Every condition type of a migration.
pub const ALL: &[&str] = &[
    ADMITTED,
    ROLLING_BACK,
    COMPLETE,
    FAILED,
    CONVERGING,
    POST_COPY_PAUSED,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_types_are_distinct_camel_case_words() {
        for (i, t) in ALL.iter().enumerate() {
            assert!(t.chars().next().unwrap().is_ascii_uppercase(), "{t}");
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric()), "{t}");
            assert!(!ALL[..i].contains(t), "{t} twice");
        }
    }
}

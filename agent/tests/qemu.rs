//! The probe of this node's QEMU (`ferry_agent::qemu::probe`) against the real
//! `qemu-system-x86_64`: the release Ferry supports, and every capability the presets use.

use ferry_agent::policy::preset;
use ferry_agent::qemu::{SUPPORTED, probe};
use ferry_crds::Preset;

#[tokio::test]
async fn the_probe_finds_the_supported_qemu_and_what_the_presets_need() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = probe("qemu-system-x86_64", dir.path()).await.unwrap();
    println!(
        "QEMU {} ({}): {}",
        qemu.version,
        qemu.package,
        qemu.capabilities_line()
    );
    assert!(
        qemu.is_supported(),
        "QEMU {} is older than {SUPPORTED:?}: install it from bookworm-backports (.ci/run)",
        qemu.version
    );
    for p in [Preset::Balanced, Preset::Fastest, Preset::Safest] {
        qemu.check(&preset(p), "this-node").unwrap();
    }
    for c in ["postcopy-preempt", "mapped-ram", "switchover-ack"] {
        assert!(qemu.has(c), "QEMU {} has no {c}", qemu.version);
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "the probe left its socket behind"
    );
}

#[tokio::test]
async fn a_missing_qemu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = probe("qemu-system-nonexistent", dir.path())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("starting qemu-system-nonexistent: "),
        "{err}"
    );
}

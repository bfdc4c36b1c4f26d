//! Migration to a file and restore, real QEMU: save on node-a with each compressor,
//! restore on node-b (another state dir and host uuid), the guest's counter and memory
//! go on; bad files (truncated, changed, signed with another cluster's key, of the
//! unsigned format version 1) are refused before any QEMU starts. The files are beneath
//! a storage root of both nodes, in the namespace's directory
//! ([`Lab::with_save_root`]); both nodes hold the lab's state key ([`Lab::key`]). Run
//! with `--nocapture` for the table of sizes and times per compressor.

mod support;

use ferry_agent::domain::Domain;
use ferry_agent::restore::{RestoreError, restore};
use ferry_agent::statefile::craft::resign;
use ferry_agent::statefile::{Compression, UNSIGNED_VERSION};
use std::path::Path;
use std::time::Duration;
use support::*;

/// Begin, save and Confirm on node-a; returns the save and the source's serial log.
async fn save_on_a(
    lab: &Lab,
    m: &str,
    path: &Path,
    c: Compression,
) -> (ferry_agent::phases::save::SaveOutput, String) {
    let vm = lab.vm.as_str();
    lab.begin(m, None).await.unwrap();
    let out = within(lab.save(m, path, c)).await.unwrap();
    // Idempotent: a re-run returns the recorded result.
    let again = lab.save(m, path, c).await.unwrap();
    assert_eq!(again, out);
    // The source guest is paused, its serial log complete.
    assert_eq!(lab.run_status(&lab.a).await, "postmigrate");
    let before = std::fs::read_to_string(lab.serial_a()).unwrap();
    assert_eq!(lab.confirm_saved(m).await.unwrap().as_ref(), Some(&out));
    assert_eq!(lab.confirm_saved(m).await.unwrap(), None);
    assert!(lab.qemu_pids().is_empty(), "no QEMU runs once saved");
    assert!(!lab.a.vm_dir(vm).exists());
    (out, before)
}

#[tokio::test]
async fn save_with_each_compressor_and_restore_on_another_node() {
    let mut rows = Vec::new();
    for c in Compression::ALL {
        // 128 MiB guest rewriting 1..48 MiB.
        let lab =
            Lab::new(&format!("save-{c}").to_lowercase(), 128, 48, 5_000_000).with_save_root();
        lab.start_source().await;
        let path = lab.save_path(&format!("guest.{c}.fsav"));
        let (out, before) = save_on_a(&lab, "m-save", &path, c).await;
        assert_eq!(out.compression, c);
        assert_eq!(out.file_bytes, std::fs::metadata(&path).unwrap().len());
        assert!(out.stream_bytes > 0);

        let domain = Domain::parse(&lab.xml()).unwrap();
        let restored = within(restore(
            &lab.b,
            &lab.vm,
            &domain,
            OWNER,
            text(&path),
            &lab.key,
        ))
        .await
        .unwrap();
        assert_eq!(restored.stream_bytes, out.stream_bytes);
        lab.assert_one_guest_on(&lab.b);
        lab.assert_continues_on_b(&before, 3).await;
        // The file is left as it was: it can be restored again elsewhere.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), out.file_bytes);
        rows.push((c, out, restored));
    }
    println!("\nsave and restore of a 128 MiB guest rewriting 47 MiB (TCG; times vary with load):");
    println!(
        "{:<12}{:>14}{:>14}{:>8}{:>11}{:>12}{:>11}",
        "compression", "stream bytes", "file bytes", "ratio", "save ms", "verify ms", "load ms"
    );
    for (c, out, r) in &rows {
        println!(
            "{:<12}{:>14}{:>14}{:>7.1}%{:>11}{:>12}{:>11}",
            c.to_string(),
            out.stream_bytes,
            out.file_bytes,
            out.file_bytes as f64 * 100.0 / out.stream_bytes as f64,
            out.save_time_ms,
            r.verify_ms,
            r.load_ms
        );
    }
}

#[tokio::test]
async fn bad_files_are_refused_before_qemu_starts_and_nothing_changes() {
    let lab = Lab::new("badfile", 64, 32, 5_000_000).with_save_root();
    lab.start_source().await;
    let vm = lab.vm.as_str();
    let path = lab.save_path("guest.fsav");
    let (_, before) = save_on_a(&lab, "m-bad", &path, Compression::Zstd).await;
    let good = std::fs::read(&path).unwrap();
    let domain = Domain::parse(&lab.xml()).unwrap();

    let truncated = lab.save_path("truncated.fsav");
    std::fs::write(&truncated, &good[..good.len() * 2 / 3]).unwrap();
    // A byte changed: the MAC no longer matches (checked before anything decompresses).
    let corrupted = lab.save_path("corrupted.fsav");
    let mut bytes = good.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&corrupted, &bytes).unwrap();
    // Valid in every respect but signed with another cluster's key.
    let foreign = lab.save_path("foreign.fsav");
    std::fs::write(&foreign, resign(&good, &other_key()).unwrap()).unwrap();
    // The previous format, which carried no MAC.
    let unsigned = lab.save_path("unsigned.fsav");
    let mut bytes = good.clone();
    bytes[8..10].copy_from_slice(&UNSIGNED_VERSION.to_le_bytes());
    std::fs::write(&unsigned, &bytes).unwrap();
    let other_guest = Domain::parse(&lab.xml().replace(
        &lab.uuid.to_string(),
        "00000000-0000-4000-8000-000000000001",
    ))
    .unwrap();
    let bigger = Domain::parse(&lab.xml_with(&lab.disk, 1, "ide", 128, "")).unwrap();
    let cases: [(&Path, &Domain, &str, &str); 6] = [
        (&truncated, &domain, "StateFileTruncated", "is truncated"),
        (
            &corrupted,
            &domain,
            "StateFileBadMac",
            "not those the key signed",
        ),
        (
            &foreign,
            &domain,
            "StateFileBadMac",
            "not this cluster's key",
        ),
        (&unsigned, &domain, "StateFileUnsigned", "carries no MAC"),
        (&path, &other_guest, "StateFileWrongVM", "holds VM"),
        (
            &path,
            &bigger,
            "AbiMismatch",
            "target memory '131072 KiB' does not match source '65536 KiB'",
        ),
    ];
    for (file, dom, reason, says) in cases {
        let on_disk = std::fs::read(file).unwrap();
        let err = restore(&lab.b, &lab.vm, dom, OWNER, text(file), &lab.key)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), reason, "{err}");
        assert!(err.to_string().contains(says), "{err}");
        assert!(matches!(
            err,
            RestoreError::File(_) | RestoreError::Abi { .. }
        ));
        assert!(lab.qemu_pids().is_empty(), "a QEMU was started for {err}");
        assert!(!lab.b.vm_dir(vm).exists(), "node-b has state for {err}");
        assert_eq!(std::fs::read(file).unwrap(), on_disk, "the file changed");
    }
    // The good file still restores, and the guest goes on.
    within(restore(
        &lab.b,
        &lab.vm,
        &domain,
        OWNER,
        text(&path),
        &lab.key,
    ))
    .await
    .unwrap();
    lab.assert_continues_on_b(&before, 2).await;
    // A second restore while it runs is refused.
    let err = restore(&lab.b, &lab.vm, &domain, OWNER, text(&path), &lab.key)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "AlreadyRunning", "{err}");
    lab.assert_one_guest_on(&lab.b);
}

#[tokio::test]
async fn a_save_that_cannot_write_rolls_back_and_the_guest_goes_on() {
    let lab = Lab::new("nowrite", 64, 32, 5_000_000).with_save_root();
    // A 1 MiB filesystem as the namespace's directory (a mount point beneath a root is
    // crossed): the writer fails with ENOSPC, QEMU's stream breaks, the save fails with
    // the writer's error and Confirm(cancelled) resumes the guest.
    let Some(_full) = Tmpfs::mount(&lab.save_root().join(NAMESPACE), "size=1m") else {
        eprintln!("skipped: this test needs to mount a tmpfs (root, CAP_SYS_ADMIN)");
        return;
    };
    lab.start_source().await;
    let path = lab.save_path("guest.fsav");
    lab.begin("m-full", None).await.unwrap();
    let err = within(lab.save("m-full", &path, Compression::None))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("writing the stream"), "{err}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(lab.confirm_saved("m-full").await.is_err());
    lab.confirm(&lab.a, "m-full", None, true).await.unwrap();
    assert_eq!(lab.run_status(&lab.a).await, "running");
    let last = last_pass(&lab.serial_a()).unwrap();
    wait_for_pass(&lab.serial_a(), last + 2, Duration::from_secs(120)).await;
    // Neither the file nor its temporary file is left.
    let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    lab.assert_one_guest_on(&lab.a);
}

/// A path as the spec would write it.
fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// A tmpfs mounted over a directory while it lives.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts one at `dir` with `options`; `None` where this process may not mount.
    fn mount(dir: &Path, options: &str) -> Option<Tmpfs> {
        use nix::mount::{MsFlags, mount};
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options),
        )
        .ok()?;
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// What a save whose agent died mid-transfer leaves, planted as such an attempt leaves
/// it: the temporary file (its `Finalize` neither committed nor dropped) and the
/// migration record naming it. Returns the file.
fn plant_dead_attempt(lab: &Lab, m: &str, path: &Path) -> std::path::PathBuf {
    use ferry_agent::phases::MigrationRecord;
    use ferry_agent::phases::record::PartialSave;
    use ferry_agent::storage::{UserPath, create_save};
    let path = path.to_str().unwrap();
    let user = UserPath {
        field: "spec.toFile.path",
        path,
    };
    let (fd, finalize) = create_save(&lab.a.node().storage, NAMESPACE, user).unwrap();
    drop(std::fs::File::from(fd));
    let temp = finalize.temp_name();
    std::mem::forget(finalize);
    let dir = lab.a.vm_dir(&lab.vm);
    let mut record = MigrationRecord::load_for(&dir, m).unwrap().unwrap();
    record.save_partial = Some(PartialSave {
        namespace: NAMESPACE.into(),
        path: path.into(),
        temp: temp.clone(),
    });
    record.save(&dir).unwrap();
    let left = Path::new(path).parent().unwrap().join(temp);
    assert!(left.exists(), "{left:?}");
    left
}

fn saves_listed(lab: &Lab) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(lab.save_root().join(NAMESPACE))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A save's temporary file that an attempt which died left behind is removed by the
/// rollback of that migration, and by a retry of it before it creates its own.
#[tokio::test]
async fn a_dead_saves_temporary_file_goes_with_the_rollback_or_the_retry() {
    let lab = Lab::new("save-left", 64, 8, 5_000_000).with_save_root();
    lab.start_source().await;
    let path = lab.save_path("guest.fsav");
    // Rolled back: Confirm (cancelled) removes it and the guest runs on.
    lab.begin("m-1", None).await.unwrap();
    let left = plant_dead_attempt(&lab, "m-1", &path);
    lab.confirm(&lab.a, "m-1", None, true).await.unwrap();
    assert!(!left.exists(), "the rollback left {left:?}");
    assert_eq!(lab.run_status(&lab.a).await, "running");
    assert!(saves_listed(&lab).is_empty(), "{:?}", saves_listed(&lab));
    // Retried: the next attempt removes it first, then saves.
    lab.begin("m-2", None).await.unwrap();
    let left = plant_dead_attempt(&lab, "m-2", &path);
    within(lab.save("m-2", &path, Compression::Zstd))
        .await
        .unwrap();
    assert!(!left.exists(), "the retry left {left:?}");
    assert_eq!(saves_listed(&lab), vec!["guest.fsav".to_string()]);
    lab.confirm_saved("m-2").await.unwrap();
    println!("a dead save's temporary file: removed by the rollback, and by the retry");
}

//! Saves and restores beneath the storage roots, real QEMU: a save whose path the roots
//! do not allow is refused before the guest is touched (it runs on, the same QEMU) and
//! leaves no file anywhere; a restore from such a path is refused before any QEMU
//! starts. The lab's nodes have one read-write root, `<lab dir>/saves`
//! ([`Lab::with_save_root`]), and act for [`NAMESPACE`].

mod support;

use ferry_agent::domain::Domain;
use ferry_agent::error::ErrorKind;
use ferry_agent::phases::save::{SaveInput, save};
use ferry_agent::restore::{RestoreError, restore};
use ferry_agent::statefile::Compression;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;
use tokio_util::sync::CancellationToken;

const SAVE: &str = "spec.toFile.path";
const RESTORE: &str = "spec.restoreFrom";

/// Every file beneath `dir`, recursively (symbolic links listed, not followed), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[tokio::test]
async fn a_save_the_roots_refuse_leaves_the_guest_running_and_creates_nothing() {
    let lab = Lab::new("save-refused", 64, 32, 5_000_000).with_save_root();
    let root = lab.save_root();
    let outside = lab.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(root.join("team-b")).unwrap();
    let existing = lab.save_path("exists.fsav");
    std::fs::write(&existing, b"keep me").unwrap();
    // A directory link and a (dangling) file link in the namespace's own directory.
    symlink(&outside, lab.save_path("elsewhere")).unwrap();
    symlink(outside.join("planted.fsav"), lab.save_path("planted.fsav")).unwrap();
    let before: Vec<PathBuf> = files(&root);

    lab.start_source().await;
    let pid = lab.a.running_pid(&lab.vm).expect("the guest runs");
    let cases: [(PathBuf, String); 5] = [
        (
            outside.join("g.fsav"),
            "outside every storage root".to_string(),
        ),
        (
            root.join("team-b/g.fsav"),
            format!("not under {}/ ", root.join(NAMESPACE).display()),
        ),
        (
            lab.save_path("elsewhere/g.fsav"),
            "a symbolic link, or beneath one".to_string(),
        ),
        (
            lab.save_path("planted.fsav"),
            "already exists (a save never replaces a file)".to_string(),
        ),
        (
            existing.clone(),
            "already exists (a save never replaces a file)".to_string(),
        ),
    ];
    for (i, (path, rule)) in cases.iter().enumerate() {
        let m = format!("m-refused-{i}");
        lab.begin(&m, None).await.unwrap();
        let err = lab.save(&m, path, Compression::Zstd).await.unwrap_err();
        assert!(matches!(err.kind, ErrorKind::HostPath(_)), "{err}");
        let says = format!("{SAVE}: {}: {rule}", path.display());
        assert!(err.to_string().contains(&says), "{err}\nexpected: {says}");
        // Nothing was done to the guest: the same QEMU, still running.
        assert_eq!(lab.run_status(&lab.a).await, "running", "{err}");
        assert_eq!(lab.a.running_pid(&lab.vm), Some(pid), "{err}");
        assert!(lab.confirm_saved(&m).await.is_err());
        lab.confirm(&lab.a, &m, None, true).await.unwrap();
    }
    // No file was created anywhere, no temporary file is left, nothing was replaced.
    assert_eq!(files(&root), before);
    assert!(files(&outside).is_empty(), "{:?}", files(&outside));
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    lab.assert_runs_on_a().await;
    lab.assert_one_guest_on(&lab.a);
}

#[tokio::test]
async fn a_cancelled_save_leaves_no_file() {
    let lab = Lab::new("save-cancelled", 64, 32, 5_000_000).with_save_root();
    lab.start_source().await;
    let path = lab.save_path("cancelled.fsav");
    lab.begin("m-cancel", None).await.unwrap();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let input = SaveInput {
        vm: &lab.vm,
        migration: "m-cancel",
        namespace: NAMESPACE,
        path: text(&path),
        compression: Compression::Gzip,
        key: &lab.key,
        cancel: &cancel,
    };
    let err = within(save(&lab.a, input, |_| {})).await.unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Cancelled), "{err}");
    assert!(
        files(&lab.save_root()).is_empty(),
        "{:?}",
        files(&lab.save_root())
    );
    lab.confirm(&lab.a, "m-cancel", None, true).await.unwrap();
    lab.assert_runs_on_a().await;
}

#[tokio::test]
async fn a_restore_the_roots_refuse_starts_no_qemu() {
    let lab = Lab::new("restore-refused", 64, 32, 5_000_000).with_save_root();
    let vm = lab.vm.as_str();
    let root = lab.save_root();
    let outside = lab.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(root.join("team-b")).unwrap();
    // What the files hold does not matter: none is read.
    std::fs::write(outside.join("g.fsav"), b"FERRYSAV").unwrap();
    std::fs::write(root.join("team-b/g.fsav"), b"FERRYSAV").unwrap();
    std::fs::write(lab.save_path("real.fsav"), b"FERRYSAV").unwrap();
    symlink(lab.save_path("real.fsav"), lab.save_path("link.fsav")).unwrap();
    symlink(&outside, lab.save_path("elsewhere")).unwrap();
    nix::unistd::mkfifo(&lab.save_path("fifo.fsav"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let domain = Domain::parse(&lab.xml()).unwrap();
    let cases: [(PathBuf, String); 6] = [
        (
            outside.join("g.fsav"),
            "outside every storage root".to_string(),
        ),
        (
            root.join("team-b/g.fsav"),
            format!("not under {}/ ", root.join(NAMESPACE).display()),
        ),
        (
            lab.save_path("link.fsav"),
            "a symbolic link, or beneath one".to_string(),
        ),
        (
            lab.save_path("elsewhere/g.fsav"),
            "a symbolic link, or beneath one".to_string(),
        ),
        (
            lab.save_path("fifo.fsav"),
            "a FIFO, not a regular file".to_string(),
        ),
        (lab.save_path("missing.fsav"), "does not exist".to_string()),
    ];
    for (path, rule) in &cases {
        // A FIFO opened for reading would wait for a writer: it must not be opened.
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            restore(&lab.b, &lab.vm, &domain, OWNER, text(path), &lab.key),
        )
        .await
        .expect("the restore did not hang")
        .unwrap_err();
        assert!(matches!(err, RestoreError::HostPath(_)), "{err}");
        assert_eq!(err.reason(), "HostPathRefused", "{err}");
        let says = format!("{RESTORE}: {}: {rule}", path.display());
        assert!(err.to_string().contains(&says), "{err}\nexpected: {says}");
        assert!(lab.qemu_pids().is_empty(), "a QEMU was started for {err}");
        assert!(!lab.b.vm_dir(vm).exists(), "node-b has state for {err}");
    }
    // The files are as they were.
    assert_eq!(
        std::fs::read(lab.save_path("real.fsav")).unwrap(),
        b"FERRYSAV"
    );
    assert_eq!(std::fs::read(outside.join("g.fsav")).unwrap(), b"FERRYSAV");
}

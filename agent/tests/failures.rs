//! Every failure path ends with exactly one running guest, on the source, and the
//! guest's memory intact (DESIGN.md "Failure paths").

mod support;

use ferry_agent::error::ErrorKind;
use ferry_agent::phases::MigrationRecord;
use ferry_agent::phases::finish::finish;
use ferry_agent::phases::prepare::{PrepareInput, PrepareOutput, prepare};
use ferry_agent::policy::Policy;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use support::*;
use tokio_util::sync::CancellationToken;

/// Slow enough that a 128 MiB guest takes seconds to transfer.
fn slow() -> Policy {
    policy(Some(16 << 20), 300)
}

fn lab(vm: &str) -> Lab {
    Lab::new(vm, 128, 64, 5_000_000)
}

/// The source guest runs, alone, and its counter moves on without BAD pages.
async fn assert_source_runs_alone(lab: &Lab) {
    lab.assert_one_guest_on(&lab.a);
    assert!(!lab.b.vm_dir(&lab.vm).exists(), "target state dir removed");
    lab.assert_runs_on_a().await;
}

#[tokio::test]
async fn prepare_fails_when_the_target_port_is_taken() {
    let lab = lab("prep-fail");
    lab.start_source().await;
    let taken = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = lab.begin("m1", None).await.unwrap();
    let err = prepare(
        &lab.b,
        PrepareInput {
            listen: ferry_agent::stream::Listen::Tcp(Some(port)),
            ..lab.prepare_input("m1", &out, &slow())
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Qmp(_)), "{err}");
    assert!(lab.b.running_pid(&lab.vm).is_none());
    lab.confirm(&lab.a, "m1", None, true).await.unwrap();
    assert_source_runs_alone(&lab).await;
}

/// Runs Perform while `interfere` acts once the transfer is under way.
async fn perform_with<F, Fut>(lab: &Lab, m: &str, prep: &PrepareOutput, interfere: F) -> ErrorKind
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let cancel = CancellationToken::new();
    let transferred = Arc::new(AtomicU64::new(0));
    let seen = transferred.clone();
    let slow = slow();
    let run = lab.perform(m, prep, &slow, &cancel, move |p| {
        seen.store(p.transferred_bytes, Ordering::SeqCst)
    });
    let act = async {
        while transferred.load(Ordering::SeqCst) < (4 << 20) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        interfere(cancel.clone()).await;
    };
    let (res, ()) = within(async { tokio::join!(run, act) }).await;
    res.unwrap_err().kind
}

#[tokio::test]
async fn perform_fails_when_the_target_qemu_dies_mid_transfer() {
    let lab = lab("perf-fail");
    lab.start_source().await;
    let prep = lab.begin_and_prepare("m2", &slow()).await.unwrap();
    let target_pid = lab.b.running_pid(&lab.vm).unwrap();
    let kind = perform_with(&lab, "m2", &prep, |_| async move {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(target_pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    })
    .await;
    assert!(matches!(kind, ErrorKind::MigrationFailed(_)), "{kind}");
    lab.finish(&lab.b, "m2", None, true).await.unwrap();
    lab.confirm(&lab.a, "m2", None, true).await.unwrap();
    assert_source_runs_alone(&lab).await;
}

#[tokio::test]
async fn perform_cancelled_rolls_back_to_the_source() {
    let lab = lab("perf-cancel");
    lab.start_source().await;
    let prep = lab.begin_and_prepare("m3", &slow()).await.unwrap();
    let kind = perform_with(&lab, "m3", &prep, |cancel| async move { cancel.cancel() }).await;
    assert!(matches!(kind, ErrorKind::Cancelled), "{kind}");
    lab.finish(&lab.b, "m3", None, true).await.unwrap();
    lab.confirm(&lab.a, "m3", None, true).await.unwrap();
    assert_source_runs_alone(&lab).await;
}

#[tokio::test]
async fn finish_fails_when_ownership_cannot_be_taken() {
    let lab = lab("finish-fail");
    lab.start_source().await;
    let perf = within(lab.migrate("m4", &policy(None, 2000)))
        .await
        .unwrap();
    let stopped_at = last_pass(&lab.serial_a()).unwrap();
    let err = finish(
        &lab.b,
        lab.finish_input("m4", Some(&perf.cookie), false),
        || async { Err("VM status.nodeName was changed by someone else".into()) },
    )
    .await
    .unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Ownership(_)), "{err}");
    assert!(lab.b.running_pid(&lab.vm).is_none(), "target QEMU killed");
    lab.confirm(&lab.a, "m4", None, true).await.unwrap();
    assert_source_runs_alone(&lab).await;
    assert!(last_pass(&lab.serial_a()).unwrap() > stopped_at);
}

/// The commit point: the target owns the guest, then its QEMU dies before `cont`. The
/// guest never ran there, so the source's paused copy is whole and the rollback
/// resumes it.
#[tokio::test]
async fn a_target_qemu_lost_after_the_commit_but_before_cont_never_ran_the_guest() {
    let lab = lab("never-ran");
    lab.start_source().await;
    let perf = within(lab.migrate("m5", &policy(None, 2000)))
        .await
        .unwrap();
    let stopped_at = last_pass(&lab.serial_a()).unwrap();
    let target_pid = lab.b.running_pid(&lab.vm).unwrap();
    let err = finish(
        &lab.b,
        lab.finish_input("m5", Some(&perf.cookie), false),
        || async {
            // The ownership write landed; the QEMU is killed before Finish can resume it.
            kill(target_pid);
            Ok(())
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err.kind, ErrorKind::NeverRan(_)), "{err}");
    lab.confirm(&lab.a, "m5", None, true).await.unwrap();
    assert_source_runs_alone(&lab).await;
    assert!(last_pass(&lab.serial_a()).unwrap() > stopped_at);
}

/// After the commit Finish only goes forward: a Finish that committed and was cut short
/// (its agent restarted) resumes the guest on the target even when a rollback was
/// decided meanwhile, and the source's Confirm then removes its copy.
#[tokio::test]
async fn a_committed_finish_goes_forward_even_when_cancelled() {
    let lab = lab("committed");
    lab.start_source().await;
    let perf = within(lab.migrate("m6", &policy(None, 2000)))
        .await
        .unwrap();
    // What the restarted agent finds: the commit recorded, the guest still paused.
    let mut record = MigrationRecord::load_for(&lab.b.vm_dir(&lab.vm), "m6")
        .unwrap()
        .unwrap_or_else(|| MigrationRecord::new("m6"));
    record.committed = true;
    record.save(&lab.b.vm_dir(&lab.vm)).unwrap();
    let out = finish(
        &lab.b,
        lab.finish_input("m6", Some(&perf.cookie), true),
        || async { panic!("a committed Finish does not commit again") },
    )
    .await
    .unwrap();
    assert!(out.resumed, "the guest resumed on the target");
    lab.confirm(&lab.a, "m6", out.cookie.as_deref(), false)
        .await
        .unwrap();
    lab.assert_one_guest_on(&lab.b);
    let at = last_pass(&lab.serial_b()).unwrap_or(0);
    wait_for_pass(&lab.serial_b(), at + 2, Duration::from_secs(60)).await;
}

fn kill(pid: i32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 {pid}");
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

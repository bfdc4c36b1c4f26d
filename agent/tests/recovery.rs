//! Post-copy as libvirt does it, against real QEMU: Perform ends at the switch, Finish
//! resumes the guest on the target while its last pages follow, and Confirm waits for
//! them. The stream, through a relay, is cut during that tail; both QEMUs pause; a
//! resume while the path is still down leaves them paused; once the path is back the
//! target listens again (`postcopy::listen_again`) and the source resumes to it
//! (`confirm_with`), and the guest arrives whole. And the cases no recovery helps: the
//! target's QEMU dies after the switch.

mod support;

use ferry_agent::error::PhaseError;
use ferry_agent::phases::confirm::{ConfirmInput, Confirmed, confirm_with};
use ferry_agent::phases::perform::{PerformInput, PerformOutput, TransferProgress, perform};
use ferry_agent::phases::prepare::PrepareOutput;
use ferry_agent::policy::{Policy, PostCopy, resolve};
use ferry_agent::postcopy::{self, Resumption, TargetReport};
use ferry_agent::qmp::MigrationInfo;
use ferry_agent::supervisor::Supervisor;
use ferry_crds::MigrationPolicy;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A TCP relay that can be cut (every connection dropped, the listener closed) and
/// opened again on the same address, forwarding to whatever `target` says then.
struct Relay {
    addr: SocketAddr,
    target: Arc<Mutex<String>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(ip: &str, target: &str) -> Relay {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let mut relay = Relay {
            addr: listener.local_addr().unwrap(),
            target: Arc::new(Mutex::new(target.to_string())),
            task: None,
        };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = target.lock().unwrap().clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Drops the listener and every connection (the JoinSet aborts them with the task).
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn reopen(&mut self, target: &str) {
        *self.target.lock().unwrap() = target.to_string();
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn uri(&self) -> String {
        format!("tcp:{}", self.addr)
    }
}

async fn migration_status(sup: &Supervisor, vm: &str) -> String {
    let guest = sup.require(vm).await.unwrap();
    let info: MigrationInfo = guest.qmp.execute("query-migrate", None).await.unwrap();
    info.status.unwrap_or_default()
}

async fn both_paused(lab: &Lab) -> bool {
    migration_status(&lab.a, &lab.vm).await == postcopy::PAUSED
        && migration_status(&lab.b, &lab.vm).await == postcopy::PAUSED
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Post-copy 1 s in, 4 MiB/s before and after the switch, no timeouts: with a guest
/// dirtying 48 MiB the post-copy phase lasts several seconds.
fn slow_post_copy() -> Policy {
    Policy {
        post_copy: PostCopy::After(Duration::from_secs(1)),
        completion_timeout_per_gib: None,
        progress_timeout: None,
        ..resolve(&MigrationPolicy {
            bandwidth_mi_bps: Some(4),
            ..Default::default()
        })
        .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_post_copy_stream_is_recovered_while_the_guest_runs_on_the_target() {
    // A guest dirtying 48 MiB; 4 MiB/s before and after the switch (1 s in), so the
    // post-copy tail lasts several seconds. Over TLS, as by default: the recovered
    // channel reuses the TLS objects and parameters both QEMUs kept.
    let lab = Lab::new("pc-recover", 128, 49, 2_000_000).with_tls();
    lab.start_source().await;
    let policy = slow_post_copy();
    let m = "m-pc-recover";
    let prep = lab.begin_and_prepare(m, &policy).await.unwrap();
    let mut relay = Relay::start("127.0.0.4", prep.uri.trim_start_matches("tcp:")).await;
    let cancel = CancellationToken::new();
    let relay_uri = relay.uri();
    // Perform ends at the switch; Finish resumes the guest on the target at once.
    let perf = within(perform_to(&lab, m, &relay_uri, &prep, &policy, &cancel))
        .await
        .expect("Perform ends at the switch to post-copy");
    assert!(perf.post_copy);
    assert!(
        postcopy::in_post_copy(Some(&migration_status(&lab.a, &lab.vm).await)),
        "Perform ended at the switch, before the last pages"
    );
    let before = std::fs::read_to_string(lab.serial_a()).unwrap();
    let fin = within(lab.finish(&lab.b, m, Some(&perf.cookie), false))
        .await
        .unwrap();
    assert!(fin.resumed);
    assert_eq!(
        lab.run_status(&lab.b).await,
        "running",
        "the guest runs on the target"
    );
    assert!(
        postcopy::in_post_copy(Some(&migration_status(&lab.b, &lab.vm).await)),
        "while the rest of its memory follows"
    );
    let reports: Arc<Mutex<Vec<TransferProgress>>> = Arc::default();
    let sink = reports.clone();
    let (recovery_tx, recovery_rx) = watch::channel(TargetReport::default());
    let dir = lab.a.vm_dir(&lab.vm);
    let input = ConfirmInput {
        vm: &lab.vm,
        migration: m,
        finish_cookie: fin.cookie.as_deref(),
        cancelled: false,
    };
    let resume = Resumption {
        uri: &relay_uri,
        dir: &dir,
        reports: recovery_rx,
    };
    let confirm = confirm_with(&lab.a, input, Some(resume), move |p| {
        sink.lock().unwrap().push(p.clone())
    });
    let driver = async {
        well_into_post_copy(&reports).await;
        relay.cut();
        let mut paused = false;
        for _ in 0..100 {
            if both_paused(&lab).await {
                paused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(paused, "both QEMUs pause when the post-copy stream is cut");
        // The target listens again, but the path is still down: the source's resumes
        // fail and both stay paused.
        let port = free_port("127.0.0.3");
        let target = postcopy::listen_again(
            &lab.b,
            &lab.vm,
            m,
            ferry_agent::stream::Listen::Tcp(Some(port)),
        )
        .await
        .unwrap()
        .expect("the paused target listens again");
        recovery_tx.send_replace(TargetReport {
            listens_at: Some(relay_uri.clone()),
            lost: None,
        });
        tokio::time::sleep(postcopy::RESUME_EVERY * 3).await;
        assert!(
            both_paused(&lab).await,
            "a resume over a dead path leaves both QEMUs paused"
        );
        assert!(
            reports.lock().unwrap().last().is_some_and(|p| p.paused),
            "Confirm reports the pause"
        );
        assert_eq!(lab.qemu_pids().len(), 2, "both QEMUs live while paused");
        // The path comes back.
        relay.reopen(target.trim_start_matches("tcp:")).await;
    };
    let (res, ()) = within(async { tokio::join!(confirm, driver) }).await;
    match res.expect("the recovered migration completes") {
        Confirmed::TargetRuns(Some(stats)) => {
            assert!(stats.transferred_bytes > 48 << 20, "{stats:?}");
            let downtime = stats.guest_downtime_ms().expect("both moments");
            eprintln!("post-copy recovered; the guest paused {downtime} ms at the switch");
        }
        other => panic!("expected the target to run the guest, got {other:?}"),
    }
    lab.assert_one_guest_on(&lab.b);
    lab.assert_continues_on_b(&before, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_qemu_killed_in_post_copy_loses_the_guest_and_leaves_no_qemu() {
    let (lab, prep, perf) = switched("pc-lost").await;
    let m = "m-pc-lost";
    let fin = within(lab.finish(&lab.b, m, Some(&perf.cookie), false))
        .await
        .unwrap();
    let reports: Arc<Mutex<Vec<TransferProgress>>> = Arc::default();
    let sink = reports.clone();
    let (report_tx, report_rx) = watch::channel(TargetReport::default());
    let dir = lab.a.vm_dir(&lab.vm);
    let input = ConfirmInput {
        vm: &lab.vm,
        migration: m,
        finish_cookie: fin.cookie.as_deref(),
        cancelled: false,
    };
    let resume = Resumption {
        uri: &prep.uri,
        dir: &dir,
        reports: report_rx,
    };
    let confirm = confirm_with(&lab.a, input, Some(resume), move |p| {
        sink.lock().unwrap().push(p.clone())
    });
    let driver = async {
        well_into_post_copy(&reports).await;
        let pid = lab.b.running_pid(&lab.vm).expect("the target QEMU runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // The source pauses and waits for a recovery that cannot come.
        for _ in 0..100 {
            if migration_status(&lab.a, &lab.vm).await == postcopy::PAUSED {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(migration_status(&lab.a, &lab.vm).await, postcopy::PAUSED);
        tokio::time::sleep(postcopy::RESUME_EVERY).await;
        assert_eq!(lab.qemu_pids().len(), 1, "the source waits, its QEMU kept");
        // What the target agent writes into status.targetLost.
        report_tx.send_replace(TargetReport {
            listens_at: None,
            lost: Some("the incoming QEMU is gone".into()),
        });
    };
    let (res, ()) = within(async { tokio::join!(confirm, driver) }).await;
    match res.expect("Confirm ends") {
        Confirmed::TargetLost(why) => assert!(why.contains("the incoming QEMU is gone"), "{why}"),
        other => panic!("expected the guest lost on the target, got {other:?}"),
    }
    assert_eq!(
        lab.qemu_pids(),
        Vec::<i32>::new(),
        "no QEMU of the VM is left"
    );
    assert!(
        !lab.a.vm_dir(&lab.vm).exists(),
        "the source's state dir is gone"
    );
}

/// The rollback after a target lost before Finish (its QEMU killed right after the
/// switch) removes what is left: Finish(cancelled) on the target, Confirm(cancelled) on
/// the source, which cannot resume the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_lost_before_finish_rolls_back_to_no_qemu() {
    let (lab, _, _) = switched("pc-lost-early").await;
    let m = "m-pc-lost-early";
    let pid = lab.b.running_pid(&lab.vm).expect("the target QEMU runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let fin = lab.finish(&lab.b, m, None, true).await.unwrap();
    assert!(!fin.resumed);
    let confirmed = lab.confirm(&lab.a, m, None, true).await.unwrap();
    match confirmed {
        Confirmed::GuestLost(why) => assert!(why.contains("postcopy"), "{why}"),
        other => panic!("expected the guest lost, got {other:?}"),
    }
    assert_eq!(
        lab.qemu_pids(),
        Vec::<i32>::new(),
        "no QEMU of the VM is left"
    );
    assert!(!lab.a.vm_dir(&lab.vm).exists());
    assert!(!lab.b.vm_dir(&lab.vm).exists());
}

/// A lab whose guest `vm` (dirtying 48 MiB) migration `m-<vm>` switched to post-copy
/// under [`slow_post_copy`]: Perform has ended at the switch, Finish is next.
async fn switched(vm: &str) -> (Lab, PrepareOutput, PerformOutput) {
    let lab = Lab::new(vm, 128, 49, 2_000_000);
    lab.start_source().await;
    let policy = slow_post_copy();
    let m = format!("m-{vm}");
    let prep = lab.begin_and_prepare(&m, &policy).await.unwrap();
    let cancel = CancellationToken::new();
    let perf = within(perform_to(&lab, &m, &prep.uri, &prep, &policy, &cancel))
        .await
        .unwrap();
    assert!(perf.post_copy, "Perform ended at the switch");
    (lab, prep, perf)
}

/// Perform of `m` on node-a, its stream sent to `uri`.
async fn perform_to(
    lab: &Lab,
    m: &str,
    uri: &str,
    prep: &PrepareOutput,
    policy: &Policy,
    cancel: &CancellationToken,
) -> Result<PerformOutput, PhaseError> {
    let input = PerformInput {
        uri,
        ..lab.perform_input(m, prep, policy, cancel)
    };
    perform(&lab.a, input, |_| {}).await
}

/// Waits until Confirm reports the post-copy tail with more than 8 MiB still to send.
async fn well_into_post_copy(reports: &Mutex<Vec<TransferProgress>>) {
    eventually("post-copy", || {
        let r = reports.lock().unwrap();
        r.iter().any(|p| p.post_copy && p.remaining_bytes > 8 << 20)
    })
    .await;
}

/// Polls `done` every 50 ms for up to two minutes.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    for _ in 0..2400 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting for {what}");
}

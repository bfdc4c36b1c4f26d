//! Post-copy recovery against real QEMU: the stream, through a relay, is cut while the
//! migration is in post-copy; both QEMUs pause; a resume while the path is still down
//! leaves them paused; once the path is back the target listens again
//! (`postcopy::listen_again`) and the source resumes to it (`perform_with_recovery`),
//! and the guest arrives whole. And the case no recovery helps: the target's QEMU dies
//! after the switch.

mod support;

use ferry_agent::phases::confirm::Confirmed;
use ferry_agent::phases::perform::{PerformInput, TransferProgress, perform_with_recovery};
use ferry_agent::policy::{Policy, PostCopy, resolve};
use ferry_agent::postcopy::{self, TargetReport};
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
async fn a_cut_post_copy_stream_is_recovered_and_the_guest_arrives_whole() {
    // A guest dirtying 48 MiB; 4 MiB/s before and after the switch (1 s in), so the
    // post-copy phase lasts several seconds. Over TLS, as by default: the recovered
    // channel reuses the TLS objects and parameters both QEMUs kept.
    let lab = Lab::new("pc-recover", 128, 49, 2_000_000).with_tls();
    lab.start_source().await;
    let policy = slow_post_copy();
    let m = "m-pc-recover";
    let prep = lab.begin_and_prepare(m, &policy).await.unwrap();
    let mut relay = Relay::start("127.0.0.4", prep.uri.trim_start_matches("tcp:")).await;
    let reports: Arc<Mutex<Vec<TransferProgress>>> = Arc::default();
    let sink = reports.clone();
    let (recovery_tx, recovery_rx) = watch::channel(TargetReport::default());
    let cancel = CancellationToken::new();
    let relay_uri = relay.uri();
    let perform = perform_with_recovery(
        &lab.a,
        PerformInput {
            uri: &relay_uri,
            ..lab.perform_input(m, &prep, &policy, &cancel)
        },
        recovery_rx,
        move |p| sink.lock().unwrap().push(p.clone()),
    );
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
            "Perform reports the pause"
        );
        assert_eq!(lab.qemu_pids().len(), 2, "both QEMUs live while paused");
        // The path comes back.
        relay.reopen(target.trim_start_matches("tcp:")).await;
    };
    let (res, ()) = within(async { tokio::join!(perform, driver) }).await;
    let perf = res.expect("the recovered migration completes");
    assert!(perf.post_copy);
    lab.complete(m, &perf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_qemu_killed_in_post_copy_fails_perform_and_the_rollback_leaves_no_qemu() {
    let lab = Lab::new("pc-lost", 128, 49, 2_000_000);
    lab.start_source().await;
    let policy = slow_post_copy();
    let m = "m-pc-lost";
    let prep = lab.begin_and_prepare(m, &policy).await.unwrap();
    let reports: Arc<Mutex<Vec<TransferProgress>>> = Arc::default();
    let sink = reports.clone();
    let (report_tx, report_rx) = watch::channel(TargetReport::default());
    let cancel = CancellationToken::new();
    let perform = perform_with_recovery(
        &lab.a,
        lab.perform_input(m, &prep, &policy, &cancel),
        report_rx,
        move |p| sink.lock().unwrap().push(p.clone()),
    );
    let driver = async {
        well_into_post_copy(&reports).await;
        let pid = lab.b.running_pid(&lab.vm).expect("the target QEMU runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // The source pauses and waits for a recovery that cannot come; a cancel does
        // not move it either (post-copy).
        for _ in 0..100 {
            if migration_status(&lab.a, &lab.vm).await == postcopy::PAUSED {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(migration_status(&lab.a, &lab.vm).await, postcopy::PAUSED);
        cancel.cancel();
        tokio::time::sleep(postcopy::RESUME_EVERY).await;
        // What the target agent writes into status.targetLost.
        report_tx.send_replace(TargetReport {
            listens_at: None,
            lost: Some("the incoming QEMU is gone".into()),
        });
    };
    let (res, ()) = within(async { tokio::join!(perform, driver) }).await;
    let err = res.expect_err("Perform cannot complete without the target's QEMU");
    assert!(
        err.to_string()
            .contains("the guest is lost: the incoming QEMU is gone"),
        "{err}"
    );
    // The rollback, as the operator runs it: Finish(cancelled) on the target, then
    // Confirm(cancelled) on the source, which cannot resume the guest.
    let fin = lab.finish(&lab.b, m, None, true).await.unwrap();
    assert!(!fin.resumed);
    let confirmed = lab.confirm(&lab.a, m, None, true).await.unwrap();
    match confirmed {
        Confirmed::GuestLost(why) => assert!(why.contains("postcopy-paused"), "{why}"),
        other => panic!("expected the guest lost, got {other:?}"),
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
    assert!(
        !lab.b.vm_dir(&lab.vm).exists(),
        "the target's state dir is gone"
    );
}

/// Waits until Perform reports post-copy with more than 8 MiB still to send.
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

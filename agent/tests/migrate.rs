//! Migrations through the five phase functions between two simulated nodes, real QEMU.

mod support;

use ferry_agent::cookie::{Cookie, LockState};
use ferry_agent::phases::Phase;
use ferry_agent::phases::finish::finish;
use ferry_agent::phases::prepare::{PrepareInput, prepare};
use ferry_agent::policy::Policy;
use ferry_agent::qmp::StatusInfo;
use ferry_agent::supervisor::Supervisor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use support::*;
use tokio_util::sync::CancellationToken;

/// Runs all five phases from node-a to node-b and checks the guest on the target.
async fn migrate_and_check(lab: &Lab, target_xml: Option<&str>, params: Policy) {
    let vm = lab.vm.as_str();
    let m = "m-ok";
    let out = lab.begin(m, target_xml).await.unwrap();
    // Idempotent: a re-run returns the same result.
    assert_eq!(lab.begin(m, target_xml).await.unwrap(), out);
    let prep = lab.prepare(m, &out, &params).await.unwrap();
    assert!(prep.uri.starts_with("tcp:127.0.0.3:"), "{}", prep.uri);
    assert_eq!(lab.prepare(m, &out, &params).await.unwrap(), prep);
    let max_pass = Arc::new(AtomicU64::new(0));
    let seen = max_pass.clone();
    let perf = within(
        lab.perform(m, &prep, &params, &CancellationToken::new(), move |p| {
            seen.fetch_max(p.pass, Ordering::SeqCst);
        }),
    )
    .await
    .unwrap();
    assert!(
        max_pass.load(Ordering::SeqCst) >= 1,
        "progress was reported"
    );
    assert!(perf.transferred_bytes > 0);
    assert!(
        perf.graphics.is_none(),
        "a console on a UNIX socket has no endpoint to relocate clients to"
    );
    // The source is paused now; its serial log is complete.
    let before = std::fs::read_to_string(lab.serial_a()).unwrap();
    let owned = Arc::new(AtomicBool::new(false));
    let flag = owned.clone();
    let target_guest = lab.b.require(vm).await.unwrap();
    let fin = finish(
        &lab.b,
        lab.finish_input(m, Some(&perf.cookie), false),
        || {
            let flag = flag.clone();
            async move {
                // The hook runs before the target's vCPUs resume.
                flag.store(true, Ordering::SeqCst);
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    assert!(owned.load(Ordering::SeqCst));
    assert!(fin.resumed);
    // Re-runs after a crash return the recorded results and do no harm.
    let again = lab
        .perform(m, &prep, &params, &CancellationToken::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(again, perf);
    let again = finish(
        &lab.b,
        lab.finish_input(m, Some(&perf.cookie), false),
        || async { Err("the hook must not run again".into()) },
    )
    .await
    .unwrap();
    assert_eq!(again, fin);
    let status: StatusInfo = target_guest
        .qmp
        .execute("query-status", None)
        .await
        .unwrap();
    assert_eq!(status.status, "running");
    lab.confirm(&lab.a, m, fin.cookie.as_deref(), false)
        .await
        .unwrap();
    // Confirm is idempotent too.
    lab.confirm(&lab.a, m, fin.cookie.as_deref(), false)
        .await
        .unwrap();
    lab.assert_one_guest_on(&lab.b);
    assert!(!lab.a.vm_dir(vm).exists(), "source state dir removed");
    lab.assert_continues_on_b(&before, 5).await;
}

#[tokio::test]
async fn guest_dirtying_memory_migrates_through_five_phases() {
    // 256 MiB guest rewriting 1..192 MiB on every pass, as fast as it can. The generous
    // downtime limit only keeps a loaded machine from never converging.
    let lab = Lab::new("busy", 256, 192, 0);
    lab.start_source().await;
    let params = policy(None, 2000);
    migrate_and_check(&lab, None, params).await;
}

#[tokio::test]
async fn target_xml_that_moves_the_disk_migrates() {
    let lab = Lab::new("moved", 64, 32, 5_000_000);
    lab.start_source().await;
    let moved = lab.file("moved.img");
    std::fs::copy(&lab.disk, &moved).unwrap();
    let target = lab.xml_with(&moved, 1, "ide", 64, "");
    let params = policy(None, 2000);
    migrate_and_check(&lab, Some(&target), params).await;
    let def = lab.b.definition(&lab.vm).unwrap();
    assert_eq!(def.disks().next().unwrap().source, moved.to_str().unwrap());
}

#[tokio::test]
async fn abi_changes_are_refused_in_begin_and_the_source_never_pauses() {
    let lab = Lab::new("abi", 64, 32, 5_000_000);
    let guest = lab.start_source().await;
    let mut events = guest.qmp.subscribe();
    let disk = lab.disk.clone();
    let cases = [
        (
            lab.xml_with(&disk, 1, "ide", 128, ""),
            "target memory '131072 KiB' does not match source '65536 KiB'",
        ),
        (
            lab.xml_with(&disk, 2, "ide", 64, ""),
            "target interface MAC '52:54:00:12:34:02' does not match source '52:54:00:12:34:01'",
        ),
        (
            lab.xml_with(&disk, 1, "virtio", 64, ""),
            "target disk bus 'virtio' does not match source 'ide'",
        ),
        (
            lab.xml_with(
                &disk,
                1,
                "ide",
                64,
                "\n<serial type='file'><target port='1'/></serial>",
            ),
            "target device count '5' does not match source '4'",
        ),
    ];
    for (i, (xml, msg)) in cases.iter().enumerate() {
        let err = lab
            .begin(&format!("m-abi-{i}"), Some(xml))
            .await
            .unwrap_err();
        assert_eq!(err.phase, Phase::Begin);
        assert!(err.to_string().contains(msg), "{err}");
    }
    let status: StatusInfo = guest.qmp.execute("query-status", None).await.unwrap();
    assert_eq!(status.status, "running");
    while let Ok(ev) = events.try_recv() {
        assert_ne!(ev.event, "STOP", "the source guest was paused");
    }
    lab.assert_one_guest_on(&lab.a);
}

#[tokio::test]
async fn bad_cookies_and_same_host_are_refused_in_prepare() {
    let lab = Lab::new("cookies", 64, 32, 5_000_000);
    lab.start_source().await;
    let vm = lab.vm.as_str();
    let out = lab.begin("m-c", None).await.unwrap();

    // Same host: the source node's own Prepare refuses its cookie.
    let err = prepare(&lab.a, lab.prepare_input("m-c", &out, &Policy::default()))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("attempt to migrate guest to the same host"),
        "{err}"
    );

    let big = out.cookie.replace(
        "</ferry-migration>",
        &format!("<!--{}--></ferry-migration>", "x".repeat(16384)),
    );
    let wrong_uuid = {
        let mut c = Cookie::new(vm, uuid::Uuid::new_v4(), "node-a", lab.a.node().host_uuid);
        c.lock = Some(LockState {
            holder: "node-a".into(),
            disks: vec![],
        });
        c.encode(Phase::Begin).unwrap()
    };
    let mandatory = out.cookie.replace(
        "</ferry-migration>",
        "<nbd mandatory='yes' port='10809'/></ferry-migration>",
    );
    let cases = [
        (big, "more than the limit of 16384"),
        (
            "<ferry-migration version='1'><name>".to_string(),
            "malformed XML",
        ),
        (wrong_uuid, "guest uuid"),
        (mandatory, "unknown mandatory part <nbd>"),
    ];
    for (cookie, msg) in cases {
        let err = prepare(
            &lab.b,
            PrepareInput {
                begin_cookie: &cookie,
                ..lab.prepare_input("m-c", &out, &Policy::default())
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.phase, Phase::Prepare);
        assert!(err.to_string().contains(msg), "{err}");
    }
    // Nothing was started on the target, the source still runs.
    assert!(!lab.b.vm_dir(vm).exists());
    lab.assert_one_guest_on(&lab.a);
    lab.confirm(&lab.a, "m-c", None, true).await.unwrap();
    lab.assert_one_guest_on(&lab.a);
}

#[tokio::test]
async fn perform_rerun_after_an_agent_restart_follows_the_migration() {
    let mut lab = Lab::new("rerun", 64, 2, 50_000_000);
    lab.start_source().await;
    let prep = lab
        .begin_and_prepare("m-r", &Policy::default())
        .await
        .unwrap();
    let slow = policy(Some(1 << 20), 300);
    let transferred = Arc::new(AtomicU64::new(0));
    let seen = transferred.clone();
    let token = CancellationToken::new();
    let first = lab.perform("m-r", &prep, &slow, &token, move |p| {
        seen.store(p.transferred_bytes, Ordering::SeqCst)
    });
    // The agent dies while the stream flows: its Perform call is dropped mid-way...
    tokio::select! {
        r = first => panic!("Perform ended before the restart: {r:?}"),
        _ = async {
            while transferred.load(Ordering::SeqCst) < (256 << 10) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } => {}
    }
    // ...and a new agent (new supervisor, new QMP connection) runs Perform again.
    lab.a = Supervisor::new(lab.a.node().clone());
    let fast = policy(None, 2000);
    let perf = within(lab.perform("m-r", &prep, &fast, &CancellationToken::new(), |_| {}))
        .await
        .unwrap();
    let before = std::fs::read_to_string(lab.serial_a()).unwrap();
    let fin = lab
        .finish(&lab.b, "m-r", Some(&perf.cookie), false)
        .await
        .unwrap();
    lab.confirm(&lab.a, "m-r", fin.cookie.as_deref(), false)
        .await
        .unwrap();
    lab.assert_one_guest_on(&lab.b);
    lab.assert_continues_on_b(&before, 3).await;
}

//! The QMP client against real QEMU: events while commands run, typed errors, and a
//! clear error when QEMU goes away.

mod support;

use ferry_agent::qmp::{QmpError, StatusInfo};
use std::time::Duration;
use support::*;

#[tokio::test]
async fn events_errors_and_qemu_going_away() {
    let lab = Lab::new("qmp", 32, 16, 5_000_000);
    let guest = lab.start_source().await;
    let qmp = &guest.qmp;
    let mut events = qmp.subscribe();

    qmp.run("stop", None).await.unwrap();
    let status: StatusInfo = qmp.execute("query-status", None).await.unwrap();
    assert_eq!((status.status.as_str(), status.running), ("paused", false));
    qmp.run("cont", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no event")
            .unwrap();
        seen.push(ev.event);
    }
    assert_eq!(seen, ["STOP", "RESUME"]);

    // Errors from QEMU are typed and name the command.
    let err = qmp.run("no-such-command", None).await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Command { command, class, .. }
            if command == "no-such-command" && class == "CommandNotFound"),
        "{err}"
    );

    // Concurrent commands each get their own reply.
    let (a, b) = tokio::join!(
        qmp.execute::<StatusInfo>("query-status", None),
        qmp.execute::<serde_json::Value>("query-name", None)
    );
    assert!(a.unwrap().running);
    assert_eq!(b.unwrap()["name"], "qmp");

    // QEMU dies: waiting and later commands fail with Gone.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(guest.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !qmp.is_closed() {
        assert!(
            std::time::Instant::now() < deadline,
            "connection not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        qmp.run("query-status", None).await,
        Err(QmpError::Gone)
    ));
    assert!(lab.a.attach(&lab.vm).await.unwrap().is_none());
}

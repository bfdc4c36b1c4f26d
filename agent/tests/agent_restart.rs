//! Killing the agent process (not QEMU) and starting it again re-attaches to the running
//! guest over QMP.
//!
//! This test has its own `main` (harness = false): it re-runs its own binary as a helper
//! "agent" process that starts the guest, kills that whole process group with SIGKILL,
//! and checks that a new supervisor on the same state dir finds the guest running.

mod support;

use ferry_agent::domain::Domain;
use ferry_agent::node::Node;
use ferry_agent::qmp::StatusInfo;
use ferry_agent::supervisor::{Supervisor, alive};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const HELPER: &str = "--helper-agent";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The helper agent: starts the guest from the XML file, reports its pid, waits to die.
fn helper(state_dir: &str, lab_dir: &str, xml_path: &str) {
    runtime().block_on(async {
        let node = Node::open(state_dir, "node-a", "127.0.0.2".parse().unwrap())
            .unwrap()
            .with_storage(support::lab_roots(Path::new(lab_dir)));
        let sup = Supervisor::new(node);
        let xml = std::fs::read_to_string(xml_path).unwrap();
        let domain = Domain::parse(&xml).unwrap();
        let guest = sup
            .start(&domain.name, &domain, support::OWNER, false)
            .await
            .unwrap();
        println!("started {}", guest.pid);
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

async fn killed_agent_reattaches() {
    let lab = Lab::new("restart", 64, 32, 5_000_000);
    let xml_path = lab.dir.path().join("restart.xml");
    std::fs::write(&xml_path, lab.xml()).unwrap();
    let state_dir = lab.a.node().state_dir.clone();
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .arg(HELPER)
        .arg(&state_dir)
        .arg(lab.dir.path())
        .arg(&xml_path)
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(agent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line
        .trim()
        .strip_prefix("started ")
        .unwrap_or_else(|| panic!("helper said {line:?}"))
        .parse()
        .unwrap();
    wait_for_pass(&lab.serial_a(), 2, Duration::from_secs(120)).await;

    // Kill the agent and everything in its process group.
    killpg(Pid::from_raw(agent.id() as i32), Signal::SIGKILL).unwrap();
    agent.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid), "QEMU died with its agent");

    // A new agent on the same state dir finds the guest and talks to it over QMP.
    let node = Node::open(&state_dir, "node-a", "127.0.0.2".parse().unwrap()).unwrap();
    let sup = Supervisor::new(node);
    let guests = sup.attach_all().await.unwrap();
    assert_eq!(guests.len(), 1);
    assert_eq!(guests[0].pid, pid);
    let status: StatusInfo = guests[0].qmp.execute("query-status", None).await.unwrap();
    assert_eq!(status.status, "running");
    let now = last_pass(&lab.serial_a()).unwrap();
    wait_for_pass(&lab.serial_a(), now + 3, Duration::from_secs(120)).await;
    drop(guests);

    // And it can stop it.
    sup.stop(
        &lab.vm,
        ferry_agent::supervisor::StopMode::Quit(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert!(!alive(pid));
    assert!(lab.qemu_pids().is_empty());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(HELPER) {
        helper(&args[2], &args[3], &args[4]);
        return;
    }
    assert!(Path::new(&std::env::current_exe().unwrap()).exists());
    println!("\nrunning 1 test");
    let started = Instant::now();
    let result = std::panic::catch_unwind(|| runtime().block_on(killed_agent_reattaches()));
    let ok = result.is_ok();
    println!(
        "test killed_agent_reattaches ... {}",
        if ok { "ok" } else { "FAILED" }
    );
    println!(
        "\ntest result: {}. {} passed; {} failed; finished in {:.2}s\n",
        if ok { "ok" } else { "FAILED" },
        ok as u8,
        !ok as u8,
        started.elapsed().as_secs_f64()
    );
    if !ok {
        std::process::exit(101);
    }
}

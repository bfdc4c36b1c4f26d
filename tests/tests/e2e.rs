//! End to end: `kubectl apply` of a migration moves a running guest between two
//! simulated nodes, through the real control plane, the operator and two agents running
//! real QEMU. One test at a time: each runs a cluster and TCG guests on two cores.

use std::time::Duration;

use ferry_crds::{MigrationPhase, VirtualMachineMigration, VmPhase};
use ferry_tests::e2e_support::*;
use ferry_tests::repo_root;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};

/// The body of a GET, with curl.
async fn http_get(url: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", url])
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn example_migration_moves_the_guest_and_kubectl_wait_sees_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let before = last_pass(&cluster, "node-a", "demo").unwrap();

    apply(&cluster, &repo_root().join("examples/migration.yaml")).await;
    let out = cluster
        .kubectl()
        .args([
            "wait",
            "--for=condition=Complete",
            "vmm/demo-to-node-b",
            "--timeout=180s",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    runs_once_on(&cluster, &vms, "node-b").await;
    let first_on_b = first_pass_on(&cluster, "node-b", Duration::from_secs(30)).await;
    assert!(
        first_on_b > before,
        "the counter restarted on node-b: {first_on_b} after {before}"
    );
    guest_goes_on(&cluster, "node-b", first_on_b).await;

    // The console follows the guest, and the disk lock moved with it.
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    let graphics = vm.graphics.expect("the VM reports its console");
    assert_eq!(graphics.type_, "vnc");
    // On node-b, a UNIX socket in the guest's state dir: its QEMU answers there.
    let socket = std::path::Path::new(&graphics.socket);
    assert!(
        socket.starts_with(&cluster.node("node-b").state_dir),
        "{graphics:?}"
    );
    let mut vnc = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut banner = [0u8; 12];
    std::io::Read::read_exact(&mut vnc, &mut banner).unwrap();
    assert_eq!(&banner, b"RFB 003.008\n");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ferry-system");
    let running = vms.get("demo").await.unwrap().status.unwrap().domain_xml;
    let image = ferry_agent::domain::Domain::parse(&running.unwrap())
        .unwrap()
        .disks()
        .map(|d| d.source.clone())
        .next()
        .unwrap();
    let lock = leases
        .get(&ferry_agent::storage::image_lock_name(&image))
        .await
        .unwrap();
    assert_eq!(
        lock.annotations().get(ferry_crds::IMAGE_ANNOTATION),
        Some(&image)
    );
    assert_eq!(
        lock.spec.unwrap().holder_identity.as_deref(),
        Some("node-b")
    );
    // Each agent publishes its QEMU (probed at start) on its heartbeat Lease.
    let probe_dir = tempfile::tempdir().unwrap();
    let local = ferry_agent::qemu::probe("qemu-system-x86_64", probe_dir.path())
        .await
        .unwrap();
    for node in ["node-a", "node-b"] {
        let heartbeat = leases
            .get(&ferry_crds::node_lease_name(node))
            .await
            .unwrap();
        let a = heartbeat.annotations();
        assert_eq!(
            a.get(ferry_crds::sequence::QEMU_VERSION_ANNOTATION),
            Some(&local.version),
            "{node}"
        );
        assert_eq!(
            a.get(ferry_crds::sequence::MIGRATION_CAPABILITIES_ANNOTATION),
            Some(&local.capabilities_line()),
            "{node}"
        );
    }

    // An Event for each phase change, and the outcome in the operator's metrics.
    let out = cluster
        .kubectl()
        .args([
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=demo-to-node-b",
            "-o",
            "jsonpath={.items[*].reason}",
        ])
        .output()
        .await
        .unwrap();
    let reasons = String::from_utf8_lossy(&out.stdout).to_string();
    for reason in [
        "Begin",
        "Prepare",
        "Perform",
        "Finish",
        "Confirm",
        "Succeeded",
    ] {
        assert!(
            reasons.split_whitespace().any(|r| r == reason),
            "no {reason} Event in {reasons:?}"
        );
    }
    let metrics = http_get(&format!(
        "http://127.0.0.1:{}/metrics",
        cluster.operator_metrics_port
    ))
    .await;
    assert!(
        metrics.contains("ferry_migrations_total{outcome=\"Succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_migration_phase_duration_seconds_count{phase=\"perform\"} 1"),
        "{metrics}"
    );
    for n in cluster.nodes() {
        let url = format!("http://{}:{}/readyz", n.address, n.metrics_port);
        assert_eq!(http_get(&url).await.trim(), "ok", "{url}");
    }

    let yaml = cluster
        .kubectl()
        .args(["get", "vmm", "demo-to-node-b", "-o", "yaml"])
        .output()
        .await
        .unwrap();
    let yaml = String::from_utf8_lossy(&yaml.stdout);
    for part in [
        "cookies:",
        "steps:",
        "<ferry-migration",
        "downtimeMs:",
        "migrationURI: tcp:127.0.0.3:",
    ] {
        assert!(
            yaml.contains(part),
            "`kubectl get vmm -o yaml` lacks {part:?}:\n{yaml}"
        );
    }
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let status = vmms.get("demo-to-node-b").await.unwrap().status.unwrap();
    assert_guest_downtime(&status);
    let cookies = status.cookies.unwrap();
    for (phase, cookie) in [
        ("begin", cookies.begin),
        ("prepare", cookies.prepare),
        ("perform", cookies.perform),
        ("finish", cookies.finish),
    ] {
        let cookie = cookie.unwrap_or_else(|| panic!("no {phase} cookie"));
        assert!(
            cookie.starts_with("<ferry-migration"),
            "{phase} cookie: {cookie}"
        );
    }
    let steps = status.steps.unwrap();
    for phase in [
        MigrationPhase::Begin,
        MigrationPhase::Prepare,
        MigrationPhase::Perform,
        MigrationPhase::Finish,
        MigrationPhase::Confirm,
    ] {
        let step = steps
            .get(phase)
            .unwrap_or_else(|| panic!("no {phase:?} step"));
        assert_eq!(
            step.outcome,
            Some(ferry_crds::StepOutcome::Succeeded),
            "{phase:?}: {step:?}"
        );
        assert!(step.end.is_some(), "{phase:?} has no end");
        let node = if phase.runs_on_source() {
            "node-a"
        } else {
            "node-b"
        };
        assert_eq!(step.node, node, "{phase:?} ran on the wrong node");
    }
    // TLS, the API's default: both ends say so, and each node's certificate came from a
    // CSR the operator approved and signed.
    assert_stream(&steps, Some(("node-a", "node-b")));
    assert_node_certificates_issued(&client, &["node-a", "node-b"]).await;
}

#[tokio::test]
async fn a_node_cannot_get_another_nodes_certificate_and_plain_tcp_is_explicit() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    // node-c's agent token asks for node-a's certificate.
    let token = ferry_tests::identity::node_bound_token(
        &client,
        "ferry-system",
        "ferry-agent",
        "node-c",
        3600,
    )
    .await
    .unwrap();
    let path = cluster.cp.dir().join("forger.kubeconfig");
    let forger = cluster
        .cp
        .client_for_token("ferry-agent@node-c", &token, &path)
        .await
        .unwrap();
    let forged = node_csr("ferry-node-a-forged", "node-a");
    let csrs: Api<CertificateSigningRequest> = Api::all(forger);
    csrs.create(&Default::default(), &forged).await.unwrap();
    let denied = eventually(
        "the operator to deny the forged request",
        Duration::from_secs(30),
        || async {
            let csr = csrs.get("ferry-node-a-forged").await.ok()?;
            csr.status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "Denied" && c.status == "True")
        },
    )
    .await;
    assert_eq!(denied.reason.as_deref(), Some("NodeMismatch"));
    let message = denied.message.unwrap_or_default();
    assert!(
        message.contains("CN=node-a") && message.contains("node-c"),
        "{message}"
    );
    let csr = csrs.get("ferry-node-a-forged").await.unwrap();
    assert!(
        csr.status.and_then(|s| s.certificate).is_none(),
        "a denied request got a certificate"
    );

    // Plain TCP, asked for explicitly, still migrates, and says so.
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(
        &cluster,
        &plain_migration_yaml("plain", "node-b", UNLIMITED),
    )
    .await;
    wait_phase(
        &vmms,
        "plain",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    runs_once_on(&cluster, &vms, "node-b").await;
    let steps = vmms
        .get("plain")
        .await
        .unwrap()
        .status
        .unwrap()
        .steps
        .unwrap();
    assert_stream(&steps, None);
}

#[tokio::test]
async fn back_and_forth_ten_times() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let mut at = "node-a";
    for i in 0..10 {
        let to = if at == "node-a" { "node-b" } else { "node-a" };
        let before = last_pass(&cluster, at, "demo").unwrap_or(0);
        let name = format!("hop-{i}");
        apply_yaml(&cluster, &migration_yaml(&name, to, UNLIMITED)).await;
        wait_phase(
            &vmms,
            &name,
            MigrationPhase::Succeeded,
            Duration::from_secs(180),
        )
        .await;
        runs_once_on(&cluster, &vms, to).await;
        guest_goes_on(&cluster, to, before).await;
        at = to;
    }
}

#[tokio::test]
async fn cancel_during_perform_leaves_the_guest_on_the_source() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let yaml = migration_yaml("slow", "node-b", NEVER_ENDING);
    cancel_during_perform(&cluster, &vms, &vmms, "slow", &yaml).await;
}

#[tokio::test]
async fn a_target_without_a_live_agent_fails_naming_the_node_and_never_pauses_the_guest() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    cluster.kill_agent("node-b");
    // Its heartbeat Lease lasts 5 s.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(
        &cluster,
        &migration_yaml("to-dead-node", "node-b", UNLIMITED),
    )
    .await;
    wait_phase(
        &vmms,
        "to-dead-node",
        MigrationPhase::Failed,
        Duration::from_secs(30),
    )
    .await;
    let status = vmms.get("to-dead-node").await.unwrap().status.unwrap();
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(failed.status, "True");
    assert_eq!(failed.reason, "TargetNotReady");
    assert!(failed.message.contains("node-b"), "{}", failed.message);
    assert!(status.steps.and_then(|s| s.begin).is_none(), "Begin ran");
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    assert_eq!(vm.phase, Some(VmPhase::Running));
    assert_eq!(vm.migration, None);
    runs_once_on(&cluster, &vms, "node-a").await;
    let now = last_pass(&cluster, "node-a", "demo").unwrap();
    guest_goes_on(&cluster, "node-a", now).await;
}

#[tokio::test]
async fn an_operator_restart_mid_perform_still_completes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(&cluster, &migration_yaml("through-restart", "node-b", LONG)).await;
    wait_phase(
        &vmms,
        "through-restart",
        MigrationPhase::Perform,
        Duration::from_secs(60),
    )
    .await;
    cluster.kill_operator();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_operator().unwrap();
    wait_phase(
        &vmms,
        "through-restart",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    runs_once_on(&cluster, &vms, "node-b").await;
    guest_goes_on(&cluster, "node-b", 0).await;
}

#[tokio::test]
async fn an_agent_restart_mid_migration_completes_or_rolls_back_with_one_guest() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(&cluster, &migration_yaml("agent-restart", "node-b", LONG)).await;
    wait_phase(
        &vmms,
        "agent-restart",
        MigrationPhase::Perform,
        Duration::from_secs(60),
    )
    .await;
    cluster.kill_agent("node-a");
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.start_agent("node-a").unwrap();
    let end = eventually("the migration to end", Duration::from_secs(180), || async {
        phase_of(&vmms, "agent-restart")
            .await
            .filter(|p| p.is_terminal())
    })
    .await;
    let node = if end == MigrationPhase::Succeeded {
        "node-b"
    } else {
        "node-a"
    };
    runs_once_on(&cluster, &vms, node).await;
    guest_goes_on(&cluster, node, 0).await;
}

#[tokio::test]
async fn a_second_migration_of_the_same_vm_waits_for_the_first() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(&cluster, &migration_yaml("first", "node-b", LONG)).await;
    wait_phase(
        &vmms,
        "first",
        MigrationPhase::Perform,
        Duration::from_secs(60),
    )
    .await;
    apply_yaml(&cluster, &migration_yaml("second", "node-a", UNLIMITED)).await;
    let why = eventually(
        "the second to say why it waits",
        Duration::from_secs(30),
        || async {
            let s = vmms.get("second").await.ok()?.status?;
            let c = s.conditions.iter().find(|c| c.type_ == "Admitted")?.clone();
            (s.phase == Some(MigrationPhase::Pending)).then_some(c)
        },
    )
    .await;
    assert_eq!(
        (why.status.as_str(), why.reason.as_str()),
        ("False", "VMBusy")
    );
    assert!(
        why.message.contains("held by migration first"),
        "{}",
        why.message
    );
    wait_phase(
        &vmms,
        "first",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    wait_phase(
        &vmms,
        "second",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    runs_once_on(&cluster, &vms, "node-a").await;
}

#[tokio::test]
async fn deleting_a_running_migration_rolls_it_back_before_it_goes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(&cluster, &migration_yaml("doomed", "node-b", NEVER_ENDING)).await;
    wait_phase(
        &vmms,
        "doomed",
        MigrationPhase::Perform,
        Duration::from_secs(60),
    )
    .await;
    vmms.delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    // The finalizer holds it while it rolls back; it ends Cancelled, then it is gone.
    eventually("the rollback to end", Duration::from_secs(60), || async {
        match vmms.get_opt("doomed").await.ok()? {
            Some(m) => {
                let phase = m.status.and_then(|s| s.phase)?;
                assert!(
                    phase != MigrationPhase::Succeeded,
                    "the deleted migration completed"
                );
                None
            }
            None => Some(()),
        }
    })
    .await;
    runs_once_on(&cluster, &vms, "node-a").await;
    assert_eq!(
        vms.get("demo").await.unwrap().status.unwrap().migration,
        None
    );
    let now = last_pass(&cluster, "node-a", "demo").unwrap();
    guest_goes_on(&cluster, "node-a", now).await;
}

#[tokio::test]
async fn a_standby_operator_takes_over_when_the_leader_dies() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ferry-system");
    let holder = || async {
        leases
            .get("ferry-operator-leader")
            .await
            .ok()?
            .spec?
            .holder_identity
    };
    let first = eventually("a leader", Duration::from_secs(30), &holder).await;
    let standby = cluster.start_second_operator().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holder().await.as_deref(),
        Some(first.as_str()),
        "the standby took the lease from a live leader"
    );
    cluster.kill_operator();
    let second = eventually("the standby to lead", Duration::from_secs(30), || async {
        holder().await.filter(|h| *h != first)
    })
    .await;
    assert!(
        second.contains(&standby.to_string()),
        "{second} is not the standby (pid {standby})"
    );
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(
        &cluster,
        &migration_yaml("after-failover", "node-b", UNLIMITED),
    )
    .await;
    wait_phase(
        &vmms,
        "after-failover",
        MigrationPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    runs_once_on(&cluster, &vms, "node-b").await;
}

#[tokio::test]
async fn progress_shows_in_kubectl_get_watch_and_the_chart_policy_applies() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let vms = example_vm_running(&cluster, &client).await;
    let watch = cluster
        .kubectl()
        .args(["get", "vmm", "-w", "--no-headers"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    apply_yaml(&cluster, &migration_yaml("watched", "node-b", LONG)).await;
    wait_phase(
        &vmms,
        "watched",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut watch = watch;
    watch.start_kill().unwrap();
    let out = watch.wait_with_output().await.unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    // NAME PHASE VM SOURCE TARGET PROGRESS DOWNTIME AGE
    let percents: std::collections::BTreeSet<String> = lines
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() >= 6 && w[1] == "Perform")
        .map(|w| w[5].to_string())
        .filter(|p| p.ends_with('%'))
        .collect();
    assert!(
        percents.len() >= 2,
        "progress did not move in `kubectl get vmm -w`:\n{lines}"
    );
    // The chart's default policy (preset Balanced) under the migration's own fields.
    let policy = vmms
        .get("watched")
        .await
        .unwrap()
        .status
        .unwrap()
        .policy
        .unwrap();
    assert_eq!(policy.preset, Some(ferry_crds::Preset::Balanced));
    assert_eq!(policy.bandwidth_mi_bps, Some(8));
    assert_eq!(policy.max_downtime_ms, Some(10000));
    runs_once_on(&cluster, &vms, "node-b").await;
}

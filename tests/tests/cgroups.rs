//! Guests outside the agent's cgroup (issue 16, "Guests outside the agent's
//! container"), on the local cluster with the host's real cgroups: each guest's QEMU
//! runs in `<parent>/<guest key>` of the host's memory and cpu hierarchies (the agent's
//! `--guest-cgroup-parent`; the harness gives each cluster and node its own parent),
//! with the guest's RAM plus the overhead as its memory limit and its vCPUs as its CPU
//! weight, never in the agent's own cgroup (in no hierarchy); it follows the guest across a migration and
//! is gone once the guest stops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_agent::cgroup::{DEFAULT_OVERHEAD_MIB, Layout};
use ferry_crds::MigrationPhase;
use ferry_tests::cluster::CGROUP_ROOT;
use ferry_tests::e2e_support::*;
use ferry_tests::repo_root;
use kube::api::{Patch, PatchParams};

/// The cgroup paths (per hierarchy, e.g. `memory` → `/ferry-test/.../node-a/<key>`) of
/// process `pid`, from /proc/<pid>/cgroup.
fn cgroups_of(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers.to_string(), path.to_string()))
        })
        .collect()
}

/// Process `pid`'s path in the hierarchy whose controllers include `controller`.
fn cgroup_of(pid: u32, controller: &str) -> String {
    cgroups_of(pid)
        .into_iter()
        .find(|(c, _)| {
            c.split(',').any(|c| c == controller) || (c.is_empty() && controller.is_empty())
        })
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "pid {pid} has no {controller} cgroup: {:?}",
                cgroups_of(pid)
            )
        })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[tokio::test]
async fn a_guest_runs_in_a_cgroup_of_its_own_that_follows_it_and_goes_with_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let _logs = LogsOnFailure(cluster.cp.dir().to_path_buf());
    let layout = Layout::detect(Path::new(CGROUP_ROOT)).unwrap();
    let Layout::V1 { memory, cpu, .. } = &layout else {
        panic!("this test reads cgroup v1 files; the host has {layout:?}");
    };
    let vms = example_vm_running(&cluster, &client).await;
    let pid = cluster.qemu_pids("demo")["node-a"] as u32;
    let key = cluster
        .guest_dir("node-a", "demo")
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let want = format!("/{}/{key}", cluster.guest_cgroup_parent("node-a"));
    // In every hierarchy, not only memory and cpu: the container runtime finds the
    // processes it kills with a container in any of them.
    let all = cgroups_of(pid);
    assert!(all.len() > 2, "{all:?}");
    for (controllers, path) in &all {
        assert_eq!(path, &want, "QEMU's cgroup in hierarchy '{controllers}'");
    }
    let agent = cluster
        .component_pids()
        .into_iter()
        .find(|(what, _)| what == "agent node-a")
        .map(|(_, p)| p)
        .unwrap();
    assert_ne!(
        cgroup_of(agent, "memory"),
        want,
        "the agent is not in its guest's cgroup"
    );
    // The limits: the guest's RAM (256 MiB in the example) and the overhead, and 1024
    // shares per vCPU.
    let limit = read(&memory.join(&want[1..]).join("memory.limit_in_bytes"));
    assert_eq!(limit, ((256 + DEFAULT_OVERHEAD_MIB) << 20).to_string());
    let shares = read(&cpu.join(&want[1..]).join("cpu.shares"));
    assert_eq!(shares, "1024");
    println!(
        "node-a: QEMU pid {pid} in {want} (memory {limit} bytes, cpu.shares {shares}); the agent in {}",
        cgroup_of(agent, "memory")
    );

    // Migrated: the target's QEMU in node-b's cgroup of the guest; node-a's is gone.
    apply(&cluster, &repo_root().join("examples/migration.yaml")).await;
    let vmms = kube::Api::namespaced(client.clone(), "default");
    wait_phase(
        &vmms,
        "demo-to-node-b",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    let on_b = cluster.qemu_pids("demo")["node-b"] as u32;
    let want_b = format!("/{}/{key}", cluster.guest_cgroup_parent("node-b"));
    assert_eq!(cgroup_of(on_b, "memory"), want_b);
    let left: Vec<PathBuf> = eventually_some(|| {
        let left = cluster.guest_cgroups("node-a");
        left.is_empty().then_some(left)
    })
    .await;
    assert!(left.is_empty());
    println!("migrated: QEMU pid {on_b} in {want_b}; node-a has no guest cgroup left");

    // Stopped: its cgroup goes with it.
    vms.patch(
        "demo",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"running": false}})),
    )
    .await
    .unwrap();
    eventually_some(|| cluster.guest_cgroups("node-b").is_empty().then_some(())).await;
    println!("stopped: node-b has no guest cgroup left");
}

/// Polls `f` every 200 ms for up to 30 s.
async fn eventually_some<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..150 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("not within 30 s");
}

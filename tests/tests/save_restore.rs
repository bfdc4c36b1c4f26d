//! End to end: a migration to a file saves the example VM on node-a (zstd) and stops it;
//! the same VirtualMachine, its spec updated to `nodeName: node-b` and `restoreFrom`,
//! starts on node-b from the file and its guest goes on counting. A truncated copy is
//! refused first, with a condition and an Event, and nothing else changes. A save and a
//! restore whose path is in another namespace's directory of the storage roots are
//! refused before anything is done: the guest runs on, no QEMU starts. The restore
//! records the file's SHA-256. Hostile files in the namespace's save dir (a valid file
//! re-signed with another key, a flipped MAC byte, a decompression bomb) are refused
//! with their reason while the restored guest runs on.

use std::io::Read;
use std::time::Duration;

use ferry_crds::{
    MigrationPhase, SaveCompression, StepOutcome, VirtualMachine, VirtualMachineMigration, VmPhase,
};
use ferry_tests::e2e_support::*;
use ferry_tests::repo_root;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

async fn ready_reason(vms: &Api<VirtualMachine>) -> Option<(String, String)> {
    let s = vms.get("demo").await.ok()?.status?;
    let c = s.conditions.into_iter().find(|c| c.type_ == "Ready")?;
    Some((c.reason, c.message))
}

#[tokio::test]
async fn save_on_one_node_and_restore_on_the_other() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let _logs = LogsOnFailure(cluster.cp.dir().to_path_buf());
    // Beneath the cluster's own read-write storage roots, namespace default's part.
    let saves = cluster.save_dir("default");
    // The example VM on a copy of its disk: QEMU locks the image, and other clusters on
    // this machine may run the example at the same time.
    let disk = cluster.disk("default", "test-guest.img");
    std::fs::copy(ferry_tests::cluster::EXAMPLE_DISK, &disk).unwrap();
    let example = std::fs::read_to_string(repo_root().join("examples/virtualmachine.yaml"))
        .unwrap()
        .replace(
            ferry_tests::cluster::EXAMPLE_DISK,
            &disk.display().to_string(),
        );
    apply_yaml(&cluster, &example).await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    eventually(
        "the VM to run on node-a",
        Duration::from_secs(60),
        || async {
            let s = vms.get("demo").await.ok()?.status?;
            (s.phase == Some(VmPhase::Running) && s.node_name.as_deref() == Some("node-a"))
                .then_some(())
        },
    )
    .await;
    eventually("the guest to count", Duration::from_secs(60), || async {
        (last_pass(&cluster, "node-a", "demo")? >= 2).then_some(())
    })
    .await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let path = saves.join("demo.fsav");
    let before = last_pass(&cluster, "node-a", "demo").unwrap();

    // The API refuses a save with a target, and a path that is not absolute.
    let bad = |extra: &str, path: &str| {
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachineMigration\nmetadata:\n  name: bad-save\n\
             spec:\n  vmName: demo\n{extra}  toFile:\n    path: {path}\n"
        )
    };
    for (yaml, says) in [
        (
            bad("  targetNode: node-b\n", "/saves/demo.fsav"),
            "toFile cannot be combined with targetNode",
        ),
        (
            bad("", "saves/demo.fsav"),
            "path must be an absolute file path",
        ),
    ] {
        let (ok, said) = cluster.cp.apply(&yaml).await;
        assert!(!ok && said.contains(says), "{said}");
    }

    // A save into another namespace's directory fails before the guest is touched.
    let elsewhere = cluster.save_dir("other").join("demo.fsav");
    let pid = cluster.qemu_pids("demo")["node-a"];
    apply_yaml(&cluster, &save_yaml("save-elsewhere", &elsewhere)).await;
    wait_phase(
        &vmms,
        "save-elsewhere",
        MigrationPhase::Failed,
        Duration::from_secs(120),
    )
    .await;
    let status = vmms.get("save-elsewhere").await.unwrap().status.unwrap();
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    let says = format!(
        "spec.toFile.path: {}: not under {}/",
        elsewhere.display(),
        saves.display()
    );
    assert!(failed.message.contains(&says), "{}", failed.message);
    let perform = status.steps.unwrap().perform.unwrap();
    assert_eq!(perform.outcome, Some(StepOutcome::Failed));
    assert_eq!(
        perform.reason,
        Some(ferry_crds::Reason::Refused),
        "{perform:?}"
    );
    assert!(
        !elsewhere.exists(),
        "a file was created in another namespace"
    );
    let left = ferry_tests::leaks::temporary_files(&cluster);
    assert!(left.is_empty(), "temporary files left: {left:?}");
    assert_eq!(
        std::fs::read_dir(elsewhere.parent().unwrap())
            .unwrap()
            .count(),
        0
    );
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    assert_eq!(vm.phase, Some(VmPhase::Running));
    assert_eq!(vm.migration, None);
    runs_once_on(&cluster, &vms, "node-a").await;
    assert_eq!(
        cluster.qemu_pids("demo")["node-a"],
        pid,
        "the guest's QEMU changed"
    );
    let now = last_pass(&cluster, "node-a", "demo").unwrap();
    guest_goes_on(&cluster, "node-a", now).await;

    apply_yaml(&cluster, &save_yaml("save-demo", &path)).await;
    wait_phase(
        &vmms,
        "save-demo",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;

    // The migration: Begin, Perform, Confirm on node-a, no target; what it saved.
    let status = vmms.get("save-demo").await.unwrap().status.unwrap();
    assert_eq!(status.source_node.as_deref(), Some("node-a"));
    assert_eq!(status.target_node, None);
    let steps = status.steps.unwrap();
    for phase in [
        MigrationPhase::Begin,
        MigrationPhase::Perform,
        MigrationPhase::Confirm,
    ] {
        let step = steps.get(phase).unwrap();
        assert_eq!(step.node, "node-a");
        assert_eq!(step.outcome, Some(StepOutcome::Succeeded), "{step:?}");
    }
    assert!(steps.prepare.is_none() && steps.finish.is_none());
    let saved = status.saved_state.expect("status.savedState");
    assert_eq!(saved.compression, SaveCompression::Zstd);
    assert_eq!(saved.path, path.display().to_string());
    assert_eq!(
        saved.file_bytes as u64,
        std::fs::metadata(&path).unwrap().len()
    );
    assert!(saved.stream_bytes > saved.file_bytes, "{saved:?}");
    println!(
        "saved {} bytes of state into {} bytes (zstd) in {} ms",
        saved.stream_bytes, saved.file_bytes, saved.save_time_ms
    );

    // The VM: Stopped, saved, on no node, and no QEMU anywhere; it does not boot afresh.
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    assert_eq!(vm.phase, Some(VmPhase::Stopped));
    assert_eq!(vm.node_name, None);
    assert_eq!(vm.saved_state.unwrap().path, saved.path);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        cluster.qemu_pids("demo").len(),
        0,
        "a QEMU of the saved guest runs"
    );
    assert_eq!(
        ready_reason(&vms).await.unwrap().0,
        "Saved",
        "the saved guest was started again"
    );

    // A truncated copy is refused on node-b: a condition and an Event, nothing else.
    let good = std::fs::read(&path).unwrap();
    let truncated = saves.join("truncated.fsav");
    std::fs::write(&truncated, &good[..good.len() * 2 / 3]).unwrap();
    let restore = |file: &std::path::Path| json!({"spec": {"nodeName": "node-b", "restoreFrom": file.display().to_string()}});
    vms.patch(
        "demo",
        &PatchParams::default(),
        &Patch::Merge(restore(&truncated)),
    )
    .await
    .unwrap();
    let (_, message) = eventually(
        "the truncated file to be refused",
        Duration::from_secs(60),
        || async {
            ready_reason(&vms)
                .await
                .filter(|(r, _)| r == "StateFileTruncated")
        },
    )
    .await;
    assert!(message.contains("is truncated"), "{message}");
    let out = cluster
        .kubectl()
        .args([
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=demo",
            "-o",
            "jsonpath={.items[*].reason}",
        ])
        .output()
        .await
        .unwrap();
    let reasons = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        reasons
            .split_whitespace()
            .any(|r| r == "StateFileTruncated"),
        "no StateFileTruncated Event in {reasons:?}"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        cluster.qemu_pids("demo").len(),
        0,
        "a QEMU started for a truncated file"
    );
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    assert_eq!(vm.phase, Some(VmPhase::Stopped));
    assert_eq!(vm.node_name, None, "the refused restore claimed the VM");
    assert!(vm.saved_state.is_some());
    assert_eq!(std::fs::read(&path).unwrap(), good);
    assert_eq!(std::fs::read(&truncated).unwrap().len(), good.len() * 2 / 3);

    // A good copy in another namespace's directory is refused the same way.
    let foreign = elsewhere.with_file_name("copy.fsav");
    std::fs::write(&foreign, &good).unwrap();
    vms.patch(
        "demo",
        &PatchParams::default(),
        &Patch::Merge(restore(&foreign)),
    )
    .await
    .unwrap();
    let (_, message) = eventually(
        "the other namespace's file to be refused",
        Duration::from_secs(60),
        || async {
            ready_reason(&vms)
                .await
                .filter(|(r, _)| r == "HostPathRefused")
        },
    )
    .await;
    let says = format!("spec.restoreFrom: {}: not under", foreign.display());
    assert!(message.contains(&says), "{message}");
    assert_eq!(
        cluster.qemu_pids("demo").len(),
        0,
        "a QEMU started for a refused path"
    );
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    assert_eq!(vm.node_name, None, "the refused restore claimed the VM");

    // The real file restores on node-b, and the guest goes on where it stopped.
    vms.patch(
        "demo",
        &PatchParams::default(),
        &Patch::Merge(restore(&path)),
    )
    .await
    .unwrap();
    eventually(
        "the VM to run on node-b",
        Duration::from_secs(120),
        || async {
            let s = vms.get("demo").await.ok()?.status?;
            (s.phase == Some(VmPhase::Running) && s.node_name.as_deref() == Some("node-b"))
                .then_some(())
        },
    )
    .await;
    let vm = vms.get("demo").await.unwrap().status.unwrap();
    assert_eq!(
        vm.restored_from.as_deref(),
        Some(path.display().to_string().as_str())
    );
    assert_eq!(vm.saved_state, None);
    runs_once_on(&cluster, &vms, "node-b").await;
    let first_on_b = first_pass_on(&cluster, "node-b", Duration::from_secs(60)).await;
    assert!(
        first_on_b > before,
        "the counter restarted on node-b: {first_on_b} after {before}"
    );
    let (on_b, bad) = passes(&cluster.serial_log("node-b", "demo"));
    assert!(!bad, "the restored guest found a bad page");
    for w in on_b.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the counter skipped on node-b: {on_b:?}");
    }
    guest_goes_on(&cluster, "node-b", first_on_b).await;

    // The restore recorded which file it consumed: its path and its SHA-256.
    let file = std::fs::File::open(&path).unwrap();
    let sha256 = ferry_agent::statefile::recorded_sha256(&file, &path).unwrap();
    assert_eq!(vm.restored_sha256.as_deref(), Some(sha256.as_str()));

    hostile_files_are_refused(&cluster, &client, &good).await;
}

/// Hostile files a tenant could leave in its namespace's save dir, each named by
/// `spec.restoreFrom` of a new VM on node-b while the restored guest runs there: the
/// good file re-signed with another key, a byte flipped in its MAC, and a
/// decompression bomb (signed with the cluster's own key, so that it gets past the MAC
/// and the decoder's bound is what stops it; unsigned, the MAC refuses it unread). Each
/// is refused with its reason and a message naming the field, the path and the rule;
/// no QEMU starts and the running guest goes on, same QEMU.
async fn hostile_files_are_refused(
    cluster: &ferry_tests::Cluster,
    client: &kube::Client,
    good: &[u8],
) {
    use ferry_agent::statefile::{Compression, Meta, StateKey, craft};
    let saves = cluster.save_dir("default");
    let pid = cluster.qemu_pids("demo")["node-b"];
    let key: k8s_openapi::api::core::v1::Secret =
        Api::namespaced(client.clone(), ferry_tests::cluster::NAMESPACE)
            .get("ferry-state-key")
            .await
            .unwrap();
    let cluster_key = StateKey::from_bytes(&key.data.unwrap()["key"].0).unwrap();
    let other = StateKey::from_bytes(&[0x42; 32]).unwrap();
    let resigned = saves.join("resigned.fsav");
    std::fs::write(&resigned, craft::resign(good, &other).unwrap()).unwrap();
    let flipped = saves.join("flipped-mac.fsav");
    let mut bytes = good.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&flipped, &bytes).unwrap();
    // 256 MiB of zeros in a few KiB of zstd, declaring 1 MiB.
    let (name, uuid) = ("intruder", "0b0b0b0b-0000-4000-8000-00000000b0b0");
    let payload = craft::compress(Compression::Zstd, std::io::repeat(0).take(256 << 20)).unwrap();
    let meta = Meta {
        vm: name.into(),
        uuid: uuid.parse().unwrap(),
        domain_xml: String::new(),
        qemu_version: "9.0.0".into(),
        node: "node-b".into(),
        created_unix_ms: 0,
    };
    let bomb = saves.join("bomb.fsav");
    let file = craft::assemble(
        Compression::Zstd,
        &meta,
        &payload,
        1 << 20,
        [0; 32],
        &cluster_key,
    );
    std::fs::write(&bomb, &file).unwrap();
    let unsigned_bomb = saves.join("unsigned-bomb.fsav");
    std::fs::write(&unsigned_bomb, craft::resign(&file, &other).unwrap()).unwrap();

    let disk = cluster.disk("default", "test-guest.img");
    let vm_yaml = |restore_from: &std::path::Path| {
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n\
             spec:\n  nodeName: node-b\n  restoreFrom: {}\n  domainXML: |\n    \
             <domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>\n",
            restore_from.display(),
            disk.display()
        )
    };
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let started = std::time::Instant::now();
    for (file, reason, says) in [
        (&resigned, "StateFileBadMac", "not this cluster's key"),
        (&flipped, "StateFileBadMac", "not those the key signed"),
        (&unsigned_bomb, "StateFileBadMac", "not this cluster's key"),
        (
            &bomb,
            "StateFileOversized",
            "inflates beyond the 1048576 bytes",
        ),
    ] {
        let before = std::fs::read(file).unwrap();
        apply_yaml(cluster, &vm_yaml(file)).await;
        let (_, message) = eventually(
            &format!("{} to be refused", file.display()),
            Duration::from_secs(30),
            || async {
                let s = vms.get(name).await.ok()?.status?;
                let c = s.conditions.into_iter().find(|c| c.type_ == "Ready")?;
                let generation = vms.get(name).await.ok()?.metadata.generation;
                (c.reason == reason && c.observed_generation == generation)
                    .then_some((c.reason, c.message))
            },
        )
        .await;
        let field_path_rule = format!("spec.restoreFrom: saved state {}", file.display());
        assert!(message.contains(&field_path_rule), "{message}");
        assert!(message.contains(says), "{message}");
        println!("{}: {reason}: {message}", file.display());
        assert!(
            cluster.qemu_pids(name).is_empty(),
            "a QEMU started for {}",
            file.display()
        );
        let vm = vms.get(name).await.unwrap().status.unwrap();
        assert_eq!(vm.node_name, None, "the refused restore claimed the VM");
        assert_eq!(std::fs::read(file).unwrap(), before, "the file changed");
        assert_eq!(
            cluster.qemu_pids("demo")["node-b"],
            pid,
            "the running guest's QEMU changed"
        );
    }
    println!("four hostile files refused in {:?}", started.elapsed());
    let now = last_pass(cluster, "node-b", "demo").unwrap();
    guest_goes_on(cluster, "node-b", now).await;
}

/// A migration `name` saving the example VM into `path` with zstd.
fn save_yaml(name: &str, path: &std::path::Path) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachineMigration\nmetadata:\n  name: {name}\n\
         spec:\n  vmName: demo\n  toFile:\n    path: {}\n    compression: Zstd\n",
        path.display()
    )
}

/// Prints the tail of the agents' and the operator's logs when the test fails.
struct LogsOnFailure(std::path::PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["agent-node-a.log", "agent-node-b.log", "operator.log"] {
                let t = std::fs::read_to_string(self.0.join(f)).unwrap_or_default();
                eprintln!(
                    "==== {f}\n{}",
                    t.lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
    }
}

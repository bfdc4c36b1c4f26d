//! `make test-hostile` (issue 15, "Tenant-safe nodes"): a tenant's specs made hostile,
//! end to end on the real control plane, operator and two agents. Every host path a
//! VirtualMachine's definition names is tried outside the storage roots, in another
//! namespace's directory, through a symbolic link planted inside a root, as a FIFO or a
//! device, as a qcow2 naming a backing file, and a migration's `targetDomainXML` moves a
//! disk out of the roots. Each case prints one line: the case, the refusal as the status
//! reports it, and whether anything was opened or created outside the roots. Each must
//! be refused naming the field and the rule, start no QEMU, leave the running guest
//! untouched (same pid, still counting), and open or create no file outside the roots:
//! the outside files are unchanged, nothing new appeared next to them, and no process of
//! the cluster (agents, operator, QEMUs) holds a file outside the roots and state dirs.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_agent::testguest::qcow2_header;
use ferry_crds::{MigrationPhase, VirtualMachine, VirtualMachineMigration, VmPhase};
use ferry_tests::Cluster;
use ferry_tests::cluster::{DISKS_ROOT, IMAGES_ROOT, SAVES_ROOT, qemu_pid};
use ferry_tests::e2e_support::*;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

const NS: &str = "default";
const LIMIT: Duration = Duration::from_secs(60);
const REASON: &str = "HostPathRefused";

/// What the cases point at: files outside every root, which must stay as they are.
struct Outside {
    dir: PathBuf,
    /// A bootable test guest image: opened, it would run.
    secret: PathBuf,
    /// Where a serial output path points; must never be created.
    created: PathBuf,
}

/// One hostile VirtualMachine: its `<devices>` disk/serial elements and what the refusal
/// must say.
struct Case {
    name: &'static str,
    devices: String,
    /// Substrings of the refusal: the field and the rule.
    expect: Vec<String>,
}

fn disk(source: &Path, format: &str, extra: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{format}'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/>{extra}</disk>",
        source.display()
    )
}

const DISK_FIELD: &str = "spec.domainXML: <disk> vda <source file>";

fn domain(name: &str, uuid: &str, devices: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
         <memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><cpu mode='maximum'/>\
         <devices>{devices}</devices></domain>"
    )
}

/// Plants the cases' files and returns the cases.
fn cases(cluster: &Cluster, outside: &Outside) -> Vec<Case> {
    let mine = cluster.disk(NS, "x").parent().unwrap().to_path_buf();
    let theirs = cluster.disk("team-b", "theirs.img");
    std::fs::copy(&outside.secret, &theirs).unwrap();
    let link = mine.join("link.img");
    symlink(&outside.secret, &link).unwrap();
    let link_dir = mine.join("elsewhere");
    symlink(&outside.dir, &link_dir).unwrap();
    let fifo = mine.join("fifo.img");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let device = mine.join("null.img");
    nix::sys::stat::mknod(
        &device,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let backed = mine.join("backed.qcow2");
    std::fs::write(
        &backed,
        qcow2_header(Some(outside.secret.to_str().unwrap())),
    )
    .unwrap();
    let confused = mine.join("confused.img");
    std::fs::write(&confused, qcow2_header(None)).unwrap();
    let base = Path::new(IMAGES_ROOT).join("hostile-base.img");
    std::fs::copy(&outside.secret, &base).unwrap();
    let s = |p: &Path| p.display().to_string();
    let case = |name, devices: String, rule: &str| Case {
        name,
        devices,
        expect: vec![DISK_FIELD.to_string(), rule.to_string()],
    };
    vec![
        case(
            "disk outside every root",
            disk(&outside.secret, "raw", ""),
            "outside every storage root",
        ),
        case(
            "disk at /etc/shadow",
            disk(Path::new("/etc/shadow"), "raw", ""),
            "/etc/shadow: outside every storage root",
        ),
        case(
            "'..' out of the namespace's directory",
            disk(
                Path::new(&format!("{}/../team-b/theirs.img", s(&mine))),
                "raw",
                "",
            ),
            "has a '..' component",
        ),
        case(
            "doubled slash",
            disk(Path::new(&format!("{}//x.img", s(&mine))), "raw", ""),
            "has an empty component",
        ),
        case(
            "another namespace's disk",
            disk(&theirs, "raw", ""),
            &format!("not under {}/", s(&mine)),
        ),
        case(
            "symbolic link planted in a root, to outside",
            disk(&link, "raw", ""),
            "a symbolic link, or beneath one",
        ),
        case(
            "directory symlink planted in a root, to outside",
            disk(&link_dir.join("secret.img"), "raw", ""),
            "a symbolic link, or beneath one",
        ),
        case(
            "a FIFO",
            disk(&fifo, "raw", ""),
            "a FIFO, not a regular file",
        ),
        case(
            "a device node",
            disk(&device, "raw", ""),
            "a character device, not a regular file",
        ),
        case(
            "qcow2 naming a backing file",
            disk(&backed, "qcow2", ""),
            "a qcow2 with a backing file",
        ),
        case(
            "qcow2 declared raw",
            disk(&confused, "raw", ""),
            "declared raw but starts with a qcow2 header",
        ),
        case(
            "read-write disk in the read-only root",
            disk(&base, "raw", ""),
            &format!("read-write under a read-only root ({IMAGES_ROOT})"),
        ),
        case(
            "the storage root itself",
            disk(mine.parent().unwrap(), "raw", ""),
            "names the storage root",
        ),
        Case {
            name: "serial output path outside",
            devices: format!(
                "<serial type='file'><source path='{}'/><target port='0'/></serial>",
                s(&outside.created)
            ),
            expect: vec![
                "spec.domainXML: <serial> port 0 <source path>".to_string(),
                "a spec may not name an output file".to_string(),
            ],
        },
    ]
}

/// A file's identity and content, to see it was not touched.
fn fingerprint(p: &Path) -> (u64, i64, i64, Vec<u8>) {
    let m = std::fs::metadata(p).unwrap();
    (
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
        std::fs::read(p).unwrap(),
    )
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The paths process `pid` holds open (regular files and directories; devices,
/// sockets, pipes, anonymous inodes and memfds left out).
fn open_paths(pid: u32) -> Vec<PathBuf> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|t| t.is_absolute())
        .filter(|t| !t.starts_with("/dev") && !t.starts_with("/proc"))
        .filter(|t| !t.to_string_lossy().starts_with("/memfd:"))
        .collect()
}

/// The files the cluster's processes (agents, operator, the given QEMUs) hold outside
/// the storage roots, the state dirs and the cluster's own directory (their logs and
/// kubeconfigs), or in the outside directory. What this test's own process holds (a
/// lock `make` or `flock` took, which every child inherits) is not theirs.
fn held_outside(cluster: &Cluster, qemus: &[i32], outside: &Outside) -> Vec<String> {
    let inherited = open_paths(std::process::id());
    let allowed: Vec<PathBuf> = [DISKS_ROOT, IMAGES_ROOT, SAVES_ROOT]
        .iter()
        .map(PathBuf::from)
        .chain([cluster.cp.dir().to_path_buf()])
        .collect();
    let pids = cluster
        .component_pids()
        .into_iter()
        .map(|(_, p)| p)
        .chain(qemus.iter().map(|&p| p as u32));
    let mut found = Vec::new();
    for pid in pids {
        for path in open_paths(pid) {
            let elsewhere =
                !allowed.iter().any(|a| path.starts_with(a)) && !inherited.contains(&path);
            if path.starts_with(&outside.dir) || elsewhere {
                found.push(format!("pid {pid}: {}", path.display()));
            }
        }
    }
    found
}

/// The TCP sockets process `pid` listens on (`/proc/net/tcp{,6}` rows in state LISTEN
/// whose inode is one of its descriptors), as `local address:port` in hex.
fn tcp_listeners(pid: u32) -> Vec<String> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|t| {
            let t = t.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for row in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let cols: Vec<&str> = row.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                out.push(cols[1].to_string());
            }
        }
    }
    out
}

async fn refused_start(vms: &Api<VirtualMachine>, name: &str) -> String {
    refused_for(vms, name, REASON).await
}

/// The message of VM `name`'s refused start, once it is Failed with reason `reason`.
async fn refused_for(vms: &Api<VirtualMachine>, name: &str, reason: &str) -> String {
    eventually(&format!("{name} to be refused"), LIMIT, || async {
        let s = vms.get(name).await.ok()?.status?;
        if s.phase != Some(VmPhase::Failed) {
            return None;
        }
        s.conditions
            .iter()
            .find(|c| c.reason == reason)
            .map(|c| c.message.clone())
    })
    .await
}

async fn gone(vms: &Api<VirtualMachine>, name: &str) {
    vms.delete(name, &DeleteParams::default()).await.unwrap();
    eventually(&format!("{name} to be deleted"), LIMIT, || async {
        vms.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn hostile_specs_are_refused_and_nothing_outside_the_roots_is_touched() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, client) = up().await;
    let _logs = LogsOnFailure(cluster.cp.dir().to_path_buf());
    let outside = Outside {
        dir: cluster.cp.dir().join("outside"),
        secret: cluster.cp.dir().join("outside/secret.img"),
        created: cluster.cp.dir().join("outside/created.log"),
    };
    std::fs::create_dir_all(&outside.dir).unwrap();
    let image_bytes = ferry_agent::testguest::image(Default::default()).unwrap();
    std::fs::write(&outside.secret, &image_bytes).unwrap();

    // The bystander: a tenant's guest that must not notice anything.
    let vms = guests_running(&cluster, &client, "node-a", &["bystander"]).await;
    let bystander = cluster.qemu_pids("bystander")["node-a"];
    // QEMU got its disk as a descriptor: no image path on its command line.
    let cmdline = std::fs::read(format!("/proc/{bystander}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("filename=/dev/fdset/1"), "{cmdline}");
    assert!(!cmdline.contains("bystander.img"), "{cmdline}");
    let image = cluster.disk(NS, "bystander.img");
    assert!(open_paths(bystander as u32).contains(&image));
    // A base image in the read-only root, attached <readonly/>, is fine.
    let base = Path::new(IMAGES_ROOT).join("hostile-reader.img");
    std::fs::write(&base, &image_bytes).unwrap();
    let reader: VirtualMachine = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "reader"},
        "spec": {"domainXML": domain("reader", "6f1c0b8e-5a52-4d3e-9a43-0d6f2a7dffff",
                    &format!("{}{}", disk(&base, "raw", "<readonly/>"),
                             "<graphics type='vnc' autoport='yes' listen='0.0.0.0'/>")),
                 "nodeName": "node-a", "terminationGracePeriodSeconds": 0}
    }))
    .unwrap();
    vms.create(&PostParams::default(), &reader).await.unwrap();
    eventually("reader to run", LIMIT, || async {
        let s = vms.get("reader").await.ok()?.status?;
        (s.phase == Some(VmPhase::Running)).then_some(())
    })
    .await;
    let reader_pid = cluster.qemu_pids("reader")["node-a"];
    let tcp = tcp_listeners(reader_pid as u32);
    assert!(tcp.is_empty(), "QEMU listens on TCP: {tcp:?}");
    let console = vms
        .get("reader")
        .await
        .unwrap()
        .status
        .unwrap()
        .graphics
        .unwrap();
    assert!(
        console.socket.ends_with("/vnc.sock")
            && console
                .socket
                .starts_with(cluster.guest_dir("node-a", "reader").to_str().unwrap()),
        "{console:?}"
    );
    println!(
        "{:<48} runs (read-only base image; QEMU holds its images as fds from /dev/fdset; \
         its VNC console, asked for on 0.0.0.0, is the UNIX socket {}; QEMU listens on no TCP port)",
        "control: <readonly/> disk in the read-only root", console.socket
    );
    gone(&vms, "reader").await;
    let cases = cases(&cluster, &outside);
    let secret_before = fingerprint(&outside.secret);
    let outside_before = listing(&outside.dir);
    let mut lines = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = format!("hostile-{i}");
        let uuid = format!("6f1c0b8e-5a52-4d3e-9a43-0d6f2a7d{:04x}", i);
        let vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"domainXML": domain(&name, &uuid, &case.devices), "nodeName": "node-a",
                     "terminationGracePeriodSeconds": 0}
        }))
        .unwrap();
        vms.create(&PostParams::default(), &vm).await.unwrap();
        let message = refused_start(&vms, &name).await;
        for want in &case.expect {
            assert!(
                message.contains(want.as_str()),
                "{}: {message:?} lacks {want:?}",
                case.name
            );
        }
        assert!(
            cluster.qemu_pids(&name).is_empty(),
            "{}: a QEMU started",
            case.name
        );
        let held = held_outside(&cluster, &[bystander], &outside);
        assert!(
            held.is_empty(),
            "{}: files held outside the roots: {held:?}",
            case.name
        );
        assert_eq!(fingerprint(&outside.secret), secret_before, "{}", case.name);
        assert_eq!(
            listing(&outside.dir),
            outside_before,
            "{}: created",
            case.name
        );
        let log = std::fs::read_to_string(cluster.cp.dir().join("agent-node-a.log")).unwrap();
        let attempts = log
            .lines()
            .filter(|l| l.contains(&format!("vm={name} ")) && l.contains("the guest did not start"))
            .count();
        assert_eq!(attempts, 1, "{}: a refused start is not retried", case.name);
        gone(&vms, &name).await;
        let line = format!(
            "{:<48} refused: {message}; nothing opened outside the roots",
            case.name
        );
        println!("{line}");
        lines.push(line);
    }

    // A migration whose targetDomainXML moves the disk out of the roots: the target
    // refuses it in Prepare and the guest runs on where it was.
    let before = last_pass(&cluster, "node-a", "bystander").unwrap();
    let running = vms
        .get("bystander")
        .await
        .unwrap()
        .status
        .unwrap()
        .domain_xml
        .unwrap();
    let moved = running.replace(
        &cluster.disk(NS, "bystander.img").display().to_string(),
        &outside.secret.display().to_string(),
    );
    assert_ne!(moved, running);
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), NS);
    let m: VirtualMachineMigration = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
        "metadata": {"name": "hostile-target"},
        "spec": {"vmName": "bystander", "targetNode": "node-b", "targetDomainXML": moved}
    }))
    .unwrap();
    vmms.create(&PostParams::default(), &m).await.unwrap();
    wait_phase(&vmms, "hostile-target", MigrationPhase::Failed, LIMIT).await;
    let status = vmms.get("hostile-target").await.unwrap().status.unwrap();
    let message = status
        .conditions
        .iter()
        .find(|c| c.type_ == ferry_crds::conditions::FAILED)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    for want in [
        "the target definition: <disk> vda <source file>",
        "outside every storage root",
    ] {
        assert!(message.contains(want), "{message:?} lacks {want:?}");
    }
    vm_goes_on(&cluster, "node-a", "bystander", before).await;
    assert_eq!(
        cluster.qemu_pids("bystander"),
        [("node-a".to_string(), bystander)].into()
    );
    let held = held_outside(&cluster, &[bystander], &outside);
    assert!(held.is_empty(), "files held outside the roots: {held:?}");
    assert_eq!(fingerprint(&outside.secret), secret_before);
    assert_eq!(listing(&outside.dir), outside_before);
    println!(
        "{:<48} refused: {message}; nothing opened outside the roots",
        "targetDomainXML moving a disk outside"
    );
    twin_in_another_namespace(&cluster, &client, &running, bystander).await;
    second_writer_of_an_image(&cluster, &vms, &running, bystander).await;
    println!(
        "{} hostile cases refused or kept apart; the bystander ran on throughout",
        lines.len() + 3
    );
}

/// Another VM of the namespace naming the bystander's image, on the other node: the
/// image's disk lock (one per image file) refuses it before any QEMU starts.
async fn second_writer_of_an_image(
    cluster: &Cluster,
    vms: &Api<VirtualMachine>,
    bystanders_definition: &str,
    bystander: i32,
) {
    let before = last_pass(cluster, "node-a", "bystander").unwrap();
    let definition = bystanders_definition.replace(
        "6f1c0b8e", "7f1c0b8e", // another guest (uuid), the same image
    );
    assert_ne!(definition, bystanders_definition);
    let copycat: VirtualMachine = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "copycat"},
        "spec": {"domainXML": definition, "nodeName": "node-b",
                 "terminationGracePeriodSeconds": 0}
    }))
    .unwrap();
    vms.create(&PostParams::default(), &copycat).await.unwrap();
    let message = refused_for(vms, "copycat", "DiskLocked").await;
    let image = cluster.disk(NS, "bystander.img").display().to_string();
    for want in [
        image.as_str(),
        "in use by VirtualMachine default/bystander on node node-a",
    ] {
        assert!(message.contains(want), "{message:?} lacks {want:?}");
    }
    assert!(cluster.qemu_pids("copycat").is_empty(), "a QEMU started");
    gone(vms, "copycat").await;
    vm_goes_on(cluster, "node-a", "bystander", before).await;
    assert_eq!(
        cluster.qemu_pids("bystander"),
        [("node-a".to_string(), bystander)].into()
    );
    println!(
        "{:<48} refused: {message}; no QEMU started, the bystander ran on",
        "another VM writing the bystander's image"
    );
}

/// Another tenant's VM that copies the bystander's definition (its domain name and
/// uuid), with a disk of its own: it gets a guest of its own, and stopping and deleting
/// it never reach the bystander's (a guest is keyed by the VM's namespace and name and
/// the definition's uuid, not by what the domain calls itself).
async fn twin_in_another_namespace(
    cluster: &Cluster,
    client: &kube::Client,
    bystanders_definition: &str,
    bystander: i32,
) {
    use k8s_openapi::api::core::v1::Namespace;
    let before = last_pass(cluster, "node-a", "bystander");
    let other = "tenant-b";
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": other}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let twin_disk = cluster.disk(other, "twin.img");
    std::fs::write(
        &twin_disk,
        ferry_agent::testguest::image(Default::default()).unwrap(),
    )
    .unwrap();
    let definition = bystanders_definition.replace(
        &cluster.disk(NS, "bystander.img").display().to_string(),
        &twin_disk.display().to_string(),
    );
    assert_ne!(definition, bystanders_definition);
    let theirs: Api<VirtualMachine> = Api::namespaced(client.clone(), other);
    let twin: VirtualMachine = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "bystander"},
        "spec": {"domainXML": definition, "nodeName": "node-a",
                 "terminationGracePeriodSeconds": 0}
    }))
    .unwrap();
    theirs.create(&PostParams::default(), &twin).await.unwrap();
    eventually("the twin to run", LIMIT, || async {
        let s = theirs.get("bystander").await.ok()?.status?;
        (s.phase == Some(VmPhase::Running)).then_some(())
    })
    .await;
    let dirs = ferry_tests::cluster::guest_dirs(&cluster.node("node-a").state_dir, "bystander");
    assert_eq!(dirs.len(), 2, "one state dir per tenant's guest: {dirs:?}");
    let pids: BTreeSet<i32> = dirs.iter().filter_map(|d| qemu_pid(d)).collect();
    assert_eq!(pids.len(), 2, "two QEMUs: {pids:?}");
    assert!(pids.contains(&bystander));
    theirs
        .patch(
            "bystander",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"running": false}})),
        )
        .await
        .unwrap();
    eventually("the twin to stop", LIMIT, || async {
        let s = theirs.get("bystander").await.ok()?.status?;
        (s.phase == Some(VmPhase::Stopped)).then_some(())
    })
    .await;
    gone(&theirs, "bystander").await;
    let left: Vec<i32> =
        ferry_tests::cluster::guest_dirs(&cluster.node("node-a").state_dir, "bystander")
            .iter()
            .filter_map(|d| qemu_pid(d))
            .collect();
    assert_eq!(left, vec![bystander], "the bystander's QEMU alone is left");
    if let Some(before) = before {
        vm_goes_on(cluster, "node-a", "bystander", before).await;
    }
    println!(
        "{:<48} kept apart: tenant-b/bystander with the bystander's domain name and uuid ran its own QEMU, was stopped and deleted; the bystander's QEMU (pid {bystander}) ran on",
        "another namespace copying a running definition"
    );
}

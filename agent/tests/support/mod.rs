//! Test support: two simulated nodes on one machine, the test guest, serial log checks,
//! and cleanup of every QEMU a test started (also when it panics).
#![allow(dead_code)]

pub mod pki;

use ferry_agent::error::PhaseError;
use ferry_agent::node::Node;
use ferry_agent::phases::begin::{BeginInput, BeginOutput, begin};
use ferry_agent::phases::confirm::{ConfirmInput, Confirmed, confirm};
use ferry_agent::phases::finish::{FinishInput, FinishOutput, finish};
use ferry_agent::phases::perform::{PerformInput, PerformOutput, TransferProgress, perform};
use ferry_agent::phases::prepare::{PrepareInput, PrepareOutput, prepare};
use ferry_agent::phases::save::{ConfirmSavedInput, SaveInput, SaveOutput, confirm_saved, save};
use ferry_agent::policy::Policy;
use ferry_agent::qmp::StatusInfo;
use ferry_agent::statefile::{Compression, StateKey};
use ferry_agent::storage::{Access, Owner, StorageRoot, StorageRoots};
use ferry_agent::supervisor::{Guest, Supervisor};
use ferry_agent::tls::Credentials;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Tests that start QEMU run one at a time (the machine has two cores).
static QEMU_LOCK: Mutex<()> = Mutex::new(());

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferry_agent=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Writes the test guest into `dir`, dirtying `[start_mib, end_mib)` MiB with `delay`
/// between passes.
pub fn build_guest(dir: &Path, start_mib: u32, end_mib: u32, delay: u32) -> PathBuf {
    let img = ferry_agent::testguest::image(ferry_agent::testguest::Params {
        region_start_mib: start_mib,
        region_end_mib: end_mib,
        delay,
    })
    .expect("the test guest assembles (nasm must be installed)");
    let out = dir.join("guest.img");
    std::fs::write(&out, img).unwrap();
    out
}

/// The namespace the lab's VM is in: its disks, saves and restores are that
/// namespace's ([`Lab::file`], [`Lab::with_save_root`]).
pub const NAMESPACE: &str = "lab";
/// The lab's read-write storage root, in its dir; the VM's files are in
/// `<root>/lab/` ([`Lab::file`]).
pub const STORAGE: &str = "storage";

/// Both nodes' storage roots in lab dir `dir`: [`STORAGE`], read-write.
pub fn lab_roots(dir: &Path) -> StorageRoots {
    let root = dir.join(STORAGE);
    StorageRoots::new(vec![
        StorageRoot::new(root.to_str().unwrap(), Access::ReadWrite).unwrap(),
    ])
    .unwrap()
}

/// The lab's state key (fixed: a test may sign a file with it).
pub fn lab_key() -> StateKey {
    StateKey::from_bytes(&[0x5a; 32]).unwrap()
}

/// Another cluster's state key.
pub fn other_key() -> StateKey {
    StateKey::from_bytes(&[0xa5; 32]).unwrap()
}

/// The lab VM as the owner of its host files.
pub const OWNER: Owner<'static> = Owner {
    namespace: NAMESPACE,
    definition: "the lab's definition",
};

/// Two nodes (`node-a` on 127.0.0.2, `node-b` on 127.0.0.3) with separate state dirs and
/// host uuids, and one test VM. Dropping it kills every QEMU started under its dir.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub a: Supervisor,
    pub b: Supervisor,
    pub vm: String,
    pub uuid: Uuid,
    pub memory_mib: u32,
    pub disk: PathBuf,
    /// Node certificates from one test CA (node-a, node-b), for TLS migrations.
    pub tls: Option<(Credentials, Credentials)>,
    /// The test CA that issued them.
    pub ca: Option<pki::TestCa>,
    /// The lab cluster's state key, which both nodes hold: saves sign with it, restores
    /// check with it (an agent takes it from Secret `ferry-state-key`; here it is
    /// explicit). [`other_key`] is another cluster's.
    pub key: StateKey,
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// Begin of migration `m` of the lab's guest on node-a, the source; `target_xml`: an
    /// app-supplied target definition (`None`: the source's).
    pub async fn begin(
        &self,
        m: &str,
        target_xml: Option<&str>,
    ) -> Result<BeginOutput, PhaseError> {
        let input = BeginInput {
            vm: &self.vm,
            migration: m,
            target_xml,
        };
        begin(&self.a, input).await
    }

    /// Prepare's input for migration `m` from Begin's `out`, under `policy`: any free
    /// port, node-b's credentials when the lab uses TLS. Tests that change one field
    /// start from it.
    pub fn prepare_input<'a>(
        &'a self,
        m: &'a str,
        out: &'a BeginOutput,
        policy: &'a Policy,
    ) -> PrepareInput<'a> {
        PrepareInput {
            vm: &self.vm,
            migration: m,
            namespace: NAMESPACE,
            domain_xml: &out.domain_xml,
            begin_cookie: &out.cookie,
            listen: ferry_agent::stream::Listen::Tcp(None),
            policy,
            tls: self.tls_b(),
        }
    }

    /// Prepare of migration `m` on node-b, the target, from Begin's `out`
    /// ([`Lab::prepare_input`]).
    pub async fn prepare(
        &self,
        m: &str,
        out: &BeginOutput,
        policy: &Policy,
    ) -> Result<PrepareOutput, PhaseError> {
        prepare(&self.b, self.prepare_input(m, out, policy)).await
    }

    /// Begin (no target definition) and Prepare of migration `m` under `policy`.
    pub async fn begin_and_prepare(
        &self,
        m: &str,
        policy: &Policy,
    ) -> Result<PrepareOutput, PhaseError> {
        let out = self.begin(m, None).await?;
        self.prepare(m, &out, policy).await
    }

    /// Perform's input for migration `m` to where Prepare's `prep` listens, under
    /// `policy`, node-a's credentials when the lab uses TLS. Tests that change one field
    /// start from it.
    pub fn perform_input<'a>(
        &'a self,
        m: &'a str,
        prep: &'a PrepareOutput,
        policy: &'a Policy,
        cancel: &'a CancellationToken,
    ) -> PerformInput<'a> {
        PerformInput {
            vm: &self.vm,
            migration: m,
            uri: &prep.uri,
            prepare_cookie: &prep.cookie,
            policy,
            tls: self.tls_a(),
            cancel,
        }
    }

    /// Perform of migration `m` on node-a ([`Lab::perform_input`]), reporting progress to
    /// `on_progress`.
    pub async fn perform(
        &self,
        m: &str,
        prep: &PrepareOutput,
        policy: &Policy,
        cancel: &CancellationToken,
        on_progress: impl FnMut(&TransferProgress),
    ) -> Result<PerformOutput, PhaseError> {
        perform(
            &self.a,
            self.perform_input(m, prep, policy, cancel),
            on_progress,
        )
        .await
    }

    /// Begin, Prepare and Perform of migration `m` under `policy`, not cancelled: the
    /// source is paused with its memory sent, the target waits for `cont`.
    pub async fn migrate(&self, m: &str, policy: &Policy) -> Result<PerformOutput, PhaseError> {
        let prep = self.begin_and_prepare(m, policy).await?;
        self.perform(m, &prep, policy, &CancellationToken::new(), |_| {})
            .await
    }

    /// Finish's input for migration `m` of the lab's guest, for tests with their own
    /// ownership step.
    pub fn finish_input<'a>(
        &'a self,
        m: &'a str,
        perform_cookie: Option<&'a str>,
        cancelled: bool,
    ) -> FinishInput<'a> {
        FinishInput {
            vm: &self.vm,
            migration: m,
            perform_cookie,
            cancelled,
        }
    }

    /// Finish of migration `m` of the lab's guest on `sup`, its ownership granted.
    pub async fn finish(
        &self,
        sup: &Supervisor,
        m: &str,
        perform_cookie: Option<&str>,
        cancelled: bool,
    ) -> Result<FinishOutput, PhaseError> {
        let input = self.finish_input(m, perform_cookie, cancelled);
        finish(sup, input, || async { Ok(()) }).await
    }

    /// Confirm of migration `m` of the lab's guest on `sup`.
    pub async fn confirm(
        &self,
        sup: &Supervisor,
        m: &str,
        finish_cookie: Option<&str>,
        cancelled: bool,
    ) -> Result<Confirmed, PhaseError> {
        let input = ConfirmInput {
            vm: &self.vm,
            migration: m,
            finish_cookie,
            cancelled,
        };
        confirm(sup, input).await
    }

    /// Save of migration `m` (its Begin ran) in [`NAMESPACE`] on node-a into `path` with
    /// `compression`, not cancelled.
    pub async fn save(
        &self,
        m: &str,
        path: &Path,
        compression: Compression,
    ) -> Result<SaveOutput, PhaseError> {
        let input = SaveInput {
            vm: &self.vm,
            migration: m,
            namespace: NAMESPACE,
            path: path.to_str().expect("a UTF-8 path"),
            compression,
            key: &self.key,
            cancel: &CancellationToken::new(),
        };
        save(&self.a, input, |_| {}).await
    }

    /// Confirm on node-a of the save of migration `m`.
    pub async fn confirm_saved(&self, m: &str) -> Result<Option<SaveOutput>, PhaseError> {
        let input = ConfirmSavedInput {
            vm: &self.vm,
            migration: m,
        };
        confirm_saved(&self.a, input).await
    }

    pub fn new(vm: &str, memory_mib: u32, region_end_mib: u32, delay: u32) -> Lab {
        init_tracing();
        let serial = QEMU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("ferry-agent-")
            .tempdir()
            .unwrap();
        let a = Node::open(
            dir.path().join("node-a"),
            "node-a",
            "127.0.0.2".parse().unwrap(),
        )
        .unwrap()
        .with_storage(lab_roots(dir.path()));
        let b = Node::open(
            dir.path().join("node-b"),
            "node-b",
            "127.0.0.3".parse().unwrap(),
        )
        .unwrap()
        .with_storage(lab_roots(dir.path()));
        assert_ne!(a.host_uuid, b.host_uuid);
        std::fs::create_dir_all(dir.path().join(STORAGE).join(NAMESPACE)).unwrap();
        let disk = build_guest(
            &dir.path().join(STORAGE).join(NAMESPACE),
            1,
            region_end_mib,
            delay,
        );
        Lab {
            a: Supervisor::new(a),
            b: Supervisor::new(b),
            vm: vm.to_string(),
            uuid: Uuid::new_v4(),
            memory_mib,
            disk,
            dir,
            tls: None,
            ca: None,
            key: lab_key(),
            _serial: serial,
        }
    }

    /// The same lab with `<lab dir>/saves` ([`Lab::save_root`]) a read-write storage root
    /// of both nodes, besides the roots they have, and its [`NAMESPACE`] directory
    /// created: where [`Lab::save_path`]s are.
    pub fn with_save_root(mut self) -> Lab {
        let root = self.save_root();
        std::fs::create_dir_all(root.join(NAMESPACE)).unwrap();
        let root = StorageRoot::new(root.to_str().unwrap(), Access::ReadWrite).unwrap();
        let add = |sup: &Supervisor| {
            let mut roots: Vec<StorageRoot> = sup.node().storage.iter().cloned().collect();
            roots.push(root.clone());
            let node = sup.node().clone();
            Supervisor::new(node.with_storage(StorageRoots::new(roots).unwrap()))
        };
        self.a = add(&self.a);
        self.b = add(&self.b);
        self
    }

    /// The read-write storage root of [`Lab::with_save_root`].
    pub fn save_root(&self) -> PathBuf {
        self.dir.path().join("saves")
    }

    /// `<save root>/<NAMESPACE>/<name>`.
    pub fn save_path(&self, name: &str) -> PathBuf {
        self.save_root().join(NAMESPACE).join(name)
    }

    /// The same lab with node certificates for node-a and node-b from a fresh test CA:
    /// [`Lab::tls_a`] and [`Lab::tls_b`] then return them.
    pub fn with_tls(mut self) -> Lab {
        let ca = pki::TestCa::new("ferry test CA");
        self.tls = Some((ca.node("node-a"), ca.node("node-b")));
        self.ca = Some(ca);
        self
    }

    /// node-a's credentials when the lab uses TLS.
    pub fn tls_a(&self) -> Option<&Credentials> {
        self.tls.as_ref().map(|t| &t.0)
    }

    /// node-b's credentials when the lab uses TLS.
    pub fn tls_b(&self) -> Option<&Credentials> {
        self.tls.as_ref().map(|t| &t.1)
    }

    /// The VM's definition with the given disk path, MAC suffix, disk bus and memory.
    pub fn xml_with(
        &self,
        disk: &Path,
        mac_last: u8,
        bus: &str,
        memory_mib: u32,
        extra: &str,
    ) -> String {
        format!(
            "<domain type='qemu'>
  <name>{}</name>
  <uuid>{}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{}'/>
      <target dev='{}' bus='{bus}'/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:12:34:{mac_last:02x}'/>
      <model type='e1000'/>
    </interface>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>
    <serial type='file'><target port='0'/></serial>{extra}
  </devices>
</domain>",
            self.vm,
            self.uuid,
            disk.display(),
            if bus == "ide" { "hda" } else { "vda" },
        )
    }

    /// Where the VM's file `name` goes: the namespace's directory of the lab's root.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(STORAGE).join(NAMESPACE).join(name)
    }

    pub fn xml(&self) -> String {
        self.xml_with(&self.disk, 1, "ide", self.memory_mib, "")
    }

    /// Starts the VM on node-a and waits until the guest has made a few passes.
    pub async fn start_source(&self) -> Arc<Guest> {
        let domain = ferry_agent::domain::Domain::parse(&self.xml()).unwrap();
        let guest = self.a.start(&self.vm, &domain, OWNER, false).await.unwrap();
        wait_for_pass(&self.serial_a(), 3, Duration::from_secs(120)).await;
        guest
    }

    pub fn serial_a(&self) -> PathBuf {
        self.a.vm_dir(&self.vm).join("serial0.log")
    }

    pub fn serial_b(&self) -> PathBuf {
        self.b.vm_dir(&self.vm).join("serial0.log")
    }

    /// Live QEMU processes of this VM (any node), by the uuid on their command line.
    pub fn qemu_pids(&self) -> Vec<i32> {
        processes_mentioning(&self.uuid.to_string())
    }

    /// Asserts exactly one QEMU of the VM runs and that it is `sup`'s.
    pub fn assert_one_guest_on(&self, sup: &Supervisor) {
        let pids = self.qemu_pids();
        assert_eq!(pids.len(), 1, "expected exactly one QEMU, found {pids:?}");
        assert_eq!(
            sup.running_pid(&self.vm),
            Some(pids[0]),
            "QEMU runs on the wrong node"
        );
    }

    /// The run status (`query-status`) of the lab's guest on `sup`.
    pub async fn run_status(&self, sup: &Supervisor) -> String {
        let guest = sup.require(&self.vm).await.unwrap();
        let status: StatusInfo = guest.qmp.execute("query-status", None).await.unwrap();
        status.status
    }

    /// The guest on node-a runs and its counter moves on (three more passes) without a
    /// BAD page.
    pub async fn assert_runs_on_a(&self) {
        assert_eq!(self.run_status(&self.a).await, "running");
        let now = last_pass(&self.serial_a()).unwrap();
        wait_for_pass(&self.serial_a(), now + 3, Duration::from_secs(120)).await;
        let text = std::fs::read_to_string(self.serial_a()).unwrap();
        assert_counter_continues(&text, "", 0);
    }

    /// Waits until the guest on node-b has made `n` passes more than the last one in
    /// `before` (the source's serial log as the guest left it), and checks node-b's log
    /// goes on from it: one unbroken run of passes, no BAD page.
    pub async fn assert_continues_on_b(&self, before: &str, n: u64) {
        let last_before = passes(before).last().copied().unwrap();
        wait_for_pass(&self.serial_b(), last_before + n, Duration::from_secs(120)).await;
        let after = std::fs::read_to_string(self.serial_b()).unwrap();
        assert_counter_continues(before, &after, n as usize);
    }

    /// Finish and Confirm of migration `m` after its Perform completed (`perf`); checks
    /// the guest resumed on node-b, alone, and goes on from where it stopped without a
    /// BAD page.
    pub async fn complete(&self, m: &str, perf: &PerformOutput) {
        let before = std::fs::read_to_string(self.serial_a()).unwrap();
        let fin = self
            .finish(&self.b, m, Some(&perf.cookie), false)
            .await
            .unwrap();
        assert!(fin.resumed);
        self.confirm(&self.a, m, fin.cookie.as_deref(), false)
            .await
            .unwrap();
        self.assert_one_guest_on(&self.b);
        self.assert_continues_on_b(&before, 3).await;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let needle = self.dir.path().to_string_lossy().to_string();
        let pids = processes_mentioning(&needle);
        for &pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // `alive` also reaps our own exited children.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| ferry_agent::supervisor::alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Live processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("qemu-system")
            && cmd.contains(needle)
            && ferry_agent::supervisor::alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// The pass numbers in a serial log, asserting no pass reported BAD pages.
pub fn passes(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("pass ") else {
            continue;
        };
        assert!(!line.contains("BAD"), "guest memory corrupted: {line}");
        let Some((n, status)) = rest.split_once(' ') else {
            continue; // cut off mid-line
        };
        if status == "ok" {
            out.push(n.parse().unwrap());
        }
    }
    out
}

/// The last complete pass in a serial log.
pub fn last_pass(path: &Path) -> Option<u64> {
    passes(&std::fs::read_to_string(path).unwrap_or_default())
        .last()
        .copied()
}

/// Waits until the serial log shows pass `n` or later.
pub async fn wait_for_pass(path: &Path, n: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = last_pass(path)
            && p >= n
        {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "guest made no pass {n} in {timeout:?} ({})",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks that `before` followed by `after` is one unbroken run of passes 0, 1, 2, ...
/// with no BAD page, and that `after` added at least `min_new` passes.
pub fn assert_counter_continues(before: &str, after: &str, min_new: usize) {
    let old = passes(before);
    let all = passes(&format!("{before}{after}"));
    assert!(!old.is_empty(), "no passes before");
    for (i, p) in all.iter().enumerate() {
        assert_eq!(*p, i as u64, "pass counter broken at line {i}: {all:?}");
    }
    assert!(
        all.len() >= old.len() + min_new,
        "counter did not go on: {} passes before, {} after",
        old.len(),
        all.len()
    );
}

/// Awaits `fut`, failing the test instead of hanging if it takes more than five minutes.
pub async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(300), fut)
        .await
        .expect("gave up after 5 minutes")
}

/// The default policy (Balanced) with a bandwidth limit in bytes per second (`None`:
/// unlimited) and a downtime limit.
pub fn policy(max_bandwidth: Option<u64>, max_downtime_ms: u64) -> Policy {
    Policy {
        max_bandwidth,
        max_downtime_ms,
        ..Policy::default()
    }
}

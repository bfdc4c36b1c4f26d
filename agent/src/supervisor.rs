//! The QEMU processes of one node: one state dir per guest, detached processes, re-attach.
//!
//! `<state_dir>/vms/<key>/` (the key names the VM's namespace, name and domain uuid:
//! [`crate::node::guest_key`]) holds `domain.xml` (the definition QEMU runs), `qmp.sock`,
//! `qemu.pid`, `qemu.log` (QEMU's stdout/stderr), the default serial logs and the
//! migration record. QEMU runs in its own session (setsid), so neither a restart of the
//! agent nor a signal to the agent's process group reaches it; on start-up the agent
//! finds its guests again through the pid files and re-attaches over QMP.

use crate::cmdline::{self, HostPaths, UnsupportedError};
use crate::domain::{Domain, DomainError};
use crate::node::{Node, write_atomic};
use crate::qmp::{Qmp, QmpError};
use crate::storage::{self, Owner, StorageError};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DOMAIN_FILE: &str = "domain.xml";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const PID_FILE: &str = "qemu.pid";
pub const LOG_FILE: &str = "qemu.log";
/// How long QEMU may take to open its monitor.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a killed QEMU may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("VM '{vm}': {what}: {source}")]
    Io {
        vm: String,
        what: String,
        source: io::Error,
    },
    #[error("VM '{vm}': {source}")]
    Unsupported {
        vm: String,
        source: UnsupportedError,
    },
    #[error("VM '{vm}': stored definition: {source}")]
    Definition { vm: String, source: DomainError },
    /// A host path of the definition was refused; nothing was started.
    #[error("VM '{vm}': {source}")]
    Storage {
        vm: String,
        source: Box<StorageError>,
    },
    #[error("VM '{vm}' already runs here (pid {pid})")]
    AlreadyRunning { vm: String, pid: i32 },
    #[error("VM '{vm}': QEMU did not start: {log}")]
    StartFailed { vm: String, log: String },
    #[error("VM '{vm}': {source}")]
    Qmp { vm: String, source: QmpError },
    #[error("VM '{vm}' does not run on this node")]
    NotRunning { vm: String },
    /// The guest's own cgroup could not be made ready; nothing was started.
    #[error("VM '{vm}': {source}")]
    Cgroup {
        vm: String,
        source: crate::cgroup::CgroupError,
    },
}

fn io_err(vm: &str, what: impl Into<String>) -> impl FnOnce(io::Error) -> SupervisorError {
    let vm = vm.to_string();
    let what = what.into();
    move |source| SupervisorError::Io { vm, what, source }
}

/// How to stop a guest.
#[derive(Debug, Clone, Copy)]
pub enum StopMode {
    /// ACPI power button; SIGKILL if the guest has not gone after the timeout.
    Powerdown(Duration),
    /// QMP `quit` (QEMU exits at once, cleanly); SIGKILL after the timeout.
    Quit(Duration),
    /// SIGKILL.
    Kill,
}

/// A running QEMU this agent is attached to.
pub struct Guest {
    pub name: String,
    pub pid: i32,
    pub dir: PathBuf,
    pub qmp: Qmp,
}

/// The supervisor of one node's QEMU processes. It keeps one QMP connection per guest
/// (QEMU's monitor serves one client at a time) and hands out shared [`Guest`]s.
/// Dropping the supervisor closes the connections; the guests keep running.
#[derive(Clone)]
pub struct Supervisor {
    node: Node,
    guests: Arc<tokio::sync::Mutex<HashMap<String, Arc<Guest>>>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("node", &self.node)
            .finish()
    }
}

impl Supervisor {
    pub fn new(node: Node) -> Supervisor {
        Supervisor {
            node,
            guests: Arc::default(),
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.node.vm_dir(vm)
    }

    /// Names of the VMs that have a state dir on this node.
    pub fn list(&self) -> Result<Vec<String>, SupervisorError> {
        let dir = self.node.state_dir.join("vms");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io_err("*", "listing state dirs"))? {
            let e = e.map_err(io_err("*", "listing state dirs"))?;
            if let Some(n) = e.file_name().to_str()
                && crate::domain::valid_vm_name(n)
            {
                out.push(n.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// The definition the VM runs with on this node.
    pub fn definition(&self, vm: &str) -> Result<Domain, SupervisorError> {
        let path = self.vm_dir(vm).join(DOMAIN_FILE);
        let xml = std::fs::read_to_string(&path).map_err(io_err(vm, "reading definition"))?;
        Domain::parse(&xml).map_err(|source| SupervisorError::Definition {
            vm: vm.to_string(),
            source,
        })
    }

    /// The pid of the VM's QEMU if it is alive (and really is that VM's QEMU).
    pub fn running_pid(&self, vm: &str) -> Option<i32> {
        let dir = self.vm_dir(vm);
        let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let socket = dir.join(QMP_SOCKET);
        (alive(pid) && cmdline_mentions(pid, &socket)).then_some(pid)
    }

    /// Waits until the process in the VM's pid file is gone, up to `timeout`; whether it
    /// is. [`running_pid`](Self::running_pid) stops counting a QEMU as soon as its
    /// command line reads empty, which happens while it exits, before it closed its
    /// files: until it is gone it may still hold its disk images' locks.
    pub async fn wait_exited(&self, vm: &str, timeout: Duration) -> bool {
        let pid = std::fs::read_to_string(self.vm_dir(vm).join(PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        match pid {
            Some(pid) => wait_gone(pid, timeout).await,
            None => true,
        }
    }

    /// Starts QEMU for `domain` of `owner` as the guest keyed `vm` (its state dir,
    /// [`crate::node::guest_key`]), detached, and connects to its monitor. With
    /// `incoming` it waits paused for `migrate-incoming`. The definition's host files are
    /// opened first, beneath the node's storage roots ([`storage::open_guest`]), and
    /// QEMU inherits them as descriptors; a refusal starts nothing and creates nothing.
    pub async fn start(
        &self,
        vm: &str,
        domain: &Domain,
        owner: Owner<'_>,
        incoming: bool,
    ) -> Result<Arc<Guest>, SupervisorError> {
        if let Some(pid) = self.running_pid(vm) {
            return Err(SupervisorError::AlreadyRunning {
                vm: vm.to_string(),
                pid,
            });
        }
        let files = storage::open_guest(&self.node.storage, owner, domain).map_err(|source| {
            SupervisorError::Storage {
                vm: vm.to_string(),
                source: Box::new(source),
            }
        })?;
        let dir = self.vm_dir(vm);
        std::fs::create_dir_all(&dir).map_err(io_err(vm, "creating state dir"))?;
        write_atomic(&dir.join(DOMAIN_FILE), domain.to_xml().as_bytes())
            .map_err(io_err(vm, "writing definition"))?;
        let socket = dir.join(QMP_SOCKET);
        let _ = std::fs::remove_file(&socket);
        let paths = HostPaths {
            qmp_socket: socket.clone(),
            vm_dir: dir.clone(),
            disks: files.disk_fds(),
        };
        let args = cmdline::qemu_args(domain, &paths, incoming).map_err(|source| {
            SupervisorError::Unsupported {
                vm: vm.to_string(),
                source,
            }
        })?;
        let log_path = dir.join(LOG_FILE);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(vm, "opening QEMU log"))?;
        let log2 = log.try_clone().map_err(io_err(vm, "opening QEMU log"))?;
        // Its own cgroup, outside the agent's (crate::cgroup), entered by the child
        // before it executes QEMU.
        let placement = match &self.node.cgroups {
            Some(cgroups) => {
                Some(
                    cgroups
                        .prepare(vm, domain)
                        .map_err(|source| SupervisorError::Cgroup {
                            vm: vm.to_string(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let mut cmd = Command::new(cmdline::qemu_binary(domain));
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .current_dir(&dir);
        // SAFETY: setsid and write (Placement::enter) are async-signal-safe and touch
        // no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(io::Error::from)?;
                match &placement {
                    Some(p) => p.enter(),
                    None => Ok(()),
                }
            });
        }
        cmdline::inherit_fds(&mut cmd, paths.disks.iter().map(|d| d.fd).collect());
        tracing::info!(vm, incoming, disks = files.disks.len(), "starting QEMU");
        let child = cmd.spawn().map_err(io_err(vm, "spawning QEMU"))?;
        // QEMU has its own copies now.
        drop(files);
        let pid = child.id() as i32;
        drop(child); // Reaped through waitpid in `alive`; the handle must not own QEMU.
        write_atomic(&dir.join(PID_FILE), format!("{pid}\n").as_bytes())
            .map_err(io_err(vm, "writing pid file"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !alive(pid) {
                self.remove_cgroups(vm).await;
                return Err(SupervisorError::StartFailed {
                    vm: vm.to_string(),
                    log: log_tail(&log_path),
                });
            }
            if socket.exists()
                && let Ok(qmp) = Qmp::connect(&socket).await
            {
                tracing::info!(vm, pid, qemu = %qmp.version, "QEMU started");
                let guest = Arc::new(Guest {
                    name: vm.to_string(),
                    pid,
                    dir,
                    qmp,
                });
                self.guests
                    .lock()
                    .await
                    .insert(vm.to_string(), guest.clone());
                return Ok(guest);
            }
            if Instant::now() > deadline {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(SupervisorError::StartFailed {
                    vm: vm.to_string(),
                    log: format!("no QMP monitor after {START_TIMEOUT:?}"),
                });
            }
            // QEMU opens its monitor within tens of milliseconds; Prepare waits on this.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The VM's running QEMU, connected over QMP (re-attaching after an agent restart);
    /// `None` if it does not run here.
    pub async fn attach(&self, vm: &str) -> Result<Option<Arc<Guest>>, SupervisorError> {
        let mut guests = self.guests.lock().await;
        let Some(pid) = self.running_pid(vm) else {
            guests.remove(vm);
            return Ok(None);
        };
        if let Some(g) = guests.get(vm)
            && g.pid == pid
            && !g.qmp.is_closed()
        {
            return Ok(Some(g.clone()));
        }
        guests.remove(vm);
        let dir = self.vm_dir(vm);
        let qmp = Qmp::connect(&dir.join(QMP_SOCKET))
            .await
            .map_err(|source| SupervisorError::Qmp {
                vm: vm.to_string(),
                source,
            })?;
        tracing::info!(vm, pid, "attached to running QEMU");
        let guest = Arc::new(Guest {
            name: vm.to_string(),
            pid,
            dir,
            qmp,
        });
        guests.insert(vm.to_string(), guest.clone());
        Ok(Some(guest))
    }

    /// Like [`attach`](Self::attach), but a guest that does not run is an error.
    pub async fn require(&self, vm: &str) -> Result<Arc<Guest>, SupervisorError> {
        self.attach(vm)
            .await?
            .ok_or_else(|| SupervisorError::NotRunning { vm: vm.to_string() })
    }

    /// Re-attaches to every running guest on this node (agent start-up).
    pub async fn attach_all(&self) -> Result<Vec<Arc<Guest>>, SupervisorError> {
        let mut out = Vec::new();
        for vm in self.list()? {
            if let Some(g) = self.attach(&vm).await? {
                out.push(g);
            }
        }
        Ok(out)
    }

    /// Stops the VM's QEMU (if it runs) and removes its pid file and socket.
    pub async fn stop(&self, vm: &str, mode: StopMode) -> Result<(), SupervisorError> {
        if let Some(pid) = self.running_pid(vm) {
            let (command, timeout) = match mode {
                StopMode::Powerdown(t) => (Some("system_powerdown"), t),
                StopMode::Quit(t) => (Some("quit"), t),
                StopMode::Kill => (None, Duration::ZERO),
            };
            if let Some(command) = command
                && let Ok(Some(g)) = self.attach(vm).await
            {
                // QEMU may close the connection before answering `quit`.
                let _ = g.qmp.run(command, None).await;
            }
            if !wait_gone(pid, timeout).await {
                tracing::warn!(vm, pid, "killing QEMU");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                if !wait_gone(pid, KILL_TIMEOUT).await {
                    return Err(SupervisorError::Io {
                        vm: vm.to_string(),
                        what: format!("QEMU pid {pid} survived SIGKILL"),
                        source: io::Error::from(io::ErrorKind::TimedOut),
                    });
                }
            }
            tracing::info!(vm, pid, "QEMU stopped");
        }
        self.guests.lock().await.remove(vm);
        let dir = self.vm_dir(vm);
        let _ = std::fs::remove_file(dir.join(PID_FILE));
        let _ = std::fs::remove_file(dir.join(QMP_SOCKET));
        self.remove_cgroups(vm).await;
        Ok(())
    }

    /// Removes the guest's cgroups once its QEMU has left them (a QEMU that is still
    /// exiting keeps them busy for a moment); a failure is logged: it leaves an empty
    /// cgroup, no guest.
    async fn remove_cgroups(&self, vm: &str) {
        let Some(cgroups) = &self.node.cgroups else {
            return;
        };
        let mut result = cgroups.remove(vm);
        for _ in 0..20 {
            if result.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            result = cgroups.remove(vm);
        }
        if let Err(e) = result {
            tracing::warn!(vm, error = %e, "could not remove the guest's cgroup");
        }
    }

    /// Kills the VM's QEMU if it runs and removes its whole state dir.
    pub async fn destroy(&self, vm: &str) -> Result<(), SupervisorError> {
        self.stop(vm, StopMode::Kill).await?;
        match std::fs::remove_dir_all(self.vm_dir(vm)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_err(vm, "removing state dir")(e))
            }
            _ => Ok(()),
        }
    }
}

/// Whether process `pid` still exists in any way that matters: a QEMU whose main thread
/// has exited may still have threads holding its files (and disk image locks), so a
/// zombie counts as gone only once its whole thread group is. Reaps `pid` if it is our
/// exited child.
pub fn alive(pid: i32) -> bool {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => return true,
        // Reaped: the kernel reports a child only once all its threads have exited.
        Ok(_) => return false,
        // Not our child: look at /proc.
        Err(_) => {}
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may contain spaces.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    match state {
        None | Some('X') => false,
        Some('Z') => std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| tasks.count() > 1)
            .unwrap_or(false),
        Some(_) => true,
    }
}

fn cmdline_mentions(pid: i32, needle: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = needle.to_string_lossy();
    String::from_utf8_lossy(&cmd).contains(needle.as_ref())
}

async fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

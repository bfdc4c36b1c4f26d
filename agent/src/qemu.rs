//! The QEMU of this node: its version and the migration capabilities it offers, probed
//! once when the agent starts ([`probe`]: a QEMU without a machine, asked over QMP and
//! told to quit), so that a policy this QEMU cannot honour is refused with a message
//! naming the capability ([`QemuFeatures::check`]) before any phase touches a guest.
//! The agent publishes what it found on its heartbeat Lease.

use crate::policy::{Policy, PolicyError};
use crate::qmp::{Qmp, QmpError};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// The QEMU release Ferry is built and tested against (Debian bookworm-backports).
pub const SUPPORTED: (u32, u32) = (10, 0);

/// How long the probe may take from spawn to the answers.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// What this node's QEMU is and can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuFeatures {
    /// `major.minor.micro`, e.g. `10.0.2`.
    pub version: String,
    /// The distribution's package version, e.g. `Debian 1:10.0.2+ds-2+deb13u1~bpo12+1`.
    pub package: String,
    major: u32,
    minor: u32,
    /// The names `query-migrate-capabilities` lists.
    pub capabilities: BTreeSet<String>,
}

impl QemuFeatures {
    /// From the parts of `query-version` and the capability names.
    pub fn new(
        (major, minor, micro): (u32, u32, u32),
        package: &str,
        capabilities: impl IntoIterator<Item = String>,
    ) -> QemuFeatures {
        QemuFeatures {
            version: format!("{major}.{minor}.{micro}"),
            package: package.trim().to_string(),
            major,
            minor,
            capabilities: capabilities.into_iter().collect(),
        }
    }

    /// Whether this is the supported release or a later one.
    pub fn is_supported(&self) -> bool {
        (self.major, self.minor) >= SUPPORTED
    }

    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.contains(capability)
    }

    /// Refuses `policy` when it needs a capability this QEMU lacks; the error names the
    /// capability, the policy field that needs it, the version and `node`.
    pub fn check(&self, policy: &Policy, node: &str) -> Result<(), PolicyError> {
        match policy.needs().into_iter().find(|(c, _)| !self.has(c)) {
            None => Ok(()),
            Some((capability, field)) => Err(PolicyError::Unsupported {
                capability,
                field,
                version: self.version.clone(),
                node: node.to_string(),
            }),
        }
    }

    /// The capabilities as one comma-separated line (the heartbeat Lease's annotation).
    pub fn capabilities_line(&self) -> String {
        self.capabilities
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("{binary} exited before it answered over QMP ({status}): {stderr}")]
    Exited {
        binary: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{binary} did not answer over QMP within {after:?}")]
    Timeout { binary: String, after: Duration },
    #[error("asking {binary} over QMP: {source}")]
    Qmp { binary: String, source: QmpError },
}

#[derive(Deserialize)]
struct Version {
    qemu: Triple,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct Triple {
    major: u32,
    minor: u32,
    micro: u32,
}

#[derive(Deserialize)]
struct CapabilityState {
    capability: String,
}

/// Starts `binary` with no machine and a QMP socket in `scratch`, asks its version and
/// migration capabilities, and makes it quit (it is killed if it does not).
pub async fn probe(binary: &str, scratch: &Path) -> Result<QemuFeatures, ProbeError> {
    let socket = scratch.join("qemu-probe.qmp");
    let _ = std::fs::remove_file(&socket);
    let mut command = Command::new(binary);
    command
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Unlike a guest's QEMU, the probe must not outlive an agent killed while it asks.
    // SAFETY: the closure only makes the prctl system call, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().map_err(|source| ProbeError::Spawn {
        binary: binary.into(),
        source,
    })?;
    let result = ask(binary, &socket, &mut child).await;
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    let _ = std::fs::remove_file(&socket);
    result
}

async fn ask(
    binary: &str,
    socket: &Path,
    child: &mut tokio::process::Child,
) -> Result<QemuFeatures, ProbeError> {
    let started = Instant::now();
    let qmp = loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr).await;
            }
            return Err(ProbeError::Exited {
                binary: binary.into(),
                status,
                stderr: stderr.trim().to_string(),
            });
        }
        if socket.exists()
            && let Ok(qmp) = Qmp::connect(socket).await
        {
            break qmp;
        }
        if started.elapsed() > PROBE_TIMEOUT {
            return Err(ProbeError::Timeout {
                binary: binary.into(),
                after: PROBE_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let qmp_err = |source| ProbeError::Qmp {
        binary: binary.into(),
        source,
    };
    let v: Version = qmp.execute("query-version", None).await.map_err(qmp_err)?;
    let caps: Vec<CapabilityState> = qmp
        .execute("query-migrate-capabilities", None)
        .await
        .map_err(qmp_err)?;
    let _ = qmp.run("quit", None).await;
    Ok(QemuFeatures::new(
        (v.qemu.major, v.qemu.minor, v.qemu.micro),
        &v.package,
        caps.into_iter().map(|c| c.capability),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PostCopy, preset};
    use ferry_crds::Preset;

    fn qemu(version: (u32, u32, u32), caps: &[&str]) -> QemuFeatures {
        QemuFeatures::new(version, "test", caps.iter().map(|c| c.to_string()))
    }

    const ALL: &[&str] = &[
        "events",
        "auto-converge",
        "postcopy-ram",
        "postcopy-preempt",
        "multifd",
    ];

    #[test]
    fn the_supported_release_and_later_ones_are_supported() {
        assert!(qemu((10, 0, 2), ALL).is_supported());
        assert!(qemu((10, 1, 0), ALL).is_supported());
        assert!(!qemu((7, 2, 22), ALL).is_supported());
        assert_eq!(qemu((10, 0, 2), ALL).version, "10.0.2");
    }

    #[test]
    fn a_policy_is_refused_naming_the_missing_capability_and_its_field() {
        let balanced = preset(Preset::Balanced);
        assert_eq!(qemu((10, 0, 2), ALL).check(&balanced, "node-a"), Ok(()));
        let err = qemu((10, 0, 2), &["events", "auto-converge", "multifd"])
            .check(&balanced, "node-a")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "policy field postCopy.mode needs QEMU's migration capability postcopy-ram, which QEMU 10.0.2 on node node-a does not offer"
        );
        // Post-copy needs its preempt channel too.
        let err = qemu(
            (10, 0, 2),
            &["events", "auto-converge", "multifd", "postcopy-ram"],
        )
        .check(&balanced, "node-a")
        .unwrap_err();
        assert!(
            err.to_string().contains("capability postcopy-preempt"),
            "{err}"
        );
        let never = Policy {
            post_copy: PostCopy::Never,
            ..balanced
        };
        assert_eq!(
            qemu((10, 0, 2), &["events", "auto-converge", "multifd"]).check(&never, "node-a"),
            Ok(())
        );
        let fastest = preset(Preset::Fastest);
        let err = qemu((10, 0, 2), &["events", "auto-converge"])
            .check(&fastest, "node-b")
            .unwrap_err();
        assert!(err.to_string().contains("capability multifd"), "{err}");
        assert!(err.to_string().contains("parallelConnections"), "{err}");
    }

    #[test]
    fn the_capabilities_line_is_sorted_and_comma_separated() {
        assert_eq!(
            qemu((10, 0, 2), ALL).capabilities_line(),
            "auto-converge,events,multifd,postcopy-preempt,postcopy-ram"
        );
    }
}

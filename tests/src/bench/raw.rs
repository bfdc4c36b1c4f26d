//! The baseline: two QEMUs on this machine driven directly over QMP, with the same
//! command line (from the agent's `cmdline`) and the same migration capabilities and
//! parameters (from the agent's `policy`) that Ferry uses — and nothing else.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_agent::cmdline::{HostPaths, qemu_args, qemu_binary};
use ferry_agent::domain::Domain;
use ferry_agent::policy::{Policy, Side};
use ferry_agent::qmp::{MigrationInfo, Qmp, StatusInfo};

use crate::ChildGuard;

/// One raw migration's figures.
#[derive(Debug, Clone, Copy)]
pub struct RawRun {
    /// From starting the target QEMU to the guest running there with the source gone.
    pub total: Duration,
    /// QEMU's own account of the migration.
    pub migration_ms: u64,
    pub downtime_ms: u64,
    pub dirty_rate_bytes_per_second: u64,
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

struct Qemu {
    process: ChildGuard,
    qmp: Qmp,
}

async fn start(domain: &Domain, dir: &Path, incoming: bool) -> Result<Qemu, Error> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("qmp.sock");
    let args = qemu_args(
        domain,
        &HostPaths {
            qmp_socket: socket.clone(),
            vm_dir: dir.to_path_buf(),
        },
        incoming,
    )?;
    let mut cmd = Command::new(qemu_binary(domain));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.log"))?);
    let process = ChildGuard::spawn("qemu", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Qmp::connect(&socket).await {
            Ok(qmp) => return Ok(Qemu { process, qmp }),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn apply(q: &Qmp, policy: &Policy, side: Side) -> Result<(), Error> {
    let settings = policy.settings(side);
    q.run(
        "migrate-set-capabilities",
        Some(settings.capabilities_args()),
    )
    .await?;
    q.run("migrate-set-parameters", Some(settings.parameters_args()))
        .await?;
    Ok(())
}

/// How long the guest's passes are counted to measure its dirty rate.
const RATE_WINDOW: Duration = Duration::from_secs(4);

fn dirtied_bytes(region_mib: u32) -> u64 {
    u64::from(region_mib) << 20
}

/// Passes the test guest has printed in the serial log in `dir`.
pub fn passes(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("serial0.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with(" ok"))
        .count()
}

/// Starts `domain` in `dir`, lets the guest run `warm_passes` passes, then migrates it
/// to a second QEMU listening on `target:port` and measures.
pub async fn migrate(
    domain: &Domain,
    dir: &Path,
    policy: &Policy,
    target: &str,
    port: u16,
    warm_passes: usize,
    domain_region_mib: u32,
) -> Result<RawRun, Error> {
    let src_dir = dir.join("source");
    let dst_dir = dir.join("target");
    let mut source = start(domain, &src_dir, false).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while passes(&src_dir) < warm_passes {
        if Instant::now() > deadline {
            return Err("the guest did not start counting".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The guest's dirty rate: passes over its region in a few seconds.
    let region = dirtied_bytes(domain_region_mib);
    let before = passes(&src_dir);
    tokio::time::sleep(RATE_WINDOW).await;
    let dirty_rate = ((passes(&src_dir) - before) as u64 * region) / RATE_WINDOW.as_secs();

    let t0 = Instant::now();
    let dest = start(domain, &dst_dir, true).await?;
    apply(&dest.qmp, policy, Side::Target).await?;
    let uri = format!("tcp:{target}:{port}");
    dest.qmp
        .run("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
        .await?;
    apply(&source.qmp, policy, Side::Source).await?;
    source
        .qmp
        .run("migrate", Some(serde_json::json!({ "uri": uri })))
        .await?;
    let info = loop {
        let info: MigrationInfo = source.qmp.execute("query-migrate", None).await?;
        match info.status.as_deref() {
            Some("completed") => break info,
            Some("failed" | "cancelled") => {
                return Err(
                    format!("raw migration {:?}: {:?}", info.status, info.error_desc).into(),
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    // The target resumes the guest once the stream is in, as Finish does.
    loop {
        let status: StatusInfo = dest.qmp.execute("query-status", None).await?;
        if status.status != "inmigrate" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    dest.qmp.run("cont", None).await?;
    source.qmp.run("quit", None).await.ok();
    source.process.stop(Duration::from_secs(5));
    let total = t0.elapsed();
    drop(dest);
    Ok(RawRun {
        total,
        migration_ms: info.total_time.unwrap_or_default(),
        downtime_ms: info.downtime.unwrap_or_default(),
        dirty_rate_bytes_per_second: dirty_rate,
    })
}

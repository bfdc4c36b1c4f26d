//! The baseline: two QEMUs on this machine driven directly over QMP, with the same
//! command line (from the agent's `cmdline`) and the same migration capabilities and
//! parameters (from the agent's `policy`) that Ferry uses — and nothing else. With
//! [`NodeTls`], the stream is encrypted as Ferry's is: QEMU's own TLS with node
//! certificates of the operator's profile, loaded by the agent's `tls::apply`. The
//! policy's decisions are the agent's too (`policy::decide`: the downtime ramp, the
//! switch to post-copy, an abort on a limit); after a switch the target is resumed at
//! once, as Finish does, while the last pages follow.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_agent::cmdline::{DiskFd, HostPaths, inherit_fds, qemu_args, qemu_binary};
use ferry_agent::domain::Domain;
use ferry_agent::phases::perform::sample;
use ferry_agent::policy::{self, Action, Convergence, Policy, Side};
use ferry_agent::qmp::{MigrationInfo, Qmp, StatusInfo};
use ferry_agent::statistics::Statistics;
use ferry_agent::tls::{Credentials, Endpoint};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::os::fd::AsRawFd;

use crate::ChildGuard;

/// One raw migration's figures.
#[derive(Debug, Clone, Copy)]
pub struct RawRun {
    /// From starting the target QEMU to the guest running there with the source gone.
    pub total: Duration,
    /// QEMU's own account of the migration.
    pub migration_ms: u64,
    /// The guest's downtime: the source's `STOP` event → the target's `RESUME` event
    /// (QEMU's own figure if an event was missed), as Ferry reports it.
    pub downtime_ms: u64,
    pub dirty_rate_bytes_per_second: u64,
    /// Whether the policy switched the migration to post-copy.
    pub post_copy: bool,
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

struct Qemu {
    process: ChildGuard,
    qmp: Qmp,
}

async fn start(domain: &Domain, dir: &Path, incoming: bool) -> Result<Qemu, Error> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("qmp.sock");
    // The same command line as the agent's: the images opened here, QEMU given the fds.
    let mut images = Vec::new();
    for disk in domain.disks() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.readonly)
            .open(&disk.source)?;
        images.push((disk.target_dev.clone(), disk.readonly, file));
    }
    let disks: Vec<DiskFd> = images
        .iter()
        .map(|(dev, read_only, file)| DiskFd {
            target_dev: dev.clone(),
            fd: file.as_raw_fd(),
            read_only: *read_only,
        })
        .collect();
    let fds = disks.iter().map(|d| d.fd).collect();
    let args = qemu_args(
        domain,
        &HostPaths {
            qmp_socket: socket.clone(),
            vm_dir: dir.to_path_buf(),
            disks,
        },
        incoming,
    )?;
    let mut cmd = Command::new(qemu_binary(domain));
    inherit_fds(&mut cmd, fds);
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

/// The two addresses the baseline migrates between, and the node each stands for.
const HOSTS: [(&str, &str); 2] = [("127.0.0.2", "node-a"), ("127.0.0.3", "node-b")];

/// Node certificates for an encrypted baseline: the operator's node profile
/// (`ferry_runtime::node_cert_params`), signed by a throw-away CA.
pub struct NodeTls {
    a: Credentials,
    b: Credentials,
}

impl NodeTls {
    pub fn generate() -> Result<NodeTls, Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "ferry-bench CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca, ca_key);
        let node = |name: &str| -> Result<Credentials, Error> {
            let key = KeyPair::generate()?;
            let cert = ferry_runtime::node_cert_params(name)?.signed_by(&key, &issuer)?;
            Ok(Credentials {
                ca: ca_pem.clone(),
                cert: cert.pem(),
                key: key.serialize_pem(),
            })
        };
        Ok(NodeTls {
            a: node(HOSTS[0].1)?,
            b: node(HOSTS[1].1)?,
        })
    }

    /// The credentials and node name of the host at `address`.
    fn of(&self, address: &str) -> (&Credentials, &'static str) {
        if address == HOSTS[0].0 {
            (&self.a, HOSTS[0].1)
        } else {
            (&self.b, HOSTS[1].1)
        }
    }
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

/// Boots `domain` in `dir/0`, lets the guest count, measures its dirty rate, then
/// migrates it back and forth between 127.0.0.2 and 127.0.0.3 once unmeasured (the first
/// migration out of a freshly booted QEMU is slower, for Ferry too, which the benchmark
/// also warms up) and `runs` times measured, each time to a new QEMU, as Ferry does;
/// over TLS with `tls`, in plain TCP without.
pub async fn chain(
    domain: &Domain,
    dir: &Path,
    policy: &Policy,
    tls: Option<&NodeTls>,
    runs: usize,
    region_mib: u32,
) -> Result<Vec<RawRun>, Error> {
    let mut dir_n = 0;
    let mut src_dir = dir.join("0");
    let mut source = start(domain, &src_dir, false).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while passes(&src_dir) < 2 {
        if Instant::now() > deadline {
            return Err("the guest did not start counting".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The guest's dirty rate: passes over its region in a few seconds.
    let before = passes(&src_dir);
    tokio::time::sleep(RATE_WINDOW).await;
    let dirty_rate =
        ((passes(&src_dir) - before) as u64 * dirtied_bytes(region_mib)) / RATE_WINDOW.as_secs();

    let mut results = Vec::new();
    for i in 0..=runs {
        dir_n += 1;
        let dst_dir = dir.join(dir_n.to_string());
        let target = if i % 2 == 0 { HOSTS[1].0 } else { HOSTS[0].0 };
        let (run, dest) = hop(domain, source, &src_dir, &dst_dir, policy, tls, target).await?;
        source = dest;
        src_dir = dst_dir;
        if i > 0 {
            results.push(RawRun {
                dirty_rate_bytes_per_second: dirty_rate,
                ..run
            });
        }
        // Let the guest run on its new host before the next hop.
        let at = passes(&src_dir);
        let deadline = Instant::now() + Duration::from_secs(60);
        while passes(&src_dir) <= at && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(results)
}

/// Migrates the guest in `source` (its files in `src_dir`) to a new QEMU in `dst_dir`
/// listening on `target`: from starting that QEMU to the guest running there and the
/// source gone.
async fn hop(
    domain: &Domain,
    mut source: Qemu,
    src_dir: &Path,
    dst_dir: &Path,
    policy: &Policy,
    tls: Option<&NodeTls>,
    target: &str,
) -> Result<(RawRun, Qemu), Error> {
    let from = if target == HOSTS[0].0 {
        HOSTS[1].0
    } else {
        HOSTS[0].0
    };
    let port = std::net::TcpListener::bind((target, 0))?
        .local_addr()?
        .port();
    let t0 = Instant::now();
    let dest = start(domain, dst_dir, true).await?;
    apply(&dest.qmp, policy, Side::Target).await?;
    if let Some(tls) = tls {
        let (creds, _) = tls.of(target);
        let (_, source_node) = tls.of(from);
        let endpoint = Endpoint::Target {
            source: source_node,
        };
        ferry_agent::tls::apply(&dest.qmp, dst_dir, creds, endpoint).await?;
    }
    let uri = format!("tcp:{target}:{port}");
    dest.qmp
        .run("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
        .await?;
    apply(&source.qmp, policy, Side::Source).await?;
    match tls {
        Some(tls) => {
            let (creds, _) = tls.of(from);
            let (_, target_node) = tls.of(target);
            let endpoint = Endpoint::Source {
                target: target_node,
            };
            ferry_agent::tls::apply(&source.qmp, src_dir, creds, endpoint).await?;
        }
        None => ferry_agent::tls::clear(&source.qmp).await?,
    }
    // Like the agent: wait for QEMU's MIGRATION events, with a slow poll as a fallback,
    // rather than loading the source's monitor with queries.
    let mut events = source.qmp.subscribe();
    source
        .qmp
        .run("migrate", Some(serde_json::json!({ "uri": uri })))
        .await?;
    let mut stopped_at = None;
    let mut downtime_limit = policy.downtime_limit(1);
    let mut conv = Convergence::default();
    let mut post_copy_sent = false;
    let info = loop {
        tokio::select! {
            ev = events.recv() => {
                if let Ok(ev) = ev
                    && ev.event == "STOP"
                {
                    stopped_at = ev.unix_ms();
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let info: MigrationInfo = source.qmp.execute("query-migrate", None).await?;
        match info.status.as_deref() {
            Some("completed") => break info,
            Some("failed" | "cancelled") => {
                return Err(
                    format!("raw migration {:?}: {:?}", info.status, info.error_desc).into(),
                );
            }
            _ => {}
        }
        let s = sample(&info);
        if s.post_copy {
            // The switch is done: the target resumes the guest now, as Finish does.
            break info;
        }
        conv.observe(&s);
        // The same downtime ramp as Ferry's Perform (the policy's, pass by pass).
        if policy.downtime_limit(s.pass) != downtime_limit {
            downtime_limit = policy.downtime_limit(s.pass);
            let set = serde_json::json!({ "downtime-limit": downtime_limit });
            source.qmp.run("migrate-set-parameters", Some(set)).await?;
        }
        // And the same decisions.
        match policy::decide(policy, &conv, &s) {
            Action::Continue => {}
            Action::StartPostCopy(_) if !post_copy_sent => {
                source.qmp.run("migrate-start-postcopy", None).await?;
                post_copy_sent = true;
            }
            Action::StartPostCopy(_) => {}
            Action::Abort(limit) => {
                source.qmp.run("migrate_cancel", None).await?;
                return Err(format!("raw migration aborted by the policy: {limit}").into());
            }
        }
    };
    let post_copy = info.status.as_deref() != Some("completed");
    // The target resumes the guest once the stream is in (after a switch to post-copy:
    // its devices), as Finish does.
    loop {
        let status: StatusInfo = dest.qmp.execute("query-status", None).await?;
        if status.status != "inmigrate" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut dest_events = dest.qmp.subscribe();
    dest.qmp.run("cont", None).await?;
    // After a switch the last pages follow: the migration ends when they are in, as
    // Confirm waits for them.
    let info = if post_copy {
        loop {
            let info: MigrationInfo = source.qmp.execute("query-migrate", None).await?;
            match info.status.as_deref() {
                Some("completed") => break info,
                Some(s) if s.starts_with("postcopy") => {}
                other => {
                    return Err(format!(
                        "raw post-copy migration {other:?}: {:?}",
                        info.error_desc
                    )
                    .into());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    } else {
        info
    };
    let mut stats = Statistics::from_info(&info);
    stats.stopped_at_ms = stopped_at;
    while let Ok(ev) = events.try_recv() {
        if ev.event == "STOP" {
            stats.stopped_at_ms = ev.unix_ms();
        }
    }
    while let Ok(ev) = dest_events.try_recv() {
        if ev.event == "RESUME" {
            stats.resumed_at_ms = ev.unix_ms();
        }
    }
    source.qmp.run("quit", None).await.ok();
    source.process.stop(Duration::from_secs(5));
    let run = RawRun {
        total: t0.elapsed(),
        migration_ms: info.total_time.unwrap_or_default(),
        downtime_ms: stats.guest_downtime_ms().unwrap_or(stats.downtime_ms),
        dirty_rate_bytes_per_second: 0,
        post_copy,
    };
    Ok((run, dest))
}

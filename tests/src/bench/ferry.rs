//! Ferry's side of the benchmark: a migration from the creation of the object to
//! Succeeded, through the real control plane, operator and agents.

use std::time::{Duration, Instant};

use ferry_crds::{
    ControlMode, MigrationPhase, MigrationPolicy, Reason, Transport, TransportMode, VirtualMachine,
    VirtualMachineMigration, VmPhase,
};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

use super::median;
use super::raw::Error;

/// One migration through Ferry.
#[derive(Debug, Clone)]
pub struct FerryRun {
    /// Creation of the object → Succeeded seen by a client polling every 20 ms.
    pub total: Duration,
    /// Creation of the object → the source agent starting Perform (it issues `migrate`
    /// right after applying the policy).
    pub overhead: Duration,
    /// Each phase's duration on its agent, in order Begin..Confirm.
    pub phases: [Duration; 5],
    pub downtime_ms: u64,
    /// QEMU's own account of the transfer (status.totalTimeMs).
    pub migration_ms: u64,
    pub bytes: u64,
    /// Whether Perform switched the migration to post-copy.
    pub post_copy: bool,
}

use ferry_crds::sequence::PHASES;

/// A VirtualMachine for the benchmark on `node`. The test guest does not answer the ACPI
/// power button, so it is given no grace period: a stop or a deletion stops its QEMU at
/// once instead of after 30 s of busy TCG the next measurement would share the CPU with.
pub fn vm(name: &str, uuid: &str, memory_mib: u32, disk: &str, node: &str) -> VirtualMachine {
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
         <memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>\
         <cpu mode='maximum'/><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>\
         <serial type='file'><target port='0'/></serial></devices></domain>"
    );
    serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"domainXML": xml, "nodeName": node, "terminationGracePeriodSeconds": 0}
    }))
    .expect("a valid VirtualMachine")
}

/// Creates `vm` and waits until it runs.
pub async fn start_vm(vms: &Api<VirtualMachine>, vm: &VirtualMachine) -> Result<(), Error> {
    vms.create(&PostParams::default(), vm).await?;
    let name = vm.metadata.name.clone().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let phase = vms.get(&name).await?.status.and_then(|s| s.phase);
        match phase {
            Some(VmPhase::Running) => return Ok(()),
            Some(VmPhase::Failed) => return Err(format!("VM {name} failed to start").into()),
            _ if Instant::now() > deadline => return Err(format!("VM {name} did not start").into()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The migration object for `vm` to `target` with the stream as `transport` says, its
/// phases driven in `mode` (the operator, or the source agent calling the target's peer
/// API).
pub fn migration(
    name: &str,
    vm: &str,
    target: &str,
    transport: &Transport,
    mode: ControlMode,
) -> VirtualMachineMigration {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
        "metadata": {"name": name},
        "spec": {"vmName": vm, "targetNode": target, "transport": transport, "mode": mode}
    }))
    .expect("a valid VirtualMachineMigration")
}

/// `m` with `policy` as its `spec.policy`.
pub fn with_policy(
    mut m: VirtualMachineMigration,
    policy: MigrationPolicy,
) -> VirtualMachineMigration {
    m.spec.policy = policy;
    m
}

/// What a Ferry migration of a case measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    /// Managed, TLS on the stream (the API's defaults: QEMU's TLS, direct).
    Tls,
    /// Managed, plain TCP.
    Plain,
    /// Peer-to-peer, TLS on the stream.
    PeerToPeer,
    /// Managed, the stream tunnelled through the agents (their TLS).
    Tunnelled,
}

impl Variant {
    /// In the order a case runs them.
    pub const ALL: [Variant; 4] = [
        Variant::Tls,
        Variant::Plain,
        Variant::PeerToPeer,
        Variant::Tunnelled,
    ];

    /// Migration `i` of a case: 0 is the unmeasured warm-up, then `runs` of each
    /// variant in turn ([`Variant::ALL`]); `None` past the last.
    pub fn of(i: usize, runs: usize) -> Option<Variant> {
        if i == 0 {
            return None;
        }
        Variant::ALL.get((i - 1) / runs.max(1)).copied()
    }

    /// The transport and control mode of a variant's migrations (the warm-up's: the
    /// API's defaults).
    pub fn spec(v: Option<Variant>) -> (Transport, ControlMode) {
        let tls = Transport::default();
        match v {
            None | Some(Variant::Tls) => (tls, ControlMode::Managed),
            Some(Variant::Plain) => (Transport { tls: false, ..tls }, ControlMode::Managed),
            Some(Variant::PeerToPeer) => (tls, ControlMode::PeerToPeer),
            Some(Variant::Tunnelled) => (
                Transport {
                    mode: TransportMode::Tunnelled,
                    ..tls
                },
                ControlMode::Managed,
            ),
        }
    }
}

/// The medians of a set of Ferry runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Medians {
    pub total: Duration,
    pub overhead: Duration,
    pub phases: [Duration; 5],
    pub downtime: Duration,
    pub migration: Duration,
}

impl Medians {
    pub fn of(runs: &[FerryRun]) -> Medians {
        let m = |f: &dyn Fn(&FerryRun) -> Duration| median(&runs.iter().map(f).collect::<Vec<_>>());
        Medians {
            total: m(&|r| r.total),
            overhead: m(&|r| r.overhead),
            phases: [0, 1, 2, 3, 4].map(|p| m(&|r| r.phases[p])),
            downtime: m(&|r| Duration::from_millis(r.downtime_ms)),
            migration: m(&|r| Duration::from_millis(r.migration_ms)),
        }
    }
}

/// Creates the migrations at once and measures each until all have succeeded.
pub async fn migrate_all(
    vmms: &Api<VirtualMachineMigration>,
    migrations: &[VirtualMachineMigration],
) -> Result<(Vec<FerryRun>, Duration), Error> {
    let (runs, makespan, _) = migrate_all_counted(vmms, migrations).await?;
    Ok((runs, makespan))
}

/// [`migrate_all`], also saying how many apiserver requests the benchmark itself made
/// (the creations, then the polls), so they can be told from Ferry's.
pub async fn migrate_all_counted(
    vmms: &Api<VirtualMachineMigration>,
    migrations: &[VirtualMachineMigration],
) -> Result<(Vec<FerryRun>, Duration, u64), Error> {
    let mut own_requests = 0u64;
    let started = Instant::now();
    let mut created = Vec::new();
    for m in migrations {
        let wall = Timestamp::now();
        let at = Instant::now();
        vmms.create(&PostParams::default(), m).await?;
        own_requests += 1;
        created.push((m.metadata.name.clone().unwrap_or_default(), wall, at));
    }
    let mut done: Vec<Option<FerryRun>> = vec![None; created.len()];
    let deadline = Instant::now() + Duration::from_secs(600);
    while done.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            return Err("migrations did not finish within 10 minutes".into());
        }
        for (i, (name, wall, at)) in created.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let m = vmms.get(name).await?;
            own_requests += 1;
            let status = m.status.clone().unwrap_or_default();
            match status.phase {
                Some(MigrationPhase::Succeeded) => {
                    let total = at.elapsed();
                    let steps = status.steps.clone().unwrap_or_default();
                    let step_time = |p: MigrationPhase| {
                        steps
                            .get(p)
                            .and_then(|s| Some(s.end.as_ref()?.0.duration_since(s.start.0)))
                            .map(|d| d.unsigned_abs())
                            .unwrap_or_default()
                    };
                    let perform_start = steps.get(MigrationPhase::Perform).map(|s| s.start.0);
                    let overhead = perform_start
                        .map(|t| t.duration_since(*wall).unsigned_abs())
                        .unwrap_or_default();
                    done[i] = Some(FerryRun {
                        total,
                        overhead,
                        phases: PHASES.map(step_time),
                        downtime_ms: status.downtime_ms.unwrap_or_default().max(0) as u64,
                        migration_ms: status.total_time_ms.unwrap_or_default().max(0) as u64,
                        bytes: status
                            .progress
                            .map(|p| p.bytes_transferred.max(0) as u64)
                            .unwrap_or_default(),
                        post_copy: steps
                            .get(MigrationPhase::Perform)
                            .is_some_and(|s| s.reason == Some(Reason::SwitchedToPostCopy)),
                    });
                }
                Some(p @ (MigrationPhase::Failed | MigrationPhase::Cancelled)) => {
                    let why = status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Failed")
                        .map(|c| c.message.clone())
                        .unwrap_or_default();
                    return Err(format!("migration {name} ended {p:?}: {why}").into());
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((
        done.into_iter().flatten().collect(),
        started.elapsed(),
        own_requests,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_gets_runs_migrations_after_one_warm_up() {
        let runs = 3;
        let n = Variant::ALL.len() * runs;
        let variants: Vec<Option<Variant>> = (0..=n).map(|i| Variant::of(i, runs)).collect();
        assert_eq!(variants[0], None);
        assert_eq!(Variant::of(n + 1, runs), None);
        for v in Variant::ALL {
            assert_eq!(
                variants.iter().filter(|x| **x == Some(v)).count(),
                runs,
                "{v:?}"
            );
        }
        let (transport, mode) = Variant::spec(Some(Variant::PeerToPeer));
        assert_eq!((transport.tls, mode), (true, ControlMode::PeerToPeer));
        let (transport, _) = Variant::spec(Some(Variant::Plain));
        assert_eq!(
            (transport.tls, transport.mode),
            (false, TransportMode::Direct)
        );
        let (transport, mode) = Variant::spec(Some(Variant::Tunnelled));
        assert_eq!(
            (transport.tls, transport.mode, mode),
            (true, TransportMode::Tunnelled, ControlMode::Managed)
        );
        assert_eq!(
            Variant::spec(None),
            (Transport::default(), ControlMode::Managed)
        );
    }
}

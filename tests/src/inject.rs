//! Landing a fault of the matrices on a running cluster, while the hook holds the
//! process at its point: the process faults (tests/tests/faults.rs), the API faults
//! (tests/tests/api_faults.rs), and both in the chaos soak (tests/tests/soak_chaos.rs).
//! Each takes the [`Subject`] it acts on, so a row may move any VM between any nodes.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::Cluster;
use crate::api_proxy::{ApiProxy, FaultKind};
use crate::cluster::Heartbeat;
use crate::fault_matrix::api::{
    ApiFault, ApiRowSpec, PARTITION, injection, partitioned, past_lease, targets,
};
use crate::fault_matrix::{Fault, Pauser};
use crate::fault_run::{Hooks, RESTART_DELAY, Subject};
use crate::relay::Relay;

/// The fault proxy of the process that runs as `who` in `row`.
pub fn proxy_of<'c>(cluster: &'c Cluster, row: Subject<'_>, who: Pauser) -> &'c ApiProxy {
    let proxy = match row.node_of(who) {
        Some(node) => cluster.agent_proxy(node),
        None => cluster.operator_proxy(),
    };
    proxy.expect("the cluster runs behind proxies")
}

/// A process fault (not a QEMU kill's own checks: the caller knows which guest it
/// killed). A killed agent or operator is started again after [`RESTART_DELAY`], as
/// Kubernetes would, without any hook but the standing ones of the cluster.
pub async fn process_fault(cluster: &mut Cluster, row: Subject<'_>, fault: Fault, relay: &Relay) {
    let who = match fault {
        Fault::KillSourceAgent => Some(Pauser::Source),
        Fault::KillTargetAgent => Some(Pauser::Target),
        Fault::KillOperator => Some(Pauser::Operator),
        _ => None,
    };
    if let Some(who) = who {
        match row.node_of(who) {
            Some(node) => cluster.kill_agent(node),
            None => cluster.kill_operator(),
        }
        tokio::time::sleep(RESTART_DELAY).await;
        // The process that paused, if it was not the one killed, is released afterwards.
        match row.node_of(who) {
            Some(node) => cluster.start_agent(node).unwrap(),
            None => cluster.start_operator().unwrap(),
        }
        return;
    }
    match fault {
        Fault::KillSourceQemu | Fault::KillTargetQemu => {
            let node = if fault == Fault::KillSourceQemu {
                row.source
            } else {
                row.target
            };
            if let Some(pid) = cluster.qemu_pids(row.vm).get(node) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        Fault::CutStream => relay.cut(),
        _ => unreachable!(),
    }
}

/// An API fault: arms the proxies' rules (or partitions, restarts the apiserver, kills
/// both agents) while the hook holds the process at the point, and lets it go on. Says
/// what it did for the faults that always land (a restart, kills); `None` for those the
/// proxies count ([`what_landed`]).
pub async fn api_fault(
    cluster: &mut Cluster,
    row: Subject<'_>,
    (mode, fault, point): ApiRowSpec,
    hooks: &Hooks,
) -> Option<String> {
    if let Some((injection, times)) = injection(fault) {
        for (who, matcher) in targets(mode, point) {
            proxy_of(cluster, row, who).fail_next(times, matcher, injection);
        }
        hooks.release(point);
        return None;
    }
    match fault {
        ApiFault::Partition | ApiFault::PartitionPastLease => {
            let who = partitioned(mode, fault, point).expect("a partition row");
            let period = if fault == ApiFault::Partition {
                PARTITION
            } else {
                past_lease(Heartbeat::TESTS)
            };
            proxy_of(cluster, row, who).partition(period);
            hooks.release(point);
            None
        }
        ApiFault::RestartApiserver => {
            let down = Instant::now();
            cluster.cp.stop_apiserver();
            hooks.release(point);
            cluster.cp.start_apiserver().await.unwrap();
            Some(format!(
                "apiserver down {:.1} s",
                down.elapsed().as_secs_f64()
            ))
        }
        ApiFault::KillBothAgents => {
            cluster.kill_agent(row.source);
            cluster.kill_agent(row.target);
            hooks.release(point);
            tokio::time::sleep(RESTART_DELAY).await;
            cluster.start_agent(row.source).unwrap();
            cluster.start_agent(row.target).unwrap();
            Some("both agents killed".into())
        }
        _ => unreachable!("{fault:?} is a request fault"),
    }
}

/// Whether the proxies of `row`'s components injected anything, and what, per
/// component: the requests each failed (kind × request), connections cut and refused,
/// rules never met.
pub fn what_landed(cluster: &Cluster, row: Subject<'_>) -> (bool, String) {
    let mut parts = Vec::new();
    let mut total = 0;
    for (who, name) in [
        (Pauser::Source, "source"),
        (Pauser::Target, "target"),
        (Pauser::Operator, "operator"),
    ] {
        let proxy = proxy_of(cluster, row, who);
        let mut hits: BTreeMap<String, usize> = BTreeMap::new();
        for hit in proxy.hits() {
            let what = format!(
                "{:?} {} {}",
                hit.kind, hit.request.verb, hit.request.resource
            );
            *hits.entry(what).or_default() += 1;
        }
        let counts = proxy.injected();
        let mut said: Vec<String> = hits.iter().map(|(w, n)| format!("{n}× {w}")).collect();
        for (kind, word) in [
            (FaultKind::PartitionCut, "connections cut"),
            (FaultKind::PartitionRefused, "refused"),
        ] {
            if let Some(n) = counts.get(&kind) {
                said.push(format!("{n} {word}"));
            }
        }
        if proxy.pending() > 0 {
            said.push(format!("{} not met", proxy.pending()));
        }
        total += proxy.injected_total();
        if !said.is_empty() {
            parts.push(format!("{name}: {}", said.join(", ")));
        }
    }
    (total > 0, parts.join("; "))
}

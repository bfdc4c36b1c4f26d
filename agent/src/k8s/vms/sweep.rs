//! The sweep: every few seconds, a QEMU on this node that no VirtualMachine accounts for
//! — none of this node, and none an active migration through this node moves —, seen
//! twice in a row, is removed. This is how a target cleans up after a rollback it missed
//! while it was down.
//!
//! A guest is known by its key, the name of its state dir ([`guest_key`]: the VM's
//! namespace and name and the definition's uuid); a VM accounts for the keys of the
//! definition its guest runs with (`status.domainXML`) and of its spec. A spec that does
//! not parse never makes a guest a stray: the running definition still names it. When
//! in doubt — a VM whose guest may run here names no definition that parses — nothing is
//! removed, and neither is a QEMU whose state dir is not named like a key (one an older
//! agent started). Which QEMUs are strays is decided by [`strays`], a pure function.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_agent::domain::Domain;
use ferry_agent::node::{guest_key, is_guest_key};
use ferry_crds::{
    MigrationPhase, SOURCE_NODE_LABEL, TARGET_NODE_LABEL, VirtualMachine, VirtualMachineMigration,
    VmPhase,
};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::{RESYNC, belongs_to};
use crate::k8s::Agent;

/// A VirtualMachine that may have a guest on this node: one of this node, or one an
/// active migration through this node moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `<namespace>/<name>`, for the logs.
    pub vm: String,
    /// The keys of the definitions it names (running, spec, a migration's target
    /// definition) that parse.
    pub keys: Vec<String>,
    /// Whether its guest may be running (its phase says so, or a migration moves it).
    pub may_run: bool,
}

/// What the sweep found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// The state dirs of the QEMUs nothing accounts for.
    pub strays: Vec<String>,
    /// Why nothing is removed this time, when in doubt.
    pub doubt: Option<String>,
}

/// Which of the QEMUs running in the state dirs `local` no claim accounts for.
pub fn strays(local: &[String], claims: &[Claim]) -> Verdict {
    if let Some(c) = claims.iter().find(|c| c.may_run && c.keys.is_empty()) {
        return Verdict {
            strays: Vec::new(),
            doubt: Some(format!(
                "VirtualMachine {} may run here but names no definition that parses",
                c.vm
            )),
        };
    }
    let accounted = |dir: &String| claims.iter().flat_map(|c| &c.keys).any(|k| k == dir);
    let strays = local
        .iter()
        .filter(|dir| is_guest_key(dir) && !accounted(dir))
        .cloned()
        .collect();
    Verdict {
        strays,
        doubt: None,
    }
}

/// The keys of the definitions `xmls` that parse, for VM `vm` in `namespace`.
fn keys<'a>(namespace: &str, vm: &str, xmls: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    xmls.into_iter()
        .filter_map(|xml| Domain::parse(xml).ok())
        .map(|d| guest_key(namespace, vm, d.uuid))
        .collect()
}

/// The definitions a VM names: the running one and the spec's.
fn definitions(vm: &VirtualMachine) -> Vec<&str> {
    let running = vm.status.as_ref().and_then(|s| s.domain_xml.as_deref());
    running
        .into_iter()
        .chain(Some(vm.spec.domain_xml.as_str()))
        .collect()
}

/// Whether a VM's phase says its guest may run.
fn may_run(vm: &VirtualMachine) -> bool {
    matches!(
        vm.status.as_ref().and_then(|s| s.phase),
        Some(VmPhase::Starting | VmPhase::Running | VmPhase::Paused | VmPhase::Migrating)
    )
}

/// Every few seconds: removes the QEMUs [`strays`] names on their second sighting.
pub async fn sweep(agent: Arc<Agent>) {
    let mut suspects: HashMap<String, u32> = HashMap::new();
    let mut doubt: Option<String> = None;
    loop {
        tokio::time::sleep(RESYNC).await;
        let found = match look(&agent).await {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "sweep skipped");
                continue;
            }
        };
        if found.doubt != doubt {
            match &found.doubt {
                Some(why) => {
                    info!(node = %agent.node, %why, "sweep: keeping every QEMU while in doubt")
                }
                None => info!(node = %agent.node, "sweep: no longer in doubt"),
            }
            doubt = found.doubt.clone();
        }
        suspects.retain(|name, _| found.strays.contains(name));
        for name in found.strays {
            let seen = suspects.entry(name.clone()).or_insert(0);
            *seen += 1;
            if *seen >= 2 {
                warn!(vm = %name, node = %agent.node, "removing a QEMU no VM or migration accounts for");
                if let Err(e) = agent.sup.destroy(&name).await {
                    warn!(vm = %name, error = %e, "could not remove it");
                }
                suspects.remove(&name);
            }
        }
    }
}

/// Gathers the QEMUs of this node and the VMs that may account for them.
async fn look(agent: &Agent) -> Result<Verdict, kube::Error> {
    let local: Vec<String> = agent
        .sup
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| agent.sup.running_pid(n).is_some())
        .collect();
    if local.is_empty() {
        return Ok(Verdict::default());
    }
    let vms = Api::<VirtualMachine>::all(agent.client.clone())
        .list(&ListParams::default())
        .await?;
    let by_name: HashMap<(String, String), &VirtualMachine> = vms
        .items
        .iter()
        .map(|vm| ((vm.namespace().unwrap_or_default(), vm.name_any()), vm))
        .collect();
    let mut claims: Vec<Claim> = vms
        .items
        .iter()
        .filter(|vm| belongs_to(vm, &agent.node))
        .map(|vm| {
            let (ns, name) = (vm.namespace().unwrap_or_default(), vm.name_any());
            Claim {
                keys: keys(&ns, &name, definitions(vm)),
                vm: format!("{ns}/{name}"),
                may_run: may_run(vm),
            }
        })
        .collect();
    let migrations: Api<VirtualMachineMigration> = Api::all(agent.client.clone());
    for label in [SOURCE_NODE_LABEL, TARGET_NODE_LABEL] {
        let list = migrations
            .list(&ListParams::default().labels(&format!("{label}={}", agent.node)))
            .await?;
        for m in list.items {
            let phase = m.status.as_ref().and_then(|s| s.phase);
            let active = phase.is_some_and(|p| p != MigrationPhase::Pending && !p.is_terminal());
            if !active {
                continue;
            }
            let (ns, name) = (m.namespace().unwrap_or_default(), &m.spec.vm_name);
            let vm = by_name.get(&(ns.clone(), name.clone()));
            let target = m
                .status
                .as_ref()
                .and_then(|s| s.target_domain_xml.as_deref());
            let xmls = vm.map(|v| definitions(v)).unwrap_or_default();
            claims.push(Claim {
                keys: keys(&ns, name, xmls.into_iter().chain(target)),
                vm: format!("{ns}/{name}"),
                may_run: true,
            });
        }
    }
    Ok(strays(&local, &claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(vm: &str, uuid: u128) -> String {
        guest_key("default", vm, uuid::Uuid::from_u128(uuid))
    }

    fn claim(vm: &str, keys: Vec<String>, may_run: bool) -> Claim {
        Claim {
            vm: vm.into(),
            keys,
            may_run,
        }
    }

    #[test]
    fn a_qemu_no_vm_accounts_for_is_a_stray() {
        let qemus = [key("demo", 1), key("left-over", 2)];
        let claims = [claim("default/demo", vec![key("demo", 1)], true)];
        assert_eq!(
            strays(&qemus, &claims),
            Verdict {
                strays: vec![key("left-over", 2)],
                doubt: None
            }
        );
        // No VM of this node at all: every QEMU is one.
        assert_eq!(strays(&qemus, &[]).strays, qemus.to_vec());
    }

    #[test]
    fn another_namespaces_vm_never_accounts_for_a_guest() {
        // Same VM name, same uuid, another namespace: another guest's key.
        let qemus = [key("demo", 1)];
        let theirs = guest_key("tenant-b", "demo", uuid::Uuid::from_u128(1));
        let verdict = strays(&qemus, &[claim("tenant-b/demo", vec![theirs], true)]);
        assert_eq!(verdict.strays, qemus.to_vec());
    }

    #[test]
    fn a_spec_edit_never_makes_the_running_guest_a_stray() {
        let qemus = [key("demo", 1)];
        // A new uuid in the spec: the running definition (status.domainXML) still names
        // the guest.
        let edited = claim("default/demo", vec![key("demo", 1), key("demo", 9)], true);
        assert!(strays(&qemus, &[edited]).strays.is_empty());
        // A spec that does not parse: the running definition alone.
        let invalid = claim("default/demo", vec![key("demo", 1)], true);
        assert!(strays(&qemus, &[invalid]).strays.is_empty());
    }

    #[test]
    fn when_in_doubt_nothing_is_removed() {
        let qemus = [key("demo", 1), key("other", 2)];
        // A VM whose guest may run here and whose every definition fails to parse.
        let unknown = claim("default/old", vec![], true);
        let verdict = strays(&qemus, &[unknown]);
        assert!(verdict.strays.is_empty());
        assert!(verdict.doubt.unwrap().contains("default/old"));
        // ... unless its phase says no guest of it runs (a VM that never started).
        let never_ran = claim("default/typo", vec![], false);
        assert_eq!(strays(&qemus, &[never_ran]).strays, qemus.to_vec());
        // A state dir not named like a key (an older agent's) is kept.
        assert!(strays(&["demo".to_string()], &[]).strays.is_empty());
    }
}

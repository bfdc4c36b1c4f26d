//! The sweep: every few seconds, a QEMU on this node that no VirtualMachine accounts for
//! — none of this node, and none an active migration through this node moves —, seen
//! twice in a row, is removed. This is how a target cleans up after a rollback it missed
//! while it was down.
//!
//! A guest is identified by its domain name and uuid, from the definition in its state
//! dir; a VM accounts for the guests that bear the name or uuid of the definition its
//! guest runs with (`status.domainXML`) or of its spec. A spec that does not parse never
//! makes a guest a stray: the running definition still names it. When in doubt — a VM
//! whose guest may run here names no definition that parses, a guest whose own
//! definition cannot be read — nothing is removed. Which QEMUs are strays is decided by
//! [`strays`], a pure function.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_agent::domain::Domain;
use ferry_crds::{
    MigrationPhase, SOURCE_NODE_LABEL, TARGET_NODE_LABEL, VirtualMachine, VirtualMachineMigration,
    VmPhase,
};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::{RESYNC, belongs_to};
use crate::k8s::Agent;

/// A guest's identity: its domain name and uuid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uuid: String,
}

impl Identity {
    fn of(domain: &Domain) -> Identity {
        Identity {
            name: domain.name.clone(),
            uuid: domain.uuid.to_string(),
        }
    }

    fn parsed(xml: &str) -> Option<Identity> {
        Domain::parse(xml).ok().map(|d| Identity::of(&d))
    }
}

/// A QEMU running on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// Its state dir's name.
    pub dir: String,
    /// From the definition in its state dir; `None` when that cannot be read.
    pub identity: Option<Identity>,
}

/// A VirtualMachine that may have a guest on this node: one of this node, or one an
/// active migration through this node moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `<namespace>/<name>`, for the logs.
    pub vm: String,
    /// The identities its definitions name (running, spec, a migration's target
    /// definition) that parse.
    pub identities: Vec<Identity>,
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

/// Which of the `local` QEMUs no claim accounts for.
pub fn strays(local: &[Local], claims: &[Claim]) -> Verdict {
    if let Some(c) = claims.iter().find(|c| c.may_run && c.identities.is_empty()) {
        return Verdict {
            strays: Vec::new(),
            doubt: Some(format!(
                "VirtualMachine {} may run here but names no definition that parses",
                c.vm
            )),
        };
    }
    let accounted = |id: &Identity| {
        claims
            .iter()
            .flat_map(|c| &c.identities)
            .any(|c| c.name == id.name || c.uuid == id.uuid)
    };
    let strays = local
        .iter()
        .filter(|l| l.identity.as_ref().is_some_and(|id| !accounted(id)))
        .map(|l| l.dir.clone())
        .collect();
    Verdict {
        strays,
        doubt: None,
    }
}

/// The identities a VM's definitions name.
fn identities(vm: &VirtualMachine) -> Vec<Identity> {
    let running = vm
        .status
        .as_ref()
        .and_then(|s| s.domain_xml.as_deref())
        .and_then(Identity::parsed);
    let spec = Identity::parsed(&vm.spec.domain_xml);
    running.into_iter().chain(spec).collect()
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
    let local: Vec<Local> = agent
        .sup
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| agent.sup.running_pid(n).is_some())
        .map(|dir| Local {
            identity: agent.sup.definition(&dir).ok().map(|d| Identity::of(&d)),
            dir,
        })
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
    let key = |ns: &str, name: &str| format!("{ns}/{name}");
    let mut claims: Vec<Claim> = vms
        .items
        .iter()
        .filter(|vm| belongs_to(vm, &agent.node))
        .map(|vm| Claim {
            vm: key(&vm.namespace().unwrap_or_default(), &vm.name_any()),
            identities: identities(vm),
            may_run: may_run(vm),
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
            let ns = m.namespace().unwrap_or_default();
            let vm = by_name.get(&(ns.clone(), m.spec.vm_name.clone()));
            let target = m
                .status
                .as_ref()
                .and_then(|s| s.target_domain_xml.as_deref())
                .and_then(Identity::parsed);
            claims.push(Claim {
                vm: key(&ns, &m.spec.vm_name),
                identities: vm
                    .map(|v| identities(v))
                    .unwrap_or_default()
                    .into_iter()
                    .chain(target)
                    .collect(),
                may_run: true,
            });
        }
    }
    Ok(strays(&local, &claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, uuid: &str) -> Identity {
        Identity {
            name: name.into(),
            uuid: uuid.into(),
        }
    }

    fn local(dir: &str, uuid: &str) -> Local {
        Local {
            dir: dir.into(),
            identity: Some(id(dir, uuid)),
        }
    }

    fn claim(vm: &str, identities: Vec<Identity>, may_run: bool) -> Claim {
        Claim {
            vm: vm.into(),
            identities,
            may_run,
        }
    }

    #[test]
    fn a_qemu_no_vm_accounts_for_is_a_stray() {
        let qemus = [local("demo", "u1"), local("left-over", "u2")];
        let claims = [claim("default/demo", vec![id("demo", "u1")], true)];
        assert_eq!(
            strays(&qemus, &claims),
            Verdict {
                strays: vec!["left-over".into()],
                doubt: None
            }
        );
        // No VM of this node at all: every QEMU is one.
        assert_eq!(strays(&qemus, &[]).strays, vec!["demo", "left-over"]);
    }

    #[test]
    fn a_spec_edit_never_makes_the_running_guest_a_stray() {
        let qemus = [local("demo", "u1")];
        // Renamed in the spec: the running definition (status.domainXML) still names it,
        // and so does the uuid the spec keeps.
        let renamed = claim(
            "default/demo",
            vec![id("demo", "u1"), id("demo2", "u1")],
            true,
        );
        assert!(strays(&qemus, &[renamed]).strays.is_empty());
        let spec_only = claim("default/demo", vec![id("demo2", "u1")], true);
        assert!(strays(&qemus, &[spec_only]).strays.is_empty());
        // A spec that does not parse: the running definition alone.
        let invalid = claim("default/demo", vec![id("demo", "u1")], true);
        assert!(strays(&qemus, &[invalid]).strays.is_empty());
    }

    #[test]
    fn when_in_doubt_nothing_is_removed() {
        let qemus = [local("demo", "u1"), local("other", "u2")];
        // A VM whose guest may run here and whose every definition fails to parse.
        let unknown = claim("default/old", vec![], true);
        let verdict = strays(&qemus, &[unknown]);
        assert!(verdict.strays.is_empty());
        assert!(verdict.doubt.unwrap().contains("default/old"));
        // ... unless its phase says no guest of it runs (a VM that never started).
        let never_ran = claim("default/typo", vec![], false);
        assert_eq!(strays(&qemus, &[never_ran]).strays, vec!["demo", "other"]);
        // A QEMU whose own definition cannot be read is kept.
        let unreadable = Local {
            dir: "mystery".into(),
            identity: None,
        };
        assert!(strays(&[unreadable], &[]).strays.is_empty());
    }
}

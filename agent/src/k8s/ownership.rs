//! Who owns a migrating guest. The VM's `status.nodeName` is the commit point of a
//! migration: the target takes it in Finish before resuming the guest; the source, before
//! resuming its guest on a rollback, fences the target out by releasing the VM from the
//! migration. Both writes carry a resourceVersion precondition, so exactly one of them
//! wins and at most one guest ever runs. When the target's QEMU died after the commit but
//! before it ran the guest, the source takes the VM back ([`Claim::reclaim`]).

use ferry_crds::{VirtualMachine, VirtualMachineStatusPatch};
use kube::Api;
use kube::api::PatchParams;

/// Why ownership could not be taken or checked.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("VirtualMachine {vm} is gone")]
    VmGone { vm: String },
    #[error("VirtualMachine {vm} now runs on {node:?}, not on {expected}")]
    Moved {
        vm: String,
        node: Option<String>,
        expected: String,
    },
    #[error("migration {migration} no longer holds VirtualMachine {vm} (it rolled back)")]
    Released { vm: String, migration: String },
    #[error("VirtualMachine {vm} kept changing; giving up after {tries} tries")]
    Contended { vm: String, tries: usize },
    #[error("VirtualMachine {vm}: {source}")]
    Kube {
        vm: String,
        #[source]
        source: kube::Error,
    },
}

/// Who may run the guest after a rollback was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The source: the target never took over and now never will.
    Source,
    /// The target took over before the source could fence it.
    Target,
}

const TRIES: usize = 10;

/// The VM and its migration, as both agents see them.
pub struct Claim<'a> {
    pub vms: &'a Api<VirtualMachine>,
    pub vm: &'a str,
    pub migration: &'a str,
    pub source: &'a str,
    pub target: &'a str,
}

/// How long the target waits between attempts to learn whether its ownership write
/// landed.
const SETTLE_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

impl Claim<'_> {
    fn kube(&self) -> impl Fn(kube::Error) -> OwnershipError + '_ {
        |source| OwnershipError::Kube {
            vm: self.vm.to_string(),
            source,
        }
    }

    /// Target, in Finish: moves `status.nodeName` to the target (and `status.domainXML`
    /// to the definition it runs) if it still names the source and the VM is still held
    /// by this migration. Idempotent.
    async fn take_with(&self, domain_xml: &str) -> Result<(), OwnershipError> {
        self.move_owner(self.source, self.target, Some(domain_xml))
            .await
    }

    /// Moves `status.nodeName` from `from` to `to` (with `domain_xml`, when given) over
    /// the version it read, while the VM is held by this migration; done if it already
    /// names `to`.
    async fn move_owner(
        &self,
        from: &str,
        to: &str,
        domain_xml: Option<&str>,
    ) -> Result<(), OwnershipError> {
        for _ in 0..TRIES {
            let vm = self.get().await?;
            let status = vm.status.clone().unwrap_or_default();
            if status.node_name.as_deref() == Some(to) {
                return Ok(());
            }
            if status.node_name.as_deref() != Some(from) {
                return Err(OwnershipError::Moved {
                    vm: self.vm.into(),
                    node: status.node_name,
                    expected: from.into(),
                });
            }
            if status.migration.as_deref() != Some(self.migration) {
                return Err(OwnershipError::Released {
                    vm: self.vm.into(),
                    migration: self.migration.into(),
                });
            }
            let patch = VirtualMachineStatusPatch {
                node_name: Some(Some(to.to_string())),
                domain_xml: domain_xml.map(|x| Some(x.to_string())),
                ..Default::default()
            };
            match self.patch(&patch, &vm).await {
                Ok(()) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(self.kube()(e)),
            }
        }
        Err(OwnershipError::Contended {
            vm: self.vm.into(),
            tries: TRIES,
        })
    }

    /// Target, in Finish: [`Self::take`], tried until its result is certain. An answer
    /// lost to the network or a server error says nothing about whether the write
    /// landed, so it is tried again (a landed write reads back as taken); `Err` only
    /// when the VM is certainly not the target's: it moved elsewhere, the source fenced
    /// the target out, or the VM is gone. `domain_xml` is the definition the target
    /// runs, written in the same write.
    pub async fn commit(&self, domain_xml: &str) -> Result<(), OwnershipError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.take_with(domain_xml).await {
                Ok(()) => return Ok(()),
                Err(
                    e @ (OwnershipError::Moved { .. }
                    | OwnershipError::Released { .. }
                    | OwnershipError::VmGone { .. }),
                ) => return Err(e),
                Err(e) => {
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        tracing::warn!(vm = self.vm, migration = self.migration, attempt, error = %e, "ownership not settled; asking again");
                    }
                    tokio::time::sleep(SETTLE_RETRY).await;
                }
            }
        }
    }

    /// Source, in a cancelled Confirm, when the target's Finish reported that its QEMU
    /// exited after the commit but before it ran the guest: takes `status.nodeName`
    /// back (the paused copy here is whole), if it still names the target and the VM
    /// is still held by this migration. Idempotent.
    pub async fn reclaim(&self) -> Result<(), OwnershipError> {
        self.move_owner(self.target, self.source, None).await
    }

    /// Source, in a cancelled Confirm: releases the VM from the migration so the target
    /// can no longer take it, unless the target already has. Idempotent.
    pub async fn fence(&self) -> Result<Owner, OwnershipError> {
        for _ in 0..TRIES {
            let vm = self.get().await?;
            let status = vm.status.clone().unwrap_or_default();
            if status.node_name.as_deref() == Some(self.target) {
                return Ok(Owner::Target);
            }
            if status.migration.as_deref() != Some(self.migration) {
                return Ok(Owner::Source);
            }
            let patch = VirtualMachineStatusPatch::holder(None);
            match self.patch(&patch, &vm).await {
                Ok(()) => return Ok(Owner::Source),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(self.kube()(e)),
            }
        }
        Err(OwnershipError::Contended {
            vm: self.vm.into(),
            tries: TRIES,
        })
    }

    async fn get(&self) -> Result<VirtualMachine, OwnershipError> {
        self.vms
            .get_opt(self.vm)
            .await
            .map_err(self.kube())?
            .ok_or_else(|| OwnershipError::VmGone { vm: self.vm.into() })
    }

    /// Writes `patch` over the version of `vm` it was decided on.
    async fn patch(
        &self,
        patch: &VirtualMachineStatusPatch,
        vm: &VirtualMachine,
    ) -> Result<(), kube::Error> {
        let body = patch.to_patch(vm.metadata.resource_version.as_deref());
        self.vms
            .patch_status(self.vm, &PatchParams::default(), &body)
            .await
            .map(|_| ())
    }
}

//! The hand-over record the admission policies read (docs/protocol.md, "Who writes
//! what", "The admission policies"). A ValidatingAdmissionPolicy sees only the object
//! written, so the operator copies what it needs to judge an agent's write onto that
//! object: into the VM's `status.holder` (the migration's nodes, and `handOver` once
//! Finish may move `status.nodeName`) and onto each disk-lock Lease of the VM (the
//! annotations [`ferry_crds::HAND_OVER`], `..._FROM`, `..._TO`: which node may take the
//! lock from which). No agent may write either.
//!
//! Order: before a migration enters Finish without `cancelled`, the Leases are stamped
//! source → target, then the VM says `handOver`, then (managed) the phase is written;
//! a target that sees the phase, or (peer-to-peer) is called for Finish and waits for
//! the Lease stamps, finds the VM's record in place too. Before a cancelled Confirm
//! that follows such a Finish, the Leases are stamped back (target → source), so the
//! source can take back what the target took. The stamps go when the migration ends.

use ferry_crds::{
    HAND_OVER, HAND_OVER_FROM, HAND_OVER_TO, MigrationHolder, MigrationPhase, VM_LABEL,
    VirtualMachine,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::info;

use super::Reconciler;
use crate::error::Result;

/// The stamp a disk lock carries: this migration lets `to` take it from `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stamp {
    pub migration: String,
    pub from: String,
    pub to: String,
}

impl Stamp {
    fn of(lease: &Lease) -> Option<Stamp> {
        let a = lease.metadata.annotations.as_ref()?;
        Some(Stamp {
            migration: a.get(HAND_OVER)?.clone(),
            from: a.get(HAND_OVER_FROM)?.clone(),
            to: a.get(HAND_OVER_TO)?.clone(),
        })
    }

    /// The annotations of a merge patch that sets `stamp`, or (`None`) removes it.
    fn patch(stamp: Option<&Stamp>) -> serde_json::Value {
        let v = |f: fn(&Stamp) -> &String| stamp.map(|s| f(s).clone());
        json!({"metadata": {"annotations": {
            HAND_OVER: v(|s| &s.migration),
            HAND_OVER_FROM: v(|s| &s.from),
            HAND_OVER_TO: v(|s| &s.to),
        }}})
    }
}

/// The holder record of a VM held by `migration`, from `source` to `target` (`None`:
/// to a file), before its hand-over.
pub(super) fn holder(migration: &str, source: &str, target: Option<&str>) -> MigrationHolder {
    MigrationHolder {
        migration: migration.to_string(),
        source: source.to_string(),
        target: target.map(str::to_string),
        hand_over: false,
    }
}

impl Reconciler<'_> {
    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.ctx.client.clone(), &self.ctx.namespace)
    }

    fn nodes(&self) -> Option<(String, String)> {
        let s = self.m.status.as_ref()?;
        Some((s.source_node.clone()?, s.target_node.clone()?))
    }

    /// The VM's disk-lock Leases (label `ferry.dev/vm: <ns>.<name>`).
    async fn disk_locks(&self) -> Result<Vec<Lease>> {
        let selector = format!("{VM_LABEL}={}.{}", self.ns, self.m.spec.vm_name);
        Ok(self
            .leases()
            .list(&ListParams::default().labels(&selector))
            .await?
            .items)
    }

    /// Writes `stamp` on each of `locks` that does not carry it already (`None`:
    /// removes this migration's stamp). A Lease gone meanwhile needs none.
    async fn stamp(&self, locks: &[Lease], stamp: Option<&Stamp>) -> Result<usize> {
        let mut written = 0;
        for lease in locks {
            let current = Stamp::of(lease);
            let needed = match stamp {
                Some(s) => current.as_ref() != Some(s),
                None => current.is_some_and(|c| c.migration == self.name()),
            };
            if !needed {
                continue;
            }
            let body = Stamp::patch(stamp);
            match self
                .leases()
                .patch(
                    &lease.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(body),
                )
                .await
            {
                Ok(_) => written += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(written)
    }

    /// The VM's holder record, if it is this migration's.
    fn cached_holder(&self) -> Option<MigrationHolder> {
        let vm_ref = ObjectRef::new(&self.m.spec.vm_name).within(self.ns);
        self.ctx
            .vms
            .get(&vm_ref)
            .and_then(|v| v.status.clone())
            .and_then(|s| s.holder)
            .filter(|h| h.migration == self.name())
    }

    /// Sets the VM's `status.holder.handOver` to `open`, if the VM is still held by
    /// this migration and says otherwise (guarded by the version read; an agent's
    /// write meanwhile makes it read again, not wait for the next reconcile: the guest
    /// is paused while Finish waits for this).
    async fn set_hand_over(&self, open: bool) -> Result<()> {
        let mut tries = 0;
        loop {
            let Some(vm) = self.vms().get_opt(&self.m.spec.vm_name).await? else {
                return Ok(());
            };
            let status = vm.status.clone().unwrap_or_default();
            let Some(mut holder) = status.holder.filter(|h| h.migration == self.name()) else {
                return Ok(());
            };
            if holder.hand_over == open || status.migration.as_deref() != Some(&self.name()) {
                return Ok(());
            }
            holder.hand_over = open;
            match self.write_holder(&vm, Some(holder)).await {
                Err(crate::error::Error::VmConflict { .. }) if tries < 5 => tries += 1,
                done => return done,
            }
        }
    }

    /// Before Finish without `cancelled`: the disk locks say the target may take them
    /// from the source, then the VM says the target may take `status.nodeName`.
    pub(super) async fn open_hand_over(&self) -> Result<()> {
        let Some((source, target)) = self.nodes() else {
            return Ok(());
        };
        let stamp = Stamp {
            migration: self.name(),
            from: source,
            to: target,
        };
        let written = self.stamp(&self.disk_locks().await?, Some(&stamp)).await?;
        self.set_hand_over(true).await?;
        info!(
            locks = written,
            "hand-over open: the target may take the VM and its disk locks"
        );
        Ok(())
    }

    /// Before a cancelled Confirm that follows an opened hand-over: the disk locks the
    /// target may have taken are the source's to take back. Nothing when no lock was
    /// stamped for this migration (Finish ran cancelled, or never).
    pub(super) async fn reverse_hand_over(&self) -> Result<()> {
        let Some((source, target)) = self.nodes() else {
            return Ok(());
        };
        let locks = self.disk_locks().await?;
        let opened: Vec<Lease> = locks
            .into_iter()
            .filter(|l| Stamp::of(l).is_some_and(|s| s.migration == self.name()))
            .collect();
        let back = Stamp {
            migration: self.name(),
            from: target,
            to: source,
        };
        let written = self.stamp(&opened, Some(&back)).await?;
        if written > 0 {
            info!(
                locks = written,
                "rolling back: the source may take its disk locks back"
            );
        }
        Ok(())
    }

    /// What the phase the status shows needs, whoever entered it (a peer-to-peer
    /// source agent, or this operator before a restart): the hand-over open in a Finish
    /// without `cancelled`, reversed in a cancelled Confirm after one, closed in a
    /// cancelled Finish. Reads and writes only when the cached VM says it is needed.
    pub(super) async fn keep_hand_over(&self) -> Result<()> {
        let status = self.m.status.clone().unwrap_or_default();
        if status.target_node.is_none() {
            return Ok(());
        }
        let Some(holder) = self.cached_holder() else {
            return Ok(());
        };
        match (status.phase, status.cancelled) {
            (Some(MigrationPhase::Finish), false) if !holder.hand_over => {
                self.open_hand_over().await
            }
            (Some(MigrationPhase::Finish), true) if holder.hand_over => {
                // A Finish entered cancelled after an open was written (a restart in
                // between): the target must not take the VM.
                self.set_hand_over(false).await
            }
            (Some(MigrationPhase::Confirm), true) if holder.hand_over => {
                self.reverse_hand_over().await
            }
            _ => Ok(()),
        }
    }

    /// At the end: the disk locks carry no stamp of this migration any more.
    pub(super) async fn close_hand_over(&self) -> Result<()> {
        if self.m.spec.to_file.is_some() {
            return Ok(());
        }
        self.stamp(&self.disk_locks().await?, None).await?;
        Ok(())
    }

    /// Writes the VM's `status.migration` and `status.holder` (`None`: releases it),
    /// over the version of `vm` read.
    pub(super) async fn write_holder(
        &self,
        vm: &VirtualMachine,
        holder: Option<MigrationHolder>,
    ) -> Result<()> {
        let patch =
            super::patches::vm_holder(holder).to_patch(vm.metadata.resource_version.as_deref());
        match self
            .vms()
            .patch_status(&vm.name_any(), &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(crate::error::Error::VmConflict {
                vm: vm.name_any(),
                migration: self.name(),
            }),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_three_annotations_and_removing_it_nulls_them() {
        let s = Stamp {
            migration: "m1".into(),
            from: "node-a".into(),
            to: "node-b".into(),
        };
        assert_eq!(
            Stamp::patch(Some(&s)),
            json!({"metadata": {"annotations": {
                "ferry.dev/hand-over": "m1",
                "ferry.dev/hand-over-from": "node-a",
                "ferry.dev/hand-over-to": "node-b",
            }}})
        );
        assert_eq!(
            Stamp::patch(None),
            json!({"metadata": {"annotations": {
                "ferry.dev/hand-over": null,
                "ferry.dev/hand-over-from": null,
                "ferry.dev/hand-over-to": null,
            }}})
        );
        let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "x",
            "annotations": {"ferry.dev/hand-over": "m1", "ferry.dev/hand-over-from": "node-a",
                            "ferry.dev/hand-over-to": "node-b", "other": "y"}}}))
        .unwrap();
        assert_eq!(Stamp::of(&lease), Some(s));
    }
}

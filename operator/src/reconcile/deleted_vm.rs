//! A migration whose VM is being deleted is cancelled (`spec.cancel: true`, as `kubectl
//! ferry cancel` would), so that it releases the VM — rolled back to the source, or, if
//! the hand-over already happened, completed on the target — and the agent of the node
//! that then runs the guest can power it off and finish the deletion.

use ferry_crds::{Reason, cancel_request};
use kube::ResourceExt;
use kube::api::PatchParams;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use tracing::info;

use super::Reconciler;
use crate::error::Result;

impl Reconciler<'_> {
    /// Whether the migration's VM is being deleted (in the operator's cache).
    pub(super) fn vm_deleting(&self) -> bool {
        let vm_ref = ObjectRef::new(&self.m.spec.vm_name).within(self.ns);
        self.ctx
            .vms
            .get(&vm_ref)
            .is_some_and(|vm| vm.metadata.deletion_timestamp.is_some())
    }

    /// Asks the migration to cancel because its VM is being deleted, over the version
    /// this reconcile read (a conflict runs the reconcile again).
    pub(super) async fn cancel_for_deleted_vm(&self) -> Result<()> {
        let patch = cancel_request(self.m.resource_version().as_deref());
        match self
            .api()
            .patch(&self.name(), &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let message = format!(
            "VirtualMachine {} is being deleted: cancelling this migration so that it releases the VM",
            self.m.spec.vm_name
        );
        info!(reason = %Reason::VMDeleting, "{message}");
        self.event(EventType::Normal, Reason::VMDeleting.as_str(), &message)
            .await;
        Ok(())
    }
}

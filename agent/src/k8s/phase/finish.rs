//! Finish on the target: takes ownership of the guest (the VM's `status.nodeName`, then
//! its disk locks) and resumes it, or removes the incoming QEMU on a rollback; gives
//! Finish's cookie.

use ferry_agent::error::BoxError;
use ferry_agent::phases::finish;
use ferry_crds::{MigrationPhase, MigrationStatusPatch, Reason};
use kube::ResourceExt;

use super::{Done, Run, StepError, disks};
use crate::k8s::ownership::Claim;

impl Run<'_> {
    pub(super) async fn finish(&self) -> Result<Done, StepError> {
        let (_, domain) = self.vm().await?;
        let (source, target) = self.claim();
        let disks = disks(&domain);
        let name = self.m.name_any();
        let take = async {
            Claim {
                vms: &self.vms,
                vm: &self.m.spec.vm_name,
                migration: &name,
                source: &source,
                target: &target,
            }
            .take()
            .await?;
            self.disk_locks()
                .hand_over(&disks, &source, &target)
                .await?;
            Ok::<(), BoxError>(())
        };
        let input = finish::FinishInput {
            vm: &domain.name,
            migration: &self.id,
            perform_cookie: self.inputs.cookies.perform.as_deref(),
            cancelled: self.inputs.cancelled,
        };
        let out = finish::finish(&self.agent.sup, input, take).await?;
        let done = if out.resumed {
            Done::new(Reason::Resumed, format!("the guest runs on {target}"))
        } else {
            Done::new(Reason::IncomingRemoved, "the incoming QEMU was removed")
        };
        let outputs =
            MigrationStatusPatch::default().with_cookie(MigrationPhase::Finish, out.cookie);
        Ok(done.with(outputs))
    }
}

//! Finish on the target: the commit point. It hands the disk locks over, then takes the
//! VM (`status.nodeName` := this node, the last fallible step), then resumes the guest;
//! or, on a rollback this node never committed to, removes the incoming QEMU. Gives
//! Finish's cookie (docs/protocol.md, "The commit point").

use ferry_agent::error::{BoxError, ErrorKind};
use ferry_agent::phases::finish;
use ferry_crds::{MigrationPhase, MigrationStatusPatch, Reason};
use kube::ResourceExt;
use tracing::{info, warn};

use super::{Done, Run, StepError, disks};
use crate::k8s::locks::LockError;

/// How many times a disk lock hand-over that the API server failed is tried, before
/// the commit (a failure then rolls the migration back, which is safe).
const HAND_OVER_TRIES: u32 = 3;

impl Run<'_> {
    pub(super) async fn finish(&self) -> Result<Done, StepError> {
        let (vm, domain) = self.vm().await?;
        let (source, target) = self.claim();
        let disks = disks(&domain);
        let name = self.m.name_any();
        let claim = self.ownership(&name, &source, &target);
        // A VM that names this node is this node's: a rollback decided meanwhile is
        // too late for it, and only going forward keeps one guest.
        let owned_here = vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&target);
        let definition = self
            .inputs
            .target_domain_xml
            .clone()
            .unwrap_or_else(|| vm.spec.domain_xml.clone());
        // Called again after a failure only when the guest cannot go back (post-copy).
        let commit = || async {
            self.hand_over(&disks, &source, &target).await?;
            claim.commit(&definition).await?;
            Ok::<(), BoxError>(())
        };
        let input = finish::FinishInput {
            vm: &self.key(&domain),
            migration: &self.id,
            perform_cookie: self.inputs.cookies.perform.as_deref(),
            cancelled: self.inputs.cancelled && !owned_here,
        };
        let out = match finish::finish(&self.agent.sup, input, commit).await {
            Ok(out) => out,
            Err(e) => {
                match &e.kind {
                    // Before the commit: the disks are the source's again.
                    // Before the commit, or after it when the guest never ran here
                    // (the step's TargetNeverRan lets the source take the VM back): the
                    // disks are the source's again.
                    ErrorKind::Ownership(_) | ErrorKind::NotArrived(_) | ErrorKind::NeverRan(_) => {
                        if let Err(err) =
                            self.disk_locks().hand_over(&disks, &target, &source).await
                        {
                            warn!(error = %err, "could not hand the disk locks back; the source's Confirm does");
                        }
                    }
                    // After the commit, the guest may have run here and its QEMU is gone.
                    ErrorKind::GuestLost(why) => self.mark_vm_lost(why).await?,
                    _ => {}
                }
                return Err(e.into());
            }
        };
        let done = if out.resumed && self.m.in_post_copy() {
            info!("the guest runs here; the rest of its memory follows (post-copy)");
            Done::new(
                Reason::Resumed,
                format!(
                    "the guest runs on {target}; the rest of its memory follows from {source} (post-copy)"
                ),
            )
        } else if out.resumed {
            info!("the guest runs here");
            Done::new(Reason::Resumed, format!("the guest runs on {target}"))
        } else {
            Done::new(Reason::IncomingRemoved, "the incoming QEMU was removed")
        };
        let outputs =
            MigrationStatusPatch::default().with_cookie(MigrationPhase::Finish, out.cookie);
        Ok(done.with(outputs))
    }

    /// Takes the disk locks for the target once the operator stamped them for this
    /// hand-over, trying again while the API server fails.
    async fn hand_over(
        &self,
        disks: &[String],
        source: &str,
        target: &str,
    ) -> Result<(), LockError> {
        let locks = self.disk_locks();
        let mut attempt = 1;
        loop {
            match locks.take(disks, source, target).await {
                Err(LockError::Kube { .. }) if attempt < HAND_OVER_TRIES => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                done => return done,
            }
        }
    }
}

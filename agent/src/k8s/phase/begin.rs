//! Begin on the source: checks the guest can migrate, takes the migration lock, and
//! gives the target's definition (`targetDomainXML`) and Begin's cookie. A live
//! migration's policy is checked against this node's QEMU first, so one it cannot honour
//! is refused before the lock is taken.

use ferry_agent::phases::begin;
use ferry_crds::{MigrationPhase, MigrationStatusPatch, Reason};

use super::{Done, Run, StepError};

impl Run<'_> {
    pub(super) async fn begin(&self) -> Result<Done, StepError> {
        if self.m.spec.to_file.is_none() {
            self.policy()?;
        }
        let (_, domain) = self.vm().await?;
        let input = begin::BeginInput {
            vm: &self.key(&domain),
            migration: &self.id,
            target_xml: self.m.spec.target_domain_xml.as_deref(),
        };
        let out = begin::begin(&self.agent.sup, input).await?;
        let outputs = MigrationStatusPatch {
            target_domain_xml: Some(out.domain_xml),
            ..Default::default()
        }
        .with_cookie(MigrationPhase::Begin, Some(out.cookie));
        Ok(Done::new(
            Reason::Locked,
            "the guest can migrate; migration lock taken",
        )
        .with(outputs))
    }
}

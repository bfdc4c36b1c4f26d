//! Prepare on the target: starts the incoming QEMU from Begin's definition and cookie on
//! a reserved port, and gives the migration URI and Prepare's cookie.

use ferry_agent::fault;
use ferry_agent::phases::prepare;
use ferry_crds::{MigrationPhase, MigrationStatusPatch, Reason};

use super::{Done, Run, StepError, tls_words};

impl Run<'_> {
    pub(super) async fn prepare(&self) -> Result<Done, StepError> {
        let xml = self
            .inputs
            .target_domain_xml
            .as_deref()
            .ok_or(StepError::MissingInput(
                "Begin left no domain XML for the target",
            ))?;
        let cookie = self
            .inputs
            .cookies
            .begin
            .as_deref()
            .ok_or(StepError::MissingInput("Begin left no cookie"))?;
        // Held until Prepare returns: by then the incoming QEMU listens on it.
        let port = self.agent.reserve_port().ok_or(StepError::NoPort)?;
        let policy = self.policy()?;
        let tls = self.tls()?;
        let namespace = self.m.metadata.namespace.as_deref().unwrap_or_default();
        let input = prepare::PrepareInput {
            migration: &self.id,
            namespace,
            domain_xml: xml,
            begin_cookie: cookie,
            port: Some(port.port),
            policy: &policy,
            tls: tls.as_ref(),
        };
        let out = prepare::prepare(&self.agent.sup, input).await?;
        let uri = fault::advertised_uri(&out.uri);
        let (source, _) = self.claim();
        let message = format!(
            "target QEMU waiting on {uri} ({})",
            tls_words(tls.is_some(), &source)
        );
        let outputs = MigrationStatusPatch {
            migration_uri: Some(uri),
            ..Default::default()
        }
        .with_cookie(MigrationPhase::Prepare, Some(out.cookie));
        Ok(Done::new(Reason::Listening, message).with(outputs))
    }
}

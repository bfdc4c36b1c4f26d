//! Prepare on the target: checks Begin's definition against what the VM's owner wrote,
//! starts the incoming QEMU from it and Begin's cookie on a reserved port (tunnelled: on
//! its socket in the guest's state dir, the URI then naming this agent's peer endpoint),
//! and gives the migration URI and Prepare's cookie.
//!
//! The target trusts only what it can check. Begin's definition comes from the source
//! node (through the status, or the source agent's call in peer-to-peer mode), so it
//! must be exactly the migration's `spec.targetDomainXML` when there is one, else
//! exactly the VM's recorded running definition (`status.domainXML`; the spec's up to
//! host-side details for a guest started before it was recorded), and its host paths
//! are opened beneath this node's own storage roots for the migration's namespace: a
//! compromised source cannot make this node start what the VM's owner could not.

use ferry_agent::abi::{self, Expected};
use ferry_agent::domain::Domain;
use ferry_agent::fault;
use ferry_agent::phases::prepare;
use ferry_agent::stream::{self, Listen};
use ferry_crds::{MigrationPhase, MigrationStatusPatch, Reason};

use super::{Done, Run, StepError};

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
        self.check_handed(xml).await?;
        let key = self.key(&Domain::parse(xml).map_err(|source| StepError::Domain {
            vm: self.m.spec.vm_name.clone(),
            source,
        })?);
        let policy = self.policy()?;
        let namespace = self.m.metadata.namespace.as_deref().unwrap_or_default();
        let tunnelled = self.tunnelled();
        // Direct: QEMU listens on a reserved port, held until Prepare returns (by then
        // the incoming QEMU listens on it) and encrypts with the node's certificate.
        // Tunnelled: QEMU listens on its socket in the state dir, in the clear; the
        // agents' own connection encrypts (the node's certificate is checked here all
        // the same: without it no tunnel can be accepted).
        let (port, tls) = if tunnelled {
            self.node_credentials()?;
            (None, None)
        } else {
            let port = self.agent.reserve_port().ok_or(StepError::NoPort)?;
            (Some(port), self.tls()?)
        };
        let listen = match &port {
            Some(p) => Listen::Tcp(Some(p.port)),
            None => Listen::Incoming,
        };
        let input = prepare::PrepareInput {
            vm: &key,
            migration: &self.id,
            namespace,
            domain_xml: xml,
            begin_cookie: cookie,
            listen,
            policy: &policy,
            tls: tls.as_ref(),
        };
        let out = prepare::prepare(&self.agent.sup, input).await?;
        drop(port);
        let uri = if tunnelled {
            fault::advertised_uri(&stream::tunnel_uri(&self.agent.peer_endpoint))
        } else {
            fault::advertised_uri(&out.uri)
        };
        let (source, _) = self.claim();
        let message = format!(
            "target QEMU waiting on {uri} ({})",
            self.stream_words(tls.is_some(), &source)
        );
        let outputs = MigrationStatusPatch {
            migration_uri: Some(uri),
            ..Default::default()
        }
        .with_cookie(MigrationPhase::Prepare, Some(out.cookie));
        Ok(Done::new(Reason::Listening, message).with(outputs))
    }

    /// Begin's definition `xml` against what the VM's owner wrote (the module's doc).
    async fn check_handed(&self, xml: &str) -> Result<(), StepError> {
        let vm = &self.m.spec.vm_name;
        let domain_err = |source| StepError::Domain {
            vm: vm.clone(),
            source,
        };
        let handed = Domain::parse(xml).map_err(domain_err)?;
        let target = match self.m.spec.target_domain_xml.as_deref() {
            Some(x) => Some(Domain::parse(x).map_err(domain_err)?),
            None => None,
        };
        let (_, running, recorded) = self.vm_recorded().await?;
        let expected = match (&target, recorded) {
            (Some(t), _) => Expected::Exactly(t),
            (None, true) => Expected::Running(&running),
            (None, false) => Expected::Spec(&running),
        };
        abi::check_handed(&handed, expected).map_err(|source| StepError::Handed {
            vm: vm.clone(),
            source,
        })
    }
}

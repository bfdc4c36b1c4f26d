//! The migration certificate signer `ferry.dev/migration`, without I/O: the cluster CA,
//! the review of an agent's CertificateSigningRequest, and the node certificate issued
//! for it. [`crate::certs`] does the Kubernetes side.
//!
//! A request is approved only when all of these hold, and denied with a reason naming
//! the first that does not:
//! - the requester (the CSR's `spec.username`, filled in by the apiserver) is the
//!   chart's agent ServiceAccount;
//! - the requester's token is bound to a node (user extra
//!   `authentication.kubernetes.io/node-name`) and the request's subject is exactly
//!   `CN=<that node>` and its only SAN is `DNS:<that node>`: an agent gets a certificate
//!   for its own node and nothing else (an IP SAN is refused because the operator cannot
//!   check an address belongs to the node; QEMU checks peers by name);
//! - the usages are those of a node certificate (digital signature, key encipherment,
//!   server auth, client auth) and it does not ask to be a CA;
//! - the request is a valid PKCS#10 document whose signature verifies.
//!
//! The certificate issued is built from the node name, not copied from the request.

use k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::time::Duration;

pub use ferry_crds::tls::{NODE_NAME_EXTRA, SIGNER_NAME, USAGES};
/// How long a node certificate is valid; agents renew with a third of it left.
pub const NODE_CERT_LIFETIME: Duration =
    Duration::from_secs(ferry_crds::tls::NODE_CERT_LIFETIME_SECONDS);
/// How long the cluster CA is valid.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("CA certificate or key: {0}")]
    Ca(rcgen::Error),
    #[error("issuing the certificate: {0}")]
    Issue(rcgen::Error),
}

/// The cluster CA: its certificate (public, in the `ferry-ca` ConfigMap) and key (in the
/// `ferry-ca` Secret).
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("key", &"<redacted>").finish()
    }
}

impl Ca {
    /// A new self-signed CA, valid from now for [`CA_LIFETIME`].
    pub fn generate(now: time::OffsetDateTime) -> Result<Ca, SignerError> {
        let key = KeyPair::generate().map_err(SignerError::Ca)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Ferry migration CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key).map_err(SignerError::Ca)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA stored in the Secret.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, SignerError> {
        let key = KeyPair::from_pem(key_pem).map_err(SignerError::Ca)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(SignerError::Ca)?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// Issues the node certificate for an approved request (PEM).
    pub fn issue(
        &self,
        req: &Approved,
        now: time::OffsetDateTime,
        lifetime: Duration,
    ) -> Result<String, SignerError> {
        let mut params = node_params(&req.node).map_err(SignerError::Issue)?;
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + lifetime;
        let cert = params
            .signed_by(&req.csr.public_key, &self.issuer)
            .map_err(SignerError::Issue)?;
        Ok(cert.pem())
    }
}

/// A certificate and its key, PEM, that the operator issues to itself.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Ca {
    /// The console server's certificate (server auth) for the DNS names the apiserver
    /// dials it by (`<service>.<namespace>.svc`), with a fresh key.
    pub fn issue_console_server(
        &self,
        dns_names: &[String],
        now: time::OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Issued, SignerError> {
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(SignerError::Issue)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().map_or("ferry-console", |n| n),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_own(params, now, lifetime)
    }

    /// The console proxy's client certificate, which the agents accept for consoles only:
    /// subject `CN=`[`ferry_crds::console::PROXY_IDENTITY`], client auth, no SAN.
    pub fn issue_console_proxy(
        &self,
        now: time::OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Issued, SignerError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, ferry_crds::console::PROXY_IDENTITY);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_own(params, now, lifetime)
    }

    fn issue_own(
        &self,
        mut params: CertificateParams,
        now: time::OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Issued, SignerError> {
        let key = KeyPair::generate().map_err(SignerError::Issue)?;
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + lifetime;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(SignerError::Issue)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The certificate profile of a node (one definition, shared with the agents that
/// request it).
pub use ferry_runtime::node_cert_params as node_params;

/// A request the signer approves: for node `node`, with the requester's public key.
#[derive(Debug)]
pub struct Approved {
    pub node: String,
    pub csr: CertificateSigningRequestParams,
}

/// Why a request is denied: a condition reason and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: &'static str,
    pub message: String,
}

fn deny(reason: &'static str, message: String) -> Denial {
    Denial { reason, message }
}

/// Reviews a CSR for [`SIGNER_NAME`]. `agent_user` is the agent ServiceAccount's user
/// name (`system:serviceaccount:<namespace>:<name>`).
pub fn review(spec: &CertificateSigningRequestSpec, agent_user: &str) -> Result<Approved, Denial> {
    let requester = spec.username.as_deref().unwrap_or("<unknown>");
    if requester != agent_user {
        return Err(deny(
            "NotAnAgent",
            format!("requested by {requester}, not by the agent ServiceAccount {agent_user}"),
        ));
    }
    let node = match spec
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .map(Vec::as_slice)
    {
        Some([node]) if !node.is_empty() => node.clone(),
        _ => {
            return Err(deny(
                "NoNodeIdentity",
                format!("the requester's token is not bound to a node (no {NODE_NAME_EXTRA})"),
            ));
        }
    };
    let mut usages: Vec<&str> = spec
        .usages
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    usages.sort_unstable();
    let mut want = USAGES.to_vec();
    want.sort_unstable();
    if usages != want {
        return Err(deny(
            "BadUsages",
            format!("usages {usages:?}; a node certificate has exactly {USAGES:?}"),
        ));
    }
    let pem = String::from_utf8_lossy(&spec.request.0);
    let csr = CertificateSigningRequestParams::from_pem(&pem)
        .map_err(|e| deny("BadRequest", format!("not a valid PKCS#10 request: {e}")))?;
    let subject: Vec<_> = csr.params.distinguished_name.iter().collect();
    let cn = match subject.as_slice() {
        [(DnType::CommonName, v)] => dn_text(v),
        _ => None,
    };
    match cn {
        Some(cn) if cn == node => {}
        Some(cn) => {
            return Err(deny(
                "NodeMismatch",
                format!("the request is for CN={cn} but the requester's token is node {node}'s"),
            ));
        }
        None => {
            return Err(deny(
                "BadSubject",
                format!("the subject must be exactly CN={node}"),
            ));
        }
    }
    let dns_only = matches!(
        csr.params.subject_alt_names.as_slice(),
        [SanType::DnsName(d)] if d.as_str() == node
    );
    if !dns_only {
        return Err(deny(
            "BadSubjectAltNames",
            format!(
                "subject alternative names {:?}; the only one allowed is DNS:{node}",
                csr.params.subject_alt_names
            ),
        ));
    }
    if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
        return Err(deny("CaRequested", "a node certificate is not a CA".into()));
    }
    Ok(Approved { node, csr })
}

fn dn_text(v: &DnValue) -> Option<String> {
    match v {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// How long to make a certificate: [`NODE_CERT_LIFETIME`], or less if the request asks
/// for less (`spec.expirationSeconds`; the API's minimum is 600 s).
pub fn lifetime(spec: &CertificateSigningRequestSpec) -> Duration {
    match spec.expiration_seconds {
        Some(s) if s > 0 => NODE_CERT_LIFETIME.min(Duration::from_secs(s as u64)),
        _ => NODE_CERT_LIFETIME,
    }
}

#[cfg(test)]
#[path = "signer_tests.rs"]
mod tests;

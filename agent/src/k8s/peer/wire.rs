//! What the agents' peer API carries, and the TLS both ends speak.

use std::sync::Arc;

use ferry_agent::tls::Credentials;
use ferry_crds::{MigrationStatusPatch, Reason, StepOutcome};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// The path of the Prepare call.
pub const PREPARE_PATH: &str = "/v1/prepare";
/// The path of the Finish call.
pub const FINISH_PATH: &str = "/v1/finish";
/// The route of a VM's console, for the operator's console proxy only
/// ([`ferry_crds::console::agent_path`] fills it in).
pub const CONSOLE_ROUTE: &str = "/v1/console/{namespace}/{vm}";
/// The route of one connection of a tunnelled migration stream, for the migration's
/// source node only ([`tunnel_path`] fills it in).
pub const TUNNEL_ROUTE: &str = "/v1/tunnel/{namespace}/{migration}/{uid}";
/// The `Upgrade` protocol of a tunnel connection.
pub const TUNNEL_UPGRADE: &str = "ferry-tunnel";
/// The largest request body the server reads: a domain definition (64 KiB) and two
/// cookies (16 KiB each), with room for JSON escaping.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// What the source hands the target for Prepare or Finish: which migration, and the
/// inputs the phase takes (Begin's domain definition and cookie for Prepare; Perform's
/// cookie and the rollback flag for Finish).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRequest {
    pub namespace: String,
    pub name: String,
    /// The migration's uid: a call for an older object of the same name is refused.
    pub uid: String,
    #[serde(default)]
    pub cancelled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_cookie: Option<String>,
    #[serde(
        rename = "targetDomainXML",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub target_domain_xml: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perform_cookie: Option<String>,
}

impl PeerRequest {
    /// The request for `m`'s Prepare or Finish, with the inputs its status holds.
    pub fn of(m: &ferry_crds::VirtualMachineMigration) -> PeerRequest {
        use kube::ResourceExt;
        let status = m.status.clone().unwrap_or_default();
        let cookies = status.cookies.clone().unwrap_or_default();
        PeerRequest {
            namespace: m.namespace().unwrap_or_default(),
            name: m.name_any(),
            uid: m.uid().unwrap_or_default(),
            cancelled: status.cancelled,
            begin_cookie: cookies.begin,
            target_domain_xml: status.target_domain_xml,
            perform_cookie: cookies.perform,
        }
    }
}

/// The path of a tunnel connection for the migration `namespace/name` of uid `uid`.
pub fn tunnel_path(namespace: &str, name: &str, uid: &str) -> String {
    format!("/v1/tunnel/{namespace}/{name}/{uid}")
}

/// The target's step, as the source records it in `status.steps` (plus the phase's
/// outputs: its cookie, and Prepare's migration URI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStep {
    pub outcome: StepOutcome,
    /// Why it ended so (absent from an agent older than the field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    pub message: String,
    pub start: MicroTime,
    pub end: MicroTime,
    /// Status fields the phase gives: `cookies.<phase>`, `migrationURI`.
    #[serde(default)]
    pub outputs: MigrationStatusPatch,
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the migration CA certificate: {0}")]
    Ca(String),
    #[error("this node's certificate: {0}")]
    Cert(String),
    #[error("this node's key: {0}")]
    Key(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(creds: &Credentials) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(creds.ca.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Ca(e.to_string()))?;
        roots.add(cert).map_err(|e| TlsError::Ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Ca("no certificate in the PEM".into()));
    }
    Ok(Arc::new(roots))
}

fn chain(creds: &Credentials) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(creds.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Cert("no certificate in the PEM".into()));
    }
    Ok(chain)
}

fn key(creds: &Credentials) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(creds.key.as_bytes()).map_err(|e| TlsError::Key(e.to_string()))
}

/// The server's side: TLS 1.3, this node's certificate, and a client certificate
/// required and checked against the migration CA.
pub fn server_config(creds: &Credentials) -> Result<ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(creds)?, provider())
        .build()
        .map_err(|e| TlsError::Ca(e.to_string()))?;
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(creds)?, key(creds)?)?)
}

/// The client's side: TLS 1.3, the server must show a certificate of the migration CA
/// for the node called (checked by the caller's server name), and this node's own.
pub fn client_config(creds: &Credentials) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(creds)?)
        .with_client_auth_cert(chain(creds)?, key(creds)?)?)
}

/// The node a verified peer certificate names: its subject's CN (the signer builds
/// CN and the only DNS SAN from the node name, and signs nothing else).
pub fn node_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_in_camel_case() {
        let r = PeerRequest {
            namespace: "default".into(),
            name: "m".into(),
            uid: "u".into(),
            cancelled: true,
            begin_cookie: Some("<cookie/>".into()),
            target_domain_xml: Some("<domain/>".into()),
            perform_cookie: None,
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["beginCookie"], "<cookie/>");
        assert_eq!(json["targetDomainXML"], "<domain/>");
        assert!(json.get("performCookie").is_none());
        assert_eq!(serde_json::from_value::<PeerRequest>(json).unwrap(), r);
    }

    #[test]
    fn a_step_carries_typed_outputs() {
        let step = PeerStep {
            outcome: StepOutcome::Succeeded,
            reason: Some(Reason::Listening),
            message: "m".into(),
            start: MicroTime("2026-01-01T00:00:00.000001Z".parse().unwrap()),
            end: MicroTime("2026-01-01T00:00:01.000001Z".parse().unwrap()),
            outputs: MigrationStatusPatch {
                migration_uri: Some("tcp:127.0.0.3:4444".into()),
                ..Default::default()
            },
        };
        let json = serde_json::to_value(&step).unwrap();
        assert_eq!(
            json["outputs"],
            serde_json::json!({"migrationURI": "tcp:127.0.0.3:4444"})
        );
        assert_eq!(json["reason"], "Listening");
        assert_eq!(serde_json::from_value::<PeerStep>(json).unwrap(), step);
    }

    fn creds(node: &str) -> Credentials {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![node.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Credentials {
            ca: ca_cert.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    #[test]
    fn both_configs_build_from_node_credentials_and_the_cn_names_the_node() {
        let c = creds("node-a");
        server_config(&c).unwrap();
        client_config(&c).unwrap();
        let der = chain(&c).unwrap().remove(0);
        assert_eq!(node_of(&der).as_deref(), Some("node-a"));
    }

    #[test]
    fn bad_material_is_named() {
        let mut c = creds("node-a");
        c.ca = "not a pem".into();
        assert!(matches!(server_config(&c), Err(TlsError::Ca(_))));
        let mut c = creds("node-a");
        c.key = String::new();
        assert!(matches!(client_config(&c), Err(TlsError::Key(_))));
    }
}

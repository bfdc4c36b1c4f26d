//! Consoles the cluster authorises (docs/protocol.md, "Consoles").
//!
//! Every operator replica serves the API group `subresources.ferry.dev` as an
//! aggregated API: the chart registers it (an APIService over the Service
//! `ferry-console`), and the operator injects the migration CA into the APIService's
//! `caBundle` so the apiserver trusts the serving certificate the operator issues to
//! itself. A console request comes through the apiserver, which authenticates the
//! caller; [`server`] takes the caller's identity only from a connection that shows the
//! apiserver's front-proxy certificate ([`access`]), asks the apiserver whether that
//! caller may `get` `virtualmachines/console` on the VM, and only then opens the console
//! on the VM's node through its agent ([`agent`]) with a client certificate only the
//! console proxy has. A user needs no network path to the nodes, and no right on the
//! agents or their Pods.

pub mod access;
pub mod agent;
pub mod server;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_crds::console::API_SERVICE;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::Api;
use kube::api::{Patch, PatchParams};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tracing::{info, warn};

use crate::signer::{Ca, Issued};
use access::FrontProxy;

/// How long the console's own certificates are valid; they are issued again daily.
const CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
const RENEW_EVERY: Duration = Duration::from_secs(24 * 3600);
/// How soon a failed set-up (no CA yet, no front-proxy ConfigMap) is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// Why a console could not be opened or served; [`ConsoleError::status`] words it for
/// the caller.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("Kubernetes API, {what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error("no VirtualMachine {namespace}/{vm}")]
    NoVm { namespace: String, vm: String },
    #[error("VirtualMachine {namespace}/{vm} is not running on any node")]
    NotRunning { namespace: String, vm: String },
    #[error("node {node} has no agent serving consoles (no peer endpoint on its heartbeat Lease)")]
    NoAgent { node: String },
    #[error("the agent of node {node}: {message}")]
    Agent { node: String, message: String },
    #[error("the agent of node {node} refused the console ({status}): {message}")]
    Refused {
        node: String,
        status: http::StatusCode,
        message: String,
    },
    #[error("the console server is not set up yet: {0}")]
    NotReady(String),
    #[error(transparent)]
    Access(#[from] access::AccessError),
}

impl ConsoleError {
    /// The `metav1.Status` the caller gets.
    pub fn status(&self) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Status {
        let (code, reason) = match self {
            ConsoleError::NoVm { .. } => (404, "NotFound"),
            ConsoleError::NotRunning { .. } => (409, "Conflict"),
            ConsoleError::Refused { status, .. } if status.as_u16() == 409 => (409, "Conflict"),
            ConsoleError::Refused { status, .. } if status.as_u16() == 404 => (404, "NotFound"),
            _ => (503, "ServiceUnavailable"),
        };
        access::status(code, reason, self.to_string())
    }
}

/// What the console server runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Ferry's namespace (the CA, the heartbeat Leases, the Service).
    pub namespace: String,
    /// The Service the APIService names: the serving certificate is for
    /// `<service>.<namespace>.svc`.
    pub service: String,
}

/// The console server's state: its certificates and the front proxy's settings, renewed
/// in the background.
pub struct Console {
    pub client: kube::Client,
    pub namespace: String,
    current: RwLock<Option<Current>>,
    why_not: RwLock<String>,
}

#[derive(Clone)]
struct Current {
    tls: Arc<ServerConfig>,
    front: FrontProxy,
    ca_pem: String,
    proxy: Issued,
}

impl Console {
    pub fn new(client: kube::Client, namespace: String) -> Arc<Console> {
        Arc::new(Console {
            client,
            namespace,
            current: RwLock::new(None),
            why_not: RwLock::new("starting".into()),
        })
    }

    fn current(&self) -> Result<Current, ConsoleError> {
        self.current
            .read()
            .expect("not poisoned")
            .clone()
            .ok_or_else(|| {
                ConsoleError::NotReady(self.why_not.read().expect("not poisoned").clone())
            })
    }

    /// The TLS configuration for the next connection, and the front proxy it admits.
    pub fn tls(&self) -> Result<(Arc<ServerConfig>, FrontProxy), ConsoleError> {
        self.current().map(|c| (c.tls, c.front))
    }

    /// The migration CA and the proxy's client certificate, for the agents.
    pub fn proxy_identity(&self) -> Result<(String, Issued), ConsoleError> {
        self.current().map(|c| (c.ca_pem, c.proxy))
    }

    /// Sets up (and then daily renews) the certificates, the front proxy's settings and
    /// the APIService's `caBundle`. Runs until the process ends.
    pub async fn keep_current(self: Arc<Self>, settings: Settings) {
        loop {
            match self.set_up(&settings).await {
                Ok(()) => tokio::time::sleep(RENEW_EVERY).await,
                Err(e) => {
                    warn!(error = %e, "console API not set up; trying again");
                    *self.why_not.write().expect("not poisoned") = e.to_string();
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    async fn set_up(&self, settings: &Settings) -> Result<(), ConsoleError> {
        let ca = crate::certs::ensure_ca(&self.client, &settings.namespace)
            .await
            .map_err(|e| ConsoleError::NotReady(format!("the migration CA: {e}")))?;
        let (ns, name) = access::AUTHENTICATION_CONFIGMAP;
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let map = maps.get(name).await.map_err(|source| ConsoleError::Kube {
            what: format!("reading ConfigMap {ns}/{name}"),
            source,
        })?;
        let front = FrontProxy::from_configmap(&map.data.unwrap_or_default())?;
        let now = time::OffsetDateTime::now_utc();
        let dns = vec![
            format!("{}.{}.svc", settings.service, settings.namespace),
            format!(
                "{}.{}.svc.cluster.local",
                settings.service, settings.namespace
            ),
        ];
        let issue = |e: crate::signer::SignerError| ConsoleError::NotReady(e.to_string());
        let serving = ca
            .issue_console_server(&dns, now, CERT_LIFETIME)
            .map_err(issue)?;
        let proxy = ca.issue_console_proxy(now, CERT_LIFETIME).map_err(issue)?;
        let tls = server_config(&front.client_ca, &serving).map_err(ConsoleError::NotReady)?;
        inject_ca_bundle(&self.client, &ca).await?;
        *self.current.write().expect("not poisoned") = Some(Current {
            tls: Arc::new(tls),
            front,
            ca_pem: ca.cert_pem.clone(),
            proxy,
        });
        info!(service = %dns[0], "console API ready");
        Ok(())
    }
}

/// Points the APIService's `caBundle` at the migration CA, which signed the serving
/// certificate. A merge patch of that one field (the typed struct would also send the
/// required priorities, as zeros).
async fn inject_ca_bundle(client: &kube::Client, ca: &Ca) -> Result<(), ConsoleError> {
    use base64::Engine as _;
    let api: Api<APIService> = Api::all(client.clone());
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca.cert_pem.as_bytes());
    let patch = serde_json::json!({ "spec": { "caBundle": bundle } });
    api.patch(API_SERVICE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| ConsoleError::Kube {
            what: format!("setting the caBundle of APIService {API_SERVICE}"),
            source,
        })?;
    Ok(())
}

/// TLS 1.2 or 1.3 (the apiserver's Go client speaks both), the serving certificate, and a
/// client certificate required and checked against the front proxy's CA.
fn server_config(front_proxy_ca: &str, serving: &Issued) -> Result<ServerConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(front_proxy_ca.as_bytes()) {
        let cert = cert.map_err(|e| format!("front-proxy CA: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("front-proxy CA: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("front-proxy CA: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("serving certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes())
        .map_err(|e| format!("serving key: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The subject CN of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

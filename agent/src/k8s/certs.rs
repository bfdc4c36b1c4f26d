//! This node's migration certificate, through the Kubernetes CSR API (the way kubelet
//! serving certificates work). The agent generates its key here (it never leaves the
//! node; mode 0600 under `<state>/tls/`), files a CertificateSigningRequest
//! `ferry-<node>-<key hash>` for the signer `ferry.dev/migration` with subject
//! `CN=<node>` and SAN `DNS:<node>`, and waits for the operator to approve and sign it.
//! The apiserver records who asked (the agent's node-bound token), which is what the
//! operator checks. The CA comes from the ConfigMap `ferry-ca`. A certificate with less
//! than a third of its life left, or not signed by the CA the ConfigMap shows now, is
//! replaced with a new key. [`Store::current`] is what a TLS migration uses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_agent::tls::Credentials;
use ferry_crds::tls::{CA_CERT_KEY, CA_NAME, NODE_CERT_LIFETIME_SECONDS, SIGNER_NAME, USAGES};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use rcgen::KeyPair;
use tracing::{info, warn};

use super::Agent;

const DIR: &str = "tls";
const KEY: &str = "node.key";
const CERT: &str = "node.crt";
const CA: &str = "ca.crt";
const PENDING_KEY: &str = "pending.key";
/// How long one wait for the operator's signature lasts before the agent looks again.
const ISSUE_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("ConfigMap {CA_NAME} (the migration CA): {0}")]
    NoCa(String),
    #[error("Kubernetes API, {what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error("{what} in {}: {source}", dir.display())]
    Io {
        what: &'static str,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Bad(String),
    #[error("CSR {name} was denied by the operator ({reason}): {message}")]
    Denied {
        name: String,
        reason: String,
        message: String,
    },
    #[error("CSR {0} is not signed yet (is the operator running?)")]
    NotIssued(String),
}

/// The certificate migrations use now, or why there is none.
#[derive(Default)]
pub struct Store {
    inner: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    creds: Option<(Credentials, Validity)>,
    why_none: String,
}

impl Store {
    /// This node's credentials, if it has a certificate valid now.
    pub fn current(&self) -> Option<Credentials> {
        let s = self.inner.lock().expect("never poisoned");
        let now = unix_now();
        s.creds
            .as_ref()
            .filter(|(_, v)| v.not_before <= now && now < v.not_after)
            .map(|(c, _)| c.clone())
    }

    /// Why [`Store::current`] has nothing.
    pub fn why_none(&self) -> String {
        let s = self.inner.lock().expect("never poisoned");
        match (&s.creds, s.why_none.is_empty()) {
            (Some(_), _) => "its certificate expired".into(),
            (None, true) => "the certificate request has not started".into(),
            (None, false) => s.why_none.clone(),
        }
    }

    fn set(&self, creds: Credentials, validity: Validity) {
        let mut s = self.inner.lock().expect("never poisoned");
        s.creds = Some((creds, validity));
        s.why_none.clear();
    }

    fn set_why(&self, why: String) {
        self.inner.lock().expect("never poisoned").why_none = why;
    }
}

/// A certificate's validity, in seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// When to renew: once less than a third of the lifetime is left.
    pub fn renew_at(&self) -> i64 {
        self.not_after - (self.not_after - self.not_before) / 3
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Keeps this node's certificate current, forever.
pub async fn run(agent: Arc<Agent>) {
    let dir = agent.sup.node().state_dir.join(DIR);
    loop {
        let wait = match step(&agent, &dir).await {
            Ok(next) => next,
            Err(e) => {
                warn!(node = %agent.node, error = %e, "no migration certificate yet");
                agent.certs.set_why(e.to_string());
                if matches!(e, CertError::Denied { .. }) {
                    Duration::from_secs(60)
                } else {
                    Duration::from_secs(2)
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One look: keep the certificate on disk if it is good, otherwise get a new one.
/// Returns how long to wait before the next look.
async fn step(agent: &Agent, dir: &Path) -> Result<Duration, CertError> {
    let ca = read_ca(agent).await?;
    std::fs::create_dir_all(dir).map_err(io("creating the certificate dir", dir))?;
    let now = unix_now();
    if let Some((creds, validity)) = load(dir, &ca)? {
        if now < validity.renew_at() {
            agent.certs.set(creds, validity);
            let left = (validity.renew_at() - now).max(1) as u64;
            return Ok(Duration::from_secs(left.min(60)));
        }
        // Still usable while its successor is requested.
        if now < validity.not_after {
            agent.certs.set(creds, validity);
        }
    }
    let (creds, validity) = request(agent, dir, &ca).await?;
    info!(node = %agent.node, not_after = validity.not_after, "migration certificate issued");
    agent.certs.set(creds, validity);
    Ok(Duration::from_secs(1))
}

async fn read_ca(agent: &Agent) -> Result<String, CertError> {
    let maps: Api<ConfigMap> = Api::namespaced(agent.client.clone(), &agent.namespace);
    let map = maps
        .get_opt(CA_NAME)
        .await
        .map_err(|source| CertError::Kube {
            what: format!("reading ConfigMap {CA_NAME}"),
            source,
        })?;
    map.and_then(|m| m.data)
        .and_then(|d| d.get(CA_CERT_KEY).cloned())
        .ok_or_else(|| CertError::NoCa("not published yet (the operator creates it)".into()))
}

fn io(what: &'static str, dir: &Path) -> impl FnOnce(std::io::Error) -> CertError {
    let dir = dir.to_path_buf();
    move |source| CertError::Io { what, dir, source }
}

/// The key and certificate on disk, if they exist, belong together and were signed by
/// `ca`.
fn load(dir: &Path, ca: &str) -> Result<Option<(Credentials, Validity)>, CertError> {
    let (Ok(key), Ok(cert)) = (
        std::fs::read_to_string(dir.join(KEY)),
        std::fs::read_to_string(dir.join(CERT)),
    ) else {
        return Ok(None);
    };
    match check(&cert, &key, ca) {
        Ok(v) => Ok(Some((
            Credentials {
                ca: ca.to_string(),
                cert,
                key,
            },
            v,
        ))),
        Err(why) => {
            info!(%why, "the stored migration certificate is replaced");
            Ok(None)
        }
    }
}

/// Checks `cert` is for `key` and signed by `ca`; returns its validity.
pub fn check(cert: &str, key: &str, ca: &str) -> Result<Validity, String> {
    let key = KeyPair::from_pem(key).map_err(|e| format!("key: {e}"))?;
    let (_, cert_pem) =
        x509_parser::pem::parse_x509_pem(cert.as_bytes()).map_err(|e| format!("{e}"))?;
    let cert = cert_pem.parse_x509().map_err(|e| format!("{e}"))?;
    let (_, ca_pem) =
        x509_parser::pem::parse_x509_pem(ca.as_bytes()).map_err(|e| format!("CA: {e}"))?;
    let ca = ca_pem.parse_x509().map_err(|e| format!("CA: {e}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the certificate is not for this node's key".into());
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| "not signed by the current CA".to_string())?;
    Ok(Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The request an agent files: the node profile the operator issues.
pub fn request_pem(node: &str, key: &KeyPair) -> Result<String, rcgen::Error> {
    ferry_runtime::node_cert_params(node)?
        .serialize_request(key)?
        .pem()
}

fn write_private(path: &Path, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(data.as_bytes())?;
    std::fs::rename(&tmp, path)
}

/// Files (or finds again, after a restart) the CSR for the pending key and waits for it.
async fn request(
    agent: &Agent,
    dir: &Path,
    ca: &str,
) -> Result<(Credentials, Validity), CertError> {
    let pending = dir.join(PENDING_KEY);
    let key_pem = match std::fs::read_to_string(&pending) {
        Ok(k) => k,
        Err(_) => {
            let key = KeyPair::generate().map_err(|e| CertError::Bad(e.to_string()))?;
            let pem = key.serialize_pem();
            write_private(&pending, &pem).map_err(io("writing the new key", dir))?;
            pem
        }
    };
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::Bad(e.to_string()))?;
    let hash = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let name = ferry_crds::tls::csr_name(&agent.node, &hex);
    let api: Api<CertificateSigningRequest> = Api::all(agent.client.clone());
    let kube = |what: &str| {
        let what = format!("{what} CSR {name}");
        move |source| CertError::Kube { what, source }
    };
    if api.get_opt(&name).await.map_err(kube("reading"))?.is_none() {
        let pem = request_pem(&agent.node, &key).map_err(|e| CertError::Bad(e.to_string()))?;
        let csr = CertificateSigningRequest {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(pem.into_bytes()),
                signer_name: SIGNER_NAME.into(),
                usages: Some(USAGES.iter().map(|u| u.to_string()).collect()),
                expiration_seconds: Some(NODE_CERT_LIFETIME_SECONDS as i32),
                ..Default::default()
            },
            status: None,
        };
        match api.create(&PostParams::default(), &csr).await {
            Ok(_) => info!(node = %agent.node, csr = %name, "asked for a migration certificate"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(kube("creating")(e)),
        }
    }
    let deadline = tokio::time::Instant::now() + ISSUE_WAIT;
    loop {
        let csr = api.get(&name).await.map_err(kube("reading"))?;
        let status = csr.status.unwrap_or_default();
        if let Some(c) = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            // The next request starts from a new key (and so a new CSR).
            let _ = std::fs::remove_file(&pending);
            return Err(CertError::Denied {
                name,
                reason: c.reason.unwrap_or_default(),
                message: c.message.unwrap_or_default(),
            });
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            let cert = String::from_utf8_lossy(&cert.0).into_owned();
            let validity = check(&cert, &key_pem, ca).map_err(CertError::Bad)?;
            write_private(&dir.join(KEY), &key_pem).map_err(io("writing the key", dir))?;
            std::fs::write(dir.join(CERT), &cert).map_err(io("writing the certificate", dir))?;
            std::fs::write(dir.join(CA), ca).map_err(io("writing the CA", dir))?;
            let _ = std::fs::remove_file(&pending);
            return Ok((
                Credentials {
                    ca: ca.to_string(),
                    cert,
                    key: key_pem,
                },
                validity,
            ));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CertError::NotIssued(name));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::CertificateParams;

    #[test]
    fn renewal_starts_with_a_third_of_the_life_left() {
        let v = Validity {
            not_before: 0,
            not_after: 3000,
        };
        assert_eq!(v.renew_at(), 2000);
    }

    #[test]
    fn a_certificate_is_checked_against_key_and_ca() {
        use rcgen::{BasicConstraints, IsCa, Issuer};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let req =
            rcgen::CertificateSigningRequestParams::from_pem(&request_pem("node-a", &key).unwrap())
                .unwrap();
        assert_eq!(
            req.params.subject_alt_names,
            vec![rcgen::SanType::DnsName("node-a".try_into().unwrap())]
        );
        let cert = req.signed_by(&issuer).unwrap().pem();
        let v = check(&cert, &key.serialize_pem(), &ca_pem).unwrap();
        assert!(v.not_after > v.not_before);
        let other = KeyPair::generate().unwrap();
        assert!(
            check(&cert, &other.serialize_pem(), &ca_pem)
                .unwrap_err()
                .contains("key")
        );
        let other_ca = CertificateParams::default()
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        assert!(
            check(&cert, &key.serialize_pem(), &other_ca)
                .unwrap_err()
                .contains("CA")
        );
    }
}

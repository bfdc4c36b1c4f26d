//! The Kubernetes side of the migration certificate signer ([`crate::signer`]): keeps
//! the cluster CA in the Secret `ferry-ca` (created when missing) and publishes its
//! certificate in the ConfigMap `ferry-ca` (key `ca.crt`) for the agents; watches the
//! CertificateSigningRequests for `ferry.dev/migration`, approves or denies each through
//! its `/approval` subresource and writes the certificate of an approved one into its
//! `/status` (the kube-apiserver checks the operator may `approve` and `sign` for this
//! signer). Only the leader runs it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::signer::{self, Ca, SIGNER_NAME};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestStatus,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

pub use ferry_crds::tls::{CA_CERT_KEY, CA_NAME};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("Kubernetes API, {what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error("Secret {CA_NAME}: {0}")]
    BadSecret(String),
    #[error(transparent)]
    Signer(#[from] signer::SignerError),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CertsError {
    let what = what.into();
    move |source| CertsError::Kube { what, source }
}

/// Loads the CA from its Secret, creating it on first start, and makes sure the
/// ConfigMap shows its certificate.
pub async fn ensure_ca(client: &Client, namespace: &str) -> Result<Ca, CertsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca = match secrets
        .get_opt(CA_NAME)
        .await
        .map_err(kube_err("reading the CA Secret"))?
    {
        Some(s) => load(&s)?,
        None => {
            let ca = Ca::generate(time::OffsetDateTime::now_utc())?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(CA_NAME.into()),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(BTreeMap::from([
                    (
                        "tls.crt".into(),
                        ByteString(ca.cert_pem.clone().into_bytes()),
                    ),
                    (
                        "tls.key".into(),
                        ByteString(ca.key_pem.clone().into_bytes()),
                    ),
                ])),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    info!(namespace, "created the migration CA (Secret {CA_NAME})");
                    ca
                }
                // Another replica was quicker: use its CA.
                Err(kube::Error::Api(e)) if e.code == 409 => load(
                    &secrets
                        .get(CA_NAME)
                        .await
                        .map_err(kube_err("reading the CA Secret"))?,
                )?,
                Err(e) => return Err(kube_err("creating the CA Secret")(e)),
            }
        }
    };
    publish(client, namespace, &ca.cert_pem).await?;
    Ok(ca)
}

fn load(s: &Secret) -> Result<Ca, CertsError> {
    let field = |k: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| CertsError::BadSecret(format!("no {k}")))
    };
    Ok(Ca::load(&field("tls.crt")?, &field("tls.key")?)?)
}

async fn publish(client: &Client, namespace: &str, cert_pem: &str) -> Result<(), CertsError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let want = BTreeMap::from([(CA_CERT_KEY.to_string(), cert_pem.to_string())]);
    match maps
        .get_opt(CA_NAME)
        .await
        .map_err(kube_err("reading the CA ConfigMap"))?
    {
        Some(m) if m.data.as_ref() == Some(&want) => Ok(()),
        Some(_) => {
            let patch = Patch::Merge(ConfigMap {
                data: Some(want),
                ..Default::default()
            });
            maps.patch(CA_NAME, &PatchParams::default(), &patch)
                .await
                .map_err(kube_err("updating the CA ConfigMap"))?;
            Ok(())
        }
        None => {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(CA_NAME.into()),
                    ..Default::default()
                },
                data: Some(want),
                ..Default::default()
            };
            match maps.create(&PostParams::default(), &map).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(kube_err("creating the CA ConfigMap")(e)),
            }
        }
    }
}

/// Watches the CSRs for [`SIGNER_NAME`] (through `watches`) and handles each new or
/// changed one (through `client`), forever.
pub async fn run(client: Client, watches: Client, ca: Arc<Ca>, agent_user: String) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    let mut stream = watcher(Api::all(watches), config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(ev) = stream.next().await {
        let csr = match ev {
            Ok(csr) => csr,
            Err(e) => {
                warn!(error = %e, "watching CertificateSigningRequests");
                continue;
            }
        };
        for attempt in 1..=3 {
            match handle(&api, &ca, &agent_user, &csr).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(csr = %csr.name_any(), attempt, error = %e, "handling the CSR");
                    tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                }
            }
        }
    }
}

fn has_condition(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

async fn handle(
    api: &Api<CertificateSigningRequest>,
    ca: &Ca,
    agent_user: &str,
    seen: &CertificateSigningRequest,
) -> Result<(), CertsError> {
    let name = seen.name_any();
    // The event may be older than our own last write (approved, certificate not yet
    // seen): act on the request as it is now, since a certificate is written only once.
    let Some(csr) = api
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("reading CSR {name}")))?
    else {
        return Ok(());
    };
    let csr = &csr;
    if csr.spec.signer_name != SIGNER_NAME
        || has_condition(csr, "Denied")
        || has_condition(csr, "Failed")
        || csr
            .status
            .as_ref()
            .and_then(|s| s.certificate.as_ref())
            .is_some_and(|c| !c.0.is_empty())
    {
        return Ok(());
    }
    let approved = match signer::review(&csr.spec, agent_user) {
        Ok(a) => a,
        Err(denial) => {
            warn!(csr = %name, reason = denial.reason, message = %denial.message, "denying");
            if !has_condition(csr, "Approved") {
                set_approval(api, &name, "Denied", denial.reason, &denial.message).await?;
            }
            return Ok(());
        }
    };
    if !has_condition(csr, "Approved") {
        let message = format!(
            "the agent of node {} asks for its own node certificate",
            approved.node
        );
        set_approval(api, &name, "Approved", "AgentNodeIdentity", &message).await?;
    }
    let pem = ca.issue(
        &approved,
        time::OffsetDateTime::now_utc(),
        signer::lifetime(&csr.spec),
    )?;
    let issued = StatusOnly {
        status: CertificateSigningRequestStatus {
            certificate: Some(ByteString(pem.into_bytes())),
            ..Default::default()
        },
    };
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&issued))
        .await
        .map_err(kube_err(format!("writing the certificate of CSR {name}")))?;
    info!(csr = %name, node = %approved.node, "issued a node certificate");
    Ok(())
}

/// A patch of an object's status alone (a CSR's `status` or `approval` subresource).
#[derive(serde::Serialize, Debug)]
struct StatusOnly<T> {
    status: T,
}

async fn set_approval(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    kind: &str,
    reason: &str,
    message: &str,
) -> Result<(), CertsError> {
    let decided = StatusOnly {
        status: CertificateSigningRequestStatus {
            conditions: Some(vec![CertificateSigningRequestCondition {
                type_: kind.to_string(),
                status: "True".into(),
                reason: Some(reason.to_string()),
                message: Some(message.to_string()),
                last_update_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
                ..Default::default()
            }]),
            ..Default::default()
        },
    };
    api.patch_approval(name, &PatchParams::default(), &Patch::Merge(&decided))
        .await
        .map_err(kube_err(format!("{kind} on CSR {name}")))?;
    Ok(())
}

//! The source's side of the peer API: one HTTPS call to the target agent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_agent::tls::Credentials;
use http_body_util::{BodyExt, Full, Limited};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::wire::{self, PeerRequest, PeerStep};

/// Connecting, the TLS handshake and the answer's headers must each come within this;
/// the phase itself may take longer (the answer's body waits for it).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read: a cookie and a message.
const MAX_ANSWER_BYTES: usize = 128 * 1024;

/// Why a call to the target agent did not give a step.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("node {node} publishes no peer endpoint (annotation {annotation} on Lease {lease})")]
    NoEndpoint {
        node: String,
        lease: String,
        annotation: &'static str,
    },
    #[error("reading Lease {lease}: {source}")]
    Lease {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("TLS material: {0}")]
    Tls(#[from] wire::TlsError),
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS handshake with {node} at {endpoint}: {source}")]
    Handshake {
        node: String,
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{node} at {endpoint} did not answer within {0:?}", CONNECT_TIMEOUT)]
    Timeout { node: String, endpoint: String },
    #[error("HTTP with {node}: {source}")]
    Http {
        node: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{node} answered {status}: {message}")]
    Refused {
        node: String,
        status: StatusCode,
        message: String,
    },
    #[error("{node} answered something that is not a step: {0}", .message)]
    BadAnswer { node: String, message: String },
}

impl CallError {
    /// Whether calling again may help: the target agent may be restarting, or have
    /// not seen the phase yet. A refusal of who we are, or of the request, will not
    /// change.
    pub fn retryable(&self) -> bool {
        match self {
            CallError::Refused { status, .. } => {
                *status == StatusCode::CONFLICT || status.is_server_error()
            }
            CallError::Tls(_) | CallError::BadAnswer { .. } => false,
            _ => true,
        }
    }
}

/// Where `node`'s agent serves the peer API, from its heartbeat Lease.
pub async fn endpoint(leases: &Api<Lease>, node: &str) -> Result<String, CallError> {
    let lease = ferry_crds::node_lease_name(node);
    let found = leases
        .get_opt(&lease)
        .await
        .map_err(|source| CallError::Lease {
            lease: lease.clone(),
            source,
        })?;
    found
        .and_then(|l| l.metadata.annotations)
        .and_then(|a| {
            a.get(ferry_crds::sequence::PEER_ENDPOINT_ANNOTATION)
                .cloned()
        })
        .ok_or(CallError::NoEndpoint {
            node: node.to_string(),
            lease,
            annotation: ferry_crds::sequence::PEER_ENDPOINT_ANNOTATION,
        })
}

/// Source, in Confirm: asks the target's Finish of `m` once more, for its result. Finish
/// is idempotent: one that ended answers with its record; one that committed and was
/// cut short (its agent restarted) goes on until the guest runs there.
pub async fn ask_finish_again(
    agent: &crate::k8s::Agent,
    m: &ferry_crds::VirtualMachineMigration,
) -> Result<PeerStep, String> {
    let target = m
        .status
        .as_ref()
        .and_then(|s| s.target_node.clone())
        .unwrap_or_default();
    let creds = agent.certs.current().ok_or_else(|| {
        format!(
            "node {} has no migration certificate for the peer API yet ({})",
            agent.node,
            agent.certs.why_none()
        )
    })?;
    let leases: Api<Lease> = Api::namespaced(agent.client.clone(), &agent.namespace);
    let endpoint = endpoint(&leases, &target)
        .await
        .map_err(|e| e.to_string())?;
    call(
        &creds,
        &target,
        &endpoint,
        wire::FINISH_PATH,
        &PeerRequest::of(m),
    )
    .await
    .map_err(|e| e.to_string())
}

/// A mutually authenticated connection to `node`'s agent at `endpoint`: it must show a
/// certificate of the migration CA naming `node`; this node shows its own.
pub async fn connect(
    creds: &Credentials,
    node: &str,
    endpoint: &str,
) -> Result<TlsStream<TcpStream>, CallError> {
    let connector = TlsConnector::from(Arc::new(wire::client_config(creds)?));
    let name = ServerName::try_from(node.to_string()).map_err(|e| CallError::BadAnswer {
        node: node.to_string(),
        message: format!("{node} is not a DNS name: {e}"),
    })?;
    let timeout = || CallError::Timeout {
        node: node.to_string(),
        endpoint: endpoint.to_string(),
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint))
        .await
        .map_err(|_| timeout())?
        .map_err(|source| CallError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| timeout())?
        .map_err(|source| CallError::Handshake {
            node: node.to_string(),
            endpoint: endpoint.to_string(),
            source,
        })
}

/// POSTs `request` to `path` of `node`'s agent at `endpoint`, which must show a
/// certificate of the migration CA naming `node`; this node shows its own.
pub async fn call(
    creds: &Credentials,
    node: &str,
    endpoint: &str,
    path: &str,
    request: &PeerRequest,
) -> Result<PeerStep, CallError> {
    let tls = connect(creds, node, endpoint).await?;
    let http = |source| CallError::Http {
        node: node.to_string(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(http)?;
    let conn = tokio::spawn(conn);
    let body = serde_json::to_vec(request).expect("a request always serializes");
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, node)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request");
    let answer = sender.send_request(req).await.map_err(http);
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            conn.abort();
            return Err(e);
        }
    };
    let status = answer.status();
    let bytes = Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| CallError::BadAnswer {
            node: node.to_string(),
            message: e.to_string(),
        });
    conn.abort();
    let bytes = bytes?;
    if status != StatusCode::OK {
        return Err(CallError::Refused {
            node: node.to_string(),
            status,
            message: String::from_utf8_lossy(&bytes).chars().take(1024).collect(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| CallError::BadAnswer {
        node: node.to_string(),
        message: e.to_string(),
    })
}

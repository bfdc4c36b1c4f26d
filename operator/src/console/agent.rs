//! The console proxy's call to a node's agent: mutual TLS on the peer API with the
//! proxy's certificate, then an HTTP/1.1 upgrade to a byte stream joined to the
//! guest's VNC socket.

use std::sync::Arc;
use std::time::Duration;

use ferry_crds::console::agent_path;
use http::{StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::ConsoleError;
use crate::signer::Issued;

/// The `Upgrade` protocol of a console on the peer API (the agent's side names it too).
pub const UPGRADE: &str = "ferry-console";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `node`'s agent serves the peer API, from its heartbeat Lease.
pub async fn endpoint(leases: &Api<Lease>, node: &str) -> Result<String, ConsoleError> {
    let name = ferry_crds::node_lease_name(node);
    let lease = leases
        .get_opt(&name)
        .await
        .map_err(|source| ConsoleError::Kube {
            what: format!("reading Lease {name}"),
            source,
        })?;
    lease
        .and_then(|l| l.metadata.annotations)
        .and_then(|a| {
            a.get(ferry_crds::sequence::PEER_ENDPOINT_ANNOTATION)
                .cloned()
        })
        .ok_or_else(|| ConsoleError::NoAgent {
            node: node.to_string(),
        })
}

/// Opens the console of `namespace/vm` on `node`'s agent at `endpoint`: the agent must
/// show a certificate of the migration CA (`ca_pem`) naming `node`.
pub async fn open(
    ca_pem: &str,
    proxy: &Issued,
    node: &str,
    endpoint: &str,
    namespace: &str,
    vm: &str,
) -> Result<TokioIo<Upgraded>, ConsoleError> {
    let tls = |message: String| ConsoleError::Agent {
        node: node.to_string(),
        message,
    };
    let connector = TlsConnector::from(Arc::new(client_config(ca_pem, proxy).map_err(tls)?));
    let name =
        ServerName::try_from(node.to_string()).map_err(|e| tls(format!("not a DNS name: {e}")))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint))
        .await
        .map_err(|_| {
            tls(format!(
                "{endpoint} did not answer within {CONNECT_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| tls(format!("connecting to {endpoint}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| tls(format!("TLS handshake with {endpoint} timed out")))?
        .map_err(|e| tls(format!("TLS handshake with {endpoint}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| tls(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let request = http::Request::get(agent_path(namespace, vm))
        .header(header::HOST, node)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE)
        .body(Empty::<bytes::Bytes>::new())
        .expect("a valid request");
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| tls(e.to_string()))?;
    if answer.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = answer.status();
        let body = Limited::new(answer.into_body(), 4096)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(ConsoleError::Refused {
            node: node.to_string(),
            status,
            message: body,
        });
    }
    let upgraded = hyper::upgrade::on(answer)
        .await
        .map_err(|e| tls(format!("upgrading: {e}")))?;
    Ok(TokioIo::new(upgraded))
}

fn client_config(ca_pem: &str, proxy: &Issued) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("migration CA: {e}"))?;
        roots.add(cert).map_err(|e| format!("migration CA: {e}"))?;
    }
    let chain = CertificateDer::pem_slice_iter(proxy.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("console proxy certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(proxy.key_pem.as_bytes())
        .map_err(|e| format!("console proxy key: {e}"))?;
    ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())
}

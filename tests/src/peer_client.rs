//! A client of an agent's peer API (peer-to-peer migrations): HTTPS over TLS 1.3 with a
//! node's migration certificate, or with none, written against the wire so that the
//! tests see exactly what the agent answers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::NAMESPACE;

#[derive(Debug, thiserror::Error)]
pub enum PeerClientError {
    #[error("reading {what} from {path}: {source}")]
    Pem {
        what: &'static str,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{what} with {addr}: {source}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("not an HTTP response from {addr}: {text:?}")]
    NotHttp { addr: SocketAddr, text: String },
}

/// The peer endpoint `node`'s agent publishes on its heartbeat Lease, if it has.
pub async fn endpoint(client: &Client, node: &str) -> Option<SocketAddr> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let lease = leases.get(&format!("ferry-node-{node}")).await.ok()?;
    lease
        .metadata
        .annotations?
        .get(ferry_crds::sequence::PEER_ENDPOINT_ANNOTATION)?
        .parse()
        .ok()
}

/// A TLS 1.3 client trusting the migration CA in `<state_dir>/tls/ca.crt`, presenting
/// that node's certificate (`node.crt`, `node.key`) when `with_certificate`.
pub struct PeerClient {
    config: Arc<rustls::ClientConfig>,
}

impl PeerClient {
    pub fn for_node(state_dir: &Path, with_certificate: bool) -> Result<Self, PeerClientError> {
        let tls = state_dir.join("tls");
        let pem_err = |what, path: &Path| {
            let path = path.display().to_string();
            move |source| PeerClientError::Pem { what, path, source }
        };
        let ca_path = tls.join("ca.crt");
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&ca_path).map_err(pem_err("the CA", &ca_path))? {
            roots.add(ca.map_err(pem_err("the CA", &ca_path))?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let config = if with_certificate {
            let crt_path = tls.join("node.crt");
            let key_path = tls.join("node.key");
            let chain = CertificateDer::pem_file_iter(&crt_path)
                .map_err(pem_err("the certificate", &crt_path))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_err("the certificate", &crt_path))?;
            let key =
                PrivateKeyDer::from_pem_file(&key_path).map_err(pem_err("the key", &key_path))?;
            builder.with_client_auth_cert(chain, key)?
        } else {
            builder.with_no_client_auth()
        };
        Ok(PeerClient {
            config: Arc::new(config),
        })
    }

    /// POSTs `body` (JSON) to `path` at `addr`, whose certificate must name `server`;
    /// returns the status code and the body as text. HTTP/1.1 with `Connection: close`,
    /// so the response ends with the connection.
    pub async fn post(
        &self,
        addr: SocketAddr,
        server: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, String), PeerClientError> {
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        self.exchange(addr, server, &request).await
    }

    /// GETs `path` at `addr` asking for an upgrade to `upgrade` (the console), whose
    /// certificate must name `server`; returns the status code and the body of a refusal.
    pub async fn get_upgrade(
        &self,
        addr: SocketAddr,
        server: &str,
        path: &str,
        upgrade: &str,
    ) -> Result<(u16, String), PeerClientError> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: upgrade, close\r\n\
             Upgrade: {upgrade}\r\n\r\n"
        );
        self.exchange(addr, server, &request).await
    }

    /// Sends `request` and reads the answer to the connection's end.
    async fn exchange(
        &self,
        addr: SocketAddr,
        server: &str,
        request: &str,
    ) -> Result<(u16, String), PeerClientError> {
        let io = |what| move |source| PeerClientError::Io { what, addr, source };
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(io("connecting"))?;
        let name = ServerName::try_from(server.to_string()).map_err(|_| PeerClientError::Io {
            what: "naming the server",
            addr,
            source: std::io::Error::other(format!("{server} is not a server name")),
        })?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(io("the TLS handshake"))?;
        tls.write_all(request.as_bytes())
            .await
            .map_err(io("sending the request"))?;
        let mut response = Vec::new();
        match tls.read_to_end(&mut response).await {
            Ok(_) => {}
            // A server that upgrades connections (the console route) may close one it
            // refused without TLS's close_notify; the answer is whole by then.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(e) => return Err(io("reading the response")(e)),
        }
        let text = String::from_utf8_lossy(&response).into_owned();
        let not_http = || PeerClientError::NotHttp {
            addr,
            text: text.clone(),
        };
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .ok_or_else(not_http)?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .ok_or_else(not_http)?;
        Ok((status, body))
    }
}

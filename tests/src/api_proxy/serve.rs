//! The proxy's server: accepts TLS connections, and for each serves HTTP/1.1 with hyper,
//! forwarding every request over a TLS connection of its own to the apiserver (opened
//! when needed, so that a connection cut or reset on one side is cut on the other too),
//! unless a rule of [`Control`] takes it. Responses stream as they come.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{ApiRequest, Control, FaultKind, Injection, ProxyError, classify};

/// How long a TLS handshake or a connection to the apiserver may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers of one hop only, not forwarded.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

type Body = Either<Incoming, Full<Bytes>>;

/// Where to forward and the TLS of both sides.
pub(super) struct Config {
    upstream: SocketAddr,
    server_name: ServerName<'static>,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl Config {
    pub(super) fn new(
        upstream: &str,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Config, ProxyError> {
        let bad = || ProxyError::Upstream(upstream.to_string());
        let uri: http::Uri = upstream.parse().map_err(|_| bad())?;
        let ip: IpAddr = uri.host().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let port = uri.port_u16().ok_or_else(bad)?;
        if uri.scheme_str() != Some("https") {
            return Err(bad());
        }
        let pem = |what| move |source| ProxyError::Pem { what, source };
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem("the serving certificate"))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem("the serving key"))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];

        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(ca.map_err(pem("the apiserver's CA"))?)?;
        }
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];

        Ok(Config {
            upstream: SocketAddr::new(ip, port),
            server_name: ServerName::IpAddress(ip.into()),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// What every connection's task shares.
struct Shared {
    config: Config,
    control: Arc<Control>,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
    /// Dropped (with the [`Server`]) to stop everything.
    stop: watch::Receiver<()>,
    forwarded: AtomicUsize,
}

/// The accept loop's handle; dropping it stops the loop and every connection.
pub(super) struct Server {
    shared: Arc<Shared>,
    _stop: watch::Sender<()>,
}

impl Server {
    /// Binds 127.0.0.1:<free port> and serves on `rt`.
    pub(super) fn start(
        rt: &tokio::runtime::Runtime,
        config: Config,
        control: Arc<Control>,
    ) -> Result<(SocketAddr, Server), ProxyError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = {
            let _in_rt = rt.enter();
            TcpListener::from_std(listener)?
        };
        let (stop_tx, stop) = watch::channel(());
        let shared = Arc::new(Shared {
            config,
            control,
            cut: watch::channel(0).0,
            stop,
            forwarded: AtomicUsize::new(0),
        });
        rt.spawn(accept_loop(shared.clone(), listener));
        Ok((
            addr,
            Server {
                shared,
                _stop: stop_tx,
            },
        ))
    }

    /// Cuts every open connection.
    pub(super) fn cut_all(&self) {
        self.shared.cut.send_modify(|epoch| *epoch += 1);
    }

    pub(super) fn forwarded(&self) -> usize {
        self.shared.forwarded.load(Ordering::Relaxed)
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut stop = shared.stop.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((tcp, _)) = accepted else {
            // Out of descriptors, say: try again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Every close by the proxy is a reset, as a cut path or a dead peer looks.
        let _ = tcp.set_zero_linger();
        if shared.control.partitioned() {
            shared.control.count(FaultKind::PartitionRefused);
            drop(tcp);
            continue;
        }
        tokio::spawn(connection(shared.clone(), tcp));
    }
}

/// One client connection and the apiserver connection behind it.
#[derive(Default)]
struct Conn {
    /// Notified to reset the client connection (a rule's reset or hang, a lost upstream).
    kill: Notify,
    upstream: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
    upstream_task: Mutex<Option<JoinHandle<()>>>,
}

impl Conn {
    fn reset(&self) {
        self.kill.notify_one();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(task) = self.upstream_task.lock().expect("not poisoned").take() {
            task.abort();
        }
    }
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream) {
    let mut cut = shared.cut.subscribe();
    let mut stop = shared.stop.clone();
    let tls =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, shared.config.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            _ => return,
        };
    let conn = Arc::new(Conn::default());
    let service = {
        let (shared, conn) = (shared.clone(), conn.clone());
        hyper::service::service_fn(move |req| handle(shared.clone(), conn.clone(), req))
    };
    let serving =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        _ = serving => {}
        _ = cut.changed() => {
            if shared.control.partitioned() {
                shared.control.count(FaultKind::PartitionCut);
            }
        }
        _ = conn.kill.notified() => {}
        _ = stop.changed() => {}
    }
    // Dropping the served connection closes the client's socket (a reset); the
    // apiserver's side goes with `conn`.
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let request = classify(req.method().as_str(), req.uri().path(), req.uri().query());
    if let Some(request) = request
        && let Some(injection) = shared.control.take(&request)
    {
        tracing::debug!(%request, ?injection, "fault proxy: injecting");
        return match injection {
            Injection::Conflict => Ok(status(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {:?}: the object has been modified; \
                     please apply your changes to the latest version and try again",
                    request.resource,
                    request.name.clone().unwrap_or_default()
                ),
                &request,
                None,
            )),
            Injection::ServerError => Ok(status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "Internal error occurred: injected by the test fault proxy".into(),
                &request,
                None,
            )),
            Injection::TooManyRequests {
                retry_after_seconds,
            } => Ok(status(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Too many requests, please try again later.".into(),
                &request,
                Some(retry_after_seconds),
            )),
            Injection::Hang(period) => {
                tokio::time::sleep(period).await;
                conn.reset();
                std::future::pending().await
            }
            Injection::Reset => {
                conn.reset();
                std::future::pending().await
            }
        };
    }
    match forward(&shared, &conn, req).await {
        Ok(response) => Ok(response),
        Err(e) => {
            // The apiserver is unreachable or dropped the request: the client sees its
            // connection go, as it would talking to the apiserver itself.
            tracing::debug!(error = %e, "fault proxy: forwarding failed");
            conn.reset();
            std::future::pending().await
        }
    }
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("connecting to the apiserver: {0}")]
    Connect(#[from] std::io::Error),
    #[error("connecting to the apiserver: timed out")]
    Timeout(#[from] tokio::time::error::Elapsed),
    #[error("HTTP with the apiserver: {0}")]
    Http(#[from] hyper::Error),
}

async fn forward(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
) -> Result<Response<Body>, ForwardError> {
    let mut upstream = conn.upstream.lock().await;
    let usable = match upstream.as_mut() {
        Some(sender) if !sender.is_closed() => sender.ready().await.is_ok(),
        _ => false,
    };
    if !usable {
        *upstream = Some(connect(shared, conn).await?);
    }
    let sender = upstream.as_mut().expect("connected just above");
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(&shared.config.upstream.to_string()) {
        parts.headers.insert(header::HOST, host);
    }
    parts.version = http::Version::HTTP_11;
    let response = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    drop(upstream);
    shared.forwarded.fetch_add(1, Ordering::Relaxed);
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Either::Left(body)))
}

/// A new TLS connection to the apiserver, its driver running until `conn` goes.
async fn connect(shared: &Shared, conn: &Conn) -> Result<SendRequest<Incoming>, ForwardError> {
    let config = &shared.config;
    let tcp =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(config.upstream)).await??;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        config.connector.connect(config.server_name.clone(), tcp),
    )
    .await??;
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    let task = tokio::spawn(async move {
        let _ = driver.await;
    });
    if let Some(old) = conn
        .upstream_task
        .lock()
        .expect("not poisoned")
        .replace(task)
    {
        old.abort();
    }
    Ok(sender)
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A `Status` answer, as the apiserver writes one.
fn status(
    code: StatusCode,
    reason: &str,
    message: String,
    request: &ApiRequest,
    retry_after_seconds: Option<u64>,
) -> Response<Body> {
    let kind = request.resource.split('/').next().unwrap_or_default();
    let mut details = serde_json::json!({"kind": kind});
    if let Some(name) = &request.name {
        details["name"] = name.as_str().into();
    }
    if let Some(seconds) = retry_after_seconds {
        details["retryAfterSeconds"] = seconds.into();
    }
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code.as_u16(),
    });
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = retry_after_seconds {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

//! The console API server: HTTPS for the apiserver's aggregator only (its front-proxy
//! certificate is required), the discovery documents, and the console itself — a
//! WebSocket joined to the agent's console stream once the apiserver has said the
//! caller may open it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_crds::VirtualMachine;
use ferry_crds::console::{self as wire, DATA_IN, DATA_OUT, ERROR, GROUP, VERSION};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::Api;
use kube::api::PostParams;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, info_span, warn};

use super::access::{self, FrontProxy};
use super::{Console, ConsoleError, agent};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the console API on `listener` until the process ends.
pub async fn serve(console: Arc<Console>, listener: TcpListener) {
    let app = Router::new()
        .route(
            "/apis",
            get(|| async { json(StatusCode::OK, &access::groups()) }),
        )
        .route(
            &format!("/apis/{GROUP}"),
            get(|| async { json(StatusCode::OK, &access::group()) }),
        )
        .route(
            &format!("/apis/{GROUP}/{VERSION}"),
            get(|| async { json(StatusCode::OK, &access::resources()) }),
        )
        .route(
            &format!(
                "/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{}/{{vm}}/{}",
                wire::RESOURCE,
                wire::SUBRESOURCE
            ),
            get(open),
        )
        .with_state(console.clone());
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "console API: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (config, front) = match console.tls() {
            Ok(c) => c,
            Err(e) => {
                warn!(%from, error = %e, "console API: not ready; connection refused");
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(config);
        let app = app.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    warn!(%from, error = %e, "console API: TLS handshake refused");
                    return;
                }
                Err(_) => {
                    warn!(%from, "console API: TLS handshake timed out");
                    return;
                }
            };
            let cn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| super::common_name(c.as_ref()));
            if let Err(e) = front.allows(cn.as_deref()) {
                warn!(%from, error = %e, "console API: connection refused");
                return;
            }
            let service = TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                info!(%from, error = %e, "console API: connection");
            }
        });
    }
}

fn json<T: Serialize>(code: StatusCode, body: &T) -> Response {
    let body = serde_json::to_vec(body).expect("a discovery document serializes");
    (code, [("content-type", "application/json")], body).into_response()
}

fn failure(status: Status) -> Response {
    let code = status
        .code
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(code, &status)
}

async fn open(
    State(console): State<Arc<Console>>,
    Path((namespace, vm)): Path<(String, String)>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let span = info_span!("console", vm = %vm, namespace = %namespace);
    async move {
        let front: FrontProxy = match console.tls() {
            Ok((_, f)) => f,
            Err(e) => return failure(e.status()),
        };
        let user = match front.user(&headers) {
            Ok(u) => u,
            Err(e) => return failure(access::status(401, "Unauthorized", e.to_string())),
        };
        let span = info_span!("user", user = %user.name);
        async move {
            let reviews: Api<SubjectAccessReview> = Api::all(console.client.clone());
            let review = reviews
                .create(
                    &PostParams::default(),
                    &access::review(&user, &namespace, &vm),
                )
                .await;
            let review = match review {
                Ok(r) => r.status.unwrap_or_default(),
                Err(source) => {
                    let e = ConsoleError::Kube {
                        what: "asking the apiserver (SubjectAccessReview)".into(),
                        source,
                    };
                    return failure(e.status());
                }
            };
            if !review.allowed {
                info!(
                    reason = review.reason.as_deref().unwrap_or(""),
                    "refused by the apiserver"
                );
                return failure(access::forbidden(
                    &user,
                    &namespace,
                    &vm,
                    review.reason.as_deref(),
                ));
            }
            let upgrade = match upgrade {
                Ok(u) => u,
                Err(e) => {
                    return failure(access::status(
                        400,
                        "BadRequest",
                        format!("a console is a WebSocket ({e})"),
                    ));
                }
            };
            let stream = match connect(&console, &namespace, &vm).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "console not opened");
                    return failure(e.status());
                }
            };
            info!("console open");
            upgrade
                .protocols([wire::PROTOCOL_V5, wire::PROTOCOL_V4])
                .on_upgrade(move |ws| bridge(ws, stream).in_current_span())
        }
        .instrument(span)
        .await
    }
    .instrument(span)
    .await
}

/// Finds the VM's node and opens the console on its agent.
async fn connect(
    console: &Console,
    namespace: &str,
    vm: &str,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, ConsoleError> {
    let vms: Api<VirtualMachine> = Api::namespaced(console.client.clone(), namespace);
    let found = vms
        .get_opt(vm)
        .await
        .map_err(|source| ConsoleError::Kube {
            what: format!("reading VirtualMachine {namespace}/{vm}"),
            source,
        })?
        .ok_or_else(|| ConsoleError::NoVm {
            namespace: namespace.into(),
            vm: vm.into(),
        })?;
    let node = found
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConsoleError::NotRunning {
            namespace: namespace.into(),
            vm: vm.into(),
        })?;
    let leases: Api<Lease> = Api::namespaced(console.client.clone(), &console.namespace);
    let endpoint = agent::endpoint(&leases, &node).await?;
    let (ca, proxy) = console.proxy_identity()?;
    agent::open(&ca, &proxy, &node, &endpoint, namespace, vm).await
}

/// Carries the viewer's bytes to the guest and the guest's back, until either ends.
async fn bridge<S>(ws: WebSocket, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut to_viewer, mut from_viewer) = ws.split();
    let (mut from_guest, mut to_guest) = tokio::io::split(stream);
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        tokio::select! {
            m = from_viewer.next() => match m {
                Some(Ok(Message::Binary(m))) => {
                    if let Some((DATA_IN, data)) = wire::unframe(&m)
                        && let Err(e) = to_guest.write_all(data).await
                    {
                        break format!("writing to the guest's console: {e}");
                    }
                }
                Some(Ok(Message::Close(_))) | None => break String::new(),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("the viewer's stream: {e}"),
            },
            n = from_guest.read(&mut buf) => match n {
                Ok(0) => break "the guest's console closed".to_string(),
                Ok(n) => {
                    let m = wire::frame(DATA_OUT, &buf[..n]);
                    if to_viewer.send(Message::Binary(m.into())).await.is_err() {
                        break String::new();
                    }
                }
                Err(e) => break format!("reading the guest's console: {e}"),
            },
        }
    };
    if !end.is_empty() {
        info!(why = %end, "console ended");
        let status = access::status(500, "InternalError", end);
        let body = serde_json::to_vec(&status).expect("a Status serializes");
        let _ = to_viewer
            .send(Message::Binary(wire::frame(ERROR, &body).into()))
            .await;
    } else {
        info!("console closed by the viewer");
    }
    let _ = to_viewer.send(Message::Close(None)).await;
    let _ = to_guest.shutdown().await;
}

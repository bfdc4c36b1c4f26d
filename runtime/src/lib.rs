//! What the operator and the agent binaries share at run time, so each is written once:
//! the logging set-up ([`init_tracing`]), the probes and metrics server ([`serve`]) and
//! the node certificate profile ([`node_cert_params`]), and the apiserver clients
//! ([`api::ApiClients`]); and the test-only fault hook ([`fault`]).

pub mod api;
pub mod fault;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose,
};

/// Logs to standard error, filtered by `RUST_LOG` or else by `default_filter` (an
/// `EnvFilter` directive such as `info`), in colour only on a terminal.
pub fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
}

/// Renders the process's metrics in the OpenMetrics text format.
pub type Encode = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct Shared {
    encode: Encode,
    ready: Arc<AtomicBool>,
}

/// The probes and metrics: `/metrics` (what `encode` renders), `/healthz` (200 while
/// the process serves) and `/readyz` (200 once `ready` is true, 503 before).
pub fn router(encode: Encode, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Shared { encode, ready })
}

/// Serves [`router`] on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    encode: Encode,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, encode, ready).await
}

/// Serves [`router`] on a listener already bound (so a port the system picks for
/// another listener afterwards can never be this one).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    encode: Encode,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(encode, ready)).await
}

async fn metrics_text(State(s): State<Shared>) -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        (s.encode)(),
    )
}

async fn readyz(State(s): State<Shared>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// The certificate profile of a node: subject `CN=<node>`, SAN `DNS:<node>`, key usages
/// digital signature and key encipherment, extended usages server and client auth
/// (`ferry_crds::tls::USAGES`). Agents request it, the operator issues it.
pub fn node_cert_params(node: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(vec![node.to_string()])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_only_once_told_and_metrics_as_encoded() {
        let ready = Arc::new(AtomicBool::new(false));
        let encode: Encode = Arc::new(|| "# EOF\n".to_string());
        let r = router(encode, ready.clone());
        assert_eq!(get(r.clone(), "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(r.clone(), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get(r.clone(), "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(r, "/metrics").await, (StatusCode::OK, "# EOF\n".into()));
    }

    #[test]
    fn the_node_profile_names_the_node_once() {
        let p = node_cert_params("node-a").unwrap();
        assert_eq!(p.subject_alt_names.len(), 1);
        assert_eq!(p.extended_key_usages.len(), 2);
    }
}

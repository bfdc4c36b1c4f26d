//! The target's side of the peer API: Prepare and Finish of a peer-to-peer migration,
//! asked by its source agent over mutual TLS (and, routed here too, the connections of a
//! tunnelled stream, [`super::tunnel`], and consoles, [`super::console`]).
//!
//! Every call is checked against the migration as the API server has it: it must be a
//! peer-to-peer migration (the uid the caller names) whose target is this node, whose
//! source is the node the caller's certificate names, and which is in the phase called.
//! The phase then runs exactly as a managed one would (`phase::execute`), with the
//! cookies the caller handed over; the answer is the step, which the source records.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use ferry_agent::fault;
use ferry_crds::{ControlMode, MigrationPhase, VirtualMachineMigration};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, info_span, warn};

use super::wire::{
    self, CONSOLE_ROUTE, FINISH_PATH, MAX_REQUEST_BYTES, PREPARE_PATH, PeerRequest, PeerStep,
    TUNNEL_ROUTE,
};
use crate::k8s::Agent;
use crate::k8s::phase::{self, Inputs};
use crate::k8s::tasks::Task;

/// A TLS handshake must end within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The subject (CN) of the caller's verified certificate: a node, or the operator's
/// console proxy ([`super::console`]).
#[derive(Clone, Debug)]
pub struct Caller(pub String);

/// Serves the peer API on `listener` until the process ends. The TLS configuration is
/// built for each connection from the node's current certificate (it is renewed).
pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    let app = Router::new()
        .route(PREPARE_PATH, post(prepare))
        .route(FINISH_PATH, post(finish))
        .route(CONSOLE_ROUTE, get(super::console::open))
        .route(TUNNEL_ROUTE, get(super::tunnel::carry_in))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(agent.clone());
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "peer API: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(creds) = agent.certs.current() else {
            warn!(%from, why = %agent.certs.why_none(), "peer API: no certificate yet; connection refused");
            continue;
        };
        let config = match wire::server_config(&creds) {
            Ok(c) => c,
            Err(e) => {
                warn!(%from, error = %e, "peer API: TLS configuration");
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let app = app.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    warn!(%from, error = %e, "peer API: TLS handshake refused");
                    return;
                }
                Err(_) => {
                    warn!(%from, "peer API: TLS handshake timed out");
                    return;
                }
            };
            let caller = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(wire::node_of);
            let Some(caller) = caller else {
                warn!(%from, "peer API: the client certificate names no node");
                return;
            };
            let service = TowerToHyperService::new(app.layer(Extension(Caller(caller))));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                warn!(%from, error = %e, "peer API: connection");
            }
        });
    }
}

async fn prepare(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    handle(agent, caller, MigrationPhase::Prepare, body).await
}

async fn finish(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    handle(agent, caller, MigrationPhase::Finish, body).await
}

/// Why a call is refused: the HTTP status and a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

pub(super) fn refuse(status: StatusCode, message: String) -> Refusal {
    Refusal { status, message }
}

/// Refuses `request` unless it asks to be upgraded to `protocol` (for `what`, e.g. "a
/// console").
pub(super) fn check_upgrade(
    request: &axum::extract::Request,
    protocol: &str,
    what: &str,
) -> Result<(), Refusal> {
    let asks = request
        .headers()
        .get(axum::http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(protocol.as_bytes()));
    if asks {
        Ok(())
    } else {
        Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("{what} needs 'Upgrade: {protocol}'"),
        ))
    }
}

/// The answer that hands the connection over to `protocol`.
pub(super) fn switching_protocols(protocol: &str) -> Response {
    use axum::http::header;
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, protocol)
        .body(axum::body::Body::empty())
        .expect("a valid response")
}

/// Whether `caller` may have this node (`me`) run `phase` of `m` for `request`.
pub fn admit(
    m: &VirtualMachineMigration,
    request: &PeerRequest,
    phase: MigrationPhase,
    me: &str,
    caller: &str,
) -> Result<(), Refusal> {
    let name = format!("{}/{}", request.namespace, request.name);
    let status = m.status.clone().unwrap_or_default();
    check_parties(m, &name, &request.uid, me, caller)?;
    if m.spec.mode != ControlMode::PeerToPeer {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("migration {name} is not peer-to-peer: its phases come through its status"),
        ));
    }
    // Finish is asked again during Confirm by a source that has no result of it yet.
    let asked_again =
        phase == MigrationPhase::Finish && status.phase == Some(MigrationPhase::Confirm);
    if status.phase != Some(phase) && !asked_again {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("migration {name} is in {:?}, not {phase:?}", status.phase),
        ));
    }
    Ok(())
}

/// Whether `caller` is the source of `m` (named `name`), `uid` is its uid and this node
/// (`me`) its target.
pub(super) fn check_parties(
    m: &VirtualMachineMigration,
    name: &str,
    uid: &str,
    me: &str,
    caller: &str,
) -> Result<(), Refusal> {
    let status = m.status.clone().unwrap_or_default();
    let source = status.source_node.as_deref().unwrap_or("");
    let target = status.target_node.as_deref().unwrap_or("");
    if caller != source {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!("node {caller} is not the source ({source}) of migration {name}"),
        ));
    }
    if m.uid().as_deref() != Some(uid) {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!(
                "migration {name} has uid {}, not {uid}",
                m.uid().unwrap_or_default(),
            ),
        ));
    }
    if target != me {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("migration {name} targets {target}, not {me}"),
        ));
    }
    Ok(())
}

/// What the phase takes: the inputs handed over in the call, not the status's copy.
fn inputs_of(request: &PeerRequest) -> Inputs {
    Inputs {
        cancelled: request.cancelled,
        target_domain_xml: request.target_domain_xml.clone(),
        migration_uri: None,
        cookies: ferry_crds::Cookies {
            begin: request.begin_cookie.clone(),
            perform: request.perform_cookie.clone(),
            ..Default::default()
        },
    }
}

async fn handle(agent: Arc<Agent>, caller: Caller, phase: MigrationPhase, body: Bytes) -> Response {
    let request: PeerRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("not a peer request: {e}")).into_response();
        }
    };
    let span = info_span!("peer", migration = %request.name, namespace = %request.namespace,
        caller = %caller.0, phase = phase.key());
    async move {
        let api: Api<VirtualMachineMigration> =
            Api::namespaced(agent.client.clone(), &request.namespace);
        let m = match api.get_opt(&request.name).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return (
                    StatusCode::NOT_FOUND,
                    format!("no migration {}/{}", request.namespace, request.name),
                )
                    .into_response();
            }
            Err(e) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading the migration: {e}"),
                )
                    .into_response();
            }
        };
        if let Err(r) = admit(&m, &request, phase, &agent.node, &caller.0) {
            warn!(message = %r.message, "refused");
            return (r.status, r.message).into_response();
        }
        let span = info_span!("phase", vm = %m.spec.vm_name);
        let Some(running) = agent.tasks.start(&request.uid, Task::Phase(phase)) else {
            return (
                StatusCode::CONFLICT,
                format!("{phase:?} of this migration is already running here; ask again"),
            )
                .into_response();
        };
        let start = MicroTime(Timestamp::now());
        let inputs = inputs_of(&request);
        // The phase runs in a task of its own: a caller that goes away (its agent
        // restarted) must not cut a phase short; it calls again and finds it done.
        let task = {
            let agent = agent.clone();
            tokio::spawn(
                async move {
                    info!("running for the source");
                    let done = phase::execute(&agent, &m, phase, inputs, &running.cancel).await;
                    fault::pause(&format!("during-{}", phase.key())).await;
                    drop(running);
                    done
                }
                .instrument(span),
            )
        };
        let report = match task.await {
            Ok(report) => report,
            Err(e) => {
                phase::Report {
                    outcome: ferry_crds::StepOutcome::Failed,
                    reason: ferry_crds::Reason::Invalid,
                    message: format!("{phase:?} ended abnormally: {e}"),
                    outputs: Default::default(),
                }
            }
        };
        agent.metrics.phase_done(phase, report.outcome);
        info!(outcome = ?report.outcome, reason = %report.reason, message = %report.message, "answered");
        let step = PeerStep {
            outcome: report.outcome,
            reason: Some(report.reason),
            message: report.message,
            start,
            end: MicroTime(Timestamp::now()),
            outputs: report.outputs,
        };
        (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&step).expect("a step always serializes"),
        )
            .into_response()
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(mode: &str, phase: &str) -> VirtualMachineMigration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": "m", "namespace": "default", "uid": "u1"},
            "spec": {"vmName": "demo", "mode": mode},
            "status": {"phase": phase, "sourceNode": "node-a", "targetNode": "node-b"},
        }))
        .unwrap()
    }

    fn request(uid: &str) -> PeerRequest {
        PeerRequest {
            namespace: "default".into(),
            name: "m".into(),
            uid: uid.into(),
            cancelled: false,
            begin_cookie: Some("<cookie/>".into()),
            target_domain_xml: Some("<domain/>".into()),
            perform_cookie: None,
        }
    }

    #[test]
    fn only_the_source_may_call_for_the_phase_it_is_in() {
        let m = migration("PeerToPeer", "Prepare");
        let p = MigrationPhase::Prepare;
        assert_eq!(admit(&m, &request("u1"), p, "node-b", "node-a"), Ok(()));
        let r = admit(&m, &request("u1"), p, "node-b", "node-c").unwrap_err();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(
            r.message.contains("node-c is not the source (node-a)"),
            "{}",
            r.message
        );
        // A call for the right migration, to the wrong node or phase, or an older uid.
        for (m, req, me, phase) in [
            (m.clone(), request("u1"), "node-c", p),
            (m.clone(), request("u0"), "node-b", p),
            (m.clone(), request("u1"), "node-b", MigrationPhase::Finish),
            (migration("Managed", "Prepare"), request("u1"), "node-b", p),
        ] {
            let r = admit(&m, &req, phase, me, "node-a").unwrap_err();
            assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.message);
        }
    }

    #[test]
    fn finish_may_be_asked_again_while_the_source_confirms() {
        let finish = MigrationPhase::Finish;
        let confirming = migration("PeerToPeer", "Confirm");
        assert_eq!(
            admit(&confirming, &request("u1"), finish, "node-b", "node-a"),
            Ok(())
        );
        // Prepare is not; nor is Finish once the migration ended.
        let r = admit(
            &confirming,
            &request("u1"),
            MigrationPhase::Prepare,
            "node-b",
            "node-a",
        );
        assert_eq!(r.unwrap_err().status, StatusCode::CONFLICT);
        let ended = migration("PeerToPeer", "Succeeded");
        let r = admit(&ended, &request("u1"), finish, "node-b", "node-a");
        assert_eq!(r.unwrap_err().status, StatusCode::CONFLICT);
    }

    #[test]
    fn an_upgrade_is_only_to_the_protocol_named() {
        let with = |value: Option<&str>| {
            let mut r = axum::http::Request::get("/v1/tunnel/ns/m/u1");
            if let Some(v) = value {
                r = r.header(axum::http::header::UPGRADE, v);
            }
            r.body(axum::body::Body::empty()).unwrap()
        };
        assert_eq!(
            check_upgrade(&with(Some("ferry-tunnel")), "ferry-tunnel", "a tunnel"),
            Ok(())
        );
        assert_eq!(
            check_upgrade(&with(Some("Ferry-Tunnel")), "ferry-tunnel", "a tunnel"),
            Ok(())
        );
        for other in [None, Some("ferry-console"), Some("websocket")] {
            let r = check_upgrade(&with(other), "ferry-tunnel", "a tunnel").unwrap_err();
            assert_eq!(r.status, StatusCode::BAD_REQUEST);
            assert_eq!(r.message, "a tunnel needs 'Upgrade: ferry-tunnel'");
        }
        let answer = switching_protocols("ferry-tunnel");
        assert_eq!(answer.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            answer.headers()[axum::http::header::UPGRADE],
            "ferry-tunnel"
        );
    }

    #[test]
    fn the_phase_takes_the_inputs_handed_over() {
        let mut req = request("u1");
        req.perform_cookie = Some("<perform/>".into());
        req.cancelled = true;
        let inputs = inputs_of(&req);
        assert!(inputs.cancelled);
        assert_eq!(inputs.cookies.perform.as_deref(), Some("<perform/>"));
        assert_eq!(inputs.cookies.begin.as_deref(), Some("<cookie/>"));
        assert_eq!(inputs.target_domain_xml.as_deref(), Some("<domain/>"));
    }
}

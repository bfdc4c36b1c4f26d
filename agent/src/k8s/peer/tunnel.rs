//! A tunnelled migration stream (`spec.transport.mode: Tunnelled`, [`ferry_agent::stream`]):
//! the agents carry it over their peer API, so that only the agents' peer port need be
//! open between the nodes and neither QEMU touches the network.
//!
//! - On the source, [`Tunnel`] listens on the guest's tunnel socket; the source QEMU
//!   connects there once per channel (the main stream, each multifd channel, the
//!   post-copy preempt channel, a recovered post-copy stream). For each connection the
//!   agent opens one of its own to the target agent (mutual TLS with the node
//!   certificates, the target's checked for the target node's name), asks for
//!   [`wire::tunnel_path`] with `Upgrade: ferry-tunnel`, and joins the two.
//! - On the target, [`carry_in`] answers only the migration's source node, for a
//!   tunnelled migration of that uid whose target is this node, in Perform; it joins the
//!   upgraded connection to the incoming QEMU's socket in the state dir of the guest the
//!   migration's target definition names. The socket's path comes from the guest's key,
//!   never from the request.
//!
//! The carried connections outlive the [`Tunnel`] that accepted them: when the source
//! QEMU reports the migration completed, the tail of its stream may still be on its way.
//! Each ends when either end closes it; an agent restart cuts them (a pre-copy migration
//! then fails and rolls back, a post-copy one pauses and is recovered).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Extension, Path as RoutePath, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ferry_agent::domain::Domain;
use ferry_agent::node::guest_key;
use ferry_agent::postcopy::TargetReport;
use ferry_agent::stream;
use ferry_agent::tls::Credentials;
use ferry_crds::{TransportMode, VirtualMachineMigration};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use kube::{Api, ResourceExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use super::client::{self, CONNECT_TIMEOUT, CallError};
use super::server::{Caller, Refusal, check_parties, check_upgrade, refuse, switching_protocols};
use super::wire::TUNNEL_UPGRADE;
use crate::k8s::Agent;
use crate::k8s::metrics::TunnelCounters;

/// Each direction of a carried connection copies through a buffer this large.
const BUFFER_BYTES: usize = 256 * 1024;
/// The largest refusal read from the target.
const MAX_REFUSAL_BYTES: usize = 16 * 1024;

/// Why the source could not open its end of a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "migration URI '{0}' is not tunnel:<host>:<port>: Prepare did not listen for a \
         tunnelled stream"
    )]
    NotTunnelled(String),
    #[error("listening on the tunnel socket {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the source's tunnel connections go.
pub struct Route {
    /// This node's credentials, shown to the target agent.
    pub creds: Credentials,
    /// The target node: its agent must show a certificate naming it.
    pub target: String,
    /// [`super::wire::tunnel_path`] of the migration.
    pub path: String,
    /// The migration URI Prepare gave (`tunnel:<endpoint>`).
    pub uri: String,
    /// What the target reports meanwhile: after a cut in post-copy, where it listens
    /// again (`status.recoveryURI`).
    pub reports: watch::Receiver<TargetReport>,
    pub counters: TunnelCounters,
}

impl Route {
    /// The endpoint a new connection goes to: where the target says it listens again,
    /// else the migration URI's.
    fn endpoint(&self) -> Option<String> {
        let report = self.reports.borrow();
        report
            .listens_at
            .as_deref()
            .and_then(stream::tunnel_endpoint)
            .or_else(|| stream::tunnel_endpoint(&self.uri))
            .map(str::to_string)
    }
}

/// The source's end of a tunnel: listens on the guest's tunnel socket until dropped.
pub struct Tunnel {
    socket: PathBuf,
    accept: JoinHandle<()>,
}

impl Tunnel {
    /// Listens on the tunnel socket of the guest whose state dir is `dir`, carrying each
    /// connection along `route`.
    pub fn open(dir: &Path, route: Route) -> Result<Tunnel, TunnelError> {
        if stream::tunnel_endpoint(&route.uri).is_none() {
            return Err(TunnelError::NotTunnelled(route.uri));
        }
        let socket = stream::tunnel_socket(dir);
        // A socket left by an agent that was killed mid-Perform.
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(|source| TunnelError::Listen {
            path: socket.display().to_string(),
            source,
        })?;
        let route = Arc::new(route);
        let accept = tokio::spawn(
            async move {
                loop {
                    let qemu = match listener.accept().await {
                        Ok((qemu, _)) => qemu,
                        Err(e) => {
                            warn!(error = %e, "tunnel: accept");
                            return;
                        }
                    };
                    tokio::spawn(carry_out(qemu, route.clone()).in_current_span());
                }
            }
            .in_current_span(),
        );
        Ok(Tunnel { socket, accept })
    }

    /// The URI the source QEMU is sent to.
    pub fn uri(&self) -> String {
        stream::unix_uri(&self.socket)
    }
}

impl Drop for Tunnel {
    /// Stops accepting; the connections carried go on until their ends close them.
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Carries one connection of the source QEMU to the target agent.
async fn carry_out(mut qemu: UnixStream, route: Arc<Route>) {
    let Some(endpoint) = route.endpoint() else {
        warn!("tunnel: no target endpoint; the connection is closed");
        return;
    };
    let mut peer = match dial(&route, &endpoint).await {
        Ok(p) => p,
        Err(e) => {
            // Closing QEMU's connection fails its migration (or pauses a post-copy).
            warn!(%endpoint, error = %e, "tunnel: the target agent did not take the connection");
            return;
        }
    };
    route.counters.opened("source");
    info!(%endpoint, "tunnel: connection carried to the target");
    let carried = join(&mut qemu, &mut peer).await;
    route.counters.carried("source", carried);
}

/// A connection of the tunnel to the target agent at `endpoint`.
async fn dial(
    route: &Route,
    endpoint: &str,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, CallError> {
    let node = route.target.as_str();
    let tls = client::connect(&route.creds, node, endpoint).await?;
    let http = |source| CallError::Http {
        node: node.to_string(),
        source,
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(http)?;
    tokio::spawn(conn.with_upgrades());
    let request = hyper::Request::get(&route.path)
        .header(header::HOST, node)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TUNNEL_UPGRADE)
        .body(Empty::new())
        .expect("a valid request");
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| CallError::Timeout {
            node: node.to_string(),
            endpoint: endpoint.to_string(),
        })?
        .map_err(http)?;
    let status = answer.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let message = Limited::new(answer.into_body(), MAX_REFUSAL_BYTES)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(CallError::Refused {
            node: node.to_string(),
            status,
            message,
        });
    }
    let upgraded = hyper::upgrade::on(answer).await.map_err(http)?;
    Ok(TokioIo::new(upgraded))
}

/// Copies between `a` and `b` until both directions ended; the bytes carried.
async fn join<A, B>(a: &mut A, b: &mut B) -> u64
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER_BYTES, BUFFER_BYTES).await {
        Ok((ab, ba)) => {
            info!(out = ab, back = ba, "tunnel: connection ended");
            ab + ba
        }
        Err(e) => {
            // A cut stream: QEMU on this side sees its connection close.
            warn!(error = %e, "tunnel: connection cut");
            0
        }
    }
}

/// The key of the incoming guest a tunnel connection of `m` reaches on this node (`me`),
/// if `caller` may open one for the migration of uid `uid`.
pub fn admit(
    m: &VirtualMachineMigration,
    uid: &str,
    me: &str,
    caller: &str,
) -> Result<String, Refusal> {
    let namespace = m.namespace().unwrap_or_default();
    let name = format!("{namespace}/{}", m.name_any());
    check_parties(m, &name, uid, me, caller)?;
    if m.spec.transport.mode != TransportMode::Tunnelled {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!(
                "migration {name} is not tunnelled (transport.mode {:?}): its stream goes \
                 QEMU to QEMU",
                m.spec.transport.mode
            ),
        ));
    }
    let status = m.status.clone().unwrap_or_default();
    if !m.stream_runs() {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!(
                "migration {name} is in {:?}, where no stream runs (only Perform, and Finish \
                 and Confirm after a switch to post-copy)",
                status.phase
            ),
        ));
    }
    let domain = status
        .target_domain_xml
        .as_deref()
        .ok_or_else(|| format!("migration {name} has no target definition"))
        .and_then(|xml| {
            Domain::parse(xml).map_err(|e| format!("migration {name}: its target definition: {e}"))
        })
        .map_err(|message| refuse(StatusCode::CONFLICT, message))?;
    Ok(guest_key(&namespace, &m.spec.vm_name, domain.uuid))
}

/// `GET /v1/tunnel/{namespace}/{migration}/{uid}` with `Upgrade: ferry-tunnel`: joins
/// the connection to the incoming QEMU (the module's doc).
pub async fn carry_in(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    RoutePath((namespace, name, uid)): RoutePath<(String, String, String)>,
    mut request: Request,
) -> Response {
    let span = info_span!("tunnel", migration = %name, namespace = %namespace, caller = %caller.0);
    async move {
        if let Err(r) = check_upgrade(&request, TUNNEL_UPGRADE, "a tunnel") {
            return refused(r);
        }
        let api: Api<VirtualMachineMigration> = Api::namespaced(agent.client.clone(), &namespace);
        let m = match api.get_opt(&name).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return refused(refuse(
                    StatusCode::NOT_FOUND,
                    format!("no migration {namespace}/{name}"),
                ));
            }
            Err(e) => {
                return refused(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading migration {namespace}/{name}: {e}"),
                ));
            }
        };
        let key = match admit(&m, &uid, &agent.node, &caller.0) {
            Ok(k) => k,
            Err(r) => return refused(r),
        };
        let vm = m.spec.vm_name.clone();
        if agent.sup.running_pid(&key).is_none() {
            return refused(refuse(
                StatusCode::CONFLICT,
                format!("no incoming QEMU of VirtualMachine {namespace}/{vm} runs here"),
            ));
        }
        let socket = stream::incoming_socket(&agent.sup.vm_dir(&key));
        let mut qemu = match UnixStream::connect(&socket).await {
            Ok(s) => s,
            Err(e) => {
                return refused(refuse(
                    StatusCode::CONFLICT,
                    format!(
                        "the incoming QEMU of VirtualMachine {namespace}/{vm} does not \
                         listen for a tunnelled stream: {e}"
                    ),
                ));
            }
        };
        let upgrade = hyper::upgrade::on(&mut request);
        let counters = agent.metrics.tunnel();
        tokio::spawn(
            async move {
                let mut peer = match upgrade.await {
                    Ok(u) => TokioIo::new(u),
                    Err(e) => {
                        warn!(error = %e, "tunnel: the connection was not upgraded");
                        return;
                    }
                };
                counters.opened("target");
                info!("tunnel: connection carried to the incoming QEMU");
                let carried = join(&mut peer, &mut qemu).await;
                counters.carried("target", carried);
            }
            .instrument(info_span!("tunnel-in", vm = %vm)),
        );
        switching_protocols(TUNNEL_UPGRADE)
    }
    .instrument(span)
    .await
}

fn refused(r: Refusal) -> Response {
    warn!(message = %r.message, "tunnel refused");
    (r.status, r.message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'><name>web</name>\
        <uuid>5f0e5fa4-3c3b-4cbb-9f2a-0e5a3b1f6c10</uuid><memory unit='MiB'>64</memory>\
        <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>";

    fn migration(transport: &str, phase: &str) -> VirtualMachineMigration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": "m", "namespace": "tenant-a", "uid": "u1"},
            "spec": {"vmName": "web", "transport": {"mode": transport}},
            "status": {"phase": phase, "sourceNode": "node-a", "targetNode": "node-b",
                       "targetDomainXML": XML},
        }))
        .unwrap()
    }

    #[test]
    fn the_source_reaches_the_incoming_guest_of_the_migration_it_performs() {
        let m = migration("Tunnelled", "Perform");
        let key = admit(&m, "u1", "node-b", "node-a").unwrap();
        let uuid = Domain::parse(XML).unwrap().uuid;
        assert_eq!(key, guest_key("tenant-a", "web", uuid));
    }

    #[test]
    fn after_a_switch_to_post_copy_the_tail_may_reconnect_in_finish_and_confirm() {
        for phase in ["Finish", "Confirm"] {
            let mut m = migration("Tunnelled", phase);
            m.status.as_mut().unwrap().progress = Some(ferry_crds::Progress {
                mode: Some(ferry_crds::MigrationMode::PostCopyPaused),
                ..Default::default()
            });
            assert!(admit(&m, "u1", "node-b", "node-a").is_ok(), "{phase}");
            m.status.as_mut().unwrap().cancelled = true;
            assert!(
                admit(&m, "u1", "node-b", "node-a").is_err(),
                "{phase}: rolled back"
            );
        }
    }

    #[test]
    fn anyone_else_or_at_another_time_is_refused() {
        let m = migration("Tunnelled", "Perform");
        let r = admit(&m, "u1", "node-b", "node-c").unwrap_err();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(
            r.message.contains("node-c is not the source (node-a)"),
            "{}",
            r.message
        );
        for (m, uid, me, why) in [
            (m.clone(), "u0", "node-b", "has uid u1, not u0"),
            (m.clone(), "u1", "node-c", "targets node-b, not node-c"),
            (
                migration("Direct", "Perform"),
                "u1",
                "node-b",
                "is not tunnelled",
            ),
            (
                migration("Tunnelled", "Prepare"),
                "u1",
                "node-b",
                "where no stream runs",
            ),
            (
                migration("Tunnelled", "Finish"),
                "u1",
                "node-b",
                "where no stream runs",
            ),
        ] {
            let r = admit(&m, uid, me, "node-a").unwrap_err();
            assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.message);
            assert!(r.message.contains(why), "{why}: {}", r.message);
        }
    }

    #[test]
    fn a_new_connection_follows_where_the_target_listens_again() {
        let (tx, reports) = watch::channel(TargetReport::default());
        let route = Route {
            creds: Credentials {
                ca: String::new(),
                cert: String::new(),
                key: String::new(),
            },
            target: "node-b".into(),
            path: super::super::wire::tunnel_path("tenant-a", "m", "u1"),
            uri: "tunnel:10.0.0.2:7443".into(),
            reports,
            counters: TunnelCounters::default(),
        };
        assert_eq!(route.path, "/v1/tunnel/tenant-a/m/u1");
        assert_eq!(route.endpoint().as_deref(), Some("10.0.0.2:7443"));
        tx.send_modify(|r| r.listens_at = Some("tunnel:10.0.0.9:7443".into()));
        assert_eq!(route.endpoint().as_deref(), Some("10.0.0.9:7443"));
        // A direct URI is no endpoint of a tunnel.
        tx.send_modify(|r| r.listens_at = Some("tcp:10.0.0.9:4444".into()));
        assert_eq!(route.endpoint().as_deref(), Some("10.0.0.2:7443"));
    }
}

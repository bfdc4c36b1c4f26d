//! The node's side of a console (docs/protocol.md, "Consoles"): the operator's console
//! proxy, having checked with the apiserver that its caller may open the console of a
//! VM, asks the agent of the VM's node for it over the peer API. The agent answers
//! only a client whose certificate is the proxy's ([`ferry_crds::console::PROXY_IDENTITY`],
//! signed by the migration CA), only for a VM whose guest runs here, and then joins the
//! upgraded connection to the guest's VNC socket in its state dir. The socket's path
//! comes from the guest's key, never from the request or a status.

use std::sync::Arc;

use axum::extract::{Extension, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_agent::cmdline::vnc_socket;
use ferry_agent::domain::Domain;
use ferry_agent::node::guest_key;
use ferry_crds::VirtualMachine;
use ferry_crds::console::PROXY_IDENTITY;
use hyper_util::rt::TokioIo;
use kube::Api;
use tokio::net::UnixStream;
use tracing::{Instrument, info, info_span, warn};

use super::server::{Caller, Refusal, check_upgrade, refuse, switching_protocols};
use crate::k8s::Agent;

/// The `Upgrade` protocol of a console connection on the peer API.
pub const UPGRADE: &str = "ferry-console";

/// The guest key of `vm`'s guest if it is meant to run on node `me` now, else why not.
pub fn locate(vm: &VirtualMachine, me: &str) -> Result<String, Refusal> {
    let namespace = vm.metadata.namespace.as_deref().unwrap_or_default();
    let name = vm.metadata.name.as_deref().unwrap_or_default();
    let status = vm.status.clone().unwrap_or_default();
    let node = status.node_name.as_deref().unwrap_or("");
    if node != me {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("VirtualMachine {namespace}/{name} runs on node '{node}', not on {me}"),
        ));
    }
    let xml = status.domain_xml.as_deref().unwrap_or(&vm.spec.domain_xml);
    let domain = Domain::parse(xml).map_err(|e| {
        refuse(
            StatusCode::CONFLICT,
            format!("VirtualMachine {namespace}/{name}: its definition does not parse: {e}"),
        )
    })?;
    Ok(guest_key(namespace, name, domain.uuid))
}

/// `GET /v1/console/{namespace}/{vm}` with `Upgrade: ferry-console`.
pub async fn open(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    Path((namespace, name)): Path<(String, String)>,
    mut request: Request,
) -> Response {
    let span = info_span!("console", vm = %name, namespace = %namespace, caller = %caller.0);
    async move {
        if caller.0 != PROXY_IDENTITY {
            warn!("refused: not the console proxy");
            return refused(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "'{}' is not the console proxy: consoles open only through the apiserver",
                    caller.0
                ),
            ));
        }
        if let Err(r) = check_upgrade(&request, UPGRADE, "a console") {
            return refused(r);
        }
        let vms: Api<VirtualMachine> = Api::namespaced(agent.client.clone(), &namespace);
        let vm = match vms.get_opt(&name).await {
            Ok(Some(vm)) => vm,
            Ok(None) => {
                return refused(refuse(
                    StatusCode::NOT_FOUND,
                    format!("no VirtualMachine {namespace}/{name}"),
                ));
            }
            Err(e) => {
                return refused(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading VirtualMachine {namespace}/{name}: {e}"),
                ));
            }
        };
        let key = match locate(&vm, &agent.node) {
            Ok(k) => k,
            Err(r) => return refused(r),
        };
        if agent.sup.running_pid(&key).is_none() {
            return refused(refuse(
                StatusCode::CONFLICT,
                format!(
                    "the guest of VirtualMachine {namespace}/{name} is not running on {}",
                    agent.node
                ),
            ));
        }
        let socket = vnc_socket(&agent.sup.vm_dir(&key));
        let vnc = match UnixStream::connect(&socket).await {
            Ok(s) => s,
            Err(e) => {
                return refused(refuse(
                    StatusCode::CONFLICT,
                    format!("VirtualMachine {namespace}/{name} has no VNC console here: {e}"),
                ));
            }
        };
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(
            async move {
                let upgraded = match upgrade.await {
                    Ok(u) => u,
                    Err(e) => {
                        warn!(error = %e, "the connection was not upgraded");
                        return;
                    }
                };
                info!("console open");
                let (mut client, mut vnc) = (TokioIo::new(upgraded), vnc);
                match tokio::io::copy_bidirectional(&mut client, &mut vnc).await {
                    Ok((up, down)) => info!(to_guest = up, from_guest = down, "console closed"),
                    Err(e) => info!(error = %e, "console closed"),
                }
            }
            .in_current_span(),
        );
        switching_protocols(UPGRADE)
    }
    .instrument(span)
    .await
}

fn refused(r: Refusal) -> Response {
    warn!(message = %r.message, "console refused");
    (r.status, r.message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::{VirtualMachineSpec, VirtualMachineStatus};

    const XML: &str = "<domain type='kvm'><name>web</name>\
        <uuid>5f0e5fa4-3c3b-4cbb-9f2a-0e5a3b1f6c10</uuid><memory unit='MiB'>64</memory>\
        <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>\
        <devices><graphics type='vnc' autoport='yes'/></devices></domain>";

    fn vm(node: Option<&str>) -> VirtualMachine {
        let mut vm = VirtualMachine::new(
            "web",
            VirtualMachineSpec {
                domain_xml: XML.into(),
                node_name: "node-a".into(),
                running: true,
                restore_from: None,
                termination_grace_period_seconds: None,
            },
        );
        vm.metadata.namespace = Some("tenant-a".into());
        vm.status = Some(VirtualMachineStatus {
            node_name: node.map(str::to_string),
            ..Default::default()
        });
        vm
    }

    #[test]
    fn a_guest_here_is_found_by_its_key() {
        let key = locate(&vm(Some("node-a")), "node-a").unwrap();
        let uuid = Domain::parse(XML).unwrap().uuid;
        assert_eq!(key, guest_key("tenant-a", "web", uuid));
    }

    #[test]
    fn a_guest_elsewhere_or_nowhere_is_refused_naming_its_node() {
        let r = locate(&vm(Some("node-b")), "node-a").unwrap_err();
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert!(
            r.message.contains("runs on node 'node-b', not on node-a"),
            "{}",
            r.message
        );
        assert!(locate(&vm(None), "node-a").is_err());
    }
}

//! Prepare (target): refuses a migration to its own host, starts QEMU paused with
//! `-incoming defer` from the target definition, applies the target side of the migration
//! [`Policy`] (events, multifd channels and compression, post-copy) and, with `tls`, the
//! node's certificate with only the source node's certificate accepted
//! ([`tls`](crate::tls)), and listens with `migrate-incoming`: on this node's address
//! (direct), or on the guest's incoming socket (tunnelled, [`crate::stream`]). Any
//! failure removes the new QEMU.

use crate::cookie::{Cookie, Expect};
use crate::domain::Domain;
use crate::error::{Ctx, ErrorKind, PhaseError};
use crate::phases::{MigrationRecord, Phase, check_vm_name};
use crate::policy::{Policy, Side};
use crate::qmp::{MigrationInfo, StatusInfo};
use crate::storage::Owner;
use crate::stream::{self, Listen};
use crate::supervisor::Supervisor;
use crate::tls::{Credentials, Endpoint};
use serde_json::json;
use std::net::IpAddr;

pub use super::record::PrepareOutput;

/// How refusals name the definition Prepare starts: Begin's, which is the running one or
/// the migration's `spec.targetDomainXML`.
pub const TARGET_DEFINITION: &str = "the target definition";

/// What Prepare needs: Begin's definition and cookie, and how to listen.
#[derive(Debug, Clone, Copy)]
pub struct PrepareInput<'a> {
    /// The key the guest has on this node ([`crate::node::guest_key`]): its state dir.
    pub vm: &'a str,
    /// The migration's unique name.
    pub migration: &'a str,
    /// The migration's (and its VM's) namespace: the definition's host paths are
    /// opened beneath this node's storage roots for it.
    pub namespace: &'a str,
    /// Begin's `domain_xml`: the definition the target starts.
    pub domain_xml: &'a str,
    pub begin_cookie: &'a str,
    /// Where the incoming QEMU listens.
    pub listen: Listen,
    /// The migration's policy (the one Perform will use).
    pub policy: &'a Policy,
    /// This node's credentials when the stream is encrypted, `None` for plain TCP.
    pub tls: Option<&'a Credentials>,
}

/// Runs Prepare with Begin's definition and cookie, for a migration under `policy` (the
/// one Perform will use), listening as `listen` says. `tls`: this node's credentials
/// when QEMU encrypts the stream (Perform must get the source node's then), `None` for
/// plain TCP or a tunnelled stream (the agents encrypt it).
#[tracing::instrument(skip_all, fields(vm = input.vm, migration = input.migration))]
pub async fn prepare(
    sup: &Supervisor,
    input: PrepareInput<'_>,
) -> Result<PrepareOutput, PhaseError> {
    let PrepareInput {
        vm,
        migration,
        namespace,
        domain_xml,
        begin_cookie,
        listen,
        policy,
        tls,
    } = input;
    let unknown = Ctx {
        phase: Phase::Prepare,
        vm: "<unparsed>",
        migration,
    };
    let domain = Domain::parse(domain_xml).map_err(|e| unknown.err(e))?;
    check_vm_name(vm).map_err(|m| unknown.err(ErrorKind::Refused(m)))?;
    let cx = Ctx { vm, ..unknown };
    let node = sup.node();
    let source = Cookie::decode(
        begin_cookie,
        &Expect {
            vm_name: &domain.name,
            vm_uuid: domain.uuid,
            writer: Phase::Begin,
            own_host_uuid: node.host_uuid,
        },
    )
    .map_err(|e| cx.err(e))?;
    let dir = sup.vm_dir(vm);
    if let Some(pid) = sup.running_pid(vm) {
        let record = MigrationRecord::load_for(&dir, migration).map_err(|e| cx.err(e))?;
        if let Some(out) = record.and_then(|r| r.prepare) {
            tracing::info!(vm, migration, "Prepare already done");
            return Ok(out);
        }
        // Ours from an attempt that crashed before recording, if still waiting for the
        // stream; anything else means the VM runs here and must not be touched.
        let guest = sup.require(vm).await.map_err(|e| cx.err(e))?;
        let status: StatusInfo = guest
            .qmp
            .execute("query-status", None)
            .await
            .map_err(|e| cx.err(e))?;
        if status.status != "inmigrate" {
            return Err(cx.err(ErrorKind::Refused(format!(
                "VM already runs on this node (pid {pid}, state '{}')",
                status.status
            ))));
        }
        drop(guest);
        sup.destroy(vm).await.map_err(|e| cx.err(e))?;
    }
    let tls = tls.map(|creds| {
        (
            creds,
            Endpoint::Target {
                source: &source.host_name,
            },
        )
    });
    let owner = Owner {
        namespace,
        definition: TARGET_DEFINITION,
    };
    match start_incoming(sup, vm, &domain, owner, listen, policy, tls).await {
        Ok(out) => {
            let mut rec = MigrationRecord::new(migration);
            rec.prepare = Some(out.clone());
            if let Err(e) = rec.save(&dir) {
                let _ = sup.destroy(vm).await;
                return Err(cx.err(e));
            }
            tracing::info!(vm, migration, uri = %out.uri, "Prepare done");
            Ok(out)
        }
        Err(kind) => {
            if let Err(e) = sup.destroy(vm).await {
                tracing::error!(vm, migration, error = %e, "cleaning up after failed Prepare");
            }
            Err(cx.err(kind))
        }
    }
}

fn host_for_uri(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

async fn start_incoming(
    sup: &Supervisor,
    vm: &str,
    domain: &Domain,
    owner: Owner<'_>,
    listen: Listen,
    policy: &Policy,
    tls: Option<(&Credentials, Endpoint<'_>)>,
) -> Result<PrepareOutput, ErrorKind> {
    let node = sup.node();
    let guest = sup.start(vm, domain, owner, true).await?;
    crate::policy::apply(&guest.qmp, &policy.settings(Side::Target)).await?;
    if let Some((creds, endpoint)) = tls {
        crate::tls::apply(&guest.qmp, &guest.dir, creds, endpoint).await?;
    }
    let uri = match listen {
        Listen::Tcp(port) => {
            let host = host_for_uri(node.address);
            let listen = format!("tcp:{host}:{}", port.unwrap_or(0));
            guest
                .qmp
                .run("migrate-incoming", Some(json!({ "uri": listen })))
                .await?;
            let info: MigrationInfo = guest.qmp.execute("query-migrate", None).await?;
            let port = info
                .socket_address
                .unwrap_or_default()
                .into_iter()
                .find_map(|a| a.port)
                .ok_or_else(|| ErrorKind::Refused("QEMU reports no listening address".into()))?;
            format!("tcp:{host}:{port}")
        }
        Listen::Incoming => {
            let uri = stream::unix_uri(&stream::incoming_socket(&guest.dir));
            guest
                .qmp
                .run("migrate-incoming", Some(json!({ "uri": uri })))
                .await?;
            uri
        }
    };
    // No graphics in the cookie: the console is a UNIX socket in the state dir, which
    // no client outside the node reaches to relocate to (console clients follow the
    // guest through the VM's status.graphics).
    let cookie = Cookie::new(&domain.name, domain.uuid, &node.name, node.host_uuid);
    Ok(PrepareOutput {
        uri,
        cookie: cookie.encode(Phase::Prepare)?,
    })
}

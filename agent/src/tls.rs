//! TLS on the migration stream, QEMU-native: `tls-creds-x509` with the peer verified,
//! and on the target an `authz-simple` that accepts only the source node's certificate.
//!
//! A node's [`Credentials`] (CA, its certificate and key, PEM) are plain inputs: the
//! agent binary gets them through the Kubernetes CSR flow (`k8s::certs`), tests make
//! their own CA. For each migration [`apply`] writes them into a private directory in
//! the VM's state dir (the file names `tls-creds-x509` expects; keys mode 0600), loads
//! them into QEMU with `object-add` (QEMU reads the files at once, so the directory is
//! removed right after) and points the migration parameters at them:
//!
//! | side | objects | parameters |
//! | --- | --- | --- |
//! | target (server) | `tls-creds-x509` endpoint server, verify-peer; `authz-simple` identity `CN=<source node>` | `tls-creds`, `tls-authz` |
//! | source (client) | `tls-creds-x509` endpoint client, verify-peer | `tls-creds`, `tls-hostname=<target node>` |
//!
//! The source checks the target's certificate names the target node (DNS SAN), whatever
//! address the URI has (a relay in the fault tests); the target checks the client's
//! certificate is from the same CA and that its subject is exactly `CN=<source node>`
//! (GnuTLS's RFC 4514 form of the DN; node certificates carry the CN only). [`clear`]
//! resets the parameters and deletes the objects; [`apply`] clears first, so re-runs
//! are idempotent. Post-copy recovery can call [`apply`] again on a paused migration.

use crate::qmp::{Qmp, QmpError};
use serde::Deserialize;
use serde_json::json;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// QOM id of the credentials object.
pub const CREDS_ID: &str = "ferry-migration-tls";
/// QOM id of the target's authorization object.
pub const AUTHZ_ID: &str = "ferry-migration-authz";
/// Directory (in the VM's state dir) the credentials are written to for `object-add`.
pub const CREDS_DIR: &str = "tls";

/// Why TLS could not be turned on or off in a QEMU.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// QEMU refused a TLS object: what was being done, and QEMU's reason.
    #[error("{what}: {desc}")]
    Refused { what: &'static str, desc: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The credentials could not be written for QEMU to read. (The text is the one this
    /// error had as a phase's `ErrorKind::Record`.)
    #[error("migration record: {0}")]
    Write(#[from] io::Error),
}

/// A node's TLS material, PEM. Debug output leaves the key out.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The cluster CA's certificate: peers must present a certificate it signed.
    pub ca: String,
    /// This node's certificate (CN and DNS SAN: the node name; server and client auth).
    pub cert: String,
    /// This node's private key.
    pub key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("ca", &format_args!("{} bytes", self.ca.len()))
            .field("cert", &format_args!("{} bytes", self.cert.len()))
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Which end of the stream a QEMU is, and who must be at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// The target listens; only the certificate of node `source` is accepted.
    Target { source: &'a str },
    /// The source connects; the target's certificate must name node `target`.
    Source { target: &'a str },
}

/// The identity `authz-simple` compares with the client certificate's distinguished
/// name, as QEMU formats it (GnuTLS, RFC 4514) for a subject with a CN only.
pub fn identity(node: &str) -> String {
    // RFC 4514 escaping of the characters a node name could carry that are special in
    // a DN (node names are DNS subdomains, so in practice none are).
    let mut out = String::from("CN=");
    for (i, c) in node.chars().enumerate() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, '#' | ' '))
        {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The `tls-creds-x509` arguments for one endpoint.
pub fn creds_args(endpoint: Endpoint<'_>, dir: &Path) -> serde_json::Value {
    let side = match endpoint {
        Endpoint::Target { .. } => "server",
        Endpoint::Source { .. } => "client",
    };
    json!({
        "qom-type": "tls-creds-x509",
        "id": CREDS_ID,
        "endpoint": side,
        "dir": dir.to_string_lossy(),
        "verify-peer": true,
    })
}

/// The migration parameters that turn TLS on for one endpoint.
pub fn parameters(endpoint: Endpoint<'_>) -> serde_json::Value {
    match endpoint {
        Endpoint::Target { .. } => json!({ "tls-creds": CREDS_ID, "tls-authz": AUTHZ_ID }),
        Endpoint::Source { target } => json!({ "tls-creds": CREDS_ID, "tls-hostname": target }),
    }
}

/// Loads `creds` into QEMU for `endpoint` and sets the migration parameters. `vm_dir` is
/// the VM's state dir (the credentials pass through `<vm_dir>/tls/` and are removed).
/// Leftovers of an earlier attempt are cleared first.
pub async fn apply(
    qmp: &Qmp,
    vm_dir: &Path,
    creds: &Credentials,
    endpoint: Endpoint<'_>,
) -> Result<(), TlsError> {
    clear(qmp).await?;
    let dir = vm_dir.join(CREDS_DIR);
    write_dir(&dir, creds)?;
    let added = qmp
        .run("object-add", Some(creds_args(endpoint, &dir)))
        .await;
    // QEMU has read the files (or refused them); the key stays only in the node's store.
    let _ = std::fs::remove_dir_all(&dir);
    added.map_err(|e| refused("loading the node certificate into QEMU", e))?;
    if let Endpoint::Target { source } = endpoint {
        qmp.run(
            "object-add",
            Some(json!({
                "qom-type": "authz-simple",
                "id": AUTHZ_ID,
                "identity": identity(source),
            })),
        )
        .await?;
    }
    qmp.run("migrate-set-parameters", Some(parameters(endpoint)))
        .await?;
    tracing::debug!(?endpoint, "migration TLS on");
    Ok(())
}

/// Turns TLS off on this QEMU: empty TLS parameters, no Ferry TLS objects. Idempotent.
pub async fn clear(qmp: &Qmp) -> Result<(), TlsError> {
    qmp.run(
        "migrate-set-parameters",
        Some(json!({ "tls-creds": "", "tls-hostname": "", "tls-authz": "" })),
    )
    .await?;
    #[derive(Deserialize)]
    struct Prop {
        name: String,
    }
    let objects: Vec<Prop> = qmp
        .execute("qom-list", Some(json!({ "path": "/objects" })))
        .await?;
    for id in [AUTHZ_ID, CREDS_ID] {
        if objects.iter().any(|o| o.name == id) {
            qmp.run("object-del", Some(json!({ "id": id }))).await?;
        }
    }
    Ok(())
}

fn refused(what: &'static str, e: QmpError) -> TlsError {
    match e {
        QmpError::Command { desc, .. } => TlsError::Refused { what, desc },
        e => TlsError::Qmp(e),
    }
}

/// Writes the five files `tls-creds-x509` reads (the node's certificate serves as both
/// server and client certificate) into a fresh directory only the agent can read.
pub fn write_dir(dir: &Path, creds: &Credentials) -> io::Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    for (name, content, mode) in [
        ("ca-cert.pem", &creds.ca, 0o644),
        ("server-cert.pem", &creds.cert, 0o644),
        ("client-cert.pem", &creds.cert, 0o644),
        ("server-key.pem", &creds.key, 0o600),
        ("client-key.pem", &creds.key, 0o600),
    ] {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(dir.join(name))?
            .write_all(content.as_bytes())?;
    }
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_the_cn_only() {
        assert_eq!(identity("node-a"), "CN=node-a");
        assert_eq!(identity("a,b=c"), "CN=a\\,b\\=c");
        assert_eq!(identity("#x"), "CN=\\#x");
    }

    #[test]
    fn parameters_per_side() {
        let t = parameters(Endpoint::Target { source: "node-a" });
        assert_eq!(t["tls-authz"], AUTHZ_ID);
        assert!(t.get("tls-hostname").is_none());
        let s = parameters(Endpoint::Source { target: "node-b" });
        assert_eq!(s["tls-hostname"], "node-b");
        assert!(s.get("tls-authz").is_none());
        let d = std::path::Path::new("/x");
        assert_eq!(
            creds_args(Endpoint::Target { source: "a" }, d)["endpoint"],
            "server"
        );
        assert_eq!(
            creds_args(Endpoint::Source { target: "b" }, d)["endpoint"],
            "client"
        );
        assert_eq!(
            creds_args(Endpoint::Source { target: "b" }, d)["verify-peer"],
            true
        );
    }

    #[test]
    fn keys_are_private_and_debug_hides_them() {
        let tmp = tempfile::tempdir().unwrap();
        let creds = Credentials {
            ca: "CA".into(),
            cert: "CERT".into(),
            key: "SECRET".into(),
        };
        let dir = write_dir(&tmp.path().join("tls"), &creds).unwrap();
        let mode = |n: &str| std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("server-key.pem"), 0o600);
        assert_eq!(mode("client-key.pem"), 0o600);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("client-cert.pem")).unwrap(),
            "CERT"
        );
        // Written again over a leftover directory.
        write_dir(&dir, &creds).unwrap();
        assert!(!format!("{creds:?}").contains("SECRET"));
    }
}

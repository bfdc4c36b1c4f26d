//! Names the operator and the agents share for TLS on the migration stream: node
//! certificates are issued through CertificateSigningRequests (certificates.k8s.io/v1)
//! for the signer [`SIGNER_NAME`]; the cluster CA's certificate is published in a
//! ConfigMap in Ferry's namespace (docs/protocol.md, "Node certificates"). Also the
//! cluster secret that signs saved-state files ([`STATE_KEY_NAME`]).

/// The signer agents' CSRs name; the operator approves and signs for it.
pub const SIGNER_NAME: &str = "ferry.dev/migration";
/// The Secret (CA certificate and key) and the ConfigMap (CA certificate) in Ferry's
/// namespace.
pub const CA_NAME: &str = "ferry-ca";
/// The ConfigMap key of the CA certificate (PEM).
pub const CA_CERT_KEY: &str = "ca.crt";
/// The usages of a node certificate, as CSR `spec.usages` names them.
pub const USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];
/// How long a node certificate is valid (7 days); agents renew with a third left.
pub const NODE_CERT_LIFETIME_SECONDS: u64 = 7 * 24 * 3600;
/// The user extra the kube-apiserver fills from a node-bound ServiceAccount token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// The name of the CSR an agent files for node `node` with a key whose SHA-256 of the
/// public key starts with `key_hash` (hex): `ferry-<node>-<first 10 hex digits>`.
pub fn csr_name(node: &str, key_hash: &str) -> String {
    let short: String = key_hash.chars().take(10).collect();
    format!("ferry-{node}-{short}")
}

/// The Secret in Ferry's namespace with the cluster's state key: 32 random bytes under
/// [`STATE_KEY_KEY`], created by the operator when missing and read by every agent,
/// which signs the state files it saves with it and restores only files signed with it
/// (docs/design.md, "State files").
pub const STATE_KEY_NAME: &str = "ferry-state-key";
/// The Secret's data key of the state key (32 raw bytes).
pub const STATE_KEY_KEY: &str = "key";

//! The console API: a guest's VNC console, reached through the kube-apiserver.
//!
//! The operator serves the API group [`GROUP`] as an aggregated API (an APIService the
//! chart installs). The apiserver authenticates the caller, and the operator asks it
//! (a SubjectAccessReview) whether that caller may `get` the subresource
//! `virtualmachines/console` of this group on the VM. Only then does it open the
//! console on the VM's node, through that node's agent (docs/protocol.md, "Consoles").
//! `kubectl ferry console VM` serves it on a local port for a VNC viewer.
//!
//! The stream is a WebSocket (subprotocol [`PROTOCOL_V5`] or [`PROTOCOL_V4`], the names
//! Kubernetes' own streams use, so `kube::Client::connect` accepts them). Every binary
//! message starts with a channel byte: [`DATA_IN`] carries the viewer's bytes to QEMU,
//! [`DATA_OUT`] QEMU's to the viewer, and [`ERROR`] a `metav1.Status` (JSON) saying why
//! the console ended, sent once before the server closes.

/// The aggregated API group of the console.
pub const GROUP: &str = "subresources.ferry.dev";
/// Its only version.
pub const VERSION: &str = "v1alpha1";
/// The APIService that registers it (`<version>.<group>`).
pub const API_SERVICE: &str = "v1alpha1.subresources.ferry.dev";
/// The resource RBAC names, with the subresource [`SUBRESOURCE`].
pub const RESOURCE: &str = "virtualmachines";
/// The subresource a caller must be allowed to `get`.
pub const SUBRESOURCE: &str = "console";
/// The verb checked.
pub const VERB: &str = "get";
/// The subject (CN) of the certificate the operator's console proxy shows the agents.
/// It has a colon, which no node name (a DNS subdomain) can have, so no node
/// certificate the signer issues can pass for it.
pub const PROXY_IDENTITY: &str = "ferry:console-proxy";

/// The WebSocket subprotocols the console speaks, preferred first.
pub const PROTOCOL_V5: &str = "v5.channel.k8s.io";
pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";

/// Channel of the viewer's bytes (client to server).
pub const DATA_IN: u8 = 0;
/// Channel of QEMU's bytes (server to client).
pub const DATA_OUT: u8 = 1;
/// Channel of the Status that ends a console (server to client).
pub const ERROR: u8 = 3;

/// The path of a VM's console on the apiserver.
pub fn path(namespace: &str, vm: &str) -> String {
    format!("/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{RESOURCE}/{vm}/{SUBRESOURCE}")
}

/// The path of a VM's console on its node's agent (the peer API), which only the
/// operator's console proxy may call.
pub fn agent_path(namespace: &str, vm: &str) -> String {
    format!("/v1/console/{namespace}/{vm}")
}

/// One message: `channel` then `data`.
pub fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(channel);
    m.extend_from_slice(data);
    m
}

/// A message's channel and data; `None` for an empty message (no channel byte).
pub fn unframe(message: &[u8]) -> Option<(u8, &[u8])> {
    let (&channel, data) = message.split_first()?;
    Some((channel, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paths_name_group_version_namespace_and_vm() {
        assert_eq!(
            path("tenant-a", "web"),
            "/apis/subresources.ferry.dev/v1alpha1/namespaces/tenant-a/virtualmachines/web/console"
        );
        assert_eq!(agent_path("tenant-a", "web"), "/v1/console/tenant-a/web");
        assert_eq!(API_SERVICE, format!("{VERSION}.{GROUP}"));
    }

    #[test]
    fn a_frame_round_trips_and_an_empty_message_has_no_channel() {
        let m = frame(DATA_OUT, b"RFB 003.008\n");
        assert_eq!(unframe(&m), Some((DATA_OUT, &b"RFB 003.008\n"[..])));
        assert_eq!(unframe(&frame(DATA_IN, b"")), Some((DATA_IN, &b""[..])));
        assert_eq!(unframe(b""), None);
    }

    #[test]
    fn the_proxy_identity_cannot_be_a_node_name() {
        // Node names are DNS subdomains: lower-case alphanumerics, '-' and '.'.
        assert!(
            PROXY_IDENTITY
                .chars()
                .any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'))
        );
    }
}

//! Where the migration stream goes (`spec.transport.mode`), decided without I/O.
//!
//! - **Direct**: the target QEMU listens on TCP on its node's migration address and the
//!   source QEMU connects to it: the migration URI is `tcp:<host>:<port>`, and QEMU's own
//!   TLS encrypts the stream (`transport.tls`).
//! - **Tunnelled**: neither QEMU touches the network. The target QEMU listens on
//!   [`incoming_socket`] in the guest's state dir; the source agent listens on
//!   [`tunnel_socket`] in the source guest's state dir and the source QEMU connects
//!   there, once per channel (the main stream, each multifd channel, the post-copy
//!   preempt channel); for each connection the source agent opens a connection of the
//!   agents' peer API (mutual TLS with the node certificates) to the target agent, which
//!   joins it to the incoming socket. The migration URI the target publishes is
//!   `tunnel:<host>:<port>`, its agent's peer endpoint; the source QEMU is sent to
//!   `unix:<tunnel socket>`.

use std::path::{Path, PathBuf};

/// The target QEMU's listening socket in tunnelled mode, in the guest's state dir.
pub const INCOMING_SOCKET: &str = "incoming.sock";
/// The source agent's socket the source QEMU connects to in tunnelled mode.
pub const TUNNEL_SOCKET: &str = "tunnel.sock";
/// The scheme of a tunnelled migration URI: `tunnel:<peer endpoint>`.
pub const TUNNEL_SCHEME: &str = "tunnel:";

/// Where the target QEMU listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// TCP on the node's migration address, on this port (`None`: any free one).
    Tcp(Option<u16>),
    /// [`incoming_socket`] of the guest's state dir (tunnelled).
    Incoming,
}

/// The target QEMU's socket of the guest whose state dir is `dir`.
pub fn incoming_socket(dir: &Path) -> PathBuf {
    dir.join(INCOMING_SOCKET)
}

/// The source agent's tunnel socket of the guest whose state dir is `dir`.
pub fn tunnel_socket(dir: &Path) -> PathBuf {
    dir.join(TUNNEL_SOCKET)
}

/// QEMU's URI of the UNIX socket `path`.
pub fn unix_uri(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// The tunnelled migration URI of the peer endpoint `endpoint` (`host:port`).
pub fn tunnel_uri(endpoint: &str) -> String {
    format!("{TUNNEL_SCHEME}{endpoint}")
}

/// The peer endpoint of a tunnelled migration URI, or `None` if `uri` is not one
/// (`tunnel:<host>:<port>`, the host an IP address or a DNS name).
pub fn tunnel_endpoint(uri: &str) -> Option<&str> {
    let endpoint = uri.strip_prefix(TUNNEL_SCHEME)?;
    check_host_port(endpoint).ok()?;
    Some(endpoint)
}

fn check_host_port(rest: &str) -> Result<(), ()> {
    let (host, port) = rest.rsplit_once(':').ok_or(())?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(()),
    }
}

/// Checks the URI the source QEMU is sent to by the guest whose state dir is `dir`: only
/// `tcp:<host>:<port>`, or exactly that guest's [`tunnel_socket`] (an `exec:` URI would
/// run a command on the source node; another `unix:` path would reach whatever listens
/// there).
pub fn check_uri(uri: &str, dir: &Path) -> Result<(), String> {
    if let Some(path) = uri.strip_prefix("unix:") {
        let own = tunnel_socket(dir);
        return if Path::new(path) == own {
            Ok(())
        } else {
            Err(format!(
                "migration URI '{uri}' is not tcp:<host>:<port> nor this guest's tunnel socket {}",
                own.display()
            ))
        };
    }
    let bad = || format!("migration URI '{uri}' is not tcp:<host>:<port>");
    let rest = uri.strip_prefix("tcp:").ok_or_else(bad)?;
    check_host_port(rest).map_err(|()| bad())
}

/// Where a source whose post-copy stream was cut resumes to, once the target reports it
/// listens again at `listens_at` (`status.recoveryURI`): the target's TCP URI in direct
/// mode; in tunnelled mode (`uri`, the one Perform sent QEMU to, is the tunnel socket)
/// the tunnel socket again, whose agent dials the target's endpoint anew. `None` while
/// the target does not listen, or reports what this mode cannot use.
pub fn resume_uri(uri: &str, listens_at: Option<&str>, dir: &Path) -> Option<String> {
    let listens_at = listens_at?;
    if uri.starts_with("unix:") {
        return tunnel_endpoint(listens_at).map(|_| uri.to_string());
    }
    check_uri(listens_at, dir).ok()?;
    listens_at
        .starts_with("tcp:")
        .then(|| listens_at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tcp_or_the_guests_own_tunnel_socket_reaches_qemu() {
        let dir = Path::new("/run/ferry/vms/default.demo-0123456789abcdef");
        assert_eq!(check_uri("tcp:127.0.0.3:4444", dir), Ok(()));
        assert_eq!(check_uri("tcp:[fd00::1]:4444", dir), Ok(()));
        let own = unix_uri(&tunnel_socket(dir));
        assert_eq!(check_uri(&own, dir), Ok(()));
        for bad in [
            "exec:rm -rf /",
            "tcp:127.0.0.3:0",
            "tcp:a b:1",
            "unix:/run/ferry/vms/other.vm-0123456789abcdef/tunnel.sock",
            "unix:/run/ferry/vms/default.demo-0123456789abcdef/qmp.sock",
            "unix:/run/ferry/vms/default.demo-0123456789abcdef/../x/tunnel.sock",
            "tunnel:10.0.0.2:7443",
            "fd:3",
        ] {
            let e = check_uri(bad, dir).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn tunnel_uris_name_a_peer_endpoint() {
        assert_eq!(tunnel_uri("10.0.0.2:7443"), "tunnel:10.0.0.2:7443");
        assert_eq!(
            tunnel_endpoint("tunnel:10.0.0.2:7443"),
            Some("10.0.0.2:7443")
        );
        assert_eq!(
            tunnel_endpoint("tunnel:node-b.example:7443"),
            Some("node-b.example:7443")
        );
        assert_eq!(
            tunnel_endpoint("tunnel:[fd00::2]:7443"),
            Some("[fd00::2]:7443")
        );
        for bad in [
            "tcp:10.0.0.2:7443",
            "tunnel:10.0.0.2",
            "tunnel:",
            "tunnel:a b:1",
        ] {
            assert_eq!(tunnel_endpoint(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_cut_post_copy_resumes_the_way_it_went() {
        let dir = Path::new("/run/ferry/vms/default.demo-0123456789abcdef");
        let tunnel = unix_uri(&tunnel_socket(dir));
        // Direct: to where the target listens again.
        assert_eq!(
            resume_uri("tcp:10.0.0.2:4444", Some("tcp:10.0.0.2:4445"), dir),
            Some("tcp:10.0.0.2:4445".into())
        );
        assert_eq!(resume_uri("tcp:10.0.0.2:4444", None, dir), None);
        assert_eq!(
            resume_uri("tcp:10.0.0.2:4444", Some("exec:true"), dir),
            None
        );
        // Tunnelled: through the tunnel socket again, once the target listens.
        assert_eq!(
            resume_uri(&tunnel, Some("tunnel:10.0.0.2:7443"), dir),
            Some(tunnel.clone())
        );
        assert_eq!(resume_uri(&tunnel, None, dir), None);
        assert_eq!(resume_uri(&tunnel, Some("tcp:10.0.0.2:4445"), dir), None);
        assert_eq!(
            resume_uri("tcp:10.0.0.2:4444", Some(&tunnel), dir),
            None,
            "a direct stream never resumes into a socket"
        );
    }
}

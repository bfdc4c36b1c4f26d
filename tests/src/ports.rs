//! Ports for the local control plane's listeners (etcd, kube-apiserver, the metrics and
//! peer endpoints of the operator and agents), picked below the kernel's ephemeral
//! range. A port from `bind(:0)` lies inside that range, so between the harness
//! freeing it and the component binding it the kernel may hand it to any outgoing
//! connection as its local port, and the component then fails with "Address already
//! in use" (seen as a flaky operator start). Outgoing connections never get a port
//! below the range, so one that is free when picked stays free.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the ports are taken from: below Linux's default ephemeral range (32768–60999)
/// and above the registered ports most services listen on.
const FIRST: u32 = 20_000;
const LAST: u32 = 32_000;

/// The next port to try; each test process starts at its own offset (by pid), so
/// processes running side by side rarely try the same ports.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port free on `ip`, outside the ephemeral range.
pub fn free_port(ip: Ipv4Addr) -> std::io::Result<u16> {
    let span = LAST - FIRST;
    let _ = NEXT.compare_exchange(
        0,
        1 + (std::process::id() * 97) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + n % span) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {FIRST}-{LAST} on {ip}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let a = free_port(Ipv4Addr::LOCALHOST).unwrap();
        let b = free_port(Ipv4Addr::LOCALHOST).unwrap();
        assert_ne!(a, b);
        for p in [a, b] {
            assert!((FIRST as u16..LAST as u16).contains(&p), "{p}");
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
        }
    }
}

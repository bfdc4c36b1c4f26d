//! A TCP relay the fault tests put between the source and the target QEMU, so that they
//! can cut a live migration stream for real: closing the relay drops every connection.
//! The target agent advertises the relay (its `FERRY_FAULT_ADVERTISE` test hook) and
//! writes the URI its QEMU really listens on to `<fault dir>/migration-target`.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running relay; dropping it cuts it too.
pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl Relay {
    /// Listens on `ip`:<free port>; each connection goes to the URI in
    /// `fault_dir/migration-target`.
    pub async fn start(ip: &str, fault_dir: PathBuf) -> std::io::Result<Relay> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, mut stop) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.changed() => break,
                };
                let Ok((inbound, _)) = accepted else { break };
                let target =
                    std::fs::read_to_string(fault_dir.join("migration-target")).unwrap_or_default();
                let target = target.trim().trim_start_matches("tcp:").to_string();
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        });
        Ok(Relay { addr, cut })
    }

    /// Closes the listener and every connection through it.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

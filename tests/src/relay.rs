//! A TCP relay the fault tests put between the source and the target QEMU (or, in
//! tunnelled mode, between the source agent's tunnel and the target agent's peer API),
//! so that they can cut a live migration stream for real: closing the relay drops every
//! connection.
//! The target agent advertises the relay (its `FERRY_FAULT_ADVERTISE` test hook, for
//! the migration URI and for a post-copy recovery URI alike) and writes the URI its QEMU
//! really listens on to `<fault dir>/migration-target`, which the relay reads for each
//! connection. A cut relay can be opened again on the same address: the path is back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running relay; dropping it cuts it too.
pub struct Relay {
    pub addr: SocketAddr,
    fault_dir: PathBuf,
    cut: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    /// Listens on `ip`:<free port>; each connection goes to the URI in
    /// `fault_dir/migration-target`.
    pub async fn start(ip: &str, fault_dir: PathBuf) -> std::io::Result<Relay> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let relay = Relay {
            addr,
            fault_dir,
            cut,
            accepted: Arc::default(),
        };
        relay.serve(listener);
        Ok(relay)
    }

    fn serve(&self, listener: TcpListener) {
        let mut stop = self.cut.subscribe();
        let fault_dir = self.fault_dir.clone();
        let count = self.accepted.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.changed() => break,
                };
                let Ok((inbound, _)) = accepted else { break };
                count.fetch_add(1, Ordering::Relaxed);
                let target =
                    std::fs::read_to_string(fault_dir.join("migration-target")).unwrap_or_default();
                // `tcp:<host>:<port>` (direct) or `tunnel:<peer endpoint>` (tunnelled).
                let target = target.trim();
                let target = target
                    .strip_prefix("tcp:")
                    .or_else(|| target.strip_prefix("tunnel:"))
                    .unwrap_or(target)
                    .to_string();
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
    }

    /// How many connections the relay accepted (a stream that went through it).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes the listener and every connection through it.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    /// Opens a cut relay again, on the same address.
    pub async fn reopen(&mut self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.cut = watch::channel(false).0;
        self.serve(listener);
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

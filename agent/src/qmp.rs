//! An async QMP client over the QEMU monitor's unix socket.
//!
//! [`Qmp::connect`] reads the greeting and negotiates capabilities. [`Qmp::execute`] sends
//! one command with its own `id` and waits (with a timeout) for the matching reply,
//! decoded into a serde type. A reader task routes replies to their callers and
//! broadcasts asynchronous events (`MIGRATION`, `STOP`, `RESUME`, `SHUTDOWN`, ...) to
//! every [`Qmp::subscribe`]r, also while commands run. When QEMU goes away every waiting
//! and later command fails with [`QmpError::Gone`].

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot};

/// Default time a command may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line accepted from QEMU.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command '{command}' got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QEMU went away (QMP connection closed)")]
    Gone,
    #[error("QMP reply to '{command}' not understood: {source}")]
    Decode {
        command: String,
        source: serde_json::Error,
    },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it, by the host's wall clock.
    #[serde(default)]
    pub timestamp: Option<EventTime>,
}

/// A QMP event's `timestamp`: seconds and microseconds since the Unix epoch
/// (`{"seconds": -1, "microseconds": -1}` when QEMU could not read the clock).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct EventTime {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Event {
    /// When QEMU emitted the event, in milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> Option<u64> {
        let t = self.timestamp?;
        let ms = t.seconds.checked_mul(1000)? + t.microseconds / 1000;
        u64::try_from(ms)
            .ok()
            .filter(|_| t.seconds >= 0 && t.microseconds >= 0)
    }
}

type Reply = Result<Value, QmpError>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// A QMP connection. Dropping it closes the connection (QEMU keeps running).
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    /// The QEMU version from the greeting, e.g. `7.2.22`.
    pub version: String,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut lines = BufReader::new(read);
        let greeting = tokio::time::timeout(DEFAULT_TIMEOUT, read_json(&mut lines))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                after: DEFAULT_TIMEOUT,
            })??;
        let v = &greeting["QMP"]["version"]["qemu"];
        if v.is_null() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        let version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        let (events, _) = broadcast::channel(1024);
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_loop(
            lines,
            pending.clone(),
            events.clone(),
            closed.clone(),
        ));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(writer),
            pending,
            events,
            next_id: AtomicU64::new(1),
            closed,
            reader,
            version,
        };
        qmp.run("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Receives every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether QEMU closed the connection.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Runs `command` and decodes its `return` value, waiting at most [`DEFAULT_TIMEOUT`].
    pub async fn execute<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<R, QmpError> {
        self.execute_with_timeout(command, arguments, DEFAULT_TIMEOUT)
            .await
    }

    /// Runs a command whose return value does not matter.
    pub async fn run(&self, command: &str, arguments: Option<Value>) -> Result<(), QmpError> {
        self.execute::<serde::de::IgnoredAny>(command, arguments)
            .await
            .map(|_| ())
    }

    pub async fn execute_with_timeout<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<R, QmpError> {
        self.call(command, arguments, timeout, None).await
    }

    /// Runs `command` with `fd` passed along (SCM_RIGHTS on the monitor socket), as
    /// `getfd` needs; QEMU keeps its own copy of the descriptor.
    pub async fn run_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        self.call::<serde::de::IgnoredAny>(command, arguments, DEFAULT_TIMEOUT, Some(fd))
            .await
            .map(|_| ())
    }

    async fn call<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<R, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Gone);
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut msg = serde_json::json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending map").insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        tracing::trace!(command, id, "QMP command");
        let sent = {
            let mut w = self.writer.lock().await;
            match fd {
                None => w.write_all(line.as_bytes()).await,
                Some(fd) => send_with_fd(w.as_ref(), line.as_bytes(), fd).await,
            }
        };
        if let Err(e) = sent {
            self.pending.lock().expect("pending map").remove(&id);
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QmpError::Gone
                }
                _ => QmpError::Io(e),
            });
        }
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(QmpError::Gone),
            Err(_) => {
                self.pending.lock().expect("pending map").remove(&id);
                Err(QmpError::Timeout {
                    command: command.to_string(),
                    after: timeout,
                })
            }
        };
        match reply {
            Ok(v) => serde_json::from_value(v).map_err(|source| QmpError::Decode {
                command: command.to_string(),
                source,
            }),
            Err(QmpError::Command { class, desc, .. }) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Err(e) => Err(e),
        }
    }
}

/// Writes `data` to the monitor socket, the first chunk carrying `fd` as SCM_RIGHTS.
async fn send_with_fd(stream: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let socket = stream.as_raw_fd();
    let fds = [fd.as_raw_fd()];
    let mut sent = 0;
    while sent < data.len() {
        stream.writable().await?;
        let result = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(&data[sent..])];
            let rights = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage] = if sent == 0 { &rights } else { &[] };
            sendmsg::<()>(socket, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        });
        match result {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn read_json<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Value, QmpError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(QmpError::Gone);
        }
        if buf.len() >= MAX_LINE {
            return Err(QmpError::Protocol("line too long".into()));
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&buf).map_err(|e| QmpError::Protocol(e.to_string()));
    }
}

use tokio::io::AsyncReadExt as _;

async fn read_loop(
    mut lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    closed: Arc<AtomicBool>,
) {
    loop {
        let msg = match read_json(&mut lines).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "QMP connection closed");
                break;
            }
        };
        if msg.get("event").is_some() {
            if let Ok(ev) = serde_json::from_value::<Event>(msg) {
                tracing::debug!(event = %ev.event, data = %ev.data, "QMP event");
                let _ = events.send(ev);
            }
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(%msg, "QMP message without id");
            continue;
        };
        let reply = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else {
            let err = &msg["error"];
            Err(QmpError::Command {
                command: String::new(),
                class: err["class"].as_str().unwrap_or("?").to_string(),
                desc: err["desc"].as_str().unwrap_or("?").to_string(),
            })
        };
        if let Some(tx) = pending.lock().expect("pending map").remove(&id) {
            let _ = tx.send(reply);
        }
    }
    closed.store(true, Ordering::SeqCst);
    // Dropping the senders makes every waiting command fail with `Gone`.
    pending.lock().expect("pending map").clear();
}

/// `query-status`.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
}

/// `query-migrate` (the fields Ferry uses).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: Option<String>,
    pub ram: Option<RamStats>,
    pub total_time: Option<u64>,
    pub downtime: Option<u64>,
    pub expected_downtime: Option<u64>,
    pub setup_time: Option<u64>,
    pub error_desc: Option<String>,
    /// How much auto-converge throttles the vCPUs (absent when it does not).
    pub cpu_throttle_percentage: Option<u64>,
    pub socket_address: Option<Vec<SocketAddress>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    #[serde(default)]
    pub dirty_pages_rate: u64,
    #[serde(default)]
    pub mbps: f64,
    #[serde(default)]
    pub dirty_sync_count: u64,
    #[serde(default)]
    pub page_size: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SocketAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub host: Option<String>,
    pub port: Option<String>,
}

/// `query-vnc`.
#[derive(Debug, Clone, Deserialize)]
pub struct VncInfo {
    pub enabled: bool,
    pub host: Option<String>,
    /// The port, or for a UNIX socket its path.
    pub service: Option<String>,
    /// `ipv4`, `ipv6`, `unix`, `unknown`.
    pub family: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> Event {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_events_timestamp_is_unix_milliseconds() {
        let ev = event(
            r#"{"event": "STOP", "timestamp": {"seconds": 1764115200, "microseconds": 435656}}"#,
        );
        assert_eq!(ev.unix_ms(), Some(1_764_115_200_435));
        // QEMU writes -1 when it could not read the clock; older events carry none.
        let ev = event(r#"{"event": "STOP", "timestamp": {"seconds": -1, "microseconds": -1}}"#);
        assert_eq!(ev.unix_ms(), None);
        assert_eq!(event(r#"{"event": "RESUME"}"#).unix_ms(), None);
    }
}

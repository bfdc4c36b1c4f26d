//! `kubectl ferry console VM`: a VM's VNC console on a local TCP port.
//!
//! [`serve`] listens on the port; each viewer that connects gets its own WebSocket to
//! the apiserver's console of the VM ([`ferry_crds::console::path`]), opened with the
//! user's kubeconfig credentials, so RBAC (`get` on `virtualmachines/console` in
//! `subresources.ferry.dev`) decides who may see which console. [`bridge`] then copies
//! the viewer's bytes into the stream's [`DATA_IN`] channel and the [`DATA_OUT`]
//! channel back to the viewer, until either side closes or the server ends the console
//! with a Status on the [`ERROR`] channel (see [`ferry_crds::console`]).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ferry_crds::console::{DATA_IN, DATA_OUT, ERROR, frame, path, unframe};
use futures::{SinkExt, StreamExt};
use kube::Client;
use kube::core::response::Status;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

/// How long a bridge whose viewer left waits for the server to answer its Close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// The most viewer bytes one message carries.
const CHUNK: usize = 32 * 1024;

/// How a bridge ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The viewer closed its connection; the bridge closed the WebSocket.
    ViewerClosed,
    /// The server ended the console with a Status on the ERROR channel: its message.
    Ended(String),
    /// The server closed the WebSocket without a Status; the reason of its Close
    /// frame, when it gave one.
    ServerClosed(Option<String>),
}

/// Why the console, or one viewer's bridge, failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("viewer connection: {0}")]
    Viewer(#[source] io::Error),
    #[error("console stream: {0}")]
    Stream(#[from] tungstenite::Error),
}

/// Binds the console's local port (`port` 0: one the system picks).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ConsoleError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ConsoleError::Bind { addr, source })
}

/// The line [`serve`] prints once it listens on `local`.
pub fn banner(namespace: &str, vm: &str, local: SocketAddr) -> String {
    let host = match local {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    format!(
        "Console of VirtualMachine {namespace}/{vm} on {local}; \
         connect a VNC viewer to it (vncviewer {host}::{})",
        local.port()
    )
}

/// Why the apiserver refused a console: the code and message of its Status for an
/// API error (`403 Forbidden: ...`), the error itself otherwise.
pub fn refusal(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            // The HTTP reason rather than the Status's: kube makes one up ("Failed to
            // parse error data") when the body was no Status.
            let head = match http::StatusCode::from_u16(status.code) {
                Ok(code) => format!(
                    "{} {}",
                    code.as_u16(),
                    code.canonical_reason().unwrap_or("")
                ),
                Err(_) => status.reason.clone(),
            };
            [head.trim(), status.message.as_str()]
                .into_iter()
                .filter(|part| !part.is_empty())
                .collect::<Vec<_>>()
                .join(": ")
        }
        other => other.to_string(),
    }
}

/// The message of the `metav1.Status` an ERROR message carries (its reason when it has
/// no message; the text itself when it is not a Status).
pub fn status_message(data: &[u8]) -> String {
    match serde_json::from_slice::<Status>(data) {
        Ok(s) if !s.message.is_empty() => s.message,
        Ok(s) if !s.reason.is_empty() => s.reason,
        _ => String::from_utf8_lossy(data).trim().to_string(),
    }
}

/// Serves the console of `namespace/vm` on `listener` until Ctrl-C: prints the
/// [`banner`], then bridges every viewer that connects to its own console stream.
pub async fn serve(
    client: Client,
    listener: TcpListener,
    namespace: &str,
    vm: &str,
) -> Result<(), ConsoleError> {
    use std::io::Write;

    let local = listener.local_addr().map_err(ConsoleError::Viewer)?;
    println!("{}", banner(namespace, vm, local));
    let _ = std::io::stdout().flush();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: the next may do.
                    eprintln!("cannot accept a viewer: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let client = client.clone();
        let name = format!("{namespace}/{vm}");
        let request = http::Request::get(path(namespace, vm))
            .body(vec![])
            .expect("a valid request");
        tokio::spawn(async move {
            let ws = match client.connect(request).await {
                Ok(connection) => connection.into_stream(),
                Err(e) => {
                    eprintln!("console of {name} refused: {}", refusal(&e));
                    return; // drops, so closes, the viewer's connection
                }
            };
            match bridge(tcp, ws).await {
                Ok(outcome) => {
                    match outcome {
                        Outcome::Ended(message) | Outcome::ServerClosed(Some(message)) => {
                            eprintln!("console of {name} ended: {message}")
                        }
                        Outcome::ViewerClosed | Outcome::ServerClosed(None) => {}
                    }
                    eprintln!("connection from {peer} closed");
                }
                Err(e) => eprintln!("connection from {peer} closed: {e}"),
            }
        });
    }
}

/// Copies one viewer's bytes into a console stream and the stream's output back, until
/// one of them ends. When the viewer leaves, the bridge sends a Close and waits (a
/// little) for the server's; when the server ends or closes the console, the bridge
/// shuts the viewer's connection down. Both directions run at once, and the stream is
/// read all along, so its Pings are answered.
pub async fn bridge<S>(mut tcp: TcpStream, ws: WebSocketStream<S>) -> Result<Outcome, ConsoleError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut tcp_in, mut tcp_out) = tcp.split();
    let outcome = {
        let upstream = async {
            let mut buf = vec![0; CHUNK];
            loop {
                let n = tcp_in.read(&mut buf).await.map_err(ConsoleError::Viewer)?;
                if n == 0 {
                    // Sends the Close frame.
                    sink.close().await?;
                    return Ok::<_, ConsoleError>(());
                }
                sink.send(Message::binary(frame(DATA_IN, &buf[..n])))
                    .await?;
            }
        };
        let downstream = async {
            while let Some(message) = stream.next().await {
                match message? {
                    Message::Binary(m) => match unframe(&m) {
                        Some((DATA_OUT, data)) => tcp_out
                            .write_all(data)
                            .await
                            .map_err(ConsoleError::Viewer)?,
                        Some((ERROR, data)) => return Ok(Outcome::Ended(status_message(data))),
                        _ => {} // an empty message, or a channel the console does not use
                    },
                    Message::Close(close) => {
                        let reason = close
                            .map(|c| c.reason.to_string())
                            .filter(|r| !r.is_empty());
                        return Ok(Outcome::ServerClosed(reason));
                    }
                    // Pings are answered by the stream itself.
                    Message::Text(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            Ok::<_, ConsoleError>(Outcome::ServerClosed(None))
        };
        tokio::pin!(upstream, downstream);
        tokio::select! {
            up = &mut upstream => match up {
                Ok(()) => {
                    // The viewer left: its bytes are all sent; let the server answer the
                    // Close (whatever it says now has nobody to go to).
                    let _ = tokio::time::timeout(CLOSE_WAIT, &mut downstream).await;
                    Ok(Outcome::ViewerClosed)
                }
                Err(e) => Err(e),
            },
            down = &mut downstream => down,
        }
    };
    // A no-op after the viewer's EOF; the Close of a server's ending otherwise.
    let _ = sink.close().await;
    let _ = tcp_out.shutdown().await;
    outcome
}

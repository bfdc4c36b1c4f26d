//! The console bridge between a real loopback TCP connection (the viewer) and a
//! WebSocket pair over an in-memory duplex (the server's end played by the test). No
//! cluster.

use std::time::Duration;

use ferry_cli::console::{self, Outcome};
use ferry_crds::console::{DATA_IN, DATA_OUT, ERROR, frame};
use futures::{SinkExt, StreamExt};
use kube::core::response::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const LIMIT: Duration = Duration::from_secs(5);

type Bridge = JoinHandle<Result<Outcome, console::ConsoleError>>;

/// A running bridge, the viewer's end of its TCP connection and the server's end of
/// its WebSocket.
async fn setup() -> (TcpStream, WebSocketStream<DuplexStream>, Bridge) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let viewer = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
    let bridge = tokio::spawn(console::bridge(tcp, client));
    (viewer, server, bridge)
}

async fn next(server: &mut WebSocketStream<DuplexStream>) -> Option<Message> {
    timeout(LIMIT, server.next())
        .await
        .expect("the bridge sends in time")
        .map(|m| m.expect("a valid message"))
}

async fn outcome(bridge: Bridge) -> Outcome {
    timeout(LIMIT, bridge)
        .await
        .expect("the bridge ends in time")
        .unwrap()
        .expect("the bridge ends without an error")
}

/// Reads until EOF (which must come in time).
async fn read_to_eof(viewer: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    timeout(LIMIT, viewer.read_to_end(&mut rest))
        .await
        .expect("the viewer's connection is shut down in time")
        .unwrap();
    rest
}

#[tokio::test]
async fn bytes_cross_both_ways_on_their_channels() {
    let (mut viewer, mut server, bridge) = setup().await;

    // QEMU speaks first in RFB.
    server
        .send(Message::binary(frame(DATA_OUT, b"RFB 003.008\n")))
        .await
        .unwrap();
    let mut version = [0; 12];
    timeout(LIMIT, viewer.read_exact(&mut version))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&version, b"RFB 003.008\n");

    viewer.write_all(b"RFB 003.008\n").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 12 {
        match next(&mut server).await {
            Some(Message::Binary(m)) => {
                assert_eq!(m[0], DATA_IN, "the viewer's bytes go on DATA_IN");
                got.extend_from_slice(&m[1..]);
            }
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
    assert_eq!(got, b"RFB 003.008\n");

    // Empty messages, other channels, text and pings are not the viewer's.
    server.send(Message::binary(Vec::new())).await.unwrap();
    server
        .send(Message::binary(frame(2, b"stderr")))
        .await
        .unwrap();
    server.send(Message::text("hello")).await.unwrap();
    server
        .send(Message::Ping(b"p".to_vec().into()))
        .await
        .unwrap();
    server
        .send(Message::binary(frame(DATA_OUT, b"\x01")))
        .await
        .unwrap();
    let mut one = [0; 1];
    timeout(LIMIT, viewer.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one, [1]);
    assert_eq!(
        next(&mut server).await,
        Some(Message::Pong(b"p".to_vec().into())),
        "the bridge answers pings"
    );

    drop(viewer);
    let _ = next(&mut server).await;
    drop(server);
    outcome(bridge).await;
}

#[tokio::test]
async fn a_status_on_the_error_channel_ends_the_console_with_its_message() {
    let (mut viewer, mut server, bridge) = setup().await;
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": "the guest web stopped",
        "reason": "Gone",
        "code": 410,
    });
    server
        .send(Message::binary(frame(
            ERROR,
            &serde_json::to_vec(&status).unwrap(),
        )))
        .await
        .unwrap();
    assert_eq!(
        outcome(bridge).await,
        Outcome::Ended("the guest web stopped".into())
    );
    assert!(read_to_eof(&mut viewer).await.is_empty());
    assert!(
        matches!(next(&mut server).await, Some(Message::Close(_))),
        "the bridge closes the stream"
    );
}

#[tokio::test]
async fn the_viewers_eof_sends_a_close() {
    let (mut viewer, mut server, bridge) = setup().await;
    viewer.write_all(b"last").await.unwrap();
    viewer.shutdown().await.unwrap();
    assert_eq!(
        next(&mut server).await,
        Some(Message::binary(frame(DATA_IN, b"last")))
    );
    assert!(matches!(next(&mut server).await, Some(Message::Close(_))));
    // Polling on sends the answering Close; then the stream is over.
    assert_eq!(next(&mut server).await, None);
    assert_eq!(outcome(bridge).await, Outcome::ViewerClosed);
    assert!(read_to_eof(&mut viewer).await.is_empty());
}

#[tokio::test]
async fn the_servers_close_shuts_the_viewer_down() {
    let (mut viewer, mut server, bridge) = setup().await;
    server
        .send(Message::binary(frame(DATA_OUT, b"bye")))
        .await
        .unwrap();
    server
        .close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "operator restarting".into(),
        }))
        .await
        .unwrap();
    assert_eq!(read_to_eof(&mut viewer).await, b"bye");
    assert_eq!(
        outcome(bridge).await,
        Outcome::ServerClosed(Some("operator restarting".into()))
    );
}

#[test]
fn the_banner_names_the_vm_and_the_address() {
    let line = console::banner("tenant-a", "web", "127.0.0.1:5901".parse().unwrap());
    assert_eq!(
        line,
        "Console of VirtualMachine tenant-a/web on 127.0.0.1:5901; \
         connect a VNC viewer to it (vncviewer 127.0.0.1::5901)"
    );
    let v6 = console::banner("ns", "vm", "[::1]:5902".parse().unwrap());
    assert!(v6.contains(" on [::1]:5902; ") && v6.ends_with("(vncviewer [::1]::5902)"));
}

#[test]
fn a_refusal_gives_the_code_and_the_message() {
    let forbidden = Status::failure(
        "virtualmachines.subresources.ferry.dev \"web\" is forbidden: User \"bob\" cannot get \
         resource \"virtualmachines/console\"",
        "Forbidden",
    )
    .with_code(403);
    assert_eq!(
        console::refusal(&kube::Error::Api(forbidden.boxed())),
        "403 Forbidden: virtualmachines.subresources.ferry.dev \"web\" is forbidden: User \
         \"bob\" cannot get resource \"virtualmachines/console\""
    );
    // A body that was no Status: the HTTP reason, not kube's "Failed to parse".
    let plain =
        Status::failure("no endpoints available", "Failed to parse error data").with_code(503);
    assert_eq!(
        console::refusal(&kube::Error::Api(plain.boxed())),
        "503 Service Unavailable: no endpoints available"
    );
}

#[test]
fn a_status_message_falls_back_to_the_reason_then_the_text() {
    assert_eq!(
        console::status_message(br#"{"kind":"Status","message":"gone","reason":"NotFound"}"#),
        "gone"
    );
    assert_eq!(
        console::status_message(br#"{"kind":"Status","reason":"NotFound"}"#),
        "NotFound"
    );
    assert_eq!(console::status_message(b"plain words\n"), "plain words");
}

//! TLS on the migration stream, real QEMU, no Kubernetes: a TLS migration completes with
//! the guest's memory intact, and the target's port refuses everything but the source
//! node's certificate — a plain TCP client, a certificate from another CA, and a
//! certificate from the right CA for another node — while it keeps waiting for the
//! real stream.

mod support;

use ferry_agent::phases::prepare::PrepareOutput;
use ferry_agent::qmp::{MigrationInfo, StatusInfo};
use ferry_agent::supervisor::Supervisor;
use ferry_agent::tls::{AUTHZ_ID, CREDS_ID, Credentials};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use support::pki::TestCa;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The start of a QEMU migration stream (magic "QEVM", version 3), then filler: what
/// the target would parse if the connection were let through.
const STREAM_START: &[u8] = b"QEVM\0\0\0\x03garbage that is not a migration stream";

fn port_of(prep: &PrepareOutput) -> u16 {
    prep.uri.rsplit(':').next().unwrap().parse().unwrap()
}

/// Sends the start of a stream and reads until the target closes the connection.
/// Returns what was read back (a refused connection yields nothing) or the error.
async fn send_and_read<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<Vec<u8>, String> {
    let _ = s.write_all(STREAM_START).await;
    let _ = s.flush().await;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await {
        Err(_) => panic!("the target kept the connection open for a minute"),
        Ok(Ok(_)) => Ok(buf),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// A TLS client presenting `client` (trusting `trust` for the server's certificate),
/// speaking to `node-b` at `port`. Returns the outcome of talking through it.
async fn tls_client(trust: &str, client: &Credentials, port: u16) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trust.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(client.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(client.key.as_bytes()).unwrap(),
        )
        .unwrap();
    let tcp = TcpStream::connect(("127.0.0.3", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("node-b").unwrap();
    match connector.connect(name, tcp).await {
        Ok(stream) => send_and_read(stream).await,
        Err(e) => Err(format!("handshake: {e}")),
    }
}

/// The target still waits for its stream, paused.
async fn assert_still_waiting(b: &Supervisor, vm: &str) {
    let guest = b.require(vm).await.expect("the target QEMU is still there");
    let status: StatusInfo = guest.qmp.execute("query-status", None).await.unwrap();
    assert_eq!(status.status, "inmigrate");
    let info: MigrationInfo = guest.qmp.execute("query-migrate", None).await.unwrap();
    assert_ne!(info.status.as_deref(), Some("failed"), "{info:?}");
}

/// The TLS objects Ferry adds, present in a QEMU now.
async fn tls_objects(sup: &Supervisor, vm: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Prop {
        name: String,
    }
    let guest = sup.require(vm).await.unwrap();
    let props: Vec<Prop> = guest
        .qmp
        .execute("qom-list", Some(serde_json::json!({"path": "/objects"})))
        .await
        .unwrap();
    props
        .into_iter()
        .map(|p| p.name)
        .filter(|n| n == CREDS_ID || n == AUTHZ_ID)
        .collect()
}

#[tokio::test]
async fn only_the_source_node_gets_through_and_the_guest_migrates_intact() {
    let lab = Lab::new("tls", 128, 48, 5_000_000).with_tls();
    let tls_a = lab.tls_a().unwrap();
    lab.start_source().await;
    let vm = lab.vm.as_str();
    let m = "m-tls";
    let params = policy(None, 2000);
    // With the lab's TLS: node-b's credentials in Prepare, node-a's in Perform.
    let prep = lab.begin_and_prepare(m, &params).await.unwrap();
    let port = port_of(&prep);
    assert_eq!(
        tls_objects(&lab.b, vm).await.len(),
        2,
        "creds and authz on the target"
    );
    assert!(
        !lab.b.vm_dir(vm).join("tls").exists(),
        "the key files are removed once QEMU has read them"
    );

    // 1. Plain TCP: the TLS handshake fails, the target closes the connection.
    let tcp = TcpStream::connect(("127.0.0.3", port)).await.unwrap();
    let plain = send_and_read(tcp).await;
    eprintln!("plain TCP client: {plain:?}");
    assert!(
        !matches!(&plain, Ok(b) if b.windows(4).any(|w| w == b"QEVM")),
        "{plain:?}"
    );
    assert_still_waiting(&lab.b, vm).await;

    // 2. A certificate from another CA, for the right name.
    let stranger = TestCa::new("another CA").node("node-a");
    let other_ca = tls_client(&tls_a.ca, &stranger, port).await;
    eprintln!("client with another CA's certificate: {other_ca:?}");
    assert!(
        other_ca.as_ref().is_ok_and(|b| b.is_empty()) || other_ca.is_err(),
        "{other_ca:?}"
    );
    assert_still_waiting(&lab.b, vm).await;

    // 3. The right CA, another node: the target's authz accepts only CN=node-a.
    let node_c = lab.ca.as_ref().unwrap().node("node-c");
    let other_node = tls_client(&tls_a.ca, &node_c, port).await;
    eprintln!("client with node-c's certificate: {other_node:?}");
    assert!(
        other_node.as_ref().map_or(true, |b| b.is_empty()),
        "{other_node:?}"
    );
    assert_still_waiting(&lab.b, vm).await;

    // The real source still gets through, and the guest arrives whole.
    let perf = within(lab.perform(m, &prep, &params, &CancellationToken::new(), |_| {}))
        .await
        .unwrap();
    assert!(perf.transferred_bytes > 0);
    let before = std::fs::read_to_string(lab.serial_a()).unwrap();
    let fin = lab
        .finish(&lab.b, m, Some(&perf.cookie), false)
        .await
        .unwrap();
    assert!(fin.resumed);
    assert!(
        tls_objects(&lab.b, vm).await.is_empty(),
        "the target guest keeps no TLS objects"
    );
    lab.confirm(&lab.a, m, fin.cookie.as_deref(), false)
        .await
        .unwrap();
    lab.assert_one_guest_on(&lab.b);
    lab.assert_continues_on_b(&before, 3).await;
    // The target refused each stranger for its own reason (GnuTLS / QEMU 7.2 wording);
    // authz-simple compares the DN in GnuTLS's RFC 4514 form, "CN=<node>".
    let log = std::fs::read_to_string(lab.b.vm_dir(vm).join("qemu.log")).unwrap();
    for why in [
        "TLS handshake failed",
        "hasn't got a known issuer",
        "TLS x509 authz check for CN=node-c is denied",
    ] {
        assert!(log.contains(why), "target log lacks '{why}':\n{log}");
    }
    assert!(!log.contains("CN=node-a is denied"), "{log}");
}

/// Positive control for the refusals above: a client with the source's own certificate
/// is let through, and the bytes it sends reach QEMU's stream parser (which fails the
/// incoming migration on them).
#[tokio::test]
async fn the_source_certificate_is_let_through_to_the_stream() {
    let lab = Lab::new("tls-ctl", 64, 16, 5_000_000).with_tls();
    let tls_a = lab.tls_a().unwrap();
    lab.start_source().await;
    let m = "m-tls-ctl";
    let prep = lab.begin_and_prepare(m, &policy(None, 2000)).await.unwrap();
    let res = tls_client(&tls_a.ca, tls_a, port_of(&prep)).await;
    eprintln!("client with node-a's certificate: {res:?}");
    // QEMU read our garbage as a stream and gave up on the incoming migration.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let failed = match lab.b.require(&lab.vm).await {
            Err(_) => true,
            Ok(g) => match g.qmp.execute::<MigrationInfo>("query-migrate", None).await {
                Ok(info) => info.status.as_deref() == Some("failed"),
                Err(_) => true,
            },
        };
        if failed || lab.b.running_pid(&lab.vm).is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the source's certificate did not reach the stream"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(lab.b.vm_dir(&lab.vm).join("qemu.log")).unwrap();
    eprintln!("target QEMU log:\n{log}");
    assert!(log.contains("load of migration failed"), "{log}");
    assert!(
        !log.contains("authz") && !log.contains("handshake failed"),
        "{log}"
    );
}

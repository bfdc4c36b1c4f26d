//! Consoles the cluster authorises (issue 15, "The guest's network and console are not
//! the node's"): `kubectl ferry console` reaches a guest's VNC console only through the
//! apiserver — the operator's aggregated API, which asks the apiserver whether the caller
//! may `get` `virtualmachines/console` — on the real control plane with the chart's
//! APIService and RBAC. The apiserver's aggregator reaches the operator process through
//! the harness's SIMULATED ROUTING of the chart's Service (tests/src/console_route.rs).
//!
//! Shown: a user bound to the chart's console role reads the guest's RFB greeting
//! through the plugin, before and after the guest migrates; a user without the right
//! gets 403, as does the first user for a VM in another namespace; the agents open a
//! console only for the operator's console proxy, not for a node's certificate.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ferry_crds::MigrationPhase;
use ferry_tests::cluster::Cluster;
use ferry_tests::e2e_support::*;
use ferry_tests::peer_client::{self, PeerClient};
use ferry_tests::repo_root;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;

/// The RFB protocol version QEMU's VNC server greets with.
const RFB_GREETING: &[u8] = b"RFB 003.008\n";

/// A ServiceAccount `name` in `default` and a kubeconfig of its token; bound to the
/// chart's console ClusterRole in `default` when `console_user`.
async fn user(
    cluster: &Cluster,
    admin: &Client,
    name: &str,
    console_user: bool,
) -> (std::path::PathBuf, Client) {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    if console_user {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-console")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "ferry-console-user"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "default"}],
        }))
        .unwrap();
        Api::<RoleBinding>::namespaced(admin.clone(), "default")
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
    }
    let req: TokenRequest = serde_json::from_value(json!({"spec": {
        "audiences": ["https://kubernetes.default.svc.cluster.local"], "expirationSeconds": 3600,
    }}))
    .unwrap();
    let token = sas
        .create_token_request(name, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .unwrap();
    let path = cluster.cp.dir().join(format!("{name}.kubeconfig"));
    let client = cluster
        .cp
        .client_for_token(name, &token, &path)
        .await
        .unwrap();
    (path, client)
}

/// `kubectl ferry console VM -n NS` as the user of `kubeconfig`, and the local address
/// it prints.
async fn plugin(
    cluster: &Cluster,
    kubeconfig: &Path,
    ns: &str,
    vm: &str,
) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(cluster.bin_dir().join("kubectl-ferry"))
        .args(["console", vm, "-n", ns])
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    println!("kubectl ferry console {vm}: {}", line.trim());
    let addr = line
        .split(" on ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (child, addr)
}

/// Connects a viewer to `addr` and reads what the console sends first (up to 12 bytes,
/// or less if it closes).
async fn greeting(addr: &str) -> Vec<u8> {
    let mut viewer = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 12];
        while got.len() < RFB_GREETING.len() {
            match viewer
                .read(&mut buf[..RFB_GREETING.len() - got.len()])
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await
        .expect("the console answers or closes within 30 s");
    got
}

/// The Status code and message the console API answers `client` with for `ns/vm`.
async fn refusal(client: &Client, ns: &str, vm: &str) -> (u16, String) {
    let request = http::Request::get(ferry_crds::console::path(ns, vm))
        .body(vec![])
        .unwrap();
    match client.connect(request).await {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        Err(e) => panic!("console of {ns}/{vm}: not a Status: {e}"),
        Ok(_) => panic!("console of {ns}/{vm}: opened"),
    }
}

fn log_count(cluster: &Cluster, file: &str, needle: &str) -> usize {
    std::fs::read_to_string(cluster.cp.dir().join(file))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[tokio::test]
async fn only_a_user_the_cluster_authorises_reaches_a_console_and_it_follows_the_guest() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cluster, admin) = up().await;
    let _logs = LogsOnFailure(cluster.cp.dir().to_path_buf());
    example_vm_running(&cluster, &admin).await;
    let (alice, alice_client) = user(&cluster, &admin, "alice", true).await;
    let (bob, bob_client) = user(&cluster, &admin, "bob", false).await;

    // Allowed: the guest's greeting, through the plugin, the apiserver and node-a's agent.
    let (mut console, addr) = plugin(&cluster, &alice, "default", "demo").await;
    let got = eventually(
        "the console API serves",
        Duration::from_secs(60),
        || async {
            let got = greeting(&addr).await;
            (got == RFB_GREETING).then_some(got)
        },
    )
    .await;
    println!(
        "alice, default/demo on node-a: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(log_count(&cluster, "agent-node-a.log", "console open") >= 1);

    // Refused: bob has no right; alice has none in another namespace. The Status is the
    // console API's, naming the user and the subresource.
    let (code, message) = refusal(&bob_client, "default", "demo").await;
    println!("bob, default/demo: {code} {message}");
    assert_eq!(code, 403);
    assert!(
        message.contains(
            "\"system:serviceaccount:default:bob\" cannot get resource \"virtualmachines/console\""
        ),
        "{message}"
    );
    let (code, message) = refusal(&alice_client, "tenant-b", "demo").await;
    println!("alice, tenant-b/demo: {code} {message}");
    assert_eq!(code, 403);
    assert!(
        message.contains("in the namespace \"tenant-b\""),
        "{message}"
    );
    // Allowed but absent: a VM that does not exist is named as such, only after the check.
    let (code, message) = refusal(&alice_client, "default", "nobody").await;
    println!("alice, default/nobody: {code} {message}");
    assert_eq!(code, 404);
    // Through the plugin, bob's viewer is closed without a byte of the guest's.
    let (mut denied, bob_addr) = plugin(&cluster, &bob, "default", "demo").await;
    assert_eq!(greeting(&bob_addr).await, b"", "bob's viewer gets nothing");
    denied.kill().await.unwrap();
    let mut stderr = String::new();
    denied
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    println!("bob's plugin: {}", stderr.trim());
    assert!(stderr.contains("refused: 403 Forbidden"), "{stderr}");

    // The agents open consoles for the console proxy only: node-a's certificate cannot
    // open the console of the guest on node-b's agent (or its own).
    let endpoint = peer_client::endpoint(&admin, "node-a").await.unwrap();
    let as_node_b = PeerClient::for_node(&cluster.node("node-b").state_dir, true).unwrap();
    let (code, body) = as_node_b
        .get_upgrade(
            endpoint,
            "node-a",
            &ferry_crds::console::agent_path("default", "demo"),
            "ferry-console",
        )
        .await
        .unwrap();
    println!("node-b's certificate at node-a's agent: {code} {body}");
    assert_eq!(code, 403);
    assert!(body.contains("is not the console proxy"), "{body}");

    // Migrated: the same plugin process reaches the guest on node-b.
    apply(&cluster, &repo_root().join("examples/migration.yaml")).await;
    let vmms = Api::namespaced(admin.clone(), "default");
    wait_phase(
        &vmms,
        "demo-to-node-b",
        MigrationPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    let got = greeting(&addr).await;
    println!(
        "alice, default/demo on node-b: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(got, RFB_GREETING);
    assert!(log_count(&cluster, "agent-node-b.log", "console open") >= 1);
    assert!(
        console.try_wait().unwrap().is_none(),
        "the plugin still serves"
    );
    console.kill().await.unwrap();
}

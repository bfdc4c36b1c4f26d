//! The API fault proxy (ferry_tests::api_proxy) against the real kube-apiserver: a
//! kube::Client whose kubeconfig names the proxy works as against the apiserver itself
//! (TLS both ways, its token passed through, a watch streaming), and each fault arrives
//! as the client sees it — 409, 500 and 429 as `Status` errors (a 429 retried by kube's
//! default retry after its Retry-After), a hang past the client's read timeout, a reset
//! connection, and a partition that cuts a watch and refuses new connections until it
//! heals. No QEMU, no chart.

use std::time::{Duration, Instant};

use ferry_runtime::api::ApiClients;
use ferry_tests::ControlPlane;
use ferry_tests::api_proxy::{ApiProxy, FaultKind, Injection, Matcher, Verb};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

/// The admin's client config through `proxy`.
async fn config_via(cp: &ControlPlane, proxy: &ApiProxy, file: &str) -> Config {
    let path = cp.dir().join(file);
    cp.write_kubeconfig_via(&path, &proxy.url(), "ferry-admin", cp.admin_token())
        .unwrap();
    let kc = Kubeconfig::read_from(&path).unwrap();
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap()
}

fn configmap(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"n": "0"}})).unwrap()
}

async fn bump(api: &Api<ConfigMap>, name: &str, n: u32) -> kube::Result<ConfigMap> {
    let patch = json!({"data": {"n": n.to_string()}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

/// The next event of a watch that is not a bookmark (`None` when the watch ended or
/// failed).
async fn next_change<S>(events: &mut S) -> Option<WatchEvent<ConfigMap>>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin,
{
    loop {
        match events.next().await? {
            Ok(WatchEvent::Bookmark(_)) => continue,
            Ok(event) => return Some(event),
            Err(_) => return None,
        }
    }
}

/// The Status a failed call carries; panics on any other error.
fn status_of(result: kube::Result<ConfigMap>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected a Status error, got {other:?}"),
    }
}

#[tokio::test]
async fn each_fault_arrives_as_the_client_sees_it() {
    let cp = ControlPlane::start().await.unwrap();
    let proxy = cp.start_api_proxy().unwrap();
    let config = config_via(&cp, &proxy, "via-proxy.kubeconfig").await;
    assert!(config.cluster_url.to_string().starts_with(&proxy.url()));
    let client = Client::try_from(config.clone()).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    // Through the proxy as through the apiserver: the token is the admin's (it may
    // create), and a watch streams an event that happens after it began.
    cms.create(&PostParams::default(), &configmap("c1"))
        .await
        .unwrap();
    let mut events = cms
        .watch(&WatchParams::default().fields("metadata.name=c1"), "0")
        .await
        .unwrap()
        .boxed();
    // The watch opens with the object as it is (resourceVersion 0).
    assert!(matches!(
        next_change(&mut events).await,
        Some(WatchEvent::Added(_))
    ));
    bump(&cms, "c1", 1).await.unwrap();
    let modified = tokio::time::timeout(Duration::from_secs(10), next_change(&mut events))
        .await
        .expect("the watch event streams through");
    assert!(
        matches!(&modified, Some(WatchEvent::Modified(cm)) if cm.data.as_ref().unwrap()["n"] == "1"),
        "{modified:?}"
    );
    let forwarded = proxy.forwarded();
    assert!(
        forwarded >= 3,
        "{forwarded} requests forwarded (create, watch, patch)"
    );

    // 409, with the Status the apiserver would write; the next patch goes through.
    let patches = || Matcher::new(Verb::Patch, "configmaps");
    proxy.fail_next(1, patches(), Injection::Conflict);
    let s = status_of(bump(&cms, "c1", 2).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"), "{s:?}");
    assert!(s.message.contains("the object has been modified"), "{s:?}");
    bump(&cms, "c1", 2).await.unwrap();

    // 500, twice: both calls fail, a third succeeds.
    proxy.fail_next(2, patches(), Injection::ServerError);
    for n in [3, 3] {
        let s = status_of(bump(&cms, "c1", n).await);
        assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"), "{s:?}");
    }
    assert_eq!(proxy.pending(), 0);
    bump(&cms, "c1", 3).await.unwrap();

    // The matcher takes only its kind: a get, and a patch of another resource, pass.
    proxy.fail_next(
        1,
        Matcher::new(Verb::Patch, "leases"),
        Injection::ServerError,
    );
    cms.get("c1").await.unwrap();
    bump(&cms, "c1", 4).await.unwrap();
    assert_eq!(proxy.pending(), 1);
    proxy.clear();
    // A watch is its own verb.
    proxy.fail_next(
        1,
        Matcher::new(Verb::Watch, "configmaps"),
        Injection::ServerError,
    );
    cms.list(&Default::default()).await.unwrap();
    let watch = cms.watch(&WatchParams::default(), "0").await;
    match watch {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 500),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("the watch was not failed"),
    }

    // 429 with Retry-After: kube's default retry waits it out and the call succeeds; a
    // client without the retry sees the 429 itself, its header and its Status.
    proxy.fail_next(
        1,
        patches(),
        Injection::TooManyRequests {
            retry_after_seconds: 1,
        },
    );
    let began = Instant::now();
    bump(&cms, "c1", 5).await.unwrap();
    let waited = began.elapsed();
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    println!("429 with kube's default retry: succeeded after {waited:?}");
    let mut plain = config.clone();
    plain.default_retry = false;
    let plain = Client::try_from(plain).unwrap();
    let plain_cms: Api<ConfigMap> = Api::namespaced(plain.clone(), "default");
    proxy.fail_next(
        1,
        patches(),
        Injection::TooManyRequests {
            retry_after_seconds: 1,
        },
    );
    let s = status_of(bump(&plain_cms, "c1", 6).await);
    println!("429 without kube's retry: {s:?}");
    assert_eq!(
        (s.code, s.reason.as_str()),
        (429, "TooManyRequests"),
        "{s:?}"
    );
    proxy.fail_next(
        1,
        Matcher::new(Verb::Get, "configmaps"),
        Injection::TooManyRequests {
            retry_after_seconds: 7,
        },
    );
    let raw = http::Request::get("/api/v1/namespaces/default/configmaps/c1")
        .body(Vec::new().into())
        .unwrap();
    let response = plain.send(raw).await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");

    // A hang past the client's read timeout: the client gives up; without a timeout it
    // waits out the hang and then sees the connection reset.
    let mut impatient = config.clone();
    impatient.read_timeout = Some(Duration::from_secs(1));
    let impatient: Api<ConfigMap> =
        Api::namespaced(Client::try_from(impatient).unwrap(), "default");
    proxy.fail_next(1, patches(), Injection::Hang(Duration::from_secs(30)));
    let began = Instant::now();
    let e = bump(&impatient, "c1", 7).await.unwrap_err();
    let gave_up = began.elapsed();
    println!("hang, 1 s read timeout: after {gave_up:?}: {e}");
    assert!(!matches!(e, kube::Error::Api(_)), "{e:?}");
    assert!(
        gave_up >= Duration::from_secs(1) && gave_up < Duration::from_secs(10),
        "the client gave up after {gave_up:?}: {e}"
    );
    proxy.fail_next(1, patches(), Injection::Hang(Duration::from_secs(2)));
    let began = Instant::now();
    let e = bump(&cms, "c1", 7).await.unwrap_err();
    println!("hang, no read timeout: after {:?}: {e}", began.elapsed());
    assert!(!matches!(e, kube::Error::Api(_)), "{e:?}");
    assert!(
        began.elapsed() >= Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );

    // A reset: a connection error, no answer.
    proxy.fail_next(1, patches(), Injection::Reset);
    let e = bump(&cms, "c1", 8).await.unwrap_err();
    println!("reset: {e}");
    assert!(!matches!(e, kube::Error::Api(_)), "{e:?}");
    bump(&cms, "c1", 8).await.unwrap();

    // A partition cuts an open watch and refuses new connections until it heals.
    let mut events = cms
        .watch(&WatchParams::default().fields("metadata.name=c1"), "0")
        .await
        .unwrap()
        .boxed();
    assert!(next_change(&mut events).await.is_some());
    proxy.partition(Duration::from_secs(3));
    let ended = tokio::time::timeout(Duration::from_secs(5), next_change(&mut events))
        .await
        .expect("the partition cut the watch");
    assert!(ended.is_none(), "{ended:?}");
    let fresh: Api<ConfigMap> =
        Api::namespaced(Client::try_from(config.clone()).unwrap(), "default");
    let e = fresh.get("c1").await.unwrap_err();
    println!("partitioned, a new connection: {e}");
    assert!(!matches!(e, kube::Error::Api(_)), "{e:?}");
    assert!(proxy.partitioned());
    let healed = Instant::now() + Duration::from_secs(10);
    while proxy.partitioned() {
        assert!(Instant::now() < healed, "the partition never healed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fresh.get("c1").await.unwrap();
    bump(&cms, "c1", 9).await.unwrap();

    let counts = proxy.injected();
    println!("injected: {counts:?}; hits: {:?}", proxy.hits());
    for (kind, want) in [
        (FaultKind::Conflict, 1),
        (FaultKind::ServerError, 3),
        (FaultKind::TooManyRequests, 3),
        (FaultKind::Hang, 2),
        (FaultKind::Reset, 1),
    ] {
        assert_eq!(counts.get(&kind), Some(&want), "{kind:?}: {counts:?}");
    }
    assert!(
        counts.get(&FaultKind::PartitionCut) >= Some(&1),
        "{counts:?}"
    );
    assert!(
        counts.get(&FaultKind::PartitionRefused) >= Some(&1),
        "{counts:?}"
    );
}

/// The clients the operator and the agents reach the apiserver with
/// (ferry_runtime::api): a request the apiserver never answers fails after the request
/// timeout, so the caller's retry runs instead of waiting out the hang (the API matrix's
/// `Hang` rows); a watch through the other client stays open while nothing changes for
/// longer than that timeout, and sees the next change — through the bounded client the
/// same watch is cut.
#[tokio::test]
async fn the_components_bound_their_requests_but_not_their_watches() {
    let cp = ControlPlane::start().await.unwrap();
    let proxy = cp.start_api_proxy().unwrap();
    let config = config_via(&cp, &proxy, "components.kubeconfig").await;
    let timeout = Duration::from_secs(1);
    let clients = ApiClients::from_config(config, timeout).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(clients.requests.clone(), "default");
    cms.create(&PostParams::default(), &configmap("c1"))
        .await
        .unwrap();

    let hang = Duration::from_secs(30);
    proxy.fail_next(
        1,
        Matcher::new(Verb::Patch, "configmaps"),
        Injection::Hang(hang),
    );
    let began = Instant::now();
    let e = bump(&cms, "c1", 1).await.unwrap_err();
    let gave_up = began.elapsed();
    println!("hang, the requests client ({timeout:?}): failed after {gave_up:?}: {e}");
    assert!(!matches!(e, kube::Error::Api(_)), "{e:?}");
    assert!(
        gave_up < hang,
        "the request waited out the hang: {gave_up:?}"
    );
    let rv = bump(&cms, "c1", 1)
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    let params = WatchParams::default().fields("metadata.name=c1");
    let watched: Api<ConfigMap> = Api::namespaced(clients.watches.clone(), "default");
    let mut kept = watched.watch(&params, &rv).await.unwrap().boxed();
    let mut cut = cms.watch(&params, &rv).await.unwrap().boxed();
    tokio::time::sleep(timeout * 3).await;
    bump(&cms, "c1", 2).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), next_change(&mut kept))
        .await
        .expect("the idle watch saw nothing");
    println!("idle watch, the watches client: {seen:?}");
    assert!(matches!(seen, Some(WatchEvent::Modified(_))), "{seen:?}");
    let ended = tokio::time::timeout(Duration::from_secs(10), next_change(&mut cut))
        .await
        .expect("the bounded watch neither ended nor saw the change");
    println!("idle watch, the requests client: {ended:?}");
    assert!(ended.is_none(), "{ended:?}");
}

/// The apiserver restarts on the same port with the same certificates, and etcd keeps
/// what was written before; a client through the proxy carries on once it is back.
#[tokio::test]
async fn the_apiserver_restarts_keeping_its_data() {
    let mut cp = ControlPlane::start().await.unwrap();
    let proxy = cp.start_api_proxy().unwrap();
    let client = Client::try_from(config_via(&cp, &proxy, "via-proxy.kubeconfig").await).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    cms.create(&PostParams::default(), &configmap("kept"))
        .await
        .unwrap();
    let url = cp.url.clone();
    cp.stop_apiserver();
    let e = cms.get("kept").await.unwrap_err();
    assert!(!matches!(e, kube::Error::Api(_)), "{e:?}");
    cp.start_apiserver().await.unwrap();
    assert_eq!(cp.url, url);
    let kept = cms.get("kept").await.unwrap();
    assert_eq!(kept.data.unwrap()["n"], "0");
    let admin: Api<ConfigMap> = Api::namespaced(cp.admin_client().await.unwrap(), "default");
    admin.get("kept").await.unwrap();
    cp.restart_apiserver().await.unwrap();
    cms.get("kept").await.unwrap();
}

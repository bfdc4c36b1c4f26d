//! The foundation against a real kube-apiserver: the chart installs and uninstalls
//! cleanly, the CRDs accept the examples and refuse bad objects naming the field, and
//! the chart's ServiceAccounts can do what the design needs and no more.

use ferry_tests::{ControlPlane, printed, repo_root};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;

const RELEASE: &str = "ferry";
const NAMESPACE: &str = "ferry-system";

async fn helm_install(cp: &ControlPlane) {
    cp.install_chart(RELEASE, NAMESPACE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn established(cp: &ControlPlane, name: &str) -> bool {
    let crds: Api<CustomResourceDefinition> = Api::all(cp.admin_client().await.unwrap());
    for _ in 0..100 {
        if let Ok(crd) = crds.get(name).await {
            let conds = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            if conds
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
            {
                return true;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn helm_install_establishes_crds_and_uninstall_leaves_nothing_but_them() {
    let cp = ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("control plane: {e}"));
    helm_install(&cp).await;
    for crd in [
        "virtualmachines.ferry.dev",
        "virtualmachinemigrations.ferry.dev",
    ] {
        assert!(established(&cp, crd).await, "{crd} is not established");
    }

    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let kinds = "deployments,daemonsets,services,serviceaccounts,roles,rolebindings";
    let cluster_kinds = "clusterroles,clusterrolebindings";
    let list = |kinds: &'static str, namespaced: bool| {
        let mut cmd = cp.kubectl();
        cmd.args(["get", kinds, "-l", &selector, "-o", "name"]);
        if namespaced {
            cmd.args(["-n", NAMESPACE]);
        }
        cmd
    };
    let before = list(kinds, true).output().await.unwrap();
    let before_text = printed(&before);
    for expected in [
        "deployment.apps/ferry-operator",
        "daemonset.apps/ferry-agent",
        "service/ferry-metrics",
        "serviceaccount/ferry-operator",
        "serviceaccount/ferry-agent",
    ] {
        assert!(
            before_text.contains(expected),
            "{expected} missing after install:\n{before_text}"
        );
    }

    let out = cp
        .helm()
        .args(["uninstall", RELEASE, "--namespace", NAMESPACE])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "helm uninstall failed:\n{}",
        printed(&out)
    );
    // Helm reports the kept CRDs; everything else the chart owned is gone.
    assert!(
        printed(&out).contains("kept due to the resource policy"),
        "helm should say it kept the CRDs:\n{}",
        printed(&out)
    );
    for (kinds, namespaced) in [(kinds, true), (cluster_kinds, false)] {
        let after = list(kinds, namespaced).output().await.unwrap();
        assert!(after.status.success(), "{}", printed(&after));
        // `-o name` prints one line per object found.
        assert_eq!(
            String::from_utf8_lossy(&after.stdout).trim(),
            "",
            "left behind by uninstall"
        );
    }
    for crd in [
        "virtualmachines.ferry.dev",
        "virtualmachinemigrations.ferry.dev",
    ] {
        assert!(
            established(&cp, crd).await,
            "{crd} was removed by uninstall"
        );
    }
}

#[tokio::test]
async fn examples_apply_and_bad_objects_are_refused_naming_the_field() {
    let cp = ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("control plane: {e}"));
    helm_install(&cp).await;
    assert!(established(&cp, "virtualmachinemigrations.ferry.dev").await);

    let out = cp
        .kubectl()
        .arg("apply")
        .arg("-f")
        .arg(repo_root().join("examples"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "examples refused:\n{}", printed(&out));

    let migration = |name: &str, spec: &str| {
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachineMigration\n\
             metadata:\n  name: {name}\nspec:\n{spec}"
        )
    };
    let cases = [
        (
            migration("no-vm", "  targetNode: node-b\n"),
            "spec.vmName: Required value",
        ),
        (
            migration(
                "negative-bandwidth",
                "  vmName: demo\n  policy:\n    bandwidthMiBps: -1\n",
            ),
            "spec.policy.bandwidthMiBps: Invalid value: -1: spec.policy.bandwidthMiBps in body should be greater than or equal to 0",
        ),
        (
            migration(
                "bad-enum",
                "  vmName: demo\n  policy:\n    compression: Brotli\n",
            ),
            "spec.policy.compression: Unsupported value: \"Brotli\"",
        ),
        (
            migration(
                "post-copy-without-seconds",
                "  vmName: demo\n  policy:\n    postCopy:\n      mode: AfterSeconds\n",
            ),
            "afterSeconds is required when mode is AfterSeconds",
        ),
        (
            "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: no-xml\n\
             spec:\n  nodeName: node-a\n"
                .to_string(),
            "spec.domainXML: Required value",
        ),
    ];
    for (yaml, expected) in cases {
        let (ok, said) = cp.apply(&yaml).await;
        assert!(!ok, "accepted a bad object:\n{yaml}");
        assert!(said.contains(expected), "expected {expected:?} in:\n{said}");
    }

    // vmName is immutable.
    let (ok, said) = cp
        .apply(&migration("demo-to-node-b", "  vmName: other\n"))
        .await;
    assert!(!ok, "vmName changed");
    assert!(said.contains("vmName is immutable"), "{said}");

    // kubectl explain reads the schema descriptions.
    let out = cp
        .kubectl()
        .args(["explain", "virtualmachinemigrations.spec.targetDomainXML"])
        .output()
        .await
        .unwrap();
    let words = printed(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        words.contains("checks it for guest ABI stability"),
        "{words}"
    );
}

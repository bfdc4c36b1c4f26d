//! kubectl and helm against a [`ControlPlane`], for tests and the harness.

use std::process::{Output, Stdio};

use tokio::io::AsyncWriteExt;

use crate::{ControlPlane, HarnessError, repo_root};

/// What a command printed, stdout then stderr.
pub fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl ControlPlane {
    /// `kubectl apply -f -` of `yaml`; whether it was accepted and what kubectl said.
    pub async fn apply(&self, yaml: &str) -> (bool, String) {
        let mut child = self
            .kubectl()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(yaml.as_bytes())
            .await
            .expect("kubectl reads its input");
        drop(stdin);
        let out = child.wait_with_output().await.expect("kubectl ends");
        (out.status.success(), printed(&out))
    }

    /// `helm install <release> charts/ferry` into `namespace` (created if missing).
    pub async fn install_chart(&self, release: &str, namespace: &str) -> Result<(), HarnessError> {
        self.install_chart_with(release, namespace, &[]).await
    }

    /// Like [`ControlPlane::install_chart`], with `--set` values (`key=value`).
    pub async fn install_chart_with(
        &self,
        release: &str,
        namespace: &str,
        values: &[&str],
    ) -> Result<(), HarnessError> {
        let mut helm = self.helm();
        helm.args(["install", release])
            .arg(repo_root().join("charts/ferry"))
            .args(["--namespace", namespace, "--create-namespace"]);
        for v in values {
            helm.args(["--set", v]);
        }
        let out = helm.output().await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(HarnessError::Setup(format!(
                "helm install: {}",
                printed(&out)
            )))
        }
    }

    /// The chart in `namespace`, then the examples applied in a new namespace
    /// `examples_namespace` (retried until the chart's CRDs are established).
    pub async fn chart_with_examples(
        &self,
        namespace: &str,
        examples_namespace: &str,
    ) -> Result<(), HarnessError> {
        self.install_chart("ferry", namespace).await?;
        let (ok, said) = self
            .apply(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {examples_namespace}\n"
            ))
            .await;
        if !ok {
            return Err(HarnessError::Setup(format!("namespace: {said}")));
        }
        let mut said = String::new();
        for _ in 0..100 {
            let out = self
                .kubectl()
                .args(["apply", "-n", examples_namespace, "-f"])
                .arg(repo_root().join("examples"))
                .output()
                .await?;
            said = printed(&out);
            if out.status.success() {
                return Ok(());
            }
            // The CRDs may not be established yet.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(HarnessError::Setup(format!("examples: {said}")))
    }
}

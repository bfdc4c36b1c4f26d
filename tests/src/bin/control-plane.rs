//! Runs the local control plane (etcd + kube-apiserver) until interrupted, and prints
//! the admin kubeconfig's path. `make up` builds on it.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cp = match ferry_tests::ControlPlane::start().await {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("control plane: {e}");
            std::process::exit(1);
        }
    };
    println!("kube-apiserver: {}", cp.url);
    println!("export KUBECONFIG={}", cp.kubeconfig.display());
    let _ = tokio::signal::ctrl_c().await;
    cp.stop();
}

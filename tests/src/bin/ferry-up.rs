//! `make up`: a local Ferry left running — the control plane, the chart, the operator
//! and N agents as host processes — until SIGTERM or Ctrl-C (`make down`).
//!
//! With `--real`, the nodes are real (kubelet, containerd, kube-proxy each in a network
//! namespace of its own) and Ferry runs as the chart's Pods under them, from the images
//! `make images` built, installed with helm.
//!
//! Usage: ferry-up [--nodes N] [--dir DIR] [--real [--images DIR]]

use std::path::PathBuf;

use ferry_tests::Cluster;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut nodes = 2usize;
    let mut dir = PathBuf::from(".ferry/cluster");
    let mut real = false;
    let mut images = PathBuf::from("target/images");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nodes" => nodes = args.next().and_then(|n| n.parse().ok()).unwrap_or(nodes),
            "--dir" => dir = args.next().map(PathBuf::from).unwrap_or(dir),
            "--real" => real = true,
            "--images" => images = args.next().map(PathBuf::from).unwrap_or(images),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: ferry-up [--nodes N] [--dir DIR] [--real [--images DIR]]"
                );
                std::process::exit(2);
            }
        }
    }
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let names: Vec<String> = (0..nodes)
        .map(|i| format!("node-{}", (b'a' + i as u8) as char))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    if real {
        return up_real(&refs, &dir, &images).await;
    }
    let cluster = match Cluster::up(&refs, Some(&dir)).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-up: {e}");
            std::process::exit(1);
        }
    };
    let tools = ferry_tests::tool("kubectl");
    println!(
        "Ferry is up: kube-apiserver {} with nodes {}",
        cluster.cp.url,
        names.join(", ")
    );
    println!();
    println!("  export KUBECONFIG={}", cluster.cp.kubeconfig.display());
    // kubectl finds the `kubectl ferry` plugin (kubectl-ferry) next to ferry-up.
    println!(
        "  export PATH={}:{}:$PATH",
        cluster.bin_dir().display(),
        tools.parent().unwrap().display()
    );
    println!("  kubectl apply -f examples/virtualmachine.yaml && kubectl get fvm -w");
    println!("  kubectl apply -f examples/migration.yaml && kubectl get vmm -w");
    println!("  kubectl ferry migrate demo --wait");
    println!();
    println!(
        "Logs: {}/{{operator,agent-<node>,kube-apiserver,etcd}}.log",
        dir.display()
    );
    until_stopped().await;
    drop(cluster);
}

/// `--real`: real nodes, the images imported, the chart installed with helm; waits for
/// Ferry's Pods to be Ready.
async fn up_real(names: &[&str], dir: &std::path::Path, images: &std::path::Path) {
    let fail = |e: &dyn std::fmt::Display| -> ! {
        eprintln!("ferry-up: {e}");
        std::process::exit(1);
    };
    let archives = ferry_tests::real::ferry_images(images).unwrap_or_else(|e| fail(&e));
    let cluster = ferry_tests::real::RealCluster::up(names, Some(dir))
        .await
        .unwrap_or_else(|e| fail(&e));
    // The example VM's disk, where examples/virtualmachine.yaml expects it.
    ferry_tests::cluster::install_example_disk().unwrap_or_else(|e| fail(&e));
    let values = cluster.chart_values();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    cluster
        .install_ferry(&archives, &values)
        .await
        .unwrap_or_else(|e| fail(&e));
    cluster
        .wait_ferry_ready(std::time::Duration::from_secs(300))
        .await
        .unwrap_or_else(|e| fail(&e));
    println!(
        "Ferry is up on real nodes: kube-apiserver {} with nodes {} (kubelet, containerd, kube-proxy each)",
        cluster.cp.url,
        names.join(", ")
    );
    println!();
    println!("  export KUBECONFIG={}", cluster.cp.kubeconfig.display());
    println!(
        "  export PATH={}:$PATH",
        ferry_tests::tool("kubectl").parent().unwrap().display()
    );
    println!("  kubectl -n ferry-system get pods -o wide");
    println!("  kubectl apply -f examples/virtualmachine.yaml && kubectl get fvm -w");
    println!("  kubectl apply -f examples/migration.yaml && kubectl get vmm -w");
    println!();
    println!(
        "Logs: {}/{{kube-apiserver,kube-scheduler,kube-controller-manager}}.log, nodes/<node>/{{kubelet,containerd,kube-proxy}}.log; kubectl logs for Ferry's Pods",
        dir.display()
    );
    until_stopped().await;
    drop(cluster);
}

/// Says `ready` (what `make up` waits for), then waits for Ctrl-C or SIGTERM.
async fn until_stopped() {
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping");
}

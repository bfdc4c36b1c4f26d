//! `make up`: a local Ferry left running — the control plane, the chart, the operator
//! and N agents as host processes — until SIGTERM or Ctrl-C (`make down`).
//!
//! Usage: ferry-up [--nodes N] [--dir DIR]

use std::path::PathBuf;

use ferry_tests::Cluster;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut nodes = 2usize;
    let mut dir = PathBuf::from(".ferry/cluster");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nodes" => nodes = args.next().and_then(|n| n.parse().ok()).unwrap_or(nodes),
            "--dir" => dir = args.next().map(PathBuf::from).unwrap_or(dir),
            other => {
                eprintln!("unknown argument {other}; usage: ferry-up [--nodes N] [--dir DIR]");
                std::process::exit(2);
            }
        }
    }
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let names: Vec<String> = (0..nodes)
        .map(|i| format!("node-{}", (b'a' + i as u8) as char))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
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
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping");
    drop(cluster);
}

//! `make demo`: a live migration on a local Ferry, from nothing to a summary.
//!
//! Starts the control plane, the chart, the operator and two agents (node-a, node-b),
//! applies examples/virtualmachine.yaml and examples/migration.yaml with kubectl, shows
//! the migration's progress, then a summary, then stops everything.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_crds::{MigrationPhase, VirtualMachine, VirtualMachineMigration, VmPhase};
use ferry_tests::{Cluster, repo_root};
use kube::Api;

type Error = Box<dyn std::error::Error>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("\ndemo failed: {e}");
        std::process::exit(1);
    }
}

fn heading(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

async fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<(), Error> {
    println!("$ kubectl {}", args.join(" "));
    let out = cluster
        .kubectl()
        .args(args)
        .current_dir(repo_root())
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("kubectl {} failed", args.join(" ")).into());
    }
    Ok(())
}

fn last_serial_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| l.starts_with("pass"))
        .unwrap_or("(nothing yet)")
        .to_string()
}

async fn run() -> Result<(), Error> {
    let started = Instant::now();
    heading(
        "Starting a local Ferry: etcd, kube-apiserver, the chart, the operator, agents on node-a and node-b",
    );
    let dir = std::path::absolute(".ferry/demo")?;
    let cluster = Cluster::up(&["node-a", "node-b"], Some(&dir)).await?;
    for n in cluster.nodes() {
        println!(
            "  agent {} — migration address {}, state in {}",
            n.name,
            n.address,
            n.state_dir.display()
        );
    }
    println!(
        "  up in {:.1}s; KUBECONFIG={}",
        started.elapsed().as_secs_f64(),
        cluster.cp.kubeconfig.display()
    );

    heading(
        "A VirtualMachine: 256 MiB, a test guest that rewrites and checks its memory in a loop",
    );
    kubectl(&cluster, &["apply", "-f", "examples/virtualmachine.yaml"]).await?;
    let client = cluster.client().await?;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let t = Instant::now();
    loop {
        let phase = vms.get("demo").await?.status.and_then(|s| s.phase);
        if phase == Some(VmPhase::Running) {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!("the VM did not start: phase {phase:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    kubectl(&cluster, &["get", "fvm", "demo"]).await?;
    let before = last_serial_line(&cluster.serial_log("node-a", "demo"));
    println!("  guest console on node-a: {before}");

    heading("Migrating it to node-b");
    kubectl(&cluster, &["apply", "-f", "examples/migration.yaml"]).await?;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");
    let t = Instant::now();
    let mut last = String::new();
    let m = loop {
        let m = vmms.get("demo-to-node-b").await?;
        let s = m.status.clone().unwrap_or_default();
        let phase = s.phase.unwrap_or(MigrationPhase::Pending);
        let mut line = format!("{phase:?}");
        if phase == MigrationPhase::Perform
            && let Some(p) = s.progress.as_ref().filter(|p| p.bytes_total > 0)
        {
            line = format!(
                "{line:<8} {:>4}  {:>4}/{} MiB sent, {:>4} MiB remaining, {:>5} MiB/s, pass {}",
                p.percent.clone().unwrap_or_default(),
                p.bytes_transferred >> 20,
                p.bytes_total >> 20,
                p.bytes_remaining >> 20,
                p.throughput_bytes_per_second >> 20,
                p.iteration
            );
        }
        if line != last {
            println!("  [{:>5.1}s] {line}", t.elapsed().as_secs_f64());
            last = line;
        }
        if phase.is_terminal() {
            break m;
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err("the migration did not end within 5 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    kubectl(&cluster, &["get", "vmm", "demo-to-node-b"]).await?;

    heading("Summary");
    let s = m.status.clone().unwrap_or_default();
    println!(
        "  outcome:   {:?}",
        s.phase.unwrap_or(MigrationPhase::Pending)
    );
    if let Some(c) = s
        .conditions
        .iter()
        .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
    {
        println!("             {} ({}): {}", c.type_, c.reason, c.message);
    }
    println!("  phase      node     took");
    if let Some(steps) = &s.steps {
        for phase in [
            MigrationPhase::Begin,
            MigrationPhase::Prepare,
            MigrationPhase::Perform,
            MigrationPhase::Finish,
            MigrationPhase::Confirm,
        ] {
            if let Some(step) = steps.get(phase) {
                let took = step
                    .end
                    .as_ref()
                    .map(|e| format!("{:>6} ms", e.0.duration_since(step.start.0).as_millis()))
                    .unwrap_or_else(|| "   (running)".into());
                let outcome = step.outcome.map(|o| format!("{o:?}")).unwrap_or_default();
                println!(
                    "  {:<10} {:<8} {took}  {outcome}",
                    format!("{phase:?}"),
                    step.node
                );
            }
        }
    }
    println!(
        "  transfer:  {} ms, guest downtime {} ms, {} MiB sent",
        s.total_time_ms.unwrap_or_default(),
        s.downtime_ms.unwrap_or_default(),
        s.progress
            .as_ref()
            .map(|p| p.bytes_transferred >> 20)
            .unwrap_or_default()
    );
    let vm = vms.get("demo").await?;
    let node = vm.status.and_then(|st| st.node_name).unwrap_or_default();
    println!(
        "  the VM runs on {node}; QEMU processes for it: {:?}",
        cluster.qemu_pids("demo")
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("  guest console before, on node-a: {before}");
    println!(
        "  guest console now, on {node}:   {}",
        last_serial_line(&cluster.serial_log(&node, "demo"))
    );

    heading("Stopping everything");
    drop(cluster);
    println!("  done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

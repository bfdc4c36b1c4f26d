//! The chaos soak (`make soak-chaos`): 200 back-to-back migrations of two guests between
//! two nodes, on the real control plane with real QEMU, each migration with one fault of
//! the matrices drawn from a seed (ferry_tests::chaos: an agent or the operator killed,
//! the stream cut, a 409, 500, 429, hung or reset API request, a partition, one past
//! the heartbeat Lease, the apiserver restarted, both agents killed; at any of the ten
//! points, in either control mode). The QEMU kills are left out: they kill the guest by
//! design, and the soak counts guests lost. The seed is printed first;
//! `FERRY_CHAOS_SEED=<seed>` replays a run's plan (its faults, points and order; not its
//! timing), `FERRY_CHAOS_MIGRATIONS=<n>` shortens it.
//!
//! Unlike the matrices, the soak keeps one cluster and its processes for the whole run:
//! each agent and the operator reach the apiserver through their fault proxies, and
//! start (every restart included) with a re-armable hook (`FERRY_FAULT_ARM`,
//! ferry_runtime::fault), so a process pauses at the point of the migration it was armed
//! for and lives on to the next. Both agents advertise the stream relay, so any
//! migration's stream can be cut.
//!
//! After every migration the row's invariants of the matrices hold
//! (ferry_tests::fault_run::check_row): the migration terminal, exactly one running
//! guest, intact, on the node the outcome names, the other guest running untouched where
//! it was, and nothing leaked. At the end it prints the faults by kind (planned, landed),
//! the outcomes, and the resident memory (VmRSS) of the operator and the agents every 20
//! migrations, with their restarts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_crds::{MigrationPhase, VirtualMachine, VirtualMachineMigration};
use ferry_operator::nodes::live_node;
use ferry_runtime::fault::{ARM_VAR, DIR_VAR};
use ferry_tests::Cluster;
use ferry_tests::chaos::{self, ChaosFault, Planned, Tallies};
use ferry_tests::cluster::{NAMESPACE, Options};
use ferry_tests::e2e_support::*;
use ferry_tests::fault_matrix::{Fault, Pauser, Point};
use ferry_tests::fault_run::{self, Hooks, Killed, Subject};
use ferry_tests::fault_run::{check_row, wait_terminal};
use ferry_tests::inject;
use ferry_tests::relay::Relay;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

const MIGRATIONS: usize = 200;
const GUESTS: [&str; 2] = ["alpha", "beta"];
const NODES: [&str; 2] = ["node-a", "node-b"];
/// RSS is sampled every this many migrations.
const EVERY: usize = 20;
/// How long the armed process may take to reach its point; a point the migration never
/// reaches (a Perform too short for its late point) leaves the fault not landed.
const PAUSE_BOUND: Duration = Duration::from_secs(120);
/// How long the soak waits for the agents' heartbeats before the next migration.
const SETTLE_BOUND: Duration = Duration::from_secs(60);

/// The seed: `FERRY_CHAOS_SEED`, or one from the clock.
fn seed() -> u64 {
    match std::env::var("FERRY_CHAOS_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("FERRY_CHAOS_SEED={s}: {e}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

fn logs_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-logs")
}

/// The arm file of the process that pauses as `who` in `row`.
fn arm_file(hooks: &Hooks, row: Subject<'_>, who: Pauser) -> PathBuf {
    hooks
        .dir
        .join(format!("{}.arm", row.node_of(who).unwrap_or("operator")))
}

/// Removes what a migration's hook left: arm files not claimed, pause and release
/// markers (a process killed while paused cleans nothing).
fn clear_hooks(hooks: &Hooks) {
    for entry in std::fs::read_dir(&hooks.dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        if path
            .extension()
            .is_some_and(|e| e == "arm" || e == "paused" || e == "release")
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Until the armed process paused at `point`: whether it did, before `migration` ended
/// or [`PAUSE_BOUND`] passed.
async fn paused(
    hooks: &Hooks,
    vmms: &Api<VirtualMachineMigration>,
    migration: &str,
    point: Point,
) -> bool {
    let marker = hooks.dir.join(format!("{}.paused", point.hook()));
    let began = Instant::now();
    loop {
        if marker.exists() {
            return true;
        }
        let ended = phase_of(vmms, migration)
            .await
            .is_some_and(|p| p.is_terminal());
        if ended || began.elapsed() > PAUSE_BOUND {
            return marker.exists();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to [`SETTLE_BOUND`] until every agent's heartbeat Lease is live (as the
/// operator judges it) and the operator and agents run, restarting any that exited. A
/// migration created before would be refused for what the previous fault left behind (a
/// Lease that ran out while the apiserver was down, an agent still starting): refused
/// with TargetNotReady, the guest stays where it is, and the fault planned for it
/// proves nothing.
async fn settle(cluster: &mut Cluster, client: &Client) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let began = Instant::now();
    loop {
        cluster.restart_exited().unwrap();
        let now = k8s_openapi::jiff::Timestamp::now();
        let live: Vec<String> = match leases.list(&Default::default()).await {
            Ok(list) => list
                .items
                .iter()
                .filter_map(|l| live_node(l, now))
                .collect(),
            Err(_) => Vec::new(),
        };
        if NODES.iter().all(|n| live.iter().any(|l| l == n)) || began.elapsed() > SETTLE_BOUND {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every fault proxy's injections so far.
fn injected_total(cluster: &Cluster) -> usize {
    let proxies = NODES
        .iter()
        .filter_map(|n| cluster.agent_proxy(n))
        .chain(cluster.operator_proxy());
    proxies.map(|p| p.injected_total()).sum()
}

/// The operator's and the agents' (name, pid, VmRSS KiB).
fn rss(cluster: &Cluster) -> Vec<(String, u32, u64)> {
    cluster
        .component_pids()
        .into_iter()
        .map(|(who, pid)| (who, pid, vm_rss_kib(pid).unwrap_or(0)))
        .collect()
}

/// The node guest `vm` runs on, as its VM says.
async fn node_of(vms: &Api<VirtualMachine>, vm: &str) -> String {
    let status = vms.get(vm).await.unwrap().status.unwrap_or_default();
    status.node_name.expect("the guest has a node")
}

/// Keeps the cluster's logs in `$CARGO_TARGET_TMPDIR/chaos-logs/<migration>` if a check
/// fails while it lives.
struct LogsIfFailed<'a> {
    cluster: &'a Cluster,
    migration: &'a str,
}

impl Drop for LogsIfFailed<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            fault_run::keep_logs(self.cluster, &logs_root(), self.migration);
        }
    }
}

/// Prints a panic's context: the migration, its planned fault and the seed.
struct Context {
    seed: u64,
    at: String,
}

impl Drop for Context {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\nchaos soak FAILED at {}; replay with FERRY_CHAOS_SEED={}",
                self.at, self.seed
            );
        }
    }
}

#[tokio::test]
#[ignore = "200 migrations with faults take about an hour; `make soak-chaos` runs it"]
async fn two_hundred_migrations_each_with_a_fault() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = seed();
    let n = std::env::var("FERRY_CHAOS_MIGRATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(MIGRATIONS);
    println!("chaos soak: seed {seed} (FERRY_CHAOS_SEED={seed} replays its plan), {n} migrations");
    let plan = chaos::plan(seed, n);
    let mut context = Context {
        seed,
        at: "setting up".into(),
    };

    let options = Options {
        api_proxies: true,
        ..Options::default()
    };
    let mut cluster = Cluster::up_with_options(&NODES, options)
        .await
        .unwrap_or_else(|e| panic!("cluster: {e}"));
    let client = cluster.client().await.unwrap();
    let hooks = Hooks::new(&cluster);
    let mut relay = Relay::start("127.0.0.9", hooks.dir.clone()).await.unwrap();
    let (dir, relay_addr) = (hooks.dir_var(), relay.addr.to_string());
    for node in NODES {
        let arm = hooks.dir.join(format!("{node}.arm")).display().to_string();
        cluster.set_agent_env(
            node,
            &[
                (ARM_VAR, arm.as_str()),
                (DIR_VAR, dir.as_str()),
                (ferry_agent::fault::ADVERTISE_VAR, relay_addr.as_str()),
            ],
        );
        cluster.kill_agent(node);
        cluster.start_agent(node).unwrap();
    }
    let arm = hooks.dir.join("operator.arm").display().to_string();
    cluster.set_operator_env(&[(ARM_VAR, arm.as_str()), (DIR_VAR, dir.as_str())]);
    cluster.kill_operator();
    cluster.start_operator().unwrap();
    let vms = guests_running(&cluster, &client, "node-a", &GUESTS).await;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), "default");

    let mut samples = vec![(0, rss(&cluster))];
    let mut tallies = Tallies::default();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut restarts: BTreeMap<String, usize> = BTreeMap::new();
    let begun = Instant::now();
    eprintln!(
        "| #   | guest | from → to       | fault                                    | landed | outcome                    | to terminal |"
    );
    for (i, planned) in plan.iter().enumerate() {
        let vm = GUESTS[i % GUESTS.len()];
        let other = GUESTS[(i + 1) % GUESTS.len()];
        let source = node_of(&vms, vm).await;
        let other_node = node_of(&vms, other).await;
        let target = if source == NODES[0] {
            NODES[1]
        } else {
            NODES[0]
        };
        let name = format!("chaos-{i}");
        let row = Subject {
            vm,
            migration: &name,
            source: &source,
            target,
        };
        context.at = format!(
            "migration {i} ({vm} {source} → {target}, {})",
            planned.name()
        );
        let line = migrate(
            &mut cluster,
            &client,
            &hooks,
            &mut relay,
            &vmms,
            row,
            (other, &other_node),
            *planned,
            &mut tallies,
            &mut restarts,
        )
        .await;
        *outcomes.entry(line.outcome.clone()).or_default() += 1;
        eprintln!(
            "| {i:>3} | {vm:<5} | {source} → {target} | {:<40} | {:<6} | {:<26} | {:>9.1} s |",
            planned.name(),
            if line.landed { "yes" } else { "no" },
            line.outcome,
            line.to_terminal.as_secs_f64()
        );
        if (i + 1) % EVERY == 0 || i + 1 == n {
            samples.push((i + 1, rss(&cluster)));
        }
    }
    context.at = "the end".into();
    let lost: usize = GUESTS
        .iter()
        .map(|g| usize::from(cluster.qemu_pids(g).len() != 1))
        .sum();
    assert_eq!(lost, 0, "guests lost or doubled at the end");

    println!(
        "\nchaos soak: seed {seed}, {n} migrations in {:.0} s, every one terminal; guests lost: {lost}",
        begun.elapsed().as_secs_f64()
    );
    println!("\noutcomes (a Failed migration left its guest running on its source)");
    for (outcome, count) in &outcomes {
        println!("| {outcome:<32} | {count:>4} |");
    }
    println!("\nfaults by kind (landed: the process paused at the point and the fault met it)");
    print!("{}", tallies.table());
    println!("\nrestarts (killed, or exited by themselves and started again): {restarts:?}");
    println!("\nVmRSS of the operator and the agents (pid: a changed pid is a restart)");
    for (at, sample) in &samples {
        let cells: Vec<String> = sample
            .iter()
            .map(|(who, pid, kib)| format!("{who} {pid}: {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        println!("| {at:>3} | {} |", cells.join(" | "));
    }
    let (first, last) = (&samples[0].1, &samples[samples.len() - 1].1);
    for ((who, _, start), (_, _, end)) in first.iter().zip(last) {
        println!(
            "{who}: VmRSS {:.1} MiB at the start, {:.1} MiB at the end",
            *start as f64 / 1024.0,
            *end as f64 / 1024.0
        );
    }
    let peak = samples
        .iter()
        .flat_map(|(_, s)| s.iter())
        .map(|(_, _, kib)| *kib)
        .max()
        .unwrap_or(0);
    println!("the largest VmRSS sampled: {:.1} MiB", peak as f64 / 1024.0);
    drop(context);
}

/// What one migration came to.
struct Line {
    /// The final phase, and a failed one's reason.
    outcome: String,
    landed: bool,
    to_terminal: Duration,
}

/// One migration of the soak: arms the hook of the process that pauses at the planned
/// point, creates the migration, lands the fault there, waits for the end and checks
/// the row; then clears what the fault left armed (rules not met, a partition, a cut
/// relay, markers). A component whose pid changed meanwhile counts as restarted.
#[allow(clippy::too_many_arguments)]
async fn migrate(
    cluster: &mut Cluster,
    client: &Client,
    hooks: &Hooks,
    relay: &mut Relay,
    vmms: &Api<VirtualMachineMigration>,
    row: Subject<'_>,
    other: (&str, &str),
    planned: Planned,
    tallies: &mut Tallies,
    restarts: &mut BTreeMap<String, usize>,
) -> Line {
    let Planned { mode, fault, point } = planned;
    settle(cluster, client).await;
    let pids = cluster.component_pids();
    let before = injected_total(cluster);
    std::fs::write(arm_file(hooks, row, point.pauser(mode)), point.hook()).unwrap();
    let started = Instant::now();
    apply_yaml(
        cluster,
        &vm_migration_yaml(mode, row.migration, row.vm, row.target, LONG),
    )
    .await;
    let stopped = paused(hooks, vmms, row.migration, point).await;
    // Whether the fault landed whatever the proxies counted: a kill, a cut, a restart.
    let mut sure = false;
    if stopped {
        match fault {
            ChaosFault::Process(f) => {
                inject::process_fault(cluster, row, f, relay).await;
                hooks.release(point);
                sure = true;
            }
            ChaosFault::Api(f) => {
                sure = inject::api_fault(cluster, row, (mode, f, point), hooks)
                    .await
                    .is_some();
            }
        }
    }
    let (phase, _) = wait_terminal(cluster, vmms, row.migration, started, true).await;
    let to_terminal = started.elapsed();
    let logs = LogsIfFailed {
        cluster,
        migration: row.migration,
    };
    let Some(phase) = phase else {
        fault_run::not_terminal(vmms, row.migration).await
    };
    check_row(
        cluster,
        client,
        row,
        &[other],
        &planned.name(),
        Killed::Nothing,
        phase,
        "",
    )
    .await;
    drop(logs);
    let outcome = match phase {
        MigrationPhase::Failed => format!("Failed ({})", failed_reason(vmms, row.migration).await),
        other => format!("{other:?}"),
    };
    let landed = stopped && (sure || injected_total(cluster) > before);
    tallies.count(fault, landed);
    for (who, pid) in cluster.component_pids() {
        if !pids.contains(&(who.clone(), pid)) {
            *restarts.entry(who).or_default() += 1;
        }
    }

    for proxy in NODES
        .iter()
        .filter_map(|n| cluster.agent_proxy(n))
        .chain(cluster.operator_proxy())
    {
        proxy.clear();
        proxy.heal();
    }
    if fault == ChaosFault::Process(Fault::CutStream) && stopped {
        relay.reopen().await.unwrap();
    }
    clear_hooks(hooks);
    Line {
        outcome,
        landed,
        to_terminal,
    }
}

/// The reason of a failed migration's `Failed` condition.
async fn failed_reason(vmms: &Api<VirtualMachineMigration>, name: &str) -> String {
    let status = vmms.get(name).await.ok().and_then(|m| m.status);
    let conditions = status.map(|s| s.conditions).unwrap_or_default();
    conditions
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .map(|c| c.reason)
        .unwrap_or_default()
}

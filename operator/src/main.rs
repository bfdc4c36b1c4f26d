//! `ferry-operator`: the controller binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use ferry_crds::{VirtualMachine, VirtualMachineMigration};
use ferry_operator::config::{Limits, Timeouts};
use ferry_operator::evacuator::{self, Evacuator};
use ferry_operator::metrics::Metrics;
use ferry_operator::nodes::NODE_LABEL;
use ferry_operator::reconcile::{self, Context};
use ferry_runtime::api::ApiClients;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::Controller;
use kube::runtime::events::Reporter;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

/// Ferry's operator: drives VirtualMachineMigrations through their five phases.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Ferry's own namespace: the leader Lease and the agents' heartbeat Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferry-system")]
    namespace: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Migrations running at once in the cluster.
    #[arg(long, default_value_t = 5)]
    max_parallel: usize,
    /// Migrations leaving one node at once.
    #[arg(long, default_value_t = 2)]
    max_outbound_per_node: usize,
    /// Cluster-wide migration policy defaults, as the JSON of `spec.policy` (e.g.
    /// `{"preset":"Safest"}`); each migration's own fields override them.
    #[arg(long, default_value = "{}", value_parser = parse_policy)]
    default_policy: ferry_crds::MigrationPolicy,
    /// Finished (Succeeded, Failed, Cancelled) migrations kept per VM; the operator
    /// deletes older ones. 0 keeps none.
    #[arg(long, default_value_t = 10)]
    history_limit: usize,
    /// Seconds Begin may take.
    #[arg(long, default_value_t = 60)]
    begin_timeout: u64,
    /// Seconds Prepare may take.
    #[arg(long, default_value_t = 120)]
    prepare_timeout: u64,
    /// Seconds Perform may take (the policy's own timeouts usually end it first).
    #[arg(long, default_value_t = 1800)]
    perform_timeout: u64,
    /// Seconds Finish may take.
    #[arg(long, default_value_t = 120)]
    finish_timeout: u64,
    /// Seconds a post-copy migration whose stream was cut may wait for the path before the
    /// operator reports the recovery overdue (condition PostCopyPaused, reason
    /// RecoveryOverdue, and a Warning Event). The migration keeps waiting: ending it would
    /// lose the guest, whose memory is split between the two nodes.
    #[arg(long, default_value_t = 600)]
    post_copy_paused_timeout: u64,
    /// Seconds the leader Lease lasts without renewal; a standby takes over after it.
    #[arg(long, default_value_t = 15)]
    leader_lease_seconds: u64,
    /// Seconds an API request (not a watch) may wait for its answer before it counts as
    /// failed and is retried.
    #[arg(long, default_value_t = ferry_runtime::api::REQUEST_TIMEOUT.as_secs())]
    api_timeout_seconds: u64,
    /// Evacuate cordoned nodes (`kubectl cordon`); a node tainted `ferry.dev/evacuate` is
    /// evacuated either way.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    evacuate_on_cordon: bool,
    /// `spec.transport.tls` of the migrations an evacuation creates.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    evacuation_tls: bool,
    /// The agents' ServiceAccount (in --namespace): only its node-bound tokens get node
    /// certificates for the migration stream.
    #[arg(long, default_value = "ferry-agent")]
    agent_service_account: String,
    /// Address of the console API (an aggregated API the apiserver proxies consoles to;
    /// every replica serves it). Empty: no console API.
    #[arg(long, default_value = "0.0.0.0:8443")]
    console_addr: String,
    /// The Service of the console's APIService: the console API's certificate is for
    /// `<service>.<namespace>.svc`.
    #[arg(long, default_value = "ferry-console")]
    console_service: String,
    /// The image of the guest reservations' placeholder Pods (a pause image). Empty: no
    /// reservations (the scheduler does not see the guests).
    #[arg(long, default_value = "")]
    guest_reservation_image: String,
    /// MiB a guest's QEMU may use beyond its RAM, as the agents' cgroups allow: part of
    /// each reservation.
    #[arg(long, default_value_t = ferry_agent::cgroup::DEFAULT_OVERHEAD_MIB)]
    guest_memory_overhead_mib: u64,
    /// The operator's Deployment (in --namespace): the guest reservations' controller.
    #[arg(long, default_value = "ferry-operator")]
    guest_reservation_owner: String,
    /// This replica's identity in the leader Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn parse_policy(s: &str) -> Result<ferry_crds::MigrationPolicy, String> {
    serde_json::from_str(s).map_err(|e| format!("not a migration policy: {e}"))
}

#[tokio::main]
async fn main() {
    ferry_runtime::init_tracing("info,kube_lease_manager=warn");
    let args = Args::parse();
    if let Err(e) = run(args).await {
        error!("{e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let clients = ApiClients::infer(Duration::from_secs(args.api_timeout_seconds)).await?;
    let (client, watches) = (clients.requests, clients.watches);
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let (metrics, ready) = (metrics.clone(), ready.clone());
        async move {
            let encode: ferry_runtime::Encode = Arc::new(move || metrics.encode());
            if let Err(e) = ferry_runtime::serve(args.metrics_addr, encode, ready).await {
                error!("metrics server on {}: {e}", args.metrics_addr);
                std::process::exit(1);
            }
        }
    });

    // Every replica serves consoles; they need no leader.
    if !args.console_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&args.console_addr)
            .await
            .map_err(|e| format!("console API on {}: {e}", args.console_addr))?;
        info!(address = %args.console_addr, "console API listening");
        let console = ferry_operator::console::Console::new(client.clone(), args.namespace.clone());
        tokio::spawn(
            console
                .clone()
                .keep_current(ferry_operator::console::Settings {
                    namespace: args.namespace.clone(),
                    service: args.console_service.clone(),
                }),
        );
        tokio::spawn(ferry_operator::console::server::serve(console, listener));
    }

    // Only the leader reconciles; it exits if it ever loses the Lease, and its
    // successor carries on from the migrations' status.
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("ferry-operator-{}", std::process::id()));
    let lease_seconds = args.leader_lease_seconds.max(2);
    let manager = LeaseManagerBuilder::new(client.clone(), "ferry-operator-leader")
        .with_namespace(&args.namespace)
        .with_identity(&identity)
        .with_duration(lease_seconds)
        .with_grace((lease_seconds / 3).max(1))
        .build()
        .await?;
    ready.store(true, Ordering::Relaxed);
    let (mut leader, lease_task) = manager.watch().await;
    info!(%identity, "waiting to become the leader");
    while !*leader.borrow_and_update() {
        leader.changed().await?;
    }
    info!(%identity, "leading");

    // The cluster CA and the node certificates of the migration stream (TLS).
    let ca = ferry_operator::certs::ensure_ca(&client, &args.namespace).await?;
    // The key the agents sign and check saved-state files with.
    ferry_operator::state_key::ensure(&client, &args.namespace).await?;
    let agent_user = format!(
        "system:serviceaccount:{}:{}",
        args.namespace, args.agent_service_account
    );
    let signer = tokio::spawn(ferry_operator::certs::run(
        client.clone(),
        watches.clone(),
        Arc::new(ca),
        agent_user,
    ));

    // Caches of the heartbeat Leases and the VMs, so that a phase change costs no reads.
    let (leases, lease_writer) = reflector::store::<Lease>();
    let lease_api: Api<Lease> = Api::namespaced(watches.clone(), &args.namespace);
    let lease_watch = watcher(lease_api, watcher::Config::default().labels(NODE_LABEL));
    tokio::spawn(
        reflector(lease_writer, lease_watch)
            .default_backoff()
            .for_each(|_| async {}),
    );
    let (vms, vm_writer) = reflector::store::<VirtualMachine>();
    let vm_watch = watcher(
        Api::<VirtualMachine>::all(watches.clone()),
        watcher::Config::default(),
    );
    tokio::spawn(
        reflector(vm_writer, vm_watch)
            .default_backoff()
            .for_each(|_| async {}),
    );
    let (nodes, node_writer) = reflector::store::<Node>();
    let node_watch = watcher(
        Api::<Node>::all(watches.clone()),
        watcher::Config::default(),
    );
    tokio::spawn(
        reflector(node_writer, node_watch)
            .default_backoff()
            .for_each(|_| async {}),
    );
    leases.wait_until_ready().await?;
    vms.wait_until_ready().await?;
    nodes.wait_until_ready().await?;
    let since = k8s_openapi::jiff::Timestamp::now();

    let reservations = if args.guest_reservation_image.is_empty() {
        None
    } else {
        let owner = ferry_operator::reservations::owner(
            &client,
            &args.namespace,
            &args.guest_reservation_owner,
        )
        .await?;
        if owner.is_none() {
            warn!(deployment = %args.guest_reservation_owner, "no such Deployment: guest reservations have no controller, and kubectl drain will refuse to evict them");
        }
        Some(ferry_operator::reservations::Settings {
            namespace: args.namespace.clone(),
            image: args.guest_reservation_image.clone(),
            overhead_mib: args.guest_memory_overhead_mib,
            owner,
        })
    };
    if let Some(settings) = reservations.clone() {
        tokio::spawn(ferry_operator::reservations::keep(
            client.clone(),
            settings,
            Duration::from_secs(3),
        ));
    }
    let ctx = Arc::new(Context {
        client: client.clone(),
        namespace: args.namespace.clone(),
        default_policy: args.default_policy.clone(),
        limits: Limits {
            max_parallel: args.max_parallel,
            max_outbound_per_node: args.max_outbound_per_node,
        },
        timeouts: Timeouts {
            begin: Duration::from_secs(args.begin_timeout),
            prepare: Duration::from_secs(args.prepare_timeout),
            perform: Duration::from_secs(args.perform_timeout),
            finish: Duration::from_secs(args.finish_timeout),
            post_copy_paused: Duration::from_secs(args.post_copy_paused_timeout),
        },
        metrics,
        events: ferry_operator::events::Events::new(
            client.clone(),
            Reporter {
                controller: "ferry-operator".into(),
                instance: Some(identity.clone()),
            },
        ),
        admission: tokio::sync::Mutex::new(()),
        history_limit: args.history_limit,
        leases: leases.clone(),
        vms: vms.clone(),
        nodes: nodes.clone(),
        reservations,
    });
    let migrations: Api<VirtualMachineMigration> = Api::all(watches.clone());
    let controller = Controller::new(migrations, watcher::Config::default());
    // Node evacuation reads the controller's cache of migrations.
    tokio::spawn(
        Evacuator {
            client: client.clone(),
            settings: evacuator::Settings {
                on_cordon: args.evacuate_on_cordon,
                tls: args.evacuation_tls,
            },
            nodes,
            vms,
            migrations: controller.store(),
            leases,
            recorder: ctx.events.recorder(),
            since,
            trackers: Default::default(),
        }
        .run(),
    );
    let controller = controller
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|_| async {});
    tokio::select! {
        _ = controller => info!("shut down"),
        _ = signer => return Err("the certificate signer stopped".into()),
        _ = leader.changed() => {
            warn!("lost the leader Lease; exiting so a fresh process can stand again");
            std::process::exit(1);
        }
    }
    drop(leader);
    let _ = lease_task.await;
    Ok(())
}

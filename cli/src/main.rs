//! `kubectl-ferry`: the kubectl plugin (`kubectl ferry ...`). It talks to the cluster
//! of the current kubeconfig (`KUBECONFIG`, or `~/.kube/config`) as the user.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferry_cli::objects::{self, Compression, MigrateArgs};
use ferry_cli::{console, evac, render};
use ferry_crds::{VirtualMachine, VirtualMachineMigration};
use ferry_operator::evacuate::{EVACUATION_LABEL, label_value};
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::api::core::v1::{Event, Node};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, ValidationDirective};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

/// Live-migrate, evacuate, save and restore Ferry guests, and open their VNC consoles.
#[derive(Parser, Debug)]
#[command(name = "kubectl ferry", version)]
struct Cli {
    /// Namespace of the VM or migration (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a VirtualMachineMigration for a VM (the operator picks a node unless --to).
    Migrate {
        vm: String,
        /// The target node.
        #[arg(long)]
        to: Option<String>,
        /// Policy preset: Fastest, Safest or Balanced.
        #[arg(long)]
        preset: Option<String>,
        /// Bandwidth limit in MiB/s.
        #[arg(long)]
        bandwidth: Option<i64>,
        /// Longest switch-over pause in milliseconds.
        #[arg(long)]
        max_downtime: Option<i64>,
        /// spec.transport.tls (default: the API's).
        #[arg(long)]
        tls: Option<bool>,
        /// Peer-to-peer mode: the source node's agent drives the phases, calling the
        /// target's agent directly (spec.mode: PeerToPeer).
        #[arg(long)]
        peer_to_peer: bool,
        /// Show the progress until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a migration, given its name or its VM's.
    Cancel { name: String },
    /// Follow a migration (given its name or its VM's) until it ends.
    Watch { name: String },
    /// Cordon a node and follow the migrations that move its guests away.
    Evacuate { node: String },
    /// Save a VM's state to a file (a migration with spec.toFile).
    Save {
        vm: String,
        /// The file, on the VM's node.
        #[arg(long)]
        path: String,
        #[arg(long, value_enum, default_value = "zstd")]
        compression: Compression,
        /// spec.transport.tls (default: the API's).
        #[arg(long)]
        tls: Option<bool>,
        /// Follow it until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Start a VM from a saved file (sets spec.restoreFrom, and spec.nodeName with --node).
    Restore {
        vm: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Serve a VM's VNC console on a local port, through the API server (RBAC: `get` on
    /// virtualmachines/console in subresources.ferry.dev). Runs until Ctrl-C.
    Console {
        vm: String,
        /// The local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: IpAddr,
        /// The local port (0: any free one; the line printed names it).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("no migration or VM named {name} in namespace {namespace}{hint}")]
    NotFound {
        name: String,
        namespace: String,
        hint: &'static str,
    },
    #[error("migration {0} has already ended")]
    Ended(String),
    #[error(
        "this cluster's Ferry has no {field} (the API server answered: unknown field); \
         save and restore need a Ferry that has them"
    )]
    Unsupported { field: &'static str },
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Console(#[from] console::ConsoleError),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    let client = Client::try_default().await?;
    let ns = cli
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    let migrations: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), &ns);
    match cli.command {
        Command::Migrate {
            vm,
            to,
            preset,
            bandwidth,
            max_downtime,
            tls,
            peer_to_peer,
            wait,
        } => {
            let obj = objects::migration(&MigrateArgs {
                vm,
                to,
                preset,
                bandwidth_mibps: bandwidth,
                max_downtime_ms: max_downtime,
                tls,
                peer_to_peer,
            });
            let m = create_strict(&client, &ns, &obj).await?;
            println!("virtualmachinemigration.ferry.dev/{} created", m.name_any());
            if wait {
                return follow(&migrations, &m.name_any()).await;
            }
        }
        Command::Cancel { name } => {
            let m = designated(&client, &ns, &name, false).await?;
            if render::outcome(&m).is_some() {
                return Err(Error::Ended(m.name_any()));
            }
            migrations
                .patch(
                    &m.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(objects::cancel_patch()),
                )
                .await?;
            println!(
                "virtualmachinemigration.ferry.dev/{} cancel requested",
                m.name_any()
            );
        }
        Command::Watch { name } => {
            let m = designated(&client, &ns, &name, true).await?;
            return follow(&migrations, &m.name_any()).await;
        }
        Command::Evacuate { node } => return evacuate(&client, &node).await,
        Command::Save {
            vm,
            path,
            compression,
            tls,
            wait,
        } => {
            let obj = objects::save(&vm, &path, compression, tls);
            let m = create_strict(&client, &ns, &obj)
                .await
                .map_err(|e| unsupported("VirtualMachineMigration spec.toFile", e))?;
            println!("virtualmachinemigration.ferry.dev/{} created", m.name_any());
            if wait {
                return follow(&migrations, &m.name_any()).await;
            }
        }
        Command::Restore { vm, from, node } => {
            let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
            let strict = PatchParams {
                field_validation: Some(ValidationDirective::Strict),
                ..Default::default()
            };
            vms.patch(
                &vm,
                &strict,
                &Patch::Merge(objects::restore_patch(&from, node.as_deref())),
            )
            .await
            .map_err(|e| unsupported("VirtualMachine spec.restoreFrom", Error::Kube(e)))?;
            println!("virtualmachine.ferry.dev/{vm} restores from {from}");
        }
        Command::Console { vm, address, port } => {
            let listener = console::bind(SocketAddr::new(address, port)).await?;
            console::serve(client, listener, &ns, &vm).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An unknown-field refusal means the cluster's CRD lacks the field.
fn unsupported(field: &'static str, e: Error) -> Error {
    match e {
        Error::Kube(kube::Error::Api(s))
            if matches!(s.code, 400 | 422) && s.message.contains("unknown field") =>
        {
            // 400 for a create, 422 for a patch.
            Error::Unsupported { field }
        }
        other => other,
    }
}

/// Creates a migration with `fieldValidation=Strict`, so that a field the cluster's
/// CRD does not know is refused instead of silently dropped (a save without its
/// `toFile` would be a live migration).
async fn create_strict(
    client: &Client,
    ns: &str,
    obj: &Value,
) -> Result<VirtualMachineMigration, Error> {
    let url = format!(
        "/apis/ferry.dev/v1alpha1/namespaces/{ns}/virtualmachinemigrations?fieldValidation=Strict"
    );
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(obj).expect("JSON serializes"))
        .expect("a valid request");
    Ok(client.request(req).await?)
}

/// The migration `name` designates: a migration of that name, or the current (or,
/// with `ended_too`, the newest) migration of the VM of that name.
async fn designated(
    client: &Client,
    ns: &str,
    name: &str,
    ended_too: bool,
) -> Result<VirtualMachineMigration, Error> {
    let migrations: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), ns);
    if let Some(m) = migrations.get_opt(name).await? {
        return Ok(m);
    }
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let holder = vms
        .get_opt(name)
        .await?
        .and_then(|v| v.status)
        .and_then(|s| s.migration);
    let all = migrations.list(&ListParams::default()).await?.items;
    render::designated(&all, name, holder.as_deref(), ended_too)
        .cloned()
        .ok_or_else(|| Error::NotFound {
            name: name.into(),
            namespace: ns.into(),
            hint: if ended_too {
                ""
            } else {
                " (or the VM has no migration running)"
            },
        })
}

/// Shows a migration's progress until it ends; prints the outcome. Exit code 0 only
/// when it succeeded.
async fn follow(api: &Api<VirtualMachineMigration>, name: &str) -> Result<ExitCode, Error> {
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Some(bar)
    } else {
        None
    };
    let mut last = String::new();
    loop {
        let m = api.get(name).await?;
        let line = format!("{name}: {}", render::progress_line(&m));
        if let Some(bar) = &bar {
            if let Some((pos, len)) = render::bytes(&m) {
                bar.set_length(len);
                bar.set_position(pos);
            }
            bar.set_message(line.clone());
        } else if line != last {
            // Not a terminal: one line per change, for logs and scripts.
            eprintln!("{line}");
        }
        last = line;
        if let Some((ok, outcome)) = render::outcome(&m) {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            println!("{outcome}");
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Cordons `node` and follows its evacuation until no guest is left, or every one
/// left is stuck (exit code 1).
async fn evacuate(client: &Client, node: &str) -> Result<ExitCode, Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let start = Timestamp::now();
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(objects::cordon_patch()),
        )
        .await?;
    println!("node/{node} cordoned");
    let vms: Api<VirtualMachine> = Api::all(client.clone());
    let migrations: Api<VirtualMachineMigration> = Api::all(client.clone());
    let events: Api<Event> = Api::all(client.clone());
    let label = format!("{EVACUATION_LABEL}={}", label_value(node));
    let mut seen = std::collections::BTreeMap::<String, String>::new();
    loop {
        let guests = vms.list(&ListParams::default()).await?.items;
        let ms = migrations
            .list(&ListParams::default().labels(&label))
            .await?
            .items;
        for m in &ms {
            let line = match render::outcome(m) {
                Some((_, outcome)) => outcome,
                None => format!("{}: {}", m.name_any(), render::progress_line(m)),
            };
            if seen.get(&m.name_any()) != Some(&line) {
                println!("{line}");
                seen.insert(m.name_any(), line);
            }
        }
        let stuck: Vec<String> = events
            .list(&ListParams::default().fields(&format!(
                "involvedObject.name={node},reason=EvacuationStuck"
            )))
            .await?
            .items
            .into_iter()
            .filter(|e| {
                let at = e
                    .event_time
                    .as_ref()
                    .map(|t| t.0)
                    .or(e.last_timestamp.as_ref().map(|t| t.0))
                    .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0));
                at.is_some_and(|t| t >= start - Duration::from_secs(1))
            })
            .filter_map(|e| e.message)
            .collect();
        match evac::state(node, &guests, &ms, &stuck) {
            evac::State::Done => {
                println!("{node} evacuated: no running guest is left on it");
                return Ok(ExitCode::SUCCESS);
            }
            evac::State::Stuck(left) => {
                for (vm, note) in left {
                    eprintln!("{vm} is stuck: {note}");
                }
                return Err(Error::Failed(format!(
                    "{node} is cordoned but guests cannot leave it; they keep running there"
                )));
            }
            evac::State::Going { .. } => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

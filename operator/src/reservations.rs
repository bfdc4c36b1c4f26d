//! The I/O of guest reservations ([`crate::reservation`]): the leader keeps the
//! reservation Pods in Ferry's namespace as [`crate::reservation::wanted`] says
//! ([`keep`]), and admission reserves a migration's target before Begin ([`reserve`]):
//! a target whose reservation the scheduler cannot place refuses the migration with
//! the scheduler's reason, before any downtime. Each reservation Pod has a
//! PodDisruptionBudget of its own ([`crate::reservation::budget`]), so no drain evicts
//! it while its guest is still on the node.

use std::time::Duration;

use ferry_crds::{VirtualMachine, VirtualMachineMigration};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::reservation::{self, COMPONENT, Existing, MIGRATION_ANNOTATION, Placed, Want};

/// What reservations are made with (the chart's `guestReservations`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Ferry's namespace: the reservation Pods live there.
    pub namespace: String,
    /// The placeholder container's image (a pause image).
    pub image: String,
    /// MiB of QEMU overhead beyond a guest's RAM (the agents' `--guest-memory-overhead-mib`).
    pub overhead_mib: u64,
    /// The reservations' controller: the operator's Deployment ([`owner`]).
    pub owner: Option<OwnerReference>,
}

/// The owner reference of Deployment `name` in `namespace` (the operator's own), if it
/// exists.
pub async fn owner(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<OwnerReference>, kube::Error> {
    let d = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?;
    Ok(d.and_then(|d| {
        Some(OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: d.name_any(),
            uid: d.uid()?,
            controller: Some(true),
            block_owner_deletion: Some(false),
        })
    }))
}

fn selector() -> String {
    format!("{}={}", COMPONENT.0, COMPONENT.1)
}

/// Makes the reservation Pods match the running guests and active migrations, every
/// `every`, until the process ends. Errors are logged and tried again.
pub async fn keep(client: Client, settings: Settings, every: Duration) {
    loop {
        if let Err(e) = keep_once(&client, &settings).await {
            warn!(error = %e, "guest reservations: not brought up to date; trying again");
        }
        tokio::time::sleep(every).await;
    }
}

async fn keep_once(client: &Client, settings: &Settings) -> Result<(), kube::Error> {
    let vms = Api::<VirtualMachine>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let migrations = Api::<VirtualMachineMigration>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &settings.namespace);
    let existing = pods
        .list(&ListParams::default().labels(&selector()))
        .await?
        .items;
    let pending: Vec<String> = migrations
        .iter()
        .filter(|m| {
            m.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_none_or(|p| p == ferry_crds::MigrationPhase::Pending)
        })
        .filter_map(|m| m.uid())
        .collect();
    let listed = existing;
    let existing: Vec<Existing> = listed
        .iter()
        .map(|p| Existing {
            name: p.name_any(),
            pending_migration: p
                .annotations()
                .get(MIGRATION_ANNOTATION)
                .is_some_and(|uid| pending.contains(uid)),
        })
        .collect();
    let wanted = reservation::wanted(&vms, &migrations, settings.overhead_mib);
    let (create, delete) = reservation::plan(&wanted, &existing);
    let mut kept: Vec<Pod> = listed
        .into_iter()
        .filter(|p| !delete.contains(&p.name_any()))
        .collect();
    for w in create {
        let pod = reservation::pod(
            &w,
            &settings.namespace,
            &settings.image,
            settings.owner.as_ref(),
            None,
        );
        match pods.create(&PostParams::default(), &pod).await {
            Ok(p) => {
                info!(vm = %w.vm, namespace = %w.namespace, node = %w.node, "guest reserved");
                kept.push(p);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &settings.namespace);
    let have: Vec<String> = budgets
        .list(&ListParams::default().labels(&selector()))
        .await?
        .items
        .iter()
        .map(|b| b.name_any())
        .collect();
    for pod in kept.iter().filter(|p| !have.contains(&p.name_any())) {
        ensure_budget(&budgets, pod).await?;
    }
    for name in delete {
        match pods.delete(&name, &DeleteParams::default()).await {
            Ok(_) => info!(pod = %name, "guest reservation released"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reserves VM `vm`'s resources on `target` for migration `m` (creating the Pod if it is
/// missing) and says whether the scheduler has placed it.
pub async fn reserve(
    client: &Client,
    settings: &Settings,
    m: &VirtualMachineMigration,
    vm: &VirtualMachine,
    target: &str,
) -> Result<(Placed, Want), kube::Error> {
    let (memory_bytes, vcpus) = reservation::resources(vm, settings.overhead_mib).unwrap_or((0, 1));
    let want = Want {
        namespace: vm.namespace().unwrap_or_default(),
        vm: vm.name_any(),
        node: target.to_string(),
        memory_bytes,
        vcpus,
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &settings.namespace);
    let pod = match pods.get_opt(&want.pod_name()).await? {
        Some(p) => p,
        None => {
            let uid = m.uid();
            let pod = reservation::pod(
                &want,
                &settings.namespace,
                &settings.image,
                settings.owner.as_ref(),
                uid.as_deref(),
            );
            match pods.create(&PostParams::default(), &pod).await {
                Ok(p) => p,
                Err(kube::Error::Api(e)) if e.code == 409 => pods.get(&want.pod_name()).await?,
                Err(e) => return Err(e),
            }
        }
    };
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &settings.namespace);
    ensure_budget(&budgets, &pod).await?;
    Ok((reservation::placed(&pod), want))
}

/// Creates the disruption budget of reservation Pod `pod` if it has none (the Pod owns
/// it, so it goes when the Pod is deleted).
async fn ensure_budget(budgets: &Api<PodDisruptionBudget>, pod: &Pod) -> Result<(), kube::Error> {
    let Some(budget) = reservation::budget(pod) else {
        return Ok(());
    };
    match budgets.create(&PostParams::default(), &budget).await {
        Ok(_) => {
            info!(pod = %pod.name_any(), "guest reservation: disruption budget created");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the reservation of a refused migration's target.
pub async fn release(client: &Client, settings: &Settings, want: &Want) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &settings.namespace);
    match pods
        .delete(&want.pod_name(), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

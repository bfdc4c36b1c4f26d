//! Disk locks: each image a running VM writes is held by a Lease (one per image file,
//! [`image_lock_name`]) naming the VM and the node whose QEMU may write it. A second VM
//! naming the same image is refused ([`LockError::InUse`]); read-only disks take no
//! lock (any number of guests may read a base image). Finish hands the locks from the
//! source to the target before the guest resumes; a rollback leaves them with the
//! source. A node takes a lock it does not hold only as the operator's hand-over stamp
//! on it allows ([`DiskLocks::take`]).

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};

use ferry_agent::storage::image_lock_name;
use ferry_crds::{HAND_OVER_FROM, HAND_OVER_TO, IMAGE_ANNOTATION, VM_LABEL};

/// How long [`DiskLocks::take`] waits for the operator's hand-over stamp.
const STAMP_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// How often it looks.
const STAMP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a disk could not be locked or handed over.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("disk {disk} of VirtualMachine {vm} is locked by node {holder}")]
    HeldElsewhere {
        vm: String,
        disk: String,
        holder: String,
    },
    #[error(
        "disk {disk} of VirtualMachine {vm} is in use by VirtualMachine {other} on node {holder}: two guests never write one image"
    )]
    InUse {
        vm: String,
        disk: String,
        other: String,
        holder: String,
    },
    #[error("the lock of disk {disk} was created and removed meanwhile; try again")]
    Raced { disk: String },
    #[error("disk lock Lease {lease}: {source}")]
    Kube {
        lease: String,
        #[source]
        source: kube::Error,
    },
}

/// The disk locks of one VM.
pub struct DiskLocks {
    leases: Api<Lease>,
    vm: String,
}

impl DiskLocks {
    /// The locks of VirtualMachine `name` in `vm_namespace`, kept in Ferry's `namespace`.
    pub fn new(client: kube::Client, namespace: &str, vm_namespace: &str, name: &str) -> Self {
        DiskLocks {
            leases: Api::namespaced(client, namespace),
            vm: format!("{vm_namespace}.{name}"),
        }
    }

    fn lease_name(&self, disk: &str) -> String {
        image_lock_name(disk)
    }

    /// Whether `lease` is a lock of another VM's.
    fn others(&self, lease: &Lease, disk: &str) -> Result<(), LockError> {
        let owner = lease
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(VM_LABEL))
            .cloned()
            .unwrap_or_default();
        if owner == self.vm {
            return Ok(());
        }
        Err(LockError::InUse {
            vm: self.vm.replacen('.', "/", 1),
            disk: disk.to_string(),
            other: owner.replacen('.', "/", 1),
            holder: holder(lease),
        })
    }

    fn err(&self, disk: &str) -> impl Fn(kube::Error) -> LockError {
        let lease = self.lease_name(disk);
        move |source| LockError::Kube {
            lease: lease.clone(),
            source,
        }
    }

    /// Takes the lock of each disk (the image paths [`super::phase::disks`] gives) for
    /// `node`, or confirms it holds them; a lock another VM holds refuses the start.
    pub async fn acquire(&self, disks: &[String], node: &str) -> Result<(), LockError> {
        for disk in disks {
            self.acquire_one(disk, node).await?;
        }
        Ok(())
    }

    async fn acquire_one(&self, disk: &str, node: &str) -> Result<(), LockError> {
        let name = self.lease_name(disk);
        // A create that lost a race to another VM's is read again, once.
        for _ in 0..2 {
            if let Some(lease) = self.leases.get_opt(&name).await.map_err(self.err(disk))? {
                self.others(&lease, disk)?;
                let holder = holder(&lease);
                if holder != node {
                    return Err(LockError::HeldElsewhere {
                        vm: self.vm.clone(),
                        disk: disk.to_string(),
                        holder,
                    });
                }
                return Ok(());
            }
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([(VM_LABEL.to_string(), self.vm.clone())])),
                    annotations: Some(BTreeMap::from([(
                        IMAGE_ANNOTATION.to_string(),
                        disk.to_string(),
                    )])),
                    ..Default::default()
                },
                spec: Some(holder_spec(node)),
            };
            match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(self.err(disk)(e)),
            }
        }
        Err(LockError::Raced {
            disk: disk.to_string(),
        })
    }

    /// Moves each disk's lock from `from` to `to`; a lock already with `to` is fine.
    /// The resourceVersion precondition refuses a lock someone else moved meanwhile.
    pub async fn hand_over(&self, disks: &[String], from: &str, to: &str) -> Result<(), LockError> {
        for disk in disks {
            let name = self.lease_name(disk);
            let Some(lease) = self.leases.get_opt(&name).await.map_err(self.err(disk))? else {
                self.acquire(std::slice::from_ref(disk), to).await?;
                continue;
            };
            self.others(&lease, disk)?;
            let holder = holder(&lease);
            if holder == to {
                continue;
            }
            if holder != from {
                return Err(LockError::HeldElsewhere {
                    vm: self.vm.clone(),
                    disk: disk.clone(),
                    holder,
                });
            }
            // Over the version read: a lock someone moved meanwhile is refused (409).
            let patch = Lease {
                metadata: ObjectMeta {
                    resource_version: lease.metadata.resource_version.clone(),
                    ..Default::default()
                },
                spec: Some(holder_spec(to)),
            };
            self.leases
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(self.err(disk))?;
        }
        Ok(())
    }

    /// Takes each disk's lock from `from` for `to`, the writer ([`Self::hand_over`]), once
    /// the operator stamped it for that hand-over: the admission policy lets a node that
    /// does not hold a lock take it only as the stamp's `ferry.dev/hand-over-to`, from
    /// its `ferry.dev/hand-over-from`. A peer-to-peer migration's operator stamps the
    /// locks when it sees the phase the source agent entered, so this waits for the
    /// stamp (up to [`STAMP_WAIT`]), then tries anyway and the policy answers.
    pub async fn take(&self, disks: &[String], from: &str, to: &str) -> Result<(), LockError> {
        let deadline = tokio::time::Instant::now() + STAMP_WAIT;
        for disk in disks {
            let name = self.lease_name(disk);
            loop {
                let Some(lease) = self.leases.get_opt(&name).await.map_err(self.err(disk))? else {
                    break;
                };
                let stamped = lease.metadata.annotations.as_ref().is_some_and(|a| {
                    a.get(HAND_OVER_FROM).map(String::as_str) == Some(from)
                        && a.get(HAND_OVER_TO).map(String::as_str) == Some(to)
                });
                if holder(&lease) != from || stamped || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(STAMP_POLL).await;
            }
        }
        self.hand_over(disks, from, to).await
    }

    /// Drops every lock of the VM held by `node` (the guest stopped there).
    pub async fn release(&self, node: &str) -> Result<(), LockError> {
        let list = self
            .leases
            .list(&ListParams::default().labels(&format!("{VM_LABEL}={}", self.vm)))
            .await
            .map_err(self.err("*"))?;
        for lease in list.items.iter().filter(|l| holder(l) == node) {
            let name = lease.metadata.name.clone().unwrap_or_default();
            match self.leases.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(self.err(&name)(e)),
            }
        }
        Ok(())
    }
}

/// A disk lock's spec: held by `node`.
fn holder_spec(node: &str) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(node.to_string()),
        ..Default::default()
    }
}

fn holder(lease: &Lease) -> String {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

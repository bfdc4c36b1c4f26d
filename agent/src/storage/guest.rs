//! The host files a guest's definition names, opened beneath the roots before its QEMU
//! starts.
//!
//! Every start goes through [`open_guest`]: a VM's first start (its `spec.domainXML`),
//! Prepare on a target (the migration's target definition) and a restore. Each disk's
//! `<source file>` is opened with [`open_beneath`] (read-only for a `<readonly/>` disk,
//! read-write otherwise, which only a read-write root in the namespace's directory
//! allows) and its header checked against its declared format ([`check_image`]). A
//! serial or console `<source path>` is refused: their output goes to the VM's state
//! dir, and a spec naming a file there would have QEMU create or truncate it as root.
//! The first refusal ends the start; nothing has been handed to QEMU yet.

use super::UserPath;
use super::error::{Rule, StorageError};
use super::image::{ImageFormat, check_image};
use super::open::{Opened, open_beneath};
use super::roots::{Access, StorageRoots};
use crate::cmdline::DiskFd;
use crate::domain::{Device, Domain};
use std::os::fd::{AsFd, AsRawFd};

/// Whose definition is being started: the namespace its host paths are checked for, and
/// where the definition came from (for messages), e.g. `spec.domainXML`.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub namespace: &'a str,
    pub definition: &'a str,
}

/// One disk's image, opened.
#[derive(Debug)]
pub struct DiskFile {
    pub target_dev: String,
    pub image: Opened,
}

/// The files of one guest, opened beneath the roots. Dropping it closes them (after
/// QEMU inherited them, the agent keeps none).
#[derive(Debug, Default)]
pub struct GuestFiles {
    pub disks: Vec<DiskFile>,
}

impl GuestFiles {
    /// The descriptors as the command line names them.
    pub fn disk_fds(&self) -> Vec<DiskFd> {
        self.disks
            .iter()
            .map(|d| DiskFd {
                target_dev: d.target_dev.clone(),
                fd: d.image.fd().as_fd().as_raw_fd(),
                read_only: d.image.access() == Access::ReadOnly,
            })
            .collect()
    }
}

/// Opens what `domain` names on the host, for `owner`, beneath `roots`.
pub fn open_guest(
    roots: &StorageRoots,
    owner: Owner<'_>,
    domain: &Domain,
) -> Result<GuestFiles, StorageError> {
    let mut files = GuestFiles::default();
    for device in &domain.devices {
        match device {
            Device::Disk(d) => {
                let field = format!(
                    "{}: <disk> {} <source file>",
                    owner.definition, d.target_dev
                );
                let user = UserPath {
                    field: &field,
                    path: &d.source,
                };
                let format: ImageFormat = d
                    .format
                    .parse()
                    .map_err(|_| StorageError::new(user, Rule::UnknownFormat(d.format.clone())))?;
                let access = if d.readonly {
                    Access::ReadOnly
                } else {
                    Access::ReadWrite
                };
                let image = open_beneath(roots, owner.namespace, user, access)?;
                check_image(&image, format)?;
                files.disks.push(DiskFile {
                    target_dev: d.target_dev.clone(),
                    image,
                });
            }
            Device::Serial(c) | Device::Console(c) => {
                if let Some(path) = &c.path {
                    let what = match device {
                        Device::Serial(_) => "serial",
                        _ => "console",
                    };
                    let field = format!(
                        "{}: <{what}> port {} <source path>",
                        owner.definition, c.port
                    );
                    return Err(StorageError::new(
                        UserPath {
                            field: &field,
                            path,
                        },
                        Rule::OutputPath,
                    ));
                }
            }
            Device::Interface(_) | Device::Graphics(_) => {}
        }
    }
    Ok(files)
}
